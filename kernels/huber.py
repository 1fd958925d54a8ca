"""Huber / SmoothL1 / L1 loss and gradients in one elementwise pass.

With d = input - target (in fp32):
    smoothl1(d; beta) = 0.5 * d^2 / beta   if |d| < beta
                        |d| - 0.5 * beta   otherwise          (beta = 0: |d|, i.e. L1)
    d smoothl1 / d input = d / beta if |d| < beta else sign(d)   (sign(0) = 0)
and Huber(d; delta) = delta * smoothl1(d; beta=delta), so one kernel serves all three losses through
a loss multiplier ``mul``. Loss and gradients are multiplied by ``mul``, the optional per-element
weight and ``scale`` (1/numel for a mean), so the backward only has to apply grad_output; a reduced
loss's gradients also by a prediction of that grad_output (``common.predicted_factor``), which
leaves the backward nothing to do when it is right.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    ELEMENTWISE_BLOCK,
    FP_FUSION,
    cast_to,
    check_prediction,
    elementwise_loss_output,
    interpreting,
    inverse_of_parts,
    launch,
    launch_divisor,
    load_block_pair,
    num_warps_for,
    predicted_factor,
    reduce_partials,
    store_loss,
)

# Elements per program. 16-bit inputs take twice as many as fp32 (the same bytes per program): on
# an H100, kernel alone, 8192 reached 94.0-95.8% of the floor in four runs against 92.7-94.3% at
# 4096, while fp32 is best at 4096 (bench/NOTES.md).
BLOCK = ELEMENTWISE_BLOCK
BLOCK_16BIT = 2 * ELEMENTWISE_BLOCK
FLT_MAX = torch.finfo(torch.float32).max
# An fp16 gradient of a reduced loss is written "unscaled" while its grad_output is unknown (see
# common.predicted_factor): as the gradient of the summed loss, torch's (Huber: clamp(d, -delta,
# delta) times the weight; SmoothL1 and L1: at most 1 times the weight), and divided only by what
# keeps it inside fp16, its bound over FP16_UNSCALED_MAX: min(mul, FP16_MAX_DIFF) (two fp16 values
# differ by less than 2^17), times the weights' largest magnitude, which the launcher reads on the
# device (one more pass over the weights, no sync). Divided by delta, as it was, a Huber gradient
# with a large delta lost its small entries to fp16's subnormals before the backward multiplied
# them back (delta 2^20: 0.0244 -> 0); so did a weighted one divided for the largest weight once
# assumed, 4096 (by min(mul, 2^17) / 16: delta 2^20, weights near 1, values ~1e-3 gave 7 of 38
# entries 0, the error 80x torch's), and larger weights overflowed (delta 16, weights 8192: inf
# where torch's is 16384). A NaN or infinite weight still takes that assumption (the kernel's
# 2048: 2^15 / 16).
FP16_MAX_DIFF = 2.0**17
FP16_UNSCALED_MAX = 2.0**15


def block_for(dtype: torch.dtype) -> int:
    """Elements per program for inputs of ``dtype``."""
    return BLOCK_16BIT if dtype.itemsize == 2 else BLOCK


@triton.jit
def _huber_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    out_ptr,  # elementwise loss (loss_dtype), or when REDUCE one fp32 partial sum per program
    gx_ptr,
    gy_ptr,
    n,
    beta,  # fp32 threshold; unused when L1
    inv_beta,  # 1 / beta, rounded once on the host (unused when L1)
    c,  # mul * scale, folded on the host
    cap_c,  # PREDICT: fp16 takes the prediction only up to 1 / cap_c (its "unscaled" gradient: huber_fwd)
    w_bound,  # WMAX: cap_c is multiplied by max(1, w_bound * the weights' largest magnitude)
    prediction_ptr,  # PREDICT: fp32, the gradients' extra factor (see common.predicted_factor)
    predicted_ptr,  # PREDICT: fp32, where program 0 copies the factor used, for the backward
    wmax_ptr,  # WMAX: the weights' largest magnitude (0-dim)
    div_ptr,  # DIVIDE: fp32, what loss and gradients are divided by (a summed loss's divisor)
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    L1: tl.constexpr,
    INF_DELTA: tl.constexpr,  # Huber's delta = inf: the linear side's slope is inf (see huber_fwd)
    HAS_WEIGHT: tl.constexpr,
    REDUCE: tl.constexpr,
    WRITE_GRAD_INPUT: tl.constexpr,
    WRITE_GRAD_TARGET: tl.constexpr,
    PREDICT: tl.constexpr,  # the gradients are multiplied by *prediction_ptr (the loss is not)
    WMAX: tl.constexpr,  # fp16 with a weight: its unscaled gradient bounded by the weights' largest magnitude
    DIVIDE: tl.constexpr,
):
    # Bytes per element (e = element size): reads 2e (input, target) + e with a weight; writes e for
    # the unreduced loss (4 bytes per BLOCK when reduced) + e per gradient requested. The usual
    # training step (reduced, grad_input only) reads 2n and writes n elements.
    if DIVIDE:  # one more factor of c, in every program
        inv_d = inverse_of_parts(div_ptr, 1, 1)
        c = c * inv_d
        cap_c = cap_c * inv_d
    cg = c  # the gradients' factor
    if PREDICT:  # times the prediction (the loss's is not)
        cap = cap_c
        if WMAX:
            # a NaN or infinite weight (whose own gradient is NaN or inf) falls back to weights up
            # to 4096 (see FP16_UNSCALED_MAX)
            wm = tl.load(wmax_ptr).to(tl.float32)
            cap = cap * tl.maximum(w_bound * tl.where(wm < float("inf"), wm, 2048.0), 1.0)
        cg = c * predicted_factor(prediction_ptr, predicted_ptr, cap, tl.program_id(0) == 0, gx_ptr)
    offs, mask, x, y = load_block_pair(x_ptr, y_ptr, n, BLOCK)
    d = x - y
    ad = tl.abs(d)
    # The linear side's gradient before c: sign(d), 0 where d is 0 (times inf for INF_DELTA). Where d
    # is NaN: 0 for L1, whose gradient is torch's sign(d); NaN for Huber and SmoothL1, whose linear
    # branch a NaN takes, as torch's gradient has it.
    if INF_DELTA:
        slope = float("inf")
    else:
        slope = 1.0
    sign = tl.where(d > 0, slope, tl.where(d < 0, -slope, 0.0 if L1 else d))
    if L1:
        loss = ad
        grad = sign
    else:
        # Torch's expressions, with the division by beta a multiplication by its reciprocal: at most
        # one more rounding (an ulp), where an IEEE division per element (tl.math.div_rn) would cost
        # ~20 instructions and make the kernel compute-bound in 16-bit. |d| == beta takes the linear
        # branch; both branches agree there: 0.5 * beta, gradient +-1.
        quad = ad < beta
        loss = tl.where(quad, (0.5 * ad * ad) * inv_beta, ad - 0.5 * beta)
        grad = tl.where(quad, d * inv_beta, sign)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        cw = c * w
        cg = cg * w  # without PREDICT the same product as cw; with it, one more per element
    else:
        cw = c
    loss = loss * cw
    store_loss(out_ptr, offs, mask, loss, REDUCE, INTERPRET)
    if WRITE_GRAD_INPUT or WRITE_GRAD_TARGET:
        g = grad * cg
        if WRITE_GRAD_INPUT:
            tl.store(gx_ptr + offs, cast_to(g, gx_ptr.dtype.element_ty, INTERPRET), mask=mask)
        if WRITE_GRAD_TARGET:
            tl.store(gy_ptr + offs, cast_to(-g, gy_ptr.dtype.element_ty, INTERPRET), mask=mask)


def huber_fwd(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    *,
    beta: float,
    mul: float,
    scale: float,
    reduce: bool,
    grad_input: Tensor | None,
    grad_target: Tensor | None,
    loss_dtype: torch.dtype | None = None,
    prediction: Tensor | None = None,
    predicted: Tensor | None = None,
    divisor: Tensor | None = None,
) -> Tensor:
    """Loss (and optionally gradients) of ``mul * weight * scale * smoothl1(input - target; beta)``,
    divided by ``divisor`` (one value on the device; see ``common.launch_divisor``) when given.

    input, target (and weight, grad_input, grad_target when given): contiguous, same number of
    elements, on one device; input/target fp32, bf16 or fp16. beta = 0 is pure L1. Huber(delta) is
    beta=delta, mul=delta; SmoothL1(beta) is beta, mul=1.

    Returns the elementwise loss (input's shape; ``loss_dtype``, by default input's dtype) when
    ``reduce`` is False, else a 0-dim tensor (``loss_dtype``, by default fp32) holding the sum of the
    scaled losses, summed in fp32 in a fixed order (one partial per program, then ``reduce_partials``).
    grad_input / grad_target, when given, are overwritten with d(loss)/d(input) * scale and its
    negation (for reduce=False this is the gradient of the summed loss, i.e. grad_output = 1
    everywhere).

    prediction, predicted (both or neither; ``reduce`` only, with a gradient): one fp32 value each.
    The gradients are written multiplied by ``prediction`` as well, a power of two (the backward's
    grad_output foreseen: ``common.scale_grad_``), which is copied to ``predicted`` for the
    backward. fp16 gradients are multiplied by at most their "unscaled" factor instead (see
    FP16_UNSCALED_MAX: no overflow), and ``predicted`` holds the factor used.
    """
    block = block_for(input.dtype)
    beta, mul, scale = float(beta), float(mul), float(scale)
    check_prediction("huber_fwd", prediction, predicted, reduce, (grad_input, grad_target))
    divisor = launch_divisor("huber_fwd", divisor)
    # The kernel takes them in fp32, as torch computes: a delta past fp32's largest is inf there.
    beta, mul = (math.inf if v > FLT_MAX else v for v in (beta, mul))
    if 0.0 < beta < 1.0 / FLT_MAX:
        # 1 / beta would be inf, and 0.5 d^2 * inf NaN at d = 0: L1 instead, which differs only where
        # |d| < beta, a subnormal difference (torch: 0.5 d^2 / beta and d / beta there).
        beta = 0.0
    if math.isinf(beta) and mul == beta:
        # Huber's delta = inf: all quadratic (0.5 d^2); mul * scale = inf would turn 0.5 d^2 / beta
        # * mul into 0 * inf. The linear side, which that factor also scales, is taken only by an
        # infinite d, whose loss is NaN (inf - inf) and gradient +-inf (torch's delta * scale): as
        # torch's, with INF_DELTA.
        inv_beta, c, inf_delta = 1.0, scale, True
    else:
        inv_beta, c, inf_delta = 1.0 / beta if beta else 0.0, mul * scale, False
    # fp16's "unscaled" gradient (PREDICT): the summed loss's, divided only as fp16 needs it (see above)
    bound = min(mul, FP16_MAX_DIFF)
    use_wmax = weight is not None and prediction is not None and input.dtype == torch.float16
    cap_c = scale * max(1.0, bound / FP16_UNSCALED_MAX) if weight is None else scale
    w_bound = bound / FP16_UNSCALED_MAX if use_wmax else 0.0
    n, n_programs, out = elementwise_loss_output(
        "huber_fwd", {"input": input, "target": target, "weight": weight, "grad_input": grad_input,
                      "grad_target": grad_target}, reduce, loss_dtype, block)
    if n > 0:
        # the weights' largest magnitude, on the device (NaN if any weight is)
        wmax = torch.linalg.vector_norm(weight, float("inf")) if use_wmax else None
        launch(
            _huber_kernel,
            n_programs,
            input,
            target,
            weight if weight is not None else input,  # placeholders are never touched
            out,
            grad_input if grad_input is not None else input,
            grad_target if grad_target is not None else input,
            n,
            beta,
            inv_beta,
            c,
            cap_c,
            w_bound,
            prediction,  # None without PREDICT
            predicted,
            wmax,  # None without WMAX
            divisor,  # None without DIVIDE
            BLOCK=block,
            L1=beta == 0.0,
            INF_DELTA=inf_delta,
            HAS_WEIGHT=weight is not None,
            REDUCE=bool(reduce),
            WRITE_GRAD_INPUT=grad_input is not None,
            INTERPRET=interpreting(),
            WRITE_GRAD_TARGET=grad_target is not None,
            PREDICT=prediction is not None,
            WMAX=use_wmax,
            DIVIDE=divisor is not None,
            num_warps=num_warps_for(block),
            enable_fp_fusion=FP_FUSION,
        )
    return reduce_partials(out, loss_dtype or torch.float32) if reduce else out
