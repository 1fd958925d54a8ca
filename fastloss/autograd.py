"""Autograd for the fused kernels, and their registration with ``torch.library``.

Each kernel family is one ``torch.autograd.Function``. Its forward runs one kernel that returns the
loss *and* the gradient, already multiplied by the reduction's scale (a cross-entropy ``mean``
launches a small prologue first, which sums its divisor on the device), and saves the gradient. Its
backward only multiplies that saved gradient by ``grad_output``, in place and on the device: the
kernel reads ``grad_output`` itself and returns at once when it is exactly 1.0 — the common
``loss.backward()`` — so backward costs one launch, no memory traffic and no host sync. A reduced
loss's gradient is also written times the power of two that the previous backward's
``grad_output`` was (a divided or loss-scaled loss), and the backward returns at once when it is
that again: see _PREDICTIONS.

The launchers are registered as ``torch.library.custom_op``s with fake (meta) implementations, so
``torch.compile(fullgraph=True)`` sees opaque, shape-correct nodes. In eager mode the same functions
are called directly: the custom-op dispatcher costs tens of microseconds of CPU per call, which a
short kernel cannot hide.

The backward scales the saved gradient in place, which consumes it: a second backward through the
same loss raises. (An elementwise loss with ``reduction="none"`` has one factor per element, so its
backward writes a new buffer, and can run again.)
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from torch import Tensor

# This module is imported on the first call that runs a kernel (functional imports it there), never
# by `import fastloss`, so triton is imported then too. Imported once here, not in every launch: an
# import statement costs about a microsecond of host time per call.
from .backend import fake
from .kernels.common import scale_grad_
from .kernels.cross_entropy import cross_entropy_fwd
from .kernels.focal import sigmoid_focal_fwd
from .kernels.huber import huber_fwd

# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


def _no_grad_buffer(like: Tensor) -> Tensor:
    return like.new_empty(0)


_SAME_DEVICE = contextlib.nullcontext()


def _on(t: Tensor):
    """Launch on ``t``'s GPU, which need not be the current one (Triton launches on the current).
    Switching devices costs host time, so it is done only when they differ."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _SAME_DEVICE


class _Op:
    """A launcher registered as the custom op ``fastloss::<name>``.

    Calling it runs the registered op while torch.compile traces and on fake tensors
    (``FakeTensorMode``), where the op's fake implementation gives the outputs' shapes and dtypes and
    no kernel runs; and the function itself in eager mode, bumping the version counters of the
    tensors it mutates as the op would (so autograd still sees in-place writes).
    """

    def __init__(self, name: str, fn, mutates_args: tuple[str, ...]):
        self.name, self.fn = name, fn
        self.custom_op = torch.library.custom_op(f"fastloss::{name}", fn, mutates_args=mutates_args)
        params = list(inspect.signature(fn).parameters)
        self.mutated = tuple(params.index(a) for a in mutates_args)

    def register_fake(self, fake):
        return self.custom_op.register_fake(fake)

    def __call__(self, *args):
        if torch.compiler.is_compiling() or fake(args[0]):
            return getattr(torch.ops.fastloss, self.name)(*args)
        out = self.fn(*args)
        for i in self.mutated:
            if args[i] is not None:  # an optional output buffer that was not asked for
                torch.autograd.graph.increment_version(args[i])
        return out


def _op(name: str, mutates_args: tuple[str, ...] = ()):
    return lambda fn: _Op(name, fn, mutates_args)


def _fake_softmax_loss(logits: Tensor, reduce: bool, loss_dtype: torch.dtype) -> Tensor:
    return logits.new_empty(() if reduce else logits.shape[:1] + logits.shape[2:], dtype=loss_dtype)


def _softmax_grad_buffer(logits: Tensor) -> Tensor:
    """The gradient of (N, V) logits, contiguous; of (N, C, D) positions (see ``cross_entropy_fwd``),
    laid out as the logits are where they are dense, so that the kernel's steps over the positions
    write it as they read them."""
    return torch.empty_like(logits, memory_format=torch.contiguous_format if logits.dim() == 2 else
                            torch.preserve_format)


# The predicted grad_output. A backward with grad_output != 1 (a loss divided for gradient
# accumulation, or scaled for fp16) must scale the whole saved gradient, a second pass over it. So the
# kernels of a reduced loss (sigmoid focal's in fp16 only: see SigmoidFocal) write the gradient
# already multiplied by a prediction of grad_output: the last scalar grad_output that a backward on
# the same device saw, when it is a power of two (else 0, "unknown": 1, but for fp16 below).
# A right prediction leaves the backward nothing to do; a wrong one costs the pass it would have cost
# anyway. Powers of two multiply exactly, so the gradient is the same bit for bit either way, but for
# entries below the smallest normal float (times the factor): one rounding there, not two. Each
# forward copies the prediction it used for its own backward, so the order of forwards and backwards
# does not matter. fp16 gradients (max 65504) take the prediction only as far as the unscaled
# gradient (the kernel caps it at 1 / the mean's scale, and saves the factor it used), so that a
# wrong prediction cannot overflow them, and are written unscaled while no backward has set one
# (0, "unknown"; also off the default stream, and after a grad_output no power of two) or when the
# prediction is below 1. That keeps a mean's gradient out of fp16's subnormals (6e-8 to 6.1e-5):
# divided by thousands of rows or elements in the forward, with a loss scaler's factor applied only
# in the backward, most of it was flushed before the factor came; and so did a gradient written
# times a prediction below the grad_output that came (2^-24 predicted, then 1: all of it).
# Only on the device's default stream, where training usually runs and no CUDA graph is ever
# captured. torch.compile's CUDA graphs (mode="reduce-overhead") run their first calls and their
# capture on a stream of their own, and what is allocated there goes to the graphs' private memory
# pool: a prediction kept from there would be a leak that torch.compile's pool check raises on, and
# one first allocated inside a capture holds its 1 only once that graph replays. Off the default
# stream, the forward multiplies by 1, and the backward's pass scales as it would without this.
# One prediction per device and kind of loss (a kernel family: SOFTMAX, HUBER, SIGMOID_FOCAL), so that
# a model's auxiliary loss with a factor of its own (weighted 0.1) does not spoil its main loss's
# (divided by 8), whichever backward runs last.
_PREDICTIONS: dict[tuple[torch.device, str], Tensor] = {}
SOFTMAX, HUBER, SIGMOID_FOCAL = "softmax", "huber", "sigmoid_focal"


def _on_default_stream(t: Tensor) -> bool:
    """Whether the current stream of ``t``'s device is its default stream (always, on a CPU)."""
    return not t.is_cuda or torch._C._cuda_getCurrentRawStream(t.get_device()) == 0


def _prediction(t: Tensor, family: str) -> Optional[Tensor]:
    """The prediction for ``family``'s kernels launched on ``t``'s device (one fp32 value), or None
    off its default stream."""
    if not _on_default_stream(t):
        return None
    key = (t.device, family)
    pred = _PREDICTIONS.get(key)
    if pred is None:  # 0 until a backward sets it: "unknown", which the kernels take as 1 (fp16: see above)
        pred = _PREDICTIONS.setdefault(key, torch.zeros(1, dtype=torch.float32, device=t.device))
    return pred


def _forward_prediction(input: Tensor, predicted: Optional[Tensor],
                        family: str) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The launcher's ``prediction`` and ``predicted`` for a forward given a ``predicted`` buffer (or
    None): the prediction of its device and family, which the kernel copies into ``predicted``; or,
    off the default stream, none, and ``predicted`` holds 1 (fp16: an "unknown" of the forward's own
    instead)."""
    prediction = None if predicted is None else _prediction(input, family)
    if prediction is None:
        if predicted is not None:
            if input.dtype == torch.float16:
                return torch.zeros(1, dtype=torch.float32, device=input.device), predicted
            predicted.fill_(1.0)
        return None, None
    return prediction, predicted


# The launchers return the loss in ``loss_dtype`` (the input's, or fp32 for 16-bit inputs under
# autocast: ``functional._loss_dtype`` decides), per row or element, or (``reduce``) summed: the
# launcher sums the kernel's fp32 partials in fp32 and rounds the sum once (``reduce_partials``).
# ``predicted``: None, or one fp32 value, into which the kernel copies the prediction it multiplied
# the gradient by (see _PREDICTIONS).
@_op("softmax_loss_fwd", mutates_args=("predicted",))
def _softmax_loss_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], divisor: Optional[Tensor],
                      mean: bool, write_grad: bool, reduce: bool, loss_dtype: torch.dtype, ignore_index: int,
                      label_smoothing: float, z_loss: float, softcap: Optional[float], gamma: Optional[float],
                      predicted: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    grad = _softmax_grad_buffer(logits) if write_grad else None
    prediction, predicted = _forward_prediction(logits, predicted, SOFTMAX)
    with _on(logits):
        loss = cross_entropy_fwd(logits, target, weight, divisor, grad, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, gamma=gamma,
                                 mean=mean, reduce=reduce, loss_dtype=loss_dtype,
                                 prediction=prediction, predicted=predicted)
    return loss, grad if grad is not None else _no_grad_buffer(logits)


@_softmax_loss_fwd.register_fake
def _(logits, target, weight, divisor, mean, write_grad, reduce, loss_dtype, ignore_index, label_smoothing, z_loss,
      softcap, gamma, predicted):
    grad = _softmax_grad_buffer(logits) if write_grad else _no_grad_buffer(logits)
    return _fake_softmax_loss(logits, reduce, loss_dtype), grad


@_op("softmax_loss_fwd_inplace", mutates_args=("logits", "predicted"))
def _softmax_loss_fwd_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor], divisor: Optional[Tensor],
                              mean: bool, reduce: bool, loss_dtype: torch.dtype, ignore_index: int,
                              label_smoothing: float, z_loss: float, softcap: Optional[float], gamma: Optional[float],
                              predicted: Optional[Tensor]) -> Tensor:
    prediction, predicted = _forward_prediction(logits, predicted, SOFTMAX)
    with _on(logits):
        return cross_entropy_fwd(logits, target, weight, divisor, logits, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, gamma=gamma,
                                 mean=mean, reduce=reduce, loss_dtype=loss_dtype,
                                 prediction=prediction, predicted=predicted)


@_softmax_loss_fwd_inplace.register_fake
def _(logits, target, weight, divisor, mean, reduce, loss_dtype, ignore_index, label_smoothing, z_loss, softcap, gamma,
      predicted):
    return _fake_softmax_loss(logits, reduce, loss_dtype)


def _scale(mean: bool, input: Tensor) -> float:
    """An elementwise loss's factor: 1 / its element count for a mean, else 1. Computed inside the
    ops, not passed to them: a float argument of a custom op is a constant of the compiled graph, so
    under torch.compile 1 / numel would be specialized to each size (a recompilation for every batch
    size, until the recompile limit fails a fullgraph=True compile), where the op's flag is not."""
    return 1.0 / input.numel() if mean else 1.0


@_op("huber_fwd", mutates_args=("predicted",))
def _huber_fwd(input: Tensor, target: Tensor, weight: Optional[Tensor], divisor: Optional[Tensor], beta: float,
               mul: float, mean: bool, reduce: bool, grad_input: bool, grad_target: bool,
               loss_dtype: torch.dtype, predicted: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    scale = _scale(mean, input)
    gi = torch.empty_like(input) if grad_input else None
    gt = torch.empty_like(target) if grad_target else None
    prediction, predicted = _forward_prediction(input, predicted, HUBER)
    with _on(input):
        loss = huber_fwd(input, target, weight, beta=beta, mul=mul, scale=scale, reduce=reduce,
                         grad_input=gi, grad_target=gt, loss_dtype=loss_dtype,
                         prediction=prediction, predicted=predicted, divisor=divisor)
    return loss, gi if gi is not None else _no_grad_buffer(input), gt if gt is not None else _no_grad_buffer(input)


def _fake_elementwise_loss(input: Tensor, reduce: bool, loss_dtype: torch.dtype) -> Tensor:
    return input.new_empty(() if reduce else input.shape, dtype=loss_dtype)


@_huber_fwd.register_fake
def _(input, target, weight, divisor, beta, mul, mean, reduce, grad_input, grad_target, loss_dtype, predicted):
    gi = torch.empty_like(input) if grad_input else _no_grad_buffer(input)
    gt = torch.empty_like(target) if grad_target else _no_grad_buffer(input)
    return _fake_elementwise_loss(input, reduce, loss_dtype), gi, gt


@_op("sigmoid_focal_fwd", mutates_args=("predicted",))
def _sigmoid_focal_fwd(inputs: Tensor, targets: Tensor, divisor: Optional[Tensor], alpha: float, gamma: float,
                       mean: bool, reduce: bool, grad_input: bool, loss_dtype: torch.dtype,
                       predicted: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    scale = _scale(mean, inputs)
    gi = torch.empty_like(inputs) if grad_input else None
    prediction, predicted = _forward_prediction(inputs, predicted, SIGMOID_FOCAL)
    with _on(inputs):
        loss = sigmoid_focal_fwd(inputs, targets, alpha=alpha, gamma=gamma, scale=scale, reduce=reduce,
                                 grad_input=gi, loss_dtype=loss_dtype, prediction=prediction, predicted=predicted,
                                 divisor=divisor)
    return loss, gi if gi is not None else _no_grad_buffer(inputs)


@_sigmoid_focal_fwd.register_fake
def _(inputs, targets, divisor, alpha, gamma, mean, reduce, grad_input, loss_dtype, predicted):
    return _fake_elementwise_loss(inputs, reduce, loss_dtype), torch.empty_like(inputs) if grad_input else _no_grad_buffer(inputs)


@_op("scale_grad_", mutates_args=("grad", "other"))
def _scale_grad_(grad: Tensor, grad_output: Tensor, predicted: Optional[Tensor], family: str,
                 other: Optional[Tensor]) -> None:
    """grad *= grad_output, and other *= grad_output when given, in one launch; ``predicted``: what
    their forward, of ``family``, multiplied them by (see _PREDICTIONS)."""
    prediction = None if predicted is None else _prediction(grad, family)
    if predicted is not None and prediction is None:  # off the default stream: the next one goes nowhere
        prediction = torch.empty_like(predicted)
    with _on(grad):
        scale_grad_(grad, grad_output, predicted, prediction, other)


@_scale_grad_.register_fake
def _(grad, grad_output, predicted, family, other):
    return None


# --------------------------------------------------------------------------------------------------
# autograd.Functions
# --------------------------------------------------------------------------------------------------


def _predicted(t: Tensor, write_grad: bool, reduce: bool) -> Optional[Tensor]:
    """A forward's ``predicted`` buffer (see _PREDICTIONS): one fp32 value when it writes a gradient
    that a scalar grad_output will scale, else None."""
    return t.new_empty(1, dtype=torch.float32) if write_grad and reduce else None


def _save(ctx, family: str, grads: tuple[Tensor, ...], per_element: bool, predicted: Optional[Tensor] = None,
          rows: Optional[tuple[Tensor, int]] = None) -> None:
    """Saves the gradients (one per input, in order) of a loss of ``family``, ``predicted`` (see
    _PREDICTIONS), and ``rows``: a per-row loss's class-index target and ignore_index, whose ignored
    rows take no grad_output (see _scaled_grads)."""
    ctx.family = family
    ctx.per_element = per_element
    ctx.n_grads = len(grads)
    ctx.ignore_index = None if rows is None else rows[1]
    ctx.save_for_backward(*grads, *([] if predicted is None else [predicted]), *([] if rows is None else [rows[0]]))


def _save_overwritten(ctx, logits: Tensor, predicted: Optional[Tensor], rows: Optional[tuple[Tensor, int]]) -> None:
    """Saves logits that hold their own gradient. In eager mode :class:`_Overwritten` marks them
    dirty right after the forward, one more version, which ``save_for_backward`` would take for a
    later write; so the expected version is kept and checked by :func:`_scaled_grads`. (A compiled
    graph cannot branch on a version: it saves the logits as they are, and is not marked.)"""
    if torch.compiler.is_compiling():
        _save(ctx, SOFTMAX, (logits,), per_element=False, predicted=predicted, rows=rows)
        return
    _save(ctx, SOFTMAX, (), per_element=False, predicted=predicted, rows=rows)
    ctx.overwritten = (logits, logits._version + 1)


_BACKWARD_ONCE = ("fastloss computes the gradient in the forward pass and scales it in place in the "
                  "backward, so backward can run only once through a fastloss loss, and the saved "
                  "gradient must not be modified in between; recompute the loss to differentiate it again")
_WRITTEN_OVER = ("inplace_backward=True left the gradient in the logits, and they were written to after the "
                 "loss, so it is lost: by an in-place op, or by torch.utils.checkpoint recomputing a loss whose "
                 "logits are the checkpointed function's input (compute them inside that function); recompute "
                 "the loss, or set inplace_backward=False")


def _scaled_grads(ctx, grad_loss: Tensor) -> list[Optional[Tensor]]:
    """The saved gradients times ``grad_loss``; ``None`` for inputs that need no gradient.

    A scalar ``grad_loss`` (``mean``/``sum``) or one per row (cross-entropy, ``none``) scales the
    saved buffer in place on the device, and that buffer becomes the returned gradient: no new
    allocation. An elementwise loss with ``none`` has one factor per element, so the product goes
    to a new buffer, no larger than the factors themselves.

    Scaling in place consumes the saved gradient, so a second backward through the same loss
    (``retain_graph=True``) raises instead of returning a gradient scaled twice; so does a saved
    gradient modified after the forward (in-place logits written to by the caller, or by a
    checkpoint's recomputation).
    """
    try:
        saved = ctx.saved_tensors
    except RuntimeError as err:
        # torch.utils.checkpoint's recomputation checks the in-place logits' version itself
        written_over = hasattr(ctx, "overwritten") and "modified by an inplace operation" in str(err)
        raise RuntimeError(_WRITTEN_OVER if written_over else _BACKWARD_ONCE) from err
    if ctx.ignore_index is not None:
        # torch gives an ignored row a zero gradient whatever its grad_output: 0 * NaN or 0 * inf
        # (a nansum of per-row losses divided by per-row counts of 0 sends NaN back) must stay 0
        saved, target = saved[:-1], saved[-1]
        grad_loss = torch.where(target != ctx.ignore_index, grad_loss, 0)
    grads, predicted = saved[:ctx.n_grads], (saved[ctx.n_grads] if len(saved) > ctx.n_grads else None)
    if hasattr(ctx, "overwritten"):
        logits, version = ctx.overwritten
        ctx.overwritten = (None, None)  # let go of the logits, as saved tensors are after a backward
        if logits is None:
            raise RuntimeError(_BACKWARD_ONCE)
        if logits._version != version:
            raise RuntimeError(_WRITTEN_OVER)
        grads = (logits,)
    out: list[Optional[Tensor]] = []
    in_place: list[Tensor] = []  # one gradient, or Huber's two (input's and target's): one launch
    for i, g in enumerate(grads):
        if not ctx.needs_input_grad[i]:
            out.append(None)
        elif ctx.per_element:
            out.append((g * grad_loss).to(g.dtype))
        else:
            in_place.append(g)
            out.append(g)
    if in_place:
        _scale_grad_(in_place[0], grad_loss, predicted, ctx.family, in_place[1] if len(in_place) > 1 else None)
    return out


def _backward_grads(ctx, grad_loss: Tensor, n_other: int) -> tuple[Optional[Tensor], ...]:
    """A backward's result: :func:`_scaled_grads`, then ``None`` for the ``n_other`` arguments that
    take no gradient."""
    return (*_scaled_grads(ctx, grad_loss), *[None] * n_other)


_SECOND_ORDER = ("fastloss's kernels compute the gradient in the forward pass, so it cannot be differentiated "
                 "again: backward with create_graph=True is refused; for higher-order gradients use "
                 "fastloss.use_backend('reference')")


def _backward(ctx, grad_loss: Tensor, n_other: int) -> tuple[Optional[Tensor], ...]:
    """The Functions' backward. The gradients are computed in the forward, so they cannot be
    differentiated again, and ``create_graph=True`` (grad mode on here) raises at once. A gradient
    returned there through a node that raises when a second differentiation reaches it (as
    ``once_differentiable`` does) is not enough: ``torch.autograd.grad(..., inputs=...)`` prunes the
    nodes on no path to its inputs, and a penalty on an upstream weight's gradient then silently
    lacked the loss's own second-order term. (torch.compile traces this with grad mode off.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(_SECOND_ORDER)
    return _backward_grads(ctx, grad_loss, n_other)


def _evaluated(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors detached under no_grad. There a Function's ``needs_input_grad`` still says True for
    an input that requires grad (a loss logged inside ``torch.no_grad()`` during training), and the
    kernel would write a gradient no backward reads: for cross-entropy an N·V buffer and its writes."""
    return tensors if torch.is_grad_enabled() else tuple(t.detach() for t in tensors)


class SoftmaxLoss(torch.autograd.Function):
    """Cross-entropy, and softmax focal loss when ``gamma`` is set: one kernel family.

    With ``inplace`` the gradient overwrites the logits. The write bumps their version counter, so
    any other node that saved the logits raises in backward, and :class:`_Overwritten` then marks
    them dirty, so that a later use of them raises too.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, divisor, mean, reduce, inplace, ignore_index, label_smoothing,
                z_loss, softcap, gamma, out_dtype):
        write_grad = ctx.needs_input_grad[0]
        args = (target, weight, divisor, mean)
        predicted = _predicted(logits, write_grad, reduce)
        rows = None if reduce or target.is_floating_point() else (target, ignore_index)
        opts = (reduce, out_dtype, ignore_index, label_smoothing, z_loss, softcap, gamma, predicted)
        if write_grad and inplace:
            loss = _softmax_loss_fwd_inplace(logits, *args, *opts)
            _save_overwritten(ctx, logits, predicted, rows)
        else:
            loss, grad = _softmax_loss_fwd(logits, *args, write_grad, *opts)
            _save(ctx, SOFTMAX, (grad,), per_element=False, predicted=predicted, rows=rows)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss, 12)


def softmax_loss(logits: Tensor, target: Tensor, weight: Optional[Tensor], mean: bool,
                 reduce: bool, inplace: bool, ignore_index: int, label_smoothing: float, z_loss: float,
                 softcap: Optional[float], gamma: Optional[float], out_dtype: torch.dtype,
                 divisor: Optional[Tensor] = None) -> Tensor:
    """Runs :class:`SoftmaxLoss` on (N, V) logits, or (N, C, D) ones whose C classes are strided in
    memory (see ``cross_entropy_fwd``); returns the loss as ``out_dtype``, one a row ((N,) or (N, D)),
    summed when ``reduce``, and divided by the mean's denominators (computed on the device) when
    ``mean``, or by ``divisor`` (one fp32 value on the logits' device, which does not require grad)
    when given: each row's loss and gradient, inside the kernel."""
    (logits,) = _evaluated(logits)
    inplace = inplace and logits.requires_grad  # (refused logits: functional._check_inplace)
    loss = SoftmaxLoss.apply(logits, target, weight, divisor, mean, reduce, inplace, ignore_index,
                             label_smoothing, z_loss, softcap, gamma, out_dtype)
    if inplace and not torch.compiler.is_compiling():
        _Overwritten.apply(logits)
    return loss


class _Overwritten(torch.autograd.Function):
    """Marks logits that an in-place loss overwrote with their gradient as modified in place.

    The loss's own node took its edge to the logits' producer before this runs, so its gradient
    flows as usual. Any later use of the logits (or of their base, for a view) hangs off this node
    instead, and a gradient reaching it raises: those uses read the gradient, not the logits. (One
    Function cannot both return the loss and mark a view dirty, hence a second one.) Eager mode
    only: torch.compile traces this backward even where no gradient reaches it.
    """

    @staticmethod
    def forward(ctx, logits):
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "inplace_backward=True overwrote the logits with their gradient, and they were used again "
            "after the loss: those uses read the gradient. Compute the loss from the logits last, or "
            "set inplace_backward=False"
        )


class Huber(torch.autograd.Function):
    """Huber, SmoothL1 and L1: one elementwise kernel, gradients for input and target."""

    @staticmethod
    def forward(ctx, input, target, weight, divisor, beta, mul, reduction, out_dtype):
        reduce, (grad_input, grad_target) = reduction != "none", ctx.needs_input_grad[:2]
        predicted = _predicted(input, grad_input or grad_target, reduce)
        loss, g_in, g_t = _huber_fwd(input, target, weight, divisor, beta, mul, reduction == "mean", reduce,
                                     grad_input, grad_target, out_dtype, predicted)
        _save(ctx, HUBER, (g_in, g_t), per_element=not reduce, predicted=predicted)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss, 6)


def huber(input: Tensor, target: Tensor, weight: Optional[Tensor], beta: float, mul: float,
          reduction: str, out_dtype: torch.dtype, divisor: Optional[Tensor] = None) -> Tensor:
    """``mul * smooth_l1(input - target; beta)``, times ``weight``, reduced, as ``out_dtype``, and
    divided by ``divisor`` (one fp32 value on the input's device) when given."""
    input, target = _evaluated(input.contiguous(), target.contiguous())
    weight = weight.contiguous() if weight is not None else None
    return Huber.apply(input, target, weight, divisor, beta, mul, reduction, out_dtype)


class SigmoidFocal(torch.autograd.Function):
    """torchvision's sigmoid focal loss: one elementwise kernel, gradient for the inputs."""

    @staticmethod
    def forward(ctx, inputs, targets, divisor, alpha, gamma, reduction, out_dtype):
        reduce, grad_input = reduction != "none", ctx.needs_input_grad[0]
        # Predicted for fp16 only, which needs its capped factor (see _PREDICTIONS). This kernel is
        # bound by its arithmetic in 16 bits, and the prediction's multiplication adds 1.5 of its
        # 47.5 instructions per element (bf16, sm_90), while its usual grad_output, 1 / the number of
        # positive anchors of a summed loss, is no power of two: a prediction would seldom pay (a
        # ``divisor`` folds that factor into the kernel instead).
        predicted = _predicted(inputs, grad_input and inputs.dtype == torch.float16, reduce)
        loss, g_in = _sigmoid_focal_fwd(inputs, targets, divisor, alpha, gamma, reduction == "mean", reduce,
                                        grad_input, out_dtype, predicted)
        _save(ctx, SIGMOID_FOCAL, (g_in,), per_element=not reduce, predicted=predicted)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss, 6)


def sigmoid_focal(inputs: Tensor, targets: Tensor, alpha: float, gamma: float, reduction: str,
                  out_dtype: torch.dtype, divisor: Optional[Tensor] = None) -> Tensor:
    """torchvision's sigmoid focal loss, as ``out_dtype``, divided by ``divisor`` (one fp32 value on the
    inputs' device) when given."""
    inputs, targets = _evaluated(inputs.contiguous(), targets.contiguous())
    return SigmoidFocal.apply(inputs, targets, divisor, alpha, gamma, reduction, out_dtype)
