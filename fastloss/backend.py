"""Backend selection: which implementation a loss call runs.

``FASTLOSS_BACKEND`` (read at every call) or the :func:`use_backend` context manager chooses:

* ``auto`` (default): CUDA tensors run the Triton kernels, everything else the reference. (On a
  ROCm build of torch, whose GPU tensors are "cuda" too, the reference: the kernels use NVIDIA PTX.
  Under a torch.func transform or forward-mode AD, the reference too.)
* ``triton``: always the Triton kernels. On CPU tensors this needs Triton's interpreter
  (``TRITON_INTERPRET=1``); that is how the kernels are tested on machines without a GPU.
  Meta tensors, and tensor subclasses that implement their ops in Python (DTensor; see
  ``dispatches_in_python``), have no memory for a kernel to read: they take the reference under
  either backend.
* ``reference``: always the plain-PyTorch reference implementation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.autograd import forward_ad

BACKENDS = ("auto", "triton", "reference")

# The use_backend() stack. A plain list rather than a ContextVar, so that torch.compile can trace
# through backend selection; it is process-wide, not per thread.
_overrides: list[str] = []
# Whether triton is installed: looked up once here (a fraction of a millisecond; triton is not
# imported). Not on the first call: a first call traced by torch.compile would fill a cache, and its
# guard on the empty cache would then fail, compiling the caller's whole graph a second time.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fastloss backend must be one of {BACKENDS}, got {name!r}")
    return name


def current() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``FASTLOSS_BACKEND``, else ``auto``."""
    if _overrides:
        return _overrides[-1]
    return _check(os.environ.get("FASTLOSS_BACKEND", "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed loss calls on backend ``name`` (``auto``, ``triton`` or ``reference``)."""
    _overrides.append(_check(name))
    try:
        yield
    finally:
        _overrides.pop()


def triton_available() -> bool:
    return _TRITON_FOUND


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter runs the kernels, as Triton decided from TRITON_INTERPRET when it
    defined them (1, and since Triton 3.4 also true, on or yes). Asked of the kernels themselves, so
    that this never disagrees with Triton; imports them, which the call that asks is about to do."""
    from .kernels.common import interpreting

    return interpreting()


def transforming() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) runs this call: the kernels'
    autograd.Functions cannot be transformed, and no check may branch on a tensor's values. (torch
    itself asks the same question before every autograd.Function; torch.compile traces it, so a
    compiled ``vmap(grad(loss))`` takes the reference too.)"""
    return torch._C._are_functorch_transforms_active()


def forward_mode() -> bool:
    """Whether forward-mode AD is on (``torch.autograd.forward_ad.dual_level``): the kernels'
    autograd.Functions have no forward-mode derivative (jvp)."""
    return forward_ad._current_level >= 0


def fake(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a fake tensor (``FakeTensorMode``, which memory estimators and shape
    propagation use outside torch.compile too): a shape and a dtype on a device, but no values to
    check or for a kernel to read. A plain ``torch.Tensor`` is never one (a fake tensor is a
    subclass; a plain one wraps it only under torch.func or while torch.compile traces, where no
    check runs anyway), so that is asked first: ~0.06 us, where ``is_fake`` takes ~3 us for it."""
    return type(tensor) is not torch.Tensor and is_fake(tensor)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def dispatches_in_python(*tensors: torch.Tensor | None) -> bool:
    """Whether any of ``tensors`` is a subclass whose ops run through its own ``__torch_dispatch__``
    (DTensor, or any subclass that implements its ops in Python), fake tensors aside (see ``fake``).
    A kernel would read such a tensor's memory (a DTensor has none of its own: "invalid python
    storage") instead of asking it; the reference, made of torch ops, gives what torch gives, the
    DTensor result of a DTensor or torch's error for one mixed with plain tensors. Plain tensors and
    parameters pass on their type alone (~0.1 us a tensor). While torch.compile traces, where the
    dispatch keys cannot be asked, the traceable subclasses (``__tensor_flatten__``: DTensor among
    them) are the ones that count, the only ones it can trace."""
    for t in tensors:
        cls = type(t)
        if cls in _PLAIN or not isinstance(t, torch.Tensor):  # None too
            continue
        # a traceable wrapper subclass, asked of the class: Dynamo answers no of a traced tensor
        if hasattr(cls, "__tensor_flatten__"):
            return True
        if (not torch.compiler.is_compiling() and torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python)
                and not is_fake(t)):
            return True
    return False


def use_triton(tensor: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a call on ``tensor`` (the input, whose device decides) and ``others`` (its target,
    weight...) runs the Triton kernels; raises if ``triton`` is forced but cannot run."""
    name = current()
    if name == "reference":
        return False
    if name == "auto":
        return (tensor.is_cuda and torch.version.hip is None and not transforming() and not forward_mode()
                and triton_available() and not dispatches_in_python(tensor, *others))
    if not triton_available():
        raise RuntimeError("FASTLOSS_BACKEND=triton, but the triton package is not installed")
    if transforming():
        raise RuntimeError("FASTLOSS_BACKEND=triton under a torch.func transform (vmap, grad, ...): the kernels "
                           "cannot be transformed; use the 'auto' or 'reference' backend, which run the reference")
    if forward_mode():
        raise RuntimeError("FASTLOSS_BACKEND=triton under forward-mode AD (torch.autograd.forward_ad): the kernels "
                           "have no forward-mode derivative; use the 'auto' or 'reference' backend, which run the "
                           "reference")
    if tensor.is_cuda and torch.version.hip is not None:
        raise RuntimeError("FASTLOSS_BACKEND=triton on a ROCm GPU: fastloss's kernels are written for NVIDIA GPUs "
                           "(they use PTX); use the 'auto' or 'reference' backend")
    if tensor.is_meta or dispatches_in_python(tensor, *others):
        return False  # no data for a kernel to read: the reference gives torch's meta result, or the subclass's
    if not tensor.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"FASTLOSS_BACKEND=triton on a {tensor.device.type} tensor needs Triton's interpreter: "
            "set TRITON_INTERPRET=1, move the tensors to CUDA, or use the 'auto' or 'reference' backend"
        )
    return True


def strict() -> bool:
    """``FASTLOSS_STRICT=1`` adds host-synced input checks (out-of-range targets raise) on CUDA."""
    return os.environ.get("FASTLOSS_STRICT", "0") not in ("", "0")
