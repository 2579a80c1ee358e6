"""misq.data: protocol joins, HF row semantics, GPTQ-identical calibration draws, the token cache.

Most tests use a toy byte-level BPE tokenizer and tiny synthetic data folders; the last ones
check the real shared data with the llama-9m tokenizer (skipped when absent).
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from misq.demo.toy import build_tokenizer, synthetic_corpus
from misq.errors import MisqError
from misq.protocol import data, sources

UNK = 0


class CountingTokenizer:
    """Forwards everything to a tokenizer and counts how often it is called to tokenize."""

    def __init__(self, tok):
        self._tok = tok
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(synthetic_corpus(400, seed=3) + " <unk> = Title = N 1 2 3\n", vocab_size=400)


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def no_hub(monkeypatch):
    """Make `import datasets` fail at once, so the Hugging Face fallback cannot wait on the network."""
    monkeypatch.setitem(sys.modules, "datasets", None)


WIKI_TEST = " \n = Title = \n \n The cat sees a red ball . \n \n  \n A dog likes the river . \n"
WIKI_TRAIN = "".join(f" \n = Part {i} = \n \n {synthetic_corpus(12, seed=i)}".replace("\n\n", " \n") for i in range(20))
PTB_TEST = " the cat sees <unk> \n a dog likes the <unk> river \n\n the king N times \n"
PTB_TRAIN = "".join(f" {line} <unk> \n" for line in synthetic_corpus(300, seed=5).split(". ") if line.strip())


def write_jsonl_gz(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "url": "u"}) + "\n")


def c4_docs(n: int, seed: int, sizes: tuple[int, ...]) -> list[str]:
    """``n`` documents of a few sentences each (sizes drawn from ``sizes``)."""
    rng = random.Random(seed)
    return [f"doc {i}. " + synthetic_corpus(rng.choice(sizes), seed=seed * 10000 + i).strip() for i in range(n)]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "wiki.test.raw").write_text(WIKI_TEST)
    (root / "wikitext2" / "wiki.train.raw").write_text(WIKI_TRAIN)
    (root / "ptb").mkdir()
    (root / "ptb" / "ptb.test.txt").write_text(PTB_TEST)
    (root / "ptb" / "ptb.train.txt").write_text(PTB_TRAIN)
    write_jsonl_gz(root / "c4" / "c4-validation.sample.jsonl.gz", c4_docs(1200, seed=1, sizes=(1, 2)))
    # Some training documents are longer than the 64-token windows drawn from them.
    write_jsonl_gz(root / "c4" / "c4-train.sample.jsonl.gz", c4_docs(60, seed=2, sizes=(1, 2, 40)))
    return root


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, split_special_tokens=True)["input_ids"]


def gptq_c4(tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ's get_c4 loop, written out with the global `random` module as the reference does."""
    state = random.getstate()
    try:
        random.seed(seed)
        out, memo = [], {}  # memo only saves time: the random calls are the reference's
        for _ in range(nsamples):
            while True:
                i = random.randint(0, len(docs) - 1)
                if i not in memo:
                    memo[i] = torch.tensor([ids(tokenizer, docs[i])])
                enc = memo[i]
                if enc.shape[1] > seqlen:
                    break
            i = random.randint(0, enc.shape[1] - seqlen - 1)
            out.append(enc[:, i : i + seqlen])
        return torch.cat(out)
    finally:
        random.setstate(state)


def gptq_stream(stream: list[int], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ's get_wikitext2 / get_ptb loop with the global `random` module."""
    state = random.getstate()
    try:
        random.seed(seed)
        enc = torch.tensor([stream])
        out = []
        for _ in range(nsamples):
            i = random.randint(0, enc.shape[1] - seqlen - 1)
            out.append(enc[:, i : i + seqlen])
        return torch.cat(out)
    finally:
        random.setstate(state)


# ----------------------------------------------------------------------------- names and dirs


def test_check_dataset_name(tmp_path):
    for name in ("wikitext2", "ptb", "c4"):
        sources.check_dataset_name(name)
    own = tmp_path / "mine.txt"
    own.write_text("hello")
    sources.check_dataset_name(str(own))
    with pytest.raises(MisqError, match=r"unknown dataset 'foo': use wikitext2, ptb, c4 or the path of a text file"):
        sources.check_dataset_name("foo")
    with pytest.raises(MisqError, match="unknown dataset"):
        sources.check_dataset_name(str(tmp_path))  # a directory is not a text file


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.setenv("MISQ_DATA_DIR", str(b))
    assert sources.resolve_data_dir(str(a)) == a  # the argument beats the environment
    assert sources.resolve_data_dir(None) == b
    monkeypatch.delenv("MISQ_DATA_DIR")
    assert sources.resolve_data_dir(None) is None
    with pytest.raises(MisqError, match="not a directory"):
        sources.resolve_data_dir(str(tmp_path / "missing"))


def test_argument_beats_env_for_files(tok, data_dir, tmp_path, cache, monkeypatch):
    other = tmp_path / "other" / "ptb"
    other.mkdir(parents=True)
    (other / "ptb.test.txt").write_text(" something else entirely \n")
    monkeypatch.setenv("MISQ_DATA_DIR", str(other.parent))
    assert sources.load_rows("ptb", data_dir=data_dir) == ["the cat sees <unk>", "a dog likes the <unk> river", "",
                                                        "the king N times"]
    assert sources.load_rows("ptb") == ["something else entirely"]


def test_not_found_names_files_and_dirs(tmp_path, no_hub, monkeypatch):
    monkeypatch.delenv("MISQ_DATA_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MisqError) as err:
        sources.load_rows("wikitext2", data_dir=empty)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("wiki.test.raw", str(empty / "wikitext2"), str(empty), "--data-dir", "MISQ_DATA_DIR"):
        assert part in msg
    with pytest.raises(MisqError, match=r"c4-train\.00000-of-01024\.json\.gz.*no data directory given"):
        sources.load_rows("c4", "train")


# ----------------------------------------------------------------------------- rows and joins


def test_wikitext_hf_rows_and_join(tok, data_dir, cache):
    rows = sources.load_rows("wikitext2", data_dir=data_dir)
    # Blank lines (only whitespace) become "", every other line keeps its spaces and "\n".
    assert rows == ["", " = Title = \n", "", " The cat sees a red ball . \n", "", "", " A dog likes the river . \n"]
    got = data.eval_tokens("wikitext2", tok, seqlen=8, data_dir=data_dir, cache_dir=cache)
    assert got.shape[0] == 1 and got.dtype == torch.long
    assert got[0].tolist() == ids(tok, "\n\n".join(rows))


def test_ptb_join_and_unk_kept_as_text(tok, data_dir, cache):
    rows = sources.load_rows("ptb", data_dir=data_dir)
    got = data.eval_tokens("ptb", tok, seqlen=8, data_dir=data_dir, cache_dir=cache)[0]
    assert got.tolist() == ids(tok, " ".join(rows))
    assert UNK not in got.tolist()
    assert UNK in tok(" ".join(rows))["input_ids"]  # the trap: a plain call makes <unk> the unknown token
    assert tok.decode(got) == " ".join(rows)


def test_bos_added_once_at_start(tok, data_dir, cache):
    from tokenizers.processors import TemplateProcessing

    bos_tok = copy.deepcopy(tok)
    bos_tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    got = data.eval_tokens("ptb", bos_tok, seqlen=8, data_dir=data_dir, cache_dir=cache)[0].tolist()
    assert got[0] == 1 and got.count(1) == 1
    assert got[1:] == data.eval_tokens("ptb", tok, seqlen=8, data_dir=data_dir, cache_dir=cache)[0].tolist()


def test_c4_first_1100_docs_joined_and_cut(tok, data_dir, cache):
    docs = sources.load_rows("c4", data_dir=data_dir)  # 1200 in the file; only the first 1100 are read
    assert len(docs) == 1200 and docs[-1].startswith("doc 1199")
    first = sources.load_rows("c4", data_dir=data_dir, limit=1100)
    full = ids(tok, " ".join(first[:1100]))
    big = 1 + len(full) // 256  # 256 x big tokens exceed the text: nothing is cut
    assert data.eval_tokens("c4", tok, seqlen=big, data_dir=data_dir, cache_dir=cache)[0].tolist() == full
    got = data.eval_tokens("c4", tok, seqlen=4, data_dir=data_dir, cache_dir=cache)[0].tolist()
    assert got == full[: 256 * 4]


def test_user_file_is_its_whole_text(tok, tiny_corpus_file, cache):
    text = tiny_corpus_file.read_text()
    got = data.eval_tokens(str(tiny_corpus_file), tok, seqlen=16, cache_dir=cache)
    assert got[0].tolist() == ids(tok, text)
    assert sources.describe_source(str(tiny_corpus_file))["file"] == str(tiny_corpus_file.resolve())


# ----------------------------------------------------------------------------- calibration


def test_stream_windows_match_gptq(tok, data_dir, cache):
    w = data.calibration_windows("wikitext2", tok, nsamples=6, seqlen=16, seed=0, data_dir=data_dir, cache_dir=cache)
    assert w.shape == (6, 16) and w.dtype == torch.long
    stream = ids(tok, " ".join(sources.load_rows("wikitext2", "train", data_dir)))  # rows joined by one space
    assert torch.equal(w, gptq_stream(stream, 6, 16, 0))
    again = data.calibration_windows("wikitext2", tok, 6, 16, seed=0, data_dir=data_dir, cache_dir=cache)
    other = data.calibration_windows("wikitext2", tok, 6, 16, seed=1, data_dir=data_dir, cache_dir=cache)
    assert torch.equal(w, again) and not torch.equal(w, other)
    ptb = data.calibration_windows("ptb", tok, 4, 16, seed=0, data_dir=data_dir, cache_dir=cache)
    assert torch.equal(ptb, gptq_stream(ids(tok, " ".join(sources.load_rows("ptb", "train", data_dir))), 4, 16, 0))


def test_c4_windows_match_gptq(tok, data_dir, cache):
    docs = sources.load_rows("c4", "train", data_dir)
    state = random.getstate()
    w = data.calibration_windows("c4", tok, nsamples=8, seqlen=64, seed=0, data_dir=data_dir, cache_dir=cache)
    assert random.getstate() == state  # no global random state touched
    assert w.shape == (8, 64)
    assert torch.equal(w, gptq_c4(tok, docs, 8, 64, 0))
    other = data.calibration_windows("c4", tok, 8, 64, seed=7, data_dir=data_dir, cache_dir=cache / "x")
    assert torch.equal(other, gptq_c4(tok, docs, 8, 64, 7)) and not torch.equal(w, other)


def test_too_short(tok, tmp_path, cache):
    short = tmp_path / "short.txt"
    short.write_text("The cat sees a red ball.")
    n = len(ids(tok, short.read_text()))
    with pytest.raises(MisqError, match=r"too short for one window of 1000 tokens: use a smaller --seqlen or more"):
        data.calibration_windows(str(short), tok, 2, 1000, cache_dir=cache)
    with pytest.raises(MisqError, match="too short"):  # N - seqlen - 1 must be >= 0
        data.calibration_windows(str(short), tok, 2, n - 1, cache_dir=cache)
    assert data.calibration_windows(str(short), tok, 2, n - 2, cache_dir=cache).shape == (2, n - 2)


def test_c4_no_long_document_fails_instead_of_spinning(tok, tmp_path, cache):
    root = tmp_path / "d"
    write_jsonl_gz(root / "c4" / "c4-train.tiny.jsonl.gz", ["The cat sees a red ball.", "A dog likes the river."])
    with pytest.raises(MisqError, match="every document is too short for one window of 500 tokens"):
        data.calibration_windows("c4", tok, 2, 500, data_dir=root, cache_dir=cache)  # caught up front
    # Long enough in bytes, too short in tokens: caught once every document has been tried.
    with pytest.raises(MisqError, match="every document is too short for one window of 25 tokens"):
        data.calibration_windows("c4", tok, 2, 25, data_dir=root, cache_dir=cache)


# ----------------------------------------------------------------------------- files and provenance


def test_tokenized_wikitext_train_fallback(tok, tmp_path, cache, caplog):
    root = tmp_path / "d"
    (root / "wikitext2" / "tokenized").mkdir(parents=True)
    with gzip.open(root / "wikitext2" / "tokenized" / "wiki.train.tokens.gz", "wt") as f:
        f.write(WIKI_TRAIN)
    with caplog.at_level(logging.WARNING, logger="misq.data"):
        w = data.calibration_windows("wikitext2", tok, 2, 8, data_dir=root, cache_dir=cache)
    assert w.shape == (2, 8)
    assert "tokenized variant" in caplog.text
    assert "tokenized" in sources.describe_source("wikitext2", root, split="train")["note"]


def test_c4_prefers_full_shard(tmp_path):
    root = tmp_path / "d"
    write_jsonl_gz(root / "c4" / "c4-validation.sample.jsonl.gz", ["sample"])
    write_jsonl_gz(root / "c4-validation.00000-of-00008.json.gz", ["full shard"])  # in <dir>/ itself
    assert sources.load_rows("c4", data_dir=root) == ["full shard"]
    info = sources.describe_source("c4", root)
    assert info["file"].endswith("c4-validation.00000-of-00008.json.gz") and info["documents"] == 1
    assert "note" not in info and info["joined_with"] == " "


def test_describe_source(data_dir):
    info = sources.describe_source("c4", data_dir)
    assert info["dataset"] == "c4" and info["split"] == "validation" and info["documents"] == 1100
    assert "sample" in info["note"] and Path(info["file"]).is_absolute()
    assert sources.describe_source("wikitext2", data_dir)["joined_with"] == "\n\n"
    assert sources.describe_source("ptb", data_dir, split="train")["file"].endswith("ptb.train.txt")


# ----------------------------------------------------------------------------- cache and tokenizer checks


def test_cache_skips_tokenizer_and_keys_c4_on_seqlen(tok, data_dir, cache):
    counting = CountingTokenizer(tok)
    first = data.eval_tokens("c4", counting, seqlen=4, data_dir=data_dir, cache_dir=cache)
    assert counting.calls >= 1
    counting.calls = 0
    assert torch.equal(data.eval_tokens("c4", counting, seqlen=4, data_dir=data_dir, cache_dir=cache), first)
    assert counting.calls == 0
    assert all(not p.name.endswith(".tmp") for p in cache.iterdir())  # written atomically, nothing left over
    longer = data.eval_tokens("c4", counting, seqlen=5, data_dir=data_dir, cache_dir=cache)
    assert counting.calls >= 1 and longer.shape[1] == 256 * 5  # a new key for a new seqlen
    assert len(list(cache.glob("c4-validation-*.npy"))) == 2

    counting.calls = 0  # wikitext2 ignores seqlen in the key; calibration reuses its cached stream
    data.eval_tokens("wikitext2", counting, seqlen=4, data_dir=data_dir, cache_dir=cache)
    data.eval_tokens("wikitext2", counting, seqlen=8, data_dir=data_dir, cache_dir=cache)
    data.calibration_windows("wikitext2", counting, 3, 8, data_dir=data_dir, cache_dir=cache)
    data.calibration_windows("wikitext2", counting, 3, 8, seed=1, data_dir=data_dir, cache_dir=cache)
    assert counting.calls == 2  # once for the test text, once for the train stream


def test_cache_invalidated_by_file_change_and_tokenizer(tok, data_dir, cache):
    before = data.eval_tokens("ptb", tok, 8, data_dir, cache)
    path = data_dir / "ptb" / "ptb.test.txt"
    path.write_text(PTB_TEST + " one more line \n")
    os.utime(path, ns=(1, 1))  # a different size and mtime: the key changes
    after = data.eval_tokens("ptb", tok, 8, data_dir, cache)
    assert after.shape[1] > before.shape[1]
    other_tok = build_tokenizer(synthetic_corpus(200, seed=9), vocab_size=300)
    assert data.tokenizer_fingerprint(other_tok) != data.tokenizer_fingerprint(tok)
    assert data.eval_tokens("ptb", other_tok, 8, data_dir, cache)[0].tolist() == ids(other_tok, " ".join(
        sources.load_rows("ptb", data_dir=data_dir)))


def test_tokenizer_ignoring_split_flag_is_refused(tok):
    class Ignores(CountingTokenizer):
        def __call__(self, text, **kwargs):
            kwargs.pop("split_special_tokens", None)
            return self._tok(text, **kwargs)

    with pytest.raises(MisqError, match="split_special_tokens"):
        data.encode(Ignores(tok), "the <unk> river")
    assert data.encode(Ignores(tok), "the river").tolist() == ids(tok, "the river")  # nothing to split


# ----------------------------------------------------------------------------- real shared data


@pytest.fixture(scope="module")
def llama_tok(llama9m_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama9m_dir)


def test_real_row_counts(shared_data_dir):
    wiki = sources.load_rows("wikitext2", data_dir=shared_data_dir)
    assert len(wiki) == 4358 and sum(r == "" for r in wiki) == 1467  # SOURCES.md: 2891 non-empty rows
    assert len(sources.load_rows("ptb", data_dir=shared_data_dir)) == 3761


def test_real_ptb_unk_as_text(shared_data_dir, llama_tok, cache):
    got = data.eval_tokens("ptb", llama_tok, 1024, shared_data_dir, cache)
    assert got.shape[1] > 100_000
    assert llama_tok.unk_token_id not in got[0].tolist()


def test_real_c4_eval_and_calibration(shared_data_dir, llama_tok, cache):
    # The first 1100 sample documents hold about 644k llama-9m tokens, so the 256 x 1024 cut applies.
    c4 = data.eval_tokens("c4", llama_tok, 1024, shared_data_dir, cache)
    assert c4.shape == (1, 256 * 1024)
    w = data.calibration_windows("c4", llama_tok, 128, 1024, seed=0, data_dir=shared_data_dir, cache_dir=cache)
    assert w.shape == (128, 1024)
    docs = sources.load_rows("c4", "train", shared_data_dir)
    assert len(docs) == 1000
    # Deterministic: the same draws as an independent run of the reference loop. Draws are
    # sequential, so checking the first 32 of 128 keeps this test fast.
    assert torch.equal(w[:32], gptq_c4(llama_tok, docs, 32, 1024, 0))
