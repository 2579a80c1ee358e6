"""The solver's Triton kernels (block sweep, coordinate-descent block) on CPU, through Triton's
interpreter (tests/solver_kernels_interpreted.py): checked in CI, where the GPU tests of
tests/test_fused.py and tests/test_coordinate_descent.py are skipped. The script runs once in a
child process (the interpreter must be chosen before import); each case is one test here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from solver_kernels_interpreted import descent_ids, sweep_ids  # pure: importing it sets up no interpreter

triton = pytest.importorskip("triton")
if not triton.__version__.startswith("3.6."):  # as tests/test_kernels_interpreted.py
    pytest.skip(f"interpreted kernel tests need Triton 3.6.x, not {triton.__version__}", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "solver_kernels_interpreted.py"


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("solver_kernels_interpreted") / "results.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 or not out.is_file():
        pytest.fail(f"{SCRIPT.name} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _case(interpreted, case_id: str) -> dict[str, Any]:
    assert interpreted["meta"]["interpreted"], interpreted["meta"]
    assert interpreted["meta"]["kernel_type"] == "InterpretedFunction", interpreted["meta"]
    result = interpreted["cases"][case_id]
    assert result["error"] is None, result["error"]
    return result


@pytest.mark.parametrize("case_id", sweep_ids())
def test_fused_sweep_equals_the_eager_loop(interpreted, case_id):
    """Q, Err, the swept block and the (N:M) keep mask: bit for bit."""
    r = _case(interpreted, case_id)
    assert (r["q_differ"], r["err_differ"], r["w_differ"], r["keep_differ"]) == (0, 0, 0, 0), r


@pytest.mark.parametrize("case_id", descent_ids())
def test_fused_descent_takes_the_eager_loops_steps(interpreted, case_id):
    """Same weights (quantized: bit for bit; unquantized: within fp32 rounding of the eager loop's
    fused adds), the same error change, lowered, and pruned weights left at 0."""
    r = _case(interpreted, case_id)
    assert r["change_fused"] < 0, r
    assert r["change_fused"] == pytest.approx(r["change_eager"], rel=1e-5), r
    assert r["pruned_nonzero"] == 0, r
    if case_id.endswith("-fp"):
        assert r["w_max_abs_diff"] < 1e-5, r
    else:
        assert r["w_differ_share"] == 0.0, r
