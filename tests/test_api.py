"""The public API: signatures, the backend switch, bad arguments, modules and legacy arguments."""

import contextlib
import functools
import importlib.util
import inspect
import math
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

import fastloss
import fastloss.nn as fnn
from bench import cases as bench_cases
from bench import host
from fastloss import backend, reference

# --------------------------------------------------------------------------------------------------
# signatures match torch's, extras are keyword-only
# --------------------------------------------------------------------------------------------------

PAIRS = [
    (fastloss.cross_entropy, F.cross_entropy, {"z_loss", "softcap", "inplace_backward", "divisor"}),
    (fastloss.huber_loss, F.huber_loss, {"divisor"}),
    (fastloss.smooth_l1_loss, F.smooth_l1_loss, {"divisor"}),
    (fnn.CrossEntropyLoss.__init__, torch.nn.CrossEntropyLoss.__init__, {"z_loss", "softcap", "inplace_backward"}),
    (fnn.HuberLoss.__init__, torch.nn.HuberLoss.__init__, set()),
    (fnn.SmoothL1Loss.__init__, torch.nn.SmoothL1Loss.__init__, set()),
]


@pytest.mark.parametrize("ours, theirs, extras", PAIRS, ids=lambda v: getattr(v, "__qualname__", ""))
def test_signature_matches_torch(ours, theirs, extras):
    ours_p = inspect.signature(ours).parameters
    theirs_p = inspect.signature(theirs).parameters
    positional = [(n, p.default) for n, p in ours_p.items() if p.kind != p.KEYWORD_ONLY]
    assert positional == [(n, p.default) for n, p in theirs_p.items()]
    assert {n for n, p in ours_p.items() if p.kind == p.KEYWORD_ONLY} == extras


def test_focal_signatures():
    params = inspect.signature(fastloss.sigmoid_focal_loss).parameters
    # torchvision.ops.sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2, reduction="none"), and
    # the keyword-only extra
    assert [(n, p.default) for n, p in params.items() if p.kind != p.KEYWORD_ONLY] == [
        ("inputs", inspect.Parameter.empty), ("targets", inspect.Parameter.empty),
        ("alpha", 0.25), ("gamma", 2.0), ("reduction", "none")]
    assert [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY] == ["divisor"]
    params = inspect.signature(fastloss.focal_loss).parameters
    assert list(params)[:6] == ["input", "target", "gamma", "weight", "ignore_index", "reduction"]
    assert params["gamma"].default == 2.0 and params["reduction"].default == "mean"


# --------------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------------


def test_backend_env_and_context(monkeypatch):
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    assert backend.current() == "auto"
    monkeypatch.setenv("FASTLOSS_BACKEND", "reference")
    assert backend.current() == "reference"
    with fastloss.use_backend("triton"):
        assert backend.current() == "triton"
        with fastloss.use_backend("auto"):
            assert backend.current() == "auto"
        assert backend.current() == "triton"
    assert backend.current() == "reference"


def test_strict_is_read_at_every_call(monkeypatch):
    """FASTLOSS_STRICT (its synced range check matters on CUDA only: on a CPU the check is free and
    always made): set to anything but empty or 0, it is on."""
    from fastloss import backend

    monkeypatch.delenv("FASTLOSS_STRICT", raising=False)
    assert not backend.strict()
    for value, strict in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("FASTLOSS_STRICT", value)
        assert backend.strict() is strict


def test_backend_invalid_name(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        with fastloss.use_backend("cuda"):
            pass
    monkeypatch.setenv("FASTLOSS_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        fastloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_rocm_gpus_take_the_reference(monkeypatch):
    """On a ROCm build of torch GPU tensors are "cuda" too, but the kernels use NVIDIA PTX, which
    would fail to compile there: auto takes the reference, and forcing triton is a clear error."""
    pytest.importorskip("triton")
    gpu_tensor = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    monkeypatch.setattr(torch.version, "hip", None)  # an NVIDIA build
    assert backend.use_triton(gpu_tensor) is True
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert backend.use_triton(gpu_tensor) is False
    with fastloss.use_backend("triton"), pytest.raises(RuntimeError, match="ROCm"):
        backend.use_triton(gpu_tensor)

def test_auto_on_cpu_runs_reference(monkeypatch):
    calls = []
    real = reference.cross_entropy
    monkeypatch.setattr(reference, "cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    fastloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
    assert calls == [1]


# torch.func: (ours, torch's) with the target they take; sigmoid focal is checked against its reference
# (also used by the fake tensor test)
TRANSFORMED = {
    "cross_entropy": (lambda x, t: fastloss.cross_entropy(x, t, weight=torch.arange(1.0, 8.0, device=x.device,
                                                                                    dtype=x.dtype),
                                                          ignore_index=2, label_smoothing=0.1),
                      lambda x, t: F.cross_entropy(x, t, weight=torch.arange(1.0, 8.0, device=x.device, dtype=x.dtype),
                                                   ignore_index=2, label_smoothing=0.1), "class"),
    "focal_loss": (lambda x, t: fastloss.focal_loss(x, t, gamma=0.0), F.cross_entropy, "class"),
    "huber_loss": (fastloss.huber_loss, F.huber_loss, "real"),
    "smooth_l1_loss": (lambda x, t: fastloss.smooth_l1_loss(x, t, beta=0.5),
                       lambda x, t: F.smooth_l1_loss(x, t, beta=0.5), "real"),
    "sigmoid_focal_loss": (lambda x, t: fastloss.sigmoid_focal_loss(x, t, reduction="mean"),
                           lambda x, t: reference.sigmoid_focal_loss(x, t, reduction="mean"), "real"),
}


@pytest.mark.parametrize("name", TRANSFORMED)
def test_torch_func_transforms_run_the_reference(name, monkeypatch):
    """vmap(grad(loss)) (per-sample gradients) and jacrev work as with torch's losses: under a
    torch.func transform auto takes the reference, which branches on no tensor's values there, and
    on CUDA the kernels' autograd.Functions, which cannot be transformed, are not used."""
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    ours, theirs, kind = TRANSFORMED[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 7, generator=g)
    t = torch.randint(0, 7, (4, 3), generator=g) if kind == "class" else torch.rand(4, 3, 7, generator=g)
    if torch.cuda.is_available():
        x, t = x.cuda(), t.cuda()
    per_sample = torch.func.vmap(torch.func.grad(ours))(x, t)
    torch.testing.assert_close(per_sample, torch.func.vmap(torch.func.grad(theirs))(x, t))
    torch.testing.assert_close(torch.func.jacrev(ours)(x[0], t[0]), torch.func.jacrev(theirs)(x[0], t[0]))


# torch loads its forward-mode decompositions through torch.jit.script on first use, which warns
JIT_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@JIT_DEPRECATED
@pytest.mark.parametrize("name", TRANSFORMED)
def test_forward_mode_ad_runs_the_reference(name, monkeypatch):
    """Forward-mode AD (torch.autograd.forward_ad) gives torch's tangents: auto takes the reference
    there, on CUDA too, where the kernels' autograd.Functions have no jvp."""
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    ours, theirs, kind = TRANSFORMED[name]
    g = torch.Generator().manual_seed(0)
    x, tangent = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    t = torch.randint(0, 7, (6,), generator=g) if kind == "class" else torch.rand(6, 7, generator=g)
    if torch.cuda.is_available():
        x, tangent, t = x.cuda(), tangent.cuda(), t.cuda()
    with fwAD.dual_level():
        got, expected = (fwAD.unpack_dual(fn(fwAD.make_dual(x, tangent), t)) for fn in (ours, theirs))
    torch.testing.assert_close(got.primal, expected.primal)
    torch.testing.assert_close(got.tangent, expected.tangent)


@JIT_DEPRECATED
def test_forcing_triton_under_forward_mode_ad_is_an_error():
    pytest.importorskip("triton")
    with fastloss.use_backend("triton"), fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode"):
        fastloss.huber_loss(fwAD.make_dual(torch.randn(4), torch.randn(4)), torch.randn(4))


def test_forcing_triton_under_a_torch_func_transform_is_an_error():
    pytest.importorskip("triton")
    with fastloss.use_backend("triton"), pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(fastloss.huber_loss)(torch.randn(4), torch.randn(4))


@pytest.mark.parametrize("name", ["cross_entropy", "huber_loss", "sigmoid_focal_loss"])
def test_compiled_torch_func_transforms_run_the_reference(name, monkeypatch):
    """A compiled vmap(grad(loss)) (per-sample gradients under torch.compile) sees the transform as
    eager mode does: auto takes the reference there, on CUDA too (the kernels' ops failed inside the
    transform), and forcing triton raises the same error as in eager mode."""
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    ours, theirs, kind = TRANSFORMED[name]
    device = _device("triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 7, generator=g).to(device)
    t = (torch.randint(0, 7, (4, 3), generator=g) if kind == "class" else torch.rand(4, 3, 7, generator=g)).to(device)
    per_sample = lambda fn: torch.func.vmap(torch.func.grad(fn))  # noqa: E731
    torch._dynamo.reset()
    got = torch.compile(per_sample(ours), fullgraph=True, backend="aot_eager")(x, t)
    torch.testing.assert_close(got, per_sample(theirs)(x, t))
    if importlib.util.find_spec("triton") is not None:
        torch._dynamo.reset()
        with fastloss.use_backend("triton"), pytest.raises(RuntimeError, match="torch.func transform"):
            torch.compile(per_sample(ours), fullgraph=True, backend="aot_eager")(x, t)


def test_a_divisor_under_torch_func_transforms(monkeypatch):
    """Per-sample gradients of summed losses divided by a count (vmap(grad(...)), which takes the
    reference): torch's sum / d, for a number and for a 0-dim tensor."""
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 7, generator=g), torch.randint(0, 7, (4, 3), generator=g)
    for d in (5, torch.tensor(5.0)):
        per_sample = lambda fn: torch.func.vmap(torch.func.grad(fn))(x, t)  # noqa: E731
        got = per_sample(lambda a, b: fastloss.cross_entropy(a, b, reduction="sum", divisor=d))
        torch.testing.assert_close(got, per_sample(lambda a, b: F.cross_entropy(a, b, reduction="sum") / d))


def test_out_of_range_class_where_no_check_can_branch(monkeypatch):
    """Eager CPU raises IndexError as torch does; under torch.func and inside a compiled graph no
    check can branch on the targets, so the row's loss is NaN, as the kernels give on CUDA (never a
    read out of bounds). The reference compiles with fullgraph=True on CPU."""
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    x, t = torch.randn(5, 7), torch.tensor([1, 9, -3, 0, -100])
    with pytest.raises(IndexError):
        fastloss.cross_entropy(x, t)
    expected = F.cross_entropy(x, t.clamp(0, 6), reduction="none", ignore_index=-100)
    expected[[1, 2]] = float("nan")
    expected[4] = 0.0
    vmapped = torch.func.vmap(lambda a, b: fastloss.cross_entropy(a, b, reduction="none"))(x[None], t[None])[0]
    torch.testing.assert_close(vmapped, expected, equal_nan=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: fastloss.cross_entropy(a, b, reduction="none"), fullgraph=True,
                             backend="aot_eager")(x, t)
    torch.testing.assert_close(compiled, expected, equal_nan=True)
    assert torch.compile(fastloss.focal_loss, fullgraph=True, backend="aot_eager")(x, t.clamp(0, 6)).isfinite()

@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_broadcasting_and_legacy_arguments_compile_with_fullgraph(backend_name):
    """torch's huber_loss and smooth_l1_loss compile with fullgraph=True for shapes that broadcast
    (eager warns), for the legacy size_average / reduce and for integer targets; so do fastloss's: the
    warning is left out of a compiled graph (a warning does not trace), and the legacy rule is torch's."""
    device = _device(backend_name)
    x, y = torch.randn(4, 5, device=device), torch.randn(5, device=device)
    calls = [
        lambda m: m.huber_loss(x, y),
        lambda m: m.smooth_l1_loss(x, x.flip(0), size_average=False),
        lambda m: m.smooth_l1_loss(x, x.flip(0), reduce=False),
        lambda m: m.smooth_l1_loss(x, x.flip(0), size_average=True, reduce=True),
        # integer, bool and integer-input targets: their dtype checks trace too
        lambda m: m.huber_loss(x, (3 * x).long()),
        lambda m: m.huber_loss(x, x > 0, reduction="sum"),
        lambda m: m.smooth_l1_loss((3 * x).long(), x),
    ]
    for call in calls:
        torch._dynamo.reset()
        with fastloss.use_backend(backend_name), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = torch.compile(lambda: call(fastloss), fullgraph=True, backend="eager")()
            expected = call(F)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("loss", ["huber_loss", "smooth_l1_loss", "sigmoid_focal_loss"])
def test_a_mean_compiles_once_for_every_batch_size(loss, backend_name):
    """A mean divides by the element count: inside the kernels' op it is no constant of the graph,
    so a compiled loss takes every batch size with one dynamic graph, as torch's does (1 / numel as
    the op's float argument was specialized to each size, recompiling until the recompile limit
    failed the fullgraph=True compile), and torch.export takes a dynamic batch dimension."""
    import torch._dynamo.testing

    device = _device(backend_name)
    fn = lambda x, t: getattr(fastloss, loss)(x, t, reduction="mean")  # noqa: E731
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    frames = []
    with fastloss.use_backend(backend_name):
        for n in range(2, 14):  # more sizes than the recompile limit (8)
            x = torch.randn(n, 3, device=device, requires_grad=True)
            t = torch.rand(n, 3, device=device)
            got = compiled(x, t)
            got.backward()
            torch.testing.assert_close(got, fn(x.detach(), t))
            frames.append(counter.frame_count)
        assert frames[-1] == frames[2], frames  # a static graph, then one dynamic one
        batch = torch.export.Dim("batch")

        class Model(torch.nn.Module):
            def forward(self, x, t):
                return fn(x, t)

        exported = torch.export.export(Model(), (torch.randn(4, 3, device=device), torch.rand(4, 3, device=device)),
                                       dynamic_shapes=({0: batch}, {0: batch}))
        x, t = torch.randn(7, 3, device=device), torch.rand(7, 3, device=device)
        torch.testing.assert_close(exported.module()(x, t), fn(x, t))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("form", ["tensor", "float"])
@pytest.mark.parametrize("loss", ["cross_entropy", "sigmoid_focal_loss", "huber_loss"])
def test_a_divisor_compiles_once_for_every_value(loss, form, backend_name):
    """A divisor that changes every step compiles with fullgraph=True into one graph for every value,
    and gives eager mode's loss and gradient: a 0-dim tensor on the device (a token count) at once, a
    Python float after its first value (torch.compile's first graph takes a number as a constant; the
    kernels' path took every value as one, compiling again for each, until the recompile limit)."""
    import torch._dynamo.testing

    device = _device(backend_name)
    fn = lambda x, t, d: getattr(fastloss, loss)(x, t, reduction="sum", divisor=d)  # noqa: E731
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    x0 = torch.randn(6, 11, device=device)
    t = torch.randint(0, 11, (6,), device=device) if loss == "cross_entropy" else torch.rand(6, 11, device=device)
    with fastloss.use_backend(backend_name):
        for count in (5, 9, 6, 7, 12):
            d = torch.tensor(count, device=device) if form == "tensor" else count + 0.5
            x, x_eager = x0.clone().requires_grad_(), x0.clone().requires_grad_()
            got, expected = compiled(x, t, d), fn(x_eager, t, d)
            got.backward()
            expected.backward()
            torch.testing.assert_close(got, expected)
            torch.testing.assert_close(x.grad, x_eager.grad)
    assert counter.frame_count == (1 if form == "tensor" else 2)


def test_the_first_call_of_a_process_compiles_once():
    """A loss first called inside a compiled function compiles it once: backend selection leaves no
    state for the trace to fill (the first traced lookup of triton used to fill a cache, and the
    guard on its empty state then failed on the next call, compiling the whole graph again). A fresh
    process, where nothing has selected a backend yet."""
    pytest.importorskip("triton")
    code = ("import torch, torch._dynamo.testing, fastloss\n"
            "device = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
            "counter = torch._dynamo.testing.CompileCounterWithBackend('eager')\n"
            "f = torch.compile(lambda x, t: fastloss.huber_loss(x, t), fullgraph=True, backend=counter)\n"
            "x, t = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)\n"
            "with fastloss.use_backend('triton'):\n"
            "    for _ in range(3):\n"
            "        f(x, t)\n"
            "print(counter.frame_count)\n")
    env = {**os.environ} if torch.cuda.is_available() else {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"


def test_forcing_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    pytest.importorskip("triton")
    from fastloss.kernels import common

    monkeypatch.setattr(common, "interpreting", lambda: False)  # kernels compiled for a GPU
    with fastloss.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
    with fastloss.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastloss.huber_loss(torch.randn(4), torch.randn(4))


@pytest.mark.parametrize("value, runs", [("true", True), ("2", False)])
def test_triton_interpret_is_read_as_triton_reads_it(value, runs):
    """TRITON_INTERPRET=true makes Triton (>= 3.4) interpret the kernels, as 1 does: the kernels'
    INTERPRET switch must follow, or they would reach inline PTX, which the interpreter cannot run.
    2 does not: then forcing triton on a CPU tensor is fastloss's clear error, not a failure inside
    Triton. A fresh process: Triton reads the variable when the kernels are defined."""
    triton = pytest.importorskip("triton")
    if not hasattr(triton, "knobs") or torch.cuda.is_available():
        pytest.skip("Triton < 3.4 reads only TRITON_INTERPRET=1; a CPU test")
    code = ("import torch, fastloss, torch.nn.functional as F\n"
            "x = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True); t = torch.tensor([0, 4, 2])\n"
            "with fastloss.use_backend('triton'): fastloss.cross_entropy(x, t).backward()\n"
            "ref = x.detach().float().requires_grad_(); F.cross_entropy(ref, t).backward()\n"
            "torch.testing.assert_close(x.grad.float(), ref.grad, atol=1e-2, rtol=1e-2)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": value},
                          capture_output=True, text=True, timeout=300)
    if runs:
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        assert "RuntimeError: FASTLOSS_BACKEND=triton on a cpu tensor needs Triton's interpreter" in done.stderr


def test_every_launch_asks_for_fused_multiply_adds(monkeypatch):
    """Triton's default for fused multiply-adds is changing (3.9 warns that 3.10 turns it off): every
    launch asks for them, as the kernels' instruction counts and roundings assume."""
    pytest.importorskip("triton")
    from fastloss.kernels import common

    # on a GPU, launches of a variant already compiled skip Triton's launch path (common.launch):
    # forget them, so that each variant's first launch here goes through it again
    monkeypatch.setattr(common, "_COMPILED", {})
    asked = {}
    for cls, name in host.launch_entry_points():
        def run(self, *args, _real=getattr(cls, name), **kwargs):
            asked[getattr(self, "__name__", None) or self.fn.__name__] = kwargs.get("enable_fp_fusion")
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.randn(4, 40, dtype=torch.bfloat16, device=device, requires_grad=True)  # rows (not narrow)
    x, y = torch.randn(2, 40, device=device, requires_grad=True), torch.rand(2, 40, device=device)
    with fastloss.use_backend("triton"):
        fastloss.cross_entropy(logits, torch.tensor([1, 0, 8, 2], device=device)).backward(torch.tensor(0.5))
        spatial = torch.randn(2, 9, 3, device=device, requires_grad=True)  # (N, C, d): classes strided in memory
        fastloss.cross_entropy(spatial, torch.tensor([[1, 0, 8], [2, 2, 0]], device=device)).backward()
        fastloss.huber_loss(x, y).backward()
        fastloss.sigmoid_focal_loss(x, y, reduction="mean").backward()
    assert set(asked) >= {"_prologue_kernel", "_cross_entropy_kernel", "_cross_entropy_columns_kernel", "_sum_kernel",
                          "_scale_grad_kernel", "_huber_kernel", "_sigmoid_focal_kernel"}
    assert all(v is True for v in asked.values()), asked

# --------------------------------------------------------------------------------------------------
# bad arguments: same exception type as torch, raised before any launch, naming the argument
# --------------------------------------------------------------------------------------------------

X = torch.randn(4, 5)
T = torch.tensor([0, 1, 2, 3])
Y = torch.randn(4, 5)

BAD_CALLS = [
    # (id, fastloss call, torch call or None when torch has no such function, pattern in our message)
    ("reduction", lambda m: m.cross_entropy(X, T, reduction="avg"), "reduction"),
    ("label_smoothing", lambda m: m.cross_entropy(X, T, label_smoothing=1.5), "label_smoothing"),
    ("weight_2d", lambda m: m.cross_entropy(X, T, weight=torch.ones(5, 1)), "weight"),
    ("batch", lambda m: m.cross_entropy(X, T[:3]), "batch_size"),
    ("target_shape", lambda m: m.cross_entropy(torch.randn(4, 5, 3), torch.zeros(4, 2, dtype=torch.long)), "target"),
    ("sequence_logits", lambda m: m.cross_entropy(torch.randn(2, 4, 5), T.view(2, 2).repeat(1, 2)), "flatten(0, 1)"),
    ("target_dtype", lambda m: m.cross_entropy(X, T.int()), "target"),
    ("target_uint8_spatial", lambda m: m.cross_entropy(torch.randn(4, 5, 3), torch.zeros(4, 3, dtype=torch.uint8)),
     "target"),
    ("target_float_dtype_mismatch", lambda m: m.cross_entropy(X, T.double()), "target"),
    ("prob_shape", lambda m: m.cross_entropy(X, torch.rand(4, 6)), "target"),
    ("prob_ignore_index", lambda m: m.cross_entropy(X, torch.rand(4, 5), ignore_index=0), "ignore_index"),
    ("weight_size", lambda m: m.cross_entropy(X, T, weight=torch.ones(3)), "weight"),
    ("ignore_index_float", lambda m: m.cross_entropy(X, T, ignore_index=1.0), "ignore_index"),
    ("ignore_index_bool", lambda m: m.cross_entropy(X, T, ignore_index=True), "ignore_index"),
    ("ignore_index_overflow", lambda m: m.cross_entropy(X, T, ignore_index=2**70), "ignore_index"),
    ("label_smoothing_str", lambda m: m.cross_entropy(X, T, label_smoothing="0.1"), "label_smoothing"),
    ("out_of_range", lambda m: m.cross_entropy(X, torch.tensor([0, 1, 2, 5])), "5"),
    ("negative_target", lambda m: m.cross_entropy(X, torch.tensor([0, 1, 2, -3])), "-3"),
    # 156 is -100 as a uint8: the ignore_index it is compared with must not wrap to it
    ("out_of_range_uint8", lambda m: m.cross_entropy(X, torch.tensor([0, 1, 2, 156], dtype=torch.uint8)), "156"),
    ("int_input", lambda m: m.cross_entropy(X.long(), T), "input"),
    # an integer input fails at torch's log_softmax: after label_smoothing's range and a 0-d input for
    # class indices, after the target's dtype, ignore_index and the weight for probabilities
    ("int_input_after_label_smoothing", lambda m: m.cross_entropy(X.long(), T, label_smoothing=1.5), "label_smoothing"),
    ("int_input_after_0d", lambda m: m.cross_entropy(torch.tensor(1), T), "dimension"),
    ("int_input_before_batch", lambda m: m.cross_entropy(X.long(), T[:3]), "input"),
    ("int_input_after_probability_dtype", lambda m: m.cross_entropy(X.long(), T[:, None].expand(4, 5)), "floating point"),
    ("int_input_after_probability_ignore_index", lambda m: m.cross_entropy(X.long(), Y, ignore_index=0), "ignore_index"),
    ("int_input_after_probability_weight", lambda m: m.cross_entropy(X.long(), Y, weight=torch.ones(3)), "weight"),
    ("int_input_before_probability_label_smoothing",
     lambda m: m.cross_entropy(X.long(), Y, label_smoothing=1.5), "input"),
    ("weight_type_first", lambda m: m.cross_entropy(X, T, weight=[1.0] * 5, label_smoothing=1.5), "weight"),
    # a 0-d input fails at the class dimension (IndexError), unless a 0-d integer target is refused first
    ("input_0d", lambda m: m.cross_entropy(torch.randn(()), T), "dimension"),
    ("input_0d_probabilities", lambda m: m.cross_entropy(torch.randn(()), torch.rand(())), "dimension"),
    ("input_0d_class_index", lambda m: m.cross_entropy(torch.randn(()), torch.tensor(1)), "floating point"),
    # a target of the input's shape is taken for probabilities; any other shape, for class indices,
    # whose batch size torch checks first, whatever the target's dtype
    ("class_indices_of_the_input_shape", lambda m: m.cross_entropy(X, torch.zeros(4, 5, dtype=torch.long)),
     "floating point"),
    ("batch_of_a_0d_target", lambda m: m.cross_entropy(X, torch.tensor(1)), "batch_size (0)"),
    ("batch_of_a_0d_target_spatial", lambda m: m.cross_entropy(torch.randn(4, 5, 3), torch.tensor(1)), "batch_size"),
    ("batch_of_probabilities", lambda m: m.cross_entropy(X, torch.rand(3, 5)), "batch_size"),
    ("no_rows_0d_target", lambda m: m.cross_entropy(torch.randn(0, 5), torch.tensor(1)), "0-d"),
    ("unbatched_target_size", lambda m: m.cross_entropy(torch.randn(5), torch.tensor([1, 2, 3])), "0-d target"),
    ("input_0d_probabilities_ignore_index",  # the ignore_index torch refuses for probabilities, first
     lambda m: m.cross_entropy(torch.randn(()), torch.rand(()), ignore_index=0), "ignore_index"),
    ("batch_before_target_dtype", lambda m: m.cross_entropy(X, T[:3].int()), "batch_size"),
    # label_smoothing: checked before a class-index target's shapes, after a probability target's weight
    ("label_smoothing_before_batch", lambda m: m.cross_entropy(X, T[:3], label_smoothing=1.5), "label_smoothing"),
    ("input_0d_probabilities_before_label_smoothing",
     lambda m: m.cross_entropy(torch.randn(()), torch.rand(()), label_smoothing=1.5), "dimension"),
    ("probability_weight_before_label_smoothing",
     lambda m: m.cross_entropy(X, torch.rand(4, 5), weight=torch.ones(3), label_smoothing=1.5), "weight"),
    ("label_smoothing_type_before_shapes",
     lambda m: m.cross_entropy(torch.randn(()), torch.rand(()), label_smoothing="0.1"), "label_smoothing"),
    ("input_type_before_label_smoothing", lambda m: m.cross_entropy([0.5], T, label_smoothing=1.5), "input"),
    ("no_classes", lambda m: m.cross_entropy(torch.zeros(4, 0), T.clamp(max=0)), "out of bounds"),
    ("huber_delta", lambda m: m.huber_loss(X, Y, delta=0.0), "delta"),
    ("huber_negative_delta", lambda m: m.huber_loss(X, Y, delta=-1.0), "delta"),
    ("huber_reduction", lambda m: m.huber_loss(X, Y, reduction="max"), "reduction"),
    ("huber_weight", lambda m: m.huber_loss(X, Y, weight=torch.ones(5)), "weight"),
    ("huber_broadcast_fail", lambda m: m.huber_loss(X, torch.randn(3)), ""),
    ("huber_delta_none", lambda m: m.huber_loss(X, Y, delta=None), "delta"),
    ("smooth_l1_beta_none", lambda m: m.smooth_l1_loss(X, Y, beta=None), "beta"),
    ("smooth_l1_beta", lambda m: m.smooth_l1_loss(X, Y, beta=-1.0), "beta"),
    ("smooth_l1_reduction", lambda m: m.smooth_l1_loss(X, Y, reduction=""), "reduction"),
    # two faults: the one torch reports first (shapes, then the weight's, then the reduction, then
    # delta or beta, except that a weighted Huber checks delta before the reduction)
    ("huber_broadcast_before_reduction", lambda m: m.huber_loss(X, torch.randn(3), reduction="max"), ""),
    ("huber_broadcast_before_weight", lambda m: m.huber_loss(X, torch.randn(3), weight=torch.ones(5)), ""),
    ("huber_weight_before_delta", lambda m: m.huber_loss(X, Y, delta=-1.0, weight=torch.ones(5)), "weight"),
    ("huber_reduction_before_delta", lambda m: m.huber_loss(X, Y, reduction="max", delta=-1.0), "reduction"),
    ("huber_weighted_delta_before_reduction",
     lambda m: m.huber_loss(X, Y, reduction="max", delta=-1.0, weight=torch.ones(4, 5)), "delta"),
    ("smooth_l1_broadcast_before_reduction", lambda m: m.smooth_l1_loss(X, torch.randn(3), reduction=""), ""),
    ("smooth_l1_reduction_before_beta", lambda m: m.smooth_l1_loss(X, Y, reduction="", beta=-1.0), "reduction"),
    # an integer or bool input: torch's kernel refuses it after the shapes, the reduction and delta or
    # beta; RuntimeError where Huber's result (the input's dtype) cannot hold the promoted dtype
    ("huber_int_input_float_target", lambda m: m.huber_loss(X.long(), Y), "input"),
    ("huber_bool_input_int_target", lambda m: m.huber_loss(X > 0, Y.long()), "input"),
    ("huber_int_input_bool_target", lambda m: m.huber_loss(X.long(), Y > 0), "input"),
    ("huber_int_input_weighted", lambda m: m.huber_loss(X.long(), Y, weight=torch.ones(4, 5)), "input"),
    ("smooth_l1_int_input_int_target", lambda m: m.smooth_l1_loss(X.long(), Y.long()), "input"),
    ("huber_broadcast_before_int_input", lambda m: m.huber_loss(X.long(), torch.randn(3)), ""),
    ("huber_reduction_before_int_input", lambda m: m.huber_loss(X.long(), Y, reduction="max"), "reduction"),
    ("huber_delta_before_int_input", lambda m: m.huber_loss(X.long(), Y.long(), delta=-1.0), "delta"),
    ("huber_weighted_int_input_before_reduction",
     lambda m: m.huber_loss(X.long(), Y, reduction="max", weight=torch.ones(4, 5)), "input"),
    ("smooth_l1_reduction_before_int_input", lambda m: m.smooth_l1_loss(X.long(), Y.long(), reduction=""), "reduction"),
    ("smooth_l1_beta_before_int_input", lambda m: m.smooth_l1_loss(X > 0, Y > 0, beta=-1.0), "beta"),
    # a complex input or target (the reference would drop its imaginary part)
    ("huber_complex_target", lambda m: m.huber_loss(X, Y.to(torch.complex64)), "complex"),
    ("huber_complex_input", lambda m: m.huber_loss(X.to(torch.complex64), Y), "complex"),
    ("smooth_l1_complex_target", lambda m: m.smooth_l1_loss(X, Y.to(torch.complex64)), "complex"),
    ("smooth_l1_complex_input", lambda m: m.smooth_l1_loss(X.to(torch.complex64), Y), "complex"),
    ("device", lambda m: m.cross_entropy(X, T.to("meta")), "device"),
    ("huber_device", lambda m: m.huber_loss(X, Y.to("meta")), "device"),
    # torch's kernel meets the devices (and layouts) after the reduction and the weight's shape are read
    ("huber_reduction_before_device", lambda m: m.huber_loss(X, Y.to("meta"), reduction="max"), "reduction"),
    ("huber_weight_before_device", lambda m: m.huber_loss(X, Y.to("meta"), weight=torch.ones(5)), "weight"),
    ("smooth_l1_reduction_before_layout", lambda m: m.smooth_l1_loss(X, Y.to_sparse(), reduction=""), "reduction"),
]


# Cases whose error depends on the values, found where the backend runs (the others are found first)
VALUE_CHECKS = ("out_of_range", "negative_target", "out_of_range_uint8", "no_classes")


def _device(backend_name: str) -> torch.device:
    """Where a test's tensors go for a backend: the triton backend takes CPU tensors only under the
    interpreter, so on a machine with CUDA it gets CUDA tensors."""
    return torch.device("cuda" if backend_name == "triton" and torch.cuda.is_available() else "cpu")


def _raised(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return exc
    return None


@pytest.fixture
def launches():
    """The Triton kernels launched (compiled or interpreted) while the test runs; none really run."""
    pytest.importorskip("triton")
    with host.triton_launches(stub=True) as launched:
        yield launched


def test_launches_fixture_sees_launches(launches):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with fastloss.use_backend("triton"):
        fastloss.huber_loss(X.to(device), Y.to(device))
    assert launches


@pytest.mark.parametrize("case", BAD_CALLS, ids=lambda c: c[0])
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_bad_arguments_raise_like_torch(case, backend_name, launches):
    name, call, pattern = case
    if backend_name == "triton" and name in VALUE_CHECKS and torch.cuda.is_available():
        pytest.skip("the triton backend runs these CPU tensors only under the interpreter; on CUDA, "
                    "test_kernels.py::test_out_of_range_target_on_device_gives_nan_row checks out-of-range "
                    "targets (a NaN row, no sync)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _raised(lambda: call(F))
        with fastloss.use_backend(backend_name):
            got = _raised(lambda: call(fastloss))
    assert expected is not None, "torch accepts this call: the case is wrong"
    assert type(got) is type(expected), f"torch raised {expected!r}, fastloss raised {got!r}"
    assert pattern in str(got)
    assert not launches  # raised before any kernel launch


FASTLOSS_ONLY_BAD_CALLS = [
    (lambda: fastloss.cross_entropy(X, T, z_loss=-1.0), ValueError, "z_loss"),
    (lambda: fastloss.cross_entropy(X, T, label_smoothing=-0.1), RuntimeError, "label_smoothing"),  # torch ignores it
    (lambda: fastloss.cross_entropy(X, torch.rand(4, 5), label_smoothing=-0.1), RuntimeError, "label_smoothing"),
    (lambda: fastloss.cross_entropy(X, T, label_smoothing=math.nan), RuntimeError, "label_smoothing"),  # and this
    (lambda: fastloss.cross_entropy(X, T, softcap=0.0), ValueError, "softcap"),
    (lambda: fastloss.focal_loss(X, T, gamma=-0.5), ValueError, "gamma"),
    (lambda: fastloss.focal_loss(X, torch.rand(4, 5)), RuntimeError, "class indices"),
    (lambda: fastloss.focal_loss(X, T, reduction="avg"), ValueError, "reduction"),
    (lambda: fastloss.sigmoid_focal_loss(X, torch.rand(4, 4)), ValueError, "targets"),
    (lambda: fastloss.sigmoid_focal_loss(X, torch.rand(4, 1)), ValueError, "targets"),  # no broadcast
    (lambda: fastloss.sigmoid_focal_loss(X, Y, gamma=-1.0), ValueError, "gamma"),
    (lambda: fastloss.sigmoid_focal_loss(X, Y, gamma=math.nan), ValueError, "gamma"),  # torchvision: NaN loss
    (lambda: fastloss.sigmoid_focal_loss(X, Y, reduction="avg"), ValueError, "reduction"),
    (lambda: fastloss.sigmoid_focal_loss(X, "y"), TypeError, "targets"),
    (lambda: fastloss.sigmoid_focal_loss(X, Y.long()), RuntimeError, "targets"),  # as torchvision
    (lambda: fastloss.sigmoid_focal_loss(X.long(), Y), NotImplementedError, "inputs"),
    (lambda: fastloss.sigmoid_focal_loss(X, Y, alpha=None), TypeError, "alpha"),
    # torchvision's checks and their order: alpha (in [0, 1], or negative here), shape, dtype, reduction
    (lambda: fastloss.sigmoid_focal_loss(X, Y, alpha=1.5), ValueError, "alpha"),
    (lambda: fastloss.sigmoid_focal_loss(X, Y, alpha=math.nan), ValueError, "alpha"),
    (lambda: fastloss.sigmoid_focal_loss(X, Y.long(), alpha=1.5), ValueError, "alpha"),
    (lambda: fastloss.sigmoid_focal_loss(X, torch.zeros(4, 4, dtype=torch.long)), ValueError, "shape"),
    (lambda: fastloss.sigmoid_focal_loss(X, Y.long(), reduction="avg"), RuntimeError, "floating-point"),
    (lambda: fastloss.focal_loss(X, T, gamma="2"), TypeError, "gamma"),
    (lambda: fastloss.focal_loss(X, T, ignore_index=0.0), TypeError, "ignore_index"),
    (lambda: fastloss.cross_entropy(X, T, softcap=torch.ones(2)), TypeError, "softcap"),
    # fastloss's own float arguments are parsed as torch parses its own (test_float_arguments_...)
    (lambda: fastloss.cross_entropy(X, T, z_loss=torch.tensor([0.1])), TypeError, "z_loss"),
    (lambda: fastloss.cross_entropy(X, T, softcap=np.array(30.0)), TypeError, "softcap"),
    (lambda: fastloss.focal_loss(X, T, gamma=torch.tensor(2.0, requires_grad=True)), TypeError, "gamma"),
    (lambda: fastloss.sigmoid_focal_loss(X, Y, alpha=np.array(0.25)), TypeError, "alpha"),
    # divisor divides a sum: reduction="sum" only, by a real number or a 0-dim tensor
    (lambda: fastloss.cross_entropy(X, T, divisor=4), ValueError, "reduction='sum'"),
    (lambda: fastloss.focal_loss(X, T, reduction="none", divisor=torch.tensor(4.0)), ValueError, "reduction='sum'"),
    (lambda: fastloss.cross_entropy(X, T, reduction="sum", divisor=torch.ones(1)), ValueError, "0-dim"),
    (lambda: fastloss.cross_entropy(X, T, reduction="sum", divisor="4"), TypeError, "divisor"),
    (lambda: fastloss.cross_entropy(X, T, reduction="sum", divisor=2j), TypeError, "divisor"),
    (lambda: fastloss.focal_loss(X, T, reduction="sum", divisor=torch.tensor(2j)), TypeError, "divisor"),
    (lambda: fastloss.nn.CrossEntropyLoss()(X, T, divisor=4), ValueError, "reduction='sum'"),
    (lambda: fastloss.sigmoid_focal_loss(X, Y, divisor=4), ValueError, "reduction='sum'"),  # its default: none
    (lambda: fastloss.huber_loss(X, Y, divisor=torch.tensor(4.0)), ValueError, "reduction='sum'"),
    (lambda: fastloss.smooth_l1_loss(X, Y, reduction="sum", divisor=torch.ones(2)), ValueError, "0-dim"),
    (lambda: fastloss.huber_loss(X, Y, reduction="sum", divisor="n"), TypeError, "divisor"),
    (lambda: fastloss.nn.HuberLoss()(X, Y, divisor=2), ValueError, "reduction='sum'"),
    # on the input's device or the CPU (a meta tensor stands for another GPU's here)
    (lambda: fastloss.cross_entropy(X, T, reduction="sum", divisor=torch.tensor(2.0, device="meta")), RuntimeError,
     "device"),
    (lambda: fastloss.sigmoid_focal_loss(X, Y, reduction="sum", divisor=torch.tensor(2, device="meta")), RuntimeError,
     "device"),
]


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_scalar_arguments_as_torch_takes_them(backend_name):
    """NumPy numbers and 0-d tensors stand for Python numbers, as in torch, and so does a bool
    for a float (not for an int); softcap = inf and delta = inf are their limits (no cap; 0.5 d^2
    everywhere), not inf * 0."""
    x, y, t = (v.to(_device(backend_name)) for v in (X, Y, torch.tensor([0, 1, 1, 3])))
    with fastloss.use_backend(backend_name):
        for loss in (fastloss.cross_entropy, fastloss.focal_loss):
            expected = loss(x, t, ignore_index=1)
            for ignore_index in (np.int64(1), torch.tensor(1)):
                torch.testing.assert_close(loss(x, t, ignore_index=ignore_index), expected)
            torch.testing.assert_close(loss(x, t, softcap=math.inf), loss(x, t))
        torch.testing.assert_close(fastloss.cross_entropy(x, t, label_smoothing=np.float32(0.25)),
                                   F.cross_entropy(x, t, label_smoothing=0.25))
        torch.testing.assert_close(fastloss.huber_loss(x, y, delta=torch.tensor(0.5)), F.huber_loss(x, y, delta=0.5))
        torch.testing.assert_close(fastloss.huber_loss(x, y, delta=math.inf), 0.5 * ((x - y) ** 2).mean())
        torch.testing.assert_close(fastloss.cross_entropy(x, t, label_smoothing=True),
                                   F.cross_entropy(x, t, label_smoothing=True))
        torch.testing.assert_close(fastloss.cross_entropy(x, t, label_smoothing=1.0),  # the top of its range
                                   F.cross_entropy(x, t, label_smoothing=1.0))
        torch.testing.assert_close(fastloss.smooth_l1_loss(x, y, beta=False), F.smooth_l1_loss(x, y, beta=False))
        for fn in (F.cross_entropy, fastloss.cross_entropy):
            with pytest.raises(TypeError, match="ignore_index"):
                fn(x, t, ignore_index=True)


class _FloatLike:
    def __float__(self):
        return 0.25


# (id, value) for a float argument: what torch's argument parser takes, and what it refuses
FLOAT_VALUES = [
    ("float", 0.25), ("int", 1), ("bool", True), ("float_subclass", type("F", (float,), {})(0.25)),
    ("int_too_large", 2**1100),  # OverflowError
    ("tensor_0d", torch.tensor(0.25)), ("tensor_0d_int", torch.tensor(1)), ("tensor_0d_bool", torch.tensor(True)),
    ("tensor_0d_float64", torch.tensor(0.25, dtype=torch.float64)),
    ("tensor_0d_complex", torch.tensor(0.25 + 0j)), ("tensor_0d_complex_imag", torch.tensor(0.25 + 1j)),
    ("tensor_0d_requires_grad", torch.tensor(0.25, requires_grad=True)),
    ("tensor_0d_meta", torch.tensor(0.25, device="meta")),  # torch's .item() raises RuntimeError
    ("tensor_1d_one_element", torch.tensor([0.25])), ("tensor_2d_one_element", torch.tensor([[0.25]])),
    ("numpy_float64", np.float64(0.25)), ("numpy_float32", np.float32(0.25)), ("numpy_int64", np.int64(1)),
    ("numpy_bool", np.bool_(True)), ("numpy_complex", np.complex128(0.25)),
    ("numpy_array_0d", np.array(0.25)), ("numpy_array_0d_int", np.array(1)), ("numpy_array_1d", np.array([0.25])),
    ("str", "0.25"), ("none", None), ("complex", 0.25 + 0j), ("fraction", __import__("fractions").Fraction(1, 4)),
    ("has_dunder_float", _FloatLike()),
]


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("value", [v for _, v in FLOAT_VALUES], ids=[i for i, _ in FLOAT_VALUES])
def test_float_arguments_parsed_as_torch_parses_them(value, backend_name):
    """label_smoothing, delta and beta take what torch's argument parser takes for a float: a Python
    or NumPy number, or a 0-d tensor that does not require grad; not a one-element tensor of more
    dimensions, nor a NumPy array (a 0-d one too), nor anything else with a __float__. Refused, they
    raise torch's exception type."""
    device = _device(backend_name)
    x, y, t = (v.to(device) for v in (X, Y, T))
    calls = [lambda m: m.cross_entropy(x, t, label_smoothing=value),
             lambda m: m.cross_entropy(x, torch.softmax(y, 1), label_smoothing=value),
             lambda m: m.huber_loss(x, y, delta=value),
             lambda m: m.smooth_l1_loss(x, y, beta=value)]
    for call in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NumPy's ComplexWarning, in both
            expected = _raised(lambda: call(F))
            with fastloss.use_backend(backend_name):
                got = _raised(lambda: call(fastloss))
            assert type(got) is type(expected), f"torch raised {expected!r}, fastloss raised {got!r}"
            if expected is None:
                with fastloss.use_backend(backend_name):
                    torch.testing.assert_close(call(fastloss), call(F))


def test_torch_ignores_a_negative_or_nan_label_smoothing():
    """What the README says of torch, where fastloss raises (FASTLOSS_ONLY_BAD_CALLS): it takes a
    negative or NaN label_smoothing and smooths nothing, for class indices and probabilities alike."""
    for target in (T, torch.rand(4, 5)):
        for eps in (-0.1, math.nan):
            assert torch.equal(F.cross_entropy(X, target, label_smoothing=eps), F.cross_entropy(X, target))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("call, exc, pattern", FASTLOSS_ONLY_BAD_CALLS)
def test_bad_arguments_of_extras(call, exc, pattern, backend_name, launches):
    with fastloss.use_backend(backend_name), pytest.raises(exc, match=pattern) as raised:
        call()
    assert type(raised.value) is exc  # not a subclass: torchvision's own type
    assert not launches  # raised before any kernel launch


# --------------------------------------------------------------------------------------------------
# tensors of another layout than strided (sparse, mkldnn, jagged): torch's exception, or torch's value
# --------------------------------------------------------------------------------------------------


def _torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss where torchvision is installed, else its body (alpha >= 0)."""
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        return torchvision.ops.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)
    return bench_cases.torch_sigmoid_focal(inputs, targets, alpha, gamma, reduction)


# torch's counterparts under fastloss's names; focal loss has none: cross-entropy stands for it
TORCH = types.SimpleNamespace(
    cross_entropy=F.cross_entropy, huber_loss=F.huber_loss, smooth_l1_loss=F.smooth_l1_loss,
    focal_loss=lambda input, target, weight=None: F.cross_entropy(input, target, weight),
    sigmoid_focal_loss=_torchvision_sigmoid_focal_loss,
    nn=types.SimpleNamespace(
        CrossEntropyLoss=torch.nn.CrossEntropyLoss, HuberLoss=torch.nn.HuberLoss, SmoothL1Loss=torch.nn.SmoothL1Loss,
        FocalLoss=lambda weight=None: torch.nn.CrossEntropyLoss(weight),
        SigmoidFocalLoss=lambda: _torchvision_sigmoid_focal_loss),
)

_Q = torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(5)), -1)
_Q = torch.where(_Q > 0.2, _Q, 0.0)  # class probabilities, some of them 0
_X3, _T3 = torch.randn(4, 5, 3), torch.tensor([[0, 1, 2], [3, 4, 0], [1, 1, 1], [2, 0, 4]])
_W, _EW = torch.rand(5) + 0.5, torch.rand(4, 5)
# id: (the call, on fastloss or TORCH, of input, target and weight; those three tensors, None if not taken)
LAYOUT_CASES = {
    "cross_entropy": (lambda m, x, t, w: m.cross_entropy(x, t, w), (X, T, _W)),
    "cross_entropy_spatial": (lambda m, x, t, w: m.cross_entropy(x, t, w), (_X3, _T3, _W)),
    "cross_entropy_probabilities": (lambda m, x, t, w: m.cross_entropy(x, t, w), (X, _Q, _W)),
    "cross_entropy_probabilities_none": (lambda m, x, t, w: m.cross_entropy(x, t, w, reduction="none"), (X, _Q, _W)),
    "cross_entropy_probabilities_smoothed": (lambda m, x, t, w: m.cross_entropy(x, t, label_smoothing=0.1),
                                             (X, _Q, None)),
    "focal_loss": (lambda m, x, t, w: m.focal_loss(x, t, weight=w), (X, T, _W)),
    "sigmoid_focal_loss": (lambda m, x, t, w: m.sigmoid_focal_loss(x, t, reduction="mean"), (X, _Q, None)),
    "huber_loss": (lambda m, x, t, w: m.huber_loss(x, t, weight=w), (X, Y, _EW)),
    "huber_loss_none": (lambda m, x, t, w: m.huber_loss(x, t, "none", weight=w), (X, Y, _EW)),
    "huber_loss_sum": (lambda m, x, t, w: m.huber_loss(x, t, "sum", weight=w), (X, Y, _EW)),
    "smooth_l1_loss": (lambda m, x, t, w: m.smooth_l1_loss(x, t), (X, Y, None)),
    "smooth_l1_loss_beta_0": (lambda m, x, t, w: m.smooth_l1_loss(x, t, beta=0.0), (X, Y, None)),
    "CrossEntropyLoss": (lambda m, x, t, w: m.nn.CrossEntropyLoss(w)(x, t), (X, T, _W)),
    "FocalLoss": (lambda m, x, t, w: m.nn.FocalLoss(weight=w)(x, t), (X, T, _W)),
    "SigmoidFocalLoss": (lambda m, x, t, w: m.nn.SigmoidFocalLoss()(x, t), (X, _Q, None)),
    "HuberLoss": (lambda m, x, t, w: m.nn.HuberLoss(delta=0.5)(x, t), (X, Y, None)),
    "SmoothL1Loss": (lambda m, x, t, w: m.nn.SmoothL1Loss(beta=0.0)(x, t), (X, Y, None)),
}
# layout: (makes a tensor of it, whether a tensor can be made so); jagged: below
LAYOUTS = {
    "coo": (lambda t: t.to_sparse(), lambda t: True),
    "csr": (lambda t: t.to_sparse_csr(), lambda t: t.dim() == 2),
    "csc": (lambda t: t.to_sparse_csc(), lambda t: t.dim() == 2),
    "bsr": (lambda t: t.to_sparse_bsr((2, 1)), lambda t: t.dim() == 2),
    "bsc": (lambda t: t.to_sparse_bsc((2, 1)), lambda t: t.dim() == 2),
    "mkldnn": (lambda t: t.to_mkldnn(), lambda t: t.is_floating_point() and torch.backends.mkldnn.is_available()),
}
# and jagged: every argument of the input's shape at once, with one ragged structure (one alone has
# another shape than the others: a shape error)
LAYOUT_PARAMS = [
    *(pytest.param(case, arg, layout, id=f"{case}-{('input', 'target', 'weight')[arg]}-{layout}")
      for case, (_, tensors) in LAYOUT_CASES.items() for arg, t in enumerate(tensors) if t is not None
      for layout, (_, applies) in LAYOUTS.items() if applies(t)),
    *(pytest.param(case, None, "jagged", id=f"{case}-jagged") for case in LAYOUT_CASES),
]


def _with_layout(tensors, arg, layout, device):
    """The tensors on the device, the one at ``arg`` of the layout (jagged: every one of the input's
    shape, as rows of one jagged tensor each, of one ragged structure)."""
    tensors = [None if t is None else t.to(device) for t in tensors]
    if layout != "jagged":
        return [LAYOUTS[layout][0](t) if i == arg else t for i, t in enumerate(tensors)]
    rows, columns = tensors[0].shape[:2]
    offsets = torch.arange(0, rows * columns + 1, columns, device=device)
    return [torch.nested.nested_tensor_from_jagged(t.flatten(0, 1), offsets)
            if t is not None and t.shape == tensors[0].shape else t for t in tensors]


def _outcome(call):
    """What a call returns, or raises: (value, None) or (None, exception)."""
    try:
        return call(), None
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return None, exc


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("case, arg, layout", LAYOUT_PARAMS)
def test_other_layouts_raise_or_compute_as_torch(case, arg, layout, backend_name, monkeypatch):
    """One argument of a loss or module of another layout than strided: fastloss raises the exception
    type torch raises for the same call on CPU, before any kernel launch or reference computation;
    where torch computes the loss, fastloss computes the same value (dense, where torch's reduction
    'none' returns a sparse tensor)."""
    if backend_name == "triton":
        pytest.importorskip("triton")
    call, tensors = LAYOUT_CASES[case]
    device = _device(backend_name)
    if layout == "mkldnn" and device.type != "cpu":
        pytest.skip("mkldnn tensors are CPU tensors")
    computed = []  # the reference implementations that ran
    for name in ("cross_entropy", "focal_loss", "sigmoid_focal_loss", "huber_loss", "smooth_l1_loss"):
        monkeypatch.setattr(reference, name, lambda *a, _name=name, _ref=getattr(reference, name), **k:
                            computed.append(_name) or _ref(*a, **k))
    launched = host.triton_launches(stub=False) if importlib.util.find_spec("triton") else contextlib.nullcontext({})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (sparse CSR support "in beta state", and other layouts')
        theirs, ours = _with_layout(tensors, arg, layout, "cpu"), _with_layout(tensors, arg, layout, device)
        expected, expected_exc = _outcome(lambda: call(TORCH, *theirs))
        with fastloss.use_backend(backend_name), launched as launches:
            got, exc = _outcome(lambda: call(fastloss, *ours))
    if expected_exc is not None:
        assert type(exc) is type(expected_exc), f"torch raised {expected_exc!r}, fastloss raised {exc!r}"
        assert not launches and not computed  # raised before any kernel launch or reference computation
        if layout != "jagged":  # (a jagged input's ragged classes fail a shape check first, as in torch)
            assert ("input", "target", "weight")[arg] in str(exc) and str(ours[arg].layout) in str(exc)
        return
    assert exc is None, f"torch returned {expected!r}, fastloss raised {exc!r}"
    if expected.layout is torch.jagged:  # as torch's: its L1 loss of two jagged tensors, unreduced
        assert got.layout is torch.jagged
        got, expected = got.values(), expected.values()
    assert got.layout is torch.strided
    torch.testing.assert_close(got.cpu(), expected.to_dense() if expected.layout is not torch.strided else expected)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shapes", [((4, 5), (5,)), ((1, 5), (4, 1))], ids=str)
@pytest.mark.parametrize("loss", ["huber_loss", "smooth_l1_loss"])
def test_broadcast_warns_like_torch(loss, shapes, reduction, backend_name):
    """Shapes that differ but broadcast: torch's warning, loss and gradients (each summed back to its
    tensor's shape), on either backend (the kernels take one shape; the reference broadcasts)."""
    if backend_name == "triton":
        pytest.importorskip("triton")
    kwargs = {"reduction": reduction, "delta" if loss == "huber_loss" else "beta": 0.5}
    device = _device(backend_name)

    def run(fn):
        gen = torch.Generator().manual_seed(7)
        x, y = (torch.randn(shape, generator=gen).to(device).requires_grad_() for shape in shapes)
        with pytest.warns(UserWarning, match="target size") as record:
            out = fn(x, y, **kwargs)
        out.backward(torch.randn(out.shape, generator=gen).to(device))
        return out, x.grad, y.grad, [str(w.message) for w in record]

    with fastloss.use_backend(backend_name):
        *got, messages = run(getattr(fastloss, loss))
    *expected, torch_messages = run(getattr(F, loss))
    for ours, torchs in zip(got, expected):
        torch.testing.assert_close(ours, torchs)
    # torch's words, so that a filter written for torch's warning (it matches from the start) takes it
    assert messages == torch_messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="Using a target size")
        with fastloss.use_backend(backend_name):
            getattr(fastloss, loss)(*(torch.randn(shape).to(device) for shape in shapes), **kwargs)


# --------------------------------------------------------------------------------------------------
# legacy arguments, modules
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_legacy_positional_arguments():
    # cross_entropy(input, target, weight, size_average, ignore_index, reduce, ...)
    torch.testing.assert_close(fastloss.cross_entropy(X, T, None, False), F.cross_entropy(X, T, None, False))
    torch.testing.assert_close(fastloss.cross_entropy(X, T, None, None, 1, False),
                               F.cross_entropy(X, T, None, None, 1, False))
    torch.testing.assert_close(fastloss.smooth_l1_loss(X, Y, None, False), F.smooth_l1_loss(X, Y, None, False))
    m = fnn.CrossEntropyLoss(None, False)
    assert m.reduction == "sum"
    torch.testing.assert_close(m(X, T), torch.nn.CrossEntropyLoss(None, False)(X, T))
    m = fnn.SmoothL1Loss(None, False)
    assert m.reduction == "none"
    torch.testing.assert_close(m(X, Y), torch.nn.SmoothL1Loss(None, False)(X, Y))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_elementwise_mean_is_mean_with_torchs_warning(backend_name):
    """torch still takes reduction='elementwise_mean' for 'mean', with a deprecation warning;
    torchvision's sigmoid focal loss refuses it."""
    if backend_name == "triton":
        pytest.importorskip("triton")
    x, y, t = (v.to(_device(backend_name)) for v in (X, Y, T))
    calls = [("cross_entropy", (x, t)), ("huber_loss", (x, y)), ("smooth_l1_loss", (x, y))]
    with fastloss.use_backend(backend_name):
        for name, args in calls:
            with pytest.warns(UserWarning, match="elementwise_mean"):
                ours = getattr(fastloss, name)(*args, reduction="elementwise_mean")
            torch.testing.assert_close(ours, getattr(F, name)(*args, reduction="mean"))
        with pytest.warns(UserWarning, match="elementwise_mean"):
            ours = fnn.CrossEntropyLoss(reduction="elementwise_mean")(x, t)
        torch.testing.assert_close(ours, F.cross_entropy(x, t))
        with pytest.warns(UserWarning, match="elementwise_mean"):
            torch.testing.assert_close(fastloss.focal_loss(x, t, 0.0, reduction="elementwise_mean"),
                                       F.cross_entropy(x, t))
        with pytest.raises(ValueError, match="reduction"):
            fastloss.sigmoid_focal_loss(x, y.sigmoid(), reduction="elementwise_mean")


MODULES = [
    (fnn.CrossEntropyLoss(weight=torch.rand(5), ignore_index=1, label_smoothing=0.1),
     torch.nn.CrossEntropyLoss(weight=torch.rand(5), ignore_index=1, label_smoothing=0.1), T),
    (fnn.HuberLoss(reduction="sum", delta=0.5), torch.nn.HuberLoss(reduction="sum", delta=0.5), Y),
    (fnn.SmoothL1Loss(reduction="none", beta=0.3), torch.nn.SmoothL1Loss(reduction="none", beta=0.3), Y),
]


@pytest.mark.parametrize("ours, theirs, target", MODULES, ids=["ce", "huber", "smooth_l1"])
def test_modules_match_torch(ours, theirs, target):
    if hasattr(theirs, "weight") and theirs.weight is not None:
        ours.weight.copy_(theirs.weight)
        assert "weight" in dict(ours.named_buffers())
    torch.testing.assert_close(ours(X, target), theirs(X, target))


def test_tensor_subclasses_and_fx_tracing_take_the_call_over_as_in_torch():
    """torch's losses let ``__torch_function__`` take a call over: a tensor subclass keeps its type
    through them, and torch.fx.symbolic_trace records the call as one node. fastloss's do the same
    (symbolic tracing used to fail on the argument checks, which a Proxy is not a tensor for)."""
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 4])

    class Marked(torch.Tensor):
        pass

    assert type(F.cross_entropy(x.as_subclass(Marked), t)) is Marked
    cases = [(fastloss.nn.CrossEntropyLoss(label_smoothing=0.1), (x, t), fastloss.cross_entropy),
             (fastloss.nn.FocalLoss(gamma=1.0), (x, t), fastloss.focal_loss),
             (fastloss.nn.SigmoidFocalLoss(), (x, x.sigmoid()), fastloss.sigmoid_focal_loss),
             (fastloss.nn.HuberLoss(delta=0.5), (x, x.flip(0)), fastloss.huber_loss),
             (fastloss.nn.SmoothL1Loss(beta=0.5), (x, x.flip(0)), fastloss.smooth_l1_loss)]
    for module, args, fn in cases:
        assert type(fn(*[a.as_subclass(Marked) for a in args])) is Marked
        traced = torch.fx.symbolic_trace(module)
        assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [fn]
        assert torch.equal(traced(*args), module(*args))


def test_module_arguments_refused_where_torch_refuses_them():
    """torch's HuberLoss checks its delta's type when it is built (torch 2.13; 2.11 takes anything
    there and fails at the call); fastloss's module does the same, with any torch."""
    for delta in ("a", None, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="delta must be a float or int"):
            fastloss.nn.HuberLoss(delta=delta)
    for delta in (2, 0.5):
        assert fastloss.nn.HuberLoss(delta=delta).delta == torch.nn.HuberLoss(delta=delta).delta == delta


def test_focal_modules():
    fm = fnn.FocalLoss(gamma=0.0, ignore_index=2)
    torch.testing.assert_close(fm(X, T), F.cross_entropy(X, T, ignore_index=2))
    sm = fnn.SigmoidFocalLoss(alpha=-1, gamma=0.0, reduction="mean")
    t = torch.rand(4, 5)
    torch.testing.assert_close(sm(X, t), F.binary_cross_entropy_with_logits(X, t))
    assert fnn.SigmoidFocalLoss().reduction == "none"


def test_extras_reach_the_function():
    m = fnn.CrossEntropyLoss(z_loss=1e-2, softcap=3.0)
    expected = fastloss.cross_entropy(X, T, z_loss=1e-2, softcap=3.0)
    torch.testing.assert_close(m(X, T), expected)
    assert not torch.allclose(expected, fastloss.cross_entropy(X, T))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_every_module_takes_a_divisor_in_forward(backend_name):
    """``module(input, target, divisor=d)`` with reduction "sum": the summed loss divided by d, the
    loss's own division's value (torch's ``sum / d``), for each module."""
    device = _device(backend_name)
    x, t, y = X.to(device), T.to(device), Y.to(device)
    d = torch.tensor(3, device=device)
    cases = [(fnn.CrossEntropyLoss(reduction="sum"), t, F.cross_entropy),
             (fnn.FocalLoss(gamma=0.0, reduction="sum"), t, F.cross_entropy),
             (fnn.SigmoidFocalLoss(alpha=-1, gamma=0.0, reduction="sum"), y.sigmoid(),
              F.binary_cross_entropy_with_logits),
             (fnn.HuberLoss(reduction="sum", delta=0.5), y, functools.partial(F.huber_loss, delta=0.5)),
             (fnn.SmoothL1Loss(reduction="sum", beta=0.5), y, functools.partial(F.smooth_l1_loss, beta=0.5))]
    with fastloss.use_backend(backend_name):
        for module, target, torch_fn in cases:
            torch.testing.assert_close(module(x, target, divisor=d), torch_fn(x, target, reduction="sum") / d)


_BF, _P = torch.bfloat16, torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(3)), -1)
# Mixed dtypes, as torch has them: huber_loss keeps the input's dtype (promoted with the weight's, not
# the target's), smooth_l1_loss and probability targets promote, integer and bool targets are taken,
# and class-index cross-entropy wants the weight in the input's dtype (any float under autocast).
MIXED_DTYPES = [
    ("huber bf16 fp32", "huber_loss", lambda: (X.to(_BF), Y), {}),
    ("huber fp32 fp64", "huber_loss", lambda: (X, Y.double()), {}),
    ("huber fp32 int", "huber_loss", lambda: (X, Y.long()), {}),
    ("huber bf16 bool, weight fp32", "huber_loss", lambda: (X.to(_BF), Y > 0), {"weight": Y.abs()}),
    ("huber fp32, weight fp64", "huber_loss", lambda: (X, Y), {"weight": Y.abs().double()}),
    ("smooth_l1 bf16 fp32", "smooth_l1_loss", lambda: (X.to(_BF), Y), {}),
    ("smooth_l1 fp32 int", "smooth_l1_loss", lambda: (X, Y.long()), {"beta": 0.0}),
    ("smooth_l1 int bf16", "smooth_l1_loss", lambda: ((3 * X).long(), Y.to(_BF)), {}),
    ("smooth_l1 bool fp32", "smooth_l1_loss", lambda: (X > 0, Y), {"reduction": "none"}),
    ("l1 int fp64", "smooth_l1_loss", lambda: ((3 * X).long(), Y.double()), {"beta": 0.0}),
    ("huber int fp32", "huber_loss", lambda: ((3 * X).long(), Y), {}),  # torch refuses it
    ("ce probabilities bf16 fp32", "cross_entropy", lambda: (X.to(_BF), _P), {}),
    ("ce probabilities fp32 fp64", "cross_entropy", lambda: (X, _P.double()), {"label_smoothing": 0.1}),
    ("ce probabilities bf16 bf16, weight fp32", "cross_entropy", lambda: (X.to(_BF), _P.to(_BF)),
     {"weight": torch.rand(5) + 0.5}),
    ("ce weight bf16", "cross_entropy", lambda: (X, T), {"weight": torch.rand(5).to(_BF)}),
    ("ce bf16 weight fp32", "cross_entropy", lambda: (X.to(_BF), T), {"weight": torch.rand(5)}),
    ("ce fp64 weight fp32", "cross_entropy", lambda: (X.double(), T), {"weight": torch.rand(5)}),
    ("ce weight int", "cross_entropy", lambda: (X, T), {"weight": torch.arange(1, 6)}),
    ("ce probabilities, weight int", "cross_entropy", lambda: (X, _P), {"weight": torch.arange(1, 6)}),
    ("huber bf16, weight int", "huber_loss", lambda: (X.to(_BF), Y.to(_BF)), {"weight": torch.arange(20).view(4, 5)}),
]


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("name, loss, make, kwargs", MIXED_DTYPES, ids=[c[0] for c in MIXED_DTYPES])
def test_mixed_dtypes_as_torch_has_them(name, loss, make, kwargs, backend_name):
    if backend_name == "triton":
        pytest.importorskip("triton")
    device = _device(backend_name)
    args = [a.to(device) for a in make()]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    try:
        expected = getattr(F, loss)(*args, **kwargs)
    except RuntimeError as err:
        with fastloss.use_backend(backend_name), pytest.raises(type(err)):
            getattr(fastloss, loss)(*args, **kwargs)
        return
    with fastloss.use_backend(backend_name):
        ours = getattr(fastloss, loss)(*args, **kwargs)
    assert ours.dtype == expected.dtype
    torch.testing.assert_close(ours, expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", ["huber_loss", "smooth_l1_loss"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.bfloat16)], ids=lambda d: f"{d[0]}-{d[1]}"[6:])
def test_gradients_of_mixed_dtypes(dtypes, loss, reduction, backend_name):
    """An input and a target of different float dtypes: torch's huber_loss takes them forward and its
    backward raises (torch 2.13: "Found dtype Half but expected Float"; smooth_l1_loss's works). Here
    both give each gradient as float64's, rounded to its tensor's dtype."""
    if backend_name == "triton":
        pytest.importorskip("triton")
    device = _device(backend_name)
    x, y = X.to(device, dtypes[0], copy=True).requires_grad_(), Y.to(device, dtypes[1], copy=True).requires_grad_()
    with fastloss.use_backend(backend_name):
        out = getattr(fastloss, loss)(x, y, reduction=reduction)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device, out.dtype)
    out.backward(grad_output)
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    getattr(F, loss)(x64, y64, reduction=reduction).backward(grad_output.double())
    assert (x.grad.dtype, y.grad.dtype) == dtypes
    for ours, exact in ((x.grad, x64.grad), (y.grad, y64.grad)):
        torch.testing.assert_close(ours, exact.to(ours.dtype), rtol=2 * torch.finfo(ours.dtype).eps, atol=1e-6)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.bool], ids=str)
def test_huber_of_an_integer_target_has_a_backward(target_dtype, backend_name):
    """torch's huber_loss takes an integer or bool target forward and its backward raises ("Found
    dtype Long but expected Float", torch 2.13); here the input's gradient is the float target's."""
    if backend_name == "triton":
        pytest.importorskip("triton")
    device = _device(backend_name)
    y = (3 * Y).round().to(device, target_dtype)
    grads = []
    for target in (y, y.float()):
        x = X.to(device, copy=True).requires_grad_()
        with fastloss.use_backend(backend_name):
            fastloss.huber_loss(x, target, reduction="sum", delta=0.5).backward()
        grads.append(x.grad)
    torch.testing.assert_close(*grads, rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_classes_where_every_row_is_ignored(reduction, backend_name):
    """C = 0 is a degenerate input: a counted row raises IndexError (BAD_CALLS), and where every row
    is ignored the result is torch's (mean: 0/0 = nan), with an empty gradient. Label smoothing
    makes it NaN for every reduction, as in torch, which multiplies the smoothing term by eps / C =
    inf, even over no rows; focal loss is CE's. With probability targets every row counts, and the
    mean is torch's NaN too (eps / C = inf reaches no element there)."""
    device = _device(backend_name)
    t = torch.full((3,), -100, device=device)
    empty = torch.zeros(3, 0, device=device)
    with fastloss.use_backend(backend_name):
        for loss, kw, torch_kw in [(fastloss.cross_entropy, {}, {}),
                                   (fastloss.cross_entropy, {"weight": torch.ones(0, device=device)}, None),
                                   (fastloss.cross_entropy, {"label_smoothing": 0.2}, None),
                                   (fastloss.cross_entropy, {"label_smoothing": 0.2, "z_loss": 0.1},
                                    {"label_smoothing": 0.2}),  # z-loss adds 0: no row counts
                                   (fastloss.focal_loss, {}, {})]:
            expected = F.cross_entropy(empty, t, reduction=reduction, **(kw if torch_kw is None else torch_kw))
            x = empty.clone().requires_grad_()
            out = loss(x, t, reduction=reduction, **kw)
            torch.testing.assert_close(out, expected, equal_nan=True)
            out.sum().backward()
            assert x.grad.shape == x.shape
        # probability targets: every row counts, but torch's mean divides by numel / C = 0 / 0
        for kw in ({}, {"label_smoothing": 0.2}):
            expected = F.cross_entropy(empty, empty, reduction=reduction, **kw)
            torch.testing.assert_close(fastloss.cross_entropy(empty, empty, reduction=reduction, **kw), expected,
                                       equal_nan=True)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(3, 5), (5,), (2, 5, 3)], ids=str)
def test_label_smoothed_mean_over_rows_of_weight_0_is_nan_as_in_torch(shape, backend_name):
    """Where every counted row's class weighs 0, the mean's denominator is 0: torch divides the
    class term's sum (0) and the smoothing term's sum by it apart, and the loss is NaN (0/0), not the
    smoothing term's inf; its gradient is NaN in both. With some weight counted it is torch's value."""
    device = _device(backend_name)
    x = torch.randn(shape, device=device)
    t = torch.zeros(shape[:1] + shape[2:] if len(shape) > 1 else (), dtype=torch.long, device=device)
    weight = torch.rand(5, device=device) + 0.5
    for w0 in (0.0, 0.5):
        weight[0] = w0
        expected = F.cross_entropy(x, t, weight=weight, label_smoothing=0.2)
        xg = x.clone().requires_grad_()
        with fastloss.use_backend(backend_name):
            out = fastloss.cross_entropy(xg, t, weight=weight, label_smoothing=0.2)
        torch.testing.assert_close(out, expected, equal_nan=True)
        out.backward()
        x_torch = x.clone().requires_grad_()
        F.cross_entropy(x_torch, t, weight=weight, label_smoothing=0.2).backward()
        torch.testing.assert_close(xg.grad, x_torch.grad, equal_nan=True)
    assert out.isfinite() and expected.isfinite()  # (the weighted case, last)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(3, 0), (2, 0, 0, 3), (0, 0), (0,)], ids=str)
def test_no_classes_with_label_smoothing_is_nan_as_in_torch(shape, reduction, backend_name):
    """The label-smoothed loss over no classes is torch's NaN (eps / C = inf times the smoothing
    term, 0), for every reduction and also over no rows, where a sum is of nothing; the result of
    'none' has torch's shape. (Both backends: such an input has no elements, which the reference takes.)"""
    device = _device(backend_name)
    t = torch.full(shape[:1] + shape[2:] if len(shape) > 1 else (), -100, device=device)
    for kw in ({"label_smoothing": 0.1}, {"label_smoothing": 1.0, "weight": torch.ones(0, device=device)}):
        expected = F.cross_entropy(torch.zeros(shape, device=device), t, reduction=reduction, **kw)
        x = torch.zeros(shape, device=device, requires_grad=True)
        with fastloss.use_backend(backend_name):
            out = fastloss.cross_entropy(x, t, reduction=reduction, **kw)
        torch.testing.assert_close(out, expected, equal_nan=True)
        if reduction != "none" or out.numel():
            assert out.isnan().all()
        out.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend_name", ["auto", "reference", "triton"])
def test_meta_tensors_give_meta_results(backend_name):
    """Meta tensors (no data) give torch's meta result, of its shape and dtype: bf16 ones too, whose
    dtype asks about autocast, which torch has none of for the meta device, and class-index targets,
    whose range (a value) is not checked, as torch does not check it there. (The triton backend runs
    the reference for them: no kernel can read a tensor with no data.)"""
    bf16 = torch.empty(3, 4, device="meta", dtype=torch.bfloat16)
    logits = torch.empty(4, 5, device="meta")
    classes = torch.tensor([0, 1, 2, 4], device="meta")
    calls = [
        lambda m, r: m.huber_loss(bf16, bf16, reduction=r),
        lambda m, r: m.huber_loss(bf16, bf16, reduction=r, weight=bf16),
        lambda m, r: m.smooth_l1_loss(bf16, bf16, reduction=r),
        lambda m, r: m.cross_entropy(logits, classes, reduction=r),
        lambda m, r: m.cross_entropy(logits, torch.tensor([0, -100, 9, 1], device="meta"), reduction=r,
                                     label_smoothing=0.1, weight=torch.ones(5, device="meta")),
        lambda m, r: m.cross_entropy(torch.empty(2, 5, 3, device="meta", dtype=torch.bfloat16),
                                     torch.zeros(2, 3, dtype=torch.long, device="meta"), reduction=r),
        lambda m, r: m.cross_entropy(bf16, bf16, reduction=r),  # probabilities
    ]
    # torch has no softmax focal loss (focal's shapes and dtypes are CE's) nor torchvision here
    # (sigmoid focal's are the inputs', reduced)
    theirs = {"focal_loss": lambda r: F.cross_entropy(logits, classes, reduction=r),
              "sigmoid_focal_loss": lambda r: F.binary_cross_entropy_with_logits(bf16, bf16, reduction=r)}
    ours = {"focal_loss": lambda r: fastloss.focal_loss(logits, classes, reduction=r),
            "sigmoid_focal_loss": lambda r: fastloss.sigmoid_focal_loss(bf16, bf16, reduction=r)}
    for autocast in (False, True):  # autocast is on for the CPU, but the meta device has none
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for reduction in ("none", "mean", "sum"):
                pairs = [(lambda r, c=c: c(F, r), lambda r, c=c: c(fastloss, r)) for c in calls]
                pairs += [(theirs[k], ours[k]) for k in theirs]
                for expected_call, call in pairs:
                    expected = expected_call(reduction)
                    with fastloss.use_backend(backend_name):
                        got = call(reduction)
                    assert (got.device, got.shape, got.dtype) == (expected.device, expected.shape, expected.dtype)
    x = torch.empty(4, 5, device="meta", requires_grad=True)
    with fastloss.use_backend(backend_name):
        fastloss.cross_entropy(x, classes, label_smoothing=0.1).backward()
    assert x.grad.is_meta and x.grad.shape == x.shape


# The modules, as TRANSFORMED has the functions: built inside FakeTensorMode (as a memory estimator
# builds a model), so that the class weights are fake tensors too
FAKE_MODULES = {
    "CrossEntropyLoss": (lambda x, t: fnn.CrossEntropyLoss(weight=torch.rand(7, device=x.device, dtype=x.dtype),
                                                           label_smoothing=0.1)(x, t),
                         lambda x, t: torch.nn.CrossEntropyLoss(weight=torch.rand(7, device=x.device, dtype=x.dtype),
                                                                label_smoothing=0.1)(x, t), "class"),
    "FocalLoss": (lambda x, t: fnn.FocalLoss(reduction="none")(x, t),
                  lambda x, t: torch.nn.CrossEntropyLoss(reduction="none")(x, t), "class"),
    "SigmoidFocalLoss": (lambda x, t: fnn.SigmoidFocalLoss()(x, t),
                         lambda x, t: torch.nn.BCEWithLogitsLoss(reduction="none")(x, t), "real"),
    "HuberLoss": (lambda x, t: fnn.HuberLoss(delta=0.5)(x, t),
                  lambda x, t: torch.nn.HuberLoss(delta=0.5)(x, t), "real"),
    "SmoothL1Loss": (lambda x, t: fnn.SmoothL1Loss(reduction="sum")(x, t),
                     lambda x, t: torch.nn.SmoothL1Loss(reduction="sum")(x, t), "real"),
}
# (backend, device): the kernels' path on fake CUDA tensors is auto's on a GPU
FAKE_BACKENDS = [pytest.param(b, d, id=f"{b}-{d}") for b, d in
                 [("reference", "cpu"), ("triton", _device("triton").type), ("auto", "cuda")]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend_name, device", FAKE_BACKENDS)
@pytest.mark.parametrize("name", [*TRANSFORMED, *FAKE_MODULES])
def test_fake_tensors_give_torchs_shapes_and_dtypes(name, backend_name, device, dtype):
    """Under FakeTensorMode (shapes and dtypes, no values: memory estimators and shape propagation
    use it outside torch.compile too) every loss gives what torch's gives: a fake result of its
    device, shape and dtype, and a fake gradient of its gradient's. No check reads a value (the class
    range, as for meta tensors) and no kernel runs: on the kernels' path the ops' fake
    implementations give the outputs. (A CPU-only build of torch aborts the process on autograd
    through a fake CUDA tensor, its own losses' too, so there only the forward is checked.)"""
    if backend_name == "triton":
        pytest.importorskip("triton")
    ours, theirs, kind = {**TRANSFORMED, **FAKE_MODULES}[name]
    grad = device != "cuda" or torch.cuda.is_available()
    with FakeTensorMode():
        x = torch.randn(4, 7, 3, device=device, dtype=dtype, requires_grad=grad)
        t = (torch.randint(0, 7, (4, 3), device=device) if kind == "class"
             else torch.rand(4, 7, 3, device=device, dtype=dtype))
        expected = theirs(x, t)
        with fastloss.use_backend(backend_name):
            got = ours(x, t)
        assert is_fake(got)
        assert (got.device, got.shape, got.dtype) == (expected.device, expected.shape, expected.dtype)
        if grad:
            (expected_grad,) = torch.autograd.grad(expected.sum(), x)
            got.sum().backward()
            assert is_fake(x.grad)
            assert (x.grad.device, x.grad.shape, x.grad.dtype) == (expected_grad.device, expected_grad.shape,
                                                                    expected_grad.dtype)


@pytest.fixture(scope="module")
def mesh():
    """A device mesh of one process (a store in memory, no network), for DTensors: on a GPU's, so
    that auto would take them to the kernels there, were they not routed to the reference."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed for DTensors")
    from torch.distributed.device_mesh import init_device_mesh

    cuda = torch.cuda.is_available()
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cuda" if cuda else "cpu", (1,))
    finally:
        dist.destroy_process_group()


# TRANSFORMED's losses, but a class weight, a plain tensor, cannot meet a DTensor
DTENSOR_LOSSES = {**TRANSFORMED, "cross_entropy": (
    lambda x, t: fastloss.cross_entropy(x, t, ignore_index=2, label_smoothing=0.1),
    lambda x, t: F.cross_entropy(x, t, ignore_index=2, label_smoothing=0.1), "class")}


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
@pytest.mark.parametrize("name", DTENSOR_LOSSES)
def test_dtensors_take_the_reference_and_give_torchs_results(name, backend_name, mesh):
    """A DTensor (tensor parallelism's logits, say) has no memory of its own for a kernel to read:
    the kernels' path raised "invalid python storage". Like every subclass that implements its ops
    in Python, it takes the reference, whose torch ops give torch's DTensor result and gradient, and
    torch's error (RuntimeError: "got mixed torch.Tensor and DTensor") beside a plain tensor."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    if backend_name == "triton":
        pytest.importorskip("triton")
    ours, theirs, kind = DTENSOR_LOSSES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 3, generator=g)
    t = torch.randint(0, 7, (4, 3), generator=g) if kind == "class" else torch.rand(4, 7, 3, generator=g)
    dx, dt = (distribute_tensor(v.to(mesh.device_type), mesh, [Replicate()]) for v in (x, t))
    dx.requires_grad_()
    expected = theirs(dx, dt)
    (expected_grad,) = torch.autograd.grad(expected, dx)
    with fastloss.use_backend(backend_name):
        got = ours(dx, dt)
        (got_grad,) = torch.autograd.grad(got, dx)
        for plain in ({"target": dt.full_tensor()}, {"input": dx.detach().full_tensor()}):
            args = (plain.get("input", dx), plain.get("target", dt))
            with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
                ours(*args)
    assert type(got) is type(expected) and type(got_grad) is type(expected_grad)
    torch.testing.assert_close(got.full_tensor(), expected.full_tensor())
    torch.testing.assert_close(got_grad.full_tensor(), expected_grad.full_tensor())


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_dtensors_compile_with_fullgraph(backend_name, mesh):
    """While torch.compile traces, a DTensor is told by its class (Dynamo answers no to asking a
    traced tensor for ``__tensor_flatten__``): it took the kernels' path and failed to trace."""
    from torch.distributed.tensor import Shard, distribute_tensor

    if backend_name == "triton":
        pytest.importorskip("triton")
    x, t = torch.randn(8, 5), torch.randint(0, 5, (8,))
    dx, dt = (distribute_tensor(v.to(mesh.device_type), mesh, [Shard(0)]) for v in (x, t))
    dx.requires_grad_()
    with fastloss.use_backend(backend_name):
        got = torch.compile(fastloss.cross_entropy, fullgraph=True, backend="aot_eager")(dx, dt)
        (grad,) = torch.autograd.grad(got, dx)
    xg = x.requires_grad_()
    expected = F.cross_entropy(xg, t)
    expected.backward()
    torch.testing.assert_close(got.full_tensor().cpu(), expected)
    torch.testing.assert_close(grad.full_tensor().cpu(), xg.grad)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unbatched_input_takes_a_one_element_target(reduction, backend_name):
    """torch's forward takes a (1,) target for a (C,) input, as if 0-d (its backward then fails on
    the shapes): here both work, and give the 0-d target's loss and gradient."""
    device = _device(backend_name)
    x = torch.randn(7, device=device)
    assert F.cross_entropy(x, torch.tensor([3], device=device), reduction=reduction).shape == ()
    for loss, kwargs in [(fastloss.cross_entropy, {"label_smoothing": 0.1}), (fastloss.focal_loss, {})]:
        results = []
        for t in [torch.tensor(3, device=device), torch.tensor([3], device=device)]:
            xg = x.clone().requires_grad_()
            with fastloss.use_backend(backend_name):
                out = loss(xg, t, reduction=reduction, **kwargs)
            out.backward()
            assert out.shape == ()
            results.append((out, xg.grad))
        torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
        if loss is fastloss.cross_entropy:
            expected = F.cross_entropy(x, torch.tensor(3, device=device), reduction=reduction, **kwargs)
            torch.testing.assert_close(results[0][0], expected)


def test_autocast_takes_a_float_weight_of_any_precision():
    """Under autocast torch computes the loss in fp32, so bf16 logits with fp32 weights (or the reverse)
    are fine, as they are not outside it."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x, w in ((X.to(_BF), torch.rand(5)), (X, torch.rand(5).to(_BF))):
            expected = F.cross_entropy(x, T, weight=w)
            ours = fastloss.cross_entropy(x, T, weight=w)
            assert ours.dtype == expected.dtype == torch.float32
            torch.testing.assert_close(ours, expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_class_weight_that_requires_grad_gets_its_gradient(reduction, backend_name):
    """torch's cross_entropy refuses a class weight that requires grad with class indices (its
    nll_loss is not differentiable there); fastloss takes the reference and differentiates it, as
    torch does for probability targets: the loss is sum_i w_yi l_i, over sum_i w_yi for the mean."""
    device = _device(backend_name)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen).to(device)
    t = torch.tensor([0, 4, 2, 2, -100, 1], device=device)
    w = (torch.rand(5, generator=gen) + 0.5).to(device).requires_grad_()
    go = torch.randn(() if reduction != "none" else (6,), generator=gen).to(device)
    with pytest.raises(RuntimeError, match="not differentiable"):
        F.cross_entropy(x, t, weight=w)
    with fastloss.use_backend(backend_name):
        fastloss.cross_entropy(x, t, weight=w, reduction=reduction).backward(go)
    w64 = w.detach().double().requires_grad_()
    counted = t != -100
    terms = torch.where(counted, w64[t.clamp(min=0)] * F.cross_entropy(x.double(), t, reduction="none"), 0)
    expected = {"none": terms, "sum": terms.sum(), "mean": terms.sum() / w64[t[counted]].sum()}[reduction]
    expected.backward(go.double())
    torch.testing.assert_close(w.grad, w64.grad.float())
