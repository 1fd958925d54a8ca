"""Launcher-level tests of kernels/cross_entropy.py and kernels/common.py.

``cross_entropy_fwd`` and ``scale_grad_`` are called directly (no autograd, no reductions) and compared
with an independent float64 oracle written here with torch ops and autograd; the shared math helpers
through a small kernel of this file's own. Without CUDA they run under Triton's interpreter on small
shapes.
"""

import contextlib
import inspect
import itertools
import math
import os
import threading
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fastloss.kernels.cross_entropy as ce  # noqa: E402
from fastloss.kernels.common import (  # noqa: E402
    atanh_log,
    cast_to,
    cdiv,
    expm1,
    interpreting,
    log1p,
    next_power_of_2,
    scale_grad_,
    softcap,
)
from fastloss.kernels.cross_entropy import (  # noqa: E402
    MAX_SEGMENTS,
    LaunchConfig,
    ROWS_VALUES,
    _default_config,
    cross_entropy_fwd,
    _max_segments,
    launch_config,
    max_segments,
)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter evaluates both sides of every tl.where in numpy, which warns about log(0), 0 * inf...
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
# Relative precision of one ulp (2^-(mantissa bits)) per dtype: the kernel computes in fp32 and
# rounds once, so a bf16/fp16 gradient must be within one ulp of the float64 truth.
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

# V: 1 (degenerate), 7 (tiny, unaligned), 1000 (one chunk, unaligned), 4099 (> MAX_ROW_BLOCK = 2048: three
# chunks and a ragged tail)
SIZES = [1, 7, 1000, 4099]


def oracle(logits, target, weight=None, scales=(1.0, 1.0), *, ignore_index=-100, eps=0.0, z=0.0,
           softcap=None, gamma=None):
    """Per-row loss and d(loss_row)/d(logits) in float64, straight from the definitions, by autograd."""
    raw = logits.detach().double().requires_grad_(True)
    x = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    n, v = x.shape
    w = torch.ones(v, dtype=torch.float64, device=x.device) if weight is None else weight.double()
    logp = torch.log_softmax(x, dim=-1)
    lse = torch.logsumexp(x, dim=-1)
    ce_scale, z_scale = scales
    if target.is_floating_point():
        t = (1 - eps) * target.double() + eps / v
        ce = -(w * t * logp).sum(-1)
        counted = torch.ones(n, dtype=torch.bool, device=x.device)
    else:
        counted = target != ignore_index
        y = torch.where(counted, target, 0)
        logp_y = logp.gather(1, y[:, None]).squeeze(1)
        if gamma is None:
            ce = (1 - eps) * w[y] * -logp_y
            if eps:  # (eps = 0 must not turn the infinite sum over -inf logits into 0 * inf)
                ce = ce + eps / v * -(w * logp).sum(-1)
        else:
            ce = -w[y] * (-torch.expm1(logp_y)) ** gamma * logp_y
    loss = ce_scale * ce + z_scale * z * lse**2
    loss = torch.where(counted, loss, 0.0)
    (grad,) = torch.autograd.grad(loss.sum(), raw)
    return loss.detach(), grad


def run(logits, target, weight=None, scales=(1.0, 1.0), *, write_grad=True, **opts):
    """The launcher with the row multipliers ``scales`` passed as the divisors it takes."""
    grad = torch.empty_like(logits) if write_grad else None
    divisors = torch.tensor([1.0 / s for s in scales], dtype=torch.float32, device=logits.device)
    loss = cross_entropy_fwd(logits, target, weight, divisors, grad, **opts)
    return loss, grad


def oracle_opts(opts):
    o = dict(opts)
    o.pop("config", None)
    if "label_smoothing" in o:
        o["eps"] = o.pop("label_smoothing")
    if "z_loss" in o:
        o["z"] = o.pop("z_loss")
    return o


def check(logits, target, weight=None, scales=(1.0, 1.0), **opts):
    """Kernel vs oracle: loss within 1e-5 relative (fp32 accumulation); gradient within one ulp of the
    logits dtype (fp32: a few ulps)."""
    loss, grad = run(logits, target, weight, scales, **opts)
    assert loss.shape == (logits.shape[0],)
    return assert_close_to_oracle(loss, grad, logits, target, weight, scales, **opts)


def assert_close_to_oracle(loss, grad, logits, target, weight=None, scales=(1.0, 1.0), **opts):
    """``check``'s assertions, for a loss and gradient of the (N, V) ``logits`` computed already."""
    ref_loss, ref_grad = oracle(logits, target, weight, scales, **oracle_opts(opts))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert grad.dtype == logits.dtype
    ulp = ULP[logits.dtype]
    # + 1e-7 absolute: fp32 cannot resolve what lies below its epsilon relative to the row's O(1)
    # terms (for example 1 - p_y ~ 1e-16 of a saturated focal row)
    tol = (ulp if logits.dtype != torch.float32 else 20 * ulp) * ref_grad.abs() + 1e-7
    err = (grad.double() - ref_grad).abs()
    assert bool((err <= tol).all()), f"grad error {(err - tol).max().item():.3g} over tolerance"
    return loss, grad


WAIT_S = 120  # concurrent_programs(): the longest a launch may take (the longest takes ~5 s)


@contextlib.contextmanager
def concurrent_programs():
    """Runs a launch's programs at once, one thread each, as a GPU does, so that the split launch
    (whose programs wait for each other) runs under Triton's interpreter, which otherwise runs them
    one after another. On CUDA it does nothing.

    It stands in for the loop over the grid of the interpreter's ``GridExecutor.__call__``: the
    program id becomes per thread, and every atomic yields the GIL so that a program spinning on
    one lets the others run. (The interpreter's atomics are real ones on host memory, and its
    loads read memory afresh.) The interpreter's first call of a device function adds names to the
    module's globals while another call may be reading them, so those two steps take a lock. A
    program that fails, or a launch still waiting after WAIT_S seconds, ends the launch's waits with
    an error instead of a hang. It depends on interpreter internals, the same in Triton 3.2 to 3.9
    (but for the pre-run hooks and the restored patch, which came in 3.6).
    """
    if DEV.type == "cuda":
        yield
        return
    from triton.runtime import interpreter as interp

    needed = ("GridExecutor", "InterpretedFunction", "interpreter_builder", "_patch_lang", "_implicit_cvt")
    if not all(hasattr(interp, name) for name in needed):
        pytest.skip("this Triton's interpreter is not the one concurrent_programs() knows")
    builder = type(interp.interpreter_builder)
    local = threading.local()
    launch = {"failed": threading.Event(), "deadline": 0.0}

    def call(self, *args_dev, **kwargs):
        spec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in getattr(self, "pre_run_hooks", ()):  # (none before Triton 3.6)
            hook(*args_hst, **kwargs_hst)
        scope = interp._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {k: v if k in self.constexprs else interp._implicit_cvt(v) for k, v in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            interp.interpreter_builder.set_grid_dim(*grid)
            errors = []
            launch["failed"].clear()
            launch["deadline"] = time.monotonic() + WAIT_S

            def program(idx):
                try:
                    interp.interpreter_builder.set_grid_idx(*idx)
                    self.fn(**args)
                except BaseException as err:  # noqa: BLE001 - re-raised below, in the caller's thread
                    errors.append(err)
                    launch["failed"].set()

            threads = [threading.Thread(target=program, args=(idx,)) for idx in itertools.product(*map(range, grid))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        finally:
            if scope is not None:  # (before Triton 3.6 the patch stays)
                scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    def atomic_rmw(self, *args, _rmw=builder.create_atomic_rmw, **kwargs):
        if launch["failed"].is_set():
            raise RuntimeError("another program of this launch failed")
        if time.monotonic() > launch["deadline"]:
            raise TimeoutError(f"a program of this launch was still waiting after {WAIT_S} s")
        out = _rmw(self, *args, **kwargs)
        time.sleep(0)  # let the others run
        return out

    lock = threading.RLock()

    def locked(fn):
        def run_locked(*args, **kwargs):
            with lock:
                return fn(*args, **kwargs)
        return run_locked

    saved = (interp.GridExecutor.__call__, builder.create_atomic_rmw, interp._patch_lang,
             interp.InterpretedFunction.rewrite)
    builder.grid_idx = property(lambda self: local.idx, lambda self, idx: setattr(local, "idx", idx))
    (interp.GridExecutor.__call__, builder.create_atomic_rmw, interp._patch_lang,
     interp.InterpretedFunction.rewrite) = call, atomic_rmw, locked(saved[2]), locked(saved[3])
    try:
        yield
    finally:
        (interp.GridExecutor.__call__, builder.create_atomic_rmw, interp._patch_lang,
         interp.InterpretedFunction.rewrite) = saved
        del builder.grid_idx


def make(n, v, dtype, *, ignore=0, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype).to(DEV)
    target = torch.randint(0, v, (n,), generator=g)
    if ignore:
        target[:ignore] = -100
    return logits, target.to(DEV)


# ------------------------------------------------------------------------------------------------
# Class-index cross-entropy
# ------------------------------------------------------------------------------------------------

OPTIONS = {
    "plain": {},
    "weight+ignore": dict(weight=True, ignore=2),
    "smooth+weight": dict(weight=True, label_smoothing=0.1, ignore=1),
    "zloss": dict(z_loss=1e-3, scales=(0.5, 0.25)),
    "softcap": dict(softcap=5.0),
    "all": dict(weight=True, ignore=1, label_smoothing=0.2, z_loss=1e-2, softcap=4.0, scales=(0.3, 0.7)),
}


@pytest.mark.parametrize("v", SIZES)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_class_index_fp32(v, name):
    opts = dict(OPTIONS[name])
    logits, target = make(6, v, torch.float32, ignore=opts.pop("ignore", 0))
    weight = torch.rand(v, device=DEV) + 0.5 if opts.pop("weight", False) else None
    check(logits, target, weight, opts.pop("scales", (1.0, 1.0)), **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", [*OPTIONS, "probabilities", "focal"])
def test_positions_with_strided_classes(name, dtype):
    """3-D logits (N, C, D) whose classes are strided in memory (the columns kernel): each position's
    loss and gradient as the oracle gives them for its row of classes; the gradient written with
    strides of its own (here a transposed buffer), the loss one a position, (N, D)."""
    opts = dict(OPTIONS.get(name, {}))
    n, v, d = 3, 37, 5
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(n, v, d, generator=g) * 3).to(dtype).to(DEV)
    target = torch.randint(0, v, (n, d), generator=g).to(DEV)
    target.view(-1)[:opts.pop("ignore", 0)] = -100
    rows_target = target.reshape(-1)
    if name == "probabilities":  # in a layout of their own: (N, D, C) memory
        rows_target = torch.rand(n * d, v, generator=g).softmax(-1).to(DEV)
        target = rows_target.view(n, d, v).transpose(1, 2)
    elif name == "focal":
        opts["gamma"] = 2.0
    weight = torch.rand(v, device=DEV) + 0.5 if opts.pop("weight", False) else None
    scales = opts.pop("scales", (1.0, 1.0))
    grad = torch.empty(n, d, v, dtype=dtype, device=DEV).transpose(1, 2)
    divisors = torch.tensor([1.0 / s for s in scales], dtype=torch.float32, device=DEV)
    loss = cross_entropy_fwd(logits, target, weight, divisors, grad, **opts)
    assert loss.shape == (n, d)
    rows = logits.transpose(1, 2).reshape(-1, v)
    assert_close_to_oracle(loss.reshape(-1), grad.transpose(1, 2).reshape(-1, v), rows, rows_target, weight, scales,
                           **opts)


def test_positions_launcher_refuses_what_it_cannot_read():
    x = torch.randn(2, 5, 3, device=DEV)
    t = torch.zeros(2, 3, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match=r"contiguous \(2, 3\)"):
        cross_entropy_fwd(x, torch.zeros(3, 2, dtype=torch.long, device=DEV).t(), None, None, None)
    with pytest.raises(ValueError, match="logits' shape"):
        cross_entropy_fwd(x, t, None, None, torch.empty(2, 3, 5, device=DEV))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        cross_entropy_fwd(x[..., None], t, None, None, None)
    with pytest.raises(ValueError, match="stride"):
        cross_entropy_fwd(x[:, :, 0].t().contiguous().t(), t[:, 0], None, None, None)


@pytest.mark.parametrize("config", [LaunchConfig(block=256, num_warps=1, rows=3),  # no power of two
                                    LaunchConfig(block=128, num_warps=1, rows=4),  # rows in two chunks
                                    LaunchConfig(block=256, num_warps=1, rows=4, segments=2)],  # split
                         ids=["rows3", "chunked", "split"])
def test_several_rows_a_program_only_where_the_kernel_takes_them(config):
    logits, target = make(5, 200, torch.float32)
    with pytest.raises(ValueError, match="rows must be"):
        cross_entropy_fwd(logits, target, None, None, torch.empty_like(logits), config=config)


@pytest.mark.parametrize("v, rows", [(29, 32), (50, 16), (150, 4), (256, 4), (257, 1), (2048, 1)])
def test_short_rows_run_several_a_program(v, rows):
    """The default launch gives rows of up to 256 columns a tile of ROWS_VALUES (1024) values in one
    warp, the rows' own work one row a lane; longer rows one a program."""
    cfg = _default_config(v, 2, 0)
    assert cfg.rows == rows
    if rows > 1:
        assert cfg.num_warps == 1 and cfg.block * rows == ROWS_VALUES


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [7, 4099])
@pytest.mark.parametrize("name", ["plain", "all"])
def test_class_index_half(dtype, v, name):
    opts = dict(OPTIONS[name])
    logits, target = make(5, v, dtype, ignore=opts.pop("ignore", 0))
    weight = torch.rand(v, device=DEV) + 0.5 if opts.pop("weight", False) else None
    check(logits, target, weight, opts.pop("scales", (1.0, 1.0)), **opts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradient_is_correctly_rounded(dtype):
    """fp32 math, one rounding at the store: (nearly) every element is the float64 truth rounded."""
    logits, target = make(8, 300, dtype)
    _, grad = run(logits, target, scales=(0.125, 1.0))
    _, ref_grad = oracle(logits, target, scales=(0.125, 1.0))
    # fp32 errors (a fast exp on the GPU) can tip an element sitting right at a rounding boundary
    assert (grad != ref_grad.to(dtype)).sum().item() <= grad.numel() // 500


def test_all_rows_ignored():
    logits, target = make(4, 33, torch.float32)
    target[:] = -100
    loss, grad = run(logits, target)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))
    # reduction='mean' over zero counted rows divides by 0: 0 * inf reproduces torch's NaN
    loss, grad = run(logits, target, scales=(float("inf"), float("inf")))
    assert loss.isnan().all() and torch.equal(grad, torch.zeros_like(grad))


def test_ignore_index_inside_class_range():
    logits, target = make(6, 10, torch.float32)
    target[::2] = 3
    loss, grad = check(logits, target, ignore_index=3)
    assert torch.equal(loss[::2], torch.zeros(3, device=DEV)) and not grad[::2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saturated_and_masked_logits(dtype):
    """Confident rows keep their target gradient p_y - 1 (computed in fp32 before rounding), and
    -inf logits (a masked vocabulary) are harmless."""
    v = 40
    logits = torch.zeros(4, v)
    target = torch.tensor([0, 1, 2, 3])
    logits[0, 0] = 12.0  # 1 - p_y ~ 2.4e-4: in bf16, 1 - round(p_y) would be 0 or 2^-8
    logits[1, 1] = 30.0  # saturated even in fp32
    logits[2, 10:] = float("-inf")  # masked vocabulary
    logits[3, 3] = -30.0  # p_y ~ 0
    logits = logits.to(dtype).to(DEV)
    target = target.to(DEV)
    loss, grad = check(logits, target)
    assert grad[0, 0] < 0 and torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert not grad[2, 10:].any()
    check(logits, target, softcap=20.0)
    check(logits, target, label_smoothing=0.1)  # smoothing over -inf classes: an infinite loss, as torch
    check(logits, target, z_loss=1e-3)


@pytest.mark.parametrize("v", [50, 4099])
def test_nan_row(v):
    logits, target = make(4, v, torch.float32)
    logits[1, 7] = float("nan")  # first chunk
    logits[2, v - 2] = float("nan")  # last chunk (the same one when v <= BLOCK)
    loss, grad = run(logits, target)
    assert loss[1:3].isnan().all() and not loss[[0, 3]].isnan().any()
    ref_loss, _ = oracle(logits[[0, 3]], target[[0, 3]])
    torch.testing.assert_close(loss[[0, 3]].double(), ref_loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("v", [7, 4099])
def test_ties_and_late_max(v):
    """Several lanes at the row max (uniform rows, a max repeated in two chunks), and a max that
    first appears in the ragged last chunk."""
    logits = torch.zeros(4, v)
    logits[1, :] = -2.0
    logits[1, [0, v - 1]] = 3.0
    logits[2] = torch.linspace(-5, 5, v)
    logits[3, v - 1] = 9.0
    target = torch.tensor([0, v - 1, v // 2, 1])
    loss, _ = check(logits.to(DEV), target.to(DEV))
    assert abs(loss[0].item() - torch.tensor(float(v)).log().item()) < 1e-5 * max(1.0, loss[0].item())


@pytest.mark.parametrize("v", [1000, 4099])
def test_confident_rows_keep_relative_precision(v):
    """lse - x_y ~ 1e-4 .. 1e-7 keeps ~1e-5 relative precision in fp32 (not 1 - p_y's rounding)."""
    logits, target = make(4, v, torch.float32, scale=1.0)
    for i, margin in enumerate((12.0, 15.0, 18.0, 21.0)):
        logits[i, target[i]] = margin + logits[i].max()
    loss, grad = run(logits, target)
    ref_loss, ref_grad = oracle(logits, target)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=0)
    rows = torch.arange(4, device=DEV)
    torch.testing.assert_close(grad[rows, target].double(), ref_grad[rows, target], rtol=2e-5, atol=0)
    for gamma in (0.5, 2.0):
        loss, grad = run(logits, target, gamma=gamma)
        ref_loss, ref_grad = oracle(logits, target, gamma=gamma)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("v", [1000, 4099])
def test_confident_rows_keep_relative_precision_under_softcap(v, dtype):
    """The same with a cap of 30 (the target's capped logit 16 to 25: lse - x_y ~ 1e-3 .. 1e-7). The
    capped x_y must be the bits its lane holds in the sweep: an ulp of it (2e-6 near 30) would swamp
    these losses. fp32 takes it from the lanes; 16-bit logits (no series in the tanh) cap it on
    their own, with the product by the cap kept out of any multiply-add (common.mul_rn)."""
    logits, target = make(4, v, dtype, scale=1.0)
    for i, raw in enumerate((18.0, 24.0, 30.0, 36.0)):
        logits[i, target[i]] = raw
    loss, grad = run(logits, target, softcap=30.0)
    ref_loss, ref_grad = oracle(logits, target, softcap=30.0)
    assert ref_loss.max() < 1e-3 and ref_loss.min() < 1e-6
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=0)
    rows = torch.arange(4, device=DEV)
    torch.testing.assert_close(grad[rows, target].double(), ref_grad[rows, target],
                               rtol=max(2e-5, ULP[dtype]), atol=0)


def test_out_of_range_target_is_nan():
    logits, target = make(5, 20, torch.float32)
    target[1], target[3] = 20, -5
    loss, grad = run(logits, target)
    bad = torch.tensor([False, True, False, True, False], device=DEV)
    assert loss[bad].isnan().all() and grad[bad].isnan().all()
    assert torch.isfinite(loss[~bad]).all() and torch.isfinite(grad[~bad]).all()
    loss_ok, grad_ok = run(logits[~bad], target[~bad])
    assert torch.equal(loss[~bad], loss_ok) and torch.equal(grad[~bad], grad_ok)


def test_mean_of_out_of_range_targets_reads_only_the_weights():
    """With class weights, the mean's prologue takes an out-of-range target's w_y from the nearest
    class (that row's loss is NaN anyway) and reads nothing outside the weights: NaN on both sides
    of them would make every row's scale NaN."""
    v = 9
    logits, target = make(6, v, torch.float32)
    target[1], target[4] = v, -1
    buf = torch.full((v + 2,), float("nan"), device=DEV)
    weight = buf[1:v + 1]
    weight.copy_(torch.rand(v, device=DEV) + 0.5)
    bad = torch.tensor([False, True, False, False, True, False], device=DEV)
    grad = torch.empty_like(logits)
    loss = cross_entropy_fwd(logits, target, weight, None, grad, mean=True)
    ref_loss, ref_grad = run(logits, target, weight, (1.0 / weight[target.clamp(0, v - 1)].sum().item(),))
    assert loss[bad].isnan().all() and grad[bad].isnan().all()
    torch.testing.assert_close(loss[~bad], ref_loss[~bad], rtol=1e-6, atol=0)
    torch.testing.assert_close(grad[~bad], ref_grad[~bad], rtol=1e-6, atol=0)


def test_matches_torch_cross_entropy():
    """An anchor against torch itself (no oracle): weighted, smoothed, with ignored rows."""
    logits, target = make(8, 1000, torch.float32, ignore=2)
    weight = torch.rand(1000, device=DEV) + 0.5
    loss, grad = run(logits, target, weight, label_smoothing=0.1)
    x = logits.detach().double().requires_grad_(True)
    ref = F.cross_entropy(x, target, weight=weight.double(), label_smoothing=0.1, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Probability targets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [7, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extras", [False, True])
def test_probability_targets(v, dtype, extras):
    logits, _ = make(4, v, dtype)
    target = torch.softmax(torch.randn(4, v, device=DEV) * 2, dim=-1).to(dtype)
    if extras:  # smoothing, class weights, z-loss and softcap together
        weight = torch.rand(v, device=DEV) + 0.5
        check(logits, target, weight, (0.5, 0.25), label_smoothing=0.15, z_loss=1e-2, softcap=6.0)
    else:
        check(logits, target)


def test_probability_targets_large_logits():
    """sum_c w_c t_c (lse - x_c) is kept relative to the running max: no cancellation at |x| ~ 1e3."""
    logits, _ = make(3, 300, torch.float32, scale=1.0)
    logits = logits + 1000.0
    target = torch.softmax(torch.randn(3, 300, device=DEV), dim=-1)
    check(logits, target)
    check(logits, target, label_smoothing=0.3)
    _, onehot = make(3, 300, torch.float32)
    check(logits, onehot, label_smoothing=0.3)  # class-index smoothing: the same sums


# ------------------------------------------------------------------------------------------------
# Softmax focal loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("v", [7, 1000])
def test_focal(gamma, v):
    logits, target = make(6, v, torch.float32, ignore=1)
    weight = torch.rand(v, device=DEV) + 0.5
    check(logits, target, weight, (0.5, 1.0), gamma=gamma)
    check(logits.bfloat16(), target, gamma=gamma, softcap=8.0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_saturated(gamma):
    """p_y -> 1 (1 - p_y below fp32's epsilon), p_y -> 0, and p_y == 1 exactly: finite, and equal to
    the float64 oracle (whose saturation is not yet exact for these margins)."""
    v = 30
    logits = torch.zeros(3, v)
    target = torch.tensor([0, 1, 2])
    logits[0, 0] = 25.0  # 1 - p_y ~ 4e-10: 1.0 in fp32, not in float64
    logits[1, 1] = -40.0  # p_y ~ 1e-19
    logits[2, 2] = 200.0  # p_y == 1 even in float64 would be 1 - 1e-86: exactly 1 in fp32
    logits, target = logits.to(DEV), target.to(DEV)
    loss, grad = run(logits, target, gamma=gamma)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    check(logits[:2], target[:2], gamma=gamma)
    if gamma > 0:
        assert loss[2] == 0 and not grad[2].any()


def test_focal_gamma0_equals_cross_entropy_bitwise():
    for v in (7, 4099):
        logits, target = make(5, v, torch.bfloat16, ignore=1)
        weight = torch.rand(v, device=DEV) + 0.5
        for kw in ({}, {"softcap": 3.0}):
            a = run(logits, target, weight, (0.3, 1.0), **kw)
            b = run(logits, target, weight, (0.3, 1.0), gamma=0.0, **kw)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------------
# Memory layout, in-place, determinism, forward-only, empty
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [7, 4099])
def test_inplace_and_strided(v):
    logits, target = make(4, v, torch.bfloat16, ignore=1)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=10.0)
    loss, grad = run(logits, target, **opts)
    # rows of a wider buffer (row stride v + 5), gradient written over the logits themselves
    buf = torch.full((4, v + 5), 7.0, dtype=torch.bfloat16, device=DEV)
    buf[:, :v] = logits
    view = buf[:, :v]
    sc = torch.ones(2, device=DEV)
    loss2 = cross_entropy_fwd(view, target, None, sc, view, **opts)
    assert torch.equal(loss, loss2) and torch.equal(view, grad)
    assert (buf[:, v:] == 7.0).all()  # nothing written past the row
    # a strided input with a fresh contiguous gradient
    buf[:, :v] = logits
    grad3 = torch.empty_like(logits)
    loss3 = cross_entropy_fwd(view, target, None, sc, grad3, **opts)
    assert torch.equal(loss, loss3) and torch.equal(grad3, grad)


# Launch configurations besides the default, on V = 4099 and 20000. ``segments`` > 0 runs the split
# protocol (tickets, published statistics, the wait, the combine), several segments a row with
# concurrent_programs(). Under the interpreter, where every program costs time, three of them on
# V = 4099: segments swept in chunks (3 of 1024 for 2 segments), an empty trailing segment (4099 =
# 2048 + 2048 + 3 + 0 with 4 segments of 2 chunks of 1024), and segments in registers (4096 columns);
# and V = 20000 only where 4099 columns fit in one chunk (block 8192, then swept in 3 chunks): 4099
# already sweeps the 1024-column launches in 5 chunks, the last one partial, and 20000 took them a
# minute and a half more.
CONFIGS = [LaunchConfig(block=1024, num_warps=4), LaunchConfig(block=1024, num_warps=4, reverse=False),
           LaunchConfig(block=1024, num_warps=4, segments=1), LaunchConfig(block=8192, num_warps=8, segments=1),
           LaunchConfig(block=1024, num_warps=4, segments=1, reverse=False),
           LaunchConfig(block=1024, num_warps=4, stages=3, stages2=3)]
INTERPRETED_SPLITS = [LaunchConfig(block=1024, num_warps=4, segments=2),
                      LaunchConfig(block=1024, num_warps=4, segments=4),
                      LaunchConfig(block=4096, num_warps=8, segments=2)]
SPLIT_CONFIGS = [*INTERPRETED_SPLITS, LaunchConfig(block=1024, num_warps=4, segments=8),
                 LaunchConfig(block=512, num_warps=2, segments=16),
                 LaunchConfig(block=2048, num_warps=4, segments=4, reverse=False),
                 LaunchConfig(block=2048, num_warps=4, segments=4),
                 LaunchConfig(block=2048, num_warps=4, segments=4, stages=3, stages2=2),
                 LaunchConfig(block=2048, num_warps=4, segments=4, sleep_ns=0)]
LAUNCHES = [(c, v) for c in CONFIGS + SPLIT_CONFIGS for v in (4099, 20000)
            if DEV.type == "cuda" or (c.segments <= 1 and (v == 4099 or c.block > 4099))
            or (c in INTERPRETED_SPLITS and v == 4099)]
# several short rows a program (ROWS), the checks' 5 rows in one program or in two, the second of one
# row and three past the last: rows of the default's tiles (4 of 256, 16 of 64), a row a lane's worth
# of columns (32), and a tile of 2 rows
LAUNCHES += [(LaunchConfig(block=256, num_warps=1, rows=4), 150), (LaunchConfig(block=64, num_warps=1, rows=16), 50),
             (LaunchConfig(block=32, num_warps=1, rows=8), 32), (LaunchConfig(block=128, num_warps=2, rows=2), 100)]


def _launch_id(value):
    if isinstance(value, LaunchConfig):
        return (f"b{value.block}w{value.num_warps}s{value.segments}r{int(value.reverse)}p{value.stages}{value.stages2}"
                f"z{value.sleep_ns}" + (f"R{value.rows}" if value.rows > 1 else ""))
    return str(value)


@pytest.mark.parametrize("config, v", LAUNCHES, ids=_launch_id)
@pytest.mark.parametrize("kind", ["plain", "all", "prob", "focal"])
def test_launch_configs(config, v, kind):
    with concurrent_programs() if config.segments > 1 else contextlib.nullcontext():
        _launch_config_checks(config, v, kind)


def _launch_config_checks(config, v, kind):
    logits, target = make(5, v, torch.float32, ignore=0 if kind == "prob" else 1)
    weight = torch.rand(v, device=DEV) + 0.5
    opts = dict(config=config)
    if kind == "all":
        opts.update(label_smoothing=0.2, z_loss=1e-2, softcap=4.0)
    elif kind == "prob":
        target = torch.softmax(torch.randn(5, v, device=DEV) * 2, dim=-1)
        opts.update(label_smoothing=0.15, softcap=6.0)
    elif kind == "focal":
        opts.update(gamma=2.0)
    if kind == "plain":
        weight = None
    loss, grad = check(logits, target, weight, (0.5, 0.25), **opts)
    # in place over a padded buffer: the same bits, nothing written past the rows. (The padding
    # keeps the row stride a multiple of 16 when V is, as for the fresh gradient: Triton compiles
    # aligned and unaligned rows separately, and their fused multiply-adds may round differently.)
    buf = torch.full((5, v + 16), 7.0, device=DEV)
    buf[:, :v] = logits
    view = buf[:, :v]
    loss2 = cross_entropy_fwd(view, target, weight, torch.tensor([2.0, 4.0], device=DEV), view, **opts)
    assert torch.equal(loss, loss2) and torch.equal(view, grad)
    assert (buf[:, v:] == 7.0).all()
    # reduced: the same gradient (up to the roundings of another compiled variant, whose fused
    # multiply-adds may differ on a GPU), and the rows' sum
    grad3 = torch.empty_like(logits)
    total = cross_entropy_fwd(logits, target, weight, torch.tensor([2.0, 4.0], device=DEV), grad3, reduce=True,
                              **opts)
    assert total.shape == ()
    torch.testing.assert_close(grad3, grad, rtol=20 * ULP[torch.float32], atol=1e-7)  # as check()
    torch.testing.assert_close(total, loss.sum(), rtol=1e-6, atol=0)


# Rows that do not start and end on 16-byte boundaries, swept in chunks or split (SHIFT in the kernel): 9
# rows of an odd V start at every offset from a boundary (row r starts r V values in), so each shift is
# there, as are an ignored row (row 0: its gradient, edges included, is 0), a masked class in the first
# column (row 1: in the head's edge, row 1's shift not being 0), and targets in the first and the last
# column (rows 2, 3: edge lanes). A split launch of one segment: V = 1021 in one chunk (its vectors
# end inside it), 1023 in two (the tail's vector past the first where the row is shifted by 2 or
# more); V = 3071 in chunks swept by hand, pipelined, and split in two segments (the head and the
# tail in different programs); and V = 3, a row of edges only.
OFF_BOUNDARY_LAUNCHES = [(LaunchConfig(block=32, num_warps=1, segments=1), 3),
                         (LaunchConfig(block=1024, num_warps=4, segments=1), 1021),
                         (LaunchConfig(block=1024, num_warps=4, segments=1), 1023),
                         (LaunchConfig(block=1024, num_warps=4), 3071),
                         (LaunchConfig(block=1024, num_warps=4, stages=3, stages2=3, reverse=False), 3071),
                         (LaunchConfig(block=1024, num_warps=4, segments=2), 3071)]


@pytest.mark.parametrize("config, v", OFF_BOUNDARY_LAUNCHES, ids=_launch_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "all"])  # (focal's rows differ in their own work only)
def test_rows_off_16_byte_boundaries(config, v, dtype, kind):
    logits, target = make(9, v, dtype, ignore=1)
    logits[1, 0] = float("-inf")
    target[2], target[3] = 0, v - 1
    weight = torch.rand(v, device=DEV) + 0.5 if kind == "all" else None
    opts = dict(config=config)
    if kind == "all":  # (fp32's softcap takes the target's logit from the lanes: CAPTURE_XY)
        opts.update(label_smoothing=0.2, z_loss=1e-2, softcap=4.0)
    assert ce.row_shift(logits, logits) == 16 // logits.element_size()
    with concurrent_programs() if config.segments > 1 else contextlib.nullcontext():
        loss, grad = check(logits, target, weight, (0.5, 0.25), **opts)
        # in place over a padded buffer (its row stride v + 16: the same shifts), the same bits, and
        # nothing written before or after a row
        buf = torch.full((9, v + 16), 7.0, device=DEV, dtype=dtype)
        view = buf[:, :v]
        view.copy_(logits)
        loss2 = cross_entropy_fwd(view, target, weight, torch.tensor([2.0, 4.0], device=DEV), view, **opts)
    assert torch.equal(loss, loss2) and torch.equal(view, grad)
    assert (buf[:, v:] == 7.0).all()
    assert (grad[0] == 0).all()


def test_row_shift_only_where_rows_can_be_shifted_to_whole_vectors():
    """SHIFT is given to rows whose V or row stride is not a multiple of a 16-byte vector's values,
    where the logits and the gradient start on a 16-byte boundary and their row strides agree modulo
    a vector: else the sweeps could not start every row on one."""
    x = torch.randn(4, 1001, device=DEV)  # fp32: 4 values a vector
    assert ce.row_shift(x, None) == ce.row_shift(x, torch.empty_like(x)) == ce.row_shift(x, x) == 4
    assert ce.row_shift(x.bfloat16(), None) == 8
    assert ce.row_shift(torch.randn(4, 1000, device=DEV), None) == 0  # every row on boundaries already
    wide = torch.randn(4, 1004, device=DEV)
    assert ce.row_shift(wide[:, :1001], None) == 4  # rows start on boundaries, but do not end on them
    assert ce.row_shift(wide[:, 1:1002], None) == 0  # the first row starts off a boundary
    assert ce.row_shift(x, torch.empty(4, 1002, device=DEV)[:, :1001]) == 0  # strides 1001 and 1002
    assert ce.row_shift(x, torch.empty(4, 1005, device=DEV)[:, :1001]) == 4  # 1001 and 1005: the same shifts
    assert ce.row_shift(x, torch.empty(4, 1002, device=DEV)[:, 1:]) == 0  # the gradient off a boundary


@pytest.mark.parametrize("config", [CONFIGS[0], INTERPRETED_SPLITS[0]], ids=_launch_id)
@pytest.mark.parametrize("cap", [30.0, 100.0])  # the tanh without its series, and with it (FAST_TANH_MAX_CAP)
def test_16_bit_softcap_in_a_row_and_split(config, cap):
    """bf16 logits under a cap, a row in one program or split across two: without the tanh's series
    every program caps the target's logit on its own; with it, the lane that holds it shares it
    through the split's statistics. A confident row among them; in place, the same bits."""
    logits, target = make(5, 4099, torch.bfloat16, ignore=1)
    logits[2, target[2]] = 28.0  # its loss 3e-5 (cap 30) and 2e-7 (cap 100); an ulp of its capped logit, 2e-6
    with concurrent_programs() if config.segments > 1 else contextlib.nullcontext():
        loss, grad = check(logits, target, None, (0.5, 0.25), softcap=cap, config=config)
        view = logits.clone()
        loss2 = cross_entropy_fwd(view, target, None, torch.tensor([2.0, 4.0], device=DEV), view, softcap=cap,
                                  config=config)
    assert torch.equal(loss, loss2) and torch.equal(view, grad)
    ref_loss = oracle(logits, target, None, (0.5, 0.25), softcap=cap)[0]
    torch.testing.assert_close(loss[2].double(), ref_loss[2], rtol=1e-4, atol=0)


@pytest.mark.parametrize("config", [LaunchConfig(block=1024, num_warps=4), INTERPRETED_SPLITS[0]], ids=_launch_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["all", "prob", "focal"])
def test_a_prediction_multiplies_the_gradient_exactly(config, dtype, kind):
    """Given a prediction p of grad_output (a power of two), the kernel writes p times the gradient
    it writes without one, bit for bit, and the same loss, and copies p for the backward."""
    logits, target = make(5, 4099, dtype, ignore=0 if kind == "prob" else 1)
    opts = dict(config=config, reduce=True, label_smoothing=0.1)
    if kind == "all":
        opts.update(z_loss=1e-2, softcap=4.0)
    elif kind == "prob":
        target = torch.softmax(torch.randn(5, 4099, device=DEV) * 2, dim=-1)
    else:
        opts = dict(config=config, reduce=True, gamma=2.0)
    weight = torch.rand(4099, device=DEV) + 0.5
    with concurrent_programs() if config.segments > 1 else contextlib.nullcontext():
        grad = torch.empty_like(logits)
        loss = cross_entropy_fwd(logits, target, weight, None, grad, mean=True, **opts)
        for p in (2.0 ** -3, 2.0 ** 16):
            grad_p = torch.empty_like(logits)
            predicted = torch.zeros(1, device=DEV)
            loss_p = cross_entropy_fwd(logits, target, weight, None, grad_p, mean=True,
                                       prediction=torch.tensor([p], device=DEV), predicted=predicted, **opts)
            assert torch.equal(loss_p, loss) and predicted.item() == p
            assert torch.equal(grad_p, (grad.float() * p).to(dtype))  # exact: no rounding in between


@pytest.mark.parametrize("config", [LaunchConfig(block=1024, num_warps=4), INTERPRETED_SPLITS[0]], ids=_launch_id)
@pytest.mark.parametrize("prediction, factor", [(0.0, 4.0), (2.0 ** -3, 4.0), (1.0, 1.0), (2.0, 2.0), (2.0 ** 16, 4.0)],
                         ids=["unknown", "below_1", "1", "below_the_divisor", "past_the_divisor"])
def test_an_fp16_gradient_is_never_written_past_unscaled(prediction, factor, config):
    """fp16 takes a prediction only up to 1 / the mean's scale (here 4 counted rows), and writes the
    gradient unscaled for an unknown one (0): its gradient then never exceeds the unscaled one, so
    no prediction can overflow it. Nor below 1 (unscaled there too), so that a grad_output larger
    than predicted finds no entries lost to fp16's subnormals. ``predicted`` holds the factor used,
    which the backward divides out."""
    logits, target = make(5, 4099, torch.float16, ignore=1)
    predicted = torch.zeros(1, device=DEV)
    grad = torch.empty_like(logits)
    with concurrent_programs() if config.segments > 1 else contextlib.nullcontext():
        cross_entropy_fwd(logits, target, None, None, grad, mean=True, reduce=True, config=config,
                          prediction=torch.tensor([prediction], device=DEV), predicted=predicted)
    assert predicted.item() == factor
    x = logits.double().requires_grad_()
    F.cross_entropy(x, target, reduction="sum").backward()  # the unscaled gradient
    torch.testing.assert_close(grad.double(), x.grad * factor / 4.0, rtol=ULP[torch.float16], atol=2.0 ** -24)


@pytest.mark.parametrize("sm_count", [8, 20, 132])
@pytest.mark.parametrize("n_cols", [16384, 128256, 262144, 1 << 20, 3 << 22])
@pytest.mark.parametrize("size", [2, 4])
def test_split_rows_never_get_more_segments_than_can_run_at_once(sm_count, n_cols, size):
    """A split row's programs wait for each other, so the default launch gives a row no more
    segments than the GPU can run at once (one per SM), whatever V: past that, a row of V = 2^24 on
    an H100 would have waited forever. The segments (a power of two) cover the row, and a segment
    too long to sit in registers is swept in chunks."""
    cap = max_segments(sm_count)
    assert cap & (cap - 1) == 0 and cap <= min(sm_count, MAX_SEGMENTS)
    cfg = _default_config(n_cols, size, cap)
    assert 1 <= cfg.segments <= cap and cfg.segments & (cfg.segments - 1) == 0
    seg_len = cdiv(cdiv(n_cols, cfg.segments), cfg.block) * cfg.block  # as cross_entropy_fwd has it
    assert cfg.segments * seg_len >= n_cols
    assert seg_len == cfg.block or cfg.block <= 2048  # in registers, or chunked
    if cap == MAX_SEGMENTS and n_cols <= 262144:  # the tuned launches are unchanged
        assert cfg == _default_config(n_cols, size, 1 << 30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_longer_than_the_segments_cap(dtype):
    """The default launch at V past its cap of full segments (on an H100 32: fp32 2^19 columns and
    more), capped segments swept in chunks, against the oracle. Without a GPU, the launch of a GPU
    with 2 SMs (a cap of 2), its programs run at once by concurrent_programs()."""
    cap = _max_segments(DEV.index or 0) if DEV.type == "cuda" else max_segments(2)
    v = cap * (16384 if dtype == torch.float32 else 8192) * 2 + 3
    logits, target = make(3 if DEV.type == "cpu" else 6, v, dtype, ignore=1)
    config = _default_config(v, logits.element_size(), cap)
    assert config.segments == cap and config.block <= 2048
    if DEV.type == "cuda":
        assert launch_config(logits, True) == config
    with concurrent_programs():
        check(logits, target, None, (5.0, 5.0), config=config)

@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.bfloat16])
def test_reduce(loss_dtype):
    """reduce=True: the fp32 sum of the rows' fp32 losses, rounded once to loss_dtype, and
    deterministic; per-row losses in loss_dtype are the fp32 ones rounded once."""
    logits, target = make(37, 5, torch.float32, ignore=7)
    rows = cross_entropy_fwd(logits, target, None, None, None)
    total = cross_entropy_fwd(logits, target, None, None, None, reduce=True, loss_dtype=loss_dtype)
    again = cross_entropy_fwd(logits, target, None, None, None, reduce=True, loss_dtype=loss_dtype)
    assert total.shape == () and total.dtype == loss_dtype and torch.equal(total, again)
    # the rows' fp32 sum rounded once (in 16 bits by another kernel, in another order: within an ulp)
    torch.testing.assert_close(total, rows.sum().to(loss_dtype), rtol=ULP[loss_dtype], atol=0)
    if loss_dtype != torch.float32:
        assert torch.equal(cross_entropy_fwd(logits, target, None, None, None, loss_dtype=loss_dtype),
                           rows.to(loss_dtype))


def test_divisors_none_one_or_two_values():
    """divisors=None divides by 1 without a tensor; one value serves both terms. Counts are read as
    they are stored (int64, bf16: no cast before the launch), other dtypes cast to fp32 first; three
    values are refused."""
    logits, target = make(4, 300, torch.float32, ignore=1)
    opts = dict(z_loss=1e-2, label_smoothing=0.1)
    for divisors, dtype, same in ((None, None, (1.0, 1.0)), ((4.0,), torch.float32, (0.25, 0.25)),
                                  ((4, 8), torch.int64, (0.25, 0.125)), ((4.0,), torch.bfloat16, (0.25, 0.25)),
                                  ((8,), torch.int16, (0.125, 0.125))):
        sc = None if divisors is None else torch.tensor(divisors, dtype=dtype, device=DEV)
        grad = torch.empty_like(logits)
        loss = cross_entropy_fwd(logits, target, None, sc, grad, **opts)
        ref_loss, ref_grad = run(logits, target, None, same, **opts)
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad), dtype
    with pytest.raises(ValueError, match="divisor"):
        cross_entropy_fwd(logits, target, None, torch.ones(3, device=DEV), torch.empty_like(logits), **opts)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("kind", ["plain", "weight", "prob", "all ignored"])
def test_mean_counts_the_rows_on_the_device(kind, split, monkeypatch):
    """mean=True divides by torch's mean denominators, counted by the prologue kernel in parts: the
    rows whose target is not ignore_index (every row for probability targets), or with class
    weights the sum of their w_y, the z-loss term by the count. The same as passing those divisors."""
    monkeypatch.setattr(ce, "PART_ROWS", 4)  # 70 rows: 16 parts, and some programs take two blocks
    logits, target = make(70, 9, torch.float32)
    target[::3] = -100
    if kind == "all ignored":
        target[:] = -100
    weight = torch.rand(9, device=DEV) + 0.5 if kind in ("weight", "prob") else None
    if kind == "prob":
        target = torch.softmax(torch.randn(70, 9, device=DEV), dim=-1)
        counted = torch.ones(70, dtype=torch.bool, device=DEV)
    else:
        counted = target != -100
    count = counted.sum(dtype=torch.float32)
    ce_div = weight[target[counted]].sum() if weight is not None and kind != "prob" else count
    opts = dict(z_loss=1e-2, label_smoothing=0.1, config=LaunchConfig(block=16, num_warps=1, segments=int(split)))
    grad, ref_grad = torch.empty_like(logits), torch.empty_like(logits)
    loss = cross_entropy_fwd(logits, target, weight, None, grad, mean=True, **opts)
    ref = cross_entropy_fwd(logits, target, weight, torch.stack([ce_div, count]), ref_grad, **opts)
    # counts are exact; a sum of weights may round differently in parts (an ulp of the scale)
    tol = dict(rtol=0, atol=0) if kind != "weight" else dict(rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(loss, ref, equal_nan=True, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    if kind == "all ignored":  # 0 / 0, as torch's mean over no rows
        assert loss.isnan().all() and not grad.any()
    with pytest.raises(ValueError, match="mean"):
        cross_entropy_fwd(logits, target, weight, ce_div.reshape(1), grad, mean=True)


def test_prologue_zeroes_the_split_counters(monkeypatch):
    """A split launch's counters are zeroed by the prologue kernel, whatever the buffer held."""
    sync = torch.full((71,), 7, dtype=torch.int32, device=DEV)
    target = torch.zeros(70, dtype=torch.long, device=DEV)
    ce._prologue_kernel[(3,)](target, sync, sync, sync, 70, 9, -100, COUNT=False, WEIGHTED=False, PROB=False,
                              ZERO_SYNC=True, BLOCK=8)  # 9 blocks of 8 rows over 3 programs
    assert not sync.any()


def test_deterministic_and_forward_only():
    logits, target = make(8, 4099, torch.float32, ignore=2)
    weight = torch.rand(4099, device=DEV) + 0.5
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    a = run(logits, target, weight, **opts)
    b = run(logits, target, weight, **opts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c, none = run(logits, target, weight, write_grad=False, **opts)
    assert none is None and torch.equal(a[0], c)


def test_empty_batch():
    for target in (torch.zeros(0, dtype=torch.long, device=DEV), torch.zeros(0, 9, device=DEV)):
        loss, grad = run(torch.zeros(0, 9, device=DEV), target)
        assert loss.shape == (0,) and loss.dtype == torch.float32 and grad.shape == (0, 9)
        total = cross_entropy_fwd(torch.zeros(0, 9, device=DEV), target, None, None, None, reduce=True,
                                  loss_dtype=torch.bfloat16)
        assert total.shape == () and total.dtype == torch.bfloat16 and total.item() == 0.0


# ------------------------------------------------------------------------------------------------
# reduce_partials
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 4097, 3 * 4096 + 5])
def test_reduce_partials_rounds_an_fp32_sum_once(dtype, n):
    """A 16-bit reduced loss is the partials' fp32 sum rounded once (one launch, in several blocks
    when n > SUM_BLOCK), deterministic; an fp32 one is torch's sum."""
    from fastloss.kernels.common import SUM_BLOCK, reduce_partials

    assert SUM_BLOCK == 4096  # the sizes above span one to four blocks
    g = torch.Generator().manual_seed(n)
    partials = (torch.randn(n, generator=g) * 100 + 3).to(DEV)
    total = reduce_partials(partials, dtype)
    assert total.shape == () and total.dtype == dtype
    assert torch.equal(total, reduce_partials(partials, dtype))
    # the fp32 sum (in another order) rounded once: equal to within one 16-bit ulp
    torch.testing.assert_close(total.double(), partials.double().sum(), rtol=ULP[dtype], atol=0)
    assert torch.equal(reduce_partials(partials, torch.float32), partials.sum())


# ------------------------------------------------------------------------------------------------
# scale_grad_
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_grad_scalar(dtype):
    g0 = torch.randn(5, 1000, device=DEV).to(dtype)
    g0[0, 0] = float("nan")  # untouched means untouched
    g = g0.clone()
    assert scale_grad_(g, torch.tensor(1.0, device=DEV)) is g
    assert torch.equal(g.isnan(), g0.isnan()) and torch.equal(g.nan_to_num(), g0.nan_to_num())
    g = g0.clone()
    scale_grad_(g, torch.tensor(2.5, device=DEV, dtype=torch.bfloat16))
    ref = (g0.float() * 2.5).to(dtype)
    assert torch.equal(g.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("strided", [False, True])
def test_scale_grad_scalar_strides_over_a_small_grid(strided, monkeypatch):
    """With a scalar factor the grid is capped (SCALE_GRAD_PROGRAMS) and each program loops."""
    import fastloss.kernels.common as common

    monkeypatch.setattr(common, "SCALE_GRAD_PROGRAMS", 2)
    buf = torch.randn(7, 3001 + (5 if strided else 0), device=DEV)  # 21007 elements: 6 blocks
    g0 = buf[:, :3001] if strided else buf
    g = g0.clone() if not strided else buf.clone()[:, :3001]
    scale_grad_(g, torch.tensor(-0.5, device=DEV))
    assert torch.equal(g, g0 * -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_per_row(dtype):
    g0 = torch.randn(6, 4099, device=DEV).to(dtype)
    go = torch.randn(6, device=DEV)
    g = g0.clone()
    scale_grad_(g, go)
    assert torch.equal(g, (g0.float() * go[:, None]).to(dtype))
    # one factor per element (reduction='none' of an elementwise loss); expanded grad_output
    h0 = torch.randn(3, 4, 5, device=DEV).to(dtype)
    h = h0.clone()
    go3 = torch.randn(3, 4, 5, device=DEV)
    scale_grad_(h, go3)
    assert torch.equal(h, (h0.float() * go3).to(dtype))
    h = h0.clone()
    scale_grad_(h, torch.full((1,), 3.0, device=DEV).expand(60))
    assert torch.equal(h, (h0.float() * 3.0).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_with_a_prediction(dtype):
    """A gradient stored times its predicted grad_output p ends as the one stored without a
    prediction and scaled by grad_output, bit for bit; the next prediction is grad_output when it is
    a power of two in [2^-24, 2^24], else 0 (unknown)."""
    r = torch.randn(5, 1000, device=DEV).to(dtype)
    inf, nan = float("inf"), float("nan")
    for p, g, following in [(2 ** -3, 2 ** -3, 2 ** -3), (2 ** -3, 0.3, 0.0), (1.0, 2 ** 16, 2 ** 16),
                            (4.0, -0.5, 0.0), (1.0, 2 ** -24, 2 ** -24), (2 ** -2, 2 ** 24, 2 ** 24),
                            (1.0, 2 ** -25, 0.0), (1.0, 2 ** 25, 0.0), (1.0, 0.0, 0.0), (1.0, -0.0, 0.0),
                            (1.0, 0.75, 0.0), (1.0, inf, 0.0), (2.0, nan, 0.0), (2.0, 1.0, 1.0)]:
        expected = scale_grad_(r.clone(), torch.tensor(g, device=DEV))
        stored = (r.float() * p).to(dtype)
        prediction = torch.full((1,), 7.0, device=DEV)
        scale_grad_(stored, torch.tensor(g, device=DEV), torch.tensor([p], device=DEV), prediction)
        assert torch.equal(stored.nan_to_num(), expected.nan_to_num()), (p, g)
        assert prediction.item() == following, (g, prediction.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_scales_a_second_gradient_in_the_same_launch(dtype):
    """Huber's gradients for input and target: one launch scales both alike, prediction included."""
    a0, b0 = torch.randn(3, 4099, device=DEV).to(dtype), torch.randn(3, 4099, device=DEV).to(dtype)
    for g, p in [(0.3, None), (2.0 ** -3, 2.0 ** -3), (-0.5, 4.0)]:
        a, b = a0.clone(), b0.clone()
        predicted = None if p is None else torch.tensor([p], device=DEV)
        prediction = None if p is None else torch.zeros(1, device=DEV)
        scale_grad_(a, torch.tensor(g, device=DEV), predicted, prediction, other=b)
        assert torch.equal(a, (a0.float() * (g / (p or 1.0))).to(dtype))
        assert torch.equal(b, (b0.float() * (g / (p or 1.0))).to(dtype))
        if p is not None:
            assert prediction.item() == (g if g == 2.0 ** -3 else 0.0)
    two = torch.tensor(2.0, device=DEV)
    for other, go in [(torch.randn(4099, 3, device=DEV).to(dtype).t(), two),  # not contiguous
                      (b0.float() if dtype != torch.float32 else b0.half(), two),  # another dtype
                      (b0, torch.randn(3, device=DEV))]:  # a grad_output per row
        with pytest.raises(ValueError, match="other must be"):
            scale_grad_(a0.clone(), go, other=other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_of_positions(dtype):
    """A 3-D (N, C, D) gradient (cross-entropy's positions): one factor a position (n, d), broadcast over
    its C classes, contiguous and with any strides (in place: the logits' own, inside a wider buffer),
    and a scalar factor on strided memory."""
    go = torch.randn(3, 5, device=DEV)
    h0 = torch.randn(3, 4, 5, device=DEV).to(dtype)
    h = h0.clone()
    scale_grad_(h, go)
    assert torch.equal(h, (h0.float() * go[:, None, :]).to(dtype))
    buf = torch.randn(3, 7, 10, device=DEV).to(dtype)
    b0 = buf.clone()
    view = buf[:, 1:5, ::2]  # strides (70, 10, 2)
    scale_grad_(view, go)
    expected = b0.clone()
    expected[:, 1:5, ::2] = (b0[:, 1:5, ::2].float() * go[:, None, :]).to(dtype)
    assert torch.equal(buf, expected)
    scale_grad_(view, torch.tensor(3.0, device=DEV))
    expected[:, 1:5, ::2] = (expected[:, 1:5, ::2].float() * 3.0).to(dtype)
    assert torch.equal(buf, expected)
    with pytest.raises(ValueError, match="one a position"):
        scale_grad_(view, torch.randn(3, device=DEV))


def test_scale_grad_strided():
    buf = torch.randn(4, 20, device=DEV)
    b0 = buf.clone()
    go = torch.randn(4, device=DEV)
    scale_grad_(buf[:, :15], go)  # an in-place gradient living in a wider logits buffer
    assert torch.equal(buf[:, :15], b0[:, :15] * go[:, None]) and torch.equal(buf[:, 15:], b0[:, 15:])
    scale_grad_(torch.empty(0, device=DEV), torch.tensor(2.0, device=DEV))  # nothing to do


# ------------------------------------------------------------------------------------------------
# The shared @triton.jit math helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _apply_helper(x_ptr, out_ptr, n, HELPER: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HELPER == "expm1":
        y = expm1(x, False)
    elif HELPER == "log1p":
        y = log1p(x, False)
    elif HELPER == "tanh":
        y, _ = softcap(x, 1.0, 1.0, True, INTERPRET)  # a cap of 1: tanh itself
    elif HELPER == "tanh_slope":
        _, y = softcap(x, 1.0, 1.0, True, INTERPRET)
    elif HELPER == "tanh_no_series":
        y, _ = softcap(x, 1.0, 1.0, False, INTERPRET)
    elif HELPER == "tanh_slope_no_series":
        _, y = softcap(x, 1.0, 1.0, False, INTERPRET)
    elif HELPER == "atanh_log":
        y = atanh_log(x)
    else:
        y = cast_to(x, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + offs, y, mask=mask)


@triton.jit
def _apply_scalar_helper(x_ptr, out_ptr, n, HELPER: tl.constexpr):
    for i in range(n):  # one value at a time: the helpers' branch on a scalar (SCALAR), as the rows kernel takes it
        x = tl.load(x_ptr + i)
        if HELPER == "expm1_scalar":
            y = expm1(x, True)
        else:
            y = log1p(x, True)
        tl.store(out_ptr + i, y)


def apply_helper(helper, x, dtype=torch.float32):
    """common.<helper> (or for "cast", cast_to ``dtype``) of the fp32 values x, in one program;
    "<helper>_scalar": the helper of each value as a scalar."""
    out = torch.empty(x.shape, dtype=dtype, device=DEV)
    if helper.endswith("_scalar"):
        _apply_scalar_helper[(1,)](x.to(DEV), out, x.numel(), HELPER=helper)
    else:
        _apply_helper[(1,)](x.to(DEV), out, x.numel(), HELPER=helper, INTERPRET=interpreting(),
                            BLOCK=next_power_of_2(x.numel()))
    return out


@pytest.mark.parametrize("helper, exact, far, far_ulps", [
    ("expm1", torch.expm1, (-20.0, 5.0), 16),
    ("log1p", torch.log1p, (-0.999, 100.0), 16),
    ("expm1_scalar", torch.expm1, (-20.0, 5.0), 16),
    ("log1p_scalar", torch.log1p, (-0.999, 100.0), 16),
    ("tanh", torch.tanh, (-9.0, 9.0), 16),
    # 1 - tanh^2 without cancellation; the exponential of -2|x| carries its argument's rounding,
    # ~|2x| ulps of relative error (5e-6 at |x| = 40, where the slope is 4e-35)
    ("tanh_slope", lambda x: torch.cosh(x) ** -2, (-40.0, 40.0), 100),
    ("tanh_slope_no_series", lambda x: torch.cosh(x) ** -2, (-40.0, 40.0), 100),
])
def test_math_helpers_keep_their_relative_precision(helper, exact, far, far_ulps):
    """Within 6 fp32 ulps of the exact value for |x| <= 0.5, down to 1e-30, where the plain formulas
    (exp(x) - 1, log(1 + x)) lose digits to cancellation: the loss of a confident row and focal's
    1 - p_y depend on it. Within ``far_ulps`` elsewhere (the GPU's exp and log are approximate). The
    slope of tanh (softcap's) from a rounded tanh, 1 - t^2, has no digit left past |x| ~ 9."""
    tiny = torch.logspace(-30, math.log10(0.5), 600)
    near = torch.cat([torch.linspace(-0.5, 0.5, 2001), tiny, -tiny])
    for xs, ulps in ((near, 6), (torch.linspace(*far, 2001), far_ulps)):
        truth = exact(xs.double())
        err = (apply_helper(helper, xs).cpu().double() - truth).abs() / (truth.abs() * 2.0**-23)
        assert err.max().item() <= ulps, (helper, xs[err.argmax()].item(), err.max().item())


def test_tanh_without_its_series_keeps_absolute_precision():
    """softcap's tanh for 16-bit logits (SERIES off) loses relative digits near 0, but stays within
    a few 2^-23 of tanh absolutely everywhere: the capped logit within that times the cap, which the
    softmax takes as a relative error of its probabilities (kernels/cross_entropy.FAST_TANH_MAX_CAP).
    Here 1 of those units (the GPU's approximate exp2: ~2)."""
    tiny = torch.logspace(-30, 0, 600)
    xs = torch.cat([torch.linspace(-9.0, 9.0, 4001), tiny, -tiny])
    err = (apply_helper("tanh_no_series", xs).cpu().double() - torch.tanh(xs.double())).abs()
    assert err.max().item() <= 4 * 2.0**-23, (xs[err.argmax()].item(), err.max().item())


def test_atanh_log_keeps_full_precision():
    """2 atanh(z), sigmoid focal's log1p(e) for e <= 1 (z = e / (2 + e) <= 1/3), is a polynomial with
    no approximate function, so within 1.5 units of 2^-23 relative on a CPU and a GPU alike (0.96
    measured on a CPU; 2.0 without its last term)."""
    z = torch.cat([torch.linspace(-1 / 3, 1 / 3, 4001), torch.logspace(-30, math.log10(1 / 3), 300)])
    truth = 2.0 * torch.atanh(z.double())
    err = (apply_helper("atanh_log", z).cpu().double() - truth).abs() / (truth.abs() * 2.0**-23)
    assert err[z != 0].max().item() <= 1.5, (z[err.argmax()].item(), err.max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_to_rounds_as_torch(dtype):
    """cast_to rounds fp32 to the nearest even 16-bit value as torch does (the interpreter's own
    bf16 cast truncates): ties both ways, overflow to inf, subnormals, -0; and a NaN stays NaN,
    also one whose payload lies in the bits a bf16 drops (truncated, it would read inf)."""
    bits = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x80008000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001,
            0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x33800001, 0x387FC000]
    specials = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([specials, torch.randn(1000) * 10.0 ** torch.randint(-8, 8, (1000,))])
    ours, theirs = apply_helper("cast", x, dtype).cpu(), x.to(dtype)
    nan = theirs.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(ours[~nan].view(torch.int16), theirs[~nan].view(torch.int16))
