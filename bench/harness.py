"""Measurement: timing, the copy-bandwidth floor, peak memory and the accuracy check.

:func:`run_case` runs one :class:`~bench.cases.Case` for every provider and returns one row (a dict) per
provider. The order for each provider is: accuracy check (which is also the warm-up and, for
``torch.compile``, the compilation), timing, peak memory. A provider that disagrees with
``fastloss.reference`` is marked ✗ and not timed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import statistics
import time
from typing import Callable

import torch

from .cases import REFERENCE_FNS, Case, Provider

ROTATE_BYTES = 100 * 2**20  # inputs smaller than this (all copies together) are rotated to defeat L2 reuse
MAX_COPIES = 8
REFERENCE_FP64_NUMEL = 1 << 27  # above this the reference runs in fp32 to save memory and time
CHUNK = 1 << 26  # elements per chunk when comparing big gradients
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 1e-2}  # relative, loss and max-normalised grad


@dataclasses.dataclass
class Timing:
    ms: float  # median
    lo: float  # 20th percentile
    hi: float  # 80th percentile


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def bench_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> Timing:
    """Median time of ``fn()`` in ms: ``triton.testing.do_bench`` on CUDA (CUDA events, L2 flushed before
    each rep), a CUDA-event loop if triton is missing, and ``time.perf_counter`` on CPU."""
    warmup_ms, rep_ms = (10, 50) if quick else (25, 200)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_bench(fn, warmup_ms, rep_ms)
        return Timing(*do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    return wall_bench(fn, budget_s=0.15 if quick else 1.0)


def _cuda_event_bench(fn, warmup_ms: float, rep_ms: float) -> Timing:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(5, int(rep_ms / estimate))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) for s, e in events])


@functools.cache
def _sleep_cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per ms (timed twice: the first lets the clock ramp up)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 1_000_000
    for _ in range(2):
        torch.cuda.synchronize(device)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize(device)
    return cycles / max(start.elapsed_time(end), 1e-3)


def host_and_device_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> tuple[float, float] | None:
    """(host ms, device ms) of ``fn()``, medians; None off CUDA.

    ``bench_ms`` times a step as a user runs it, so where the host takes longer to issue a step than the
    GPU to run it, it measures the host. This separates the two:

    * host ms: the time to issue one step while the GPU sleeps, so that nothing the host waits for is
      the GPU's doing (a step that synchronizes shows the sleep instead);
    * device ms: the step queued behind a GPU sleep longer than its host time, with L2 flushed first:
      its kernels run back to back, with no gap where the GPU waits for the host.

    A step whose median ``bench_ms`` is well above its device ms waited for its host.
    """
    if device.type != "cuda":
        return None
    reps = 5 if quick else 20
    per_ms = _sleep_cycles_per_ms(device)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    first_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize(device)
    host = []
    torch.cuda._sleep(int(per_ms * max(20.0, 2 * reps * first_ms)))  # longer than the reps' issue times together
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize(device)
    host_ms = statistics.median(host)
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # as do_bench: larger than L2
    sleep = int(per_ms * max(1.0, 3 * max(host)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        torch.cuda.synchronize(device)
        cache.zero_()
        torch.cuda._sleep(sleep)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return host_ms, statistics.median(s.elapsed_time(e) for s, e in events)


def wall_bench(fn, budget_s: float, min_reps: int = 3, max_reps: int = 200) -> Timing:
    """Wall-clock time of ``fn()`` in ms, reps until ``budget_s`` has passed (at least ``min_reps``,
    at most ``max_reps``). With CUDA work and no synchronize, that is the time to issue it."""
    fn()  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < deadline and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def _summary(times_ms: list[float]) -> Timing:
    if len(times_ms) < 2:
        return Timing(times_ms[0], times_ms[0], times_ms[0])
    q = statistics.quantiles(times_ms, n=10, method="inclusive")  # deciles
    return Timing(statistics.median(times_ms), q[1], q[7])


def copy_bandwidth(device: torch.device, nbytes: int, quick: bool = False) -> tuple[float, Timing]:
    """Copy bandwidth in bytes/s: (bytes read + bytes written) by ``dst.copy_(src)`` on a bf16 tensor of
    ``nbytes``, median time. This is the speed of light every floor is measured against."""
    n = nbytes // 2
    if device.type == "cuda":
        src = torch.randn(n, device=device, dtype=torch.bfloat16)
    else:  # randn of hundreds of MiB is slow on a small CPU; tile a random block instead
        block = torch.randn(1 << 16, dtype=torch.bfloat16)
        src = block.repeat(-(-n // block.numel()))[:n].clone()
    dst = torch.empty_like(src)
    timing = bench_ms(lambda: dst.copy_(src), device, quick)
    bandwidth = 2 * src.numel() * src.element_size() / (timing.ms * 1e-3)
    del src, dst
    _free(device)
    return bandwidth, timing


# ----------------------------------------------------------------------------------------------
# Inputs, steps, memory
# ----------------------------------------------------------------------------------------------


def make_input_sets(case: Case, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """One set of inputs, or several to cycle through when they are small enough to sit in L2."""
    copies = 1
    if case.input_bytes * 2 <= ROTATE_BYTES:
        copies = min(MAX_COPIES, ROTATE_BYTES // case.input_bytes)
    return [case.make_inputs(device, seed=i) for i in range(copies)]


def _grad_leaves(inputs) -> list[torch.Tensor]:
    return [x for x in inputs if x.requires_grad]


def clear_grads(input_sets) -> None:
    for inputs in input_sets:
        for x in _grad_leaves(inputs):
            x.grad = None


def make_step(fn: Callable, input_sets, mode: str) -> Callable[[], None]:
    """One timed call: fwd only under no_grad, or fwd + ``loss.backward()`` into fresh ``.grad`` buffers
    (set to None first, so nothing accumulates). Each call takes the next input set."""
    cycle = itertools.cycle(input_sets)
    if mode == "fwd":

        def step():
            inputs = next(cycle)
            with torch.no_grad():
                fn(*inputs)

    else:

        def step():
            inputs = next(cycle)
            for x in _grad_leaves(inputs):
                x.grad = None
            fn(*inputs).backward()

    return step


def peak_extra_bytes(step: Callable, input_sets, device: torch.device) -> int | None:
    """Peak memory above what is already allocated (the inputs) during one call; None on CPU."""
    if device.type != "cuda":
        return None
    clear_grads(input_sets)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def fits(case: Case, device: torch.device) -> str | None:
    """None if the case should fit in device memory, else the reason to skip it."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info()
    # Inputs, their gradient and an eager provider's temporaries: about 4 input sizes.
    need = 4 * case.input_bytes
    if need > free:
        return f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Check:
    ok: bool | None  # None: could not be checked
    loss_err: float | None = None
    grad_err: float | None = None
    note: str = ""


def _run(fn, inputs, mode):
    """The loss and the gradients of every input that requires grad (empty in fwd mode)."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(*inputs).detach(), ()
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, _grad_leaves(inputs))


def _divided(fn, k: int):
    """``fn`` with its loss divided by ``k`` (Case.loss_div)."""
    return fn if k == 1 else lambda *inputs: fn(*inputs) / k


def reference_outputs(case: Case, inputs, device: torch.device):
    """``fastloss.reference`` on an upcast copy of the inputs: float64, or float32 for big shapes.
    Falls back to the CPU when the device runs out of memory."""
    dtype = torch.float64 if case.numel <= REFERENCE_FP64_NUMEL else torch.float32

    def upcast(x, where):
        if not x.is_floating_point():
            return x.to(where)
        return x.detach().to(where, dtype).requires_grad_(x.requires_grad)

    fn = _divided(REFERENCE_FNS[case.loss], case.loss_div)
    try:
        return _run(fn, [upcast(x, device) for x in inputs], case.mode)
    except torch.cuda.OutOfMemoryError:
        _free(device)
        return _run(fn, [upcast(x, "cpu") for x in inputs], case.mode)


def relative_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max |value - ref| / max |ref|, in chunks (no full-size temporaries); NaN if anything is NaN."""
    value, ref = value.detach().reshape(-1), ref.reshape(-1)
    if value.numel() != ref.numel():
        return float("nan")
    worst = torch.zeros((), dtype=ref.dtype, device=ref.device)
    scale = torch.zeros((), dtype=ref.dtype, device=ref.device)
    for s in range(0, ref.numel(), CHUNK):
        r = ref[s : s + CHUNK]
        v = value[s : s + CHUNK].to(r.device, r.dtype)
        worst = torch.maximum(worst, (v - r).abs().max())  # torch.maximum propagates NaN
        scale = torch.maximum(scale, r.abs().max())
    worst, scale = worst.item(), scale.item()
    return worst / scale if scale > 0 else worst


def check_provider(case: Case, provider: Provider, inputs, ref) -> Check:
    """Compare one provider's loss and gradients against the reference outputs ``ref``."""
    if provider.mutates_inputs:
        inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    loss, grads = _run(provider.fn, inputs, case.mode)
    if ref is None:
        return Check(None, note="reference unavailable")
    ref_loss, ref_grads = ref
    if len(grads) != len(ref_grads):
        return Check(False, note="wrong number of gradients")
    tol = TOLERANCE[case.dtype]
    loss_err = relative_error(loss.reshape(()), ref_loss)
    grad_err = max((relative_error(g, r) for g, r in zip(grads, ref_grads)), default=None)
    errors = [loss_err] + ([grad_err] if grad_err is not None else [])
    ok = all(e <= tol for e in errors)  # False for NaN
    return Check(ok, loss_err, grad_err, "" if ok else f"error above tolerance {tol:g}")


# ----------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------


def run_case(
    case: Case,
    providers: dict[str, Provider | str],
    device: torch.device,
    bandwidth: float,
    *,
    quick: bool = False,
    status: Callable[[str], None] = lambda text: None,
) -> list[dict]:
    """Run every provider on ``case``. Rows carry the case, the provider, the check and the numbers."""
    floor_bytes = case.floor_bytes()
    base = {
        "case": case.label,
        "loss": case.loss,
        "dtype": case.dtype,
        "shape": "×".join(map(str, case.shape)),
        "mode": case.mode,
        "target_grad": case.target_grad,
        "loss_div": case.loss_div,
        "sweep": case.sweep,
        "bytes": floor_bytes,
        "floor_ms": floor_bytes / bandwidth * 1e3,
        "goal_pct": None if case.goal is None else case.goal * 100,
    }
    rows = []
    for name, provider in providers.items():
        skipped = isinstance(provider, str)  # a provider that is unavailable comes as the reason why
        rows.append(dict(base, provider=name, **({"status": "skipped", "note": provider} if skipped else {})))
    too_big = fits(case, device)
    if too_big:
        for row in rows:
            row.update(status="skipped", note=f"does not fit: {too_big}")
        return rows

    # every provider's loss, and the reference's, divided the same way (Case.loss_div)
    providers = {name: p if isinstance(p, str) else dataclasses.replace(p, fn=_divided(p.fn, case.loss_div))
                 for name, p in providers.items()}
    if "compile" in providers:
        import torch._dynamo as dynamo  # not `import torch._dynamo`: that makes torch a local name here

        dynamo.reset()  # fresh compile caches for every case (see cases.make_provider)
    status(f"{case.label}: making inputs")
    input_sets = make_input_sets(case, device)
    status(f"{case.label}: reference")
    try:
        ref = reference_outputs(case, input_sets[0], device)
    except Exception as exc:  # the check is then reported as unavailable, the timing still runs
        ref = None
        reference_error = f"reference failed: {type(exc).__name__}: {exc}"
    else:
        reference_error = ""

    for row in rows:
        provider = providers[row["provider"]]
        if isinstance(provider, str):
            continue
        try:
            _run_provider(case, provider, input_sets, ref, device, quick, row, status)
            if reference_error and row["check"] == "?":
                row["note"] = reference_error
        except torch.cuda.OutOfMemoryError:
            row.update(status="oom", note="out of memory")
        except Exception as exc:
            row.update(status="error", note=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        finally:
            clear_grads(input_sets)
            _free(device)

    del input_sets, ref
    _free(device)
    _add_speedups(rows)
    return rows


def _run_provider(case, provider, input_sets, ref, device, quick, row, status) -> None:
    name = provider.name
    status(f"{case.label} · {name}: accuracy check" + (" (compiling…)" if name == "compile" else ""))
    check = check_provider(case, provider, input_sets[0], ref)
    row.update(
        check={True: "✓", False: "✗", None: "?"}[check.ok],
        loss_err=check.loss_err,
        grad_err=check.grad_err,
        note=check.note,
    )
    if check.ok is False:
        row["status"] = "mismatch"
        return

    step = make_step(provider.fn, input_sets, case.mode)
    status(f"{case.label} · {name}: timing")
    timing = bench_ms(step, device, quick)
    split = host_and_device_ms(step, device, quick)
    status(f"{case.label} · {name}: peak memory")
    peak = peak_extra_bytes(step, input_sets, device)
    row.update(
        status="ok",
        ms=timing.ms,
        ms_p20=timing.lo,
        ms_p80=timing.hi,
        host_ms=None if split is None else split[0],
        device_ms=None if split is None else split[1],
        gbps=row["bytes"] / (timing.ms * 1e-3) / 1e9,
        pct_floor=row["floor_ms"] / timing.ms * 100,
        peak_extra_mib=None if peak is None else peak / 2**20,
        peak_x_input=None if peak is None else peak / case.input_bytes,
    )
    if provider.mutates_inputs:
        row["note"] = "writes its gradient into the logits (in place), so later reps read gradients"


def _add_speedups(rows: list[dict]) -> None:
    """Speed-up of each provider over torch eager and over torch.compile (>1: faster)."""
    ms = {r["provider"]: r.get("ms") for r in rows if r.get("status") == "ok"}
    for row in rows:
        if row.get("status") != "ok":
            continue
        for other, key in (("torch", "vs_torch"), ("compile", "vs_compile")):
            if ms.get(other):
                row[key] = ms[other] / row["ms"]
