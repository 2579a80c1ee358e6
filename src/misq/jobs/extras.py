"""What ``misq eval`` and ``misq compress`` measure beside perplexity: zero-shot accuracy through
lm-evaluation-harness (:mod:`misq.protocol.zeroshot`) and greedy generations for a few prompts
(:mod:`misq.protocol.generations`), both written into the results file.

Orchestration only. :func:`check` runs before any weights are loaded (lm-eval installed, task
names known, task data reachable, prompts file readable), so a mistake costs seconds, not a
compression. Both need the whole model at once: a model that runs layer by layer gets none.
``misq eval`` (``strict``) then refuses the tasks; ``misq compress`` keeps its compression and
records why the tasks were skipped.
"""

from __future__ import annotations

import logging
from typing import Any

from misq.config import EvalConfig
from misq.errors import MisqError
from misq.protocol import generations, zeroshot

log = logging.getLogger(__name__)


def check(eval_cfg: EvalConfig | None) -> None:
    """Refuse now what would fail after loading (or compressing) the model."""
    if eval_cfg is None:
        return
    generations.read_prompts(eval_cfg.prompts)
    if eval_cfg.tasks:
        manager = zeroshot.task_manager(eval_cfg.tasks, eval_cfg.task_dir)
        zeroshot.load_tasks(manager, eval_cfg.tasks)  # reads the task data (from the datasets cache once fetched)


def _skipped_tasks(eval_cfg: EvalConfig, reason: str) -> dict[str, Any]:
    log.warning("zero-shot tasks not run: %s", reason)
    return {"harness": {"name": "lm-evaluation-harness", "version": zeroshot.harness_version()},
            "num_fewshot": eval_cfg.num_fewshot, "limit": eval_cfg.task_limit, "skipped": reason, "tasks": {}}


def measure(results: Any, model: Any, tokenizer: Any, eval_cfg: EvalConfig | None, device: str, *,
            layerwise: bool | None, source: Any = None, strict: bool = True, progress: Any = None) -> None:
    """Set ``results.generations`` and ``results.zeroshot`` (a :class:`misq.runs.results.Results`)."""
    if eval_cfg is None:
        return
    prompts = generations.read_prompts(eval_cfg.prompts)
    if not (prompts or eval_cfg.tasks):
        return
    blocker = generations.whole_model_blocker(model, device, layerwise=layerwise, source=source)
    if blocker is None and tokenizer is None:
        blocker = "the checkpoint has no tokenizer"
    if blocker is not None:
        if eval_cfg.tasks:
            if strict:
                raise MisqError(f"--tasks runs the whole model at once, but {blocker}: evaluate on a device that "
                                "holds the model (or spread it with --device-map auto)")
            results.zeroshot = _skipped_tasks(eval_cfg, blocker)
        if prompts:
            results.generations = generations.skipped(blocker, eval_cfg.max_new_tokens)
        return
    with generations.whole_model(model, device) as where:
        if prompts:
            if progress is not None:
                progress.update("generate")
            results.generations = generations.generate(model, tokenizer, prompts, where,
                                                       max_new_tokens=eval_cfg.max_new_tokens)
        if eval_cfg.tasks:
            if progress is not None:
                progress.update("zeroshot")
            batch = eval_cfg.task_batch_size if eval_cfg.task_batch_size == "auto" else int(eval_cfg.task_batch_size)
            try:
                results.zeroshot = zeroshot.evaluate_tasks(model, tokenizer, eval_cfg.tasks, where,
                                                           num_fewshot=eval_cfg.num_fewshot, batch_size=batch,
                                                           limit=eval_cfg.task_limit, task_dir=eval_cfg.task_dir)
            except MisqError as err:
                if strict:
                    raise
                results.zeroshot = _skipped_tasks(eval_cfg, str(err))  # the compression is kept all the same


__all__ = ["check", "measure"]
