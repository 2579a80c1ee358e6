"""``misq eval``: the perplexity of a model as it is (a baseline) or of a packed misq checkpoint.

Orchestration only: the numbers come from :mod:`misq.protocol.perplexity`; this module loads
the model, asks for them and writes the results file (:class:`misq.runs.results.Results`).
"""

from __future__ import annotations

from typing import Any

from misq.config import DataConfig, EvalConfig, ModelConfig
from misq.jobs import loading
from misq.models import layout, streaming
from misq.models.loading import misq_section_of
from misq.protocol import data, perplexity
from misq.protocol.record import protocol_record
from misq.runs.results import Memory, Results
from misq.runs.rundir import check_writable


def run_eval(model_cfg: ModelConfig, data_cfg: DataConfig, eval_cfg: EvalConfig, out: str | None) -> dict[str, Any]:
    """Evaluate ``model_cfg.model`` on ``eval_cfg.datasets``; write the results to ``out`` (if
    given) and return them as written (the ``results.json`` dict)."""
    if out:
        check_writable(out, "output file")
    data_dir = data.resolve_data_dir(data_cfg.data_dir)
    data.check_local_sources([(name, None) for name in eval_cfg.datasets], data_dir)  # before loading weights
    loaded = loading.load(model_cfg, data_cfg)
    model, device = loaded.model, loaded.device
    packed = misq_section_of(model_cfg.model)
    streaming.reset_peak_gpu(device)
    evals = perplexity.evaluate_datasets(model, loaded.tokenizer, eval_cfg.datasets, loaded.seqlen, device,
                                         data_dir=data_dir, cache_dir=data_cfg.cache_dir, layerwise=model_cfg.layerwise,
                                         batch_size=eval_cfg.batch_size, c4_cut=data_cfg.c4_cut, source=loaded.source)
    results = Results(
        kind="compressed" if packed is not None else "baseline",
        model=layout.model_summary(model) | {"name_or_path": model_cfg.model},
        device=device,
        protocol=protocol_record(loaded.seqlen, data_cfg.c4_cut),
        memory=Memory(**streaming.peak_memory(device), streamed=loaded.streamed),
        config=packed.get("compress_config", {}) if packed is not None else None,
        device_map=sorted({str(d) for d in model.hf_device_map.values()}) if perplexity.is_dispatched(model) else None,
    )
    for name, res in evals.items():
        results.add_eval(name, res)
    if out:
        results.write(out)
    return results.to_json()
