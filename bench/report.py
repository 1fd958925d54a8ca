"""Reporting: the live progress line, the terminal tables, and the files written by ``--save``."""

from __future__ import annotations

import csv
import datetime
import json
import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

# Every record has these keys, in this order (CSV columns; JSON key order).
META_COLUMNS = ["device", "device_type", "torch", "triton", "python", "date", "copy_gbps"]
ROW_COLUMNS = [
    "case", "loss", "dtype", "shape", "mode", "target_grad", "loss_div", "sweep", "provider", "status", "check",
    "loss_err", "grad_err", "ms", "ms_p20", "ms_p80", "host_ms", "device_ms", "bytes", "floor_ms", "gbps", "pct_floor",
    "vs_torch", "vs_compile", "peak_extra_mib", "peak_x_input", "goal_pct", "note",
]  # fmt: skip
COLUMNS = META_COLUMNS + ROW_COLUMNS


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, redrawn in place on a terminal. When stderr is not a
    terminal (CI logs) only the milestones are printed, one per line."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 20):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()
        self._drawn = False

    def _line(self, text: str) -> str:
        filled = round(self.width * self.done / max(self.total, 1))
        elapsed = int(time.perf_counter() - self.start)
        bar = "█" * filled + "░" * (self.width - filled)
        return f"{bar} {self.done}/{self.total}  {elapsed // 60}:{elapsed % 60:02d}  {text}"

    def status(self, text: str, milestone: bool = False) -> None:
        line = self._line(text)
        if self.live:
            columns = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r\033[K" + line[: columns - 1])
            self._drawn = True
        elif milestone:
            self.stream.write(line + "\n")
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def clear(self) -> None:
        """Erase the live line (call before printing anything else to the terminal)."""
        if self.live and self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False


# ----------------------------------------------------------------------------------------------
# Run metadata
# ----------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_meta(device: torch.device, copy_bandwidth: float | None = None) -> dict:
    """Device name, versions, date (UTC) and, when given, the copy bandwidth in GB/s."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"{_cpu_name()} ({threads} thread{'s' if threads != 1 else ''})"
    meta = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if copy_bandwidth is not None:
        meta["copy_gbps"] = copy_bandwidth / 1e9
    return meta


# ----------------------------------------------------------------------------------------------
# Terminal tables
# ----------------------------------------------------------------------------------------------


def _num(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _gbps(value) -> str:
    """GB/s with about three significant digits (CPU runs are in the single digits, GPUs in the thousands)."""
    if value is None:
        return "—"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _check_cell(row: dict) -> str:
    check = row.get("check")
    if check is None:
        return ""
    errors = f"loss {_num(row.get('loss_err'), '.0e')}"
    if row.get("grad_err") is not None:
        errors += f" grad {_num(row.get('grad_err'), '.0e')}"
    return f"{check} {errors}"


def _memory_cell(row: dict) -> str:
    if row.get("peak_extra_mib") is None:
        return "n/a" if row.get("status") == "ok" else ""
    mib = row["peak_extra_mib"]
    size = f"{mib:.0f}" if mib >= 10 else f"{mib:.2g}"
    return f"{size} MiB ({row['peak_x_input']:.2g}×)"


def _table(header: list[str], lines: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: indent + "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([fmt(header)] + [fmt(line) for line in lines])


def format_case(rows: list[dict], copy_gbps: float) -> str:
    """The block printed when a case finishes: a header with the floor, one line per provider."""
    first = rows[0]
    goal = f"   target ≥ {first['goal_pct']:.0f}%" if first.get("goal_pct") else ""
    head = (
        f"▸ {first['case']}   floor {first['floor_ms']:.4g} ms "
        f"({first['bytes'] / 1e9:.3g} GB at {copy_gbps:.0f} GB/s){goal}"
    )
    with_compile = any(r["provider"] == "compile" for r in rows)
    split = any(r.get("device_ms") is not None for r in rows)  # host_and_device_ms: on CUDA
    header = ["provider", "median ms"] + ["host ms", "GPU ms"] * split + ["GB/s", "% floor", "× torch"]
    header += ["× compile"] * with_compile + ["peak extra (× input)", "check"]
    lines, notes = [], []
    for r in rows:
        if r.get("status") == "ok":
            line = [r["provider"], _num(r["ms"], ".4f")]
            line += [_num(r.get("host_ms"), ".4f"), _num(r.get("device_ms"), ".4f")] * split
            line += [_gbps(r["gbps"]), _num(r["pct_floor"], ".1f", "%")]
            line += [_num(r.get("vs_torch"), ".2f", "×")]
            line += [_num(r.get("vs_compile"), ".2f", "×")] * with_compile
            lines.append(line + [_memory_cell(r), _check_cell(r)])
        else:
            notes.append(f"  {r['provider']}: {r.get('status')}" + (f" ({r['note']})" if r.get("note") else ""))
            if r.get("status") == "mismatch":
                notes[-1] += f"  {_check_cell(r)}"
    return "\n".join([head, _table(header, lines) if lines else "  (nothing timed)"] + notes)


def _pct_cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row.get("status") == "ok":
        return f"{row['pct_floor']:.1f}%"
    return {"mismatch": "✗", "skipped": "skip"}.get(row.get("status"), row.get("status") or "")


def _by_case(rows: list[dict]) -> dict[str, dict[str, dict]]:
    cases: dict[str, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault(r["case"], {})[r["provider"]] = r
    return cases


def format_summary(rows: list[dict]) -> str:
    """All cases, one line each: every provider's share of the floor, fastloss's speed-ups."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    with_compile = "compile" in providers
    header = ["case"] + providers + ["fastloss × torch"] + ["× compile"] * with_compile
    lines = []
    for case, by_provider in _by_case(rows).items():
        fl = by_provider.get("fastloss", {})
        line = [case] + [_pct_cell(by_provider.get(p)) for p in providers]
        line += [_num(fl.get("vs_torch"), ".2f", "×")] + [_num(fl.get("vs_compile"), ".2f", "×")] * with_compile
        lines.append(line)
    return "Share of the floor (copy bandwidth), higher is better\n" + _table(header, lines)


def _gpu_pct(row: dict) -> float | None:
    """The share of the floor in the GPU's time alone (``device_ms``, host_and_device_ms), if measured."""
    return row["floor_ms"] / row["device_ms"] * 100 if row.get("status") == "ok" and row.get("device_ms") else None


def target_rows(rows: list[dict]) -> list[dict]:
    """One entry per case with an issue target: the target, what fastloss reached, the gap."""
    out = []
    for case, by_provider in _by_case(rows).items():
        fl = by_provider.get("fastloss")
        if fl is None or fl.get("goal_pct") is None:
            continue
        reached = fl.get("pct_floor") if fl.get("status") == "ok" else None
        out.append({
            "case": case, "goal_pct": fl["goal_pct"], "reached_pct": reached, "gpu_pct": _gpu_pct(fl),
            "gap_pt": None if reached is None else reached - fl["goal_pct"],
            "met": reached is not None and reached >= fl["goal_pct"],
            "status": fl.get("status"),
        })  # fmt: skip
    return out


def format_targets(rows: list[dict]) -> str:
    targets = target_rows(rows)
    if not targets:
        return "Issue targets: none in this run (they apply to the CUDA shapes)."
    lines = []
    for t in targets:
        if t["reached_pct"] is None:
            verdict, reached, gap = f"not measured ({t['status']})", "—", "—"
        else:
            verdict = "✓ met" if t["met"] else "✗ short"
            reached, gap = f"{t['reached_pct']:.1f}%", f"{t['gap_pt']:+.1f} pt"
        lines.append([t["case"], f"≥ {t['goal_pct']:.0f}%", reached, gap, verdict, _num(t["gpu_pct"], ".1f", "%")])
    met = sum(t["met"] for t in targets)
    title = f"Issue targets for fastloss (share of the floor): {met}/{len(targets)} met"
    return title + "\n" + _table(["case", "target", "fastloss", "gap", "", "GPU alone"], lines)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def records(rows: list[dict], meta: dict) -> list[dict]:
    """One flat record per (case, provider), with the run's metadata, keys in COLUMNS order."""
    return [{k: {**meta, **r}.get(k) for k in COLUMNS} for r in rows]


def _markdown(recs: list[dict], plots: list[str]) -> str:
    out = ["# fastloss benchmark results", ""]
    # One line per run (--merge can combine several runs in one directory).
    runs = dict.fromkeys(tuple(r[k] for k in META_COLUMNS) for r in recs)
    for run in runs:
        meta = dict(zip(META_COLUMNS, run))
        out.append(
            f"- {meta['date']}: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, "
            f"python {meta['python']}; copy bandwidth (the floor's speed of light) {meta['copy_gbps']:.0f} GB/s"
        )
    out += [
        "",
        "% floor = (bytes that must move ÷ copy bandwidth) ÷ measured time. "
        "× torch / × compile = speed-up over torch eager / torch.compile (> 1 is faster). "
        "host ms = the time to issue one step; GPU ms = the step's time on the GPU alone (queued behind a "
        "GPU sleep, so that it never waits for the host): where median ms is well above GPU ms, the step "
        "waited for its host.",
        "",
        "| case | provider | median ms | host ms | GPU ms | GB/s | % floor | × torch | × compile | peak extra | check | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in recs:
        ok = r["status"] == "ok"
        cells = [
            r["case"], r["provider"],
            _num(r["ms"], ".4f") if ok else r["status"],
            _num(r.get("host_ms"), ".4f"), _num(r.get("device_ms"), ".4f"),
            _gbps(r["gbps"]), _num(r["pct_floor"], ".1f", "%"),
            _num(r["vs_torch"], ".2f", "×"), _num(r["vs_compile"], ".2f", "×"),
            _memory_cell(r), _check_cell(r), (r["note"] or "").replace("|", "/"),
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    targets = target_rows(recs)
    if targets:
        out += ["", "## Issue targets (fastloss)", "",
                "GPU alone: the share of the floor in the GPU's time alone (GPU ms), without the host's waits.", "",
                "| case | target | reached | gap | GPU alone |", "|---|--:|--:|--:|--:|"]
        for t in targets:
            reached = "—" if t["reached_pct"] is None else f"{t['reached_pct']:.1f}%"
            gap = "—" if t["gap_pt"] is None else f"{t['gap_pt']:+.1f} pt {'✓' if t['met'] else '✗'}"
            out.append(f"| {t['case']} | ≥ {t['goal_pct']:.0f}% | {reached} | {gap} | {_num(t['gpu_pct'], '.1f', '%')} |")
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def no_cuda(what: str) -> str:
    """The usage error of a tool asked for CUDA (``what``: the option, or the tool) where there is none."""
    return f"{what}: CUDA is not available (torch {torch.__version__})"


def int_at_least(low: int):
    """An argparse ``type``: an integer no smaller than ``low``, else a usage error that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def unwritable(directory: str) -> str | None:
    """None if ``directory`` exists (it is created if not) and takes a new file, else the reason why not:
    checked before a run, so that --save fails before the measurements, not after them."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return f"cannot write into {directory!r}: {exc.strerror or exc}"
    return None


def load(directory: str) -> list[dict]:
    """The records of an earlier ``--save`` into ``directory`` ([] if there are none)."""
    path = os.path.join(directory, "results.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def save(directory: str, rows: list[dict], meta: dict, merge: bool = False, plots: bool = True) -> list[str]:
    """Write results.json, results.csv, results.md and (``plots``) the plots into ``directory``;
    return the paths.

    With ``merge``, the records already there are kept, except those of the (case, provider) pairs
    measured again, so a long benchmark can be run in pieces into one directory."""
    from . import plot

    os.makedirs(directory, exist_ok=True)
    recs = records(rows, meta)
    if merge:
        fresh = {(r["case"], r["provider"]) for r in recs}
        recs = [r for r in load(directory) if (r["case"], r["provider"]) not in fresh] + recs
    paths = []

    path = os.path.join(directory, "results.json")
    with open(path, "w") as f:
        json.dump(recs, f, indent=1, ensure_ascii=False)
    paths.append(path)

    path = os.path.join(directory, "results.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(recs)
    paths.append(path)

    pngs = plot.plot_sweeps(recs, directory) if plots else []
    path = os.path.join(directory, "results.md")
    with open(path, "w") as f:
        f.write(_markdown(recs, [os.path.basename(p) for p in pngs]))
    paths.append(path)
    return paths + pngs


def _gib(row: dict | None) -> str:
    if row is None or row.get("peak_extra_mib") is None:
        return "—"
    gib = row["peak_extra_mib"] / 1024
    return f"{gib:.2f}" if gib < 1 else f"{gib:.1f}"


def readme_table(recs: list[dict]) -> str:
    """The README's results table from a run's records: one line per headline case (no sweep points)
    that fastloss ran, ranked by fastloss's share of the floor; a target met in bold; the share of the
    GPU's time alone too when the run measured it."""
    by_case = {c: p for c, p in _by_case([r for r in recs if not r.get("sweep")]).items()
               if p.get("fastloss", {}).get("status") == "ok"}
    alone = any(p["fastloss"].get("device_ms") for p in by_case.values())
    header = ["case", "fastloss"] + ["fastloss, GPU alone"] * alone
    header += ["torch", "torch.compile", "× torch", "× compile", "peak extra GiB (fastloss / torch)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
    for case, p in sorted(by_case.items(), key=lambda item: -item[1]["fastloss"]["pct_floor"]):
        fl = p["fastloss"]
        met = fl.get("goal_pct") is not None and fl["pct_floor"] >= fl["goal_pct"]
        share = f"{fl['pct_floor']:.1f}%"
        cells = [case, f"{'**' + share + '**' if met else share} {fl['ms']:.2f} ms"]
        if alone:
            cells.append(_num(_gpu_pct(fl), ".1f", "%"))
        cells += [_pct_cell(p.get("torch")), _pct_cell(p.get("compile")),
                  _num(fl.get("vs_torch"), ".2f", "×"), _num(fl.get("vs_compile"), ".2f", "×"),
                  f"{_gib(fl)} / {_gib(p.get('torch'))}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report",
                                description="Print the README's results table from a python -m bench --save folder.")
    p.add_argument("dir", nargs="?", default="bench/results",
                   help="the folder holding results.json (default: bench/results)")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.dir, "results.json")):
        p.error(f"no results.json in {args.dir!r} (write one with python -m bench --save DIR)")
    recs = load(args.dir)
    if not any(r.get("provider") == "fastloss" and r.get("status") == "ok" and not r.get("sweep") for r in recs):
        p.error(f"{os.path.join(args.dir, 'results.json')} has no headline case that fastloss ran")
    print(readme_table(recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
