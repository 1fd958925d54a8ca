"""``python -m bench.ab``: the same benchmark on two or more source trees of fastloss, alternating,
in one session on one machine.

Host-bound rows move by tens of points from run to run on a shared GPU machine, and GPU-bound rows
drift between sessions, so a change is judged only against its base measured beside it
(bench/NOTES.md, section 4). Each TREE is a source tree of this repository: ``.`` (this checkout) or
a directory holding another revision (``git archive REV | tar -x -C DIR``). Each tree is installed
into its own folder under OUT (``pip install --no-deps --target``), and every round runs, for each
tree in turn, that tree's own bench:

- ``python -m bench --shapes headline --providers fastloss`` (``--losses``/``--dtypes`` narrow it);
- with ``--kernel CASES``: ``python -m bench.tune_ce --rounds 0 --elementwise --cases CASES``, the
  kernels alone with their default launch;
- with ``--host``: ``python -m bench.host``, the host path of one step.

OUT/ab.txt gets the share of the floor of every case, one column per tree and round, then the
kernel-alone and host lines; OUT/ab.tgz holds every log and each run's results.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from . import report


def tree_names(trees: list[str]) -> list[str]:
    """A short unique name per tree: ``head`` for ``.``, else the folder's name."""
    names = []
    for tree in trees:
        base = "head" if Path(tree).resolve() == Path.cwd().resolve() else Path(tree).resolve().name
        name, k = base, 2
        while name in names:
            name, k = f"{base}{k}", k + 1
        names.append(name)
    return names


def shares(results: list[dict]) -> dict[str, float | None]:
    """case -> fastloss's share of the floor (%) in one ``python -m bench --save`` results.json;
    None where the case did not run (an error, out of memory, skipped)."""
    out = {}
    for row in results:
        if row.get("provider") == "fastloss" and not row.get("sweep"):
            out[row["case"]] = row.get("pct_floor") if row.get("status") == "ok" else None
    return out


def table(columns: dict[str, dict[str, float | None]]) -> str:
    """One row per case (in first-seen order), one column per run."""
    cases = list(dict.fromkeys(case for col in columns.values() for case in col))
    width = max([len(c) for c in cases] + [4])
    heads = list(columns)
    lines = [f"{'case':{width}}  " + "  ".join(f"{h:>9}" for h in heads)]
    for case in cases:
        cells = []
        for h in heads:
            v = columns[h].get(case)
            cells.append(f"{'—' if v is None else f'{v:.1f}%':>9}")
        lines.append(f"{case:{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _python(args: list[str], workdir: Path, site: Path, log: Path, timeout: float) -> int:
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        try:
            return subprocess.run([sys.executable, *args], cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n(stopped after {timeout:.0f} s)\n")
            return 124


def prepare(tree: Path, raw: Path) -> tuple[Path, Path]:
    """Install ``tree`` into raw/site and copy its bench into raw/run (a folder with no fastloss
    source in it, so that the installed copy is the one imported). Returns (site, run)."""
    site, run = raw / "site", raw / "run"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(tree)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"python -m bench.ab: installing {tree} failed:\n{out.stderr[-2000:]}")
    shutil.copytree(tree / "bench", run / "bench", ignore=shutil.ignore_patterns("results", "__pycache__"))
    check = raw / "imports.log"
    _python(["-c", "import fastloss.kernels.common as c; print(c.__file__)"], run, site, check, 120)
    if not check.read_text().strip().startswith(str(site)):
        raise SystemExit(f"python -m bench.ab: {tree} imports fastloss from elsewhere: {check.read_text()}")
    return site, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (created)")
    p.add_argument("trees", nargs="+", help="source trees: '.' for this checkout, or folders of other revisions")
    p.add_argument("--rounds", type=report.int_at_least(1), default=2)
    p.add_argument("--losses", default="", help="passed to python -m bench")
    p.add_argument("--dtypes", default="", help="passed to python -m bench")
    p.add_argument("--kernel", default="", metavar="CASES", help="also time these tune_ce cases kernel alone")
    p.add_argument("--host", action="store_true", help="also run python -m bench.host")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per benchmark run")
    args = p.parse_args(argv)
    for tree in args.trees:  # all of them before the first, slow, install
        if not (Path(tree) / "pyproject.toml").is_file() or not (Path(tree) / "bench").is_dir():
            p.error(f"{tree!r} is not a source tree of fastloss (no pyproject.toml and bench/ in it)")

    out = Path(args.out).resolve()
    raw = out / "ab"
    names = tree_names(args.trees)
    setup = {}
    for name, tree in zip(names, args.trees):
        print(f"installing {tree} as {name}", flush=True)
        setup[name] = prepare(Path(tree).resolve(), raw / name)

    bench_args = ["-m", "bench", "--shapes", "headline", "--providers", "fastloss"]
    for flag in ("losses", "dtypes"):
        if getattr(args, flag):
            bench_args += [f"--{flag}", getattr(args, flag)]
    columns, extra, failed = {}, [], []
    start = time.monotonic()
    for r in range(1, args.rounds + 1):
        for name in names:
            site, run = setup[name]
            save = raw / name / f"round{r}"
            print(f"[{time.monotonic() - start:5.0f} s] round {r}: {name}", flush=True)
            status = _python(bench_args + ["--save", str(save)], run, site, raw / name / f"bench{r}.log", args.timeout)
            if status != 0:  # its missing rows show as dashes: say why, in ab.txt and in the exit status
                failed.append(f"{name}, round {r}: python -m bench exited with status {status} "
                              f"(ab/{name}/bench{r}.log, in ab.tgz)")
                print(f"  {failed[-1]}", flush=True)
            columns[f"{name} {r}"] = shares(report.load(str(save)))
            for flag, tool in ((args.kernel, ["-m", "bench.tune_ce", "--rounds", "0", "--elementwise", "--cases",
                                               args.kernel]), (args.host, ["-m", "bench.host"])):
                if flag:
                    log = raw / name / f"{tool[1].split('.')[1]}{r}.log"
                    status = _python(tool, run, site, log, args.timeout)
                    if status != 0:
                        failed.append(f"{name}, round {r}: python {' '.join(tool)} exited with status {status}")
                    extra.append(f"== {name}, round {r}: python {' '.join(tool)}\n{log.read_text().strip()}")

    text = f"share of the floor, fastloss, {' '.join(bench_args[1:])}\n\n{table(columns)}\n"
    if failed:
        text += "\nfailed runs:\n" + "\n".join(f"  {line}" for line in failed) + "\n"
    if extra:
        text += "\n" + "\n\n".join(extra) + "\n"
    (out / "ab.txt").write_text(text)
    for name in names:  # the installed copies are not worth keeping
        shutil.rmtree(raw / name / "site", ignore_errors=True)
        shutil.rmtree(raw / name / "run", ignore_errors=True)
    with tarfile.open(out / "ab.tgz", "w:gz") as tar:
        tar.add(raw, arcname="ab")
    shutil.rmtree(raw)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
