"""The packed runtime's Triton kernels on CPU, through Triton's interpreter (tests/kernels_interpreted.py):
their arithmetic checked in CI, where tests/test_runtime_gpu.py is skipped for want of a GPU.

The interpreter has to be selected before triton and misq.runtime are imported, which this
pytest process may already have done, so the script runs once in a child process (itself using
worker processes) and writes every case's result; each case is then one test here, so a wrong
kernel path shows by name, its error against the fp16 tolerance in the message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kernels_interpreted import cases  # pure: importing it sets up no interpreter

triton = pytest.importorskip("triton")
# The interpreter these tests were written against: Triton 3.9's refuses masks that 3.6 and the
# compiled kernels take ("mask has unsupported dtype"); .ci/run installs 3.6.
if not triton.__version__.startswith("3.6."):
    pytest.skip(f"interpreted kernel tests need Triton 3.6.x, not {triton.__version__}", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "kernels_interpreted.py"
TIMEOUT_S = 300
CASE_IDS = [case.id for case in cases()]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, Any]:
    """The script's OUT.json: {"meta": ..., "cases": {case id: result}}."""
    out = tmp_path_factory.mktemp("kernels_interpreted") / "results.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    if proc.returncode != 0 or not out.is_file():
        pytest.fail(f"{SCRIPT.name} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def test_kernels_ran_in_the_interpreter(interpreted):
    """The child really ran Triton kernels, interpreted (not a CPU fallback that never launches one)."""
    meta = interpreted["meta"]
    assert meta["have_triton"], meta
    assert meta["interpreted"], meta  # TRITON_INTERPRET=1 in the workers, and triton_common saw it
    assert meta["kernel_type"] == "InterpretedFunction", meta


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel_matches_dequantize_then_matmul(interpreted, case_id):
    """One kernel path on one layer: within the fp16 tolerance of dequantize-then-matmul (gather:
    equal to index_select), on every call."""
    result = interpreted["cases"].get(case_id)
    assert result is not None, f"{case_id}: not in the script's results"
    if result["skipped"]:
        pytest.skip(result["skipped"])
    assert result["error"] is None, f"{case_id} raised: {result['error']}"
    assert result["ratio"] <= 1.0, (f"{case_id}: max |y - ref| is {result['ratio']:.3g} times the fp16 tolerance "
                                    "(inf for a gather: differs from index_select, or non-finite output)")
