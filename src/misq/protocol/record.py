"""What a results file says about how its perplexities were measured (docs/protocol.md)."""

from __future__ import annotations

from typing import Any

# The numbers the evaluation text is built with: the record must state what data.py does.
from misq.protocol.sources import C4_EVAL_DOCUMENTS, C4_EVAL_SEGMENTS


def protocol_record(seqlen: int, c4_cut: bool = True) -> dict[str, Any]:
    """The ``protocol`` section of a results file: seqlen and the rules every PPL in it follows.

    Written verbatim (keys included) because reports compare it between a baseline and a run.
    """
    return {
        "name": "gptq-sparsegpt",
        "seqlen": seqlen,
        "c4_documents": C4_EVAL_DOCUMENTS,
        "c4_max_tokens": C4_EVAL_SEGMENTS * seqlen if c4_cut else None,
        "unk_as_text": True,
        "segments": "tokens // seqlen, no overlap, remainder dropped",
        "ppl": "exp(sum(mean CE of shifted logits * seqlen) / (segments * seqlen))",
        "reference": "docs/protocol.md (the protocol of the GPTQ/SparseGPT papers' tables)",
    }
