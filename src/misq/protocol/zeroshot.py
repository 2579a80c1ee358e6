"""Zero-shot accuracy through lm-evaluation-harness (the ``lm-eval`` package, ``pip install 'misq[eval]'``).

The harness runs on the model misq already holds (its ``HFLM`` wrapper takes a model instance
and a tokenizer), whole on the device or as ``device_map`` placed it. The result is the
``zeroshot`` section of a results file::

    {"harness": {"name": "lm-evaluation-harness", "version": "0.4.13"}, "num_fewshot": 0,
     "limit": null, "seconds": 812.4,
     "tasks": {"piqa": {"version": "1.0", "num_fewshot": 0, "samples": 1838,
                        "metrics": {"acc": {"value": 0.781, "stderr": 0.0096},
                                    "acc_norm": {"value": 0.789, "stderr": 0.0095}}}, ...}}

Values are fractions in [0, 1], as the harness reports them. lm-eval is imported only here, and
only when tasks are asked for: misq itself never needs it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from misq.errors import MisqError

log = logging.getLogger(__name__)

# The metrics recorded (lm-eval's names): accuracy and length-normalised accuracy.
METRICS = ("acc", "acc_norm")
INSTALL_HINT = "pip install 'misq[eval]' (or pip install 'lm-eval[hf]')"


def _harness() -> Any:
    try:
        import lm_eval
    except ImportError as err:
        raise MisqError(f"--tasks needs lm-evaluation-harness, which is not installed ({err}): {INSTALL_HINT}") from None
    try:
        import lm_eval.models.huggingface  # its Hugging Face backend, which needs accelerate
    except ImportError as err:
        raise MisqError(f"--tasks needs lm-evaluation-harness with its Hugging Face backend ({err}): {INSTALL_HINT}") from None
    return lm_eval


def harness_version() -> str | None:
    """The installed lm-eval version, or None when it is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("lm_eval")
    except PackageNotFoundError:
        return None


def check_installed() -> None:
    """Refuse, in one line, before any weights are loaded, when lm-eval is missing."""
    _harness()


def task_manager(tasks: tuple[str, ...], task_dir: str | None = None) -> Any:
    """lm-eval's TaskManager, once it knows every name in ``tasks`` (no dataset is read).

    With a ``task_dir`` whose YAMLs define every task asked for, lm-eval's own few thousand task
    files are not indexed (seconds saved); otherwise they are, with the folder's tasks added.
    """
    _harness()
    from lm_eval.tasks import TaskManager

    if task_dir:
        own = TaskManager(include_path=task_dir, include_defaults=False)
        if all(t in set(own.all_tasks) for t in tasks):
            return own
    manager = TaskManager(include_path=task_dir) if task_dir else TaskManager()
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" or in --task-dir {task_dir}" if task_dir else ""
        raise MisqError(f"lm-eval has no task {', '.join(map(repr, unknown))}{where}: check the spelling "
                        "(`lm-eval ls tasks` lists them), or give a folder of task YAMLs with --task-dir")
    return manager


def load_tasks(manager: Any, tasks: tuple[str, ...]) -> list[Any]:
    """The harness's task objects; reading their datasets is where a missing hub or cache fails."""
    try:
        loaded = manager.load(list(tasks))
    except Exception as err:  # datasets / hub / network errors of many kinds: all mean "data not reachable"
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise MisqError(
            f"cannot load the data of task(s) {', '.join(tasks)} ({type(err).__name__}: {first}): lm-eval reads them "
            "from the Hugging Face hub, so either allow network access or point HF_DATASETS_CACHE (or HF_HOME) at a "
            "cache that already holds them (with HF_DATASETS_OFFLINE=1 on machines without network)") from None
    return list(loaded["tasks"].values())


def evaluate_tasks(model: Any, tokenizer: Any, tasks: tuple[str, ...], device: str, *, num_fewshot: int = 0,
                   batch_size: int | str = 1, limit: int | None = None, task_dir: str | None = None) -> dict[str, Any]:
    """Run ``tasks`` on ``model`` (already placed where it runs) and return the ``zeroshot`` section."""
    lm_eval = _harness()
    if tokenizer is None:
        raise MisqError("--tasks needs the model's tokenizer, and this checkpoint has none: save the packed "
                        "checkpoint again from a model folder that holds its tokenizer")
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, task_dir)
    task_objects = load_tasks(manager, tasks)
    t0 = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=task_objects, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=0 if limit else 1000)
    seconds = time.perf_counter() - t0
    section = summarize(out, num_fewshot=num_fewshot, limit=limit)
    section["seconds"] = seconds
    for name, task in section["tasks"].items():
        shown = ", ".join(f"{m} {100 * v['value']:.2f}%" for m, v in task["metrics"].items() if v["value"] is not None)
        log.info("%s (%d-shot, %s examples): %s", name, task["num_fewshot"], task["samples"], shown)
    return section


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf") else None


def summarize(out: dict[str, Any], *, num_fewshot: int, limit: int | None) -> dict[str, Any]:
    """The ``zeroshot`` section from what ``lm_eval.simple_evaluate`` returns (its ``results``,
    ``versions``, ``n-shot`` and ``n-samples``): acc and acc_norm with their stderr, per task."""
    results, versions = out.get("results") or {}, out.get("versions") or {}
    nshot, nsamples = out.get("n-shot") or {}, out.get("n-samples") or {}
    tasks: dict[str, Any] = {}
    for name, entry in results.items():
        metrics = {}
        for metric in METRICS:
            # lm-eval keys a metric by "name,filter": "acc,none"; the stderr is "acc_stderr,none".
            key = next((k for k in entry if k.split(",")[0] == metric), None)
            if key is None:
                continue
            stderr_key = f"{metric}_stderr," + (key.split(",", 1)[1] if "," in key else "none")
            metrics[metric] = {"value": _number(entry[key]), "stderr": _number(entry.get(stderr_key))}
        if not metrics:
            continue  # a group's aggregate, or a task without accuracy
        samples = nsamples.get(name) or {}
        tasks[name] = {
            "version": None if versions.get(name) is None else str(versions[name]),
            "num_fewshot": int(nshot.get(name, num_fewshot) or 0),
            "samples": samples.get("effective") if isinstance(samples, dict) else samples,
            "metrics": metrics,
        }
    return {
        "harness": {"name": "lm-evaluation-harness", "version": harness_version()},
        "num_fewshot": num_fewshot,
        "limit": limit,
        "tasks": tasks,
    }


__all__ = ["INSTALL_HINT", "METRICS", "check_installed", "evaluate_tasks", "harness_version", "load_tasks", "summarize", "task_manager"]
