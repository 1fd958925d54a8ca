"""The CPU reference implementations (fastloss.reference) against torch.nn.functional, against the
torchvision sigmoid-focal formula, float64 gradcheck for the losses torch lacks, and properties."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from fastloss import reference as R

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]
# (rtol, atol relative to the largest expected magnitude) against float64 ground truth. bf16/fp16 are
# computed in fp32 and rounded once: relative error at most 2^-8 (bf16) and 2^-11 (fp16, given 2^-10).
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6),
       torch.bfloat16: (2 ** -8, 1e-5), torch.float16: (2 ** -10, 1e-5)}
C = 5
SHAPES = {  # logits shape -> why
    "unbatched": (C,),           # (C,) input, scalar target
    "2d": (7, C),                # the common (N, C) case
    "4d": (2, C, 3, 2),          # (N, C, d1, d2): class dim moved last
    "empty": (0, C),             # empty batch: mean is nan as in torch
}


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    scale = expected.detach().abs().nan_to_num(0, 0, 0).max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol,
                               atol=atol * max(scale, 1.0), equal_nan=True)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_matches(ours, theirs, diff, dtype):
    """ours(*diff) in `dtype` against theirs(*diff) in float64: value, output dtype and shape, and the
    gradients w.r.t. every tensor in `diff` for a random grad_output."""
    xs = [d.to(dtype).requires_grad_() for d in diff]
    truth = [x.detach().double().requires_grad_() for x in xs]  # the same (rounded) inputs in float64
    out, exp = ours(*xs), theirs(*truth)
    assert out.dtype == dtype and out.shape == exp.shape
    close(out, exp, dtype)
    g = torch.randn(exp.shape, generator=gen(1)).to(dtype)
    for a, e in zip(torch.autograd.grad(out, xs, g), torch.autograd.grad(exp, truth, g.double())):
        close(a, e, dtype)


def class_targets(shape, g, ignore_index=-100, ignore=None):
    """Class-index targets for logits `shape`; ignore="some" ignores every other row, "all" all."""
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    t = torch.randint(0, shape[0] if len(shape) == 1 else shape[1], tshape, generator=g)
    if ignore == "all":
        t.fill_(ignore_index)
    elif ignore == "some":
        t.view(-1)[::2] = ignore_index
    return t


# ----------------------------------------------------------------------------------------------------
# cross_entropy against torch.nn.functional.cross_entropy

CE_OPTIONS = {  # name -> (kwargs without weight, use a class weight, ignore mode, probability targets)
    "plain": ({}, False, None, False),
    "weight": ({}, True, None, False),
    "ignore_some_in_range": ({"ignore_index": 1}, True, "some", False),
    "ignore_all": ({}, False, "all", False),
    "ignore_all_weight": ({}, True, "all", False),
    "smooth": ({"label_smoothing": 0.2}, False, None, False),
    "smooth_weight_ignore": ({"label_smoothing": 0.3, "ignore_index": 2}, True, "some", False),
    "probs": ({}, False, None, True),
    "probs_smooth_weight": ({"label_smoothing": 0.25}, True, None, True),
}


def class_case(shape, option, reduction):
    """Float64 logits, target and keyword arguments for SHAPES[shape] and CE_OPTIONS[option]."""
    g = gen()
    shape = SHAPES[shape]
    kw, use_weight, ignore, probs = CE_OPTIONS[option]
    kw = dict(kw, reduction=reduction)
    if use_weight:
        kw["weight"] = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    x = 3 * torch.randn(shape, dtype=torch.float64, generator=g)
    if probs:  # soft targets of the input's shape
        return x, torch.softmax(torch.randn(shape, dtype=torch.float64, generator=g), dim=int(x.dim() > 1)), kw
    return x, class_targets(shape, g, kw.get("ignore_index", -100), ignore), kw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", CE_OPTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_matches_torch(shape, option, reduction, dtype):
    x, t, kw = class_case(shape, option, reduction)
    if t.is_floating_point():  # probability targets are differentiated too
        ours_kw = kw
        if "weight" in kw:  # in the input's dtype (torch's result promotes the three dtypes), and the
            ours_kw = {**kw, "weight": kw["weight"].to(dtype)}  # same rounded weights for torch
            kw = {**kw, "weight": ours_kw["weight"].double()}
        assert_matches(lambda x, q: R.cross_entropy(x, q, **ours_kw), lambda x, q: F.cross_entropy(x, q, **kw),
                       [x, t], dtype)
    else:
        assert_matches(lambda x: R.cross_entropy(x, t, **kw), lambda x: F.cross_entropy(x, t, **kw), [x], dtype)


def torch_focal(x, t, gamma, weight=None, ignore_index=-100, reduction="mean"):
    """Softmax focal loss from torch's per-row CE: ce·(1 - p_y)^gamma, mean divided by the sum of w_y."""
    dim = int(x.dim() > 1)
    ce = F.cross_entropy(x, t, weight=weight, ignore_index=ignore_index, reduction="none")
    valid = t != ignore_index
    safe = torch.where(valid, t, 0).unsqueeze(dim)
    loss = torch.where(valid, ce * (1 - torch.softmax(x, dim).gather(dim, safe).squeeze(dim)) ** gamma, 0)
    w_y = valid * (1.0 if weight is None else weight[safe.squeeze(dim)])
    return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / w_y.sum()}[reduction]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight", "ignore_some_in_range", "ignore_all", "ignore_all_weight"])
@pytest.mark.parametrize("shape", SHAPES)
def test_focal_matches_formula(shape, option, reduction, dtype):
    x, t, kw = class_case(shape, option, reduction)
    assert_matches(lambda x: R.focal_loss(x, t, gamma=1.5, **kw), lambda x: torch_focal(x, t, 1.5, **kw), [x], dtype)


# ----------------------------------------------------------------------------------------------------
# sigmoid focal against the torchvision formula, Huber / SmoothL1 against torch


def torchvision_sigmoid_focal(x, t, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss's definition, written naively (valid in float64 away from
    saturation)."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


ELEMENTWISE_SHAPES = {"1d": (7,), "3d": (3, 4, 5), "empty": (0, 3)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
@pytest.mark.parametrize("loss", ["sigmoid_focal", "sigmoid_focal_soft_noalpha", "huber", "huber_delta",
                                  "huber_weight", "smooth_l1", "smooth_l1_beta", "l1"])
def test_elementwise_losses_match(loss, shape, reduction, dtype):
    g = gen()
    shape = ELEMENTWISE_SHAPES[shape]
    x = 2 * torch.randn(shape, dtype=torch.float64, generator=g)
    y = 2 * torch.randn(shape, dtype=torch.float64, generator=g)
    if loss.startswith("sigmoid_focal"):
        soft = loss.endswith("noalpha")
        t = torch.rand(shape, dtype=torch.float64, generator=g) if soft else (y > 0).double()
        kw = dict(alpha=-1.0, gamma=0.5) if soft else dict(alpha=0.25, gamma=2.0)
        ours = lambda x, t: R.sigmoid_focal_loss(x, t, reduction=reduction, **kw)
        theirs = lambda x, t: torchvision_sigmoid_focal(x, t, reduction=reduction, **kw)
        return assert_matches(ours, theirs, [x, t], dtype)
    w = torch.rand(shape, dtype=torch.float64, generator=g).to(dtype)  # rounded once, like the inputs
    kw = {"huber": dict(), "huber_delta": dict(delta=0.7), "huber_weight": dict(delta=1.5, weight=w),
          "smooth_l1": dict(), "smooth_l1_beta": dict(beta=0.4), "l1": dict(beta=0.0)}[loss]
    fn = "smooth_l1_loss" if "beta" in kw or loss == "smooth_l1" else "huber_loss"

    def call(module):  # the weight in the input's dtype: a wider one would widen the result, as in torch
        return lambda x, y: getattr(module, fn)(
            x, y, reduction=reduction, **{k: v.to(x.dtype) if torch.is_tensor(v) else v for k, v in kw.items()})

    assert_matches(call(R), call(F), [x, y], dtype)


def test_elementwise_broadcast_without_warning():
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = [R.huber_loss(x, y, reduction="none", delta=0.5), R.smooth_l1_loss(x, y, reduction="sum"),
                R.sigmoid_focal_loss(x, (y > 0).double())]
    xb, yb = torch.broadcast_tensors(x, y)
    theirs = [F.huber_loss(xb, yb, reduction="none", delta=0.5), F.smooth_l1_loss(xb, yb, reduction="sum"),
              torchvision_sigmoid_focal(xb, (yb > 0).double(), 0.25, 2.0, "none")]
    for a, e in zip(ours, theirs):
        close(a, e, torch.float64)


def test_smooth_l1_beta0_is_l1():
    x, y = torch.randn(4, 6, dtype=torch.float64, requires_grad=True), torch.randn(4, 6, dtype=torch.float64)
    y[0, 0] = x[0, 0].detach()  # a zero difference: both give gradient 0 there
    for reduction in REDUCTIONS:
        a, e = R.smooth_l1_loss(x, y, reduction=reduction, beta=0.0), F.l1_loss(x, y, reduction=reduction)
        torch.testing.assert_close(a, e)
        torch.testing.assert_close(*(torch.autograd.grad(v.sum(), x)[0] for v in (a, e)))


# ----------------------------------------------------------------------------------------------------
# float64 gradcheck of what torch does not have


def _logits_and_targets(shape=(4, C, 3), seed=0, ignore="some"):
    g = gen(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
    return x, class_targets(shape, g, ignore=ignore), torch.rand(C, dtype=torch.float64, generator=g) + 0.5


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_focal(gamma, reduction):
    x, t, w = _logits_and_targets()
    assert torch.autograd.gradcheck(lambda x: R.focal_loss(x, t, gamma=gamma, weight=w, reduction=reduction), (x,))
    assert torch.autograd.gradcheck(lambda x: R.focal_loss(x, t, gamma=gamma, softcap=2.0, reduction=reduction), (x,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_z_loss_softcap(reduction):
    x, t, w = _logits_and_targets()
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    assert torch.autograd.gradcheck(lambda x: R.cross_entropy(x, t, z_loss=1e-2, **kw), (x,))
    assert torch.autograd.gradcheck(lambda x: R.cross_entropy(x, t, softcap=1.5, **kw), (x,))
    assert torch.autograd.gradcheck(lambda x: R.cross_entropy(x, t, z_loss=0.1, softcap=3.0, **kw), (x,))
    q = torch.rand(x.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, q: R.cross_entropy(x, q, z_loss=0.1, softcap=3.0, **kw), (x, q))


@pytest.mark.parametrize("gamma,alpha", [(0.5, 0.25), (2.0, 0.25), (2.0, -1.0), (1.0, 0.75)])
def test_gradcheck_sigmoid_focal(gamma, alpha):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)  # soft targets, differentiated too
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x, t: R.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction), (x, t))


def test_gradcheck_weighted_huber():
    x, y = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.rand(3, 5, dtype=torch.float64)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda x, y: R.huber_loss(x, y, reduction, 0.8, w), (x, y))


# ----------------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", [None, "some", "all"])
def test_focal_gamma0_equals_cross_entropy(reduction, ignore):
    x, t, w = _logits_and_targets(ignore=ignore)
    x = x.float().detach()
    n, d = (t != -100).nonzero()[0] if (t != -100).any() else (0, 0)
    x[n, :, d] = 0.0
    x[n, t[n, d].clamp(0, C - 1), d] = 60.0  # a saturated row: p_y rounds to 1 in fp32, 1 - p_y to 0
    x.requires_grad_()
    for weight in (None, w.float()):
        kw = dict(weight=weight, ignore_index=-100, reduction=reduction)
        focal, ce = R.focal_loss(x, t, gamma=0.0, **kw), R.cross_entropy(x, t, **kw)
        torch.testing.assert_close(focal, ce, rtol=0, atol=0, equal_nan=True)  # the same operations
        torch.testing.assert_close(focal, F.cross_entropy(x, t, **kw), equal_nan=True)
        gf, gc = (torch.autograd.grad(v.sum(), x)[0] for v in (focal, ce))
        torch.testing.assert_close(gf, gc, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.5])
def test_focal_is_ce_times_modulating_factor(gamma):
    x, t, w = _logits_and_targets(shape=(6, C), ignore=None)
    x = 3 * x.detach()
    focal = R.focal_loss(x, t, gamma=gamma, weight=w, reduction="none")
    ce = R.cross_entropy(x, t, weight=w, reduction="none")
    assert (focal <= ce).all() and (focal >= 0).all()
    p_y = torch.softmax(x, 1).gather(1, t[:, None]).squeeze(1)  # computed independently
    torch.testing.assert_close(focal / ce, (1 - p_y) ** gamma)


def test_sigmoid_focal_reduces_to_bce_and_factor():
    g = gen()
    x = 3 * torch.randn(4, 6, dtype=torch.float64, generator=g)
    t = torch.rand(4, 6, dtype=torch.float64, generator=g)
    t[0] = (t[0] > 0.5).double()  # hard and soft targets
    for reduction in REDUCTIONS:
        torch.testing.assert_close(R.sigmoid_focal_loss(x, t, alpha=-1.0, gamma=0.0, reduction=reduction),
                                   F.binary_cross_entropy_with_logits(x, t, reduction=reduction))
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    p_t, alpha_t = p * t + (1 - p) * (1 - t), 0.3 * t + 0.7 * (1 - t)
    for gamma in (0.5, 2.0):
        ratio = R.sigmoid_focal_loss(x, t, alpha=0.3, gamma=gamma) / bce
        torch.testing.assert_close(ratio, (1 - p_t) ** gamma * alpha_t)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_sigmoid_focal_alpha_at_its_ends(alpha):
    """Every alpha >= 0 weights, as in torchvision: 0 keeps only the negatives' loss and 1 only the
    positives'; only a negative alpha disables the weighting."""
    g = gen()
    x = 3 * torch.randn(4, 6, dtype=torch.float64, generator=g)
    t = torch.rand(4, 6, dtype=torch.float64, generator=g)
    t[0] = (t[0] > 0.5).double()  # hard and soft targets
    for reduction in REDUCTIONS:
        torch.testing.assert_close(R.sigmoid_focal_loss(x, t, alpha=alpha, gamma=2.0, reduction=reduction),
                                   torchvision_sigmoid_focal(x, t, alpha, 2.0, reduction))
    positive = R.sigmoid_focal_loss(x, t, alpha=alpha)[0][t[0] == 1]
    assert (positive == 0).all() if alpha == 0 else (positive > 0).all()


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("probs", [False, True])
def test_z_loss_term(softcap, probs):
    x, t, w = _logits_and_targets(ignore="some")
    x = x.detach()
    if probs:
        t = torch.softmax(torch.randn(x.shape, dtype=torch.float64), 1)
    z = 3e-3
    capped = x if softcap is None else softcap * torch.tanh(x / softcap)
    lse2 = torch.logsumexp(capped, 1) ** 2  # independently: (N, d1)
    counted = torch.ones_like(lse2, dtype=torch.bool) if probs else t != -100
    kw = dict(weight=w, label_smoothing=0.1, softcap=softcap)
    diff = {r: R.cross_entropy(x, t, z_loss=z, reduction=r, **kw) - R.cross_entropy(x, t, reduction=r, **kw)
            for r in REDUCTIONS}
    term = torch.where(counted, z * lse2, 0)  # unweighted, 0 on ignored rows
    torch.testing.assert_close(diff["none"], term)
    torch.testing.assert_close(diff["sum"], term.sum())
    torch.testing.assert_close(diff["mean"], term.sum() / counted.sum())


@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_softcap(loss):
    x, t, w = _logits_and_targets()
    x = 10 * x.detach()
    fn = getattr(R, loss)
    for r in REDUCTIONS:
        # softcap is the same as capping the logits first ...
        torch.testing.assert_close(fn(x, t, weight=w, reduction=r, softcap=4.0),
                                   fn(4.0 * torch.tanh(x / 4.0), t, weight=w, reduction=r))
        # ... and a huge cap approaches no cap
        torch.testing.assert_close(fn(x, t, weight=w, reduction=r, softcap=1e6),
                                   fn(x, t, weight=w, reduction=r), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(R.cross_entropy(x, t, softcap=4.0), F.cross_entropy(4.0 * torch.tanh(x / 4.0), t))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_saturated_logits_finite(gamma):
    """±1e4 logits in float32: p_y rounds to exactly 1 or 0, yet loss and gradients stay finite."""
    x = torch.full((4, C), -1e4)
    x[:, 0] = 1e4
    x.requires_grad_()
    t = torch.tensor([0, 1, 0, 4])  # saturated correct and saturated wrong rows
    for reduction in REDUCTIONS:
        loss = R.focal_loss(x, t, gamma=gamma, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    xs = torch.tensor([[1e4, -1e4, 1e4], [-1e4, 1e4, -1e4]], requires_grad=True)
    ts = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.5, 0.5]])
    for alpha in (0.25, -1.0):
        loss = R.sigmoid_focal_loss(xs, ts, alpha=alpha, gamma=gamma)
        (grad,) = torch.autograd.grad(loss.sum(), xs)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert loss[0, 0] == 0 and loss[0, 1] == 0  # saturated correct predictions


def test_sigmoid_focal_accurate_near_saturation():
    """float32 against float64 where 1 - p_t and the BCE are far below float32's epsilon: both must be
    computed without cancellation (1 - sigmoid(x) rounds to 0, relative error 1)."""
    s = torch.linspace(8.0, 20.0, 9, dtype=torch.float64)  # float64 1 - sigmoid(x) holds to ~1e-8 here
    x = torch.stack([s, -s], 1)  # saturated correct predictions of targets 1 and 0
    t = torch.tensor([[1.0, 0.0]]).expand(9, 2)
    for gamma in (0.5, 2.0):
        ours = R.sigmoid_focal_loss(x.float(), t, gamma=gamma)
        expected = torchvision_sigmoid_focal(x, t.double(), 0.25, gamma, "none")
        assert (expected > 0).all()
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=0)


def test_huber_infinite_difference():
    x = torch.tensor([float("inf"), -float("inf"), 0.3], dtype=torch.float64, requires_grad=True)
    y = torch.zeros(3, dtype=torch.float64)
    for ours, theirs in ((R.huber_loss, F.huber_loss), (R.smooth_l1_loss, F.smooth_l1_loss)):
        a, e = ours(x, y, reduction="none"), theirs(x, y, reduction="none")
        torch.testing.assert_close(a, e)
        torch.testing.assert_close(*(torch.autograd.grad(v.sum(), x)[0] for v in (a, e)))  # ±delta, not nan


@pytest.mark.parametrize("bad", [C, -1])
def test_out_of_range_targets_raise_index_error(bad):
    x, t, w = _logits_and_targets(ignore=None)
    t.view(-1)[1] = bad
    with pytest.raises(IndexError):
        F.cross_entropy(x, t)  # torch raises the same type on CPU
    for call in (lambda: R.cross_entropy(x, t), lambda: R.cross_entropy(x, t, weight=w, label_smoothing=0.1),
                 lambda: R.focal_loss(x, t, reduction="none")):
        with pytest.raises(IndexError):
            call()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_meta_inputs_have_no_values_to_check(reduction):
    """Meta tensors hold no data, so the class-index range check (an .item()) is skipped for them, as
    torch skips it: the result is a meta tensor of torch's shape and dtype, out-of-range targets
    included. (On CPU the check still raises: test_out_of_range_targets_raise_index_error.)"""
    for shape, t in (((4, C), [0, 1, 2, 4]), ((4, C), [0, -100, C + 3, -1]), ((2, C, 3), [[0, 1, 9], [2, 3, 4]])):
        x = torch.randn(shape, device="meta", requires_grad=True)
        t = torch.tensor(t, device="meta")
        w = torch.rand(C, device="meta")
        for ours, theirs in ((R.cross_entropy(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction)),
                             (R.cross_entropy(x, t, w, label_smoothing=0.1, reduction=reduction),
                              F.cross_entropy(x, t, w, label_smoothing=0.1, reduction=reduction)),
                             (R.focal_loss(x, t, weight=w, reduction=reduction),
                              F.cross_entropy(x, t, w, reduction=reduction))):  # focal's shape is CE's
            assert (ours.device.type, ours.shape, ours.dtype) == (theirs.device.type, theirs.shape, theirs.dtype)
            (grad,) = torch.autograd.grad(ours.sum(), x)
            assert grad.is_meta and grad.shape == x.shape


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
# (not (2, 0, 4): torch refuses a 3-d input with no classes, with a size mismatch of its own making)
@pytest.mark.parametrize("shape", [(3, 0), (2, 0, 0, 3), (0, 0), (0,), (2, 0, 4, 1)], ids=str)
def test_no_classes_with_label_smoothing_as_torch(shape, weighted, reduction):
    """C = 0 (every row ignored) with label smoothing: torch multiplies the smoothing term by
    eps / C = inf, so the loss is NaN for every reduction, over no rows too (a sum of nothing, times
    inf). With probability targets there is nothing for inf to reach."""
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.full(shape[:1] + shape[2:] if len(shape) > 1 else (), -100)
    kw = dict(reduction=reduction, label_smoothing=0.1, weight=torch.ones(0, dtype=torch.float64) if weighted else None)
    torch.testing.assert_close(R.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw), equal_nan=True)
    q = torch.rand(shape, dtype=torch.float64)
    torch.testing.assert_close(R.cross_entropy(x, q, **kw), F.cross_entropy(x, q, **kw), equal_nan=True)
