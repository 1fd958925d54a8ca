"""Test configuration.

Without CUDA the Triton kernels run under Triton's interpreter on CPU tensors: TRITON_INTERPRET must
be set before triton is first imported, so it is set here. With CUDA the same tests run natively at
full size.

Checked on torch 2.13 + triton 3.9 and on torch 2.11 + triton 3.6. Triton 3.6's interpreter fails on
loops with a runtime bound when NumPy >= 2.3 is installed ("only 0-dimensional arrays can be
converted to Python scalars"): use numpy < 2.3 with it.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if CUDA else "cpu")


def pytest_report_header(config):
    kind = torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter)"
    return f"fastloss tests on {kind}; torch {torch.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
