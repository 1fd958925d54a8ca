"""``python -m bench.tune_ce``: search the cross-entropy kernel's launch parameters on the GPU.

For each headline shape it times the launcher alone (no autograd, preallocated gradient) with the
default ``launch_config`` and then does a coordinate search over ``LaunchConfig``'s fields
(segments per row, chunk, warps, reverse sweep 2, Triton's pipelining of either sweep, the split
rows' sleep between polls), two rounds, and with a gradient also tries the
launches that hold a whole segment in registers (``in_registers``). The segmentation cases
(``SEG_CASES``, ``--cases seg``) search the columns kernel's positions a program and warps, and time
the rows kernel on a channels_last map's memory at its default. Every configuration is first
checked against the default one's loss and gradient, with the gradient buffer poisoned with NaN
so that an unwritten element fails. Times are medians of ``triton.testing.do_bench`` (L2 flushed
before each rep), shown as a share of the floor, 2·N·V·b (N·V·b forward only) over the copy
bandwidth measured in the same run. The result informs ``launch_config``'s heuristics; it is not
used at run time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from .harness import copy_bandwidth
from .report import no_cuda

CASES = [  # (name, dtype, N, V, write_grad, softcap)
    ("bf16 V=32768", torch.bfloat16, 8192, 32768, True, None),
    ("bf16 V=128256", torch.bfloat16, 8192, 128256, True, None),
    ("bf16 V=262144", torch.bfloat16, 8192, 262144, True, None),
    # GPT-2's vocabulary: rows that start and end off 16-byte boundaries, swept from the boundaries
    # before them (SHIFT in the kernel; bench/NOTES.md section 30)
    ("bf16 V=50257", torch.bfloat16, 8192, 50257, True, None),
    # past the cap of 32 segments a row (an H100): longer segments swept in chunks, as many bytes
    ("bf16 N=4096 V=524288", torch.bfloat16, 4096, 524288, True, None),
    ("fp32 V=128256", torch.float32, 8192, 128256, True, None),
    ("fp32 N=65536 V=1000", torch.float32, 65536, 1000, True, None),
    ("bf16 V=128256 fwd", torch.bfloat16, 8192, 128256, False, None),
    # the benchmark's ce_softcap (Gemma 2's vocabulary and cap), bound by arithmetic, not bytes: its
    # default launch is plain cross-entropy's (bench/NOTES.md, section 23)
    ("bf16 V=256000 softcap", torch.bfloat16, 8192, 256000, True, 30.0),
    # short rows, each in one chunk (``--cases short``): how many warps share a row's own work
    # (SINGLE_ROW_VALUES), or rows a program (ROWS_VALUES; bench/NOTES.md sections 28 and 29), in 16 bits
    # where the instructions bind; V = 150 is ADE20K's classes as a channels_last map's rows (not
    # aligned to 16 bytes: no vector loads), V = 50 a token tagger's
    ("bf16 short N=524288 V=50", torch.bfloat16, 524288, 50, True, None),
    ("bf16 short N=262144 V=150", torch.bfloat16, 262144, 150, True, None),
    ("bf16 short N=65536 V=1000", torch.bfloat16, 65536, 1000, True, None),
    ("bf16 short N=32768 V=2048", torch.bfloat16, 32768, 2048, True, None),
]
# The benchmark's ce_seg map (Cityscapes' 19 classes, 8 x 512 x 1024 positions) through the columns
# kernel, contiguous (classes strided in memory) and channels_last (narrow rows: classes together,
# positions 19 apart, bench/NOTES.md section 27), and that channels_last memory as (N H W, 19) rows
# through the rows kernel, searching its rows a program (32 by default since section 29; 1, what the
# map ran before section 27, among them): (name, dtype, (N, C, H W), layout), with a gradient.
SEG_CASES = [
    ("bf16 seg C=19", torch.bfloat16, (8, 19, 512 * 1024), "contiguous"),
    ("bf16 seg C=19 channels_last", torch.bfloat16, (8, 19, 512 * 1024), "channels_last"),
    ("bf16 seg C=19 channels_last rows", torch.bfloat16, (8, 19, 512 * 1024), "rows"),
    ("fp32 seg C=19 channels_last", torch.float32, (8, 19, 512 * 1024), "channels_last"),
    ("fp32 seg C=19 channels_last rows", torch.float32, (8, 19, 512 * 1024), "rows"),
]
ROW_FIELDS = ("segments", "block", "num_warps", "rows", "reverse", "stages", "stages2", "sleep_ns")
COLUMN_FIELDS = ("block", "num_warps")  # what the columns kernel's launch takes


def candidates(field: str, n_cols: int, write_grad: bool, columns: bool = False) -> list:
    if columns:  # positions a program (at least one a thread), warps
        return {"block": [128, 256, 512, 1024, 2048], "num_warps": [1, 2, 4, 8]}[field]
    pow2 = 1 << max(5, (n_cols - 1).bit_length())
    if field == "segments":  # 0: a row per program; else programs per row (whole chunks each)
        return [0, 1, 2, 4, 8, 16, 32] if write_grad else [0]
    if field == "block":
        return sorted({b for b in (1024, 2048, 4096, 8192, 16384, 32768) if b <= pow2} | ({pow2} if pow2 <= 32768 else set()))
    return {"num_warps": [1, 2, 4, 8, 16], "rows": [1, 2, 4, 8, 16, 32],  # (rows > 1: rows in one chunk only)
            "reverse": [False, True], "stages": [0, 2, 3, 4], "stages2": [0, 2, 3],
            "sleep_ns": [0, 128, 512, 2000]}[field]


def in_registers(n_cols: int) -> list:
    """Launches that hold a whole segment in registers (one read, one write, no second sweep),
    varying the segments and the warps together, which the one-field-at-a-time search cannot: its
    chunk must grow with the segment. fp32's default is one of them."""
    from fastloss.kernels.common import cdiv, next_power_of_2
    from fastloss.kernels.cross_entropy import LaunchConfig

    out = []
    for segments in (2, 4, 8, 16, 32):
        block = next_power_of_2(cdiv(n_cols, segments))
        # at most 64 values a thread, fp32's default (more spill: fp32 holds them in 128 registers)
        out += [LaunchConfig(block=block, num_warps=w, segments=segments) for w in (4, 8, 16)
                if 2048 <= block and block // (32 * w) <= 64]
    return out


def seg_inputs(dtype: torch.dtype, shape: tuple[int, int, int], layout: str, device: torch.device):
    """A SEG_CASES map as ``cross_entropy_fwd`` takes it: (N, C, D) logits for the columns kernel
    ("contiguous", or "channels_last": a view of (N, D, C) memory), or that channels_last memory as
    (N D, C) rows ("rows"); standard-normal logits, class targets to match, and the default launch."""
    from fastloss.kernels.cross_entropy import columns_config, launch_config

    n, c, d = shape
    if layout == "contiguous":
        logits = torch.randn(n, c, d, device=device, dtype=dtype)
    else:
        classes_last = torch.randn(n, d, c, device=device, dtype=dtype)
        logits = classes_last.transpose(1, 2) if layout == "channels_last" else classes_last.view(n * d, c)
    columns = logits.dim() == 3
    target = torch.randint(0, c, (n, d) if columns else (n * d,), device=device)
    return logits, target, columns_config(c) if columns else launch_config(logits, True)


def tune_elementwise(bandwidth: float, do_bench) -> list[dict]:
    """Kernel-alone time of huber_fwd and sigmoid_focal_fwd (reduced, input gradient) per block size."""
    import fastloss.kernels.common as common
    import fastloss.kernels.focal as focal
    import fastloss.kernels.huber as huber

    device = torch.device("cuda")
    saved = common.ELEMENTWISE_BLOCK, huber.BLOCK_16BIT
    out = []
    for name, dtype, shape in [("huber bf16 2^27", torch.bfloat16, (1 << 27,)), ("huber fp32 2^27", torch.float32, (1 << 27,)),
                               ("sigmoid_focal bf16", torch.bfloat16, (1 << 20, 80)),
                               ("sigmoid_focal fp32", torch.float32, (1 << 20, 80))]:
        x = torch.randn(shape, device=device, dtype=dtype)
        y = torch.randn(shape, device=device, dtype=dtype) if name.startswith("huber") else (
            torch.rand(shape, device=device) < 0.1).to(dtype)
        g = torch.empty_like(x)
        floor_ms = 3 * x.numel() * x.element_size() / bandwidth * 1e3
        times = {}
        default = huber.block_for(dtype) if name.startswith("huber") else focal.BLOCK
        for block in (2048, 4096, 8192, 16384):
            common.ELEMENTWISE_BLOCK = huber.BLOCK = huber.BLOCK_16BIT = focal.BLOCK = block
            if name.startswith("huber"):
                fn = lambda: huber.huber_fwd(x, y, None, beta=1.0, mul=1.0, scale=1.0 / x.numel(), reduce=True,
                                             grad_input=g, grad_target=None)
            else:
                fn = lambda: focal.sigmoid_focal_fwd(x, y, alpha=0.25, gamma=2.0, scale=1.0 / x.numel(),
                                                     reduce=True, grad_input=g)
            times[block] = do_bench(fn, warmup=10, rep=50, return_mode="median")
        common.ELEMENTWISE_BLOCK = huber.BLOCK = focal.BLOCK = saved[0]
        huber.BLOCK_16BIT = saved[1]
        best = min(times, key=times.get)
        line = ", ".join(f"{b}: {ms:.3f} ms {100 * floor_ms / ms:.1f}%" for b, ms in times.items())
        print(f"{name:22} floor {floor_ms:.3f} ms | {line}", flush=True)
        out.append(dict(case=name, floor_ms=floor_ms, default={"block": default}, default_ms=times[default],
                        default_pct=100 * floor_ms / times[default], best={"block": best}, best_ms=times[best],
                        best_pct=100 * floor_ms / times[best], all=[dict(block=b, ms=ms) for b, ms in times.items()]))
        del x, y, g
    return out


def profile_steps() -> None:
    """Kernels and their CUDA time in whole forward + backward steps, to find what is not the kernel."""
    import fastloss

    device = torch.device("cuda")
    for dtype, n, v in [(torch.bfloat16, 8192, 32768), (torch.float32, 65536, 1000)]:
        x = torch.randn(n, v, device=device, dtype=dtype, requires_grad=True)
        t = torch.randint(0, v, (n,), device=device)

        def step():
            x.grad = None
            fastloss.cross_entropy(x, t).backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        host_ms = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) / 20 * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"\n== profile {dtype} {n}x{v}: host {host_ms:.3f} ms per step issued, {wall_ms:.3f} ms per step "
              f"with the GPU", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
        torch.cuda.set_sync_debug_mode("warn")  # any synchronizing call in a step warns
        step()
        torch.cuda.set_sync_debug_mode(0)
        import cProfile
        import pstats

        pr = cProfile.Profile()
        torch.cuda.synchronize()
        pr.enable()
        for _ in range(50):
            step()
        pr.disable()
        torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)
        del x, t


def tune_case(name: str, dtype: torch.dtype, shape: tuple, write_grad: bool, softcap: float | None,
              layout: str | None, *, device: torch.device, bandwidth: float, do_bench, rounds: int,
              deadline: float) -> dict:
    """One case's search (``layout``: None for CASES' (N, V) rows, else a SEG_CASES layout), timed
    by ``do_bench``; returns its record (the default launch, the best, every launch tried)."""
    from fastloss.kernels.cross_entropy import cross_entropy_fwd, launch_config

    torch.manual_seed(0)
    if layout is None:
        logits = torch.randn(*shape, device=device, dtype=dtype)
        target = torch.randint(0, shape[1], shape[:1], device=device)
        default = launch_config(logits, write_grad)
    else:
        logits, target, default = seg_inputs(dtype, shape, layout, device)
    columns = logits.dim() == 3
    n_cols = logits.shape[1]
    # the columns kernel has no fields beyond its block and warps; the rows of a map, its rows a program
    fields = COLUMN_FIELDS if columns else ROW_FIELDS if layout is None else ("rows",)
    divisors = torch.tensor([float(target.numel()), 1.0], device=device)  # a mean
    grad = torch.empty_like(logits) if write_grad else None  # (a channels_last view's strides kept)
    floor_ms = (2 if write_grad else 1) * logits.numel() * logits.element_size() / bandwidth * 1e3

    def run(cfg):
        return cross_entropy_fwd(logits, target, None, divisors, grad, softcap=softcap, config=cfg)

    ref_loss = run(default).clone()
    ref_grad = grad.clone() if write_grad else None
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    tried: dict = {}

    def measure(cfg) -> float:
        if cfg in tried:
            return tried[cfg]
        try:
            if write_grad:
                grad.fill_(float("nan"))
            loss = run(cfg)
            ok = torch.allclose(loss, ref_loss, rtol=tol, atol=tol * ref_loss.abs().max().item())
            if write_grad:
                ok &= bool(torch.isfinite(grad).all()) and torch.allclose(
                    grad.float(), ref_grad.float(), rtol=tol, atol=tol * ref_grad.float().abs().max().item())
            ms = do_bench(lambda: run(cfg), warmup=10, rep=50, return_mode="median") if ok else float("inf")
        except Exception as exc:  # a configuration the compiler rejects (registers, shared memory)
            print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            ms = float("inf")
        if ms == float("inf"):
            print(f"  {cfg}: rejected", flush=True)
        tried[cfg] = ms
        return ms

    best, best_ms = default, measure(default)
    default_ms = best_ms
    for _ in range(rounds):
        for field in fields:
            for value in candidates(field, n_cols, write_grad, columns):
                if time.monotonic() > deadline:
                    break
                cfg = dataclasses.replace(best, **{field: value})
                ms = measure(cfg)
                if ms < best_ms:
                    best, best_ms = cfg, ms
    # then segments held in registers, which the search cannot reach
    if write_grad and rounds > 0 and "segments" in fields:
        for cfg in in_registers(n_cols):
            if time.monotonic() > deadline:
                break
            ms = measure(cfg)
            if ms < best_ms:
                best, best_ms = cfg, ms
    again = do_bench(lambda: run(best), warmup=10, rep=100, return_mode="median")
    record = dict(case=name, floor_ms=floor_ms, default=dataclasses.asdict(default), default_ms=default_ms,
                  default_pct=100 * floor_ms / default_ms, best=dataclasses.asdict(best), best_ms=best_ms,
                  best_pct=100 * floor_ms / best_ms, best_again_ms=again, tried=len(tried),
                  all=[dict(dataclasses.asdict(c), ms=m) for c, m in tried.items()])
    print(f"{name:22} floor {floor_ms:.3f} ms | default {default_ms:.3f} ms {record['default_pct']:5.1f}% "
          f"| best {best_ms:.3f} ms {record['best_pct']:5.1f}% (again {again:.3f}) {best}", flush=True)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune_ce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated case names' substrings (default: all)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop searching after this long")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--save", default="", help="write the results as JSON to this file (after every case)")
    parser.add_argument("--elementwise", action="store_true", help="also time the elementwise kernels' blocks")
    parser.add_argument("--profile", action="store_true",
                        help="also profile whole fastloss.cross_entropy steps (forward + backward)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error(no_cuda("needs a CUDA GPU"))

    from triton.testing import do_bench

    device = torch.device("cuda")
    bandwidth, _ = copy_bandwidth(device, 2 << 30)
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    deadline = time.monotonic() + args.budget_s
    wanted = [w for w in args.cases.split(",") if w]
    results = []
    cases = [(name, dtype, (n_rows, n_cols), write_grad, softcap, None)
             for name, dtype, n_rows, n_cols, write_grad, softcap in CASES]
    cases += [(name, dtype, shape, True, None, layout) for name, dtype, shape, layout in SEG_CASES]

    def save():  # after every case, so that a run cut short keeps what it measured
        if args.save:
            with open(args.save, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), copy_gbps=bandwidth / 1e9,
                               torch=torch.__version__, results=results), f, indent=1)

    for name, dtype, shape, write_grad, softcap, layout in cases:
        if wanted and not any(w in name for w in wanted):
            continue
        results.append(tune_case(name, dtype, shape, write_grad, softcap, layout, device=device,
                                 bandwidth=bandwidth, do_bench=do_bench, rounds=args.rounds, deadline=deadline))
        save()
        torch.cuda.empty_cache()
    if args.elementwise:
        results += tune_elementwise(bandwidth, do_bench)
        save()
    if args.profile:
        profile_steps()
    print("\ncase                   default%  best%  best config")
    for r in results:
        print(f"{r['case']:22} {r['default_pct']:7.1f} {r['best_pct']:6.1f}  {r['best']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
