"""Resuming an interrupted compression run.

After each decoder layer the run directory gets, atomically and in this order:

    RUN_DIR/resume/layer_007.safetensors   the compressed layer's tensors + its grids
    RUN_DIR/resume/state.json              layers done, per-layer records, elapsed time

``state.json`` is written last, so it never names a layer whose file is incomplete. On
``--resume`` the finished layers are loaded back into the model and the calibration data is
run through them to rebuild the next layer's inputs; on the CPU this reproduces the
uninterrupted run bit for bit. The folder is removed once the run has finished.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from misq import modeling
from misq.algorithms.quantizer import QuantGrid
from misq.atomic import atomic_write_json
from misq.errors import MisqError

log = logging.getLogger(__name__)

# Fields that change the compressed weights: a resume must match them exactly.
_DETERMINING = (("model", "model"), ("model", "dtype"), ("data", "seqlen"), ("compress", None))


class ResumeState:
    def __init__(self, run_path: Path, resolved: dict[str, Any]):
        self.dir = Path(run_path) / "resume"
        self.resolved = json.loads(json.dumps(resolved, default=str))
        self.previous_seconds = 0.0
        self._started = time.perf_counter()
        self._state: dict[str, Any] | None = None

    # -- starting -------------------------------------------------------------------------
    def start_fresh(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        stale = self.dir.parent / "results.json"
        if stale.exists():
            stale.unlink()  # a results file from an older run in this folder would mislead

    def check_resumable(self) -> None:
        path = self.dir / "state.json"
        if not path.is_file():
            raise MisqError(f"nothing to resume in {self.dir.parent}: no interrupted run was recorded there (drop --resume to start one)")
        state = json.loads(path.read_text())
        for section, key in _DETERMINING:
            old = state["config"].get(section, {})
            new = self.resolved.get(section, {})
            if key is not None:
                old, new = old.get(key), new.get(key)
            if old != new:
                what = f"{section}.{key}" if key else section
                raise MisqError(f"cannot resume: {what} differs from the interrupted run's ({old} vs {new}); "
                                "rerun with the same options, or drop --resume to start over")
        self._state = state
        self.previous_seconds = float(state.get("elapsed_s", 0.0))

    # -- per layer ------------------------------------------------------------------------
    def layer_done(self, i: int, output: Any) -> None:
        """Persist layer ``i`` (already compressed in ``output``'s model) and the run state."""
        self.dir.mkdir(parents=True, exist_ok=True)
        prefix = f"model.layers.{i}."
        tensors = {k: v.detach().cpu().contiguous() for k, v in output.layer_state(i).items()}
        for name, grid in output.grids.items():
            if name.startswith(prefix):
                tensors.update({f"{name}.grid.{f}": getattr(grid, f).contiguous() for f in ("scale", "zero", "groups", "bits")})
        tmp = self.dir / f".layer_{i:03d}.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.dir / f"layer_{i:03d}.safetensors")
        state = {"config": self.resolved, "done_layers": i + 1, "records": output.records,
                 "elapsed_s": self.previous_seconds + time.perf_counter() - self._started}
        atomic_write_json(self.dir / "state.json", state)

    def restore(self, model: torch.nn.Module) -> tuple[int, Any]:
        """Load the finished layers into ``model``; returns (first layer to do, prior output)."""
        from misq.bitplan import ModulePlan
        from misq.compress import CompressionOutput

        prior = CompressionOutput()
        if self._state is None:
            return 0, prior
        done = int(self._state["done_layers"])
        layers = modeling.decoder_layers(model)
        plans = self.load_plans() or {}
        for i in range(done):
            tensors = load_file(str(self.dir / f"layer_{i:03d}.safetensors"))
            params = {k[len(f"model.layers.{i}."):]: v for k, v in tensors.items() if ".grid." not in k}
            missing, unexpected = layers[i].load_state_dict(params, strict=False)
            if unexpected:
                raise MisqError(f"resume data for layer {i} does not fit this model: delete {self.dir} and start over")
            for name in sorted({k.split(".grid.")[0] for k in tensors if ".grid." in k}):
                g = QuantGrid(**{f: tensors[f"{name}.grid.{f}"] for f in ("scale", "zero", "groups", "bits")})
                prior.grids[name] = g
                prior.plans[name] = plans.get(name) or ModulePlan(name, g.scale.shape[0], g.groups, g.bits)
        prior.records = list(self._state["records"])
        log.info("resuming after %d finished layer(s)", done)
        return done, prior

    # -- model-scope plans ----------------------------------------------------------------
    def save_plans(self, plans: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, p in plans.items():
            tensors[f"{name}.groups"] = p.groups.contiguous()
            tensors[f"{name}.bits"] = p.bits.contiguous()
            tensors[f"{name}.rows"] = torch.tensor([p.rows])
        tmp = self.dir / ".plans.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.dir / "plans.safetensors")

    def load_plans(self) -> dict[str, Any] | None:
        from misq.bitplan import ModulePlan

        path = self.dir / "plans.safetensors"
        if self._state is None or not path.is_file():
            return None
        t = load_file(str(path))
        names = sorted({k.rsplit(".", 1)[0] for k in t})
        return {n: ModulePlan(n, int(t[f"{n}.rows"][0]), t[f"{n}.groups"], t[f"{n}.bits"]) for n in names}

    def finished(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
