"""Resuming an interrupted compression run.

A fresh run records its configuration in ``RUN_DIR/resume/state.json`` before any work. After
each decoder layer the run directory gets, atomically and in this order:

    RUN_DIR/resume/layer_007.safetensors   the compressed layer's tensors + its grids
    RUN_DIR/resume/state.json              layers done, per-layer records, elapsed time

``state.json`` is written last, so it never names a layer whose file is incomplete, whatever
moment the process is killed at. On ``--resume`` the configuration must match the recorded one,
the finished layers are loaded back into the model and the calibration data is run through
them to rebuild the next layer's inputs; on the CPU this reproduces the uninterrupted run bit
for bit. The folder is removed once the run has finished. Only safetensors and JSON are read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from misq.algorithms.quantizer import QuantGrid
from misq.atomic import atomic_write_json, fsync_path
from misq.errors import MisqError
from misq.models import layout
from misq.models.layout import layer_prefix

log = logging.getLogger(__name__)

FORMAT = 1
_GRID_FIELDS = ("scale", "zero", "groups", "bits")
# Fields that change the compressed weights: a resume must match them exactly (None: the whole section).
_DETERMINING = (("model", "model"), ("model", "dtype"), ("data", "seqlen"), ("compress", None))
# Where activations are kept changes no number: a run that ran out of GPU memory may resume with
# --offload-activations.
_FREE = {"compress.offload_activations"}
# How a differing field is named to the user: its command-line flag.
_FLAG_NAMES = {"model.model": "the model", "model.dtype": "--dtype", "data.seqlen": "--seqlen", "compress.dataset": "the dataset"}


def calibration_digest(calib: torch.Tensor) -> str:
    """A hash of the calibration windows: a resumed run must draw exactly the same ones."""
    t = calib.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file written beside ``path``, flushed to disk, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    fsync_path(tmp)  # the rename must not reach the disk before the data does
    tmp.replace(path)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``--sparsity 0.5 -> 0.6`` for every determining field that differs."""
    out = []
    for section, key in _DETERMINING:
        a, b = old.get(section) or {}, new.get(section) or {}
        a, b = (a if isinstance(a, dict) else {}), (b if isinstance(b, dict) else {})  # a damaged state
        keys = [key] if key is not None else sorted(set(a) | set(b))
        for k in keys:
            if a.get(k) != b.get(k) and f"{section}.{k}" not in _FREE:
                name = _FLAG_NAMES.get(f"{section}.{k}", f"--{k.replace('_', '-')}")
                out.append(f"{name} {a.get(k)!r} -> {b.get(k)!r}")
    return out


class ResumeState:
    """The resume folder of one run directory: written after every layer, read by ``--resume``."""

    def __init__(self, run_path: str | os.PathLike, resolved: dict[str, Any]):
        self.dir = Path(run_path) / "resume"
        # Through JSON, so that comparing with a stored state compares like with like.
        self.resolved = json.loads(json.dumps(resolved, default=str))
        self.previous_seconds = 0.0
        self._started = time.perf_counter()
        self._state: dict[str, Any] | None = None
        self._calib: str | None = None
        #: A fingerprint of the model's weight files (:func:`misq.models.safetensors_files.weights_fingerprint`),
        #: recorded by a fresh run; a resume refuses weights that changed at the same path.
        self.weights: str | None = None
        self._writer: ThreadPoolExecutor | None = None  # one thread writing finished layers (layer_done)
        self._pending: Future | None = None

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def layer_path(self, i: int) -> Path:
        """The file of finished layer ``i``: its parameters under their full names, plus its grids."""
        return self.dir / f"layer_{i:03d}.safetensors"

    # -- starting -------------------------------------------------------------------------
    def start_fresh(self) -> None:
        """Discard any earlier run's state in this folder and record this run's configuration."""
        try:
            old = self._read_state() if self.state_path.is_file() else None
        except MisqError:  # unreadable: nothing worth keeping, and it is about to go anyway
            old = None
        if old and old.get("done_layers"):
            log.warning("starting over: discarding %d finished layer(s) of the interrupted run in %s "
                        "(pass --resume to continue it instead)", old["done_layers"], self.dir.parent)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        stale = self.dir.parent / "results.json"
        if stale.exists():
            stale.unlink()  # a results file from an older run in this folder would mislead
        self._write_state(done_layers=0, records=[])

    def check_resumable(self) -> None:
        """Refuse ``--resume`` when nothing was recorded or the configuration differs."""
        run = self.dir.parent
        if not self.state_path.is_file():
            if (run / "results.json").is_file():
                raise MisqError(f"the run in {run} has already finished (its results.json is there): "
                                "drop --resume to run it again")
            raise MisqError(f"nothing to resume in {run}: no interrupted run was recorded there (drop --resume to start one)")
        state = self._read_state()
        diffs = _differences(state.get("config") or {}, self.resolved)
        if diffs:
            raise MisqError(f"cannot resume the run in {run} with a different configuration ({'; '.join(diffs)}): "
                            "rerun with the interrupted run's options, or drop --resume to start over")
        recorded = state.get("weights")
        if recorded is not None and self.weights is not None and recorded != self.weights:
            raise MisqError(f"cannot resume the run in {run}: the model's weight files changed since the interrupted "
                            "run (sizes, dates or headers differ), so its finished layers came from other weights; "
                            "drop --resume to start over")
        self._state = state
        self.previous_seconds = float(state.get("elapsed_s", 0.0))

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError(f"a JSON {type(state).__name__}, not an object")
            if state.get("format") != FORMAT or not isinstance(state.get("done_layers"), int) or state["done_layers"] < 0:
                raise ValueError(f"format {state.get('format')!r}")
            records = state.get("records", [])
            if not isinstance(state.get("config"), dict) or not isinstance(records, list) \
                    or not all(isinstance(r, dict) for r in records):
                raise ValueError("no config or records")
            elapsed = state.get("elapsed_s", 0.0)
            if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not elapsed == elapsed:
                raise ValueError(f"elapsed_s {elapsed!r}")
            if not isinstance(state.get("calibration"), (str, type(None))) or not isinstance(state.get("weights"), (str, type(None))):
                raise ValueError("calibration or weights fingerprint is not a string")
            return state
        except (OSError, ValueError, AttributeError) as err:
            raise MisqError(f"the resume state {self.state_path} is unreadable ({err}): delete {self.dir} "
                            "and drop --resume to start over") from None

    def _write_state(self, done_layers: int, records: list[dict[str, Any]]) -> None:
        state = {"format": FORMAT, "config": self.resolved, "done_layers": done_layers, "records": records,
                 "calibration": self._calib, "weights": self.weights,
                 "elapsed_s": self.previous_seconds + time.perf_counter() - self._started}
        atomic_write_json(self.state_path, state)

    # -- per layer ------------------------------------------------------------------------
    def layer_done(self, i: int, layer_state: dict[str, torch.Tensor], output: Any) -> None:
        """Persist finished layer ``i`` and the run state (the driver's ``on_layer_done``), in a
        background thread.

        layer_state: the compressed layer's tensors under their full names
        (``model.layers.7.mlp.up_proj.weight`` -> [R, C]); output: the run's
        :class:`~misq.compress.driver.CompressionOutput` so far (grids of this layer, all records).

        Writing and syncing a 13B layer (404 MB) took 0.6-2.2 s here, during which the GPU sat idle
        when the driver waited for it; now the next layer computes meanwhile. The layer's file is
        complete on disk before the state counts it, as before, so a crash at any moment leaves a
        resumable folder. The previous layer's write is finished first (its error is raised here),
        so at most one layer waits for the disk; :meth:`wait` finishes the last. ``layer_state``'s
        tensors must not change until then: the driver never touches a finished layer again.
        """
        self.wait()
        prefix = layer_prefix(i)
        tensors = {k: v.detach().cpu().contiguous() for k, v in layer_state.items()}
        for name, grid in output.grids.items():
            if name.startswith(prefix):
                tensors.update({f"{name}.grid.{f}": getattr(grid, f).clone() for f in _GRID_FIELDS})
                if grid.order is not None:  # act-order / width segments: the solve order
                    tensors[f"{name}.grid.order"] = grid.order.clone()  # layers of a batch share one order tensor
        records = copy.deepcopy(output.records)  # the driver appends to its list meanwhile
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="misq-resume")
        self._pending = self._writer.submit(self._persist, i, tensors, records)

    def _persist(self, i: int, tensors: dict[str, torch.Tensor], records: list[dict[str, Any]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _save_tensors(tensors, self.layer_path(i))
        self._write_state(done_layers=i + 1, records=records)

    def wait(self, *, quiet: bool = False) -> None:
        """Finish the background write of the last finished layer. Its error is raised, or with
        ``quiet`` (another error is already on its way out) logged."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as err:
            if not quiet:
                raise
            log.error("the resume file of the last finished layer was not written: %s", err)

    def check_calibration(self, calib: torch.Tensor) -> None:
        """Record the run's calibration windows; on resume they must be the interrupted run's
        (else the dataset file or the tokenizer changed, and the finished layers saw other data)."""
        digest = calibration_digest(calib)
        recorded = self._state.get("calibration") if self._state is not None else None
        if recorded is not None and digest != recorded:
            raise MisqError(f"cannot resume the run in {self.dir.parent}: the calibration windows differ from the "
                            "interrupted run's (the dataset file or the tokenizer changed); drop --resume to start over")
        self._calib = digest

    def restore(self, model: torch.nn.Module, calib: torch.Tensor | None = None, *,
                source: Any = None) -> tuple[int, Any]:
        """Put the finished layers back; returns (first layer to do, prior output).

        The layers' tensors are loaded into ``model`` or, for a streamed model (``source``, a
        :class:`~misq.models.streaming.StreamedModel` whose layers hold no weights), ``source``
        reads them from :meth:`layer_path` from now on. The prior output holds their grids,
        plans and records, for the driver to carry on from. ``calib`` (the run's calibration
        windows) is recorded by a fresh run and, on resume, must be what the interrupted run
        drew: otherwise the data file or tokenizer changed. Reads only: every rank of a
        distributed run restores from rank 0's folder.
        """
        from misq.compress.driver import CompressionOutput

        prior = CompressionOutput()
        if calib is not None:
            self.check_calibration(calib)
        if self._state is None:
            return 0, prior
        done = int(self._state["done_layers"])
        layers = layout.decoder_layers(model)
        if done > len(layers):
            raise MisqError(f"the resume state in {self.dir} has {done} layers but the model has {len(layers)}: "
                            "drop --resume to start over")
        plans = self.load_plans() or {}
        for i in range(done):
            self._restore_layer(i, layers[i] if source is None else None, plans, prior)
            if source is not None:
                source.use_file(i, self.layer_path(i))
        prior.records = list(self._state.get("records", []))
        log.info("resuming after %d finished layer(s)", done)
        return done, prior

    def _restore_layer(self, i: int, layer: torch.nn.Module | None, plans: dict[str, Any], prior: Any) -> None:
        from misq.compress.bitplan import ModulePlan

        path = self.layer_path(i)
        prefix = layer_prefix(i)
        try:
            tensors = load_file(str(path))
            if layer is not None:
                params = {k[len(prefix):]: v for k, v in tensors.items() if ".grid." not in k}
                layer.load_state_dict(params, strict=True)
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:
            raise MisqError(f"the resume data {path} does not fit this model ({str(err).splitlines()[0]}): "
                            f"delete {self.dir} and drop --resume to start over") from None
        # In the driver's order (q, k, v, o, gate, up, down): results list layers in this order.
        for short in layout.LINEAR_NAMES:
            name = prefix + short
            if f"{name}.grid.scale" not in tensors:
                continue
            g = QuantGrid(**{f: tensors[f"{name}.grid.{f}"] for f in _GRID_FIELDS}, order=tensors.get(f"{name}.grid.order"))
            prior.grids[name] = g
            prior.plans[name] = plans.get(name) or ModulePlan(name, g.scale.shape[0], g.groups, g.bits)

    # -- model-scope plans ----------------------------------------------------------------
    def save_plans(self, plans: dict[str, Any]) -> None:
        """Record ``--budget model``'s plans, so that a resume skips the measuring pass."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, p in plans.items():
            tensors[f"{name}.groups"] = p.groups.contiguous()
            tensors[f"{name}.bits"] = p.bits.contiguous()
            tensors[f"{name}.rows"] = torch.tensor([p.rows])
            if getattr(p, "sparsity", None) is not None:  # --sparsity-allocation: this layer's own
                tensors[f"{name}.sparsity"] = torch.tensor([float(p.sparsity)], dtype=torch.float64)
        _save_tensors(tensors, self.dir / "plans.safetensors")

    def load_plans(self) -> dict[str, Any] | None:
        """The plans of the run being resumed, or None (a fresh run, or none were recorded)."""
        from misq.compress.bitplan import ModulePlan

        path = self.dir / "plans.safetensors"
        if self._state is None or not path.is_file():
            return None
        try:
            t = load_file(str(path))
            names = sorted({k.rsplit(".", 1)[0] for k in t})
            return {n: ModulePlan(n, int(t[f"{n}.rows"][0]), t[f"{n}.groups"], t[f"{n}.bits"],
                                  sparsity=float(t[f"{n}.sparsity"][0]) if f"{n}.sparsity" in t else None) for n in names}
        except (OSError, RuntimeError, ValueError, KeyError, IndexError, SafetensorError) as err:
            raise MisqError(f"the resume data {path} is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}): "
                            f"delete {self.dir} and drop --resume to start over") from None

    def finished(self) -> None:
        """The run completed: its resume folder is no longer needed."""
        self.wait()
        if self.dir.exists():
            shutil.rmtree(self.dir)
