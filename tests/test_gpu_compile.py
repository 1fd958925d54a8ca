"""Checks of the compiled kernels made on machines without a GPU, each in a fresh process without
TRITON_INTERPRET (under the interpreter ``@triton.jit`` gives interpreted functions):

- every kernel compiles for an H100 (sm_90; gpu_compile_check.py);
- every launch through ``common.launch`` makes the driver call that Triton's own launch path makes
  (launch_check.py);

and, read from the source, that the kernels keep to what the oldest Triton that pyproject allows
can compile.
"""

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def test_kernels_compile_for_sm90(fresh_process):
    from fastloss.kernels import common

    if common.TRITON_RELEASE < (3, 4):
        pytest.skip("gpu_compile_check.py gives Triton's compiler signatures in the form of Triton 3.4 and later")
    assert "compiled" in fresh_process("tests/gpu_compile_check.py")


def test_direct_launches_make_tritons_driver_calls(fresh_process):
    from fastloss.kernels import common

    if not common._DIRECT:
        pytest.skip(f"no direct launches with this Triton release: every launch takes Triton's own path "
                    f"(direct launches are for releases {common._DIRECT_RELEASES})")
    assert "the same through Triton and through launch" in fresh_process("tests/launch_check.py")


def test_kernels_keep_to_the_oldest_tritons_grammar():
    """Triton before 3.4 refuses a chained ``and`` / ``or`` (``A and B and C``) inside a kernel
    ("chained boolean operators are not supported"): one such constexpr in the cross-entropy kernel
    failed every cross-entropy launch there, while pyproject allows Triton 3.2 and the tests, with a
    newer Triton, passed. Every @triton.jit function, read from its source."""
    chained = []
    for path in sorted(KERNELS.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list):
                chained += [f"{path.name}:{node.lineno} in {fn.name}: {ast.unparse(node)}" for node in ast.walk(fn)
                            if isinstance(node, ast.BoolOp) and len(node.values) > 2]
    assert not chained, chained
