"""``python -m bench.host``: what one fastloss training step asks of the host.

A short step is bound by the host, not the GPU (bench/NOTES.md, "the host is the limit for short
steps"): every torch op and every Triton launch costs host time whatever its size. For each loss of
the headline table, at ``mean`` reduction, this counts per forward + ``loss.backward()`` step

- the aten ops dispatched (forward and backward, autograd's ``ones_like`` included) and the ones
  among them that launch a GPU kernel (allocations and views launch none);
- the Triton kernel launches;

and times the step's host path:

- on a GPU: the time to *issue* one step (no synchronization inside the timed loop), which is what
  the GPU waits for when the step is short;
- on a CPU: the time of the step with the Triton launches replaced by no-ops (the interpreter would
  otherwise run the kernels), so it times fastloss's Python and the aten ops around the launches;
  with ``--launch-path``, the launches run for real (the kernels compiled for an H100 by Triton's
  ptxas) up to the driver call, which alone is stubbed: a variant's first launch through Triton's
  launch path (the binder, the cache key, the checks), the next ones through fastloss's direct call
  of the compiled kernel (``common.launch``). The default mode hides what a launch costs.

Beside it, the same step through eager torch (the benchmark's ``torch`` provider) on the same
inputs: its host time is what a fused loss must not exceed by much, or a short step loses to torch
however fast the kernel. (On a CPU the shapes are tiny, so torch's step is host time too.)

It splits fastloss's time at its two main Triton launches, the loss kernel and the backward's scale
(medians over the reps): before the loss kernel's launch (a cross-entropy mean's prologue launch,
which counts the rows on the device, included), inside it (Triton's Python and the driver call),
between the two launches (the loss's sum, a launch for a 16-bit loss, autograd, ``loss.backward()``
up to the scale), inside the scale's launch, and after it. Where the step is short the GPU waits
for "before" and, beyond the loss kernel's time, for "between".
It then times the parts on their own: a small aten op, a 0-dim cast, an allocation and an
autograd.Function that launches nothing, and on a GPU (or with ``--launch-path``) a launch of a
compiled kernel through Triton's ``kernel[grid](...)`` and through fastloss's ``launch``, and
fastloss's launcher of the same kernel; on a GPU, a device context.

``--direct-ab`` prints instead each step's host time with fastloss's direct launches off (every
launch through Triton's launch path) and on, alternating in blocks in one process: what
``common.launch`` gains, measured so that the machine's drift falls on both alike.

The counts are the same on both machines; the times are only comparable on one machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import statistics
import sys
import time
import types
from unittest import mock

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import fastloss
import fastloss.backend as backend
import fastloss.functional as functional

from . import cases as bench_cases
from . import harness, report

# Aten ops that only allocate memory or change metadata: no kernel launch on a GPU.
NO_LAUNCH = ("empty", "empty_like", "empty_strided", "new_empty", "promote_types", "view", "_unsafe_view", "reshape", "alias", "detach",
             "t", "expand", "as_strided", "unsqueeze", "squeeze", "select", "slice", "lift_fresh")

ROWS = 8192
# The launches that a step may add around the loss kernel: a cross-entropy mean's prologue (before it)
# and a 16-bit loss's sum (after it). The step's split counts them in "before" and "between".
HELPERS = ("_prologue_kernel", "_sum_kernel")


def steps(device: torch.device, vocab: int, n: int, rows: int = ROWS) -> dict:
    """name -> (inputs, fn): the headline losses at mean reduction, fwd + bwd."""
    def logits(dtype):
        return torch.randn(rows, vocab, device=device, dtype=dtype, requires_grad=True)

    def flat(dtype):
        return torch.randn(n, device=device, dtype=dtype, requires_grad=True)

    target = torch.randint(0, vocab, (rows,), device=device)
    labels = (torch.rand(n // 80, 80, device=device) < 0.1)
    out = {}
    for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[f"ce {dt}"] = ((logits(dtype), target), fastloss.cross_entropy)
        out[f"focal {dt}"] = ((logits(dtype), target), fastloss.focal_loss)
        out[f"sigmoid_focal {dt}"] = (
            (torch.randn(n // 80, 80, device=device, dtype=dtype, requires_grad=True), labels.to(dtype)),
            lambda x, t: fastloss.sigmoid_focal_loss(x, t, reduction="mean"))
        out[f"huber {dt}"] = ((flat(dtype), flat(dtype).detach()), fastloss.huber_loss)
    return out


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active, by name (``ops``)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _Launches(collections.Counter):
    """Triton launches by kernel name, and the (name, enter, exit) of the latest ones."""

    def __init__(self):
        super().__init__()
        self.spans: list[tuple[str, float, float]] = []

    def clear(self):
        super().clear()
        self.spans.clear()


@contextlib.contextmanager
def triton_launches(stub: bool):
    """Counts and times Triton launches (compiled or interpreted); with ``stub`` they do nothing.

    A launch goes through ``JITFunction.run`` (Triton's launch path: a variant's first launch, the
    interpreter's), or calls the compiled kernel (``CompiledKernel[grid](...)``, fastloss's later
    launches, see ``common.launch``); both are counted, and each span is what Triton does."""
    import triton.compiler.compiler as compiler

    count = _Launches()
    entries = launch_entry_points()
    saved = {entry: getattr(*entry) for entry in entries}
    saved_getitem = compiler.CompiledKernel.__getitem__

    def timed(name, fn, *args, **kwargs):
        count[name] += 1
        t0 = time.perf_counter()
        out = None if stub else fn(*args, **kwargs)
        count.spans.append((name, t0, time.perf_counter()))
        return out

    def wrap(original):
        def run(self, *args, **kwargs):
            return timed(getattr(self, "__name__", None) or self.fn.__name__, original, self, *args, **kwargs)
        return run

    def getitem(self, grid):
        runner = saved_getitem(self, grid)
        return lambda *args, **kwargs: timed(self.name, runner, *args, **kwargs)

    for (cls, name), original in saved.items():
        setattr(cls, name, wrap(original))
    compiler.CompiledKernel.__getitem__ = getitem
    try:
        yield count
    finally:
        for (cls, name), original in saved.items():
            setattr(cls, name, original)
        compiler.CompiledKernel.__getitem__ = saved_getitem


def launch_entry_points() -> list[tuple[type, str]]:
    """(class, method) of every Triton launch through Triton's own path, whose ``self`` has the
    kernel's ``__name__`` or its ``fn``, and which takes the launch options by name:
    ``JITFunction.run``, and the interpreter's ``InterpretedFunction.run`` (Triton 3.6 and later) or
    ``GridExecutor.__call__`` (``kernel[grid]`` of an interpreted kernel before 3.6)."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    interpreted = interpreter.InterpretedFunction
    return [(jit.JITFunction, "run"),
            (interpreted, "run") if hasattr(interpreted, "run") else (interpreter.GridExecutor, "__call__")]


def torch_fn(name: str):
    """The same loss in eager torch (the benchmark's ``torch`` provider), for case ``name``."""
    return bench_cases.TORCH_FNS[name.split()[0]]


def one_step(inputs, fn) -> None:
    inputs[0].grad = None
    fn(*inputs).backward()


class _NoLaunchDriver:
    """Stands in for Triton's CUDA driver on a machine without a GPU (``--launch-path``): kernels
    compile for an H100 (sm_90) with Triton's own ptxas, and a launch runs all of Triton's launch path
    up to the driver call, which does nothing. It implements what Triton's launch path asks of a
    driver (checked with triton 3.2 to 3.9), nothing more."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        from fastloss.kernels.common import TRITON_RELEASE

        self.target = GPUTarget("cuda", 90, 32)
        # module, function, registers, spills and (since Triton 3.4) the most threads a block
        binary = (1, 1, 0, 0, 1024)[:5 if TRITON_RELEASE >= (3, 4) else 4]
        self.utils = types.SimpleNamespace(
            load_binary=lambda name, kernel, shared, device: binary,
            get_device_properties=lambda device: {"max_shared_mem": 232448, "multiprocessor_count": 132,
                                                  "max_num_regs": 65536, "warpSize": 32})

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    @staticmethod
    def launcher_cls(src, metadata):
        return lambda *args: None  # the driver call


def use_launch_path() -> None:
    """For the rest of the process: Triton's launch path for real on a CPU, the driver call stubbed
    (see ``_NoLaunchDriver``), and the triton backend taking CPU tensors (it takes them only under the
    interpreter otherwise). The kernels must not have been defined under the interpreter yet."""
    if "fastloss.kernels.common" in sys.modules and sys.modules["fastloss.kernels.common"].interpreting():
        raise RuntimeError("--launch-path needs a fresh process without TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # read when the kernels are defined
    from triton.runtime import driver

    driver.set_active(_NoLaunchDriver())  # (resetting it would look for a GPU driver)
    backend.interpreter_enabled = lambda: True


def measure(name: str, inputs, fn, device: torch.device, reps: int, stub: bool | None = None) -> dict:
    """One case's counts and host times; ``stub`` (default: on a CPU) replaces each launch by a no-op."""
    stub = device.type != "cuda" if stub is None else stub
    with triton_launches(stub=stub) as launches:
        for _ in range(3):  # compile / warm up
            one_step(inputs, fn)
        launches.clear()
        with CountOps() as mode:
            one_step(inputs, fn)
        ops = dict(mode.ops)
        n_launches = sum(launches.values())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times, parts = [], []
        for _ in range(reps):
            launches.spans.clear()
            t0 = time.perf_counter()
            one_step(inputs, fn)
            t1 = time.perf_counter()
            times.append((t1 - t0) * 1e6)
            # before, launch, between, launch, after: the step cut at the loss kernel's and the scale's
            # entry and exit (the small launches around the loss kernel count as before and between)
            edges = [t0, *[t for name, *span in launches.spans if name not in HELPERS for t in span], t1]
            parts.append([(b - a) * 1e6 for a, b in itertools.pairwise(edges)])
        if device.type == "cuda":
            torch.cuda.synchronize()
    gpu_ops = {k: v for k, v in ops.items() if k not in NO_LAUNCH}
    return dict(case=name, aten_ops=sum(ops.values()), aten_launching=sum(gpu_ops.values()),
                triton=n_launches, host_us=statistics.median(times), ops=ops,
                parts_us=[statistics.median(p) for p in zip(*parts)])


def direct_ab(inputs, fn, reps: int, blocks: int = 30) -> dict:
    """One step's host time with ``common.launch``'s direct calls of compiled kernels off (every launch
    through Triton's launch path) and on, alternating in ``blocks`` blocks of ``reps`` steps in one
    process, so that the machine's drift falls on both alike: the minimum over blocks of each block's
    median, and the median and quartiles of the blocks' paired gains (off minus on), in µs."""
    from fastloss.kernels import common

    saved = common._DIRECT
    medians: dict[bool, list[float]] = {False: [], True: []}
    try:
        for block in range(blocks):
            for direct in (False, True) if block % 2 else (True, False):
                common._DIRECT = direct
                medians[direct].append(_per_call_us(lambda: one_step(inputs, fn), reps))
                if inputs[0].is_cuda:  # no backlog of one block's GPU work left to slow the next
                    torch.cuda.synchronize()
    finally:
        common._DIRECT = saved
    gains = [off - on for off, on in zip(medians[False], medians[True])]
    q1, q2, q3 = statistics.quantiles(gains, n=4)
    return dict(triton_us=min(medians[False]), direct_us=min(medians[True]), gain_us=q2, gain_q1=q1, gain_q3=q3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=report.int_at_least(1), default=200, help="steps timed per measurement (default 200)")
    p.add_argument("--cases", default="", help="comma-separated substrings of case names (default: all)")
    p.add_argument("--launch-path", action="store_true",
                   help="on a CPU: launches through Triton's own launch path (kernels compiled for sm_90 with "
                        "ptxas, the driver call stubbed) instead of stubbing whole launches")
    p.add_argument("--direct-ab", action="store_true",
                   help="instead of the table: each step with fastloss's direct launches of compiled kernels off "
                        "(every launch through Triton's launch path) and on, alternating in blocks of --reps "
                        "steps in one process (on a CPU, needs --launch-path)")
    args = p.parse_args(argv)
    if args.direct_ab and not torch.cuda.is_available() and not args.launch_path:
        p.error("--direct-ab on a CPU needs --launch-path (the interpreter launches no compiled kernel)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.stub = device.type == "cpu" and not args.launch_path
    with contextlib.ExitStack() as stack:
        if device.type == "cpu":
            if args.launch_path:
                use_launch_path()
            else:
                os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import
            stack.enter_context(fastloss.use_backend("triton"))
            # The class-index range check runs only on CPU tensors (it would sync on a GPU).
            stack.enter_context(mock.patch.object(functional, "_check_class_range", lambda *a: None))
        failed = run(device, args)
    return 1 if failed else 0


def run(device: torch.device, args) -> list[str]:
    # Small shapes: the host path does not depend on them, except that on CUDA rows of 16384 columns
    # or more are split across programs, which zero counters. On a CPU they are tiny, so that torch's
    # step (which computes) is all host time too, as fastloss's is (its launches, or with
    # --launch-path their driver calls, stubbed).
    if device.type == "cuda":
        cases = steps(device, vocab=1024, n=1 << 16)
        cases["ce bf16 V=32768"] = steps(device, vocab=32768, n=80)["ce bf16"]
    else:
        cases = steps(device, vocab=64, n=80 * 64, rows=16)
    wanted = [w for w in args.cases.split(",") if w]
    chosen = {name: case for name, case in cases.items() if not wanted or any(w in name for w in wanted)}
    if not chosen:
        print(f"python -m bench.host: error: no case matches --cases {args.cases!r} (the cases: {', '.join(cases)})",
              file=sys.stderr)
        raise SystemExit(2)
    cases = chosen
    where = "issue time" if device.type == "cuda" else "launches stubbed" if args.stub else "driver call stubbed"
    if args.direct_ab:
        print(f"{'case':20} {'triton µs':>9} {'direct µs':>9}  paired gain µs: median (quartiles)  (host time of a step, "
              f"{where}; min over blocks of each block's median)")
        for name, (inputs, fn) in cases.items():
            r = direct_ab(inputs, fn, args.reps)
            print(f"{name:20} {r['triton_us']:9.1f} {r['direct_us']:9.1f}  {r['gain_us']:6.1f} "
                  f"({r['gain_q1']:.1f} to {r['gain_q3']:.1f})", flush=True)
        return []
    print(f"{'case':20} {'aten ops':>8} {'launching':>9} {'triton':>6} {'host µs':>8} {'torch µs':>8}  {PARTS}  ({where}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__})")
    failed = []
    for name, (inputs, fn) in cases.items():
        try:
            r = measure(name, inputs, fn, device, args.reps, stub=args.stub)
            torch_us = _per_call_us(lambda: one_step(inputs, torch_fn(name)), args.reps)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # report it and go on with the other losses
            failed.append(name)
            print(f"{name:20} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
            continue
        launching = ", ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(r["ops"].items()) if k not in NO_LAUNCH)
        parts = " ".join(f"{p:6.1f}" for p in r["parts_us"])
        print(f"{name:20} {r['aten_ops']:8d} {r['aten_launching']:9d} {r['triton']:6d} {r['host_us']:8.1f} {torch_us:8.1f}  "
              f"{parts}  "
              f"{launching}", flush=True)
    if not wanted:
        print(f"\nparts, µs per call ({'issue time' if device.type == 'cuda' else 'CPU'}):", flush=True)
        for part, us in part_costs(device, args.reps, launches=device.type == "cuda" or not args.stub).items():
            print(f"  {part:48} {us if isinstance(us, str) else f'{us:8.1f}'}", flush=True)
    return failed


# The columns of a step's split at its two main launches: before, loss kernel, between, scale, after.
PARTS = f"{'before':>6} {'launch':>6} {'betw.':>6} {'launch':>6} {'after':>6}"


def _per_call_us(fn, reps: int) -> float:
    """Median issue time of fn over reps calls, in µs, after a warm-up call."""
    return harness.wall_bench(fn, budget_s=0.0, min_reps=reps, max_reps=reps).ms * 1e3


class _NoKernel(torch.autograd.Function):
    """An autograd.Function that launches nothing: forward and backward return views."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def part_costs(device: torch.device, reps: int, launches: bool = False) -> dict:
    """Host time of the pieces a step is made of, each on its own, in µs per call (see the module's
    doc); with ``launches`` (on CUDA, or on a CPU with ``--launch-path``) the Triton launches, and on
    CUDA the device context."""
    grad = torch.empty(1 << 20, device=device, dtype=torch.bfloat16)
    one = torch.ones((), device=device)
    small = torch.randn(8192, device=device)
    leaf = torch.zeros((), device=device, requires_grad=True)
    out = {}
    if launches:
        out.update(_launch_costs(grad, one.reshape(1), reps))
    if device.type == "cuda":
        def device_context():
            with torch.cuda.device(device):
                pass

        out["with torch.cuda.device()"] = _per_call_us(device_context, reps)
    out["aten sum of 8192"] = _per_call_us(lambda: small.sum(), reps)
    out["0-dim cast to bf16"] = _per_call_us(lambda: one.to(torch.bfloat16), reps)
    out["empty 2 MiB"] = _per_call_us(lambda: torch.empty_like(grad), reps)

    def no_kernel_step():
        leaf.grad = None
        _NoKernel.apply(leaf).backward()

    out["autograd.Function fwd + backward(), no kernel"] = _per_call_us(no_kernel_step, reps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def _launch_costs(grad: Tensor, one: Tensor, reps: int) -> dict:
    """The backward's scale (grad_output = 1: every program exits at once) launched three ways:
    through Triton's launch path, through fastloss's ``launch`` (the compiled kernel, called
    directly), and by fastloss's launcher ``scale_grad_`` (its checks, then ``launch``)."""
    from fastloss.kernels import common

    kernel = common._scale_grad_kernel
    args = (grad, None, one, None, None, grad.numel(), grad.numel(), 1, 0, 1, 0)  # the runtime parameters, in order
    consts = dict(PER_ROW=False, STRIDED=False, PREDICTED=False, PAIR=False, INTERPRET=False,
                  BLOCK=common.ELEMENTWISE_BLOCK,
                  num_warps=8, enable_fp_fusion=common.FP_FUSION)
    programs = min(common.cdiv(grad.numel(), common.ELEMENTWISE_BLOCK), common.SCALE_GRAD_PROGRAMS)
    return {
        "triton launch, kernel[grid]": _per_call_us(lambda: kernel[(programs,)](*args, **consts), reps),
        "triton launch, fastloss's launch()": _per_call_us(lambda: common.launch(kernel, programs, *args, **consts),
                                                          reps),
        "scale_grad_, fastloss's launcher": _per_call_us(lambda: common.scale_grad_(grad, one), reps),
    }


if __name__ == "__main__":
    raise SystemExit(main())
