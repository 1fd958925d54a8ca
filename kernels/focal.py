"""Sigmoid focal loss (torchvision.ops.sigmoid_focal_loss semantics) and its gradient in one
elementwise pass.

With x the logit and t the (possibly soft) target, in fp32:
    p   = sigmoid(x)
    ce  = max(x, 0) - x*t + log1p(exp(-|x|))          (BCE with logits; x*(1-t) where x >= 0)
    q   = 1 - p_t = p*(1 - t) + (1 - p)*t              (1 - p taken as sigmoid(-x): no cancellation)
    a_t = alpha*t + (1 - alpha)*(1 - t)                (1 when alpha < 0)
    loss = a_t * ce * q^gamma
    dloss/dx = a_t * q^gamma * [(p - t) - gamma * ce * (2t - 1) * p(1 - p) / q]
The last form follows from dce/dx = p - t and dq/dx = -p(1 - p)(2t - 1). For a small integer gamma
(the usual 2) q^(gamma - 1) and q^gamma are products of q, exact to a rounding and without a
division; gamma = 0 leaves BCE's gradient a_t (p - t). Any other gamma takes q^gamma through
exp2(gamma log2 q) and folds q^(gamma - 1) into q^gamma / q, where p(1 - p) / q <= 1 for t in
[0, 1]. Either way the gradient is finite for every gamma >= 0 even on saturated logits (q = 0
gives 0 there, the limit of the exact gradient). A target outside [0, 1] can make q negative;
q^gamma is taken as 0 there for gamma > 0 (loss and gradient 0), as the reference takes it
(torchvision's pow gives a sign or NaN there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    ELEMENTWISE_BLOCK,
    FP_FUSION,
    atanh_log,
    cast_to,
    check_prediction,
    elementwise_loss_output,
    exp2,
    interpreting,
    inverse_of_parts,
    launch,
    launch_divisor,
    load_block_pair,
    log2,
    log2e,
    num_warps_for,
    predicted_factor,
    rcp,
    reduce_partials,
    store_loss,
)

BLOCK = ELEMENTWISE_BLOCK
# Registers a thread for 16-bit inputs: Triton 3.6 gives the kernel 48 on an H100 (5 programs of 8
# warps an SM); capped at 40 (6 programs, a few spills to local memory) it ran 86.5 -> 88.1% of the
# floor, the same bits (bench/results/ab_sigmoid_focal_maxnreg.txt). fp32's 40 ran slower (94.4 ->
# 87.0%), and 32 slower in both, so fp32 keeps the compiler's choice.
MAXNREG_16BIT = 40


def maxnreg(element_size: int) -> int | None:
    """The launch's register cap for inputs of ``element_size`` bytes (None: the compiler's choice)."""
    return MAXNREG_16BIT if element_size == 2 else None

# gamma in {0, 1, ..., MAX_INT_GAMMA} is computed by repeated multiplication (exact, no log/exp);
# other values through exp2(gamma * log2(q)).
MAX_INT_GAMMA = 4


@triton.jit
def _flt_min():
    """The smallest normal fp32 (a function: see common.log2e)."""
    return 1.1754943508222875e-38


@triton.jit
def _sigmoid_focal_kernel(
    x_ptr,
    t_ptr,
    out_ptr,  # elementwise loss (loss_dtype), or when REDUCE one fp32 partial sum per program
    gx_ptr,
    n,
    k1,  # scale * a_t = k1 * t + k0: k1 = scale (2 alpha - 1), k0 = scale (1 - alpha); without
    k0,  # alpha (alpha < 0) k1 = 0 and k0 = scale
    gamma,
    scale,  # PREDICT: the mean's scale (1/numel, else 1), to which fp16 caps the prediction
    prediction_ptr,  # PREDICT: fp32, the gradient's extra factor (see common.predicted_factor)
    predicted_ptr,  # PREDICT: fp32, where program 0 copies the factor used, for the backward
    div_ptr,  # DIVIDE: fp32, what loss and gradient are divided by (a summed loss's divisor)
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    GAMMA_INT: tl.constexpr,  # gamma when it is a small integer, else -1
    REDUCE: tl.constexpr,
    WRITE_GRAD_INPUT: tl.constexpr,
    PREDICT: tl.constexpr,  # the gradient is multiplied by *prediction_ptr (the loss is not)
    DIVIDE: tl.constexpr,
):
    # Bytes per element: reads the logit and the target; writes the unreduced loss (4 bytes per
    # BLOCK when reduced) and the gradient. The usual training step (reduced, with gradient) reads
    # 2n and writes n elements.
    if DIVIDE:  # one more factor of scale * a_t, in every program
        inv_d = inverse_of_parts(div_ptr, 1, 1)
        k1 = k1 * inv_d
        k0 = k0 * inv_d
        scale = scale * inv_d
    if PREDICT:  # the gradient's extra factor (the loss's is 1): one more multiplication per element
        pg = predicted_factor(prediction_ptr, predicted_ptr, scale, tl.program_id(0) == 0, gx_ptr)
    offs, mask, x, t = load_block_pair(x_ptr, t_ptr, n, BLOCK)
    two_gamma = 2.0 * gamma

    # The MUFU forms of exp2 / 1/x (common.py): this kernel does ~47 instructions per element (gamma
    # 2, bf16, reduced, with the gradient; bench.sass), so at 16-bit it is bound by them as much as by
    # its bytes.
    e = exp2(tl.abs(x) * -log2e(), INTERPRET)  # exp(-|x|) in [0, 1]; 0 for |x| > ~87
    r = rcp(1.0 + e, INTERPRET)
    pos = x >= 0
    er = e * r
    p = tl.where(pos, r, er)  # sigmoid(x)
    omp = tl.where(pos, er, r)  # 1 - p = sigmoid(-x)
    # max(x, 0) - x t as x (1 - t) or -x t: no cancellation where x > 0 and t is near 1 (it lost ulp(x))
    ce = x * tl.where(pos, 1.0 - t, -t) + atanh_log(e * rcp(2.0 + e, INTERPRET))  # log1p(e), e <= 1: no log
    q = p * (1.0 - t) + omp * t

    k = k1 * t + k0  # scale * a_t
    if GAMMA_INT > 0:
        # q^gamma = q^(gamma - 1) q by multiplication, and the gradient takes q^(gamma - 1) as it is:
        # no 1/q (a reciprocal, and q's clamp, per element). q < 0 (a target outside [0, 1]) counts
        # as 0: loss and gradient 0 there, as below.
        q_pos = tl.maximum(q, 0.0)
        if GAMMA_INT == 1:
            qg1 = tl.where(q > 0, 1.0, 0.0)  # the slope of max(q, 0)
        else:
            qg1 = q_pos
            for _ in tl.static_range(GAMMA_INT - 2):
                qg1 = qg1 * q_pos
        kq1 = k * qg1
        kq = kq1 * q_pos
    elif GAMMA_INT == 0:
        kq = k  # q^0 = 1, including 0^0
    else:
        # gamma > 0 here, so q == 0 gives 0. Keeps log2 and 1/q finite where q is 0 (or subnormal).
        # q < 0 only for targets outside [0, 1], where the focal factor is 0 (the reference's): its
        # magnitude keeps 1/q from blowing up there.
        q_safe = tl.maximum(tl.abs(q), _flt_min())
        kq = k * tl.where(q > 0, exp2(gamma * log2(q_safe, INTERPRET), INTERPRET), 0.0)
    loss = ce * kq
    store_loss(out_ptr, offs, mask, loss, REDUCE, INTERPRET)

    if WRITE_GRAD_INPUT:
        p_minus_t = p * (1.0 - t) - omp * t  # = p - t, exact for hard labels
        if GAMMA_INT == 0:
            g = kq * p_minus_t
        else:
            # d(ce)/dx = p - t and dq/dx = -p (1 - p) (2t - 1): the second term is gamma (2t - 1) ce
            # p (1 - p) q^(gamma - 1), its gamma (2t - 1) in one FMA.
            if GAMMA_INT > 0:
                g = kq * p_minus_t - (t * two_gamma - gamma) * (ce * (p * omp) * kq1)
            else:
                # q^(gamma - 1) as q^gamma / q: p(1-p)/q is in [0, 1] for t in [0, 1]. Where q <= 0
                # it does not matter: kq = 0 there.
                h = p * omp * rcp(q_safe, INTERPRET)
                g = kq * (p_minus_t - (t * two_gamma - gamma) * (ce * h))
        if PREDICT:
            g = g * pg
        tl.store(gx_ptr + offs, cast_to(g, gx_ptr.dtype.element_ty, INTERPRET), mask=mask)


def sigmoid_focal_fwd(
    inputs: Tensor,
    targets: Tensor,
    *,
    alpha: float,
    gamma: float,
    scale: float,
    reduce: bool,
    grad_input: Tensor | None,
    loss_dtype: torch.dtype | None = None,
    prediction: Tensor | None = None,
    predicted: Tensor | None = None,
    divisor: Tensor | None = None,
) -> Tensor:
    """Sigmoid focal loss ``scale * a_t * ce * (1 - p_t)^gamma`` and optionally its gradient, both
    divided by ``divisor`` (one value on the device; see ``common.launch_divisor``) when given.

    inputs, targets (and grad_input when given): contiguous, same number of elements, one device;
    inputs fp32, bf16 or fp16; targets any float dtype, soft labels in [0, 1] allowed. alpha < 0
    disables the alpha weighting; gamma >= 0.

    Returns the elementwise loss (inputs' shape; ``loss_dtype``, by default inputs' dtype) when
    ``reduce`` is False, else a 0-dim tensor (``loss_dtype``, by default fp32) holding the sum of the
    scaled losses, summed in fp32 in a fixed order (one partial per program, then ``reduce_partials``).
    grad_input, when given, is overwritten with d(loss)/d(inputs) * scale in its own dtype (for
    reduce=False: the gradient of the summed loss). ``prediction`` and ``predicted``: as in
    ``huber.huber_fwd``.
    """
    n, n_programs, out = elementwise_loss_output(
        "sigmoid_focal_fwd", {"inputs": inputs, "targets": targets, "grad_input": grad_input}, reduce,
        loss_dtype, BLOCK)
    gamma = float(gamma)
    gamma_int = int(gamma) if gamma.is_integer() and 0 <= gamma <= MAX_INT_GAMMA else -1
    alpha, scale = float(alpha), float(scale)
    check_prediction("sigmoid_focal_fwd", prediction, predicted, reduce, (grad_input,))
    divisor = launch_divisor("sigmoid_focal_fwd", divisor)
    use_alpha = alpha >= 0
    if n > 0:
        launch(
            _sigmoid_focal_kernel,
            n_programs,
            inputs,
            targets,
            out,
            grad_input if grad_input is not None else inputs,  # placeholder, never touched
            n,
            (2.0 * alpha - 1.0) * scale if use_alpha else 0.0,
            (1.0 - alpha) * scale if use_alpha else scale,
            gamma,
            scale,
            prediction,  # None without PREDICT
            predicted,
            divisor,  # None without DIVIDE
            BLOCK=BLOCK,
            GAMMA_INT=gamma_int,
            REDUCE=bool(reduce),
            WRITE_GRAD_INPUT=grad_input is not None,
            PREDICT=prediction is not None,
            DIVIDE=divisor is not None,
            INTERPRET=interpreting(),
            num_warps=num_warps_for(BLOCK),
            maxnreg=maxnreg(inputs.element_size()),
            enable_fp_fusion=FP_FUSION,
        )
    return reduce_partials(out, loss_dtype or torch.float32) if reduce else out
