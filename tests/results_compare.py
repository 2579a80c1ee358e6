"""Helpers shared by the resume and determinism tests: what two runs must agree on."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def strip_volatile(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without the fields that legitimately differ between two runs of one command:
    timings, peak memory, the creation time and the packed checkpoint's absolute path. Each is popped without
    a default, so a renamed field fails here instead of silently escaping the comparison."""
    r = copy.deepcopy(results)
    r.pop("created")
    r.pop("timing")
    for record in r["layers"]:
        record.pop("solve_s")
    for ev in r.get("eval", {}).values():
        ev.pop("seconds")
    if "saved" in r:
        r["saved"].pop("path")
    if r.get("generations"):
        r["generations"].pop("seconds")  # the generated text itself must be equal
    for key in [k for k in r.get("memory", {}) if k.startswith("peak_")]:
        r["memory"].pop(key)  # the process's peak memory is a measurement of the machine, like a timing
    return r


def assert_same_results(a: Path, b: Path) -> None:
    """Two results.json files are equal apart from :func:`strip_volatile`'s fields."""
    ra, rb = (strip_volatile(json.loads(p.read_text())) for p in (a, b))
    for key in ("layers", "bits", "storage", "sparsity", "config", "model"):
        assert ra.get(key), f"{a} has no {key!r}: nothing to compare"
    for key in sorted(set(ra) | set(rb)):
        assert ra.get(key) == rb.get(key), f"results differ in {key!r}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so -0.0 and 0.0, or two NaNs, are told apart)."""
    return t.contiguous().flatten().view(torch.uint8)


def assert_same_packed(a: Path, b: Path) -> None:
    """Two packed checkpoints hold the same tensors, bit for bit, and the same misq metadata."""
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in b.glob("*.safetensors"))
    for name in files:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert sorted(ta) == sorted(tb), f"{name}: different tensor names"
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, f"{name}: {key} differs"
            assert torch.equal(_bits(ta[key]), _bits(tb[key])), f"{name}: {key} differs"
    ma, mb = (json.loads((p / "config.json").read_text())["misq"] for p in (a, b))
    assert ma == mb
