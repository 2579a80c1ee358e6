"""The solver's Triton kernels (block sweep, coordinate-descent block) on CPU, through Triton's
interpreter (tests/solver_kernels_interpreted.py): checked in CI, where the GPU tests of
tests/test_fused.py and tests/test_coordinate_descent.py are skipped. The script runs once in a
child process (the interpreter must be chosen before import); each case is one test here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kernels_interpreted import TRITON_SERIES, run_script
from solver_kernels_interpreted import descent_ids, sweep_ids  # pure: importing it sets up no interpreter

triton = pytest.importorskip("triton")
if not triton.__version__.startswith(TRITON_SERIES):
    pytest.skip(f"interpreted kernel tests need Triton {TRITON_SERIES}x, not {triton.__version__}", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parent / "solver_kernels_interpreted.py"


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, Any]:
    """The script's OUT.json: {"meta": ..., "cases": {case id: result}}."""
    try:
        return run_script(SCRIPT, tmp_path_factory.mktemp("solver_kernels_interpreted") / "results.json")
    except RuntimeError as err:
        pytest.fail(str(err))


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
