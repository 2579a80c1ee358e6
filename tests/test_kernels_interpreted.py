"""The packed runtime's Triton kernels on CPU, through Triton's interpreter (tests/kernels_interpreted.py):
their arithmetic checked in CI, where tests/test_runtime_gpu.py is skipped for want of a GPU.

The interpreter has to be selected before triton and misq.runtime are imported, which this
pytest process may already have done, so the script runs once in a child process (itself using
worker processes) and writes every case's result; each case is then one test here, so a wrong
kernel path shows by name, its error against the fp16 tolerance in the message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kernels_interpreted import TRITON_SERIES, cases, run_script  # pure: importing it sets up no interpreter

triton = pytest.importorskip("triton")
if not triton.__version__.startswith(TRITON_SERIES):
    pytest.skip(f"interpreted kernel tests need Triton {TRITON_SERIES}x, not {triton.__version__}", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parent / "kernels_interpreted.py"
CASE_IDS = [case.id for case in cases()]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, Any]:
    """The script's OUT.json: {"meta": ..., "cases": {case id: result}}."""
    try:
        return run_script(SCRIPT, tmp_path_factory.mktemp("kernels_interpreted") / "results.json")
    except RuntimeError as err:
        pytest.fail(str(err))


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
