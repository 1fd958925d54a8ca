"""Checks of the compiled kernels made on machines without a GPU, each in a subprocess with
TRITON_INTERPRET unset (under the interpreter ``@triton.jit`` gives interpreted functions):

- every kernel compiles for an H100 (sm_90; gpu_compile_check.py);
- every launch through ``common.launch`` makes the driver call that Triton's own launch path makes
  (launch_check.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / script)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests compile natively")
def test_kernels_compile_for_sm90():
    assert "compiled" in _run("gpu_compile_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every kernel test launches through launch()")
def test_direct_launches_make_tritons_driver_calls():
    assert "the same through Triton and through launch" in _run("launch_check.py")
