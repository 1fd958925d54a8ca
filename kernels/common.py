"""Shared Triton helpers, launch heuristics and launching, and the backward's gradient-scaling kernel.

Everything here is used by the loss kernels in this package; it imports only torch and triton and
does no work at import time (no device queries, no compilation).
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime import driver
from triton.runtime.interpreter import InterpretedFunction

# --------------------------------------------------------------------------------------------------
# Launch heuristics
# --------------------------------------------------------------------------------------------------

# Largest chunk of a row kernel launched one row per program: a row with V <= MAX_ROW_BLOCK is read
# once and kept in registers; a longer row is swept in chunks of this size (2048: the best chunk
# for rows read without a gradient or split, tuned on an H100, bench/NOTES.md).
MAX_ROW_BLOCK = 2048
# Elements per program for flat elementwise kernels.
ELEMENTWISE_BLOCK = 4096
# Every launch passes enable_fp_fusion=FP_FUSION: the kernels' instruction counts, and the roundings
# their comments describe (x log2e - ref log2e in one FMA, say), assume fused multiply-adds, and
# Triton's default is changing (3.9 warns that 3.10 turns them off unless TRITON_DEFAULT_FP_FUSION is
# set). TRITON_FORCE_DISABLE_FP_FUSION still turns them off.
FP_FUSION = True


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b. (``triton.cdiv`` does the same, and its wrapper costs 2-3 µs of
    host time per call.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_block(n_cols: int, max_block: int = MAX_ROW_BLOCK) -> int:
    """Chunk size for a row of ``n_cols`` values: the whole row when it fits (at least one warp's
    width, 32), else ``max_block``."""
    return max(32, min(next_power_of_2(n_cols), max_block))


def num_warps_for(block: int) -> int:
    """Warps for a program that handles ``block`` values at a time: about 16 values per thread
    (a 16-byte vector load per thread for 16-bit data and two for fp32), between 1 and 8 warps."""
    return max(1, min(8, block // 512))


# --------------------------------------------------------------------------------------------------
# Shared @triton.jit math helpers (fp32 in, fp32 out)
# --------------------------------------------------------------------------------------------------


# Fast approximate math for the GPU. tl.exp2 / tl.log2 / `/` compile to the MUFU unit plus a few
# instructions each that keep denormal inputs and results exact; the .ftz forms below are one MUFU
# instruction each (relative error ~2^-22, denormals flushed to 0, inf and NaN kept), which matters
# where a kernel's instruction count, not its bytes, would set its speed. The interpreter cannot
# run PTX, so INTERPRET falls back to the tl functions.


@triton.jit
def _mufu(x, PTX: tl.constexpr):
    return tl.inline_asm_elementwise(PTX, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def exp2(x, INTERPRET: tl.constexpr):
    """2^x."""
    return tl.exp2(x) if INTERPRET else _mufu(x, "ex2.approx.ftz.f32 $0, $1;")


@triton.jit
def log2(x, INTERPRET: tl.constexpr):
    """log2(x)."""
    return tl.log2(x) if INTERPRET else _mufu(x, "lg2.approx.ftz.f32 $0, $1;")


@triton.jit
def rcp(x, INTERPRET: tl.constexpr):
    """1 / x."""
    return 1.0 / x if INTERPRET else _mufu(x, "rcp.approx.ftz.f32 $0, $1;")


@triton.jit
def mul_rn(a, b, INTERPRET: tl.constexpr):
    """a * b, rounded on its own: never fused into a multiply-add with a later sum (ptxas may fuse a
    plain mul.f32 with an add.f32 that uses it), so the product is the same bits wherever it is used."""
    if INTERPRET:
        return a * b
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                     pack=1)


# Constants used inside kernels are @triton.jit functions, not tl.constexpr globals: before every
# launch Triton compares each constexpr global a kernel uses with its value at compile time (the
# cross-entropy kernel's five cost ~7 µs of host time per step on a CPU, bench/NOTES.md section 7).
# A function's literal is folded into the kernel at compile time, and nothing is checked at launch.


@triton.jit
def log2e():
    """log2(e): exp(x) = 2^(x log2 e)."""
    return 1.4426950408889634


@triton.jit
def _expm1_series(x):
    """exp(x) - 1 for |x| < 0.5: a degree-8 Taylor polynomial in Horner form (truncation error
    < 0.5^8 / 9! ~ 1e-8 relative)."""
    p = 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    p = p * x + 1.0
    return p * x


@triton.jit
def expm1(x, SCALAR: tl.constexpr):
    """exp(x) - 1 with full relative precision near 0 (tl.math has no expm1, and libdevice is not
    portable to the interpreter): the series for |x| < 0.5; elsewhere exp(x) - 1 loses no precision.
    SCALAR: x is one value for the whole program, which branches to one of the two (a tensor of
    lanes computes both and selects)."""
    if SCALAR:
        if tl.abs(x) < 0.5:
            r = _expm1_series(x)
        else:
            r = tl.exp(x) - 1.0
    else:
        r = tl.where(tl.abs(x) < 0.5, _expm1_series(x), tl.exp(x) - 1.0)
    return r


@triton.jit
def atanh_log(z):
    """2 atanh(z) = log((1 + z) / (1 - z)) for |z| <= 1/3, as an odd series to z^13 (relative
    truncation error < 2e-8): log(1 + x) with z = x / (2 + x), without a log. The factor 2 sits in
    the coefficients (scaling by 2 is exact, so this equals 2 z (1 + z^2/3 + ...) bit for bit, one
    multiplication fewer)."""
    z2 = z * z
    p = 2.0 / 13.0
    p = p * z2 + 2.0 / 11.0
    p = p * z2 + 2.0 / 9.0
    p = p * z2 + 2.0 / 7.0
    p = p * z2 + 2.0 / 5.0
    p = p * z2 + 2.0 / 3.0
    p = p * z2 + 2.0
    return z * p


@triton.jit
def log1p(x, SCALAR: tl.constexpr):
    """log(1 + x) with full relative precision near 0, for x > -1: atanh_log for |x| < 0.5 (where
    |z| <= 1/3); elsewhere log(1 + x) loses nothing, even with a fast approximate log. SCALAR: as
    for expm1."""
    if SCALAR:
        if tl.abs(x) < 0.5:
            r = atanh_log(x / (2.0 + x))
        else:
            r = tl.log(1.0 + x)
    else:
        r = tl.where(tl.abs(x) < 0.5, atanh_log(x / (2.0 + x)), tl.log(1.0 + x))
    return r


@triton.jit
def softcap(x, cap, inv_cap, SERIES: tl.constexpr, INTERPRET: tl.constexpr):
    """cap * tanh(x / cap), which squashes logits into (-cap, cap), and its slope 1 - tanh^2.

    With E = exp(-2|u|), u = x / cap: tanh|u| = (1 - E) / (1 + E), and 1 - tanh^2 = 4E / (1 + E)^2,
    one exponential and one reciprocal for both. The slope keeps ~1e-6 relative precision in fp32
    however saturated (0 at x = -inf), where 1 - t^2 from a rounded fp32 tanh (torch's tanh backward)
    is 3e-3 off at x = 6 cap and has no digit left past 9 cap, and from the capped logit over cap
    more so.

    SERIES takes 1 - E as -expm1(-2|u|) from its series near 0, for full relative precision at small
    u (fp32 logits, and large caps). Without it, 1 - E is within ~2.4e-7 of its value absolutely (the
    GPU's exp2 approximation), so the capped logit within ~2.4e-7 cap: the softmax sees differences of
    logits, so that is the relative error of its probabilities (see FAST_TANH_MAX_CAP in
    cross_entropy.py, which bounds cap for 16-bit logits), for ~12 fewer instructions per element in
    each sweep. The capped logit is one rounded product (``mul_rn``), the same bits wherever it is used."""
    if SERIES:
        u = x * inv_cap
        z = -2.0 * tl.abs(u)
        near0 = z > -0.5
        series = _expm1_series(z)
        big_e = exp2(z * log2e(), INTERPRET)
        e = tl.where(near0, series + 1.0, big_e)  # exp(z), without 1 + expm1(z)'s cancellation
        em1 = tl.where(near0, series, big_e - 1.0)  # expm1(z)
    else:
        u = x  # (its sign)
        e = exp2(tl.abs(x) * (inv_cap * (-2.0 * log2e())), INTERPRET)
        em1 = e - 1.0
    r = rcp(1.0 + e, INTERPRET)
    t = -em1 * r  # tanh|u|; saturates to 1 (x = +-inf: e = 0)
    return mul_rn(cap, tl.where(u < 0, -t, t), INTERPRET), 4.0 * e * (r * r)


@triton.jit
def cast_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) converted to DTYPE with round-to-nearest-even. The GPU conversion already rounds to
    nearest even; Triton's interpreter truncates fp32 -> bf16, so under it (INTERPRET, see
    ``interpreting()``) bf16 is rounded by hand on the bits first, and a NaN becomes the quiet NaN
    (truncated, or rounded, a NaN whose payload lies in the low 16 bits would read inf)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = tl.where(x != x, float("nan"), bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def load_block_pair(a_ptr, b_ptr, n, BLOCK: tl.constexpr):
    """Elementwise kernels' inputs: this program's BLOCK of two same-sized streams, in fp32, with
    int64 offsets and streaming (evict_first) loads. Returns (offs, mask, a, b)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    return offs, mask, a, b


@triton.jit
def inverse_of_parts(parts_ptr, n_parts, PARTS: tl.constexpr):
    """1 / (the sum of the n_parts <= PARTS values at parts_ptr, in fp32): summed in a fixed order,
    inverted correctly rounded. A loss's divisor on the device: the mean's, in parts, or the public
    functions' ``divisor`` (one part)."""
    k = tl.arange(0, PARTS)
    return tl.math.div_rn(1.0, tl.sum(tl.load(parts_ptr + k, mask=k < n_parts, other=0).to(tl.float32), axis=0))


@triton.jit
def _sum_kernel(x_ptr, out_ptr, n, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    """One program: out = the sum of the n fp32 values at x_ptr, accumulated in fp32 lane by lane over
    the blocks in order, then summed across the lanes, and rounded once to out's dtype."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, cast_to(tl.sum(acc, axis=0), out_ptr.dtype.element_ty, INTERPRET))


SUM_BLOCK = 4096  # partials per iteration of _sum_kernel: 16384 partials (Huber bf16 at 2^27) take 4


def reduce_partials(partials: Tensor, dtype: torch.dtype) -> Tensor:
    """The reduced loss from a launch's fp32 partials (one per program or per row), deterministic (a
    fixed order; an empty sum is 0): an fp32 sum by torch; any other dtype by ``_sum_kernel``, which
    sums in fp32 and rounds once, in one launch where torch's sum and a 0-dim cast would be two ops
    (the cast alone cost ~9 µs of host time inside a step on a CPU, bench/NOTES.md)."""
    if dtype == torch.float32:
        return partials.sum()
    out = partials.new_empty((), dtype=dtype)
    launch(_sum_kernel, 1, partials, out, partials.numel(), INTERPRET=interpreting(), BLOCK=SUM_BLOCK, num_warps=8,
           enable_fp_fusion=FP_FUSION)
    return out


@triton.jit
def store_loss(out_ptr, offs, mask, loss, REDUCE: tl.constexpr, INTERPRET: tl.constexpr):
    """Elementwise kernels' loss output: the per-element loss in out_ptr's dtype, or (REDUCE) one
    fp32 partial sum per program, which the launcher sums (``reduce_partials``; no atomics)."""
    if REDUCE:
        tl.store(out_ptr + tl.program_id(0), tl.sum(tl.where(mask, loss, 0.0), axis=0))
    else:
        tl.store(out_ptr + offs, cast_to(loss, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def elementwise_loss_output(fn: str, named: dict, reduce: bool, loss_dtype, block: int) -> tuple[int, int, Tensor]:
    """Host side of the elementwise launchers. Checks that the given tensors (``None`` entries are
    skipped; the first is the input) are contiguous with the input's element count, and allocates
    the loss output: the elementwise loss (input's shape, ``loss_dtype`` or else input's dtype), or
    with ``reduce`` one fp32 partial sum per program of ``block`` elements. Returns (n, number of
    programs, output)."""
    given = [(name, t) for name, t in named.items() if t is not None]
    first_name, first = given[0]
    n = first.numel()
    for name, t in given:
        if t.numel() != n:
            raise ValueError(f"{fn}: {name} has {t.numel()} elements, {first_name} has {n}")
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous")
    n_programs = cdiv(n, block)
    if reduce:
        return n, n_programs, first.new_empty(n_programs, dtype=torch.float32)
    return n, n_programs, first.new_empty(first.shape, dtype=loss_dtype or first.dtype)


# What a divisor may be stored as on the device: the kernels read it in fp32 (a token count as the
# int64 it was counted in, with no cast of its own before the launch).
DIVISOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32)


def launch_divisor(fn: str, divisor: Tensor | None, sizes: tuple[int, ...] = (1,)) -> Tensor | None:
    """Launchers: ``divisor`` (None, or a contiguous tensor of one of ``sizes`` real values, on the
    inputs' device), which the kernel divides the loss and the gradients by, as the kernel reads it:
    as it is in a dtype of DIVISOR_DTYPES, else cast to fp32."""
    if divisor is None:
        return None
    if divisor.numel() not in sizes or not divisor.is_contiguous() or divisor.is_complex():
        raise ValueError(f"{fn}: divisor must be a contiguous real tensor of {' or '.join(map(str, sizes))} "
                         f"value(s), or None")
    return divisor if divisor.dtype in DIVISOR_DTYPES else divisor.to(torch.float32)


def check_prediction(fn: str, prediction: Tensor | None, predicted: Tensor | None, reduce: bool,
                     grads: tuple[Tensor | None, ...]) -> None:
    """Launchers: ``prediction`` and ``predicted`` come together, with a reduced loss (a scalar
    grad_output) and a gradient to write."""
    if (prediction is None) != (predicted is None) or (
            prediction is not None and (not reduce or all(g is None for g in grads))):
        raise ValueError(f"{fn}: prediction and predicted come together, with reduce and a gradient")


# ``triton.jit`` reads TRITON_INTERPRET once, when a kernel is defined, and makes an interpreted kernel
# then; asking a kernel rather than the variable keeps this right for every spelling Triton accepts.
# Asked once, here: torch.compile traces ``interpreting()``, and where a GPU makes Dynamo wrap a
# JITFunction as a Triton kernel, it cannot trace an isinstance of one.
_INTERPRETING = isinstance(_sum_kernel, InterpretedFunction)


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels: their INTERPRET switch. Its fp32 -> bf16 cast
    truncates (see ``cast_to``) and it cannot run inline PTX (see ``exp2``)."""
    return _INTERPRETING


# --------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------

# Kernels launch through ``launch``, which calls a compiled variant of the kernel directly once Triton
# has compiled it. It is used with the Triton releases whose argument specialization
# ``_specialization`` was checked against (3.6 to 3.9: tests/launch_check.py checks the installed
# one); other releases launch through Triton's own path.
_DIRECT_RELEASES = ((3, 6), (3, 7), (3, 8), (3, 9))
TRITON_RELEASE = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])  # (3, 9), say
_DIRECT = TRITON_RELEASE in _DIRECT_RELEASES
# Compiled variants by (kernel, device, the runtime arguments' specialization, the constexpr arguments
# and launch options), with the kernel's constexpr parameter names: everything Triton's own cache key
# holds, so there are at most as many entries as compiled variants.
_COMPILED: dict = {}


def _specialization(args: tuple) -> tuple | None:
    """What Triton compiles a kernel for, given its runtime arguments: a tensor's dtype and whether its
    address is a multiple of 16; an int's type (int32, int64 or uint64 by its value), whether it is 1
    (then a constant) and whether it is a multiple of 16; a float, a bool or None by type alone. None
    for any other argument (left to Triton)."""
    spec = []
    for a in args:
        t = type(a)
        if t is int:
            spec.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63))
        elif t is float or t is bool or a is None:
            spec.append(t)
        elif isinstance(a, Tensor):
            spec.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            return None
    return tuple(spec)


def launch(kernel, programs: int, *args, **constexprs) -> None:
    """``kernel[(programs,)](*args, **constexprs)``, with the runtime arguments given by position, in
    the kernel's order, and every constexpr argument and launch option by name (see ``launch_with``).
    """
    launch_with(kernel, programs, args, constexprs)


def launch_with(kernel, programs: int, args: tuple, constexprs: dict) -> None:
    """``launch``, with the constexpr arguments and launch options in a dict of their own, used as it
    is (a launcher that builds its options once, for two kernels, hands them over without a copy).

    Before each driver call, Triton's launch path binds and specializes every argument and builds its
    cache key in Python: 10-20 µs of host time per launch on a CPU, which a short step waits for
    (bench/NOTES.md, section 9). Here the first launch of a variant goes through Triton, which compiles
    it, and later ones call the compiled kernel (``CompiledKernel[grid]``, on the current stream as
    Triton's launch reads it, with Triton's launch hooks, so profilers still see every launch), found
    by what Triton specializes on.
    Triton's own options (``TRITON_DEBUG``, say) are read at a variant's first launch. Under the
    interpreter, and with Triton releases not checked, every launch goes through Triton.
    """
    spec = _specialization(args) if _DIRECT and not isinstance(kernel, InterpretedFunction) else None
    if spec is None:
        kernel[(programs,)](*args, **constexprs)
        return
    device = driver.active.get_current_device()
    key = (id(kernel), device, spec, *constexprs.items())
    found = _COMPILED.get(key)
    if found is not None:
        compiled, names = found
        # the stream given, so that the compiled kernel's launch does not ask for the device again
        compiled[(programs, 1, 1)](*args, *[constexprs[name] for name in names],
                                   stream=driver.active.get_current_stream(device))
        return
    names = kernel.arg_names[len(args):]
    missing = [name for name in names if name not in constexprs]
    if missing:
        raise TypeError(f"launch: {kernel.__name__} takes {', '.join(missing)} by name")
    compiled = kernel[(programs,)](*args, **constexprs)
    if compiled is not None:  # (None when a compile hook skipped it)
        _COMPILED[key] = (compiled, names)


# --------------------------------------------------------------------------------------------------
# Backward: grad *= grad_output
# --------------------------------------------------------------------------------------------------


@triton.jit
def _scale_block(grad_ptr, offs, n_elements, row_len, inner, row_stride, col_stride, inner_stride, s, go_ptr,
                 PER_ROW: tl.constexpr, STRIDED: tl.constexpr, INTERPRET: tl.constexpr):
    """grad *= s at the flat indices ``offs`` of grad's logical (rows, cols, inner) view (row_len =
    cols x inner; inner = 1 for 2-D gradients): with PER_ROW, s is grad_output's value of the row's
    (row, inner) position; with STRIDED, the element is at row row_stride + col col_stride + d
    inner_stride."""
    mask = offs < n_elements
    if PER_ROW or STRIDED:
        row = offs // row_len
        rem = offs - row * row_len
        col = rem // inner
        d = rem - col * inner  # (0 for 2-D gradients: inner is the constant 1 there)
    if STRIDED:
        addr = row * row_stride + col * col_stride + d * inner_stride
    else:
        addr = offs
    if PER_ROW:
        s = tl.load(go_ptr + row * inner + d, mask=mask, other=1.0).to(tl.float32)
    g = tl.load(grad_ptr + addr, mask=mask, eviction_policy="evict_first").to(tl.float32)
    tl.store(grad_ptr + addr, cast_to(g * s, grad_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def next_prediction(g):
    """What a forward should multiply its gradient by, given the latest scalar grad_output g (see
    ``scale_grad_``): g itself when it is a power of two in [2^-24, 2^24] (multiplying by it is exact
    in every float format fastloss writes, barring values below the smallest normal), else 0,
    "unknown" (see ``predicted_factor``): 1, but for fp16, which then writes its gradient unscaled.
    A 1 there wrote an fp16 mean's gradient divided by its element count, mostly below fp16's
    smallest normal, whenever a loss of the same kind with a factor of its own (an auxiliary loss
    weighted 0.4 under a loss scaler) had run its backward last."""
    bits = g.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) & 0xFF  # biased; the sign bit must be 0 (bits >= 0)
    pow2 = (bits >= 0) & ((bits & 0x7FFFFF) == 0) & (exponent >= 127 - 24) & (exponent <= 127 + 24)
    return tl.where(pow2, g, 0.0)


@triton.jit
def predicted_factor(prediction_ptr, predicted_ptr, scale, first, grad_ptr):
    """The factor a forward multiplies its gradient by (not its loss): the prediction of grad_output
    at prediction_ptr (a power of two, or 0 while unknown: then 1), copied to predicted_ptr by the
    ``first`` program for the backward (see ``scale_grad_``). ``scale``: what the gradient is
    already multiplied by (a mean's 1 / its divisor). An fp16 gradient (max 65504) is never written
    past the unscaled one (scale 1), so that no prediction can overflow it: where scale * p > 1 (a
    loss scaler's 2^16 over a mean of fewer elements or weights), or p is unknown, it is written
    unscaled, times 1 / |scale|, and the backward's pass applies the rest. Written times the scale,
    a mean over thousands put most of it below fp16's smallest normal (6.1e-5) before the scaler's
    factor came. Nor is it written times a p below 1 (a divided loss): should the grad_output that
    comes be larger (2^-24 predicted, then 1, or a loss scaler's 2^16), the gradient written that
    much smaller would lose its small entries, or all of it, to fp16's subnormals before the
    backward multiplied it back; it is written unscaled there too. The cap need not be a power of
    two. scale = inf (a mean over no weight) keeps p: 0 would leave the backward 1/0; so does
    scale = 0 (a Huber delta below fp32's range): inf would make the gradient 0 * inf.
    What is "unscaled" is the caller's to say through ``scale``: a gradient that fp16 holds once
    divided by it (~1 per element for the softmax losses, the z-loss's own mean folded in; Huber's
    summed loss's, bounded by its launcher: huber.FP16_UNSCALED_MAX)."""
    p = tl.load(prediction_ptr)
    if grad_ptr.dtype.element_ty == tl.float16:
        mag = tl.abs(scale)
        unscaled = 1.0 / mag
        p = tl.where(((mag * p > 1.0) | (p < 1.0)) & (unscaled > 0.0) & (mag > 0.0), unscaled, p)
    p = tl.where(p == 0.0, 1.0, p)
    if first:
        tl.store(predicted_ptr, p)
    return p


@triton.jit
def _scale_grad_kernel(
    grad_ptr,
    other_ptr,  # PAIR: a second gradient of grad's size and dtype, scaled alike (Huber's target's)
    go_ptr,
    predicted_ptr,  # PREDICTED: what the forward already multiplied grad by (a power of two)
    prediction_ptr,  # PREDICTED: the next forwards' prediction, updated from this grad_output
    n_elements,
    row_len,  # the logical (rows, cols, inner) view's cols x inner (see _scale_block)
    inner,
    row_stride,
    col_stride,
    inner_stride,
    PER_ROW: tl.constexpr,
    STRIDED: tl.constexpr,
    PREDICTED: tl.constexpr,
    PAIR: tl.constexpr,  # scalar grad_output only
    INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Flat index over the logical (rows, cols, inner) view; int64 so > 2^31 elements work. Reads N*V
    # (+ R per-row factors) and writes N*V (twice that with PAIR).
    start = tl.program_id(0).to(tl.int64) * BLOCK
    if PER_ROW:
        # One grad_output value per row (reduction='none'): one block per program.
        _scale_block(grad_ptr, start + tl.arange(0, BLOCK), n_elements, row_len, inner, row_stride, col_stride,
                     inner_stride, 1.0, go_ptr, PER_ROW, STRIDED, INTERPRET)
    else:
        # Scalar grad_output, read on the device. When it is exactly 1.0 (the usual loss.backward())
        # every program exits at once, and the grid is small (see scale_grad_) so that this costs a
        # few microseconds; otherwise the programs stride over the gradient.
        s = tl.load(go_ptr).to(tl.float32)
        if PREDICTED:
            if tl.program_id(0) == 0:
                tl.store(prediction_ptr, next_prediction(s))
            # what is left to multiply by: 1 when the prediction was right; exact either way, as the
            # prediction is a power of two, so grad ends bit for bit as without one
            s = tl.math.div_rn(s, tl.load(predicted_ptr))
        if s != 1.0:
            step = tl.num_programs(0).to(tl.int64) * BLOCK
            for base in range(start, n_elements, step):
                _scale_block(grad_ptr, base + tl.arange(0, BLOCK), n_elements, row_len, inner, row_stride,
                             col_stride, inner_stride, s, go_ptr, PER_ROW, STRIDED, INTERPRET)
                if PAIR:
                    _scale_block(other_ptr, base + tl.arange(0, BLOCK), n_elements, row_len, inner, row_stride,
                                 col_stride, inner_stride, s, go_ptr, PER_ROW, STRIDED, INTERPRET)


# Programs of the scalar scale_grad_ launch: a grid of 65536 programs that all exit at once still
# costs ~40 us on an H100 (a bf16 8192 x 32768 gradient); 1024 striding programs cost a few.
SCALE_GRAD_PROGRAMS = 1024


def scale_grad_(grad: Tensor, grad_output: Tensor, predicted: Tensor | None = None,
                prediction: Tensor | None = None, other: Tensor | None = None) -> Tensor:
    """In place grad *= grad_output, on the device, no host sync; returns grad.

    other: None, or a second contiguous gradient like grad (contiguous too), scaled in the same launch
    (scalar grad_output only): Huber's gradients for input and target.

    predicted, prediction (both or neither; scalar grad_output only): one fp32 value each. grad was
    written already multiplied by ``predicted``, a power of two, so grad *= grad_output / predicted
    instead, which moves no memory when the prediction was right; and ``prediction`` is set to
    ``next_prediction(grad_output)`` for the forwards to come.

    grad: contiguous (any float dtype), or 2-D with stride(1) == 1 and any row stride (the logits
    buffer reused by an in-place backward), or 3-D (N, C, D) of any strides (cross-entropy's
    positions: see ``cross_entropy.cross_entropy_fwd``). grad_output: fp32/bf16/fp16 with either 1
    element (a scalar: the kernel reads it on the device and every program exits at once when it is
    exactly 1.0, so the common loss.backward() moves no memory) or R elements, one per row of grad
    viewed as (R, grad.numel() // R) (reduction='none': per row for CE, per element for Huber); for a
    3-D grad, (N, D), one per position (n, d). Multiplies in fp32 and stores in grad's dtype.
    """
    n = grad.numel()
    n_go = grad_output.numel()
    if n == 0:
        return grad
    # grad as a logical (rows, cols, inner) view: see _scale_block
    inner, col_stride, inner_stride = 1, 1, 0
    positions = grad.dim() == 3 and (grad_output.shape == grad.shape[::2] or (n_go == 1 and not grad.is_contiguous()))
    if positions:
        strided = not grad.is_contiguous()
        (n_rows, _, inner), (row_stride, col_stride, inner_stride) = grad.shape, grad.stride()
    elif grad.is_contiguous():
        strided, row_stride = False, 0
        n_rows = max(n_go, 1)
    elif grad.dim() == 2 and grad.stride(1) == 1:
        strided, row_stride = True, grad.stride(0)
        n_rows = grad.shape[0]
        if n_go not in (1, n_rows):
            raise ValueError(f"scale_grad_: grad_output must have 1 or {n_rows} elements, got {n_go}")
    else:
        raise ValueError("scale_grad_: grad must be contiguous, 2-D with stride(1) == 1, or 3-D with a grad_output "
                         "of 1 element or one a position")
    if n_go == 0 or n % n_rows != 0:
        raise ValueError(f"scale_grad_: grad_output has {n_go} elements, which does not divide {n}")
    per_row = n_go > 1
    if (predicted is None) != (prediction is None) or (predicted is not None and per_row):
        raise ValueError("scale_grad_: predicted and prediction come together, with a scalar grad_output")
    if other is not None and (per_row or strided or not other.is_contiguous() or other.shape != grad.shape
                              or other.dtype != grad.dtype):
        raise ValueError("scale_grad_: other must be a contiguous gradient like grad, with a scalar grad_output")
    # A per-row grad_output may come from an expand (stride 0) or another view: O(R) copy at most.
    go = grad_output.reshape(-1).contiguous() if per_row else grad_output  # a scalar: read at its address
    n_blocks = cdiv(n, ELEMENTWISE_BLOCK)
    launch(
        _scale_grad_kernel,
        n_blocks if per_row else min(n_blocks, SCALE_GRAD_PROGRAMS),
        grad,
        other,  # None without PAIR
        go,
        predicted,  # None without PREDICTED (cheaper to launch than a placeholder tensor)
        prediction,
        n,
        n // n_rows,
        inner,
        row_stride,
        col_stride,
        inner_stride,
        PER_ROW=per_row,
        STRIDED=strided,
        PREDICTED=predicted is not None,
        PAIR=other is not None,
        INTERPRET=interpreting(),
        BLOCK=ELEMENTWISE_BLOCK,
        num_warps=8,
        enable_fp_fusion=FP_FUSION,
    )
    return grad
