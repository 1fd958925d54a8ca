"""PNG plots: achieved GB/s against the vocabulary size V, one line per provider.

One figure per (loss, dtype, mode, N) that has at least ``MIN_POINTS`` vocabulary sizes; the dashed line
is the measured copy bandwidth (100% of the floor), and the right axis reads as % of the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

MIN_POINTS = 3
STYLE = {  # provider -> (colour, marker)
    "fastloss": ("tab:red", "o"),
    "torch": ("tab:blue", "s"),
    "compile": ("tab:green", "^"),
    "liger": ("tab:purple", "D"),
    "cce": ("tab:brown", "v"),
}


def sweep_groups(records: list[dict]) -> dict[tuple, dict[str, list[tuple[int, float]]]]:
    """{(device, copy GB/s, loss, dtype, mode, N): {provider: [(V, GB/s), ...]}} for the classification
    losses. The device is part of the key, so that runs on different GPUs are never mixed; runs merged
    from one device (a benchmark run in pieces) share a plot, drawn against their mean copy bandwidth."""
    groups: dict[tuple, dict[str, list[tuple[int, float]]]] = {}
    copies: dict[tuple, list[float]] = {}
    for r in records:
        if r["status"] != "ok" or r["loss"] not in ("ce", "focal") or (r.get("loss_div") or 1) != 1:
            continue
        n_rows, vocab = (int(s) for s in r["shape"].split("×"))
        key = (r["device"], r["loss"], r["dtype"], r["mode"], n_rows)
        groups.setdefault(key, {}).setdefault(r["provider"], []).append((vocab, r["gbps"]))
        copies.setdefault(key, []).append(r["copy_gbps"])
    return {
        (key[0], sum(copies[key]) / len(copies[key]), *key[1:]): {p: sorted(points) for p, points in lines.items()}
        for key, lines in groups.items()
        if len({v for points in lines.values() for v, _ in points}) >= MIN_POINTS
    }


def plot_sweeps(records: list[dict], directory: str) -> list[str]:
    """Write one PNG per sweep group into ``directory``; return their paths ([] without matplotlib)."""
    groups = sweep_groups(records)
    if not groups:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots written", stacklevel=2)
        return []

    paths = []
    for (device, copy_gbps, loss, dtype, mode, n_rows), lines in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for provider, points in lines.items():
            colour, marker = STYLE.get(provider, (None, "x"))
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=marker, color=colour, label=provider)
        ax.axhline(copy_gbps, color="grey", linestyle="--", linewidth=1, label="copy bandwidth (floor)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel("GB/s (floor bytes ÷ time)")
        highest = max(y for points in lines.values() for _, y in points)
        ax.set_ylim(bottom=0, top=max(copy_gbps, highest) * 1.1)
        to_pct = (lambda g, bw=copy_gbps: g / bw * 100, lambda p, bw=copy_gbps: p * bw / 100)
        ax.secondary_yaxis("right", functions=to_pct).set_ylabel("% of floor")
        mode_str = "fwd+bwd" if mode == "fwdbwd" else "fwd only"
        ax.set_title(f"{loss} {dtype} {mode_str}, N={n_rows} — {device}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(directory, f"{loss}_{dtype}_{mode}_N{n_rows}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot",
                                description="Redraw the V-sweep plots of a python -m bench --save folder into it.")
    p.add_argument("dir", help="the folder holding results.json (the PNGs are written beside it)")
    args = p.parse_args(argv)
    path = os.path.join(args.dir, "results.json")
    if not os.path.isfile(path):
        p.error(f"no results.json in {args.dir!r} (write one with python -m bench --save DIR)")
    with open(path) as f:
        records = json.load(f)
    if not sweep_groups(records):
        p.error(f"{path} has no V sweep of {MIN_POINTS} or more points to plot (python -m bench --shapes sweep)")
    paths = plot_sweeps(records, args.dir)
    if not paths:
        print("python -m bench.plot: error: matplotlib is not installed", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
