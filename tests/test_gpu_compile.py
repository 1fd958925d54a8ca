"""Checks of the compiled kernels made on machines without a GPU, each in a fresh process without
TRITON_INTERPRET (under the interpreter ``@triton.jit`` gives interpreted functions):

- every kernel compiles for an H100 (sm_90; gpu_compile_check.py);
- every launch through ``common.launch`` makes the driver call that Triton's own launch path makes
  (launch_check.py).
"""

import pytest


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
