"""Fused cross-entropy / softmax focal loss: one kernel computes each row's loss and its gradient.

One program per row, two sweeps over the row in BLOCK-sized chunks:
  sweep 1  online max m and sum-exp 1 + t (and, when needed, the sums for label smoothing or
           probability targets), giving lse = m + log1p(t) and the row's loss;
  sweep 2  p = exp(x - m) / (1 + t) and the gradient, written straight to `grad` (skipped without grad).
A row with V <= BLOCK is read once and stays in registers for both sweeps.

Bytes per row (V values of `size` bytes): forward only reads V once. With the gradient, V <= BLOCK
reads V once and writes V once; longer rows read V twice (the second read mostly hits L2, thanks to
the evict_last / evict_first hints) and write V once. In all: reads 1-2 x N*V, writes N*V, plus
N targets (or 1-2 x N*V for probability targets) and N fp32 losses. The class weights (V fp32) are
shared by all rows and stay in L2.

Each row is reduced by one program in a fixed order: no atomics, bitwise deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import cast_to, emulate_rne, expm1, log1p, num_warps_for, row_block, softcap as _softcap

NEG_INF = tl.constexpr(float("-inf"))  # a constexpr: plain globals are not visible in @triton.jit code


@triton.jit
def _load_logits(row_ptr, cols, mask, cap, inv_cap, SOFTCAP: tl.constexpr, POLICY: tl.constexpr):
    """A chunk of logits in fp32, softcapped; padded lanes are -inf (set again after softcap, which
    would map them to -cap)."""
    x = tl.load(row_ptr + cols, mask=mask, other=NEG_INF, eviction_policy=POLICY).to(tl.float32)
    if SOFTCAP:
        x = tl.where(mask, _softcap(x, cap, inv_cap), NEG_INF)
    return x


@triton.jit
def _coef(weight_ptr, target_row, cols, mask, eps, eps_over_v, HAS_WEIGHT: tl.constexpr,
          SMOOTH: tl.constexpr, PROB: tl.constexpr, POLICY: tl.constexpr):
    """a_c, the weight of (lse - x_c) in the smoothing term (w_c) or in the probability-target loss
    (w_c t'_c, with t' = (1 - eps) t + eps / V); 0 on padded lanes."""
    if HAS_WEIGHT:
        a = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        a = tl.where(mask, 1.0, 0.0)
    if PROB:
        t = tl.load(target_row + cols, mask=mask, other=0.0, eviction_policy=POLICY).to(tl.float32)
        if SMOOTH:
            t = (1.0 - eps) * t + eps_over_v
        a = tl.where(mask, a * t, 0.0)
    return a


@triton.jit
def _load_chunk(x_row, t_row, weight_ptr, c, V, v_live, cap, inv_cap, eps, eps_over_v,
                SOFTCAP: tl.constexpr, NEED_A: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                PROB: tl.constexpr, POLICY: tl.constexpr):
    """Columns ``c`` of a row: the logits x (see _load_logits; nothing is read past ``v_live``) and,
    when NEED_A, the coefficients a (see _coef)."""
    x = _load_logits(x_row, c, c < v_live, cap, inv_cap, SOFTCAP, POLICY)
    a = 0.0
    if NEED_A:
        a = _coef(weight_ptr, t_row, c, c < V, eps, eps_over_v, HAS_WEIGHT, SMOOTH, PROB, POLICY)
    return x, a


@triton.jit
def _online_update(x, a, mask, m, t, sa, d, NEED_A: tl.constexpr):
    """Folds one chunk into the running statistics of a row: m = max x, t = sum exp(x - m) - 1,
    sa = sum a, d = sum a (x - ref), where ref = m, or 0 while m is -inf (nothing but -inf so far).

    t leaves out the max lane's exp(0) = 1 (the sum-exp is 1 + t), so lse - m = log1p(t) keeps its
    relative precision when the row is confident (lse - x_y ~ 1e-4 is common and would lose 3 digits
    to 1 + t rounding in fp32). d relative to the running max avoids the cancellation of
    sa * lse - sum a x for large logits."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    ref = tl.where(m_new == NEG_INF, 0.0, m_new)
    e = tl.exp(x - ref)
    # lanes at the max give exactly 1 each (none while m_new is -inf); the others, NaN included, e
    n_max = tl.where(m_new == NEG_INF, 0.0, tl.sum(tl.where(x == m_new, 1.0, 0.0), axis=0))
    rest = tl.sum(tl.where(x == m_new, 0.0, e), axis=0)
    # rescale: alpha = exp(m - m_new) (0 while m is -inf, 1 when the max stays, NaN after a NaN max);
    # a new max turns the old max's 1 into alpha and brings n_max - 1 extra ones.
    alpha = tl.exp(m - ref)
    t = t * alpha + tl.where(m_new > m, alpha + (n_max - 1.0), n_max) + rest
    if NEED_A:
        ref_old = tl.where(m == NEG_INF, 0.0, m)
        d = d + sa * (ref_old - ref) + tl.sum(tl.where(mask, a * (x - ref), 0.0), axis=0)
        sa = sa + tl.sum(a, axis=0)
    return m_new, t, sa, d


@triton.jit
def _row_grad(x, a, cols, y, ref, inv_s, K, q, A, B, live, fill, cap_inv,
              PROB: tl.constexpr, REST: tl.constexpr, SOFTCAP: tl.constexpr):
    """d(loss)/d(logits) for one chunk: K (p_c - delta_cy) + A p_c - B a_c, chained through softcap.
    The target lane takes q = p_y - 1 computed as expm1(log p_y) in fp32."""
    p = tl.exp(x - ref) * inv_s
    if PROB:
        g = A * p - B * a
    else:
        g = K * tl.where(cols == y, q, p)
        if REST:
            g += A * p - B * a
    if SOFTCAP:
        th = x * cap_inv  # tanh(raw / cap); d(cap tanh(raw / cap))/d raw = 1 - tanh^2
        g = g * (1.0 - th * th)
    return tl.where(live, g, fill)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    target_stride,
    weight_ptr,
    scales_ptr,
    grad_ptr,
    grad_stride,
    loss_ptr,
    V,
    ignore_index,
    eps,
    z_coef,
    cap,
    inv_cap,
    gamma,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    ZLOSS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PROB: tl.constexpr,
    FOCAL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    NEED_A: tl.constexpr,  # PROB or SMOOTH: the sums sa, d and the per-class a_c are needed
    REST: tl.constexpr,  # PROB or SMOOTH or ZLOSS: the gradient has A p_c - B a_c terms
    EMULATE_RNE: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    t_row = target_ptr + row * target_stride
    ce_scale = tl.load(scales_ptr)
    z_scale = tl.load(scales_ptr + 1)
    eps_over_v = eps / V

    # ---- the row's target --------------------------------------------------------------------------
    if PROB:
        live = row >= 0  # every row counts
        ignored = row < 0
        y = -1
        x_y = 0.0
        w_y = 1.0
    else:
        y = tl.load(target_ptr + row).to(tl.int64)
        ignored = y == ignore_index
        in_range = (y >= 0) & (y < V)
        live = in_range & (y != ignore_index)  # ignored and out-of-range rows read no logits
        y = tl.where(in_range, y, 0)  # never address out of bounds
        x_y = tl.load(x_row + y, mask=live, other=0.0).to(tl.float32)
        if SOFTCAP:
            x_y = _softcap(x_y, cap, inv_cap)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y, mask=live, other=0.0).to(tl.float32)
        else:
            w_y = 1.0

    # ---- sweep 1: online max / sum-exp (+ smoothing / probability-target sums) ----------------------
    cols = tl.arange(0, BLOCK)
    v_live = tl.where(live, V, 0)  # logits are read only below this column (0 for a dead row)
    m = tl.full([], NEG_INF, tl.float32)
    t = tl.zeros([], tl.float32)
    sa = tl.zeros([], tl.float32)
    d = tl.zeros([], tl.float32)
    if SINGLE:
        # The whole row fits one chunk: read it once and keep x (and a) in registers for sweep 2.
        mask = cols < V
        x, a = _load_chunk(x_row, t_row, weight_ptr, cols, V, v_live, cap, inv_cap, eps, eps_over_v,
                           SOFTCAP, NEED_A, HAS_WEIGHT, SMOOTH, PROB, "evict_first")
        m, t, sa, d = _online_update(x, a, mask, m, t, sa, d, NEED_A)
    else:
        for start in range(0, V, BLOCK):
            c = start + cols
            xc, ac = _load_chunk(x_row, t_row, weight_ptr, c, V, v_live, cap, inv_cap, eps, eps_over_v,
                                 SOFTCAP, NEED_A, HAS_WEIGHT, SMOOTH, PROB, "evict_last")
            m, t, sa, d = _online_update(xc, ac, c < V, m, t, sa, d, NEED_A)

    # ---- the row's loss ---------------------------------------------------------------------------
    ref = tl.where(m == NEG_INF, 0.0, m)
    log_s = tl.where(m == NEG_INF, NEG_INF, log1p(t))  # lse - ref (-inf for an all -inf row)
    lse = ref + log_s
    K = 0.0  # coefficient of (p_c - delta_cy)
    q = 0.0  # p_y - 1
    A = 0.0  # coefficient of p_c
    B = 0.0  # coefficient of a_c
    if PROB:
        # sum_c a_c (lse - x_c) = sa (lse - ref) - d;  d/dx_c = sa p_c - a_c
        loss = ce_scale * (sa * log_s - d)
        A = ce_scale * sa
        B = ce_scale
    else:
        l = (x_y - ref) - log_s  # log p_y, without the cancellation of lse - x_y
        l = tl.where(l > 0.0, 0.0, l)  # rounding can never make p_y > 1 (NaN passes through)
        q = expm1(l)
        if FOCAL:
            # loss = -w_y (1 - p_y)^gamma l,  grad = w_y f (p - onehot) with
            # f = (1 - p_y)^gamma (1 - gamma p_y l / (1 - p_y)); 1 - p_y = -expm1(l) and
            # l / (1 - p_y) -> -1 as l -> 0, so every gamma >= 0 stays finite when saturated.
            omp = -q
            pw = tl.where(omp > 0.0, tl.exp(gamma * tl.log(omp)), tl.where(gamma == 0.0, 1.0, 0.0))
            p_y = tl.exp(l)
            ratio = tl.where(omp > 0.0, l / omp, -1.0)
            py_ratio = tl.where(p_y == 0.0, 0.0, p_y * ratio)  # p_y l -> 0 as l -> -inf
            f = pw * (1.0 - gamma * py_ratio)
            loss = ce_scale * (w_y * pw * -l)
            K = ce_scale * w_y * f
        else:
            # (1 - eps) w_y (lse - x_y) + eps/V sum_c w_c (lse - x_c)
            ce = (1.0 - eps) * w_y * -l
            K = ce_scale * (1.0 - eps) * w_y
            if SMOOTH:
                ce += eps_over_v * (sa * log_s - d)
                A = ce_scale * eps_over_v * sa
                B = ce_scale * eps_over_v
            loss = ce_scale * ce
    if ZLOSS:
        loss += z_scale * z_coef * lse * lse
        A += z_scale * 2.0 * z_coef * lse
    # ignored rows: 0 * ce_scale (NaN when the mean's scale is 1/0); out-of-range targets: NaN
    nan = float("nan")
    fill = tl.where(ignored, 0.0, nan)
    loss = tl.where(live, loss, tl.where(ignored, 0.0 * ce_scale, nan))
    tl.store(loss_ptr + row, loss)

    # ---- sweep 2: the gradient --------------------------------------------------------------------
    if WRITE_GRAD:
        inv_s = 1.0 / (1.0 + t)
        g_row = grad_ptr + row * grad_stride
        out_ty = grad_ptr.dtype.element_ty
        if SINGLE:
            g = _row_grad(x, a, cols, y, ref, inv_s, K, q, A, B, live, fill, inv_cap, PROB, REST, SOFTCAP)
            tl.store(g_row + cols, cast_to(g, out_ty, EMULATE_RNE), mask=mask)
        else:
            for start in range(0, V, BLOCK):
                c = start + cols
                # In place (grad is the logits): this chunk is read before it is overwritten.
                xc, ac = _load_chunk(x_row, t_row, weight_ptr, c, V, v_live, cap, inv_cap, eps, eps_over_v,
                                     SOFTCAP, NEED_A, HAS_WEIGHT, SMOOTH, PROB, "evict_first")
                g = _row_grad(xc, ac, c, y, ref, inv_s, K, q, A, B, live, fill, inv_cap, PROB, REST, SOFTCAP)
                tl.store(g_row + c, cast_to(g, out_ty, EMULATE_RNE), mask=c < V)


def cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    scales: Tensor,
    grad: Tensor | None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    gamma: float | None = None,
) -> Tensor:
    """Per-row cross-entropy (or softmax focal loss when ``gamma`` is set), and optionally its gradient.

    logits: (N, V) fp32/bf16/fp16 with stride(1) == 1 (any row stride). target: (N,) int64 class
    indices, or (N, V) float probabilities with stride(1) == 1. weight: (V,) fp32 contiguous, or None.
    scales: (2,) fp32 on the device, [ce_scale, z_scale], multiplied into each row's loss and gradient.
    grad: None (forward only), an (N, V) tensor of logits.dtype with stride(1) == 1, or ``logits``
    itself (the gradient overwrites the logits row by row).

    Returns the (N,) fp32 loss: ce_scale * loss_ce + z_scale * z_loss * lse^2 per row. Ignored rows
    give 0 * ce_scale and a zero gradient row; out-of-range targets give NaN (loss and gradient row).
    """
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy_fwd: logits must be 2-D, got {tuple(logits.shape)}")
    n_rows, n_cols = logits.shape

    def unit_class_stride(t: Tensor) -> bool:  # a single class has no class stride to speak of
        return t.stride(1) == 1 or n_cols == 1

    if not unit_class_stride(logits):
        raise ValueError(f"cross_entropy_fwd: logits must have stride(1) == 1, got strides {logits.stride()}")
    prob = target.is_floating_point()
    if prob:
        if target.shape != logits.shape or not unit_class_stride(target):
            raise ValueError("cross_entropy_fwd: probability targets must be (N, V) with stride(1) == 1")
        if gamma is not None:
            raise ValueError("cross_entropy_fwd: focal loss (gamma) takes class-index targets only")
    elif target.shape != (n_rows,) or (n_rows > 1 and target.stride(0) != 1):
        raise ValueError(f"cross_entropy_fwd: class-index target must be a contiguous ({n_rows},) tensor")
    if grad is not None and (grad.shape != logits.shape or not unit_class_stride(grad)):
        raise ValueError("cross_entropy_fwd: grad must be (N, V) with stride(1) == 1")
    if weight is not None and (weight.shape != (n_cols,) or not weight.is_contiguous()):
        raise ValueError(f"cross_entropy_fwd: weight must be a contiguous ({n_cols},) tensor")

    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    block = row_block(n_cols)
    cap = 1.0 if softcap is None else float(softcap)
    _cross_entropy_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        target,
        target.stride(0) if prob else 0,
        weight if weight is not None else scales,
        scales,
        grad if grad is not None else logits,
        grad.stride(0) if grad is not None else 0,
        loss,
        n_cols,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        cap,
        1.0 / cap,
        0.0 if gamma is None else float(gamma),
        HAS_WEIGHT=weight is not None,
        SMOOTH=label_smoothing != 0.0,
        ZLOSS=z_loss != 0.0,
        SOFTCAP=softcap is not None,
        PROB=prob,
        FOCAL=gamma is not None,
        WRITE_GRAD=grad is not None,
        NEED_A=prob or label_smoothing != 0.0,
        REST=prob or label_smoothing != 0.0 or z_loss != 0.0,
        EMULATE_RNE=emulate_rne(),
        BLOCK=block,
        SINGLE=n_cols <= block,
        num_warps=num_warps_for(block),
    )
    return loss
