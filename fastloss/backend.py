"""Backend selection: which implementation a loss call runs.

``FASTLOSS_BACKEND`` (read at every call) or the :func:`use_backend` context manager chooses:

* ``auto`` (default): CUDA tensors run the Triton kernels, everything else the reference.
* ``triton``: always the Triton kernels. On CPU tensors this needs Triton's interpreter
  (``TRITON_INTERPRET=1``); that is how the kernels are tested on machines without a GPU.
* ``reference``: always the plain-PyTorch reference implementation.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastloss_backend", default=None)


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fastloss backend must be one of {BACKENDS}, got {name!r}")
    return name


def current() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``FASTLOSS_BACKEND``, else ``auto``."""
    name = _override.get()
    if name is None:
        name = os.environ.get("FASTLOSS_BACKEND", "auto").strip().lower() or "auto"
    return _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed loss calls on backend ``name`` (``auto``, ``triton`` or ``reference``)."""
    token = _override.set(_check(name))
    try:
        yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a call on ``tensor`` runs the Triton kernels; raises if ``triton`` is forced but cannot run."""
    name = current()
    if name == "reference":
        return False
    if name == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("FASTLOSS_BACKEND=triton, but the triton package is not installed")
    if not tensor.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"FASTLOSS_BACKEND=triton on a {tensor.device.type} tensor needs Triton's interpreter: "
            "set TRITON_INTERPRET=1, move the tensors to CUDA, or use the 'auto' or 'reference' backend"
        )
    return True


def strict() -> bool:
    """``FASTLOSS_STRICT=1`` adds host-synced input checks (out-of-range targets raise) on CUDA."""
    return os.environ.get("FASTLOSS_STRICT", "0") not in ("", "0")
