"""Fused cross-entropy / softmax focal loss: one kernel computes each row's loss and its gradient.

Each row is swept twice in BLOCK-sized chunks:
  sweep 1  per-lane running max m and sum-exp 1 + t (and, when needed, the sums for label smoothing
           or probability targets), reduced once at the end, giving lse = m + log1p(t) and the loss;
  sweep 2  p = exp(x - m) / (1 + t) and the gradient, written straight to `grad` (skipped without grad).
A row (or segment) with no more columns than BLOCK is read once and stays in registers.

SPLIT (long rows with a gradient, on CUDA): SEGMENTS programs share a row, each sweeps its own
segment, publishes its statistics and waits for the row's others, so every segment is read from
HBM once (its second sweep, if any, re-reads it from L2 right away).

Bytes per row (V values of `size` bytes): forward only reads V once; with the gradient, reads V
once from HBM (a second time from L2 for chunked segments) and writes V once, plus the target (or
V probabilities) and one fp32 loss. The class weights (V fp32) are shared by all rows and stay in L2.

A small prologue kernel runs first when needed (``_prologue_kernel``): it computes the mean's
denominators on the device (the counted rows and the sum of their class weights, in at most PARTS
parts that each loss program adds up) and zeroes SPLIT's counters. One Triton launch in place of
the torch ops these took (a compare and a sum, five more with class weights, SPLIT's zeros), each
of which cost host time.

COLUMNS (``_cross_entropy_columns_kernel``): (N, C, d1, ...) logits whose classes are strided in
memory (a segmentation map), and rows too narrow for a program each (a channels_last map's), are
read where they are, one lane a position, the program stepping through the classes; the row's
math above is shared with it (``_target_terms``, ``_row_loss``, ``_grad_coefs``, ``_target_grad``).

Each row's statistics are combined in a fixed order: no atomics on data, bitwise deterministic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    FP_FUSION,
    MAX_ROW_BLOCK,
    cast_to,
    cdiv,
    check_prediction,
    exp2,
    expm1,
    interpreting,
    inverse_of_parts,
    launch,
    launch_divisor,
    launch_with,
    log1p,
    log2e,
    next_power_of_2,
    predicted_factor,
    reduce_partials,
    row_block,
)
from .common import softcap as _softcap

# Long rows with a gradient are split into segments, one program each, which read their segment
# once from memory (see the SPLIT branch of the kernel). Only on CUDA: Triton's interpreter runs
# programs one after another, so a program waiting for another would wait forever (the tests run
# split launches there with their programs in threads: concurrent_programs in
# tests/test_kernels_ce_launcher.py).
SPLIT_MIN_COLS = 16384
# element size -> (columns per segment, chunk, warps): 16-bit logits do best with 8192-column
# segments swept in chunks of 2048 (the second sweep from L2), fp32 with 16384 columns held in
# registers.
SPLIT_COLS = {2: (8192, 2048, 4), 4: (16384, 16384, 8)}
# A row's segments wait for each other, so all of its programs must be able to run at once. One
# program per SM always can (and a waiting program holds its SM until its row is done), so a launch
# gives a row at most as many segments as the GPU has SMs, and at most MAX_SEGMENTS (the tuner found
# no gain beyond); longer rows get longer segments, swept in chunks.
MAX_SEGMENTS = 32
# A 16-bit row cut into this many segments or more runs 2 warps a program, not 4. Measured, not
# explained (bench/NOTES.md, section 19): the tuner on an H100, bf16 N = 8192, at V = 262144 (32
# segments) 79.5-80.9% of the floor with 2 warps against 72.9-77.0% with 4 in three runs, and past
# the cap (N = 4096, V = 524288) 72.7% against 70.4%; at V = 128256 (16 segments) 2 warps were
# 0.6% slower, at V = 32768 slower still. (Not more programs an SM: with 2 warps the compiler gives
# a thread 128 registers, not 56, and an SM holds 8 programs, not 9.)
FEW_WARPS_SEGMENTS = 32
# A program waiting for its row's other segments sleeps this many nanoseconds between two polls
# (PTX nanosleep), leaving the SM's issue slots to the programs that work: kernel alone on an H100, bf16
# V = 128256 86.3 -> 87.6% of the floor, 262144 82.6 -> 83.2%, V = 32768 and fp32 +0.2%; 2000 ns
# slower (bench/NOTES.md, section 20).
SPIN_SLEEP_NS = 512
# A row (not split) of this many chunks or more has its first sweep pipelined: see _default_config.
PIPELINE_MIN_CHUNKS = 4
# A row that fits one chunk (V <= MAX_ROW_BLOCK) runs this many values a thread: 1 warp up to V = 512,
# 2 to 1024, 4 to 2048. Every warp of the program issues the row's own work (its target, the
# reductions, the loss, the gradient's coefficients: ~290 SASS instructions on sm_90), which at 8
# values a thread (the launch before) was ~60% of the kernel: 51 lane-instructions an element at
# V = 1000, where the bf16 floor's pace allows ~39; at 16, 33 (bench/NOTES.md, section 28; not yet
# measured on a GPU).
SINGLE_ROW_VALUES = 16
# Rows of up to ROWS_MAX_BLOCK columns run ROWS_VALUES // BLOCK rows a program of one warp (32 values
# a thread): one warp's program would otherwise issue the row's own work, the same ~265 instructions
# at any V, for 8 values a lane or fewer (bf16 V = 150: ~78 lane-instructions an element, V = 50: ~160,
# where the floor's pace allows ~39), and an SM would hold at most 32 such rows. The rows' reductions
# run across the tile, and their own work one row a lane (ROWS in the kernel; bench/NOTES.md section
# 29; not yet measured on a GPU).
ROWS_MAX_BLOCK = 256
ROWS_VALUES = 1024
# 16-bit logits with a softcap up to this take tanh without its series near 0 (common.softcap): the
# capped logit is then within ~2.4e-7 cap absolutely, here 1.5e-5, 1/32 of fp16's half ulp (1/128
# of bf16's), what the softmax makes a relative error of its probabilities. Larger caps, and fp32,
# take the series, and the target's capped logit from the sweep (CAPTURE_XY in the kernel): bf16,
# V = 256000, sm_90, 100.5 instructions per element against 61.4.
FAST_TANH_MAX_CAP = 64.0

STATS = 8  # floats per segment in the SPLIT statistics buffer (5 used; 32-byte records)
# The mean's denominators are summed in at most PARTS parts, by as many programs of the prologue
# kernel (each takes PART_ROWS rows at a time); every program of the loss kernel adds the parts up.
PARTS = 16
PART_ROWS = 1024
# (The kernel takes STATS and PARTS as constexpr arguments, and its other constants from @triton.jit
# functions: see common.log2e.)


@triton.jit
def _neg_inf():
    """-inf: padded lanes, and masked classes."""
    return float("-inf")


@triton.jit
def _empty():
    """-FLT_MAX: the max of a lane that has seen no value."""
    return -3.4028234663852886e38


@triton.jit
def _coef(w_ptrs, t_ptrs, mask, eps, eps_over_v, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
          PROB: tl.constexpr, POLICY: tl.constexpr):
    """a_c, the weight of (lse - x_c) in the smoothing term (w_c) or in the probability-target loss
    (w_c t'_c, with t' = (1 - eps) t + eps / V); 0 on masked lanes. ``w_ptrs``, ``t_ptrs``: where
    the lanes' class weights and target probabilities are."""
    if HAS_WEIGHT:
        a = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        a = tl.where(mask, 1.0, 0.0)
    if PROB:
        t = tl.load(t_ptrs, mask=mask, other=0.0, eviction_policy=POLICY).to(tl.float32)
        if SMOOTH:
            t = (1.0 - eps) * t + eps_over_v
        a = tl.where(mask, a * t, 0.0)
    return a


@triton.jit
def _load_values(x_ptrs, live, t_ptrs, w_ptrs, mask, cap, inv_cap, eps, eps_over_v, SOFTCAP: tl.constexpr,
                 TANH_SERIES: tl.constexpr, NEED_A: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                 PROB: tl.constexpr, POLICY: tl.constexpr, INTERPRET: tl.constexpr):
    """The logits at ``x_ptrs`` in fp32, softcapped, with the cap's slope d capped / d raw (1.0
    without SOFTCAP; a sweep that drops it never computes it), and, when NEED_A, the coefficients a
    (see _coef) of the lanes in ``mask``. Only ``live`` lanes are read; the others are -inf (set
    again after softcap, which would map them to -cap)."""
    x = tl.load(x_ptrs, mask=live, other=_neg_inf(), eviction_policy=POLICY).to(tl.float32)
    slope = 1.0
    if SOFTCAP:
        x, slope = _softcap(x, cap, inv_cap, TANH_SERIES, INTERPRET)
        x = tl.where(live, x, _neg_inf())
    a = 0.0
    if NEED_A:
        a = _coef(w_ptrs, t_ptrs, mask, eps, eps_over_v, HAS_WEIGHT, SMOOTH, PROB, POLICY)
    return x, a, slope


@triton.jit
def _inside(c, lo, hi, SHIFT: tl.constexpr):
    """Which of the columns ``c`` lie in [lo, hi) (without SHIFT lo is the chunks' first column: only
    ``hi`` is compared)."""
    if SHIFT:
        inside = (c >= lo) & (c < hi)
    else:
        inside = c < hi
    return inside


@triton.jit
def _edges(sh, lo, lo_in, end_in, hi, SHIFT: tl.constexpr):
    """With SHIFT (see the kernel), the columns of a program's edges: those of [lo, hi) before lo_in
    (from sh on) in lanes 0 to SHIFT - 1, and those from end_in on (where the row's whole vectors end)
    in lanes SHIFT to 2 SHIFT - 1: their columns, and which of them are the program's."""
    k = tl.arange(0, 2 * SHIFT)
    cols = tl.where(k < SHIFT, k, end_in + k - SHIFT)
    mine = (((k < SHIFT) & (cols >= tl.maximum(sh, lo)) & (cols < tl.minimum(lo_in, hi)))
            | ((k >= SHIFT) & (cols >= tl.maximum(lo_in, end_in)) & (cols < hi)))
    return cols, mine


@triton.jit
def _load_chunk(x_row, t_row, weight_ptr, c, lo, hi, v_live, cap, inv_cap, eps, eps_over_v,
                SOFTCAP: tl.constexpr, TANH_SERIES: tl.constexpr, NEED_A: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                SMOOTH: tl.constexpr, PROB: tl.constexpr, SHIFT: tl.constexpr, POLICY: tl.constexpr,
                INTERPRET: tl.constexpr):
    """Columns ``c`` of a row, those in [lo, hi) (see _load_values and _inside). Nothing is read at or
    past ``v_live`` (nor, with SHIFT, before ``lo``)."""
    return _load_values(x_row + c, _inside(c, lo, v_live, SHIFT), t_row + c, weight_ptr + c, _inside(c, lo, hi, SHIFT),
                        cap, inv_cap, eps, eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB, POLICY,
                        INTERPRET)


@triton.jit
def _load_class(x_base, x_sc, t_base, t_sc, weight_ptr, c, same, valid, live, cap, inv_cap, eps, eps_over_v,
                SOFTCAP: tl.constexpr, TANH_SERIES: tl.constexpr, NEED_A: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                SMOOTH: tl.constexpr, PROB: tl.constexpr, POLICY: tl.constexpr, INTERPRET: tl.constexpr):
    """Class ``c`` (int64) of the columns kernel's positions (see _load_values). Every valid lane is
    read (a mask of contiguous positions lets a thread's be one vector), and a dead one's logit is set
    to -inf after, as _load_chunk's never-read lanes are. ``same``: a block of zeros, so that every
    lane reads the class's weight (one address, one transaction a warp)."""
    x, a, slope = _load_values(x_base + c * x_sc, valid, t_base + c * t_sc, weight_ptr + c + same, valid, cap,
                               inv_cap, eps, eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB,
                               POLICY, INTERPRET)
    return tl.where(live, x, _neg_inf()), a, slope


@triton.jit
def _lane_update(x, a, mask, m, t, sa, d, NEED_A: tl.constexpr, INTERPRET: tl.constexpr):
    """Folds a chunk into per-lane running statistics (vectors of BLOCK lanes, no cross-lane
    reduction, so the sweep has no barriers): m = max x, s = sum exp(x - m) kept as t = s - 1, and
    with NEED_A, sa = sum a and d = sum a (x - ref), where ref = m, or 0 while the lane is empty.

    One exp per element: with e = exp(-|x - m|), a new max gives s' = s e + 1, i.e. t' = (1 + t) e,
    and otherwise s' = s + e. A lane starts empty at m = -FLT_MAX (``_empty()``, the most negative
    finite float, so that x - m is never inf - inf) and t = -1 (s = 0); -inf values add nothing, NaN
    makes t NaN.
    About 9 instructions per element without NEED_A."""
    e = exp2(tl.abs(x - m) * -log2e(), INTERPRET)
    t_new = tl.where(x > m, t * e + e, t + e)
    m_new = tl.maximum(m, x)
    if NEED_A:
        ref_old = tl.where(m == _empty(), 0.0, m)
        ref_new = tl.where(m_new == _empty(), 0.0, m_new)
        d = d + sa * (ref_old - ref_new) + tl.where(mask, a * (x - ref_new), 0.0)
        sa = sa + a
    return m_new, t_new, sa, d


@triton.jit
def _lanes(v, AXIS: tl.constexpr):
    """v, reduced over AXIS (0: a vector's lanes; 1: a tile's columns), laid back against those lanes."""
    if AXIS == 1:
        v = v[:, None]
    return v


@triton.jit
def _combine(m, t, sa, d, NEED_A: tl.constexpr, INTERPRET: tl.constexpr, AXIS: tl.constexpr):
    """Reduces per-lane (or per-segment) statistics (m, t = s - 1, sa, d; see _lane_update) to the
    row's scalars (AXIS 1: a tile's rows, a vector of each). t keeps the max lanes' ones out of the
    sum, sum_l s_l exp(m_l - M) - 1 = sum over max lanes of t_l + (their count - 1) + sum over the
    others of (1 + t_l) exp(m_l - M), so that lse - M = log1p(t) keeps its relative precision when
    the row is confident (lse - x_y ~ 1e-4 is common and would lose 3 digits to 1 + t rounding in
    fp32). d is moved to the common reference before summing, which avoids the cancellation of
    sa * lse - sum a x for large logits.

    The lanes may also be raw values (m = x, t = 0, sa = a, d = 0: one value each), which is how a
    row that fits one chunk is reduced, with one exp per element; -inf is then an empty lane."""
    M = tl.max(m, axis=AXIS)
    M_lanes = _lanes(M, AXIS)
    at_max = m == M_lanes  # every lane when all are empty (t = -1 each: T = -1, s = 0) or -inf
    n_max = tl.sum(tl.where(at_max, 1.0, 0.0), axis=AXIS)
    T = tl.sum(tl.where(at_max, t, (1.0 + t) * exp2((m - M_lanes) * log2e(), INTERPRET)), axis=AXIS) + (n_max - 1.0)
    T = tl.where(M == _neg_inf(), -1.0, T)  # raw lanes, all -inf
    SA = 0.0
    D = 0.0
    if NEED_A:
        REF = tl.where((M == _empty()) | (M == _neg_inf()), 0.0, M)
        SA = tl.sum(sa, axis=AXIS)
        D = tl.sum(d + sa * (tl.where(m == _empty(), 0.0, m) - _lanes(REF, AXIS)), axis=AXIS)
    return M, T, SA, D


@triton.jit
def _chunk_grad(x, a, slope, ref, ref2, kp, A, B, PROB: tl.constexpr, REST: tl.constexpr,
                SOFTCAP: tl.constexpr, PRECISE: tl.constexpr, INTERPRET: tl.constexpr):
    """d(loss)/d(logits) for one chunk, target lane aside (the kernel rewrites that lane after):
    kp p_c - B a_c with p_c = exp(x_c - ref) / s, kp = (K + A) / s (PROB: A / s), chained through
    softcap. PRECISE (an fp32 gradient) takes x - ref exactly; otherwise the exponent is one fused
    x log2e - ref log2e (ref2), whose rounding a 16-bit gradient cannot see. Without REST or
    SOFTCAP, about 6 instructions per element."""
    if PRECISE:
        e = exp2((x - ref) * log2e(), INTERPRET)
    else:
        e = exp2(x * log2e() - ref2, INTERPRET)
    g = e * kp
    if REST:
        g -= B * a
    if SOFTCAP:
        g = tl.where(x > _neg_inf(), g * slope, g)  # -inf: lanes of a dead row (0 * inf)
    return g


@triton.jit
def _target_terms(y64, valid, x_row, x_sc, weight_ptr, V, ignore_index, cap, inv_cap, HAS_WEIGHT: tl.constexpr,
                  SOFTCAP: tl.constexpr, TANH_SERIES: tl.constexpr, PROB: tl.constexpr, INTERPRET: tl.constexpr):
    """A row's target terms (a scalar row, or a vector of rows, one a lane): whether it counts
    (``live``), whether it is ignored, its class y (0 when out of range: never addressed out of
    bounds), its logit x_y (capped, with the cap's slope there for the target's gradient) and its
    class weight w_y, read at ``x_row + y * x_sc`` and ``weight_ptr + y``. ``y64``: the class
    index as loaded (unused for PROB, where every ``valid`` row counts). Ignored and out-of-range
    rows read no logits. (With the series, softcap's x_y is taken from the sweep instead: see
    CAPTURE_XY in the kernel.)"""
    slope_y = 1.0
    if PROB:
        live = valid
        ignored = ~valid
        y = 0
        x_y = 0.0
        w_y = 1.0
    else:
        ignored = y64 == ignore_index
        in_range = (y64 >= 0) & (y64 < V)
        live = in_range & (y64 != ignore_index)
        y = tl.where(in_range, y64, 0).to(tl.int32)
        x_y = tl.load(x_row + y * x_sc, mask=live, other=0.0).to(tl.float32)
        if SOFTCAP:
            x_y, slope_y = _softcap(x_y, cap, inv_cap, TANH_SERIES, INTERPRET)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y, mask=live, other=0.0).to(tl.float32)
        else:
            w_y = 1.0
    return live, ignored, y, x_y, slope_y, w_y


@triton.jit
def _row_loss(m, t, sa, d, x_y, w_y, live, ignored, ce_scale, z_scale, eps, eps_over_v, z_coef, gamma,
              SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, PROB: tl.constexpr, FOCAL: tl.constexpr,
              SCALAR: tl.constexpr):
    """A row's loss (a scalar row, or a vector of rows, one a lane) from its statistics (m, t, sa, d;
    see _combine) and target terms (see _target_terms), and its gradient's coefficients: the
    gradient is K (p_c - delta_cy) + A p_c - B a_c. Returns loss, t (NaN for a row with a +inf
    logit), ref (the row's max, or 0), K, A, B, q = p_y - 1 and l = log p_y. SCALAR: a scalar row,
    whose log1p and expm1 branch to one of their two formulas rather than compute both (the rows
    kernel: ~30 SASS instructions fewer a program, bench/NOTES.md section 28)."""
    # A +inf logit makes the whole row NaN, loss and gradient, as torch's log_softmax does (inf - inf):
    # through t, which every term of both divides by or takes the log of.
    nan = float("nan")
    t = tl.where(m == -_neg_inf(), nan, t)
    ref = tl.where((m == _empty()) | (m == _neg_inf()), 0.0, m)  # 0 for a row of -inf (or a dead row)
    log_s = log1p(t, SCALAR)  # lse - m: -inf for a row of -inf (t = -1)
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
        l = 0.0
    else:
        l = (x_y - ref) - log_s  # log p_y, without the cancellation of lse - x_y
        l = tl.where(l > 0.0, 0.0, l)  # rounding can never make p_y > 1 (NaN passes through)
        q = expm1(l, SCALAR)
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
            K = ce_scale * (1.0 - eps) * w_y
            if SMOOTH:
                # each term times the mean's scale apart, as torch divides each term's sum: a counted
                # row of weight 0 under a scale of 1/0 (every counted row weighs 0) is NaN, not inf
                A = ce_scale * eps_over_v * sa
                B = ce_scale * eps_over_v
                loss = K * -l + B * (sa * log_s - d)
            else:
                loss = ce_scale * ((1.0 - eps) * w_y * -l)
    if ZLOSS:
        loss += z_scale * z_coef * lse * lse
        A += z_scale * 2.0 * z_coef * lse
    # ignored rows: 0 * ce_scale (NaN when the mean's scale is 1/0); out-of-range targets: NaN
    loss = tl.where(live, loss, tl.where(ignored, 0.0 * ce_scale, nan))
    return loss, t, ref, K, A, B, q, l


@triton.jit
def _scales(div_ptr, n_parts, z_off, SCALED: tl.constexpr, ZLOSS: tl.constexpr, PARTS: tl.constexpr):
    """ce_scale and z_scale: 1 / the CE term's and the z-loss term's divisors (the mean's
    denominators, summed from their parts and inverted here rather than by more launches), or 1."""
    if SCALED:
        ce_scale = inverse_of_parts(div_ptr, n_parts, PARTS)
        z_scale = ce_scale
        if ZLOSS:
            z_scale = inverse_of_parts(div_ptr + z_off, n_parts, PARTS)
    else:
        ce_scale = 1.0
        z_scale = 1.0
    return ce_scale, z_scale


@triton.jit
def _grad_coefs(K, A, B, t, ref, live, ignored, ce_scale, z_scale, first, prediction_ptr, predicted_ptr, grad_ptr,
                PREDICT: tl.constexpr, ZLOSS: tl.constexpr):
    """The gradient's coefficients as _chunk_grad takes them: kp = (K + A) / s, K, A, B, and ref2 =
    ref log2e. With PREDICT they carry the predicted grad_output (``first``: the program that copies
    it for the backward). A dead row's coefficients give its gradient directly: 0 (ignored) or NaN
    (out of range); its lanes read -inf, so e = 0 and e * kp = 0 * kp."""
    if PREDICT:
        # The gradient's every term carries K, A or B: scaled by the prediction, exactly when it is
        # a power of two. The same factor in every program, as ce_scale is (inverse_of_parts). fp16
        # caps p at 1 / the larger scale: the z-loss term's own (1 / the counted rows) exceeds
        # ce_scale (1 / their class weights) where the weights exceed 1, and capped at 1 / ce_scale,
        # 2 z lse p_c times the mean weight overflowed fp16 (z 0.1, lse 200, 4096)
        cap_scale = ce_scale
        if ZLOSS:
            cap_scale = tl.maximum(tl.abs(ce_scale), tl.abs(z_scale))
        p = predicted_factor(prediction_ptr, predicted_ptr, cap_scale, first, grad_ptr)
        K = K * p
        A = A * p
        B = B * p
    fill = tl.where(ignored, 0.0, float("nan"))
    inv_s = 1.0 / (1.0 + t)
    kp = tl.where(live, (K + A) * inv_s, fill)
    A = tl.where(live, A, fill)
    B = tl.where(live, B, fill)
    K = tl.where(live, K, fill)
    return kp, K, A, B, ref * log2e()


@triton.jit
def _target_grad(K, A, B, q, l, w_y, slope_y, REST: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr):
    """The gradient of the target's class: K (p_y - 1) + A p_y - B a_y, with p_y - 1 = q computed as
    expm1(log p_y) in fp32 (K p_y - K would round to a multiple of K's ulp)."""
    g_y = K * q
    if REST:
        g_y += A * tl.exp(l)
        if SMOOTH:
            g_y -= B * w_y  # a_y = w_y (1 without weights)
    if SOFTCAP:
        g_y = g_y * slope_y
    return g_y


@triton.jit
def _prologue_kernel(target_ptr, weight_ptr, parts_ptr, sync_ptr, N, V, ignore_index, COUNT: tl.constexpr,
                     WEIGHTED: tl.constexpr, PROB: tl.constexpr, ZERO_SYNC: tl.constexpr, BLOCK: tl.constexpr):
    """What the loss kernel needs before it starts, in one small launch ahead of it. Program p of P
    takes the rows p·BLOCK, (p + P)·BLOCK, ... (BLOCK at a time) and writes

    - COUNT: parts[p] = how many of them count (target != ignore_index; every row for probability
      targets), and WEIGHTED: parts[P + p] = that count and parts[p] = the sum of their class
      weights (a target out of range takes the nearest class's: its row's loss is NaN anyway);
    - ZERO_SYNC: zeroes a split launch's arrival counters of those rows, sync[1 + row], and program 0
      the ticket counter, sync[0].

    Reads 8 bytes per row (and a weight from L2); each part is summed in a fixed order."""
    p = tl.program_id(0)
    n_progs = tl.num_programs(0)
    count = tl.zeros([BLOCK], tl.float32)
    wsum = tl.zeros([BLOCK], tl.float32)
    for start in range(p * BLOCK, N, n_progs * BLOCK):
        rows = start + tl.arange(0, BLOCK)
        live = rows < N
        if COUNT:
            if PROB:
                counted = live
            else:
                y = tl.load(target_ptr + rows, mask=live, other=ignore_index)
                counted = live & (y != ignore_index)
                if WEIGHTED:
                    y = tl.minimum(tl.maximum(y, 0), V - 1)
                    wsum += tl.load(weight_ptr + y, mask=counted, other=0.0)
            count += counted.to(tl.float32)
        if ZERO_SYNC:
            tl.store(sync_ptr + 1 + rows, tl.zeros([BLOCK], tl.int32), mask=live)
    if ZERO_SYNC:
        if p == 0:
            tl.store(sync_ptr, 0)
    if COUNT:
        if WEIGHTED:
            tl.store(parts_ptr + p, tl.sum(wsum, axis=0))
            tl.store(parts_ptr + n_progs + p, tl.sum(count, axis=0))
        else:
            tl.store(parts_ptr + p, tl.sum(count, axis=0))


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    target_stride,
    weight_ptr,
    div_ptr,  # SCALED: fp32, n_parts parts of the CE term's divisor, and n_parts of the z-loss term's
    n_parts,  # from z_off on (z_off = 0: the same parts); the sums of the parts are the divisors
    z_off,
    grad_ptr,
    grad_stride,
    loss_ptr,  # each row's loss, in its dtype (fp32 when the launcher sums the rows)
    sync_ptr,  # SPLIT: int32 [1 + N], zeroed: the ticket counter, then each row's arrival count
    stats_ptr,  # SPLIT: fp32 [N, SEGMENTS, STATS]: each segment's m, t, sa, d, x_y part; ROWS: [rows_planes, N],
    # each row's statistics and its gradient's coefficients (see the statistics' round trip)
    prediction_ptr,  # PREDICT: fp32, the gradient's extra factor (a power of two, or 0: unknown; see scale_grad_)
    predicted_ptr,  # PREDICT: fp32, where the program of row 0 copies the factor used, for the backward
    n_rows,  # ROWS: the rows (a program's last rows may lie past them)
    V,
    seg_len,  # SPLIT: columns per segment (a multiple of BLOCK); V otherwise
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
    TANH_SERIES: tl.constexpr,  # softcap's tanh takes its series near 0 (common.softcap)
    PROB: tl.constexpr,
    FOCAL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    NEED_A: tl.constexpr,  # PROB or SMOOTH: the sums sa, d and the per-class a_c are needed
    REST: tl.constexpr,  # PROB or SMOOTH or ZLOSS: the gradient has A p_c - B a_c terms
    INTERPRET: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,  # a row (SPLIT: a segment) fits one chunk and stays in registers
    SPLIT: tl.constexpr,  # SEGMENTS programs share each row
    PREDICT: tl.constexpr,  # the gradient is multiplied by *prediction_ptr (the loss is not)
    SEGMENTS: tl.constexpr,
    ROWS: tl.constexpr,  # rows a program (with SINGLE, not SPLIT), a [ROWS, BLOCK] tile
    SHIFT: tl.constexpr,  # 16 // the element size: the sweeps' columns start on a 16-byte boundary (below); or 0
    REVERSE: tl.constexpr,  # sweep 2 walks the chunks last to first: the most recently read first
    STAGES: tl.constexpr,  # 0: sweep 1 loads the next chunk by hand; else Triton pipelines its loads
    STAGES2: tl.constexpr,  # the same for sweep 2
    SPIN_SLEEP: tl.constexpr,  # SPLIT: PTX run between two polls of the row's arrivals (a nanosleep), or None
    STATS: tl.constexpr,  # module constants, passed rather than read as globals (see common.log2e)
    PARTS: tl.constexpr,
):
    if SPLIT:
        # Programs take tickets in the order they start, and ticket k is segment k % SEGMENTS of row
        # k // SEGMENTS. A program waits only for the other segments of its row, whose tickets were
        # or will be taken by programs already running or next to start, so the wait always ends as
        # long as SEGMENTS programs fit on the GPU at once (the launcher sees to it: MAX_SEGMENTS).
        ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed").to(tl.int64)
        row = ticket // SEGMENTS
        seg = (ticket - row * SEGMENTS).to(tl.int32)
        lo = seg * seg_len
        valid = row >= 0
    elif ROWS > 1:
        # ROWS rows, a vector: their reductions run across a [ROWS, BLOCK] tile, their own work (target,
        # loss, coefficients) one row a lane (see the statistics' round trip below)
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        seg = 0
        lo = 0
        valid = row < n_rows
    else:
        row = tl.program_id(0).to(tl.int64)
        seg = 0
        lo = 0
        valid = row >= 0
    # Columns are int32 (V < 2^31); the row offsets, which can pass 2^31, are int64.
    x_row = logits_ptr + row * logits_stride
    t_row = target_ptr + row * target_stride
    g_row = grad_ptr + row * grad_stride
    if SHIFT:
        # A row that does not start and end on 16-byte boundaries (V or the row stride not a multiple of
        # SHIFT: GPT-2's V = 50257, a vocabulary grown by a token) would be read and written a value at
        # a time, as Triton cannot prove a thread's values one vector: bf16 V = 50257 on sm_90, 45.3
        # SASS instructions an element and sweep 1 not pipelined, against 33.5 (bench/NOTES.md section
        # 30). So the sweeps count columns from the boundary at or before the row's start, sh values
        # before it (the launcher gives SHIFT only where the logits and the gradient start on a
        # boundary and their row strides agree modulo SHIFT): their column j is the row's j - sh. They
        # take the whole vectors inside the row, [lo_in, hi_in) of this program's [lo, hi), with masks
        # that start and end on vectors; the few columns before and after them, its edges (at most
        # SHIFT - 1 at each end of the row), are a small tile of their own, folded into the statistics
        # and written after sweep 2.
        sh = ((row * logits_stride) % SHIFT).to(tl.int32)
        x_sweep = logits_ptr + tl.multiple_of(row * logits_stride - sh, SHIFT)
        g_sweep = grad_ptr + tl.multiple_of(row * grad_stride - sh, SHIFT)
        w_sweep = weight_ptr - sh
        end = V + sh
        end_in = end // SHIFT * SHIFT
        if SPLIT:
            hi = tl.minimum(lo + seg_len, end)  # this program's columns: [lo, hi)
            hi_in = tl.minimum(lo + seg_len, end_in)
        else:
            hi = end
            hi_in = end_in
        lo_in = tl.maximum(lo, tl.where(sh > 0, SHIFT, 0))
    else:
        sh = 0
        x_sweep, g_sweep, w_sweep = x_row, g_row, weight_ptr
        hi = tl.minimum(lo + seg_len, V)  # this program's columns: [lo, hi)
        lo_in, hi_in = lo, hi
    ce_scale, z_scale = _scales(div_ptr, n_parts, z_off, SCALED, ZLOSS, PARTS)
    eps_over_v = eps / V

    # ---- the row's target --------------------------------------------------------------------------
    if PROB:
        y64 = 0
    elif ROWS > 1:
        y64 = tl.load(target_ptr + row, mask=valid, other=ignore_index).to(tl.int64)
    else:
        y64 = tl.load(target_ptr + row).to(tl.int64)
    # (in place, every program reads x_y before the row's gradient is written: see SPLIT and ROWS)
    live, ignored, y, x_y, slope_y, w_y = _target_terms(y64, valid, x_row, 1, weight_ptr, V, ignore_index, cap,
                                                        inv_cap, HAS_WEIGHT, SOFTCAP, TANH_SERIES, PROB, INTERPRET)

    # ---- sweep 1: per-lane max / sum-exp (+ smoothing / probability-target sums) --------------------
    # With softcap, the target's capped logit x_y must be the same bits as in its lane, or the loss of a
    # confident row, lse - x_y ~ 1e-7, is off by an ulp of x_y. Without the series (TANH_SERIES), the
    # cap is products, sums, an exp2, a reciprocal and selects with no product that feeds a sum, and
    # its last product, by the cap, is never fused into one (common.mul_rn), so x_y capped on its own
    # (above) is those bits. The series' Horner steps leave fusion to the compiler (and its sum
    # 1 + expm1), so there x_y is taken from the lanes (xy), at ~9 instructions per element of sweep 1
    # and a vector more of registers (bf16 V = 256000 launch on sm_90: 100.5 against 61.4 instructions
    # per element in all, 255 registers and spills against 144; bench/NOTES.md section 23).
    CAPTURE_XY: tl.constexpr = (SOFTCAP and TANH_SERIES) and not PROB  # (Triton < 3.4: no chained and)
    AXIS: tl.constexpr = 1 if ROWS > 1 else 0  # the columns' axis
    cols = lo + tl.arange(0, BLOCK)
    v_live = tl.where(live, hi_in, 0)  # logits are read only below this column (none for a dead row)
    x_rows, t_rows, y_lanes = x_sweep, t_row, y
    if SHIFT:  # the target's column in the sweeps, or -1 where it is not in their columns (in an edge)
        y_lanes = tl.where((y + sh >= lo_in) & (y + sh < hi_in), y + sh, -1)
    if ROWS > 1:  # rows down the tile, columns across
        x_rows, t_rows = x_row[:, None], t_row[:, None]
        if CAPTURE_XY:
            y_lanes = y[:, None]
        cols = cols[None, :]
        v_live = v_live[:, None]
    m = tl.full([BLOCK], _empty(), tl.float32)
    t = tl.full([BLOCK], -1.0, tl.float32)
    sa = tl.zeros([BLOCK], tl.float32)
    d = tl.zeros([BLOCK], tl.float32)
    xy = tl.zeros([BLOCK], tl.float32)
    if SINGLE:
        # The whole row (segment) fits one chunk: read it once and keep x (a, and the cap's slope) in
        # registers.
        mask = _inside(cols, lo_in, hi_in, SHIFT)
        x, a, slope = _load_chunk(x_rows, t_rows, w_sweep, cols, lo_in, hi_in, v_live, cap, inv_cap, eps,
                                  eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB, SHIFT,
                                  "evict_first", INTERPRET)
        m = x
        t = tl.zeros_like(x)
        if NEED_A:  # padding lanes must be -FLT_MAX, not -inf, for d's sa (m - ref) = 0 * (-inf) terms
            m = tl.where(mask, x, _empty())
            t = tl.where(mask, t, -1.0)
            sa = tl.broadcast_to(a, x.shape)  # (a class weight's a is the same in every row)
        if CAPTURE_XY:
            xy = tl.where(cols == y_lanes, x, 0.0)
    else:
        POLICY1: tl.constexpr = "evict_last" if WRITE_GRAD else "evict_first"  # kept in L2 for sweep 2
        if STAGES:
            # Triton's software pipeliner keeps STAGES - 1 chunks in flight (asynchronous copies
            # through shared memory)
            for start in tl.range(0, hi_in - lo, BLOCK, num_stages=STAGES):
                c = start + cols
                xc, ac, _ = _load_chunk(x_sweep, t_row, w_sweep, c, lo_in, hi_in, v_live, cap, inv_cap, eps,
                                        eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB, SHIFT,
                                        POLICY1, INTERPRET)
                m, t, sa, d = _lane_update(xc, ac, _inside(c, lo_in, hi_in, SHIFT), m, t, sa, d, NEED_A, INTERPRET)
                if CAPTURE_XY:
                    xy = tl.where(c == y_lanes, xc, xy)
        else:
            # The next chunk's load is issued before this one is folded in (two in flight).
            xn, an, _ = _load_chunk(x_sweep, t_row, w_sweep, cols, lo_in, hi_in, v_live, cap, inv_cap, eps,
                                    eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB, SHIFT, POLICY1,
                                    INTERPRET)
            for start in range(0, hi_in - lo, BLOCK):
                c = start + cols
                xc, ac = xn, an
                xn, an, _ = _load_chunk(x_sweep, t_row, w_sweep, c + BLOCK, lo_in, hi_in, v_live, cap, inv_cap, eps,
                                        eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB, SHIFT,
                                        POLICY1, INTERPRET)
                m, t, sa, d = _lane_update(xc, ac, _inside(c, lo_in, hi_in, SHIFT), m, t, sa, d, NEED_A, INTERPRET)
                if CAPTURE_XY:
                    xy = tl.where(c == y_lanes, xc, xy)
    m, t, sa, d = _combine(m, t, sa, d, NEED_A, INTERPRET, AXIS)
    if CAPTURE_XY:
        x_y = tl.sum(xy, axis=AXIS)  # 0 when y is outside [lo, hi) (another segment's)
    if SHIFT:
        # The edges: the row's columns before lo_in (from sh, in the first vector) in lanes 0 to
        # SHIFT - 1, and those from end_in on in lanes SHIFT to 2 SHIFT - 1, where this program holds
        # them; their statistics, as raw lanes (see _combine), joined to the sweep's. (Read here, before
        # a split row's programs publish their statistics: in place, before any of its gradient is
        # written.)
        edge_cols, on_edge = _edges(sh, lo, lo_in, end_in, hi, SHIFT)
        read = tl.where(live, on_edge, False)  # (none for a dead row)
        x_edge, a_edge, slope_edge = _load_values(x_sweep + edge_cols, read, t_row, w_sweep + edge_cols,
                                                  on_edge, cap, inv_cap, eps, eps_over_v, SOFTCAP, TANH_SERIES, NEED_A,
                                                  HAS_WEIGHT, SMOOTH, PROB, "evict_first", INTERPRET)
        m_edge, t_edge, sa_edge, d_edge = _combine(tl.where(on_edge, x_edge, _empty()), tl.where(on_edge, 0.0, -1.0),
                                                   tl.broadcast_to(a_edge, x_edge.shape), tl.zeros_like(x_edge),
                                                   NEED_A, INTERPRET, 0)
        sweep = tl.arange(0, 2) == 0
        m, t, sa, d = _combine(tl.where(sweep, m, m_edge), tl.where(sweep, t, t_edge), tl.where(sweep, sa, sa_edge),
                               tl.where(sweep, d, d_edge), NEED_A, INTERPRET, 0)
        if CAPTURE_XY:
            x_y += tl.sum(tl.where(on_edge & (edge_cols == y + sh), x_edge, 0.0), axis=0)
    if ROWS > 1:
        # The reductions leave each row's statistics in every lane that held its values; stored and
        # loaded back, they are one row a lane (what a load of ROWS values gives), and the row's own
        # work below follows them there: its ~265 instructions for ROWS rows rather than for each (the
        # compiler, left to itself, moves the target terms to the statistics; bench/NOTES.md
        # sections 28 and 29). The barrier orders the stores before the loads of other threads.
        # Planes of n_rows floats (rows_planes): m, t, kp, ref, then sa, d (NEED_A), A, B (REST), x_y.
        P_SA: tl.constexpr = 4
        P_A: tl.constexpr = 4 + 2 * NEED_A
        P_XY: tl.constexpr = P_A + 2 * REST
        plane = stats_ptr + row
        n64 = tl.cast(n_rows, tl.int64)
        tl.store(plane, m, mask=valid)
        tl.store(plane + n64, t, mask=valid)
        if NEED_A:
            tl.store(plane + P_SA * n64, sa, mask=valid)
            tl.store(plane + (P_SA + 1) * n64, d, mask=valid)
        if CAPTURE_XY:
            tl.store(plane + P_XY * n64, x_y, mask=valid)
        tl.debug_barrier()
        m = tl.load(plane, mask=valid, other=0.0)
        t = tl.load(plane + n64, mask=valid, other=0.0)
        if NEED_A:
            sa = tl.load(plane + P_SA * n64, mask=valid, other=0.0)
            d = tl.load(plane + (P_SA + 1) * n64, mask=valid, other=0.0)
        if CAPTURE_XY:
            x_y = tl.load(plane + P_XY * n64, mask=valid, other=0.0)
    if SPLIT:
        # Publish this segment's statistics, wait for the row's other segments, combine them all.
        # The barrier orders every thread's stores (and the x_y load) before the release.
        stats = stats_ptr + (row * SEGMENTS + seg) * STATS
        tl.store(stats, m)
        tl.store(stats + 1, t)
        tl.store(stats + 2, sa)
        tl.store(stats + 3, d)
        tl.store(stats + 4, x_y)
        tl.debug_barrier()
        count = sync_ptr + 1 + row
        arrived = tl.atomic_add(count, 1, sem="release") + 1
        while arrived < SEGMENTS:
            if SPIN_SLEEP is not None:
                if not INTERPRET:
                    arrived = tl.inline_asm_elementwise(SPIN_SLEEP, "=r,r", [arrived], dtype=tl.int32,
                                                        is_pure=False, pack=1)
            arrived = tl.atomic_add(count, 0, sem="acquire")
        k = tl.arange(0, SEGMENTS)
        all_stats = stats_ptr + (row * SEGMENTS + k) * STATS
        m, t, sa, d = _combine(tl.load(all_stats, volatile=True), tl.load(all_stats + 1, volatile=True),
                               tl.load(all_stats + 2, volatile=True), tl.load(all_stats + 3, volatile=True),
                               NEED_A, INTERPRET, 0)
        if CAPTURE_XY:
            x_y = tl.sum(tl.load(all_stats + 4, volatile=True), axis=0)
    if CAPTURE_XY:
        x_y = tl.where(live, x_y, 0.0)  # a dead row's lanes are -inf

    # ---- the row's loss ---------------------------------------------------------------------------
    loss, t, ref, K, A, B, q, l = _row_loss(m, t, sa, d, x_y, w_y, live, ignored, ce_scale, z_scale, eps, eps_over_v,
                                            z_coef, gamma, SMOOTH, ZLOSS, PROB, FOCAL, ROWS == 1)
    if ROWS > 1:
        tl.store(loss_ptr + row, cast_to(loss, loss_ptr.dtype.element_ty, INTERPRET), mask=valid)
    elif seg == 0:
        tl.store(loss_ptr + row, cast_to(loss, loss_ptr.dtype.element_ty, INTERPRET))

    # ---- sweep 2: the gradient --------------------------------------------------------------------
    if WRITE_GRAD:
        first = (tl.program_id(0) == 0) if ROWS > 1 else (row == 0) & (seg == 0)
        kp, K, A, B, ref2 = _grad_coefs(K, A, B, t, ref, live, ignored, ce_scale, z_scale, first,
                                        prediction_ptr, predicted_ptr, grad_ptr, PREDICT, ZLOSS)
        out_ty = grad_ptr.dtype.element_ty
        PRECISE: tl.constexpr = out_ty == tl.float32
        if ROWS > 1:
            # The tile's rows, their coefficients brought back through memory as their statistics went: else
            # the compiler computes them a second time from the statistics, in the tile's layout.
            tl.store(plane + 2 * n64, kp, mask=valid)
            tl.store(plane + 3 * n64, ref if PRECISE else ref2, mask=valid)  # (what _chunk_grad takes)
            if REST:
                tl.store(plane + P_A * n64, A, mask=valid)
                tl.store(plane + (P_A + 1) * n64, B, mask=valid)
            tl.debug_barrier()
            kp_t = tl.load(plane + 2 * n64, mask=valid, other=0.0)[:, None]
            ref_t = tl.load(plane + 3 * n64, mask=valid, other=0.0)[:, None]
            A_t = 0.0
            B_t = 0.0
            if REST:
                A_t = tl.load(plane + P_A * n64, mask=valid, other=0.0)[:, None]
                B_t = tl.load(plane + (P_A + 1) * n64, mask=valid, other=0.0)[:, None]
            g = _chunk_grad(x, a, slope, ref_t, ref_t, kp_t, A_t, B_t, PROB, REST, SOFTCAP, PRECISE, INTERPRET)
            tl.store(g_row[:, None] + cols, cast_to(g, out_ty, INTERPRET), mask=mask & valid[:, None])
        elif SINGLE:
            g = _chunk_grad(x, a, slope, ref, ref2, kp, A, B, PROB, REST, SOFTCAP, PRECISE, INTERPRET)
            tl.store(g_sweep + cols, cast_to(g, out_ty, INTERPRET), mask=mask)
        else:
            n_chunks = tl.cdiv(hi_in - lo, BLOCK)
            first = (n_chunks - 1 if REVERSE else 0) * BLOCK + cols
            step = -BLOCK if REVERSE else BLOCK
            if not STAGES2:
                xn, an, sn = _load_chunk(x_sweep, t_row, w_sweep, first, lo_in, hi_in, v_live, cap, inv_cap, eps,
                                         eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB, SHIFT,
                                         "evict_first", INTERPRET)
            for i in tl.range(0, n_chunks, num_stages=STAGES2):
                c = first + i * step
                if STAGES2:
                    xc, ac, sc = _load_chunk(x_sweep, t_row, w_sweep, c, lo_in, hi_in, v_live, cap, inv_cap, eps,
                                             eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB,
                                             SHIFT, "evict_first", INTERPRET)
                else:
                    # In place (grad is the logits): a chunk is read before it is overwritten, and the
                    # prefetched next chunk is another one, not yet written.
                    xc, ac, sc = xn, an, sn
                    cn = c + tl.where(i + 1 < n_chunks, step, hi_in + BLOCK)  # after the last: past hi_in
                    xn, an, sn = _load_chunk(x_sweep, t_row, w_sweep, cn, lo_in, hi_in, v_live, cap, inv_cap, eps,
                                             eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB,
                                             SHIFT, "evict_first", INTERPRET)
                g = _chunk_grad(xc, ac, sc, ref, ref2, kp, A, B, PROB, REST, SOFTCAP, PRECISE, INTERPRET)
                # First out of L2: the gradient is not read again, and other programs' segments, kept
                # there by sweep 1, are still to be read (bf16 8192 x 128256 on an H100: DRAM read
                # 2.36 -> 2.16 GB of the logits' 2.10, 81.5 -> 84.6% of the floor; bench/NOTES.md)
                tl.store(g_sweep + c, cast_to(g, out_ty, INTERPRET), mask=_inside(c, lo_in, hi_in, SHIFT),
                         eviction_policy="evict_first")
        if SHIFT:  # the edges' gradient (their logits read before any of the row's gradient was written)
            g_edge = _chunk_grad(x_edge, a_edge, slope_edge, ref, ref2, kp, A, B, PROB, REST, SOFTCAP, PRECISE,
                                 INTERPRET)
            tl.store(g_sweep + edge_cols, cast_to(g_edge, out_ty, INTERPRET), mask=on_edge)
        if not PROB:
            # The target lane, written again by the program that holds it once the barrier has
            # ordered its threads' stores.
            g_y = _target_grad(K, A, B, q, l, w_y, slope_y, REST, SMOOTH, SOFTCAP)
            y_mask = (y + sh >= lo) & (y + sh < hi)
            if ROWS > 1:
                y_mask = y_mask & valid
            tl.debug_barrier()
            tl.store(g_row + y, cast_to(g_y, out_ty, INTERPRET), mask=y_mask)


@triton.jit
def _cross_entropy_columns_kernel(
    logits_ptr,
    x_sn,  # logits (N, C, D): the logit of class c at position (n, d) is at n x_sn + c x_sc + d x_sd
    x_sc,
    x_sd,
    target_ptr,  # class indices: (N, D) contiguous, position p = n D + d at p; PROB: (N, C, D) probabilities
    t_sn,  # PROB: the probabilities' strides (else unused)
    t_sc,
    t_sd,
    weight_ptr,
    div_ptr,  # SCALED: as in _cross_entropy_kernel
    n_parts,
    z_off,
    grad_ptr,  # WRITE_GRAD: (N, C, D), strides of its own (or the logits themselves)
    g_sn,
    g_sc,
    g_sd,
    loss_ptr,  # each position's loss, at p, in its dtype (fp32 when the launcher sums them)
    prediction_ptr,  # PREDICT: as in _cross_entropy_kernel
    predicted_ptr,
    P,  # positions: N D
    D,
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
    TANH_SERIES: tl.constexpr,
    PROB: tl.constexpr,
    FOCAL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    NEED_A: tl.constexpr,
    REST: tl.constexpr,
    INTERPRET: tl.constexpr,
    SCALED: tl.constexpr,
    PREDICT: tl.constexpr,
    BLOCK: tl.constexpr,  # positions a program
    ROW_BLOCKS: tl.constexpr,  # a program takes BLOCK positions of one n (else of all N D, in order)
    PARTS: tl.constexpr,
):
    """The kernel above, turned: for (N, C, d1, ...) logits whose classes are strided in memory (a
    segmentation map's (N, C, H, W)), read where they are; and for rows of few classes (x_sc = 1,
    positions x_sd apart: a channels_last map's), too narrow for a program each. Each lane is one
    position (n, d) and keeps that position's running statistics (_lane_update) while the program
    steps through the classes, one a step: a step reads BLOCK neighbouring positions of one class,
    contiguous in memory where the positions are (x_sd = 1), else x_sd apart, from the cache lines
    the first class brought in (narrow rows). No lane waits for another, so there is no reduction
    across lanes. Sweep 2 steps through the classes again, reading them from L1/L2 (V BLOCK values
    a program: the launcher keeps that small), and writes the gradient with its own strides.

    Bytes per position: reads its V logits once from memory (and again from cache), writes V
    gradients and one loss, reads its target (or V probabilities) and x_y, w_y from cache."""
    pid = tl.program_id(0).to(tl.int64)
    if ROW_BLOCKS:
        # n is the program's, and its positions d are contiguous: with x_sd = 1 (a constant where the
        # positions are contiguous in memory) a thread's are read and written as vectors
        blocks = tl.cdiv(D, BLOCK)
        n = pid // blocks
        dd = (pid - n * blocks) * BLOCK + tl.arange(0, BLOCK)
        valid = dd < D
        pos = n * D + dd
    else:
        pos = pid * BLOCK + tl.arange(0, BLOCK)
        valid = pos < P
        n = pos // D
        dd = pos - n * D
    x_base = logits_ptr + n * x_sn + dd * x_sd
    t_base = target_ptr + n * t_sn + dd * t_sd  # PROB
    ce_scale, z_scale = _scales(div_ptr, n_parts, z_off, SCALED, ZLOSS, PARTS)
    eps_over_v = eps / V
    if PROB:
        y64 = 0
    else:
        y64 = tl.load(target_ptr + pos, mask=valid, other=ignore_index).to(tl.int64)
    live, ignored, y, x_y, slope_y, w_y = _target_terms(y64, valid, x_base, tl.cast(x_sc, tl.int64), weight_ptr, V,
                                                        ignore_index, cap, inv_cap, HAS_WEIGHT, SOFTCAP, TANH_SERIES,
                                                        PROB, INTERPRET)
    CAPTURE_XY: tl.constexpr = (SOFTCAP and TANH_SERIES) and not PROB  # see _cross_entropy_kernel
    same = tl.zeros([BLOCK], tl.int32)  # (see _load_class)
    POLICY1: tl.constexpr = "evict_last" if WRITE_GRAD else "evict_first"  # kept for sweep 2
    m = tl.full([BLOCK], _empty(), tl.float32)
    t = tl.full([BLOCK], -1.0, tl.float32)
    sa = tl.zeros([BLOCK], tl.float32)
    d = tl.zeros([BLOCK], tl.float32)
    xy = tl.zeros([BLOCK], tl.float32)
    for c in range(0, V):
        x, a, _ = _load_class(x_base, x_sc, t_base, t_sc, weight_ptr, tl.cast(c, tl.int64), same, valid, live, cap,
                              inv_cap, eps, eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB,
                              POLICY1, INTERPRET)
        m, t, sa, d = _lane_update(x, a, valid, m, t, sa, d, NEED_A, INTERPRET)
        if CAPTURE_XY:
            xy = tl.where(y == c, x, xy)
    if CAPTURE_XY:
        x_y = tl.where(live, xy, 0.0)
    # A lane's statistics are its position's: _lane_update's t and d are already those _combine gives
    # one lane (its m never becomes -inf: an empty lane keeps -FLT_MAX).
    loss, t, ref, K, A, B, q, l = _row_loss(m, t, sa, d, x_y, w_y, live, ignored, ce_scale, z_scale, eps, eps_over_v,
                                            z_coef, gamma, SMOOTH, ZLOSS, PROB, FOCAL, False)
    tl.store(loss_ptr + pos, cast_to(loss, loss_ptr.dtype.element_ty, INTERPRET), mask=valid)

    if WRITE_GRAD:
        kp, K, A, B, ref2 = _grad_coefs(K, A, B, t, ref, live, ignored, ce_scale, z_scale, tl.program_id(0) == 0,
                                        prediction_ptr, predicted_ptr, grad_ptr, PREDICT, ZLOSS)
        g_base = grad_ptr + n * g_sn + dd * g_sd
        out_ty = grad_ptr.dtype.element_ty
        PRECISE: tl.constexpr = out_ty == tl.float32
        # Last class first: the most recently read. In place (grad is the logits), each lane reads a
        # class's logit before it writes its gradient there.
        for i in range(0, V):
            c64 = tl.cast(V - 1 - i, tl.int64)
            x, a, slope = _load_class(x_base, x_sc, t_base, t_sc, weight_ptr, c64, same, valid, live, cap, inv_cap, eps,
                                      eps_over_v, SOFTCAP, TANH_SERIES, NEED_A, HAS_WEIGHT, SMOOTH, PROB, "evict_first",
                                      INTERPRET)
            g = _chunk_grad(x, a, slope, ref, ref2, kp, A, B, PROB, REST, SOFTCAP, PRECISE, INTERPRET)
            tl.store(g_base + c64 * g_sc, cast_to(g, out_ty, INTERPRET), mask=valid)
        if not PROB:
            # the target's class, written again by the lane that wrote it above
            g_y = _target_grad(K, A, B, q, l, w_y, slope_y, REST, SMOOTH, SOFTCAP)
            tl.debug_barrier()
            tl.store(g_base + y.to(tl.int64) * g_sc, cast_to(g_y, out_ty, INTERPRET), mask=live)


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernel is launched: ``block`` (the chunk, in columns: a row, or a segment, no longer
    than it is read once and kept in registers), warps, ``segments`` (0: one program per row; else
    a power of two: that many programs share each row, see SPLIT in the kernel), whether sweep 2
    walks the chunks in reverse, and how chunked sweeps keep loads in flight: ``stages`` (sweep 1)
    and ``stages2`` (sweep 2) 0 load the next chunk by hand before using the current one, n >= 2
    let Triton's software pipeliner keep n - 1 chunks in flight (asynchronous copies into shared
    memory). ``sleep_ns``: a split launch's wait for its row's other segments sleeps this long between
    two polls (0: it polls without pause). ``rows``: rows a program (ROWS in the kernel; only for rows
    in one chunk, not split)."""

    block: int
    num_warps: int
    segments: int = 0
    reverse: bool = True
    stages: int = 0
    stages2: int = 0
    sleep_ns: int = SPIN_SLEEP_NS
    rows: int = 1

    @functools.cached_property
    def kernel_constexprs(self) -> dict:
        """The kernel's constexpr arguments that this launch decides beyond its block (computed once
        per configuration: a launch's host time counts). SPIN_SLEEP sleeps, then passes the arrivals'
        count through."""
        return dict(REVERSE=self.reverse, STAGES=self.stages, STAGES2=self.stages2, ROWS=self.rows,
                    SPIN_SLEEP=f"nanosleep.u32 {self.sleep_ns}; mov.b32 $0, $1;" if self.sleep_ns else None)


def launch_config(logits: Tensor, write_grad: bool) -> LaunchConfig:
    """The default launch for (N, V) logits, from ``python -m bench.tune_ce`` on an H100 (see
    bench/NOTES.md): rows of V >= SPLIT_MIN_COLS with a gradient are split into segments of
    SPLIT_COLS[dtype] columns (at most ``max_segments`` of them); rows of up to ROWS_MAX_BLOCK columns
    run several a program (ROWS_VALUES); other rows one per program, in chunks of up to MAX_ROW_BLOCK."""
    split = write_grad and logits.is_cuda
    segments_cap = _max_segments(logits.get_device()) if split else 0
    return _default_config(logits.shape[1], logits.element_size(), segments_cap, write_grad)


def max_segments(sm_count: int) -> int:
    """The most segments a split launch gives a row on a GPU with ``sm_count`` SMs: a power of two,
    at most the SM count and MAX_SEGMENTS (see MAX_SEGMENTS)."""
    return min(MAX_SEGMENTS, 1 << (sm_count.bit_length() - 1))


@functools.cache
def _max_segments(device_index: int) -> int:
    return max_segments(torch.cuda.get_device_properties(device_index).multi_processor_count)


@functools.lru_cache(maxsize=1024)  # a step's host time counts (bench/NOTES.md): computed once per shape
def _default_config(n_cols: int, element_size: int, segments_cap: int, write_grad: bool = True) -> LaunchConfig:
    """``segments_cap``: at most this many segments a row (``max_segments``); 0 splits no row.

    Sweep 1 is pipelined by Triton (``stages``) where that measured faster, kernel alone on an H100
    (bench/NOTES.md, section 20): 16-bit segments of 4 warps, 3 stages (+2 to 3% at V = 32768 to
    128256); of 2 warps, 4 stages and sweep 2 in 3 (+3.4% at V = 262144), past the segments' cap 4
    and sweep 2 by hand (+5.5%; sweep 2 in 3 there: -9%); rows of PIPELINE_MIN_CHUNKS chunks or
    more, forward only (+1.5 to 3%) or 16-bit with a gradient (+5% at V = 8192). Not fp32 rows with
    a gradient (5% slower at V = 8192), nor rows of 2 chunks (2% slower)."""
    if segments_cap and n_cols >= SPLIT_MIN_COLS:
        seg_cols, block, warps = SPLIT_COLS[element_size]
        segments = next_power_of_2(cdiv(n_cols, seg_cols))
        past_cap = segments > segments_cap
        if past_cap:  # longer segments, swept in chunks
            segments = segments_cap
            if block > MAX_ROW_BLOCK:
                block, warps = MAX_ROW_BLOCK, 4
        stages = stages2 = 0
        if element_size == 2:
            if segments >= FEW_WARPS_SEGMENTS:
                warps, stages, stages2 = 2, 4, (0 if past_cap else 3)
            else:
                stages = 3
        return LaunchConfig(block=block, num_warps=warps, segments=segments, stages=stages, stages2=stages2)
    block = row_block(n_cols)
    pipelined = cdiv(n_cols, block) >= PIPELINE_MIN_CHUNKS and (element_size == 2 or not write_grad)
    if n_cols <= ROWS_MAX_BLOCK:  # short rows, several a program of one warp: see ROWS_VALUES
        return LaunchConfig(block=block, num_warps=1, rows=ROWS_VALUES // block)
    # a row in one chunk: see SINGLE_ROW_VALUES; in chunks: 8 values a thread (BLOCK 2048, 8 warps)
    per_thread = SINGLE_ROW_VALUES if n_cols <= block else 8
    return LaunchConfig(block=block, num_warps=max(1, block // (32 * per_thread)), stages=3 if pipelined else 0)


def segment_length(n_cols: int, segments: int, block: int, shift: int) -> int:
    """The columns of each program of a split launch (``seg_len`` in the kernel): whole chunks of
    ``block``, ``segments`` of them covering the row, and with a ``shift`` (SHIFT in the kernel) the
    shift - 1 columns more that its sweeps may count."""
    return cdiv(cdiv(n_cols + max(shift - 1, 0), segments), block) * block


def row_shift(logits: Tensor, grad: Tensor | None) -> int:
    """SHIFT for the rows kernel (rows swept in chunks or split): 16 // the element size where the rows
    do not all start and end on 16-byte boundaries (V or the row stride not a multiple of it) and can
    be swept from the boundary before them, that is where the logits and the gradient start on one
    and their row strides agree modulo it (a gradient of the logits' strides, or the logits
    themselves); else 0."""
    per_vector = 16 // logits.element_size()
    stride = logits.stride(0)
    if not (logits.shape[1] % per_vector or stride % per_vector) or logits.data_ptr() % 16:
        return 0
    if grad is not None and (grad.data_ptr() % 16 or (grad.stride(0) - stride) % per_vector):
        return 0
    return per_vector


def rows_planes(need_a: bool, rest: bool, softcap: bool) -> int:
    """Floats a row that a launch of several rows a program (ROWS) keeps in its statistics' buffer:
    the row's max and sum and its gradient's kp and ref, the sums of NEED_A, the coefficients A and B
    of REST, and last a softcap's captured target logit (CAPTURE_XY in the kernel, which only a softcap
    takes: its plane is there for every softcap, so that this need not repeat the kernel's condition)."""
    return 4 + 2 * need_a + 2 * rest + softcap


# Columns launches (3-D logits): positions a program and warps. A program's sweep 2 re-reads its
# V x block logits from cache, so the block shrinks as V grows, down to one position a thread
# (chosen from those sizes, not yet tuned on a GPU).
COLUMNS_WARPS = 4
COLUMNS_CACHED_VALUES = 16384  # V x block, at most, where the block is above its floor


@functools.lru_cache(maxsize=1024)
def columns_config(n_cols: int) -> LaunchConfig:
    """The launch of the columns kernel for positions of ``n_cols`` classes: up to 512 positions a
    program (4 a thread), fewer as the classes grow (V x block <= COLUMNS_CACHED_VALUES), at least
    one a thread."""
    floor = 32 * COLUMNS_WARPS
    block = max(floor, min(512, 1 << max(0, (COLUMNS_CACHED_VALUES // max(n_cols, 1)).bit_length() - 1)))
    return LaunchConfig(block=block, num_warps=COLUMNS_WARPS)


def cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    divisors: Tensor | None,
    grad: Tensor | None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    gamma: float | None = None,
    mean: bool = False,
    reduce: bool = False,
    loss_dtype: torch.dtype = torch.float32,
    prediction: Tensor | None = None,
    predicted: Tensor | None = None,
    config: LaunchConfig | None = None,
) -> Tensor:
    """Per-row cross-entropy (or softmax focal loss when ``gamma`` is set), and optionally its gradient.

    logits: (N, V) fp32/bf16/fp16 with stride(1) == 1 (any row stride); or (N, V, D), any strides:
    N D positions (n, d), each a row of V classes strided in memory (``_cross_entropy_columns_kernel``;
    the N-D input of torch's cross_entropy with its class dimension second, its inner ones flattened).
    target: (N,) int64 class indices, or (N, V) float probabilities with stride(1) == 1; for 3-D
    logits, (N, D) contiguous class indices, or (N, V, D) probabilities of any strides. weight: (V,)
    fp32 contiguous, or None.
    divisors: on the device (read in fp32; see ``common.launch_divisor``), what each row's loss and
    gradient are divided by: [ce_div, z_div]
    (ce_scale = 1 / ce_div, z_scale = 1 / z_div below), or one value for both, or None for 1 (no
    tensor, no read).
    mean: divide by the mean's denominators instead, computed on the device by a small kernel
    launched first (``divisors`` must be None): ce_div is the sum of the class weights w_y of the
    counted rows (target != ignore_index), or their count without weights; z_div is their count.
    With probability targets every row counts and ce_div = z_div = N (torch's mean for them).
    grad: None (forward only), a tensor of the logits' shape and dtype (2-D: with stride(1) == 1), or
    ``logits`` itself (the gradient overwrites the logits row by row).

    prediction, predicted (both or neither; ``reduce`` only, with ``grad``): one fp32 value each. The gradient is
    written multiplied by ``prediction``, a power of two (the backward's grad_output foreseen, see
    ``common.scale_grad_``), which is copied to ``predicted`` for the backward. An fp16 gradient is
    multiplied by at most 1 / max(|ce_scale|, |z_scale|) instead (never more than unscaled: no overflow), and
    ``predicted`` holds the factor used.
    config: launch parameters (``launch_config(logits, grad is not None)`` when None); for tuning.

    Extra memory: the (N,) loss (N D for 3-D logits), for ``mean`` up to 32 floats, for a split
    launch N + 1 int32 counters and N x segments x 8 floats of statistics, and for several rows a
    program (short rows) 4 to 9 N floats of statistics (``rows_planes``).

    Launches the prologue kernel (for ``mean``, and a split launch's counters), the loss kernel, and
    for a 16-bit ``reduce`` the sum's (``reduce_partials``).

    Returns the loss in ``loss_dtype``, one a row: (N,), or (N, D) for 3-D logits; ce_scale *
    loss_ce + z_scale * z_loss * lse^2 each. With ``reduce``, the 0-dim sum of those losses instead,
    in ``loss_dtype``, summed in fp32 in a fixed order (the rows' fp32 losses are a temporary, summed
    by ``reduce_partials``). Ignored rows give 0 * ce_scale and a zero gradient row; out-of-range
    targets give NaN (loss and gradient row).
    """
    columns = logits.dim() == 3
    if logits.dim() != 2 and not columns:
        raise ValueError(f"cross_entropy_fwd: logits must be 2-D or 3-D, got {tuple(logits.shape)}")
    n_cols = logits.shape[1]
    n_rows = logits.shape[0] * (logits.shape[2] if columns else 1)  # positions, for 3-D logits
    if n_cols >= 2**31:
        raise ValueError(f"cross_entropy_fwd: {n_cols} classes: the kernel indexes columns with int32")

    def unit_class_stride(t: Tensor) -> bool:  # a single class has no class stride to speak of
        return columns or t.stride(1) == 1 or n_cols == 1

    if not unit_class_stride(logits):
        raise ValueError(f"cross_entropy_fwd: 2-D logits must have stride(1) == 1, got strides {logits.stride()}")
    prob = target.is_floating_point()
    if prob:
        if target.shape != logits.shape or not unit_class_stride(target):
            raise ValueError("cross_entropy_fwd: probability targets must have the logits' shape (2-D: with "
                             "stride(1) == 1)")
        if gamma is not None:
            raise ValueError("cross_entropy_fwd: focal loss (gamma) takes class-index targets only")
    else:
        rows_shape = (logits.shape[0], logits.shape[2]) if columns else (n_rows,)
        if target.shape != rows_shape or (n_rows > 1 and not target.is_contiguous()):
            raise ValueError(f"cross_entropy_fwd: class-index target must be a contiguous {rows_shape} tensor")
    if grad is not None and (grad.shape != logits.shape or not unit_class_stride(grad)):
        raise ValueError("cross_entropy_fwd: grad must have the logits' shape (2-D: with stride(1) == 1)")
    if weight is not None and (weight.shape != (n_cols,) or not weight.is_contiguous()):
        raise ValueError(f"cross_entropy_fwd: weight must be a contiguous ({n_cols},) tensor")
    check_prediction("cross_entropy_fwd", prediction, predicted, reduce, (grad,))
    if divisors is not None and mean:
        raise ValueError("cross_entropy_fwd: divisors must be None with mean=True (the mean's are computed)")
    divisors = launch_divisor("cross_entropy_fwd", divisors, (1, 2))

    rows_out = (logits.shape[0], logits.shape[2]) if columns else (n_rows,)
    if n_rows == 0:
        return logits.new_zeros((), dtype=loss_dtype) if reduce else logits.new_empty(rows_out, dtype=loss_dtype)
    loss = logits.new_empty(n_rows, dtype=torch.float32 if reduce else loss_dtype)
    cfg = config or (columns_config(n_cols) if columns else launch_config(logits, grad is not None))
    split = cfg.segments > 0 and not columns
    segments = max(cfg.segments, 1)
    if segments & (segments - 1):
        raise ValueError(f"cross_entropy_fwd: segments must be 0 or a power of two, got {segments}")
    rows = 1 if columns else cfg.rows
    # (not for a row in one chunk: its edges would cost more than its vectors save, bench/NOTES.md section 30)
    chunked = rows == 1 and not (columns or prob) and (split or n_cols > cfg.block)
    shift = row_shift(logits, grad) if chunked else 0
    seg_len = segment_length(n_cols, segments, cfg.block, shift) if split else n_cols
    if rows != 1 and (rows < 1 or rows & (rows - 1) or split or seg_len > cfg.block):
        raise ValueError(f"cross_entropy_fwd: rows must be a power of two, and above 1 only for rows in one chunk "
                         f"(not split), got {rows}")
    # SPLIT's counters and statistics (a row per program touches neither: the logits stand in)
    sync = torch.empty(1 + n_rows, dtype=torch.int32, device=logits.device) if split else logits
    stats = torch.empty(n_rows * segments * STATS, dtype=torch.float32, device=logits.device) if split else logits
    n_parts, z_off = 1, (0 if divisors is None or divisors.numel() == 1 else 1)
    if mean or split:
        programs = min(PARTS, cdiv(n_rows, PART_ROWS))
        weighted = mean and weight is not None and not prob
        if mean:  # one part per program
            n_parts, z_off = programs, programs if weighted else 0
            divisors = logits.new_empty((2 if weighted else 1) * n_parts, dtype=torch.float32)
        launch(
            _prologue_kernel,
            programs,
            target,
            weight if weighted else sync,  # placeholders are never touched
            divisors if mean else sync,
            sync,
            n_rows,
            n_cols,
            ignore_index,
            COUNT=mean,
            WEIGHTED=weighted,
            PROB=prob,
            ZERO_SYNC=split,
            BLOCK=PART_ROWS,
            num_warps=4,
            enable_fp_fusion=FP_FUSION,
        )
    cap = 1.0 if softcap is None else float(softcap)
    # the constexpr arguments both kernels take (and then each its own), handed to the launch as they are
    options = dict(
        HAS_WEIGHT=weight is not None,
        SMOOTH=label_smoothing != 0.0,
        ZLOSS=z_loss != 0.0,
        SOFTCAP=softcap is not None,
        TANH_SERIES=softcap is not None and (logits.dtype == torch.float32 or cap > FAST_TANH_MAX_CAP),
        PROB=prob,
        FOCAL=gamma is not None,
        WRITE_GRAD=grad is not None,
        NEED_A=prob or label_smoothing != 0.0,
        REST=prob or label_smoothing != 0.0 or z_loss != 0.0,
        INTERPRET=interpreting(),
        SCALED=divisors is not None,
        PREDICT=prediction is not None,
        PARTS=PARTS,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
        enable_fp_fusion=FP_FUSION,
    )
    scalars = (ignore_index, float(label_smoothing), float(z_loss), cap, 1.0 / cap,
               0.0 if gamma is None else float(gamma))
    weight = weight if weight is not None else logits  # placeholders are never read
    divisors = divisors if divisors is not None else logits
    if columns:
        n_inner = logits.shape[2]
        row_blocks = n_inner >= cfg.block
        options["ROW_BLOCKS"] = row_blocks
        programs = logits.shape[0] * cdiv(n_inner, cfg.block) if row_blocks else cdiv(n_rows, cfg.block)
        launch_with(_cross_entropy_columns_kernel, programs, (
            logits,
            *logits.stride(),
            target,
            *(target.stride() if prob else (0, 0, 0)),
            weight,
            divisors,
            n_parts,
            z_off,
            grad if grad is not None else logits,
            *(grad.stride() if grad is not None else (0, 0, 0)),
            loss,
            prediction,  # None without PREDICT (cheaper to launch than a placeholder tensor)
            predicted,
            n_rows,
            n_inner,
            n_cols,
            *scalars,
        ), options)
        return reduce_partials(loss, loss_dtype) if reduce else loss.view(rows_out)
    options.update(SINGLE=seg_len <= cfg.block, SPLIT=split, SEGMENTS=segments, STATS=STATS, SHIFT=shift,
                   **cfg.kernel_constexprs)
    if rows > 1:  # ROWS's statistics
        planes = rows_planes(options["NEED_A"], options["REST"], options["SOFTCAP"])
        stats = torch.empty(n_rows * planes, dtype=torch.float32, device=logits.device)
    launch_with(_cross_entropy_kernel, cdiv(n_rows, rows) * segments, (
        logits,
        logits.stride(0),
        target,
        target.stride(0) if prob else 0,
        weight,
        divisors,
        n_parts,
        z_off,
        grad if grad is not None else logits,
        grad.stride(0) if grad is not None else 0,
        loss,
        sync,
        stats,
        prediction,
        predicted,
        n_rows,
        n_cols,
        seg_len,
        *scalars,
    ), options)
    return reduce_partials(loss, loss_dtype) if reduce else loss
