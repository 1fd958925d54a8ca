"""Test configuration.

Without CUDA the Triton kernels run under Triton's interpreter on CPU tensors: TRITON_INTERPRET must
be set before triton is first imported, so it is set here. With CUDA the same tests run natively at
full size.
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
