"""The public loss functions: check arguments → dispatch to a backend → reduce.

Every function is a drop-in replacement for the torch function it names: same signature (legacy
``size_average``/``reduce`` included), defaults, output dtype and shape, and exception types. The
keyword-only arguments after ``*`` are fastloss extras.

Argument errors are raised here, before any kernel launch, so both backends fail the same way.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
import warnings

import torch
from torch import Tensor
from torch.nn import _reduction as _legacy
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import backend, reference

_REDUCTIONS = ("none", "mean", "sum")
# Cross-entropy inputs whose classes are strided in memory ((N, C, H, W), say) run the kernel that
# steps through the classes (kernels/cross_entropy.py: the columns kernel) up to this many classes;
# more are copied into rows (its sweep 2 would re-read them from memory rather than from cache, and
# few positions would leave the GPU idle).
_COLUMNS_MAX_CLASSES = 1024
# Rows of few classes, contiguous in memory (a channels_last map's, a flattened (N H W, C)), run that
# kernel too while C x pitch x element size (pitch: the distance between neighbouring positions, in
# elements, at least C) is at most this. The rows kernel spends a program of ~255 instructions on
# each row, ~64/C cycles of an SM's issue per element; the columns kernel's lanes read a class of 32
# positions a pitch apart, ~3 pitch x size / 128 cycles per element in cache lines (two sweeps and
# the gradient's store), so it costs less up to a product of ~2700 (bench/NOTES.md, section 27).
_COLUMNS_MAX_ROW_COST = 1600
_NARROW_MAX_CLASSES = math.isqrt(_COLUMNS_MAX_ROW_COST // 2)  # at most this many classes, in 16 bits
_CPU = torch.device("cpu")
# What the kernels read and write; float64 (and anything else) runs the reference everywhere.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Huber's kernel computes the quadratic side as 0.5 d^2 / delta, times delta: past this delta the
# middle term of a small difference falls into fp32's subnormals (1e-5 lost 4% at delta 1e30, 1e-20
# a gradient of 0) where torch's 0.5 d^2 and d stay exact, so a larger finite delta takes the
# reference path. Up to it the loss of a difference is exact while 0.5 d^2 >= 2^-106 (~1.2e-32).
_HUBER_KERNEL_MAX_DELTA = 2.0 ** 20
# A tensor of another layout than strided (sparse, mkldnn, jagged) raises what torch's loss raises for
# it (torch 2.13 on CPU; see ``_check_devices``): NotImplementedError for the layouts that the op meeting
# it has no kernel for (these, per loss, for its input, target and weight), else RuntimeError, from one
# of torch's checks. Where torch computes the loss, the loss takes the tensor densified instead.
_COO, _COO_CSR = (torch.sparse_coo,), (torch.sparse_coo, torch.sparse_csr)
_ALL_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc,
                torch._mkldnn, torch.jagged)
# log_softmax, for a COO, CSR or CSC input; nll_loss, for a COO target of (C,) or (N, C) logits, a COO
# weight, and an mkldnn one with class indices (torch computes with a COO target of probabilities)
_CE_NO_KERNEL = (_COO_CSR + (torch.sparse_csc,), _COO, (torch.sparse_coo, torch._mkldnn))
_CE_SPATIAL_NO_KERNEL = (_CE_NO_KERNEL[0], (), _CE_NO_KERNEL[2])
_CE_PROBABILITIES_NO_KERNEL = (_CE_NO_KERNEL[0], (), _COO)
_SIGMOID_FOCAL_NO_KERNEL = ((torch.sparse_coo, torch._mkldnn, torch.jagged),)  # the inputs' sigmoid (mkldnn: BCE)
# huber_loss, for any input and target; mean, for a COO or CSR weight (its other reductions compute with one)
_HUBER_NO_KERNEL = (_ALL_LAYOUTS, _ALL_LAYOUTS, _COO_CSR)
_SMOOTH_L1_NO_KERNEL = ((torch.sparse_coo, torch.jagged),) * 2  # with beta = 0, l1_loss's: none (see there)


# --------------------------------------------------------------------------------------------------
# argument checks (shared by all losses)
# --------------------------------------------------------------------------------------------------


def _reduction(reduction: str, size_average=None, reduce=None, deprecated_mean: bool = True) -> str:
    """The reduction as torch reads it: the legacy ``size_average``/``reduce`` win when given, and
    ``"elementwise_mean"`` is ``"mean"``, with torch's deprecation warning (``deprecated_mean``:
    torchvision's sigmoid focal loss refuses it)."""
    if size_average is not None or reduce is not None:
        if torch.compiler.is_compiling():  # torch's helper does not trace: its rule, without its warning
            size_average, reduce = size_average is None or size_average, reduce is None or reduce
            reduction = "mean" if size_average and reduce else "sum" if reduce else "none"
        else:
            reduction = _legacy.legacy_get_string(size_average, reduce)
    if deprecated_mean and reduction == "elementwise_mean":
        if not torch.compiler.is_compiling():  # (a warning does not trace)
            warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
                          stacklevel=3)
        reduction = "mean"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean' or 'sum', got {reduction!r}")
    return reduction


def _check_tensor(name: str, t, floating: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        # torch raises NotImplementedError (a RuntimeError) from its kernels for integer inputs
        raise NotImplementedError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _autocast(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """A loss's dtype as ``torch.autocast`` makes it: fp32 for bf16/fp16 while autocast is on for
    the device, where torch computes its losses in fp32 (the kernels still read low-precision inputs
    as they are). A device type with no autocast (meta) keeps the dtype, as torch's losses do there."""
    if dtype is torch.float16 or dtype is torch.bfloat16:
        try:  # free where nothing raises: no cost on the CPU and CUDA path
            if torch.is_autocast_enabled(device_type):
                return torch.float32
        except RuntimeError:  # "unknown device type for autocast" (meta)
            pass
    return dtype


def _loss_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The result's dtype, as torch's: the floating-point arguments' dtypes promoted together, and
    fp32 under autocast (see ``_autocast``)."""
    dtype = None
    for t in tensors:
        if t is not None and t.is_floating_point() and t.dtype != dtype:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return _autocast(dtype, tensors[0].device.type)


def _upcast(*tensors: Tensor | None) -> list[Tensor | None]:
    """What torch.autocast does to a loss's floating-point arguments, for the reference path."""
    return [t.float() if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in tensors]


def _check_devices(fn: str, *named: tuple[str, Tensor | None], no_kernel: tuple = ()) -> None:
    """All given tensors strided (dense) and on the first one's device (``None`` entries skipped; the
    first is given). One of another layout raises as torch's loss raises for it: NotImplementedError
    where its layout is in its entry of ``no_kernel`` (a tuple of layouts per tensor, in order), else
    RuntimeError."""
    (first_name, first), device = named[0], named[0][1].device
    for i, (name, t) in enumerate(named):
        if t is None:
            continue
        if t.layout is not torch.strided:
            exc = NotImplementedError if i < len(no_kernel) and t.layout in no_kernel[i] else RuntimeError
            raise exc(f"{fn}: expected strided (dense) tensors, but {name} has layout {t.layout}")
        if i and t.device != device:
            raise RuntimeError(
                f"{fn}: expected all tensors on one device, but {first_name} is on {first.device} "
                f"and {name} is on {t.device}"
            )


def _float(fn: str, name: str, value) -> float:
    """A float argument as torch's argument parser takes one, else TypeError, as torch raises.

    Taken: a Python float or int (a bool too, and their subclasses), a NumPy number (``np.float64(0.1)``,
    ``np.int64(1)``, ``np.bool_(True)``; not an array, even a 0-d one) and a 0-d tensor that does not
    require grad. A tensor with one element in one or more dimensions (``torch.tensor([0.5])``) is
    refused, as one that requires grad is. torch reads a 0-d tensor with ``.item()``, so a meta
    tensor raises RuntimeError there, and so does a complex one with an imaginary part.
    """
    if type(value) is float:  # the usual case, first: a step's host time counts
        return value
    if isinstance(value, (int, float)):  # bool; numpy.float64 subclasses float
        return float(value)  # an int too large for a float: OverflowError, as in torch
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.requires_grad:
            item = value.item()  # a meta tensor: RuntimeError, as in torch
            if isinstance(item, complex):
                if item.imag:
                    raise RuntimeError(f"{fn}: {name} = {item} cannot be converted to a float without "
                                       "overflow (it has an imaginary part)")
                item = item.real
            return float(item)
    elif isinstance(value, (torch.SymFloat, torch.SymInt)) or _numpy_number(value):
        return float(value)  # a NumPy complex: its real part, with NumPy's ComplexWarning, as in torch
    raise TypeError(f"{fn}: {name} must be a float, not {type(value).__name__}")


def _numpy_number(value) -> bool:
    """Whether ``value`` is a NumPy scalar that torch's parser takes for a number (an integer, bool,
    float or complex one). NumPy is imported already if ``value`` is one of its scalars."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, (np.integer, np.bool_, np.floating, np.complexfloating))


def _int(fn: str, name: str, value) -> int:
    """An int argument as torch's parser takes one (not a float, even an integral one), else TypeError."""
    if type(value) is not int:  # the usual case, a Python int, skips this
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{fn}: {name} must be an int, not {type(value).__name__}") from None
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{fn}: {name} = {value} does not fit in int64")
    return value


def _check_range(fn: str, name: str, value, low: float, high: float | None = None,
                 low_inclusive: bool = True, exc: type = ValueError) -> float:
    """``value`` as a float (see ``_float``), checked to lie in the range; raises ``exc`` if not."""
    value = _float(fn, name, value)
    ok = value >= low if low_inclusive else value > low
    if high is not None:
        ok = ok and value <= high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise exc(f"{fn}: {name} must be {bound}, got {value}")
    return value


def _check_same_shape_or_broadcast(input: Tensor, target: Tensor) -> bool:
    """Torch warns (and broadcasts) when the shapes differ; returns whether they are equal. The
    warning is torch's word for word, so that a filter written for torch's (``warnings.filterwarnings(
    "ignore", message="Using a target size")``, which matches from the start) takes it too."""
    if target.shape == input.shape:
        return True
    if not torch.compiler.is_compiling():  # (a warning does not trace)
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=4,  # the caller of huber_loss / smooth_l1_loss
        )
    torch.broadcast_shapes(input.shape, target.shape)  # raises RuntimeError as torch does
    return False


# --------------------------------------------------------------------------------------------------
# softmax losses: cross-entropy and focal
# --------------------------------------------------------------------------------------------------


def _check_softmax_args(fn: str, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                        label_smoothing, class_targets_only: bool = False) -> tuple[Tensor, bool, float]:
    """Checks arguments in torch's cross_entropy's order; returns the target (dense), whether it holds
    class indices, and ``label_smoothing`` as a float."""
    _check_tensor("input", input, floating=False)
    _check_tensor("target", target, floating=False)
    if weight is not None:  # torch's argument parser: before any other check
        _check_tensor("weight", weight, floating=False)
    dim = input.dim()
    class_targets = not target.is_floating_point()
    # torch takes a target of the input's shape for probabilities, and checks these first; it checks
    # label_smoothing before a class-index target's shapes, and after a probability target's weight
    probabilities = target.shape == input.shape and not class_targets_only
    if not probabilities:
        label_smoothing = _check_range(fn, "label_smoothing", label_smoothing, 0.0, 1.0, exc=RuntimeError)
    else:
        if class_targets:
            raise RuntimeError(f"{fn}: a target of the input's shape holds class probabilities, which must be "
                               f"floating point, got dtype {target.dtype}")
        if ignore_index >= 0:
            raise RuntimeError(f"{fn}: ignore_index is not supported for floating point target")
    if dim == 0:  # torch: IndexError at the class dimension
        raise IndexError(f"{fn}: input must have at least 1 dimension (the classes), got a 0-d tensor")
    # torch's log_softmax refuses an integer input here for class indices (after label_smoothing's
    # range, before the targets' checks), and after the weight's check for probabilities
    if not probabilities:
        _check_tensor("input", input)
    if dim >= 2 and target.shape != input.shape:
        # torch takes any other target for class indices, and checks its batch size first (0 when 0-d)
        batch = target.shape[0] if target.dim() else 0
        if batch != input.shape[0]:
            raise ValueError(f"{fn}: expected input batch_size ({input.shape[0]}) to match target batch_size ({batch})")
        if target.dim() == 0:  # and no rows: torch fails reading its batch size
            raise IndexError(f"{fn}: expected a target with a batch dimension of size 0, got a 0-d tensor")
    if class_targets:
        if target.dtype != torch.long and (target.dtype != torch.uint8 or dim > 2):  # as torch's nll_loss(2d)
            raise RuntimeError(f"{fn}: expected target dtype int64 (class indices; uint8 too for (C,) and (N, C) "
                               f"inputs), got {target.dtype}")
        # (N, C, d1, ...) -> (N, d1, ...); (N, C) -> (N,); (C,) -> () or (1,): torch's forward takes a
        # one-element target for a (C,) input too (its backward then fails; here it works)
        expected = input.shape[:1] if dim == 2 else input.shape[:1] + input.shape[2:] if dim > 2 else torch.Size()
        if dim == 1 and target.dim() == 1:
            if target.shape[0] != 1:
                raise ValueError(f"{fn}: a (C,) input takes a 0-d target (or one of 1 element), got {list(target.shape)}")
        elif target.shape != expected:
            hint = ""
            if dim == 3 and target.shape == input.shape[:2]:  # (batch, sequence, classes) logits
                hint = (": the classes are dim 1, as in torch; for (batch, sequence, classes) logits pass "
                        "input.flatten(0, 1) and target.flatten()")
            raise RuntimeError(f"{fn}: expected target of shape {list(expected)}, got {list(target.shape)}{hint}")
    else:
        if class_targets_only:
            raise RuntimeError(f"{fn}: target must hold class indices (int64), got {target.dtype}")
        if target.shape != input.shape:
            raise RuntimeError(
                f"{fn}: probability targets must have the input's shape {list(input.shape)}, "
                f"got {list(target.shape)}"
            )
    if weight is not None:
        n_classes = reference.n_classes(input)
        if weight.dim() != 1 or weight.shape[0] != n_classes:
            raise RuntimeError(
                f"{fn}: weight must be defined for all {n_classes} classes, got shape {list(weight.shape)}"
            )
        # as torch's nll_loss (probability targets promote instead)
        device = input.device.type
        if class_targets and _autocast(weight.dtype, device) != _autocast(input.dtype, device):
            raise RuntimeError(f"{fn}: expected weight of the input's dtype {input.dtype}, got {weight.dtype}")
    if probabilities:
        _check_tensor("input", input)
        label_smoothing = _check_range(fn, "label_smoothing", label_smoothing, 0.0, 1.0, exc=RuntimeError)
        if target.layout is torch.sparse_coo and label_smoothing == 0.0:
            target = target.to_dense()  # torch computes with it (with label smoothing: RuntimeError)
    _check_devices(fn, ("input", input), ("target", target), ("weight", weight),
                   no_kernel=_CE_NO_KERNEL if class_targets and dim <= 2 else
                   _CE_SPATIAL_NO_KERNEL if class_targets else _CE_PROBABILITIES_NO_KERNEL)
    return target, class_targets, label_smoothing


def _check_class_range(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """Out-of-range class indices raise IndexError, as torch does on CPU.

    On CPU this check is free; on CUDA it syncs, so it runs only under ``FASTLOSS_STRICT=1``.
    Without it the kernel never reads out of bounds: such a row's loss becomes NaN. Fake tensors
    (``FakeTensorMode``) have no values to check, as meta ones have none.
    """
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    if backend.fake(bad):  # the mask, not the target: fake too for a real target under FakeTensorMode
        return
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds for {n_classes} classes.")


def _rows(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The input as the kernels read it, and the target to match: (rows, classes) with unit class
    stride, or, where the classes are strided in memory, (N, C, D) positions.

    Inputs whose classes are innermost in memory (``channels_last``, a 2-D input with any row stride)
    are viewed as rows, unless their rows are narrow (_narrow_rows: a 19-class map, say), which the
    columns kernel reads faster, as (N, C, D) positions a pitch apart. Inputs with more classes than
    _COLUMNS_MAX_CLASSES, or whose neighbouring positions lie farther apart than their classes, are
    rows too, at the cost of one copy to move the classes last (narrow ones then go to the columns
    kernel as well). Other inputs with strided classes (a
    contiguous (N, C, H, W) segmentation map, a transposed (N, C)) are read where they are, their
    inner dimensions flattened into D (a view wherever they flatten; else a copy).
    """
    if input.dim() == 1:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    n_classes = input.shape[1]
    strided = input.stride(1) != 1
    # (_NARROW_MAX_CLASSES first: the common wide rows pay one comparison)
    narrow = n_classes <= _NARROW_MAX_CLASSES and not strided and _narrow_rows(input)
    if (strided or narrow) and 1 < n_classes <= _COLUMNS_MAX_CLASSES:
        n = input.shape[0]
        x = input.reshape(n, n_classes, -1)
        # the columns kernel's lanes, neighbouring positions, must be nearer in memory than its steps,
        # neighbouring classes (classes sliced out of rows, x[:, ::2], are not), or narrow rows
        lanes = x.stride(2) if x.shape[2] > 1 else x.stride(0) if n > 1 else 0
        if abs(lanes) < x.stride(1) or narrow:
            if _may_overlap(x):  # (an expanded input: an in-place gradient would write over other logits)
                x = x.contiguous()
            if target.is_floating_point():
                return x, target.reshape(n, n_classes, -1)
            return x, target.reshape(n, -1).contiguous()
    if input.dim() > 2:
        input = input.movedim(1, -1).reshape(-1, n_classes)
        target = target.movedim(1, -1).reshape(-1, n_classes) if target.is_floating_point() else target.reshape(-1)
    if input.stride(-1) != 1:
        input = input.contiguous()
    if target.is_floating_point():
        if target.stride(-1) != 1:
            target = target.contiguous()
    else:
        target = target.contiguous()  # the kernel reads the class index of row i at offset i
    if 1 < n_classes <= _NARROW_MAX_CLASSES and _narrow_rows(input):  # narrow rows that a copy above made
        return _rows(input, target)
    return input, target


def _narrow_rows(input: Tensor) -> bool:
    """Whether an input of unit class stride has rows narrow enough for the columns kernel
    (_COLUMNS_MAX_ROW_COST): the pitch is the stride of its innermost position dimension of more than
    one element (the last such inner one, else the first), and at least the row's width."""
    pitch = 0
    for size, stride in zip(input.shape, input.stride()):
        if size > 1 and stride != 1:  # (the class dimension's stride is 1)
            pitch = stride
    n_classes = input.shape[1]
    return n_classes * max(abs(pitch), n_classes) * input.element_size() <= _COLUMNS_MAX_ROW_COST


def _may_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: False where each of its dimensions of more than
    one element, in the order of their strides, steps over all that the smaller ones span (a
    sufficient test of no overlap)."""
    span = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def _check_inplace(input: Tensor) -> None:
    """What ``inplace_backward=True`` refuses, on every backend (the reference overwrites nothing, but
    code that runs on a CPU should not start raising on a GPU): logits that a backward needs and that
    cannot hold their gradient. Under no_grad nothing is written, so nothing is refused."""
    if not (input.requires_grad and torch.is_grad_enabled()):
        return
    if input.is_leaf or (input._base is not None and input._base.is_leaf):
        raise RuntimeError(
            "inplace_backward=True overwrites the logits with their gradient, which a leaf tensor "
            "that requires grad (or a view of one) does not allow: pass logits computed by the "
            "model, or set inplace_backward=False"
        )
    # (N, C) logits with unit class stride are overwritten where they are (as are classes strided in
    # memory, where no two elements share it: see _rows; others are copied first)
    if input.dim() == 2 and input.stride(1) == 1 and input.shape[0] > 1 and input.stride(0) < input.shape[1]:
        raise RuntimeError(  # as torch refuses an in-place write to such a tensor
            "inplace_backward=True overwrites the logits with their gradient, but their rows share memory "
            f"(shape {list(input.shape)}, strides {list(input.stride())}: an expanded tensor, say), so "
            "one row's gradient would overwrite another's logits: pass logits with rows of their own, or "
            "set inplace_backward=False"
        )


def _check_divisor(fn: str, divisor, reduction: str, input: Tensor) -> None:
    """The ``divisor`` extra: None, a real number, or a 0-dim real tensor on the input's device or the
    CPU (as torch divides a loss by a CPU scalar tensor), with ``reduction="sum"`` only."""
    if divisor is None:
        return
    if reduction != "sum":
        raise ValueError(f"{fn}: divisor divides the summed loss: it needs reduction='sum', got {reduction!r}")
    if isinstance(divisor, Tensor):
        if divisor.dim() != 0:
            raise ValueError(f"{fn}: divisor must be a number or a 0-dim tensor, got a tensor of shape "
                             f"{list(divisor.shape)}")
        if divisor.is_complex():
            raise TypeError(f"{fn}: divisor must be real, got a tensor of dtype {divisor.dtype}")
        if isinstance(input, Tensor) and divisor.device not in (input.device, _CPU):
            raise RuntimeError(f"{fn}: expected the divisor on the input's device, {input.device}, or the CPU, "
                               f"but it is on {divisor.device}")
    elif not isinstance(divisor, numbers.Real):  # int, float, bool, NumPy's integers and floats
        raise TypeError(f"{fn}: divisor must be a real number or a 0-dim tensor, got {type(divisor).__name__}")


def _divided(loss: Tensor, divisor) -> Tensor:
    """``loss / divisor`` as torch divides, or ``loss`` without a divisor: the reference's path."""
    return loss if divisor is None else loss / divisor


def _kernel_loss(run, input: Tensor, out_dtype: torch.dtype, divisor) -> Tensor:
    """``run(out_dtype, div)``, the kernels' loss in ``out_dtype`` (one they write) divided by the
    one-value device tensor ``div`` inside the kernel (None: by nothing): with ``divisor`` folded in
    where the kernels can take it (see ``_kernel_divisor``), else divided afterwards, as torch divides."""
    if divisor is None:
        return run(out_dtype, None)
    fused = _kernel_divisor(input, divisor, out_dtype)
    if fused is None:
        return run(out_dtype, None) / divisor
    div, out_dtype = fused
    return run(out_dtype, div)


def _kernel_divisor(input: Tensor, divisor, out_dtype: torch.dtype) -> tuple[Tensor, torch.dtype] | None:
    """For the kernels: ``divisor`` as one value on the input's device, and the dtype of
    ``loss / divisor`` (torch's: a 0-dim float tensor promotes the loss's), or None where the kernel's
    sum is divided afterwards instead: a divisor that requires grad (its gradient), a CPU tensor
    while compiling (its value would be a host read), or a dtype the kernels do not write (fp64). A
    CPU tensor's value is read on the host (no GPU sync); a number takes one small fill on the device."""
    if isinstance(divisor, Tensor):
        if divisor.requires_grad:
            return None
        if divisor.is_floating_point():  # (a number, or an integer tensor, keeps the loss's dtype)
            out_dtype = torch.promote_types(out_dtype, divisor.dtype)
            if out_dtype not in (input.dtype, torch.float32):
                return None
        if divisor.device == input.device:
            return divisor.reshape(1), out_dtype  # read by the kernel as it is (a count's int64, say)
        if torch.compiler.is_compiling():  # a CPU tensor (_check_divisor)
            return None
        divisor = divisor.item()
    if torch.compiler.is_compiling():  # a product keeps a Python float symbolic: one graph for every value
        return torch.ones(1, dtype=torch.float32, device=input.device) * divisor, out_dtype
    return torch.full((1,), divisor, dtype=torch.float32, device=input.device), out_dtype


def _softmax_loss(fn: str, input, target, weight, ignore_index, reduction, label_smoothing,
                  z_loss, softcap, gamma, inplace_backward, divisor=None) -> Tensor:
    ignore_index = _int(fn, "ignore_index", ignore_index)
    target, class_targets, label_smoothing = _check_softmax_args(fn, input, target, weight, ignore_index,
                                                                 label_smoothing, class_targets_only=gamma is not None)
    if inplace_backward:
        _check_inplace(input)
    if class_targets and input.dim() == 1 and target.dim() == 1:  # a (C,) input's one-element target
        target = target.reshape(())
    if softcap is not None:
        softcap = _check_range(fn, "softcap", softcap, 0.0, low_inclusive=False)
        if softcap == math.inf:  # softcap * tanh(x / softcap) -> x: no cap, not inf * 0
            softcap = None
    # torch: the input's dtype for class indices; probability targets promote the three dtypes
    out_dtype = _loss_dtype(input) if class_targets else _loss_dtype(input, target, weight)
    # Gradients for probability targets and class weights only exist in the reference (torch has
    # none for the weights; the kernels would silently give none).
    if (not backend.use_triton(input, target, weight) or input.dtype not in _KERNEL_DTYPES or input.numel() == 0
            or out_dtype not in (input.dtype, torch.float32)
            or target.requires_grad or (weight is not None and weight.requires_grad)):
        if out_dtype != input.dtype:
            input, target, weight = _upcast(input, target, weight)
        if gamma is None:
            loss = reference.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                           softcap)
        else:
            loss = reference.focal_loss(input, target, gamma, weight, ignore_index, reduction, softcap)
        return _divided(loss, divisor)

    if target.dtype == torch.uint8:  # compared with ignore_index = -100 as a uint8, 156 would pass as ignored
        target = target.long()
    # The reference checks class indices itself. For the kernel this data-dependent check is free on
    # CPU, a sync on CUDA (so only with FASTLOSS_STRICT=1), and impossible to trace into a graph, so
    # compiled code relies on the kernel's NaN rows instead.
    if (class_targets and (not input.is_cuda or backend.strict()) and not torch.compiler.is_compiling()
            and not input.is_meta):  # a meta tensor has no values to check
        _check_class_range(target, reference.n_classes(input), ignore_index)

    # Imported here, not at the top: it imports triton, which `import fastloss` must not. (This form of
    # import statement costs a quarter of the `from .autograd import ...` form's microsecond.)
    import fastloss.autograd as autograd  # noqa: PLR0402

    x, t = _rows(input, target)
    if weight is not None:
        weight = weight.float().contiguous()
    # mean: the kernels count the rows (and sum their class weights) on the device, with no sync
    loss = _kernel_loss(lambda dtype, div: autograd.softmax_loss(
        x, t, weight, reduction == "mean", reduction != "none", inplace_backward, ignore_index, label_smoothing,
        z_loss, softcap, gamma, dtype, div), input, out_dtype, divisor)
    if reduction == "none":
        loss = loss.reshape(input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ())
    return loss


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    divisor: float | Tensor | None = None,
) -> Tensor:
    """Drop-in ``torch.nn.functional.cross_entropy`` that computes loss and gradient in one pass.

    Accepts class-index targets (int64) or class probabilities (floats of the input's shape), and
    inputs of shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``. As in torch, a target of the
    input's shape holds probabilities and any other class indices; a ``(C,)`` input takes a 0-d
    target, or one of shape ``(1,)`` (torch's forward takes that too, and its backward fails).
    Inputs are read where they are: rows of classes contiguous in memory (a 2-D input with any row
    stride; an ``(N, C, d1, ...)`` one in ``channels_last``), and classes strided in memory (a
    contiguous ``(N, C, d1, ...)`` segmentation map, a transposed ``(N, C)``), which a kernel of
    their own steps through class by class, up to 1024 classes (it also takes narrow rows: up to
    28 classes in 16 bits, 20 in fp32, next to each other, as a 19-class ``channels_last`` map's).
    Those past 1024 classes, those whose neighbouring positions lie farther apart than their classes
    (classes sliced out of rows), and ``(N, C, d1, ...)`` inputs whose inner dimensions do not
    flatten into one stride (or whose elements share memory: an expanded tensor), are copied first.

    ``label_smoothing`` outside [0, 1], or NaN, raises RuntimeError. (torch raises only above 1; a
    negative or NaN value it takes and ignores, for class indices and probabilities alike.)

    Extras (keyword-only):
        z_loss: adds ``z_loss * logsumexp(logits)**2`` for each counted row, not class-weighted;
            ``mean`` divides it by the count of counted rows.
        softcap: logits ← ``softcap * tanh(logits / softcap)`` before the loss (inside the kernel);
            ``inf`` is its limit, no cap.
        inplace_backward: write the gradient into the logits' memory instead of a fresh buffer,
            saving one ``N×C`` allocation. The logits are destroyed: backward raises if another
            autograd node saved them before the loss, and in eager mode also if they are written
            to after it or they (or the tensor they view) are used again after it. Leaf logits (or
            views of them), and logits whose rows share memory, are refused, on every backend. The
            reference backend then overwrites nothing, and neither does the kernel for an input it
            copies first (see above): the copy takes the gradient, and the logits keep their values.
        divisor: with ``reduction="sum"``, returns ``cross_entropy(..., reduction="sum") / divisor``
            (its value, dtype and gradients; a number or a 0-dim tensor, such as the batch's count of
            tokens for gradient accumulation), with the division inside the kernel: its gradient is
            written already divided, where a sum divided afterwards would leave the backward a pass
            over the whole gradient to scale it.
    """
    # A tensor subclass, a mode or torch.fx's Proxy takes the call over, as in torch's functions.
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(cross_entropy, (input, target, weight), input, target, weight, size_average,
                                     ignore_index, reduce, reduction, label_smoothing, z_loss=z_loss,
                                     softcap=softcap, inplace_backward=inplace_backward, divisor=divisor)
    reduction = _reduction(reduction, size_average, reduce)
    label_smoothing = _float("cross_entropy", "label_smoothing", label_smoothing)  # its range: with the shapes
    z_loss = _check_range("cross_entropy", "z_loss", z_loss, 0.0)
    _check_divisor("cross_entropy", divisor, reduction, input)
    return _softmax_loss("cross_entropy", input, target, weight, ignore_index, reduction,
                         label_smoothing, z_loss, softcap, None, inplace_backward, divisor)


def focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    softcap: float | None = None,
    inplace_backward: bool = False,
    divisor: float | Tensor | None = None,
) -> Tensor:
    """Softmax focal loss ``-w_y (1 - p_y)**gamma * log p_y`` over class-index targets.

    With ``gamma=0`` it equals ``cross_entropy(input, target, weight=weight,
    ignore_index=ignore_index, reduction=reduction)``; ``mean`` divides by ``Σ w_y`` over the
    counted rows, as weighted cross-entropy does. Shapes and extras are those of
    :func:`cross_entropy`.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(focal_loss, (input, target, weight), input, target, gamma, weight,
                                     ignore_index, reduction, softcap=softcap, inplace_backward=inplace_backward,
                                     divisor=divisor)
    reduction = _reduction(reduction)
    gamma = _check_range("focal_loss", "gamma", gamma, 0.0)
    _check_divisor("focal_loss", divisor, reduction, input)
    return _softmax_loss("focal_loss", input, target, weight, ignore_index, reduction,
                         0.0, 0.0, softcap, gamma, inplace_backward, divisor)


# --------------------------------------------------------------------------------------------------
# elementwise losses: sigmoid focal, Huber, SmoothL1
# --------------------------------------------------------------------------------------------------


def _check_pair(fn: str, input: Tensor, target: Tensor, weight: Tensor | None) -> bool:
    """Huber's and SmoothL1's tensor checks, before their other arguments' as in torch (whose
    broadcast comes before the reduction is read); returns whether input and target have one shape.
    (An integer or bool target, or an integer weight, is allowed, as torch allows it: the reference
    takes it.) Their devices and layouts are checked after the reduction (``_check_devices``), and the
    input's dtype last (``_check_float_input``), as torch's kernel checks them."""
    _check_tensor("input", input, floating=False)
    _check_tensor("target", target, floating=False)
    if weight is not None:
        _check_tensor("weight", weight, floating=False)
    return _check_same_shape_or_broadcast(input, target)


def _dtype_kind(dtype: torch.dtype) -> int:
    """bool < integer < float < complex: torch's promotion and casting categories."""
    return 3 if dtype.is_complex else 2 if dtype.is_floating_point else 0 if dtype == torch.bool else 1


def _check_float_input(fn: str, input: Tensor, target: Tensor, keeps_input_dtype: bool) -> None:
    """The input and target's dtypes, refused as torch's kernels refuse them, after the reduction and
    delta or beta. Their promoted dtype is what torch computes in: where the result keeps the input's
    dtype (Huber) and that cannot hold it (an integer input with a float target, a complex target),
    RuntimeError; else, where it is not a float (integers, bool, complex), NotImplementedError. (The
    reference would cast a complex tensor to a float one, silently dropping its imaginary part.)
    In categories, not with torch.promote_types and torch.can_cast, which torch.compile cannot trace."""
    if input.is_floating_point() and target.is_floating_point():
        return  # the usual case first
    kind_in, kind_t = _dtype_kind(input.dtype), _dtype_kind(target.dtype)
    if keeps_input_dtype and kind_t > kind_in:
        raise RuntimeError(f"{fn}: result type {target.dtype} can't be cast to the desired output type {input.dtype} "
                           "(input and target must be floating-point tensors, or the target an integer one)")
    if max(kind_in, kind_t) != 2:
        raise NotImplementedError(f"{fn}: input and target must be floating-point tensors (or one of them an "
                                  f"integer one), got dtypes {input.dtype} and {target.dtype}")


def _elementwise_ready(same_shape: bool, input: Tensor, target: Tensor, weight: Tensor | None,
                       out_dtype: torch.dtype) -> bool:
    """Whether the Triton path can take these checked tensors as they are."""
    return (same_shape and input.dtype == target.dtype and input.dtype in _KERNEL_DTYPES
            and (weight is None or weight.is_floating_point())
            and out_dtype in (input.dtype, torch.float32) and input.numel() > 0
            and backend.use_triton(input, target, weight))


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    divisor: float | Tensor | None = None,
) -> Tensor:
    """Drop-in ``torchvision.ops.sigmoid_focal_loss`` (same formula and defaults).

    ``loss = BCEWithLogits(x, t) * (1 - p_t)**gamma``, times ``α_t = alpha*t + (1-alpha)*(1-t)``
    unless ``alpha < 0``. Targets are floats of the inputs' shape (soft labels allowed).

    Checked in torchvision's order, with its exception types: alpha (ValueError above 1 or NaN), the
    targets' shape (ValueError) and dtype (RuntimeError), then the reduction. Where torchvision
    differs: every negative alpha disables the weighting (torchvision's releases with torch 2.13
    take only -1, as older ones took any), and a negative or NaN gamma raises ValueError.

    Extra (keyword-only): ``divisor``, with ``reduction="sum"``: the summed loss divided by it (the
    number of positive anchors, say), inside the kernel; see :func:`cross_entropy`.
    """
    if has_torch_function_variadic(inputs, targets):
        return handle_torch_function(sigmoid_focal_loss, (inputs, targets), inputs, targets, alpha, gamma,
                                     reduction, divisor=divisor)
    alpha = _float("sigmoid_focal_loss", "alpha", alpha)
    if not alpha <= 1.0:  # NaN too
        raise ValueError(f"sigmoid_focal_loss: alpha must be in [0, 1], or negative for no weighting, got {alpha}")
    _check_tensor("inputs", inputs)
    _check_tensor("targets", targets, floating=False)
    if targets.shape != inputs.shape:
        raise ValueError(
            f"sigmoid_focal_loss: targets must have the inputs' shape {list(inputs.shape)}, "
            f"got {list(targets.shape)}"
        )
    if not targets.is_floating_point():  # torchvision fails with a RuntimeError here
        raise RuntimeError(f"sigmoid_focal_loss: targets must be a floating-point tensor, got dtype {targets.dtype}")
    _check_devices("sigmoid_focal_loss", ("inputs", inputs), ("targets", targets), no_kernel=_SIGMOID_FOCAL_NO_KERNEL)
    gamma = _check_range("sigmoid_focal_loss", "gamma", gamma, 0.0)
    reduction = _reduction(reduction, deprecated_mean=False)  # torchvision's: none, mean or sum
    _check_divisor("sigmoid_focal_loss", divisor, reduction, inputs)
    out_dtype = _loss_dtype(inputs, targets)
    if (inputs.numel() == 0 or inputs.dtype not in _KERNEL_DTYPES or targets.requires_grad
            or out_dtype not in (inputs.dtype, torch.float32) or not backend.use_triton(inputs, targets)):
        if out_dtype != inputs.dtype:
            inputs, targets = _upcast(inputs, targets)
        return _divided(reference.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction), divisor)

    import fastloss.autograd as autograd  # noqa: PLR0402

    return _kernel_loss(lambda dtype, div: autograd.sigmoid_focal(inputs, targets, alpha, gamma, reduction, dtype, div),
                        inputs, out_dtype, divisor)


def huber_loss(
    input: Tensor,
    target: Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: Tensor | None = None,
    *,
    divisor: float | Tensor | None = None,
) -> Tensor:
    """Drop-in ``torch.nn.functional.huber_loss``: quadratic below ``delta``, linear above.

    ``weight`` (optional) has the input's shape and multiplies each element's loss; ``mean`` then
    averages over all elements, as torch does. A finite ``delta`` above 2^20 runs the plain-PyTorch
    reference, not the kernel, which would lose small differences' digits there (``delta=inf`` takes
    the kernel: the loss is 0.5 d^2 throughout). Gradients flow to ``input`` and ``target``, each in
    its own dtype where the two differ (the loss keeps the input's, as torch's; torch's backward
    raises there).

    Extra (keyword-only): ``divisor``, with ``reduction="sum"``: the summed loss divided by it,
    inside the kernel; see :func:`cross_entropy`.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(huber_loss, (input, target, weight), input, target, reduction, delta, weight,
                                     divisor=divisor)
    same_shape = _check_pair("huber_loss", input, target, weight)
    if weight is not None and weight.shape != input.shape:
        raise ValueError(f"huber_loss: weight must have the input's shape {list(input.shape)}, got {list(weight.shape)}")
    # torch reads the reduction before its kernel checks delta, except with a weight, which it
    # applies after an unreduced call
    if weight is None:
        reduction = _reduction(reduction)
    elif weight.layout in _COO_CSR and reduction != "mean":
        weight = weight.to_dense()  # torch multiplies its loss by it, and sums that
    _check_devices("huber_loss", ("input", input), ("target", target), ("weight", weight),
                   no_kernel=_HUBER_NO_KERNEL)
    delta = _check_range("huber_loss", "delta", delta, 0.0, low_inclusive=False, exc=RuntimeError)
    _check_float_input("huber_loss", input, target, keeps_input_dtype=True)
    if weight is not None:
        reduction = _reduction(reduction)
    _check_divisor("huber_loss", divisor, reduction, input)
    # The kernel gives no gradient for weight; the reference does. torch's result has the input's
    # dtype, promoted with the weight's (not the target's).
    out_dtype = _loss_dtype(input, weight)
    if (not _elementwise_ready(same_shape, input, target, weight, out_dtype)
            or (weight is not None and weight.requires_grad) or _HUBER_KERNEL_MAX_DELTA < delta < math.inf):
        if out_dtype != input.dtype:
            input, target, weight = _upcast(input, target, weight)
        return _divided(reference.huber_loss(input, target, reduction, delta, weight), divisor)

    import fastloss.autograd as autograd  # noqa: PLR0402

    return _kernel_loss(lambda dtype, div: autograd.huber(input, target, weight, delta, delta, reduction, dtype, div),
                        input, out_dtype, divisor)


def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    beta: float = 1.0,
    *,
    divisor: float | Tensor | None = None,
) -> Tensor:
    """Drop-in ``torch.nn.functional.smooth_l1_loss``: Huber loss divided by ``beta``; ``beta=0`` is L1.

    Extra (keyword-only): ``divisor``, with ``reduction="sum"``: the summed loss divided by it (the
    number of foreground boxes, say), inside the kernel; see :func:`cross_entropy`.
    """
    if has_torch_function_variadic(input, target):
        return handle_torch_function(smooth_l1_loss, (input, target), input, target, size_average, reduce,
                                     reduction, beta, divisor=divisor)
    if (isinstance(input, Tensor) and isinstance(target, Tensor) and target.is_floating_point()
            and not input.is_floating_point() and not input.is_complex()):
        input = input.to(target.dtype)  # as torch promotes an integer or bool input (huber_loss refuses it)
    same_shape = _check_pair("smooth_l1_loss", input, target, None)
    reduction = _reduction(reduction, size_average, reduce)
    _check_divisor("smooth_l1_loss", divisor, reduction, input)
    no_kernel = _SMOOTH_L1_NO_KERNEL
    if (input.layout is not torch.strided or target.layout is not torch.strided) and beta == 0.0:
        # torch's beta = 0 is its l1_loss, input - target: it computes with a COO target, and with two
        # jagged tensors (torch's own l1_loss here: the reference's reshape cannot take them), and
        # refuses other layouts with RuntimeError
        if input.layout is torch.jagged and target.layout is torch.jagged:
            return _divided(torch.nn.functional.l1_loss(input, target, reduction=reduction), divisor)
        if target.layout is torch.sparse_coo and input.layout is torch.strided:
            target = target.to_dense()
        no_kernel = ()
    _check_devices("smooth_l1_loss", ("input", input), ("target", target), no_kernel=no_kernel)
    beta = _check_range("smooth_l1_loss", "beta", beta, 0.0, exc=RuntimeError)
    _check_float_input("smooth_l1_loss", input, target, keeps_input_dtype=False)
    out_dtype = _loss_dtype(input, target)
    if not _elementwise_ready(same_shape, input, target, None, out_dtype):
        if out_dtype != input.dtype:
            input, target = _upcast(input, target)
        return _divided(reference.smooth_l1_loss(input, target, reduction, beta), divisor)

    import fastloss.autograd as autograd  # noqa: PLR0402

    return _kernel_loss(lambda dtype, div: autograd.huber(input, target, None, beta, 1.0, reduction, dtype, div),
                        input, out_dtype, divisor)
