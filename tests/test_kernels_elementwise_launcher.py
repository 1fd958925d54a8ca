"""Launcher-level tests of the elementwise kernels: kernels/huber.py (Huber, SmoothL1, L1) and
kernels/focal.py (sigmoid focal loss).

On CPU they run under Triton's interpreter on small shapes; with TRITON_INTERPRET=0 on a CUDA
machine the same tests run natively, plus a > 2^31-element case.
"""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fastloss.kernels.common import interpreting  # noqa: E402
from fastloss.kernels.focal import BLOCK as FOCAL_BLOCK  # noqa: E402
from fastloss.kernels.focal import sigmoid_focal_fwd  # noqa: E402
from fastloss.kernels.huber import BLOCK as HUBER_BLOCK  # noqa: E402
from fastloss.kernels.huber import block_for as huber_block  # noqa: E402
from fastloss.kernels.huber import huber_fwd  # noqa: E402

INTERPRET = interpreting()
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

LOW = [torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]


SIZES = ["n1-single", "n37-tiny-odd", "one-block", "blocks+tail"]


def size(name, block):
    """Element counts for a kernel of ``block`` elements per program: a single element; tiny and odd
    (one partial block); exactly one full block; several blocks plus a partial one (masking and
    multi-program partial sums)."""
    return {"n1-single": 1, "n37-tiny-odd": 37, "one-block": block, "blocks+tail": 3 * block + 5}[name]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def dev(t):
    return t.to(DEVICE)


def scale_for(reduction, n):
    return 1.0 / n if reduction == "mean" else 1.0


def max_err(a, truth):
    return (a.double() - truth.double()).abs().max().item()


def assert_rounded_once(ours, truth, dtype, rel=1e-5, soft=False):
    """ours (bf16/fp16) is the float64 truth computed in fp32 (relative error <= rel) and rounded
    once to dtype: within half an ulp, i.e. 0.5 * eps * |truth|, plus one subnormal step and fp32's
    smallest normal (fp32 subnormals may flush to zero), plus rel * max|truth| for soft focal
    targets, whose fp32 terms cancel. Triton's interpreter converts fp32 to bf16 by truncation
    rather than round-to-nearest (the GPU rounds to nearest), so there a bf16 result may be off by
    up to a whole ulp."""
    fi = torch.finfo(dtype)
    ulps = 1.0 if (INTERPRET and dtype == torch.bfloat16) else 0.5
    truth = truth.double()
    floor = fi.tiny * fi.eps + torch.finfo(torch.float32).tiny
    if soft:
        floor += rel * truth.abs().max().item()
    bound = (ulps * fi.eps + rel) * truth.abs() + floor
    err = (ours.double() - truth).abs()
    assert ours.dtype == dtype
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


# --------------------------------------------------------------------------------------------------
# Huber / SmoothL1 / L1
# --------------------------------------------------------------------------------------------------

# (loss, threshold, weighted). Thresholds on both sides of the error scale (|d| ~ 1.5): mostly
# linear (0.25), mixed (1.0), mostly quadratic (4.0), a non-dyadic one (0.3), and L1.
HUBER_VARIANTS = [
    pytest.param(("huber", 1.0, False), id="huber-d1"),
    pytest.param(("huber", 0.25, False), id="huber-d0.25"),
    pytest.param(("huber", 4.0, False), id="huber-d4"),
    pytest.param(("huber", 0.3, False), id="huber-d0.3"),
    pytest.param(("huber", 1.0, True), id="huber-d1-weighted"),
    pytest.param(("smooth_l1", 1.0, False), id="sl1-b1"),
    pytest.param(("smooth_l1", 0.25, False), id="sl1-b0.25"),
    pytest.param(("smooth_l1", 4.0, False), id="sl1-b4"),
    pytest.param(("l1", 0.0, False), id="l1"),
]


def huber_inputs(n, thr, dtype, seed=0, weighted=False):
    """input, target (and weight) with |d| spread around the threshold, plus exact boundary cases
    |d| == thr (both signs) and d == 0. Targets are multiples of 1/64, so in fp32 target +- thr is
    exact for the dyadic thresholds."""
    g = gen(seed)
    y = torch.round(torch.randn(n, generator=g) * 128) / 64
    x = y + torch.randn(n, generator=g) * 1.5
    k = n // 8
    x[:k] = y[:k] + thr
    x[k:2 * k] = y[k:2 * k] - thr
    x[2 * k:3 * k] = y[2 * k:3 * k]
    w = torch.rand(n, generator=g) * 2 if weighted else None
    cast = lambda t: None if t is None else dev(t.to(dtype))  # noqa: E731
    return cast(x), cast(y), cast(w)


def torch_huber(kind, thr, x, y, w, reduction):
    """torch's loss and its gradients w.r.t. input and target (grad_output = 1)."""
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    if kind == "huber":
        # Weighted Huber as torch defines it: loss * weight, then the reduction over numel.
        loss = F.huber_loss(x, y, reduction="none" if w is not None else reduction, delta=thr)
        if w is not None:
            loss = loss * w
            loss = {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    elif kind == "smooth_l1":
        loss = F.smooth_l1_loss(x, y, reduction=reduction, beta=thr)
    else:
        loss = F.l1_loss(x, y, reduction=reduction)
    loss.sum().backward()
    return loss.detach(), x.grad, y.grad


def run_huber(kind, thr, x, y, w, reduction, grad_input=True, grad_target=True):
    gi = torch.empty_like(x) if grad_input else None
    gt = torch.empty_like(y) if grad_target else None
    out = huber_fwd(
        x, y, w,
        beta=thr,
        mul=thr if kind == "huber" else 1.0,
        scale=scale_for(reduction, x.numel()),
        reduce=reduction != "none",
        grad_input=gi,
        grad_target=gt,
    )
    return out, gi, gt


@pytest.mark.parametrize("size_name", SIZES)
@pytest.mark.parametrize("variant", HUBER_VARIANTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_huber_fp32_matches_torch(size_name, variant, reduction):
    kind, thr, weighted = variant
    n = size(size_name, HUBER_BLOCK)
    x, y, w = huber_inputs(n, thr, torch.float32, seed=n, weighted=weighted)
    out, gi, gt = run_huber(kind, thr, x, y, w, reduction)
    ref, ref_gi, ref_gt = torch_huber(kind, thr, x, y, w, reduction)
    if reduction == "none":
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-12)
    else:
        assert out.dtype == torch.float32 and out.shape == ()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(gi, ref_gi, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gt, ref_gt, rtol=1e-6, atol=1e-12)


def test_huber_boundary_is_exact():
    """At |d| == beta both branches agree exactly: loss 0.5 * beta, gradient +-1; d == 0 gives a
    zero gradient, also for L1 (sign(0) = 0)."""
    x = dev(torch.tensor([1.5, -0.5, 0.25, 0.25]))
    y = dev(torch.tensor([0.5, 0.5, 0.25, 0.0]))
    gi = torch.empty_like(x)
    out = huber_fwd(x, y, None, beta=1.0, mul=1.0, scale=1.0, reduce=False, grad_input=gi,
                    grad_target=None)
    assert out.tolist() == [0.5, 0.5, 0.0, 0.03125]
    assert gi.tolist() == [1.0, -1.0, 0.0, 0.25]
    out = huber_fwd(x, y, None, beta=0.0, mul=1.0, scale=1.0, reduce=False, grad_input=gi,
                    grad_target=None)
    assert out.tolist() == [1.0, 1.0, 0.0, 0.25]
    assert gi.tolist() == [1.0, -1.0, 0.0, 1.0]
    # beta = 0.1 is not a float: there the quadratic branch's 0.5 d^2 / beta, computed with the
    # rounded 1 / beta, is an ulp off at |d| == beta, so the boundary must take torch's linear branch
    beta = torch.tensor(0.1).item()
    x, y = dev(torch.tensor([beta, -beta, 0.5 * beta])), dev(torch.zeros(3))
    gi = torch.empty_like(x)
    out = huber_fwd(x, y, None, beta=beta, mul=1.0, scale=1.0, reduce=False, grad_input=gi, grad_target=None)
    assert torch.equal(out, F.smooth_l1_loss(x, y, reduction="none", beta=beta))
    assert gi.tolist() == [1.0, -1.0, 0.5]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("size_name", ["n37-tiny-odd", "one-block", "blocks+tail"])
@pytest.mark.parametrize("variant", [v for v in HUBER_VARIANTS
                                     if v.id in ("huber-d1", "huber-d1-weighted", "sl1-b0.25", "l1")])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_huber_low_precision_no_worse_than_torch(dtype, size_name, variant, reduction):
    """Against a float64 ground truth computed from the same rounded inputs: the kernel computes
    in fp32 and rounds once, and its largest error is no larger than torch's own at this dtype (up
    to the fp32 error, which can tip a result that sits on a rounding tie). The reduced loss is
    fp32. Sizes are in 16-bit blocks, which hold more elements than fp32's."""
    kind, thr, weighted = variant
    n = size(size_name, huber_block(dtype))
    x, y, w = huber_inputs(n, thr, dtype, seed=n + 1, weighted=weighted)
    out, gi, gt = run_huber(kind, thr, x, y, w, reduction)
    truth = torch_huber(kind, thr, x.double(), y.double(), None if w is None else w.double(),
                        reduction)
    same = torch_huber(kind, thr, x, y, w, reduction)
    if reduction == "none":
        assert_rounded_once(out, truth[0], dtype)
    else:
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), truth[0], rtol=1e-5, atol=1e-12)
    assert_rounded_once(gi, truth[1], dtype)
    assert_rounded_once(gt, truth[2], dtype)
    if INTERPRET and dtype == torch.bfloat16:
        return  # the interpreter truncates to bf16 (see assert_rounded_once)
    for ours, theirs, t in zip((out, gi, gt), same, truth):
        assert max_err(ours, t) <= max_err(theirs, t) + 1e-5 * t.abs().max().item()


@pytest.mark.parametrize("variant", [v for v in HUBER_VARIANTS if v.id in ("huber-d1", "sl1-b0.25", "l1")]
                         + [pytest.param(("huber", math.inf, False), id="huber-dinf")])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_huber_nan_and_inf_as_torch(variant, reduction):
    """NaN and infinite inputs give torch's loss and gradients: a NaN difference (NaN or inf - inf)
    has a NaN loss and NaN gradients, an infinite one an infinite loss and the linear branch's. With
    delta = inf an infinite difference has a NaN loss (inf - inf on the linear side) and an infinite
    gradient, as torch's (the kernel's was +-1 times the scale)."""
    kind, thr, _ = variant
    nan, inf = float("nan"), float("inf")
    x = dev(torch.tensor([nan, 1.0, inf, -inf, inf, 0.5, 2.0, 0.25]))
    y = dev(torch.tensor([0.0, nan, 0.0, 0.0, inf, 0.5, -inf, 0.0]))
    out, gi, gt = run_huber(kind, thr, x, y, None, reduction)
    for ours, theirs in zip((out, gi, gt), torch_huber(kind, thr, x, y, None, reduction)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0, equal_nan=True)


def test_huber_partial_outputs_and_shapes():
    """Only grad_target, neither gradient, multi-dim shape, and the other dtypes of weight."""
    x, y, w = huber_inputs(3 * 5 * 7, 1.0, torch.float32, seed=3, weighted=True)
    x, y, w = x.view(3, 5, 7), y.view(3, 5, 7), w.view(3, 5, 7)
    ref, _, ref_gt = torch_huber("huber", 1.0, x, y, w, "none")
    out, gi, gt = run_huber("huber", 1.0, x, y, w, "none", grad_input=False)
    assert gi is None and out.shape == (3, 5, 7)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gt, ref_gt, rtol=1e-6, atol=1e-12)
    out, _, _ = run_huber("huber", 1.0, x, y, w.to(torch.bfloat16), "sum", grad_input=False,
                          grad_target=False)
    ref, _, _ = torch_huber("huber", 1.0, x, y, w.to(torch.bfloat16).float(), "sum")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-12)


def test_huber_empty():
    x = dev(torch.empty(0, 3))
    gi, gt = torch.empty_like(x), torch.empty_like(x)
    out = huber_fwd(x, x, None, beta=1.0, mul=1.0, scale=1.0, reduce=False, grad_input=gi,
                    grad_target=gt)
    assert out.shape == (0, 3) and out.dtype == x.dtype
    out = huber_fwd(x, x, x, beta=1.0, mul=1.0, scale=1.0, reduce=True, grad_input=gi,
                    grad_target=gt)
    assert out.shape == () and out.dtype == torch.float32 and out.item() == 0.0


def test_huber_deterministic():
    x, y, w = huber_inputs(3 * HUBER_BLOCK + 5, 1.0, torch.float32, seed=7, weighted=True)
    a = run_huber("huber", 1.0, x, y, w, "mean")
    b = run_huber("huber", 1.0, x, y, w, "mean")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_huber_rejects_mismatched_sizes():
    x = dev(torch.zeros(4))
    with pytest.raises(ValueError, match="target"):
        huber_fwd(x, dev(torch.zeros(5)), None, beta=1.0, mul=1.0, scale=1.0, reduce=True,
                  grad_input=None, grad_target=None)


# --------------------------------------------------------------------------------------------------
# Sigmoid focal
# --------------------------------------------------------------------------------------------------


def focal_ref64(x, t, alpha, gamma, reduction, stable=False):
    """The focal loss in float64 with autograd. By default torchvision's formula verbatim, which
    float64 keeps accurate while 1 - p_t >> 1e-16 (|x| up to ~20). stable=True writes the same
    quantities without cancellation (ce through log1p, 1 - p as sigmoid(-x)) for saturated logits;
    its gradient is still NaN where q == 0 and gamma < 1 (pow's 0 * inf)."""
    x = x.detach().double().requires_grad_()
    t = t.double()
    if stable:
        # Branches without cancellation. Each branch's exponent is x where that branch is taken, else
        # 0, which keeps the other branch (and its gradient) finite, and gives x == 0 the smooth
        # derivative 1/2 - t. (Not x.clamp(min=0): the gradient of a clamp at its bound is 1 in torch
        # 2.13 and 0 in 2.14, which made this oracle's derivative at 0 1 - t there.)
        pos = x >= 0
        ce = torch.where(pos,
                         x * (1 - t) + torch.log1p(torch.exp(-torch.where(pos, x, 0.0))),
                         -x * t + torch.log1p(torch.exp(torch.where(pos, 0.0, x))))
        q = torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t
    else:
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        q = 1 - p_t
    loss = ce * q**gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    loss = {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    loss.sum().backward()
    return loss.detach(), x.grad


def focal_inputs(n, dtype, soft, seed=0, target_dtype=torch.float32):
    g = gen(seed)
    x = torch.randn(n, generator=g) * 3
    if soft:
        t = torch.rand(n, generator=g)
    else:
        t = (torch.rand(n, generator=g) < 0.3).float()
    return dev(x.to(dtype)), dev(t.to(target_dtype))


def run_focal(x, t, alpha, gamma, reduction, grad=True):
    gi = torch.empty_like(x) if grad else None
    out = sigmoid_focal_fwd(
        x, t,
        alpha=alpha,
        gamma=gamma,
        scale=scale_for(reduction, x.numel()),
        reduce=reduction != "none",
        grad_input=gi,
    )
    return out, gi


def close_fp32(ours, ref, soft=False):
    """fp32 against float64: 1e-5 relative (non-integer gamma goes through exp2(gamma * log2 q),
    whose rounding grows with |log2 q|). Soft targets make p - t and the terms of ce cancel, so
    there the error is bounded relative to the tensor's largest value instead."""
    atol = 1e-6 * ref.abs().max().item() if soft else 1e-30
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("size_name", SIZES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 2.5, 3.0])  # integers to 4 by products of q
@pytest.mark.parametrize("alpha", [0.25, -1.0], ids=["alpha0.25", "no-alpha"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_fp32(size_name, gamma, alpha, soft, reduction):
    n = size(size_name, FOCAL_BLOCK)
    x, t = focal_inputs(n, torch.float32, soft, seed=n)
    out, gi = run_focal(x, t, alpha, gamma, reduction)
    ref, ref_g = focal_ref64(x, t, alpha, gamma, reduction)
    assert out.dtype == torch.float32
    assert out.shape == (x.shape if reduction == "none" else ())
    close_fp32(out, ref, soft)
    close_fp32(gi, ref_g, soft)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sigmoid_focal_low_precision(dtype, gamma, soft, reduction):
    """Against float64 on the same rounded inputs: the fp32 result rounded once to the dtype, and
    no worse than the formula evaluated by eager torch at this dtype. The reduced loss is fp32."""
    n = 3 * FOCAL_BLOCK + 5
    x, t = focal_inputs(n, dtype, soft, seed=11, target_dtype=dtype)
    out, gi = run_focal(x, t, 0.25, gamma, reduction)
    ref, ref_g = focal_ref64(x, t, 0.25, gamma, reduction)
    if reduction == "none":
        assert_rounded_once(out, ref, dtype, soft=soft)
    else:
        assert out.dtype == torch.float32
        close_fp32(out, ref)
    assert_rounded_once(gi, ref_g, dtype, soft=soft)
    if INTERPRET and dtype == torch.bfloat16:
        return  # the interpreter truncates to bf16 (see assert_rounded_once)

    xe = x.detach().clone().requires_grad_()
    p = torch.sigmoid(xe)
    ce = F.binary_cross_entropy_with_logits(xe, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    eager = (0.25 * t + 0.75 * (1 - t)) * ce * ((1 - p_t) ** gamma)
    eager = eager if reduction == "none" else eager.mean()
    eager.sum().backward()
    for ours, theirs, truth in ((out, eager, ref), (gi, xe.grad, ref_g)):
        theirs_err = max_err(theirs, truth)  # NaN where eager's pow gradient hits 0 * inf
        assert math.isnan(theirs_err) or max_err(ours, truth) <= theirs_err


@pytest.mark.parametrize("target_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_sigmoid_focal_target_dtypes(target_dtype):
    x, t = focal_inputs(37, torch.float32, True, seed=5, target_dtype=target_dtype)
    out, gi = run_focal(x, t, 0.25, 2.0, "none")
    ref, ref_g = focal_ref64(x, t, 0.25, 2.0, "none")
    close_fp32(out, ref, soft=True)
    close_fp32(gi, ref_g, soft=True)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 4.0])
def test_sigmoid_focal_saturated_logits(dtype, gamma):
    """|x| up to 1e4 with hard and soft targets: loss and gradient are finite for every gamma,
    match the stable float64 formula to full relative precision, and are 0 where that formula's
    gradient is NaN (q == 0, whose limit is 0)."""
    xs = torch.tensor([1e4, -1e4, 200.0, -200.0, 100.0, -100.0, 30.0, -30.0, 17.0, -17.0, 0.0])
    m = len(xs)
    x = dev(xs.repeat(3).to(dtype))
    t = dev(torch.tensor([0.0, 1.0, 0.3]).repeat_interleave(m))
    out, gi = run_focal(x, t, 0.25, gamma, "none")
    assert torch.isfinite(out).all() and torch.isfinite(gi).all()
    ref, ref_g = focal_ref64(x, t, 0.25, gamma, "none", stable=True)
    ok = torch.isfinite(ref_g)
    if dtype == torch.float32:
        close_fp32(out, ref)
        close_fp32(gi[ok], ref_g[ok])
    else:
        assert_rounded_once(out, ref, dtype)
        assert_rounded_once(gi[ok], ref_g[ok], dtype)
    assert (gi[~ok] == 0).all()
    # Confidently wrong: loss = a_t * |x| (q = 1), gradient = a_t * (p - t) = +-a_t.
    big = x[0].item()  # 1e4 as stored in dtype
    assert out[0].item() == 0.75 * big and gi[0].item() == 0.75
    assert out[m + 1].item() == 0.25 * big and gi[m + 1].item() == -0.25


def test_sigmoid_focal_forward_only_shapes_and_empty():
    x, t = focal_inputs(3 * 5 * 7, torch.float32, False, seed=9)
    x, t = x.view(3, 5, 7), t.view(3, 5, 7)
    out, gi = run_focal(x, t, -1.0, 2.0, "none", grad=False)
    ref, _ = focal_ref64(x, t, -1.0, 2.0, "none")
    assert gi is None and out.shape == (3, 5, 7)
    close_fp32(out, ref)

    e = dev(torch.empty(2, 0))
    out = sigmoid_focal_fwd(e, e, alpha=0.25, gamma=2.0, scale=1.0, reduce=False,
                            grad_input=torch.empty_like(e))
    assert out.shape == (2, 0)
    out = sigmoid_focal_fwd(e, e, alpha=0.25, gamma=2.0, scale=1.0, reduce=True, grad_input=None)
    assert out.shape == () and out.dtype == torch.float32 and out.item() == 0.0


def test_sigmoid_focal_deterministic():
    x, t = focal_inputs(3 * FOCAL_BLOCK + 5, torch.bfloat16, True, seed=13)
    a = run_focal(x, t, 0.25, 0.5, "mean")
    b = run_focal(x, t, 0.25, 0.5, "mean")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------------------------------
# The reduced loss: one fp32 partial per program, summed by the launcher (kernels/common.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("kind", ["huber-weighted", "sigmoid_focal"])
def test_a_prediction_multiplies_the_gradients_and_not_the_loss(kind, dtype):
    """Given a prediction p of grad_output (a power of two; 0 while unknown, taken as 1), a reduced
    loss's gradients are written as at p times the scale, bit for bit, and its loss as without p;
    ``predicted`` gets the factor used. fp16 takes p no further than the unscaled gradient (scale
    1): at most 1 / the scale, which it takes for an unknown p too, a power of two or not, and for
    a p below 1. A prediction needs a reduced loss and a gradient."""
    n = 3 * HUBER_BLOCK + 5
    x, y, w = huber_inputs(n, 1.0, dtype, seed=7, weighted=True)
    t = (y > 0).to(dtype)

    def launch(scale, prediction=None, reduce=True, grad=True):
        grads = [torch.empty_like(x) if grad else None for _ in range(2 if kind.startswith("huber") else 1)]
        predicted = None if prediction is None else dev(torch.full((1,), -1.0))
        opts = dict(scale=scale, reduce=reduce, predicted=predicted,
                    prediction=None if prediction is None else dev(torch.tensor([prediction])))
        if kind.startswith("huber"):
            loss = huber_fwd(x, y, w, beta=1.0, mul=1.0, grad_input=grads[0], grad_target=grads[1], **opts)
        else:
            loss = sigmoid_focal_fwd(x, t, alpha=0.25, gamma=2.0, grad_input=grads[0], **opts)
        return loss, grads, None if predicted is None else predicted.item()

    scale = 2.0 ** -6
    loss = launch(scale)[0]
    for p in (0.0, 2.0 ** -3, 2.0 ** 4, 2.0 ** 16):
        factor = p or 1.0
        if dtype == torch.float16 and (p < 1.0 or p * scale > 1.0):
            factor = 1.0 / scale
        got_loss, got, predicted = launch(scale, p)
        assert predicted == factor, p
        assert torch.equal(got_loss, loss), p
        for g, expected in zip(got, launch(scale * factor)[1]):
            assert torch.equal(g, expected), p
    if dtype == torch.float16:  # the mean's scale 1/n: the cap 1/scale is no power of two
        scale = 1.0 / n
        _, got, predicted = launch(scale, 2.0 ** 16)
        assert predicted == torch.tensor(1.0 / torch.tensor(scale).item()).item()
        for g, unscaled in zip(got, launch(1.0)[1]):
            torch.testing.assert_close(g, unscaled, rtol=2.0 ** -10, atol=2.0 ** -24)
    for reduce, grad in ((False, True), (True, False)):
        with pytest.raises(ValueError, match="prediction and predicted"):
            launch(scale, 1.0, reduce=reduce, grad=grad)


@pytest.mark.parametrize("kind", ["huber", "sigmoid_focal"])
@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reduce(kind, loss_dtype):
    """Over several programs and a ragged last block: the sum of the elementwise losses (in fp32,
    blockwise), in loss_dtype, deterministic, and in 16 bits the fp32 sum rounded once."""
    n = 5 * HUBER_BLOCK + 3
    x, y, _ = huber_inputs(n, 1.0, torch.float32, seed=5)
    t = (y > 0).float()

    def launch(reduce, dtype=None):
        if kind == "huber":
            return huber_fwd(x, y, None, beta=1.0, mul=1.0, scale=0.5, reduce=reduce, grad_input=None,
                             grad_target=None, loss_dtype=dtype)
        return sigmoid_focal_fwd(x, t, alpha=0.25, gamma=2.0, scale=0.5, reduce=reduce, grad_input=None,
                                 loss_dtype=dtype)

    total = launch(True, loss_dtype)
    assert total.shape == () and total.dtype == loss_dtype
    assert torch.equal(total, launch(True, loss_dtype))
    rows = launch(False)
    torch.testing.assert_close(total.double(), rows.double().sum(), rtol=2e-6 if loss_dtype == torch.float32 else 2**-8,
                               atol=0)
    if loss_dtype != torch.float32:
        assert torch.equal(total, launch(True).to(loss_dtype))  # the fp32 sum, rounded once


# --------------------------------------------------------------------------------------------------
# More than 2^31 elements (int64 offsets): CUDA only
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device at full size")
def test_more_than_2_pow_31_elements():
    n = 2**31 + 2 * HUBER_BLOCK + 3
    tail = 3 * HUBER_BLOCK + 7
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    g = torch.empty_like(x)
    out = huber_fwd(x, y, None, beta=1.0, mul=1.0, scale=1.0, reduce=False, grad_input=g,
                    grad_target=None)
    ref, ref_g, _ = torch_huber("smooth_l1", 1.0, x[-tail:].double(), y[-tail:].double(), None,
                                "none")
    assert_rounded_once(out[-tail:], ref, torch.bfloat16)
    assert_rounded_once(g[-tail:], ref_g, torch.bfloat16)
    del out, g
    t = (y > 0).to(torch.bfloat16)
    g = torch.empty_like(x)
    out = sigmoid_focal_fwd(x, t, alpha=0.25, gamma=2.0, scale=1.0, reduce=False, grad_input=g)
    ref, ref_g = focal_ref64(x[-tail:], t[-tail:], 0.25, 2.0, "none")
    assert_rounded_once(out[-tail:], ref, torch.bfloat16)
    assert_rounded_once(g[-tail:], ref_g, torch.bfloat16)
