"""``misq eval``: the perplexity of a model as it is (a baseline) or of a packed misq checkpoint.

Orchestration only: the numbers come from :mod:`misq.protocol.perplexity`; this module loads
the model, asks for them and writes the results file (:class:`misq.runs.results.Results`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from misq.config import DataConfig, EvalConfig, ModelConfig
from misq.errors import MisqError
from misq.jobs import extras, loading
from misq.models import layout, streaming
from misq.models.loading import misq_section_of
from misq.ownership import same_path
from misq.protocol import perplexity, sources
from misq.protocol.record import protocol_record
from misq.runs.results import Memory, Results
from misq.runs.rundir import check_writable


def _check_out_file(out: str, model: str, overwrite: bool) -> None:
    path = Path(out).expanduser()
    try:
        exists = path.exists()
    except OSError as err:
        raise MisqError(f"--out {out!r} cannot be used ({err.strerror or err}): give a shorter or valid path") from None
    if path.is_dir():
        raise MisqError(f"--out {out!r} is a folder: give the path of a results file, e.g. {out.rstrip('/')}/results.json")
    if same_path(path.parent, model) and (path.name in ("config.json", "generation_config.json") or path.suffix == ".safetensors"):
        raise MisqError(f"--out {out!r} is a file of the model: misq never writes into its inputs; choose another path")
    if exists and not overwrite:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            ours = isinstance(data, dict) and "misq_version" in data and data.get("kind") in ("baseline", "compressed")
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise MisqError(f"--out {out!r} exists and is not a misq results file: choose a new path "
                            "(or pass --overwrite to replace it)")


def run_eval(model_cfg: ModelConfig, data_cfg: DataConfig, eval_cfg: EvalConfig, out: str | None, *,
             overwrite: bool = False) -> dict[str, Any]:
    """Evaluate ``model_cfg.model`` on ``eval_cfg.datasets``; write the results to ``out`` (if
    given) and return them as written (the ``results.json`` dict). An existing ``out`` is replaced
    only when it is a misq results file (or ``overwrite``); a folder is refused, before the work."""
    if out:
        _check_out_file(out, model_cfg.model, overwrite)
        check_writable(out, "output file")
    data_dir = sources.resolve_data_dir(data_cfg.data_dir)
    sources.check_local_sources([(name, None) for name in eval_cfg.datasets], data_dir)  # before loading weights
    extras.check(eval_cfg)  # lm-eval, its tasks and their data, the prompts file: before loading weights too
    loaded = loading.load(model_cfg, data_cfg)
    model, device = loaded.model, loaded.device
    packed = misq_section_of(model_cfg.model)
    streaming.reset_peak_gpu(device)
    evals = perplexity.evaluate_datasets(model, loaded.tokenizer, eval_cfg.datasets, loaded.seqlen, device,
                                         data_dir=data_dir, cache_dir=data_cfg.cache_dir, layerwise=model_cfg.layerwise,
                                         batch_size=eval_cfg.batch_size, c4_cut=data_cfg.c4_cut, source=loaded.source)
    results = Results(
        kind="compressed" if packed is not None else "baseline",
        model=layout.model_summary(model) | {"name_or_path": model_cfg.model} | _source_of(packed),
        device=device,
        protocol=protocol_record(loaded.seqlen, data_cfg.c4_cut),
        memory=Memory(**streaming.peak_memory(device), streamed=loaded.streamed),
        config=packed.get("compress_config", {}) if packed is not None else None,
        device_map=sorted({str(d) for d in model.hf_device_map.values()}) if perplexity.is_dispatched(model) else None,
    )
    for name, res in evals.items():
        results.add_eval(name, res)
    extras.measure(results, model, loaded.tokenizer, eval_cfg, device, layerwise=model_cfg.layerwise, source=loaded.source)
    if out:
        results.write(out)
    return results.to_json()


def _source_of(packed: dict[str, Any] | None) -> dict[str, str]:
    """``{"compressed_from": model}`` for a packed checkpoint that recorded its source model."""
    extra = (packed or {}).get("extra")
    source = extra.get("source_model") if isinstance(extra, dict) else None
    return {"compressed_from": source} if isinstance(source, str) else {}
