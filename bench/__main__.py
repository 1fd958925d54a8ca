"""``python -m bench``: time fastloss against torch eager, torch.compile and (for cross-entropy)
Liger-Kernel, as a share of the copy-bandwidth floor. ``python -m bench --help`` lists the options."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch

from . import harness, report
from .cases import DTYPES, LOSSES, MODES, PROVIDERS, SHAPE_SETS, make_provider, select_cases

CPU_PROVIDERS = ("fastloss", "torch")
CE_ONLY = ("liger", "cce")  # providers of cross-entropy alone


def _choices(allowed):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return items

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--losses", type=_choices(LOSSES), default=LOSSES, help="default: all")
    p.add_argument(
        "--providers",
        type=_choices(PROVIDERS),
        default=None,
        help=f"default: all on CUDA (liger/cce when importable), {','.join(CPU_PROVIDERS)} on CPU",
    )
    p.add_argument("--modes", type=_choices(MODES), default=MODES, help="fwdbwd (forward+backward), fwd (forward only)")
    p.add_argument("--dtypes", type=_choices(tuple(DTYPES)), default=tuple(DTYPES), help="default: all")
    p.add_argument(
        "--shapes",
        choices=SHAPE_SETS,
        default=None,
        help="headline: the issues' shapes; sweep: the V sweep for the plots; all (default; headline with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="headline shapes only, shorter timing")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument(
        "--threads",
        type=report.int_at_least(0),
        default=1,
        help="CPU only: torch threads while timing (default 1: steady on small shared machines; 0 keeps torch's)",
    )
    p.add_argument(
        "--copy-mib", type=report.int_at_least(1), default=None, help="copy-bandwidth tensor size (default 2048 CUDA, 256 CPU)"
    )
    p.add_argument("--save", metavar="DIR", help="write results.json/.csv/.md and PNG plots into DIR")
    p.add_argument("--merge", action="store_true", help="with --save: keep DIR's other records (run in pieces)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    if args.merge and not args.save:
        p.error("--merge needs --save DIR (the folder whose records it keeps)")
    if args.device == "cuda" and not args.list and not torch.cuda.is_available():
        p.error(report.no_cuda("--device cuda"))
    return args


def _providers(args, device: torch.device) -> tuple[list[str], list[str]]:
    """(provider names to run, notes about the ones left out)."""
    names = list(args.providers or (PROVIDERS if device.type == "cuda" else CPU_PROVIDERS))
    notes = []
    for name in CE_ONLY:
        if name in names:
            why = make_provider("ce", name, device)
            if isinstance(why, str):
                names.remove(name)
                notes.append(f"{name}: skipped, {why}")
    return names, notes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cases = select_cases(
        device, quick=args.quick, losses=args.losses, modes=args.modes, dtypes=args.dtypes, shapes=args.shapes
    )
    names, notes = _providers(args, device)
    if not names:  # every provider asked for is unavailable here
        print(f"python -m bench: error: no provider to run ({'; '.join(notes)})", file=sys.stderr)
        return 2
    # liger and cce have only a cross-entropy: a case that none of the providers runs is left out
    cases = [c for c in cases if c.loss == "ce" or any(name not in CE_ONLY for name in names)]
    if args.list:
        print("\n".join(c.label for c in cases))
        return 0
    if not cases:
        print("no case matches the selection", file=sys.stderr)
        return 2
    if args.save and (why := report.unwritable(args.save)):
        print(f"python -m bench: error: --save: {why}", file=sys.stderr)
        return 2

    print(f"fastloss benchmark on {device.type}: {len(cases)} cases × providers {', '.join(names)}")
    if device.type == "cpu":
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        notes.append(
            "no CUDA: tiny shapes; fastloss runs its plain-PyTorch reference path; "
            f"timed with perf_counter on {torch.get_num_threads()} thread(s)"
        )
    elif importlib.util.find_spec("triton") is None:
        notes.append("triton is not importable: timing with a CUDA-event loop instead of do_bench")
    for note in notes:
        print(f"  note: {note}")

    start = time.perf_counter()
    progress = report.Progress(len(cases) + 1)
    copy_mib = args.copy_mib or (2048 if device.type == "cuda" else 256)
    progress.status(f"measuring copy bandwidth ({copy_mib} MiB bf16)", milestone=True)
    bandwidth, timing = harness.copy_bandwidth(device, copy_mib * 2**20, quick=args.quick)
    progress.advance()
    progress.clear()
    print(
        f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s "
        f"(dst.copy_(src), {copy_mib} MiB bf16, median {timing.ms:.3f} ms)\n"
    )

    rows: list[dict] = []
    for case in cases:
        progress.status(case.label, milestone=True)
        providers = {
            name: make_provider(case.loss, name, device)
            for name in names
            if name not in CE_ONLY or case.loss == "ce"
        }
        case_rows = harness.run_case(case, providers, device, bandwidth, quick=args.quick, status=progress.status)
        progress.advance()
        progress.clear()
        print(report.format_case(case_rows, bandwidth / 1e9) + "\n", flush=True)
        rows += case_rows
        if args.save:  # after every case, so that a run cut short keeps what it measured
            report.save(args.save, rows, report.run_meta(device, bandwidth), merge=args.merge, plots=False)
    progress.clear()

    print(report.format_summary(rows) + "\n")
    print(report.format_targets(rows) + "\n")
    if args.save:
        paths = report.save(args.save, rows, report.run_meta(device, bandwidth), merge=args.merge)
        print("wrote " + ", ".join(paths))
    print(f"done in {time.perf_counter() - start:.1f} s")

    broken = [r for r in rows if r["provider"] == "fastloss" and r.get("status") in ("mismatch", "error")]
    for r in broken:
        print(f"FAILED: fastloss {r['status']} on {r['case']}: {r.get('note', '')}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
