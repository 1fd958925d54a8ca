"""Test configuration.

Without CUDA the Triton kernels run under Triton's interpreter on CPU tensors: TRITON_INTERPRET must
be set before triton is first imported, so it is set here. With CUDA the same tests run natively at
full size.

Checked on torch 2.13 + triton 3.9 and on torch 2.11 + triton 3.6; on a CPU also with triton 3.2 to
3.8. The interpreters of triton 3.6 and older fail on loops with a runtime bound when NumPy >= 2.3 is
installed ("only 0-dimensional arrays can be converted to Python scalars"): the run stops at once
with that advice instead (``pytest_configure``).
"""

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if CUDA else "cpu")


def _release(package: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in re.findall(r"\d+", metadata.version(package))[:2])
    except metadata.PackageNotFoundError:
        return ()


def pytest_configure(config):
    triton, numpy = _release("triton"), _release("numpy")
    if not CUDA and triton and triton < (3, 7) and numpy >= (2, 3):
        raise pytest.UsageError(
            f"Triton {metadata.version('triton')}'s interpreter, which runs the kernel tests on a machine without a "
            f"GPU, fails with NumPy >= 2.3 (NumPy {metadata.version('numpy')} is installed): "
            "pip install 'numpy<2.3', or a Triton of 3.7 or later")


def pytest_report_header(config):
    kind = torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter)"
    return f"fastloss tests on {kind}; torch {torch.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_process():
    """Runs ``python ARGS`` in the repository in a new process without TRITON_INTERPRET, so that the
    kernels compile for a GPU (sm_90) instead of being interpreted, and returns its stdout, failing
    the test if it fails. For machines without a GPU: with one, the tests compile and launch the
    kernels natively."""
    pytest.importorskip("triton")
    if CUDA:
        pytest.skip("a check for machines without a GPU: with one, the kernels compile and launch natively")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, *args], cwd=Path(__file__).resolve().parents[1], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout

    return run
