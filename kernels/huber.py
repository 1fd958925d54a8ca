"""Huber / SmoothL1 / L1 loss and gradients in one elementwise pass.

With d = input - target (in fp32):
    smoothl1(d; beta) = 0.5 * d^2 / beta   if |d| < beta
                        |d| - 0.5 * beta   otherwise          (beta = 0: |d|, i.e. L1)
    d smoothl1 / d input = d / beta if |d| < beta else sign(d)   (sign(0) = 0)
and Huber(d; delta) = delta * smoothl1(d; beta=delta), so one kernel serves all three losses through
a loss multiplier ``mul``. Loss and gradients are multiplied by ``mul``, the optional per-element
weight and ``scale`` (1/numel for a mean), so the backward only has to apply grad_output; or, with
``unscaled_grad``, the gradients are not multiplied by ``scale`` (the backward applies it: fp16
gradients, see fastloss/autograd.py) and the reduced loss is, once per program.
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
    elementwise_loss_output,
    interpreting,
    launch,
    load_block_pair,
    num_warps_for,
    reduce_partials,
    split_scale,
    store_loss,
)

# Elements per program. 16-bit inputs take twice as many as fp32 (the same bytes per program): on
# an H100, kernel alone, 8192 reached 94.0-95.8% of the floor in four runs against 92.7-94.3% at
# 4096, while fp32 is best at 4096 (bench/NOTES.md).
BLOCK = ELEMENTWISE_BLOCK
BLOCK_16BIT = 2 * ELEMENTWISE_BLOCK
FLT_MAX = torch.finfo(torch.float32).max


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
    c,  # mul * scale, folded on the host (mul alone, with unscaled_grad)
    partial_scale,  # REDUCE: each partial sum's factor (scale with unscaled_grad, else 1)
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    L1: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    REDUCE: tl.constexpr,
    WRITE_GRAD_INPUT: tl.constexpr,
    WRITE_GRAD_TARGET: tl.constexpr,
):
    # Bytes per element (e = element size): reads 2e (input, target) + e with a weight; writes e for
    # the unreduced loss (4 bytes per BLOCK when reduced) + e per gradient requested. The usual
    # training step (reduced, grad_input only) reads 2n and writes n elements.
    offs, mask, x, y = load_block_pair(x_ptr, y_ptr, n, BLOCK)
    d = x - y
    ad = tl.abs(d)
    # sign(d), 0 where d is 0. Where d is NaN: 0 for L1, whose gradient is torch's sign(d); NaN for
    # Huber and SmoothL1, whose linear branch a NaN takes, as torch's gradient has it.
    sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0 if L1 else d))
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
        w = tl.load(w_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        cw = c * w.to(tl.float32)
    else:
        cw = c
    loss = loss * cw
    store_loss(out_ptr, offs, mask, loss, partial_scale, REDUCE, INTERPRET)
    if WRITE_GRAD_INPUT or WRITE_GRAD_TARGET:
        g = grad * cw
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
    unscaled_grad: bool = False,
) -> Tensor:
    """Loss (and optionally gradients) of ``mul * weight * scale * smoothl1(input - target; beta)``.

    input, target (and weight, grad_input, grad_target when given): contiguous, same number of
    elements, on one device; input/target fp32, bf16 or fp16. beta = 0 is pure L1. Huber(delta) is
    beta=delta, mul=delta; SmoothL1(beta) is beta, mul=1.

    Returns the elementwise loss (input's shape; ``loss_dtype``, by default input's dtype) when
    ``reduce`` is False, else a 0-dim tensor (``loss_dtype``, by default fp32) holding the sum of the
    scaled losses, summed in fp32 in a fixed order (one partial per program, then ``reduce_partials``).
    grad_input / grad_target, when given, are overwritten with d(loss)/d(input) * scale and its
    negation (for reduce=False this is the gradient of the summed loss, i.e. grad_output = 1
    everywhere). With ``unscaled_grad`` (``reduce`` only) the gradients leave ``scale`` out.
    """
    block = block_for(input.dtype)
    beta, mul, scale = float(beta), float(mul), float(scale)
    grad_scale, partial_scale = split_scale("huber_fwd", scale, reduce, unscaled_grad)
    # The kernel takes them in fp32, as torch computes: a delta past fp32's largest is inf there.
    beta, mul = (math.inf if v > FLT_MAX else v for v in (beta, mul))
    if 0.0 < beta < 1.0 / FLT_MAX:
        # 1 / beta would be inf, and 0.5 d^2 * inf NaN at d = 0: L1 instead, which differs only where
        # |d| < beta, a subnormal difference (torch: 0.5 d^2 / beta and d / beta there).
        beta = 0.0
    if math.isinf(beta) and mul == beta:
        # Huber's delta = inf: all quadratic (0.5 d^2); mul * scale = inf would turn 0.5 d^2 / beta
        # * mul into 0 * inf. The linear side, which that factor also scales, is never taken.
        inv_beta, c = 1.0, grad_scale
    else:
        inv_beta, c = 1.0 / beta if beta else 0.0, mul * grad_scale
    n, n_programs, out = elementwise_loss_output(
        "huber_fwd", {"input": input, "target": target, "weight": weight, "grad_input": grad_input,
                      "grad_target": grad_target}, reduce, loss_dtype, block)
    if n > 0:
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
            partial_scale,
            BLOCK=block,
            L1=beta == 0.0,
            HAS_WEIGHT=weight is not None,
            REDUCE=bool(reduce),
            WRITE_GRAD_INPUT=grad_input is not None,
            INTERPRET=interpreting(),
            WRITE_GRAD_TARGET=grad_target is not None,
            num_warps=num_warps_for(block),
            enable_fp_fusion=FP_FUSION,
        )
    return reduce_partials(out, loss_dtype or torch.float32) if reduce else out
