"""The Triton kernels, through the public API, against the reference.

On CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set in conftest) with the backend
forced to ``triton`` and small shapes; on CUDA the same tests run natively, and the ``full size``
section adds the large shapes, ``torch.compile(fullgraph=True)`` and CUDA-graph capture.

Accuracy rule: in fp32 the kernel is within 1e-5 (relative) of a float64 ground truth. In bf16/fp16
its error against that ground truth is compared with that of torch at the same dtype (torch's own
function where torch has one, else the reference run at that dtype): the loss, and the gradient for
``grad_output == 1``, may be no worse; a gradient for another ``grad_output`` may be up to twice as
far off, because the saved gradient is rounded to the input dtype in the forward and rounded again
when the backward scales it (one rounding more than torch, by design: see fastloss/autograd.py).
"""

import functools
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastloss
from bench import host
from fastloss import reference
from fastloss.kernels.cross_entropy import FAST_TANH_MAX_CAP

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

LOW = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *LOW]

# torch's function at the test dtype, where torch has one: the low-precision baseline.
TORCH_BASELINE = {
    "cross_entropy": F.cross_entropy,
    "huber_loss": F.huber_loss,
    "smooth_l1_loss": F.smooth_l1_loss,
}
TORCH_ARGS = {"cross_entropy": {"weight", "ignore_index", "reduction", "label_smoothing"},
              "huber_loss": {"reduction", "delta", "weight"}, "smooth_l1_loss": {"reduction", "beta"}}


def _leaf(t):
    """A leaf copy of ``t`` that keeps its strides (padded rows, transposes): clone() would not."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t).requires_grad_()


def _run(fn, tensors, grad_of, kwargs, grad_output, backend_name=None):
    """``fn(*tensors, **kwargs)`` and the gradients of ``tensors[i]`` for ``i in grad_of``."""
    leaves = [_leaf(t) if i in grad_of else t for i, t in enumerate(tensors)]
    if backend_name is None:
        loss = fn(*leaves, **kwargs)
    else:
        with fastloss.use_backend(backend_name):
            loss = fn(*leaves, **kwargs)
    g = grad_output(loss)
    grads = torch.autograd.grad(loss, [leaves[i] for i in grad_of], g) if grad_of else ()
    return [loss.detach(), *grads]


def _random_grad_output(loss):
    # a random grad_output, never exactly 1, so the backward scale kernel does real work
    return (torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5).to(loss)


def _max_err(got, truth):
    got, truth = got.double(), truth.double()
    both_nan = torch.isnan(got) & torch.isnan(truth)
    same_inf = torch.isinf(truth) & (got == truth)
    diff = (got - truth).abs().masked_fill(both_nan | same_inf, 0.0)
    return diff.max().item() if diff.numel() else 0.0


def _float64_kwargs(kwargs: dict) -> dict:
    """``kwargs`` with their floating-point tensors (class or element weights) in float64, for the truth."""
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}


def check(name, tensors, kwargs, grad_of=(0,), grad_output=_random_grad_output):
    """Checks fastloss.<name> on the triton backend against the float64 reference."""
    fn = getattr(fastloss, name)
    dtype = tensors[0].dtype
    ours = _run(fn, tensors, grad_of, kwargs, grad_output, "triton")
    wide = [t.double() if t.is_floating_point() else t for t in tensors]
    wide_kwargs = _float64_kwargs(kwargs)
    # The truth takes the grad_output fastloss received, in its dtype (an fp16 1.2576 is 1.2578: 1.4e-4
    # off, half of fp16's rounding), so that only the kernel's error is measured.
    given = grad_output(ours[0])
    truth = _run(getattr(reference, name), wide, grad_of, wide_kwargs, lambda l: given.double())
    for got, exp in zip(ours, truth):
        assert got.shape == exp.shape and got.dtype == dtype
    if dtype == torch.float32:
        for got, exp in zip(ours, truth):
            torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-6, equal_nan=True)
        return ours
    if name in TORCH_BASELINE and set(kwargs) <= TORCH_ARGS[name]:
        base_fn = TORCH_BASELINE[name]
    else:
        base_fn = getattr(reference, name)
    base = _run(base_fn, tensors, grad_of, kwargs, grad_output)
    rounded_twice = any(not torch.all(grad_output(o) == 1) for o in ours[:1])
    for i, (b, g, e) in enumerate(zip(base, ours, truth)):
        factor = 2.0 if i > 0 and rounded_twice else 1.25
        # torch's error, but at least half an ulp of the largest value: one element can round luckily
        finite = e[torch.isfinite(e)]
        half_ulp = torch.finfo(dtype).eps / 2 * (finite.abs().max().item() if finite.numel() else 0.0)
        limit = factor * max(_max_err(b, e), half_ulp) + 1e-6
        assert _max_err(g, e) <= limit, (name, kwargs, i, _max_err(g, e), _max_err(b, e))
    return ours


def logits(*shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def labels(n, v, ignore=0):
    t = torch.randint(0, v, (n,), device=DEVICE)
    t[:ignore] = -100
    return t


# --------------------------------------------------------------------------------------------------
# cross-entropy and softmax focal
# --------------------------------------------------------------------------------------------------

# (N, V) and why: V=1 (one class), 7 (unaligned), 64 (power of two), 1000 (several warps' worth),
# 4099 (more than one block, unaligned)
SHAPES = [(3, 1), (5, 7), (4, 64), (6, 1000), (2, 4099)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, v", SHAPES)
@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_softmax_shapes_and_dtypes(loss, n, v, dtype):
    check(loss, [logits(n, v, dtype=dtype), labels(n, v, ignore=1)], {})


CE_OPTIONS = {
    "plain": {},
    "weight": {"weight": "w"},
    "smoothing": {"label_smoothing": 0.1},
    "weight_smoothing": {"weight": "w", "label_smoothing": 0.3},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.0},
    "everything": {"weight": "w", "label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0},
    "ignore_index_7": {"ignore_index": 7},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_cross_entropy_options(option, reduction, dtype):
    n, v = 9, 37
    kwargs = {k: ((torch.rand(v, device=DEVICE) + 0.1).to(dtype) if val == "w" else val)
              for k, val in CE_OPTIONS[option].items()}
    t = labels(n, v, ignore=2)
    t[t == -100] = kwargs.get("ignore_index", -100)
    t[3] = 7
    check("cross_entropy", [logits(n, v, dtype=dtype), t], {**kwargs, "reduction": reduction})


@pytest.mark.parametrize("v", [37, 5000], ids=["one_chunk", "chunked"])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_softcap_slope_keeps_its_digits_on_saturated_logits(loss, v):
    """Logits up to ~12 caps: the cap's slope 1 - tanh^2 was taken from the capped logit, as 1 - th^2
    with th = capped / cap, which loses its digits as |th| nears 1. Of the gradient entries above
    1e-6 of the largest, the worst was 6.8e-3 off float64, relatively (here, V = 37; torch's fp32,
    whose tanh backward takes 1 - t^2 from its rounded tanh, 3.2e-3); now 4e-6. Checked in the row
    that fits one chunk and in the chunked one."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, v, generator=g, dtype=torch.float64) * 100).to(DEVICE)
    t = torch.randint(0, v, (6,), generator=g).to(DEVICE)
    kwargs = {"softcap": 30.0, "reduction": "sum"}
    ours = _run(getattr(fastloss, loss), [x.float(), t], (0,), kwargs, torch.ones_like, "triton")[1].double()
    truth = _run(getattr(reference, loss), [x, t], (0,), kwargs, torch.ones_like)[1]
    big = truth.abs() > 1e-6 * truth.abs().max()
    assert ((ours - truth).abs()[big] / truth.abs()[big]).max() <= 1e-4


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("cap", [30.0, FAST_TANH_MAX_CAP, 1e7])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_softcap_of_16_bit_logits_at_any_cap(loss, cap, dtype):
    """16-bit logits with a cap up to FAST_TANH_MAX_CAP take the capped logit's tanh without its
    series near 0, within ~2.4e-7 cap of its value on a GPU (6e-8 cap under the interpreter), an
    error that grows with the cap; past it they take the series. With the bound taken away, the cap
    of 1e7 failed for both losses and dtypes (focal bf16: its loss 0.094 off, the baseline's 0.031)."""
    check(loss, [logits(8, 300, dtype=dtype), labels(8, 300)], {"softcap": cap, "reduction": "sum"})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "smoothing", "weight_smoothing", "everything"])
def test_cross_entropy_probability_targets(option, reduction, dtype):
    n, v = 6, 45
    kwargs = {k: ((torch.rand(v, device=DEVICE) + 0.1).to(dtype) if val == "w" else val)
              for k, val in CE_OPTIONS[option].items()}
    target = torch.rand(n, v, device=DEVICE).softmax(-1).to(dtype)
    check("cross_entropy", [logits(n, v, dtype=dtype), target], {**kwargs, "reduction": reduction})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", [{}, {"weight": "w"}, {"softcap": 3.0}, {"ignore_index": 4}])
def test_focal_options(option, reduction, gamma, dtype):
    n, v = 8, 29
    kwargs = {k: ((torch.rand(v, device=DEVICE) + 0.1).to(dtype) if val == "w" else val) for k, val in option.items()}
    t = labels(n, v, ignore=2)
    t[t == -100] = kwargs.get("ignore_index", -100)
    t[5] = 4
    check("focal_loss", [logits(n, v, dtype=dtype), t], {**kwargs, "gamma": gamma, "reduction": reduction})


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_kernel_properties(gamma):
    # γ = 0 is cross-entropy; otherwise focal ≤ CE, and focal / CE = (1 - p_y)^γ per row
    x, t = logits(12, 300), labels(12, 300, ignore=2)
    w = torch.rand(300, device=DEVICE) + 0.1
    with fastloss.use_backend("triton"):
        ce = fastloss.cross_entropy(x, t, weight=w, reduction="none")
        torch.testing.assert_close(fastloss.focal_loss(x, t, gamma=0.0, weight=w, reduction="none"), ce,
                                   rtol=1e-6, atol=0)
        focal = fastloss.focal_loss(x, t, gamma=gamma, weight=w, reduction="none")
    assert torch.all(focal <= ce)
    counted = t != -100
    p_y = x.softmax(-1)[counted, t[counted]]
    torch.testing.assert_close(focal[counted] / ce[counted], (1 - p_y) ** gamma, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_sigmoid_focal_kernel_properties(gamma):
    # γ = 0 and α < 0 is BCE-with-logits; otherwise loss / BCE = (1 - p_t)^γ · α_t
    x, t = logits(500), torch.rand(500, device=DEVICE)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    with fastloss.use_backend("triton"):
        torch.testing.assert_close(fastloss.sigmoid_focal_loss(x, t, alpha=-1.0, gamma=0.0), bce)
        focal = fastloss.sigmoid_focal_loss(x, t, alpha=0.25, gamma=gamma)
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    torch.testing.assert_close(focal / bce, (1 - p_t) ** gamma * alpha_t, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_all_rows_ignored(loss, reduction):
    # torch: mean over no counted rows is NaN, sum is 0, gradients are 0
    x, t = logits(4, 11), torch.full((4,), -100, device=DEVICE)
    out = check(loss, [x, t], {"reduction": reduction})
    assert torch.all(out[1] == 0)
    assert math.isnan(out[0].item()) if reduction == "mean" else torch.all(out[0] == 0)


@pytest.mark.parametrize("shape", [(11,), (2, 7, 3), (2, 7, 3, 2)], ids=["unbatched", "3d", "4d"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_spatial_inputs(shape, reduction):
    x = logits(*shape)
    t = torch.randint(0, shape[0] if len(shape) == 1 else shape[1],
                      shape[:1] + shape[2:] if len(shape) > 1 else (), device=DEVICE)
    check("cross_entropy", [x, t], {"reduction": reduction})
    check("cross_entropy", [x, torch.rand_like(x)], {"reduction": reduction})


# Logits of every layout the kernels take: a shape, the view of it given to the loss, whether the
# kernel reads them where they are (True) or a copy, and whether the columns kernel does (classes
# strided in memory, neighbouring positions nearer) or the rows kernel.
LAYOUTS = {
    "3d": ((2, 40, 3), lambda b: b, True, True),
    "transposed": ((40, 6), lambda b: b.t(), True, True),
    "4d": ((2, 5, 3, 4), lambda b: b, True, True),
    "4d_sliced": ((4, 5, 3, 4), lambda b: b[::2, 1:], True, True),  # rows and classes sliced, inner dims flat
    "3d_view_of_class_last": ((2, 3, 40), lambda b: b.transpose(1, 2), True, False),  # rows of classes
    "classes_sliced": ((6, 80), lambda b: b[:, ::2], False, False),  # rows farther apart than classes
    "4d_inner_dims_not_flat": ((2, 40, 4, 4), lambda b: b[:, :, ::2], False, True),  # (2, 4) strides (8, 1)
    "more_classes_than_columns_take": ((2, 1100, 3), lambda b: b, False, False),
    # classes innermost: rows, but narrow ones (C x pitch x size <= functional._COLUMNS_MAX_ROW_COST)
    # run the columns kernel, its positions a pitch apart
    "channels_last_narrow": ((2, 7, 3, 4), lambda b: b.contiguous(memory_format=torch.channels_last), True, True),
    "rows_narrow": ((30, 7), lambda b: b, True, True),
    "channels_last_3d_narrow": ((2, 3, 2, 3, 4), lambda b: b.contiguous(memory_format=torch.channels_last_3d), True,
                                True),  # a volume of 3 classes (N, C, D, H, W)
    "channels_last_wide": ((2, 50, 3, 4), lambda b: b.contiguous(memory_format=torch.channels_last), True, False),
    "narrow_rows_far_apart": ((2, 3, 4, 80), lambda b: b[..., :10].permute(0, 3, 1, 2), True, False),  # 80 apart
    "narrow_classes_sliced": ((6, 20), lambda b: b[:, ::2], False, True),  # copied to rows of 10: narrow ones
}


def _given_to_the_kernels(monkeypatch) -> list:
    """The logits (rows, or (N, C, D) positions) that each softmax-loss call hands its kernels, in a
    list that fills as the calls come."""
    import fastloss.autograd as autograd

    given = []
    launched = autograd.softmax_loss
    monkeypatch.setattr(autograd, "softmax_loss", lambda rows, *args: given.append(rows) or launched(rows, *args))
    return given


def _spatial_target(x, ignore=1, value=None):
    """Class indices for (N, C, d1, ...) logits: the first ``ignore`` positions ignored (-100, or
    ``value``), and position 3 class 7 when there is one (CE_OPTIONS' ignore_index)."""
    t = torch.randint(0, x.shape[1], x.shape[:1] + x.shape[2:], device=DEVICE)
    t.view(-1)[:ignore] = -100 if value is None else value
    if t.numel() > 3 and x.shape[1] > 7:
        t.view(-1)[3] = 7
    return t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_cross_entropy_options_with_strided_classes(option, reduction, dtype):
    """(N, C, d1, d2) logits with their classes strided in memory (a segmentation map's layout) run
    the columns kernel, which steps through the classes with one lane a position: every option."""
    v = 37
    kwargs = {k: ((torch.rand(v, device=DEVICE) + 0.1).to(dtype) if val == "w" else val)
              for k, val in CE_OPTIONS[option].items()}
    x = logits(3, v, 2, 3, dtype=dtype)
    check("cross_entropy", [x, _spatial_target(x, 2, kwargs.get("ignore_index"))], {**kwargs, "reduction": reduction})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_cross_entropy_options_on_narrow_rows(option, dtype):
    """A channels_last map of 19 classes, and its (N H W, 19) reshape: rows too narrow for the rows
    kernel, which the columns kernel reads as positions 19 elements apart: every option."""
    v = 19
    kwargs = {k: ((torch.rand(v, device=DEVICE) + 0.1).to(dtype) if val == "w" else val)
              for k, val in CE_OPTIONS[option].items()}
    x = logits(3, v, 2, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    t = _spatial_target(x, 2, kwargs.get("ignore_index"))
    check("cross_entropy", [x, t], {**kwargs, "reduction": "mean"})
    check("cross_entropy", [x.permute(0, 2, 3, 1).reshape(-1, v), t.reshape(-1)], {**kwargs, "reduction": "none"})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["probabilities", "probabilities_other_layout", "focal_weight_gamma_half"])
def test_probabilities_and_focal_on_narrow_rows(case, dtype):
    """The columns kernel on a channels_last map of 19 classes, with probability targets (in the
    logits' layout, and contiguous) and softmax focal loss."""
    v = 19
    x = logits(2, v, 3, 4, dtype=dtype).contiguous(memory_format=torch.channels_last)
    if case.startswith("probabilities"):
        p = torch.rand(2, v, 3, 4, device=DEVICE).softmax(1).to(dtype)
        if case == "probabilities":
            p = p.contiguous(memory_format=torch.channels_last)
        check("cross_entropy", [x, p], {"label_smoothing": 0.1, "reduction": "sum"})
    else:
        w = (torch.rand(v, device=DEVICE) + 0.1).to(dtype)
        check("focal_loss", [x, _spatial_target(x, 2)], {"weight": w, "gamma": 0.5, "reduction": "mean"})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_narrow_rows_over_several_programs(dtype):
    """Narrow rows over several programs of the columns kernel, the last one part full: a channels_last
    map with more positions a row than a program takes (blocks of one row each, positions 3 apart),
    and 2-D rows of 5 classes."""
    x = logits(2, 3, 20, 30, dtype=dtype).contiguous(memory_format=torch.channels_last)  # 600 positions a row
    w = (torch.rand(3, device=DEVICE) + 0.1).to(dtype)
    check("cross_entropy", [x, _spatial_target(x, 5)], {"reduction": "mean"})
    check("cross_entropy", [x, _spatial_target(x, 5)], {"weight": w, "label_smoothing": 0.1, "reduction": "none"})
    check("cross_entropy", [logits(1100, 5, dtype=dtype), labels(1100, 5, ignore=3)], {"reduction": "sum"})


@pytest.mark.parametrize("dtype, classes, columns", [(torch.bfloat16, 28, True), (torch.bfloat16, 29, False),
                                                     (torch.float16, 28, True), (torch.float32, 20, True),
                                                     (torch.float32, 21, False)], ids=str)
def test_which_rows_are_narrow(dtype, classes, columns, monkeypatch):
    """Contiguous rows of up to 28 classes in 16 bits and 20 in fp32 (as the docs say) run the
    columns kernel; wider ones the rows kernel."""
    given = _given_to_the_kernels(monkeypatch)
    check("cross_entropy", [logits(6, classes, dtype=dtype), labels(6, classes)], {})
    assert [rows.dim() for rows in given] == [3 if columns else 2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["probabilities", "probabilities_own_layout", "probabilities_everything", "focal",
                                  "focal_weight_gamma_half"])
def test_probabilities_and_focal_with_strided_classes(case, reduction, dtype):
    """The columns kernel with probability targets (laid out as the logits, or in a layout of their
    own: channels_last) and softmax focal loss."""
    v = 23
    x = logits(2, v, 3, 4, dtype=dtype)
    w = (torch.rand(v, device=DEVICE) + 0.1).to(dtype)
    if case.startswith("probabilities"):
        p = torch.rand(2, v, 3, 4, device=DEVICE).softmax(1).to(dtype)
        if case == "probabilities_own_layout":
            p = p.contiguous(memory_format=torch.channels_last)
        kwargs = {"weight": w, "label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0} if case.endswith("everything") else {}
        check("cross_entropy", [x, p], {**kwargs, "reduction": reduction})
    else:
        kwargs = {"weight": w, "gamma": 0.5} if case.endswith("half") else {}
        check("focal_loss", [x, _spatial_target(x, 2)], {**kwargs, "reduction": reduction})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 333), (2, 3, 1100), (2, 2, 5, 77), (1, 150, 7)],
                         ids=["many_positions", "blocks_of_a_row", "two_classes", "more_classes_than_block"])
def test_strided_classes_over_several_programs(shape, dtype):
    """Positions over several programs of the columns kernel, the last one part full: of all N D in
    order, and (where a row has more positions than a program takes) blocks of one row each; two
    classes; and more classes than positions a program."""
    x = logits(*shape, dtype=dtype)
    for reduction in ("mean", "none"):
        check("cross_entropy", [x, _spatial_target(x, 5)], {"reduction": reduction})
    w = (torch.rand(shape[1], device=DEVICE) + 0.1).to(dtype)
    check("cross_entropy", [x, _spatial_target(x, 5)], {"weight": w, "label_smoothing": 0.1, "reduction": "sum"})
    check("cross_entropy", [x, torch.rand_like(x, dtype=torch.float32).softmax(1).to(dtype)], {"label_smoothing": 0.1})


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_kernel_reads_the_logits_where_they_are(layout, monkeypatch):
    """Which logits the kernel is given: classes strided in memory as (N, C, D) positions, a view of
    the logits (no copy); classes innermost as rows, a view; a copy only where the inner dimensions do
    not flatten into one stride, or past the classes the columns kernel takes."""
    shape, view, in_place, columns = LAYOUTS[layout]
    x = view(logits(*shape))
    given = _given_to_the_kernels(monkeypatch)
    check("cross_entropy", [x, _spatial_target(x)], {})
    (rows,) = given  # a view of the (leaf copy of) x given to the loss, or (of) a copy
    assert (rows._base is not None and rows._base.is_leaf and rows.data_ptr() == rows._base.data_ptr()) == in_place
    assert rows.dim() == (3 if columns else 2)


@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_channels_last_logits_are_read_where_they_are(loss, monkeypatch):
    """(N, C, H, W) logits in channels_last hold each position's classes together: the kernel reads
    them in place (no copy to move the classes last; at 7 classes, narrow rows, the columns kernel),
    and the gradient has their layout."""
    x = logits(2, 7, 3, 4).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 7, (2, 3, 4), device=DEVICE)
    given = _given_to_the_kernels(monkeypatch)
    _, grad = check(loss, [x, t], {})
    # a view of the logits given (a leaf copy of x)
    assert [rows._base is not None and rows.data_ptr() == rows._base.data_ptr() for rows in given] == [True]
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss", "huber_loss", "sigmoid_focal_loss"])
def test_grad_output_of_exactly_one_and_second_backward(loss, reduction):
    x = logits(5, 33).requires_grad_()
    t = labels(5, 33) if loss in ("cross_entropy", "focal_loss") else torch.rand(5, 33, device=DEVICE)
    with fastloss.use_backend("triton"):
        out = getattr(fastloss, loss)(x, t, reduction=reduction)
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out), retain_graph=True)  # 1: the early exit
    (expected,) = torch.autograd.grad(getattr(reference, loss)(x, t, reduction=reduction), x, torch.ones_like(out))
    torch.testing.assert_close(g, expected)
    if reduction == "none" and loss in ("huber_loss", "sigmoid_focal_loss"):
        # one factor per element: the backward writes a new buffer, so it can run again
        (again,) = torch.autograd.grad(out, x, torch.ones_like(out))
        torch.testing.assert_close(again, expected)
        return
    # the saved gradient was consumed in place: a second backward raises instead of scaling it twice
    with pytest.raises(RuntimeError, match="backward can run only once"):
        torch.autograd.grad(out, x, torch.ones_like(out))


@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss", "huber_loss", "sigmoid_focal_loss"])
def test_create_graph_is_refused(loss):
    """The gradient is computed in the forward, so it cannot be differentiated again: a backward with
    create_graph=True raises at once, with a message that says what to do (never a silent 0)."""
    x = logits(5, 33).requires_grad_()
    t = labels(5, 33) if loss in ("cross_entropy", "focal_loss") else torch.rand(5, 33, device=DEVICE)
    with fastloss.use_backend("triton"):
        out = getattr(fastloss, loss)(x, t, reduction="sum")
    with pytest.raises(RuntimeError, match="cannot be differentiated again.*reference"):
        torch.autograd.grad(out, x, create_graph=True)


def test_a_second_order_through_the_model_is_refused_and_the_reference_gives_it():
    """A penalty on the gradient of a weight upstream of the loss, differentiated with respect to a
    weight between them (torch.autograd.grad with inputs=, which prunes what leads elsewhere): a
    gradient returned under create_graph=True through a node that raises when reached was pruned
    there, and the result silently lacked the loss's own term. So create_graph=True raises, and the
    reference backend, which it names, gives torch's second order."""
    x, t = logits(8, 6), labels(8, 5)
    w1, w2 = logits(6, 7).requires_grad_(), logits(7, 5).requires_grad_()

    def penalty_grad(loss_fn):
        out = loss_fn(torch.tanh(x @ w1) @ w2, t)
        (g1,) = torch.autograd.grad(out, w1, create_graph=True)
        return torch.autograd.grad(g1.pow(2).sum(), w2)[0]

    with fastloss.use_backend("triton"), pytest.raises(RuntimeError, match="cannot be differentiated again"):
        penalty_grad(fastloss.cross_entropy)
    with fastloss.use_backend("reference"):
        torch.testing.assert_close(penalty_grad(fastloss.cross_entropy), penalty_grad(F.cross_entropy))


@pytest.mark.parametrize("loss, what", [("cross_entropy", "weight"), ("focal_loss", "weight"),
                                        ("cross_entropy", "probabilities")])
def test_gradients_the_kernels_do_not_compute_come_from_the_reference(loss, what):
    """Class weights (and probability targets) that require grad get their gradient, the same with
    the kernels forced as on the reference: the kernels compute only the logits' gradient, so such a
    call takes the reference instead of silently leaving the weights without one."""
    x = logits(6, 9).requires_grad_()
    other = (torch.rand(9, device=DEVICE) + 0.5) if what == "weight" else torch.softmax(logits(6, 9), -1)
    other.requires_grad_()
    t, kwargs = (labels(6, 9, ignore=1), {"weight": other}) if what == "weight" else (other, {})
    grads = []
    for name in ("reference", "triton"):
        with fastloss.use_backend(name):
            grads.append(torch.autograd.grad(getattr(fastloss, loss)(x, t, **kwargs), (x, other)))
    for ours, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, expected)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [50, 4099], ids=["one-chunk", "chunked"])
def test_masked_vocabulary_huge_logits_and_nan_row(v, dtype):
    n = 5
    x = logits(n, v) * 1e3                        # saturated softmax (60000 at most: fits fp16)
    x = x.clamp(-6e4, 6e4).to(dtype)
    x[0, 10:] = float("-inf")                     # masked vocabulary
    x[2, 7] = float("nan")                        # NaN row → NaN loss for that row only
    x[4] = float("-inf")                          # every class masked: NaN, as torch's -inf - (-inf)
    t = torch.tensor([3, 1, 2, 0, 4], device=DEVICE)
    ours = check("cross_entropy", [x, t], {"reduction": "none"})
    assert torch.isnan(ours[0][[2, 4]]).all() and torch.isfinite(ours[0][[0, 1, 3]]).all()
    check("focal_loss", [x[[0, 1, 3, 4]], t[[0, 1, 3, 4]]], {"reduction": "none", "gamma": 0.5})


@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
@pytest.mark.parametrize("v", [50, 4099], ids=["one-chunk", "chunked"])
def test_plus_inf_logit_gives_a_nan_row(loss, v):
    """A +inf logit makes its row's loss and whole gradient NaN, as torch's log_softmax does (inf -
    inf), the target's logit or another; the other rows are untouched."""
    x = logits(4, v)
    x[1, 5] = float("inf")
    x[2, 0] = x[2, v - 1] = float("inf")
    t = torch.tensor([3, 1, 0, 2], device=DEVICE)  # row 2's target is one of them
    loss, grad = check(loss, [x, t], {"reduction": "none"})
    assert loss[1:3].isnan().all() and grad[1:3].isnan().all()
    assert torch.isfinite(loss[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()


@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_ignored_row_has_a_zero_gradient_whatever_its_logits(loss):
    """The kernels read no logits of an ignored row: NaN and +inf there change nothing, nor a row of
    -inf (torch's gradient is NaN there, 0 times NaN; README)."""
    x = logits(4, 9)
    x[1, 2], x[1, 4] = float("nan"), float("inf")
    x[3] = float("-inf")
    x.requires_grad_()
    with fastloss.use_backend("triton"):
        out = getattr(fastloss, loss)(x, torch.tensor([0, -100, 5, -100], device=DEVICE), reduction="sum")
    out.backward()
    assert torch.isfinite(out) and not x.grad[1].any() and not x.grad[3].any() and torch.isfinite(x.grad).all()
    x_torch = x.detach()[3:].requires_grad_()
    F.cross_entropy(x_torch, torch.tensor([-100], device=DEVICE), reduction="sum").backward()
    assert x_torch.grad.isnan().all()  # the difference the README states


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_ignored_row_has_a_zero_gradient_whatever_its_grad_output(loss, inplace):
    """With reduction='none', torch gives an ignored row a zero gradient whatever grad_output holds
    there: per-row losses divided by per-row token counts (0 on padding rows, so 0/0) and summed
    with nansum send NaN back to exactly those rows. 0 * NaN must not make them NaN."""
    x = logits(4, 9)
    t = torch.tensor([0, -100, 5, -100], device=DEVICE)
    go = torch.tensor([0.5, float("nan"), 2.0, float("inf")], device=DEVICE)
    h = x.clone().requires_grad_()
    with fastloss.use_backend("triton"):
        out = getattr(fastloss, loss)(h * 1, t, reduction="none", inplace_backward=inplace)
    out.backward(go)
    expected = x.clone().requires_grad_()
    getattr(reference, loss)(expected, t, reduction="none").backward(go)
    assert not h.grad[[1, 3]].any()
    torch.testing.assert_close(h.grad, expected.grad)
    if loss == "cross_entropy":  # the reference is torch's own here
        expected = x.clone().requires_grad_()
        F.cross_entropy(expected, t, reduction="none").backward(go)
        torch.testing.assert_close(h.grad, expected.grad)


@pytest.mark.parametrize("go", [float("nan"), float("inf")])
def test_a_non_finite_scalar_grad_output(go):
    """A NaN or infinite scalar grad_output: the reference (the CPU path) gives torch's gradient, an
    ignored row's 0 included. The kernels' backward scales the whole saved gradient, so there the
    ignored rows are NaN too (0 * NaN), as the README says; every counted row is non-finite in both.
    Keeping zeros at 0 in the scale would match torch's ignored rows but not its rows whose class
    weight is 0 (torch's -0 * NaN is NaN there)."""
    x = logits(4, 9)
    t = torch.tensor([0, -100, 5, 2], device=DEVICE)
    expected = x.clone().requires_grad_()
    F.cross_entropy(expected, t).backward(torch.tensor(go, device=DEVICE))
    ref = x.clone().requires_grad_()
    reference.cross_entropy(ref, t).backward(torch.tensor(go, device=DEVICE))
    torch.testing.assert_close(ref.grad, expected.grad, equal_nan=True)
    assert not expected.grad[1].any()
    h = x.clone().requires_grad_()
    with fastloss.use_backend("triton"):
        fastloss.cross_entropy(h, t).backward(torch.tensor(go, device=DEVICE))
    counted = torch.tensor([0, 2, 3], device=DEVICE)
    assert not torch.isfinite(h.grad[counted]).any() and not torch.isfinite(expected.grad[counted]).any()
    assert h.grad[1].isnan().all()


def test_class_weights_that_sum_to_zero():
    """Negative class weights summing to exactly 0 over the counted rows: torch's mean is the weighted
    sum over 0, +inf or -inf, and so is the reference's. The kernels divide each row's term by the sum
    before adding them, +inf and -inf, so their mean is NaN (the README says so)."""
    x = logits(4, 3)
    t = torch.tensor([0, 1, 0, 1], device=DEVICE)
    w = torch.tensor([1.0, -1.0, 5.0], device=DEVICE)
    expected = F.cross_entropy(x, t, weight=w)
    assert expected.isinf()
    assert reference.cross_entropy(x, t, weight=w) == expected
    with fastloss.use_backend("triton"):
        assert fastloss.cross_entropy(x, t, weight=w).isnan()


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_target_logit_of_minus_inf(gamma):
    """A target whose own logit is -inf (p_y = 0): the loss is inf, and the gradient is the limit
    of the focal one, the cross-entropy gradient, finite: on the kernels and in the reference alike
    (its autograd used to give NaN, 0 times inf in the focal factor's derivative)."""
    x = logits(3, 9)
    x[1, 4] = float("-inf")
    t = torch.tensor([0, 4, 8], device=DEVICE)
    loss, grad = check("focal_loss", [x, t], {"gamma": gamma, "reduction": "none"})
    assert torch.isinf(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isfinite(grad).all()
    ce_row = torch.softmax(x[1].double(), 0)
    ce_row[4] -= 1
    go = _random_grad_output(loss)[1]
    torch.testing.assert_close(grad[1].double(), go.double() * ce_row, rtol=1e-5, atol=1e-7)

@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 2.0])
def test_focal_saturated_logits_are_finite(gamma):
    x = torch.tensor([[60.0, 0.0, -60.0], [-60.0, 60.0, 0.0], [0.0, 1e4, -1e4]], device=DEVICE)
    x.requires_grad_()
    t = torch.tensor([0, 0, 1], device=DEVICE)     # p_y → 1, p_y → 0, p_y → 1
    with fastloss.use_backend("triton"):
        loss = fastloss.focal_loss(x, t, gamma=gamma, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_out_of_range_target_on_device_gives_nan_row(monkeypatch):
    if not CUDA:
        pytest.skip("on CPU out-of-range targets raise IndexError before the kernel (tested in test_api)")
    x, t = logits(3, 10), torch.tensor([1, 10, 2], device=DEVICE)
    loss = fastloss.cross_entropy(x, t, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    monkeypatch.setenv("FASTLOSS_STRICT", "1")
    with pytest.raises(IndexError):
        fastloss.cross_entropy(x, t)


def test_non_contiguous_logits_and_targets():
    big = logits(6, 80)
    check("cross_entropy", [big[:, :70], labels(6, 70)], {})       # padded row stride, read in place
    check("cross_entropy", [big.t()[:30], labels(30, 6)], {})        # strided classes: copied
    both = torch.stack([labels(6, 70), labels(6, 70)], dim=1)
    check("cross_entropy", [big[:, :70], both[:, 1]], {})           # strided class indices
    check("cross_entropy", [big[:, :70], torch.tensor(3, device=DEVICE).expand(6)], {"reduction": "none"})
    check("cross_entropy", [big[:, :70], torch.rand(70, 6, device=DEVICE).t()], {})  # strided probabilities
    check("cross_entropy", [big[:, :70], labels(6, 70)], {"weight": (torch.rand(140, device=DEVICE) + 0.5)[::2]})


def test_non_contiguous_elementwise_inputs():
    """Transposed inputs, targets and Huber weights pair up element by element as their shapes say
    (the kernels read flat memory, so each is made contiguous first)."""
    def strided():
        return logits(30, 7).t()

    check("huber_loss", [strided(), strided()], {"weight": strided().abs(), "reduction": "none"}, grad_of=(0, 1))
    check("huber_loss", [logits(7, 30), logits(7, 30)], {"weight": strided().abs()}, grad_of=(0, 1))
    check("smooth_l1_loss", [strided(), logits(7, 30)], {"beta": 0.5}, grad_of=(0, 1))
    check("sigmoid_focal_loss", [strided(), torch.rand(30, 7, device=DEVICE).t()], {"reduction": "sum"})


def test_gradients_the_kernels_do_not_write_come_from_the_reference():
    """A Huber weight and sigmoid focal targets that require grad get their gradient (the kernels
    write none: those calls take the reference), never a missing one."""
    x, y = logits(3, 41), logits(3, 41)
    w, t = torch.rand(3, 41, device=DEVICE), torch.rand(3, 41, device=DEVICE)
    for call, arg in ((lambda m, a: m.huber_loss(x, y, weight=a), w),
                      (lambda m, a: m.sigmoid_focal_loss(x, a, reduction="sum"), t)):
        grads = []
        for module, backend_name in ((fastloss, "triton"), (reference, "reference")):
            leaf = arg.clone().requires_grad_()
            with fastloss.use_backend(backend_name):
                grads.append(torch.autograd.grad(call(module, leaf), leaf)[0])
        torch.testing.assert_close(*grads)


def test_single_class_with_any_stride():
    # V = 1: the class dimension's stride is whatever the view gives; the kernel reads column 0 only
    check("cross_entropy", [logits(1, 5).t(), torch.zeros(5, dtype=torch.long, device=DEVICE)], {})
    check("cross_entropy", [logits(3, 1, 4), torch.zeros(3, 4, dtype=torch.long, device=DEVICE)], {"reduction": "none"})


def test_mixed_dtypes_promote_as_torch_does():
    x, t = logits(4, 30, dtype=torch.bfloat16), torch.rand(4, 30, device=DEVICE)
    with fastloss.use_backend("triton"):
        focal = fastloss.sigmoid_focal_loss(x, t, reduction="none")   # bf16 and fp32 → fp32
        huber = fastloss.huber_loss(x, x.flip(0), weight=t)               # fp32 weight → fp32
    assert focal.dtype == huber.dtype == torch.float32
    torch.testing.assert_close(focal, reference.sigmoid_focal_loss(x, t, reduction="none"))
    # torch rounds the unweighted loss to bf16 before weighting; fastloss stays in fp32: compare with float64
    truth = reference.huber_loss(x.double(), x.flip(0).double(), weight=t.double())
    assert abs(huber.double() - truth) <= abs(F.huber_loss(x, x.flip(0), weight=t).double() - truth) + 1e-6


@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_deterministic(loss):
    # Bitwise equal runs. On CUDA the rows are long enough to be split across programs, which
    # combine their segments' max and sum: that must not depend on which program finishes first.
    # (The interpreter runs programs one after another, so on CPU this checks less.)
    n, v = (64, 40000) if CUDA else (16, 300)
    x, t = logits(n, v, dtype=torch.bfloat16 if CUDA else torch.float32), labels(n, v, ignore=3)
    fn = getattr(fastloss, loss)
    first = _run(fn, [x, t], (0,), {}, _random_grad_output, "triton")
    second = _run(fn, [x, t], (0,), {}, _random_grad_output, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_matches_and_saves_the_buffer(loss, reduction):
    fn = functools.partial(getattr(fastloss, loss), reduction=reduction)
    x0, t = logits(5, 40), labels(5, 40, ignore=1)
    expected = _run(fn, [x0, t], (0,), {}, _random_grad_output, "triton")
    leaf = x0.clone().requires_grad_()
    x = leaf * 1.0                                  # a non-leaf, like a model's output
    with fastloss.use_backend("triton"):
        out = fn(x, t, inplace_backward=True)
    (g,) = torch.autograd.grad(out, leaf, _random_grad_output(out))
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(g, expected[1])
    torch.testing.assert_close(x.detach(), expected[1])   # the gradient lives in the logits' memory


@pytest.mark.parametrize("shape", [(2, 3, 40), (40,)], ids=["view_of_3d_output", "unbatched"])
def test_inplace_backward_on_views(shape):
    # the usual call: logits.view(-1, V) of a (B, T, V) model output; (C,) inputs are viewed as (1, C)
    lin = torch.nn.Linear(8, shape[-1]).to(DEVICE)
    h = torch.randn(*shape[:-1], 8, device=DEVICE)
    t = labels(math.prod(shape[:-1]), shape[-1]).reshape(shape[:-1])
    grads = []
    for inplace in (False, True):
        lin.zero_grad()
        out = lin(h)
        x = out.view(-1, shape[-1]) if out.dim() > 1 else out
        with fastloss.use_backend("triton"):
            fastloss.cross_entropy(x, t.reshape(-1) if out.dim() > 1 else t, inplace_backward=inplace).backward()
        grads.append(lin.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_an_expanded_input_is_copied_before_an_inplace_gradient():
    """Logits whose elements share memory (an expanded (N, C, d) tensor: every n reads one place) are
    copied before the kernel writes a gradient over them, or one position's gradient would overwrite
    another's logits; loss and gradient as the reference gives them, and the logits unchanged."""
    base = logits(1, 6, 5)
    t = _spatial_target(base.expand(3, 6, 5))
    leaf = base.detach().requires_grad_()
    x = (leaf * 1.0).expand(3, 6, 5)
    with fastloss.use_backend("triton"):
        out = fastloss.cross_entropy(x, t, inplace_backward=True, reduction="none")
    go = _random_grad_output(out)
    (g,) = torch.autograd.grad(out, leaf, go)
    wide = base.double().requires_grad_()
    truth = reference.cross_entropy(wide.expand(3, 6, 5), t, None, -100, "none", 0.0, 0.0, None)
    (truth_g,) = torch.autograd.grad(truth, wide, go.double())
    torch.testing.assert_close(out.double(), truth)
    torch.testing.assert_close(g.double(), truth_g)
    assert torch.equal(x.detach(), base.expand(3, 6, 5))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inplace_backward_where_the_logits_are(layout):
    """inplace_backward=True writes the gradient into the logits wherever the kernel reads them where
    they are: rows of classes, and classes strided in memory (a contiguous (N, C, d) tensor, a
    transposed one), which the columns kernel reads. Where the kernel needs a copy (inner dimensions
    that do not flatten into one stride, more strided classes than the columns kernel takes), the copy
    takes it and the logits keep their values. The loss and gradient are the out-of-place ones."""
    shape, view, in_place, _ = LAYOUTS[layout]
    base = logits(*shape)
    x0 = view(base)
    t = _spatial_target(x0)
    expected = _run(fastloss.cross_entropy, [x0, t], (0,), {}, _random_grad_output, "triton")
    leaf = base.detach().requires_grad_()
    x = view(leaf * 1.0)
    with fastloss.use_backend("triton"):
        out = fastloss.cross_entropy(x, t, inplace_backward=True)
    (g,) = torch.autograd.grad(out, leaf, _random_grad_output(out))
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(view(g), expected[1])
    if in_place:
        torch.testing.assert_close(x.detach(), expected[1])
    else:
        assert torch.equal(x.detach(), x0)


@pytest.mark.parametrize("loss, dtype, inplace, stream", [
    *[(loss, dtype, inplace, "default_stream") for loss in ("cross_entropy", "focal_loss") for dtype in DTYPES
      for inplace in (False, True)],
    *[("huber_loss", dtype, False, "default_stream") for dtype in DTYPES],
    ("sigmoid_focal_loss", torch.float16, False, "default_stream"),  # predicted in fp16 only
    *[("cross_entropy", torch.bfloat16, inplace, "other_stream") for inplace in (False, True)],
    ("huber_loss", torch.float16, False, "other_stream"),
], ids=lambda v: {False: "out_of_place", True: "inplace"}.get(v, str(v)) if isinstance(v, bool) else str(v))
def test_a_predicted_grad_output_gives_the_same_bits(loss, dtype, inplace, stream, monkeypatch):
    """A backward with grad_output != 1 (a divided loss) scales the saved gradient. After one with a
    power of two, the forwards write the gradient already multiplied by it (fp16 no further than
    unscaled, nor below 1, and only on the device's default stream), so the backward has little or nothing left
    to do; the loss and the gradients (Huber's: the input's and the target's) are the same bits as
    without that prediction, whether it was right or wrong, and whatever the order of forwards and
    backwards. Off the default stream (CUDA graphs are captured there) nothing is predicted, and no
    prediction is kept."""
    import fastloss.autograd as fa

    if stream == "other_stream":
        monkeypatch.setattr(fa, "_on_default_stream", lambda t: False)

    x0 = logits(6, 300, dtype=dtype)
    if loss in ("cross_entropy", "focal_loss"):
        t = labels(6, 300, ignore=1)
        fn = functools.partial(getattr(fastloss, loss), inplace_backward=inplace, reduction="sum")
    else:
        t = (x0 + torch.randn_like(x0)) if loss == "huber_loss" else (torch.rand_like(x0, dtype=torch.float32) < 0.3).to(dtype)
        t.requires_grad_(loss == "huber_loss")
        fn = functools.partial(getattr(fastloss, loss), reduction="sum")

    def forward():
        leaf = x0.clone().requires_grad_()
        x = leaf * 1.0  # a non-leaf, as in-place needs
        with fastloss.use_backend("triton"):
            out = fn(x, t)
        return leaf, x, out

    def backward(state, g):
        leaf, _, out = state
        grads = torch.autograd.grad(out, [leaf, t] if t.requires_grad else leaf,
                                    torch.tensor(g, dtype=out.dtype, device=DEVICE))
        return out.detach(), torch.cat([grad.flatten() for grad in grads])

    def written_by(state):  # the gradients as the forward wrote them: the logits in place, else the saved ones
        _, x, out = state
        return torch.cat([w.detach().flatten().clone() for w in ([x] if inplace else out.grad_fn.saved_tensors[:-1])])

    def unpredicted(g):  # the gradient as it is without a prediction
        fa._PREDICTIONS.clear()
        return backward(forward(), g)

    def prediction():  # (the tests use one device)
        return float(next(iter(fa._PREDICTIONS.values()))) if fa._PREDICTIONS else None

    def same(got, expected, rest):
        """The same bits, but in fp16 where the gradient written was below its smallest normal (6.1e-5,
        often reached): rounded once there, twice in a pass that multiplies by ``rest`` or less."""
        if dtype != torch.float16:
            return torch.equal(got, expected)
        differ = got != expected
        return bool((expected[differ].float().abs() <= torch.finfo(dtype).tiny * rest).all())

    _, at_one = unpredicted(1.0)  # the gradient the backward scales, which no prediction touched
    fa._PREDICTIONS.clear()
    for g in (2.0 ** -3, 2.0 ** -3, 0.3, 2.0 ** 10, 2.0 ** 10, 1.0, 2.0 ** -3):
        used = prediction()
        state = forward()
        written = written_by(state)
        got = backward(state, g)
        expected = unpredicted(g)  # leaves the prediction as got's backward did
        # fp16: no further than unscaled (a sum's scale: 1), nor below 1: unscaled
        factor = 1.0 if used in (None, 0.0) or dtype == torch.float16 else used
        assert torch.equal(got[0], expected[0]) and same(got[1], expected[1], g / factor), g
        if factor == g:  # predicted right: the backward had nothing left to do
            assert torch.equal(got[1], written), g
        scale = torch.tensor(g, dtype=got[0].dtype).float()  # grad_output as the backward reads it
        assert torch.equal(expected[1], (at_one.float() * scale).to(dtype)), g  # one fp32 product, rounded
        if stream == "other_stream":
            assert not fa._PREDICTIONS  # never predicted
        else:
            assert prediction() == (g if g != 0.3 else 0.0)
            if factor != 1.0:  # written already times the prediction
                fa._PREDICTIONS.clear()
                assert same(written, (written_by(forward()).float() * factor).to(dtype), 1.0)
                backward(forward(), g)  # the prediction back as it was
    # two forwards, then their backwards in the other order: each backward uses its own forward's
    a, b = forward(), forward()
    assert same(backward(b, 0.25)[1], unpredicted(0.25)[1], 2.0)
    assert same(backward(a, 2.0 ** -3)[1], unpredicted(2.0 ** -3)[1], 1.0)


def test_each_kind_of_loss_keeps_its_own_prediction():
    """A model's losses of different kinds with factors of their own: the main loss divided by 8 for
    gradient accumulation, an auxiliary one weighted 0.1 / 8 (no power of two). The auxiliary loss's
    backward, which runs last here (it was computed first), must not spoil the cross-entropy's
    prediction: from the second step on, its forward writes the gradient already times 1/8 and its
    backward has nothing left to do."""
    import fastloss.autograd as fa

    x0, t, y0, z = logits(6, 300), labels(6, 300), logits(64), logits(64)
    fa._PREDICTIONS.clear()
    for step in range(3):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        with fastloss.use_backend("triton"):
            aux = fastloss.huber_loss(y, z)
            main = fastloss.cross_entropy(x, t)
        written = main.grad_fn.saved_tensors[0].clone()
        (main / 8 + aux * (0.1 / 8)).backward()
        x_ref = x0.clone().requires_grad_()
        (F.cross_entropy(x_ref, t) / 8).backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        if step:
            assert torch.equal(x.grad, written), step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_predicted_grad_output_and_subnormal_gradients(dtype):
    """Where the gradient holds values below the smallest normal float (probabilities under 1e-38:
    logits 90 apart), a right prediction rounds them once and the pass it saves would have rounded
    them twice, so they may differ in their last bits: only there, below 2^-126 times the larger of
    the prediction's and the rest's factor."""
    import fastloss.autograd as fa

    x0, t = logits(6, 300, dtype=dtype, scale=40.0), labels(6, 300)
    factor = 2.0 ** -3

    def run():
        leaf = x0.clone().requires_grad_()
        with fastloss.use_backend("triton"):
            out = fastloss.cross_entropy(leaf, t, reduction="sum")
        return torch.autograd.grad(out, leaf, torch.tensor(factor, dtype=out.dtype, device=DEVICE))[0].float()

    fa._PREDICTIONS.clear()
    twice = run()  # predicted 1: the forward rounds, the backward's pass rounds again
    once = run()   # predicted 1/8: right, no pass
    differ = once != twice
    assert (twice.abs() < torch.finfo(torch.float32).tiny).any()  # the case is what it says
    assert differ.any() or dtype == torch.bfloat16
    assert (twice[differ].abs() <= torch.finfo(torch.float32).tiny).all()


# divisors of a summed loss: the forms a training loop passes (a token count for gradient accumulation
# is often a 0-dim int64 tensor on the device), all >= 1 so that fp16 takes them in the forward too
DIVISORS = {"int": lambda: 7, "float": lambda: 2.5, "count_tensor": lambda: torch.tensor(13, device=DEVICE),
            "fp32_tensor": lambda: torch.tensor(3.0, device=DEVICE),
            "cpu_tensor": lambda: torch.tensor(5),  # (on a GPU: read on the host, no sync)
            "int16_tensor": lambda: torch.tensor(9, dtype=torch.int16, device=DEVICE)}  # (cast for the kernel)


@pytest.mark.parametrize("divisor", list(DIVISORS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss, kwargs", [
    ("cross_entropy", {}),
    ("cross_entropy", {"weight": "classes", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 20.0}),
    ("cross_entropy", {"inplace_backward": True}),
    ("cross_entropy", {"probabilities": True}),
    ("cross_entropy", {"spatial": True}),
    ("cross_entropy", {"spatial": True, "inplace_backward": True}),
    ("focal_loss", {"gamma": 2.0}),
    ("sigmoid_focal_loss", {}),
    ("huber_loss", {"delta": 0.7, "weight": "elements"}),
    ("smooth_l1_loss", {"beta": 0.5}),
], ids=["ce", "ce_options", "ce_inplace", "ce_probabilities", "ce_spatial", "ce_spatial_inplace", "focal",
        "sigmoid_focal", "huber_weighted", "smooth_l1"])
def test_a_divisor_divides_the_sum_inside_the_kernel(loss, kwargs, dtype, divisor):
    """``reduction="sum", divisor=d`` is the summed loss divided by d, with torch's dtype for that
    division (a 0-dim float tensor promotes it), as close to the float64 truth as the kernel's own
    rounding (once to the dtype), for its gradient too, with grad_output 1 and another; and with
    grad_output 1, as a plain ``loss.backward()`` gives it, the backward has nothing left to scale:
    the gradient returned is the one the forward wrote (no pass over it)."""
    import fastloss.autograd as fa

    kwargs = dict(kwargs)
    n, v = 6, 300
    x0 = logits(n, v, dtype=dtype)
    if kwargs.pop("spatial", False):  # (N, C, d): 30 classes strided in memory (the columns kernel)
        x0 = x0.view(n, 30, 10)
        t = _spatial_target(x0, 2)
    elif loss in ("cross_entropy", "focal_loss"):
        t = torch.rand(n, v, device=DEVICE).softmax(-1) if kwargs.pop("probabilities", False) else labels(n, v, 1)
    elif loss == "sigmoid_focal_loss":
        t = (torch.rand(n, v, device=DEVICE) < 0.3).to(dtype)
    else:
        t = (x0.float() + torch.randn(n, v, device=DEVICE)).to(dtype)
    weight = kwargs.get("weight")
    if weight is not None:  # (torch: the input's dtype)
        kwargs["weight"] = (torch.rand(v if weight == "classes" else (n, v), device=DEVICE) + 0.5).to(dtype)
    inplace = kwargs.get("inplace_backward", False)
    options = {k: v for k, v in kwargs.items() if k != "inplace_backward"}  # for leaves: the truth's
    d = DIVISORS[divisor]()
    fn = getattr(fastloss, loss)

    def step(grad_output):
        leaf = x0.clone().requires_grad_()
        x = leaf * 1.0 if inplace else leaf  # in place needs a non-leaf
        with fastloss.use_backend("triton"):
            out = fn(x, t, reduction="sum", divisor=d, **kwargs)
        written = x if inplace else out.grad_fn.saved_tensors[0]
        written = written.detach().clone()
        (g,) = torch.autograd.grad(out, leaf, None if grad_output is None else grad_output.to(out))
        return out.detach(), g, written

    # the truth in float64, through the reference, divided after the sum
    x64 = x0.double().requires_grad_()
    with fastloss.use_backend("reference"):
        truth = fn(x64, t.double() if t.is_floating_point() else t, reduction="sum", **_float64_kwargs(options)) / (
            d.double() if isinstance(d, torch.Tensor) else d)
    (truth_g,) = torch.autograd.grad(truth, x64)
    with fastloss.use_backend("triton"):
        undivided = fn(x0, t, reduction="sum", **options)
    expected_dtype = torch.result_type(undivided, d) if isinstance(d, torch.Tensor) else undivided.dtype

    step(None)  # a first step sets the prediction of grad_output (1) that the next forward takes
    out, g, written = step(None)
    assert out.dtype == expected_dtype and out.shape == () and g.dtype == dtype
    eps = 1e-5 if out.dtype == torch.float32 else torch.finfo(out.dtype).eps  # (the interpreter truncates)
    torch.testing.assert_close(out.double(), truth.detach(), rtol=eps, atol=0)
    eps = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(g.double(), truth_g, rtol=eps, atol=eps * truth_g.abs().max().item())
    assert torch.equal(g, written)  # nothing left to scale

    go = torch.tensor(0.37, device=DEVICE)  # a factor the forward did not foresee: the backward's pass
    _, g_scaled, _ = step(go)
    torch.testing.assert_close(g_scaled.double(), truth_g * go.to(expected_dtype).double(), rtol=2 * eps,
                               atol=2 * eps * truth_g.abs().max().item())
    fa._PREDICTIONS.clear()


def test_a_divisor_that_requires_grad_or_widens_the_dtype_divides_after_the_kernel():
    """Where the kernel cannot take the divisor, the kernel's sum is divided afterwards, as torch
    divides it: a divisor that requires grad gets its gradient, and a float64 one makes the loss
    float64."""
    x0, t = logits(6, 300), labels(6, 300, ignore=1)
    d = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    x = x0.clone().requires_grad_()
    with fastloss.use_backend("triton"):
        out = fastloss.cross_entropy(x, t, reduction="sum", divisor=d)
    out.backward()
    x_t, d_t = x0.clone().requires_grad_(), d.detach().clone().requires_grad_()
    expected = F.cross_entropy(x_t, t, reduction="sum") / d_t
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x_t.grad)
    torch.testing.assert_close(d.grad, d_t.grad)
    with fastloss.use_backend("triton"):
        out = fastloss.focal_loss(x0, t, gamma=0.0, reduction="sum",
                                  divisor=torch.tensor(3.0, dtype=torch.float64, device=DEVICE))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.cross_entropy(x0, t, reduction="sum").double() / 3.0)


@pytest.mark.parametrize("before", [None, 2.0 ** -24, 0.3], ids=["first", "after_2^-24", "after_0.3"])
@pytest.mark.parametrize("scale", [2.0 ** 16, 2.0 ** 12], ids=["scale_2^16", "scale_2^12"])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss", "huber_loss", "sigmoid_focal_loss"])
def test_fp16_gradients_of_a_mean_meet_a_loss_scale_before_rounding(loss, scale, before):
    """fp16 training multiplies the loss by a loss scaler's factor (2^16, say) before backward,
    because the gradient of a mean over many elements lies mostly below fp16's smallest normal
    (6.1e-5) until it is multiplied by it. Torch multiplies in fp32 and rounds once. fastloss's fp16
    gradients must come as close to the float64 truth: each entry within two ulps, or the scaled
    subnormal spacing of an unscaled gradient (written so while the factor is unknown, or when it
    exceeds the mean's divisor). They were written divided by the element count in the forward and
    met the factor only in the backward, their small entries flushed first. The softmax losses' mean
    divides by the class weights of the counted rows, so a row of weight 1 among rows of 4096 shows
    it on a few rows. Two steps: the first with nothing predicted, the second with the factor
    predicted (scale 2^12 stays below the divisor there, so the forward writes it exactly). Also
    after a backward of the same loss with a grad_output ``before`` the factor: a smaller power of
    two (a prediction below the factor wrote the gradient that much smaller, into fp16's subnormals
    or to 0, before the backward multiplied it back), or none (0.3, as an auxiliary loss weighted
    0.4 under the same scaler gives: predicted 1, it wrote a mean's gradient divided by the element
    count, flushed before the factor came)."""
    import fastloss.autograd as fa

    if loss in ("cross_entropy", "focal_loss"):
        x, t = logits(6, 300, dtype=torch.float16), labels(6, 300)
        weight = torch.full((300,), 4096.0, device=DEVICE)
        weight[t[0]] = 1.0
        t[1:][t[1:] == t[0]] = (t[0] + 1) % 300
        kwargs = {"weight": weight} if loss == "cross_entropy" else {"weight": weight, "gamma": 2.0}
        divisor = weight[t].sum().item()
    else:
        x = logits(2, 8192, dtype=torch.float16, scale=1.0)
        t = (x + 0.1 * torch.randn_like(x, dtype=torch.float32)).half() if loss == "huber_loss" else \
            (torch.rand(x.shape, device=DEVICE) < 0.1).half()
        kwargs = {"reduction": "mean"}
        divisor = x.numel()
    wide_kwargs = _float64_kwargs(kwargs)
    truth = _run(getattr(reference, loss), [x.double(), t.double() if t.is_floating_point() else t], (0,),
                 wide_kwargs, lambda l: torch.full_like(l, scale))[1]
    limit = 2.0 ** -10 * truth.abs() + max(1.0, scale / divisor) * 2.0 ** -24

    def fp16_step(backend):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            return _run(getattr(fastloss, loss), [x, t], (0,), kwargs, lambda l: torch.full_like(l, scale),
                        backend)[1]

    torch_ratio = None
    if loss in TORCH_BASELINE:
        # fastloss may be no worse than torch. Torch's CPU kernels meet the limit. Its CUDA
        # cross-entropy under autocast does not (an H100, torch 2.11: it rounds more than once), and
        # there the limit widens to torch's worst ratio to it.
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            base = _run(TORCH_BASELINE[loss], [x, t], (0,), kwargs, lambda l: torch.full_like(l, scale))[1]
        torch_ratio = ((base.double() - truth).abs() / limit).max().item()
        assert CUDA or torch_ratio <= 1.0, torch_ratio
        limit = limit * max(1.0, torch_ratio)
    fa._PREDICTIONS.clear()
    if before is not None:
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            _run(getattr(fastloss, loss), [x, t], (0,), kwargs, lambda l: torch.full_like(l, before), "triton")
    for step in range(2):
        got = fp16_step("triton")
        assert got.dtype == torch.float16
        assert ((got.double() - truth).abs() <= limit).all(), (step, ((got.double() - truth).abs() / limit).max(),
                                                                torch_ratio)


@pytest.mark.parametrize("case", ["huber_delta", "huber_weight", "huber_weight_past_4096", "cross_entropy_z_loss"])
def test_fp16_gradients_written_unscaled_stay_finite(case):
    """An fp16 mean's gradient is written unscaled while its factor is unknown (as the sum's
    gradient), and the backward multiplies by the mean's scale. The cap, 1 / the mean's scale, keeps
    it finite only where the sum's gradient is at most ~1 per element: Huber's is up to delta (times
    the weight), and the z-loss term, divided by the counted rows rather than by the class weights,
    up to 2 z lse times the mean class weight. Written unscaled, those overflowed to inf, and the
    backward kept the inf, where the mean's gradient (torch's) is finite. So did Huber's with weights
    past the 4096 once assumed (delta 16, weights 8192: inf where the mean's gradient is 32768),
    before the weights' own largest magnitude bounded it. After a first step and a predicted one."""
    import fastloss.autograd as fa

    if case == "huber_weight_past_4096":
        x = torch.tensor([20.0, -7.0, 30.0, 0.5], device=DEVICE).half()
        t = torch.zeros_like(x)
        kwargs = {"delta": 16.0, "weight": torch.full_like(x, 8192.0)}
        loss = "huber_loss"
    elif case.startswith("huber"):
        x = logits(2, 4096, dtype=torch.float16, scale=1.0) + 40000.0
        t = -x if case == "huber_delta" else x - 1000.0
        kwargs = {"delta": 1e6} if case == "huber_delta" else {"delta": 2000.0, "weight": torch.full_like(x, 100.0)}
        loss = "huber_loss"
    else:
        x, t = logits(8, 64, dtype=torch.float16) + 200.0, labels(8, 64)
        kwargs = {"weight": torch.full((64,), 4096.0, device=DEVICE, dtype=torch.float16), "z_loss": 0.1}
        loss = "cross_entropy"
    wide_kwargs = _float64_kwargs(kwargs)
    truth = _run(getattr(reference, loss), [x.double(), t.double() if t.is_floating_point() else t], (0,),
                 wide_kwargs, torch.ones_like)[1]
    fa._PREDICTIONS.clear()
    for step in range(2):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            got = _run(getattr(fastloss, loss), [x, t], (0,), kwargs, torch.ones_like, "triton")[1]
        assert got.dtype == torch.float16 and torch.isfinite(truth).all()
        assert ((got.double() - truth).abs() <= 2.0 ** -10 * truth.abs() + 2.0 ** -24).all(), (case, step)


HUBER_WEIGHTS = {"unweighted": None, "weights up to 4": [0.5, 2.0, 1.0, 0.25, 3.0, 1.0, 0.5, 4.0],
                 "weights up to 1": [1.0, 0.5, 1.0, 0.25, 0.75, 1.0, 0.5, 1.0]}


@pytest.mark.parametrize("grad_output", [1.0, 0.125, 8.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("delta, weights", [(1000.0, "unweighted"), (2.0 ** 20, "unweighted"),
                                            (16.0, "weights up to 4"), (1000.0, "weights up to 1"),
                                            (2.0 ** 20, "weights up to 1")], ids=str)
def test_fp16_huber_gradients_with_a_large_delta_keep_small_entries(delta, weights, reduction, grad_output):
    """An fp16 Huber gradient written unscaled (its grad_output unknown, or predicted beyond its cap)
    was written divided by delta, and the backward multiplied it back: with delta = 2^20 an entry of
    0.0244 came back 0, with delta = 1000 a 1e-3 two significant digits off. It is now written as
    the summed loss's gradient (torch's: the difference, times the weight), divided only by what
    keeps it inside fp16, so every entry is within two fp16 roundings of the truth, after a first
    step and after a predicted one alike. With a weight and delta past 16, that divisor was the
    largest weight allowed (4096), and the entry of 1e-4 came back 0 (delta 2^20) or 1% off (1000);
    it now comes from the weights' own largest magnitude."""
    import fastloss.autograd as fa

    x = torch.tensor([1e-4, -1e-3, 0.0244, 0.3, -0.7, 5.0, 100.0, -3000.0], device=DEVICE).half()
    y = torch.zeros_like(x)
    kwargs = {"delta": delta, "reduction": reduction}
    if HUBER_WEIGHTS[weights] is not None:
        kwargs["weight"] = torch.tensor(HUBER_WEIGHTS[weights], device=DEVICE).half()
    wide = _float64_kwargs(kwargs)
    truth = _run(reference.huber_loss, [x.double(), y.double()], (0,), wide,
                 lambda l: torch.full_like(l, grad_output))[1]
    limit = 2.0 ** -10 * truth.abs() + max(1.0, grad_output) * 2.0 ** -24
    fa._PREDICTIONS.clear()
    for step in range(2):  # unknown, then predicted
        got = _run(fastloss.huber_loss, [x, y], (0,), kwargs, lambda l: torch.full_like(l, grad_output), "triton")[1]
        assert got.dtype == torch.float16
        assert ((got.double() - truth).abs() <= limit).all(), (step, got, truth)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_inplace_backward_refuses_logits_that_cannot_hold_their_gradient(loss, backend_name):
    """Refused before anything runs, on either backend: the reference overwrites nothing, but code
    that runs on a CPU must not start raising on a GPU."""
    fn = getattr(fastloss, loss)
    t = labels(4, 12)
    leaf = logits(4, 12).requires_grad_()
    before = leaf.detach().clone()
    with fastloss.use_backend(backend_name):
        # a leaf (or a view of one) cannot be overwritten
        for x, y in ((leaf, t), (leaf[:, :10], t.clamp(max=9)), (leaf[0], t[0]), (leaf.unsqueeze(-1), t[:, None])):
            with pytest.raises(RuntimeError, match="leaf"):
                fn(x, y, inplace_backward=True)
        assert torch.equal(leaf.detach(), before)  # untouched
        # without grad mode nothing is written, so a leaf is fine there (an evaluation loop that
        # reuses the training criterion)
        with torch.no_grad():
            expected = fn(leaf, t)
            assert torch.equal(fn(leaf, t, inplace_backward=True), expected)
        assert torch.equal(leaf.detach(), before)
        # rows that share memory (an expanded row) cannot each hold their gradient: refused too
        row = leaf[:1] * 2.0
        for shared in (row.expand(4, 12), torch.as_strided(leaf * 2.0, (4, 8), (1, 1))):
            kept = shared.detach().clone()
            with pytest.raises(RuntimeError, match="rows share memory"):
                fn(shared, t.clamp(max=7), inplace_backward=True)
            assert torch.equal(shared.detach(), kept)
        # a transposed tensor is copied (its classes are strided), so its rows are its own
        fn((leaf * 2.0).t().contiguous().t(), t, inplace_backward=True).backward()


def test_inplace_backward_never_silently_wrong():
    t = labels(4, 12)
    leaf = logits(4, 12).requires_grad_()
    with fastloss.use_backend("triton"):
        # another node (x * x) saved the logits: backward raises instead of using the overwritten values
        x = leaf * 2.0
        other = (x * x).sum()
        loss = fastloss.cross_entropy(x, t, inplace_backward=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (loss + other).backward()


def _after_inplace_loss(use):
    """Backward of an in-place loss on a view of a model's output, plus ``use(x, out)`` of the logits
    x or their base out after the loss (which overwrote them with the gradient)."""
    t = labels(6, 12)
    leaf = logits(2, 3, 12).requires_grad_()
    out = leaf * 2.0
    x = out.view(-1, 12)
    with fastloss.use_backend("triton"):
        loss = fastloss.cross_entropy(x, t, inplace_backward=True)
        (loss + use(x, out)).backward()
    return leaf.grad


@pytest.mark.parametrize("use", [lambda x, out: (x * x).sum(),
                                 lambda x, out: fastloss.cross_entropy(x, labels(6, 12)),
                                 lambda x, out: out[0].sum()],
                         ids=["another-node", "a-second-loss", "the-base"])
def test_inplace_backward_logits_used_after_the_loss_raise(use):
    """The logits hold the gradient after an in-place loss: a later use of them (or of the tensor
    they view) reads the gradient, so a gradient reaching that use raises instead of flowing back as
    if it had read the logits."""
    assert _after_inplace_loss(lambda x, out: x.new_zeros(())) is not None  # no later use: fine
    with pytest.raises(RuntimeError, match="used again after the loss"):
        _after_inplace_loss(use)


def test_inplace_backward_buffer_written_after_the_loss_raises():
    """The gradient lives in the logits' memory: a write to it after the loss, or a second backward
    (the first scales it in place), raises instead of returning a wrong gradient."""
    t = labels(4, 12)
    leaf = logits(4, 12).requires_grad_()
    with fastloss.use_backend("triton"):
        x = leaf * 2.0
        loss = fastloss.cross_entropy(x, t, inplace_backward=True)
        with torch.no_grad():
            x.zero_()
        with pytest.raises(RuntimeError, match="written to after the loss"):
            loss.backward()
        x = leaf * 2.0
        loss = fastloss.cross_entropy(x, t, inplace_backward=True)
        overwritten = weakref.ref(x)
        del x
        loss.backward(retain_graph=True)
        assert overwritten() is None  # the loss, still alive, holds the logits' memory no longer
        with pytest.raises(RuntimeError, match="only once"):
            loss.backward()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("loss, inplace", [("cross_entropy", False), ("cross_entropy", True), ("focal_loss", True),
                                           ("huber_loss", False), ("sigmoid_focal_loss", False)])
def test_activation_checkpointing(loss, inplace, reentrant):
    """torch.utils.checkpoint around a model's head and its loss (the memory-saving pattern of
    large-vocabulary training) recomputes the forward, kernel and all, in the backward: the
    gradients are the reference's. Where the in-place loss's logits are the checkpointed function's
    input, the recomputation reads them holding the gradient: that raises, naming the cause."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(6, 8, generator=gen).to(DEVICE)
    w = torch.randn(13, 8, generator=gen).to(DEVICE)
    t = labels(6, 13, ignore=1) if loss in ("cross_entropy", "focal_loss") else torch.rand(6, 13, device=DEVICE)
    kwargs = {"inplace_backward": True} if inplace else {}
    if loss == "sigmoid_focal_loss":
        kwargs["reduction"] = "mean"

    def head(h, w):
        return getattr(fastloss, loss)(h @ w.t(), t, **kwargs)

    results = {}
    for name in ("reference", "triton"):
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        with fastloss.use_backend(name):
            out = head(*leaves) if name == "reference" else checkpoint(head, *leaves, use_reentrant=reentrant)
            out.backward()
        results[name] = [out.detach(), *(leaf.grad for leaf in leaves)]
    torch.testing.assert_close(results["triton"], results["reference"], rtol=1e-5, atol=1e-6)
    if inplace and not reentrant:  # (reentrant checkpoints take a leaf copy of their inputs: refused)
        x = (h.clone().requires_grad_() @ w.t())
        with fastloss.use_backend("triton"):
            out = checkpoint(lambda x: getattr(fastloss, loss)(x, t, **kwargs), x, use_reentrant=False)
            with pytest.raises(RuntimeError, match="torch.utils.checkpoint recomputing"):
                out.backward()


@pytest.mark.parametrize("loss, target", [("cross_entropy", "labels"), ("cross_entropy", "probs"),
                                          ("focal_loss", "labels"), ("huber_loss", "values"),
                                          ("sigmoid_focal_loss", "values")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(loss, target, reduction):
    # torch: mean of nothing is NaN, sum is 0, none is empty
    x = logits(0, 5)
    t = {"labels": labels(0, 5), "probs": torch.rand(0, 5, device=DEVICE), "values": torch.rand(0, 5, device=DEVICE)}[target]
    out = check(loss, [x, t], {"reduction": reduction})
    if reduction == "mean":
        assert math.isnan(out[0].item())
    elif reduction == "sum":
        assert out[0].item() == 0


def test_uint8_targets_and_float64_fallback():
    x, t = logits(6, 20), labels(6, 20)
    check("cross_entropy", [x, t.to(torch.uint8)], {})             # torch accepts Byte class indices
    # float64 is not a kernel dtype: every backend runs the reference, exactly
    with fastloss.use_backend("triton"):
        got = fastloss.cross_entropy(x.double(), t, label_smoothing=0.1)
        got_huber = fastloss.huber_loss(x.double(), x.double().flip(0))
    assert torch.equal(got, reference.cross_entropy(x.double(), t, label_smoothing=0.1))
    assert torch.equal(got_huber, reference.huber_loss(x.double(), x.double().flip(0)))


AUTOCAST_CASES = [
    ("cross_entropy", lambda z: labels(z.shape[0], z.shape[1], ignore=1), F.cross_entropy),
    ("focal_loss", lambda z: labels(z.shape[0], z.shape[1]), None),
    ("huber_loss", lambda z: torch.randn_like(z), F.huber_loss),
    ("smooth_l1_loss", lambda z: torch.randn_like(z), F.smooth_l1_loss),
    ("sigmoid_focal_loss", lambda z: torch.rand_like(z), None),
]


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss, make_target, torch_fn", AUTOCAST_CASES, ids=[c[0] for c in AUTOCAST_CASES])
def test_autocast(loss, make_target, torch_fn, dtype, reduction, backend_name, monkeypatch):
    # Under autocast torch computes these losses in fp32 and returns fp32; fastloss returns fp32 too,
    # and its kernels read the bf16 or fp16 logits as they are (no fp32 copy).
    seen = []
    import fastloss.autograd as ag  # where the launcher is called from
    real = ag.cross_entropy_fwd
    monkeypatch.setattr(ag, "cross_entropy_fwd", lambda x, *a, **k: seen.append(x.dtype) or real(x, *a, **k))
    lin = torch.nn.Linear(16, 40).to(DEVICE)
    h = torch.randn(8, 16, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=dtype):
        z = lin(h)
        target = make_target(z).to(z.dtype) if loss not in ("cross_entropy", "focal_loss") else make_target(z)
        with fastloss.use_backend(backend_name):
            got = getattr(fastloss, loss)(z, target, reduction=reduction)
        if torch_fn is not None:
            assert torch_fn(z, target, reduction=reduction).dtype == torch.float32
    assert got.dtype == torch.float32
    if torch_fn is not None:
        # the value is the fp32 loss of the bf16 values (torch's own, under CUDA autocast, carries
        # bf16 rounding: 3.78125 for 3.78085)
        float_target = target.float() if target.is_floating_point() else target
        torch.testing.assert_close(got, torch_fn(z.float(), float_target, reduction=reduction), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(got.sum(), z)
    assert g.dtype == dtype and torch.isfinite(g).all()
    if backend_name == "triton" and loss in ("cross_entropy", "focal_loss"):
        assert seen == [dtype]


# Aten ops that wait for the GPU: a scalar read (.item(), bool(), float()), or an output whose size
# depends on the values.
SYNCING_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
               "_unique", "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave"}


NO_SYNC_CASES = [
    *[("cross_entropy", "labels", options) for options in CE_OPTIONS.values()],
    ("cross_entropy", "probs", {"label_smoothing": 0.1, "weight": "w"}),
    ("focal_loss", "labels", {"weight": "w", "softcap": 3.0, "gamma": 0.5}),
    ("huber_loss", "values", {"delta": 0.5, "weight": "x"}),
    ("smooth_l1_loss", "values", {"beta": 0.0}),
    ("sigmoid_focal_loss", "values", {"alpha": -1.0, "gamma": 1.5}),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss, target, kwargs", NO_SYNC_CASES)
def test_no_host_sync(loss, target, kwargs, reduction, monkeypatch):
    """Forward and backward, with every option, read nothing back from the device (the class-index
    range check, which only runs on CPU tensors or under FASTLOSS_STRICT=1, aside)."""
    import fastloss.functional as functional
    monkeypatch.setattr(functional, "_check_class_range", lambda *a: None)
    n, v = 6, 40
    x = logits(n, v).requires_grad_()
    t = {"labels": labels(n, v, ignore=2), "probs": torch.rand(n, v, device=DEVICE).softmax(-1),
         "values": torch.rand(n, v, device=DEVICE)}[target]
    weights = {"w": (v,), "x": (n, v)}  # a class weight, an elementwise weight
    extra = {k: torch.rand(weights[val], device=DEVICE) + 0.1 if val in weights else val for k, val in kwargs.items()}
    with fastloss.use_backend("triton"), host.CountOps() as mode:
        out = getattr(fastloss, loss)(x, t, reduction=reduction, **extra)
        out.backward(_random_grad_output(out))
    assert mode.ops, "no op was seen"
    assert not set(mode.ops) & SYNCING_OPS


def test_forward_only_under_no_grad():
    x, t = logits(7, 90), labels(7, 90, ignore=1)
    with torch.no_grad(), fastloss.use_backend("triton"):
        got = fastloss.cross_entropy(x, t, label_smoothing=0.1)
    torch.testing.assert_close(got, F.cross_entropy(x, t, label_smoothing=0.1))


def test_the_kernels_write_only_the_gradients_that_are_needed(monkeypatch):
    """A gradient no input needs is not written: an evaluation (no_grad, or logits that do not require
    grad) reads the logits once and allocates no N·V buffer, and Huber writes target's gradient only
    when target requires grad, input's only when input does."""
    import fastloss.autograd as fa

    written = []

    def spy(launcher, gradients):
        def launch(*args, **kwargs):
            written.append(tuple(g(args, kwargs) is not None for g in gradients))
            return launcher(*args, **kwargs)

        return launch

    monkeypatch.setattr(fa, "cross_entropy_fwd", spy(fa.cross_entropy_fwd, [lambda a, k: a[4]]))
    monkeypatch.setattr(fa, "huber_fwd", spy(fa.huber_fwd, [lambda a, k: k["grad_input"],
                                                            lambda a, k: k["grad_target"]]))
    monkeypatch.setattr(fa, "sigmoid_focal_fwd", spy(fa.sigmoid_focal_fwd, [lambda a, k: k["grad_input"]]))
    x, t = logits(5, 40), labels(5, 40)
    a, b = logits(50), logits(50)
    def needing_grad(v):  # a fresh leaf each call: no call changes another's inputs
        return v.detach().requires_grad_()

    calls = [
        (lambda: fastloss.cross_entropy(needing_grad(x), t), (True,)),
        (lambda: fastloss.focal_loss(x, t), (False,)),
        (lambda: fastloss.huber_loss(needing_grad(a), b), (True, False)),
        (lambda: fastloss.smooth_l1_loss(a, needing_grad(b)), (False, True)),
        (lambda: fastloss.sigmoid_focal_loss(a, torch.rand_like(a)), (False,)),
    ]
    for call, expected in calls:
        for grad_mode in (True, False):
            written.clear()
            with torch.set_grad_enabled(grad_mode), fastloss.use_backend("triton"):
                call()
            assert written == [expected if grad_mode else (False,) * len(expected)]


# --------------------------------------------------------------------------------------------------
# elementwise: Huber, SmoothL1, sigmoid focal
# --------------------------------------------------------------------------------------------------

# sizes and why: 1 (one element), 37 (odd), 4096 (one fp32 block), 5003 (several fp32 blocks, odd
# tail), 8192 (one 16-bit Huber block), 24581 (several of them, odd tail)
SIZES = [1, 37, 4096, 5003, 8192, 24581]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_huber(reduction, size, dtype):
    x, y = logits(size, dtype=dtype, scale=2.0), logits(size, dtype=dtype, scale=2.0)
    # the error scale is ~3: both regimes, all-quadratic, and delta = inf (0.5 d^2, torch's limit)
    for delta in (0.1, 1.0, 50.0, math.inf):
        check("huber_loss", [x, y], {"reduction": reduction, "delta": delta}, grad_of=(0, 1))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_huber_weight_and_input_only(reduction):
    x, y, w = logits(3, 41), logits(3, 41), torch.rand(3, 41, device=DEVICE)
    check("huber_loss", [x, y], {"reduction": reduction, "weight": w}, grad_of=(0, 1))
    check("huber_loss", [x, y], {"reduction": reduction}, grad_of=(0,))
    check("huber_loss", [x, y], {"reduction": reduction}, grad_of=(1,))


def test_huber_scales_both_gradients_in_one_launch(monkeypatch):
    """The backward of a reduced Huber loss whose input and target both take a gradient scales the two
    in one launch (each launch is host time that a short step waits for), both right."""
    import fastloss.kernels.common as common

    scales = []
    launch = common.launch

    def counting(kernel, *args, **kwargs):
        if kernel is common._scale_grad_kernel:
            scales.append(kernel)
        launch(kernel, *args, **kwargs)

    monkeypatch.setattr(common, "launch", counting)
    x, y = logits(3, 41), logits(3, 41)
    check("huber_loss", [x, y], {}, grad_of=(0, 1))
    assert len(scales) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0, math.inf])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_smooth_l1(reduction, beta, dtype):
    x, y = logits(2, 501, dtype=dtype), logits(2, 501, dtype=dtype)
    check("smooth_l1_loss", [x, y], {"reduction": reduction, "beta": beta}, grad_of=(0, 1))


@pytest.mark.parametrize("loss, kwargs", [("huber_loss", {"delta": 1e300}), ("huber_loss", {"delta": 1e39}),
                                          ("smooth_l1_loss", {"beta": 1e-39}), ("smooth_l1_loss", {"beta": 1e-45})],
                         ids=str)
def test_huber_thresholds_past_fp32_as_torch(loss, kwargs):
    """delta and beta reach the kernel in fp32, as torch computes: a delta past fp32's largest is
    inf there (all quadratic), and a beta whose reciprocal is past it is L1 but for subnormal
    differences; neither gives 0 * inf (the loss was 0 or NaN, the gradient NaN at d = 0). (Huber's
    finite deltas here now take the reference path, past 2^20: see the next test.)"""
    x, y = torch.tensor([0.0, 1.0, 3.0, -2.5], device=DEVICE), torch.zeros(4, device=DEVICE)
    _assert_elementwise_as_torch(loss, x, y, kwargs)


def _assert_elementwise_as_torch(loss, x, y, kwargs):
    """fastloss's ``loss`` (triton backend) and torch's, unreduced and summed: the loss and both
    gradients within 1e-6, relatively."""
    for reduction in ("none", "sum"):
        ours = _run(getattr(fastloss, loss), [x, y], (0, 1), {"reduction": reduction, **kwargs}, torch.ones_like,
                    "triton")
        theirs = _run(getattr(F, loss), [x, y], (0, 1), {"reduction": reduction, **kwargs}, torch.ones_like)
        for got, expected in zip(ours, theirs):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("delta", [2.0 ** 21, 1e30, 1e38])
def test_huber_large_delta_small_differences_as_torch(delta, weight):
    """A large finite delta (1e30 for "no linear part"): the kernel's 0.5 d^2 / delta and d / delta,
    before the multiplication by delta, fell into fp32's subnormals and lost their digits (1e-5 gave
    a loss 4% off, 1e-20 a gradient of 0), where torch's 0.5 d^2 and d are exact. A finite delta
    past 2^20 takes the reference path."""
    x = torch.tensor([1e-20, 1e-10, 1e-5, 1e-3, 0.5, -3.0], device=DEVICE)
    y = torch.zeros(6, device=DEVICE)
    kwargs = {"delta": delta, **({"weight": torch.full((6,), 0.5, device=DEVICE)} if weight else {})}
    _assert_elementwise_as_torch("huber_loss", x, y, kwargs)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0])
def test_sigmoid_focal_targets_outside_zero_one_as_the_reference(gamma):
    """A target a rounding outside [0, 1] (1 + 1e-7 from soft-label arithmetic), or further, can make
    1 - p_t negative: the focal factor is 0 there, as in the reference, and the gradient finite (it
    was 1/q for the smallest float: 1e9 to inf)."""
    x = torch.tensor([20.0, -20.0, 0.3, -2.0, 5.0, 1.0], device=DEVICE)
    t = torch.tensor([1.0 + 2 ** -23, -1e-7, 1.5, -0.5, 2.0, 0.5], device=DEVICE)
    out = check("sigmoid_focal_loss", [x, t], {"gamma": gamma, "reduction": "none"})
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_sigmoid_focal_soft_targets_near_one_without_cancellation(gamma):
    """A soft target near 1 with a confident positive logit: the BCE term x (1 - t) + log1p(e^-x) is
    small, and computed as max(x, 0) - x t it lost x t's rounding (ulp(x), not ulp(x (1 - t))): 4.6%
    at x = 18, t = 1 - 1e-6, where torch's BCE-with-logits (and torchvision's loss) is exact in fp32.
    Compared relatively, as check's atol of 1e-6 hid it."""
    x = torch.tensor([18.0, 18.0, 10.0, 5.0, 3.0], device=DEVICE)
    t = torch.tensor([1 - 1e-6, 0.999, 0.99, 0.9, 0.95], device=DEVICE)
    ours = _run(fastloss.sigmoid_focal_loss, [x, t], (0,), {"gamma": gamma}, torch.ones_like, "triton")
    truth = _run(reference.sigmoid_focal_loss, [x.double(), t.double()], (0,), {"gamma": gamma}, torch.ones_like)
    for got, exp in zip(ours, truth):  # the loss, and with gamma > 0 the gradient, which takes the BCE term
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sigmoid_focal(reduction, size, dtype):
    x = logits(size, dtype=dtype)
    t = (torch.rand(size, device=DEVICE) < 0.3).to(dtype)
    for alpha, gamma in ((0.25, 2.0), (-1.0, 0.5), (0.6, 0.0), (0.0, 1.0)):  # alpha = 0 weights too
        check("sigmoid_focal_loss", [x, t], {"alpha": alpha, "gamma": gamma, "reduction": reduction})


@pytest.mark.parametrize("shape", [(), (3, 4, 5), "transposed"])
@pytest.mark.parametrize("loss", ["huber_loss", "smooth_l1_loss", "sigmoid_focal_loss"])
def test_elementwise_any_shape_and_layout(loss, shape):
    """0-d, 3-D and non-contiguous (a transposed view, copied once) inputs, with their gradients."""
    def make(seed):
        torch.manual_seed(seed)
        return logits(7, 5).t() if shape == "transposed" else (torch.randn(shape, device=DEVICE) * 3.0)
    x, t = make(1), make(2).sigmoid()
    kwargs = {"reduction": "none"} if loss == "sigmoid_focal_loss" else {"reduction": "mean"}
    out = check(loss, [x, t], kwargs, grad_of=(0,) if loss == "sigmoid_focal_loss" else (0, 1))
    assert out[0].shape == (x.shape if loss == "sigmoid_focal_loss" else ())
    assert out[1].shape == x.shape


def test_sigmoid_focal_soft_targets_and_saturation():
    x = logits(4, 20)
    check("sigmoid_focal_loss", [x, torch.rand(4, 20, device=DEVICE)], {"reduction": "mean"})
    sat = torch.tensor([-1e4, -60.0, 0.0, 60.0, 1e4] * 2, device=DEVICE, requires_grad=True)
    t = torch.tensor([0.0] * 5 + [1.0] * 5, device=DEVICE)
    for gamma in (0.0, 0.5, 2.0):
        with fastloss.use_backend("triton"):
            loss = fastloss.sigmoid_focal_loss(sat, t, gamma=gamma, reduction="sum")
        (g,) = torch.autograd.grad(loss, sat)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


# --------------------------------------------------------------------------------------------------
# full size, CUDA only: large shapes, N·V > 2³¹, torch.compile and CUDA graphs
# --------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="full-size kernel tests need a CUDA device")


def check_in_row_chunks(name, x, t, kwargs, chunk_rows):
    """``check`` for inputs too large for a float64 copy: the truth is the reference in fp32 (its own
    error is far below bf16's and close to 1e-6 in fp32), computed ``chunk_rows`` rows at a time with
    reduction ``sum``, so the extra memory is a few chunks."""
    leaf = x.detach().requires_grad_()
    with fastloss.use_backend("triton"):
        loss = getattr(fastloss, name)(leaf, t, reduction="sum", **kwargs)
    loss.backward()
    base_fn = F.cross_entropy if name == "cross_entropy" else getattr(reference, name)
    loss_truth = loss_base = 0.0
    for start in range(0, x.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        (l_truth, g_truth), (l_base, g_base) = (
            _run(fn, [x[rows].to(dt), t[rows]], (0,), {**kwargs, "reduction": "sum"}, torch.ones_like)
            for fn, dt in ((getattr(reference, name), torch.float32), (base_fn, x.dtype)))
        loss_truth, loss_base = loss_truth + l_truth.double(), loss_base + l_base.double()
        err, base_err = _max_err(leaf.grad[rows].float(), g_truth), _max_err(g_base.float(), g_truth)
        if x.dtype == torch.float32:
            assert err <= 1e-5 * g_truth.abs().max().item() + 1e-7, (name, start, err)
        else:
            half_ulp = torch.finfo(x.dtype).eps / 2 * g_truth.abs().max().item()
            assert err <= 1.25 * max(base_err, half_ulp) + 1e-6, (name, start, err, base_err)
    if x.dtype == torch.float32:
        assert abs(loss.double() - loss_truth) <= 1e-5 * abs(loss_truth)
    elif abs(loss_truth) > torch.finfo(x.dtype).max:
        assert torch.isinf(loss)  # the sum overflows fp16, as torch's does
    else:
        # the sum is rounded once to the logits' dtype: within one ulp of it, or torch's error
        ulp = torch.finfo(x.dtype).eps * 2.0 ** torch.floor(torch.log2(abs(loss_truth))).item()
        assert abs(loss.double() - loss_truth) <= max(1.25 * abs(loss_base - loss_truth), ulp)


# (N, V) and why: the issue's full-size shapes on CUDA (odd V = 151936 among them, and GPT-2's 50257, rows
# off 16-byte boundaries: SHIFT in the kernel); on CPU a small stand-in with V > BLOCK (and off them), so
# this helper is exercised everywhere.
LARGE = [(8192, v) for v in (32768, 128256, 151936, 262144, 50257)] if CUDA else [(24, 4099)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, v", LARGE)
def test_large_cross_entropy(n, v, dtype):
    check_in_row_chunks("cross_entropy", logits(n, v, dtype=dtype), labels(n, v, ignore=16), {},
                        chunk_rows=512 if CUDA else 8)


@pytest.mark.parametrize("n, v", LARGE[:2])
def test_large_focal(n, v):
    check_in_row_chunks("focal_loss", logits(n, v, dtype=torch.bfloat16), labels(n, v, ignore=16),
                        {"gamma": 2.0}, chunk_rows=512 if CUDA else 8)


@gpu
def test_more_than_2_31_elements():
    n, v = 16400, 131072                              # N·V = 2.15e9 > 2³¹, bf16: 4.3 GB of logits
    x, t = logits(n, v, dtype=torch.bfloat16).requires_grad_(), labels(n, v)
    loss = fastloss.cross_entropy(x, t, reduction="none")
    loss.backward(torch.ones_like(loss))
    tail = slice(n - 4, n)                              # rows past the 2³¹ boundary
    x_tail = x.detach()[tail].float().requires_grad_()
    expected = F.cross_entropy(x_tail, t[tail], reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(loss[tail].float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad[tail].float(), x_tail.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("loss, kwargs", [
    ("cross_entropy", {}), ("focal_loss", {}), ("huber_loss", {}), ("sigmoid_focal_loss", {}),
    ("smooth_l1_loss", {"beta": 0.5, "reduction": "sum"}),
    ("cross_entropy", {"weight": "w", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "reduction": "none"}),
    ("cross_entropy", {"spatial": True}), ("cross_entropy", {"spatial": True, "reduction": "none"}),
    ("cross_entropy", {"spatial": "channels_last"}),
], ids=["cross_entropy", "focal_loss", "huber_loss", "sigmoid_focal_loss", "smooth_l1_loss", "cross_entropy-options",
        "cross_entropy-spatial", "cross_entropy-spatial-none", "cross_entropy-channels_last"])
def test_torch_compile_fullgraph(loss, kwargs):
    # Runs on CPU too (the kernels under the interpreter, inside a compiled graph): no graph break
    # in argument checks, backend selection, the custom ops or the autograd.Function.
    torch._dynamo.reset()
    fn = getattr(fastloss, loss)
    n, v = (64, 1000) if CUDA else (8, 50)
    kwargs = {k: (torch.rand(v, device=DEVICE) + 0.1 if val == "w" else val) for k, val in kwargs.items()}
    spatial = kwargs.pop("spatial", False)
    if spatial:  # (N, C, H, W), classes strided in memory, or channels_last, narrow rows: the columns kernel
        x = logits(n, 19, 64, 64) if CUDA else logits(n, 19, 3, 5)
        if spatial == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        args = [x, _spatial_target(x, 3)]
    elif loss in ("cross_entropy", "focal_loss"):
        args = [logits(n, v), labels(n, v, ignore=2)]
    else:
        args = [logits(n, v), torch.rand(n, v, device=DEVICE)]
    eager = _run(fn, args, (0,), kwargs, _random_grad_output, "triton")
    compiled = _run(torch.compile(fn, fullgraph=True), args, (0,), kwargs, _random_grad_output, "triton")
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@gpu
def test_cuda_graph_capture():
    x = logits(256, 5000).requires_grad_()
    t = labels(256, 5000, ignore=8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    y = logits(1 << 20).requires_grad_()  # a reduced elementwise loss too
    with torch.cuda.stream(s):                        # warm up (compiles the kernels) off the graph
        fastloss.cross_entropy(x, t).backward()
        fastloss.huber_loss(y, torch.zeros_like(y)).backward()
    torch.cuda.current_stream().wait_stream(s)
    x.grad = y.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fastloss.cross_entropy(x, t)
        loss.backward()
        h = fastloss.huber_loss(y, torch.zeros_like(y))
        h.backward()
    # Replayed more than once, with eager launches in between: the graph owns its buffers.
    for _ in range(2):
        x.data.copy_(logits(256, 5000))
        y.data.copy_(logits(1 << 20))
        graph.replay()
        torch.cuda.synchronize()
        expected_x = x.detach().clone().requires_grad_()
        expected = F.cross_entropy(expected_x, t)
        expected.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(x.grad, expected_x.grad)
        expected_y = y.detach().clone().requires_grad_()
        F.huber_loss(expected_y, torch.zeros_like(expected_y)).backward()
        torch.testing.assert_close(h, F.huber_loss(y.detach(), torch.zeros_like(y)))
        torch.testing.assert_close(y.grad, expected_y.grad)
        torch.testing.assert_close(fastloss.cross_entropy(x.detach(), t), expected.detach())


@gpu
@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss", "huber_loss"])
def test_torch_compile_with_cuda_graphs(loss):
    """mode="reduce-overhead": torch.compile's CUDA graphs warm up and capture on a stream of their
    own, whose allocations go to a private memory pool that torch.compile checks for leaks (a
    predicted grad_output kept from there would be one). The loss is divided, as in gradient
    accumulation, so the backward scales the gradient inside the graph; each call's results are
    checked against torch's on fresh logits (the first calls warm up, the next ones replay)."""
    torch._dynamo.reset()
    fn = getattr(fastloss, loss)
    compiled = torch.compile(lambda x, t: fn(x, t) / 4, mode="reduce-overhead")
    t = logits(256, 5000) if loss == "huber_loss" else labels(256, 5000, ignore=8)
    ref_fn = {"cross_entropy": F.cross_entropy, "focal_loss": reference.focal_loss, "huber_loss": F.huber_loss}[loss]
    for _ in range(4):
        x = logits(256, 5000).requires_grad_()
        got = compiled(x, t)
        got.backward()
        got = got.detach().clone()  # the graph's output is overwritten by its next replay
        x_ref = x.detach().clone().requires_grad_()
        expected = ref_fn(x_ref, t) / 4
        expected.backward()
        torch.testing.assert_close(got, expected.detach())
        torch.testing.assert_close(x.grad, x_ref.grad)
