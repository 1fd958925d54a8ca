"""Tests of the benchmark tooling (bench/) on CPU: the harness's entry point with --quick on tiny cases,
its accuracy gate, the floor and speed-up arithmetic, what one timed step does, the report's targets
and merged saves, and the two-run training script."""

from __future__ import annotations

import ast
import csv
import dataclasses
import importlib.util
import io
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

import fastloss
import fastloss.functional as functional
from bench import __main__ as bench_main
from bench import ab, cases, harness, host, plot, report, train

CPU = torch.device("cpu")
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True)
def _bench_environment(monkeypatch):
    """These tests check the tooling, not the kernels: fastloss takes its CPU (reference) path even when
    the suite runs with FASTLOSS_BACKEND=triton. The entry points also set torch's CPU thread count;
    give the rest of the suite its own back."""
    monkeypatch.setenv("FASTLOSS_BACKEND", "auto")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_floor_bytes():
    # ce / focal fwd+bwd: read N·V logits + N int64 targets, write the N·V gradient.
    assert cases.Case("ce", "bf16", (8192, 32768)).floor_bytes() == 2 * 8192 * 32768 * 2
    assert cases.Case("focal", "fp32", (4, 10)).floor_bytes() == 2 * 40 * 4
    # fwd only: the read alone.
    assert cases.Case("ce", "fp32", (4, 10), mode="fwd").floor_bytes() == 40 * 4
    # sigmoid focal: read x and t, write grad x.
    assert cases.Case("sigmoid_focal", "bf16", (8, 80)).floor_bytes() == 3 * 640 * 2
    # huber: read input and target, write grad input, and grad target when it requires grad.
    assert cases.Case("huber", "fp32", (1024,)).floor_bytes() == 3 * 1024 * 4
    assert cases.Case("huber", "fp32", (1024,), target_grad=True).floor_bytes() == 4 * 1024 * 4


def test_inputs_are_random_and_rotated_when_small():
    case = cases.Case("huber", "fp32", (1 << 12,), target_grad=True)
    sets = harness.make_input_sets(case, CPU)
    assert len(sets) == harness.MAX_COPIES  # 32 KiB per set: cycled to defeat cache reuse
    x, y = sets[0]
    assert x.requires_grad and y.requires_grad and x.std() > 0.5 and not torch.equal(sets[0][0], sets[1][0])
    big = cases.Case("ce", "fp32", (4096, 8192))  # 128 MiB: no copies
    assert len(harness.make_input_sets(big, CPU)) == 1


def test_mismatching_provider_is_marked_and_not_timed():
    case = cases.Case("ce", "fp32", (64, 100))
    providers = {
        "torch": cases.Provider("torch", cases.TORCH_FNS["ce"]),
        "wrong": cases.Provider("wrong", lambda x, t: 1.01 * F.cross_entropy(x, t)),
        "absent": "not installed",
    }
    rows = {r["provider"]: r for r in harness.run_case(case, providers, CPU, bandwidth=1e10, quick=True)}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["check"] == "✓" and rows["torch"]["ms"] > 0
    assert rows["torch"]["loss_err"] < 1e-6 and rows["torch"]["vs_torch"] == 1.0
    assert rows["wrong"]["status"] == "mismatch" and rows["wrong"]["check"] == "✗"
    assert rows["wrong"]["loss_err"] == pytest.approx(0.01, rel=1e-3)
    assert rows["wrong"].get("ms") is None
    assert rows["absent"]["status"] == "skipped" and rows["absent"]["note"] == "not installed"


def test_divided_loss_is_checked_against_the_divided_reference():
    """Case.loss_div divides every provider's loss and the reference's (were only one divided, the
    check would fail), so the backward gets grad_output = 1 / loss_div; the floor is unchanged."""
    case = cases.Case("ce", "fp32", (64, 100), loss_div=8)
    assert "loss/8" in case.label and case.floor_bytes() == cases.Case("ce", "fp32", (64, 100)).floor_bytes()
    grad_outputs = []

    def ce(x, t):
        loss = F.cross_entropy(x, t)
        if loss.requires_grad:
            loss.register_hook(grad_outputs.append)
        return loss

    rows = harness.run_case(case, {"torch": cases.Provider("torch", ce)}, CPU, bandwidth=1e10, quick=True)
    assert rows[0]["status"] == "ok" and rows[0]["check"] == "✓" and rows[0]["loss_div"] == 8
    assert grad_outputs and all(float(g) == 1 / 8 for g in grad_outputs)


def test_quick_run_writes_sane_results(tmp_path, capsys):
    args = ["--quick", "--device", "cpu", "--losses", "ce,huber", "--dtypes", "fp32", "--modes", "fwdbwd"]
    args += ["--shapes", "all", "--copy-mib", "16", "--save", str(tmp_path)]
    assert bench_main.main(args) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth:" in printed and "Share of the floor" in printed
    assert "timed with perf_counter on 1 thread(s)" in printed  # --threads' default

    expected = cases.select_cases(CPU, quick=True, losses=("ce", "huber"), modes=("fwdbwd",), dtypes=("fp32",),
                                  shapes="all")  # fmt: skip
    assert any(c.sweep for c in expected) and any(c.target_grad for c in expected)
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == 2 * len(expected)
    assert {r["case"] for r in records} == {c.label for c in expected}
    by_label = {c.label: c for c in expected}
    for r in records:
        assert list(r) == report.COLUMNS
        assert r["device_type"] == "cpu" and r["torch"] == torch.__version__ and r["date"]
        assert r["provider"] in ("fastloss", "torch")
        assert r["status"] == "ok" and r["check"] == "✓", r
        assert r["bytes"] == by_label[r["case"]].floor_bytes()
        assert r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        # GB/s and % of floor are the same bytes over the measured time and over the copy bandwidth.
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert r["pct_floor"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
        assert r["peak_extra_mib"] is None and r["host_ms"] is None and r["device_ms"] is None  # no CUDA: n/a
        if r["provider"] == "torch":
            assert r["vs_torch"] == 1.0

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and list(rows[0]) == report.COLUMNS
    markdown = (tmp_path / "results.md").read_text()
    assert "| case | provider |" in markdown and all(c.label in markdown for c in expected)
    if HAVE_MATPLOTLIB:
        png = tmp_path / "ce_fp32_fwdbwd_N256.png"  # the V sweep's plot
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in markdown


def _raises(x, y):
    raise RuntimeError("kernel failed")


@pytest.mark.parametrize("status, fn", [("mismatch", lambda x, y: F.huber_loss(x, y) + 1.0), ("error", _raises)])
def test_a_fastloss_mismatch_or_error_fails_the_run(status, fn, monkeypatch, capsys):
    monkeypatch.setitem(cases.FASTLOSS_FNS, "huber", fn)
    args = ["--quick", "--device", "cpu", "--losses", "huber", "--dtypes", "fp32", "--copy-mib", "16"]
    assert bench_main.main(args) == 1
    assert f"FAILED: fastloss {status} on huber fp32" in capsys.readouterr().err


def test_train_cpu_curves_agree(tmp_path):
    assert train.main(["--config", "cpu", "--steps", "4", "--save", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train.json").read_text())
    curves = {name: run["losses"] for name, run in result["runs"].items()}
    assert set(curves) == {"torch", "fastloss"} and all(len(c) == 4 for c in curves.values())
    assert all(math.isfinite(x) for c in curves.values() for x in c)
    assert curves["torch"][0] == pytest.approx(math.log(train.CONFIGS["cpu"].vocab), rel=0.05)  # starts near ln V
    assert curves["torch"][-1] < curves["torch"][0]  # it learns
    assert result["agree"] and result["max_rel_diff"] <= train.CONFIGS["cpu"].tolerance
    assert max(abs(a - b) for a, b in zip(curves["torch"], curves["fastloss"])) == result["max_abs_diff"]
    assert all(run["tokens_per_s"] > 0 for run in result["runs"].values())
    if HAVE_MATPLOTLIB:
        assert (tmp_path / "train.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [(["--steps", "1"], "--steps: expected an integer >= 2, got 1"),
                                           (["--threads", "-1"], "--threads: expected an integer >= 0, got -1")])
def test_train_refuses_fewer_than_two_steps_and_negative_threads(argv, message, capsys):
    """--steps 0 or 1 ran 2 steps, silently; a negative --threads was taken as 0."""
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_train_compare_measures_the_gap():
    gap = train.compare([1.0, 2.0, 3.0], [1.0, 2.1, 3.0])
    assert gap["max_abs_diff"] == pytest.approx(0.1) and gap["max_rel_diff"] == pytest.approx(0.1 / 2.1)
    assert gap["first_step_rel_diff"] == 0.0 and gap["max_rel_diff"] > train.CONFIGS["gpu"].tolerance


# Launching aten ops per step besides the Triton launches: the sum of the kernel's fp32 partials
# (a 16-bit loss is summed and rounded by a Triton launch instead: no sum, no 0-dim cast) and
# autograd's ones. A cross-entropy mean counts its rows in a prologue launch, one more Triton launch
# in place of two aten ops.
FP32 = {"sum": 1, "ones_like": 1}
HALF = {"ones_like": 1}


@pytest.mark.parametrize("name, launching, triton", [
    ("ce fp32", FP32, 3), ("ce bf16", HALF, 4), ("focal bf16", HALF, 4),
    ("huber fp32", FP32, 2), ("huber bf16", HALF, 3), ("sigmoid_focal bf16", HALF, 3)])
def test_host_path_of_a_training_step(name, launching, triton, monkeypatch):
    """A fastloss step at mean reduction (python -m bench.host) is the loss kernel's launch (after
    the prologue's, for a cross-entropy mean) and the backward's scale, and around them only these
    aten ops that launch a kernel (the backward adds nothing to autograd's ones_like). Each such op
    costs host time that a short step shows: a new one must be a decision, not an accident."""
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(functional, "_check_class_range", lambda *a: None)  # CPU tensors only
    with fastloss.use_backend("triton"):
        inputs, fn = host.steps(device, vocab=64, n=80 * 64, rows=16)[name]
        result = host.measure(name, inputs, fn, device, reps=2)
    assert result["triton"] == triton
    assert {op: k for op, k in result["ops"].items() if op not in host.NO_LAUNCH} == launching
    assert result["aten_launching"] == sum(launching.values())
    # the step cut at each launch's entry and exit: before, launch, between, launch, after
    assert len(result["parts_us"]) == 5 and min(result["parts_us"]) >= 0


def test_host_launch_path_runs_tritons_launch_path_without_a_gpu(fresh_process):
    """python -m bench.host --launch-path on a CPU: the kernels are compiled for sm_90 and every launch
    runs up to the driver call (in a fresh process: the suite's kernels are interpreted), through
    Triton's launch path or, once a variant is compiled, fastloss's direct call of it. A
    cross-entropy mean step is three launches, and the loss kernel's launch takes a microsecond or
    more (the device, the stream, Triton's hooks), where a stubbed launch takes a tenth of one."""
    out = fresh_process("-m", "bench.host", "--launch-path", "--reps", "30", "--cases", "ce fp32")
    header, row = out.splitlines()[:2]
    assert "driver call stubbed" in header
    fields = row.split()  # case (2 words), aten ops, launching, triton, host, torch, before, launch, ...
    assert fields[:2] == ["ce", "fp32"] and fields[4] == "3"
    assert float(fields[8]) > 0.5


def test_host_direct_ab_without_a_gpu(fresh_process):
    """python -m bench.host --launch-path --direct-ab: each step with fastloss's direct launches off and
    on, alternating in one process; both columns are host times, and the gain is their difference's
    median. Without --launch-path on a CPU it refuses (the interpreter launches no compiled kernel)."""
    with pytest.raises(SystemExit):
        host.main(["--direct-ab"])
    out = fresh_process("-m", "bench.host", "--launch-path", "--direct-ab", "--reps", "3", "--cases", "huber fp32")
    header, row = out.splitlines()[:2]
    assert "paired gain" in header
    fields = row.split()
    assert fields[:2] == ["huber", "fp32"] and float(fields[2]) > 0 and float(fields[3]) > 0


def test_host_launch_costs_without_a_gpu(fresh_process):
    """bench.host's launch costs (the scale kernel through Triton's launch path, through fastloss's
    launch(), and by its launcher), run with --launch-path's stand-in driver in a fresh process: they
    run on a GPU only otherwise, and their arguments must match the kernel's parameters."""
    code = ("import torch; from bench import host; host.use_launch_path(); "
            "print(host.part_costs(torch.device('cpu'), 3, launches=True))")
    costs = ast.literal_eval(fresh_process("-c", code).strip())
    launches = ["triton launch, kernel[grid]", "triton launch, fastloss's launch()", "scale_grad_, fastloss's launcher"]
    assert list(costs)[:3] == launches and all(costs[k] > 0 for k in launches)


def test_host_main_prints_fastloss_beside_torch(capsys):
    """python -m bench.host: one row per case, fastloss's host time and eager torch's on the same inputs."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the CPU run (launches stubbed); the GPU run is bench/run_gpu.sh's")
    assert host.main(["--reps", "3", "--cases", "huber fp32,ce bf16"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert [r[:2] for r in rows] == [["huber", "fp32"], ["ce", "bf16"]]  # in the order of host.steps
    for r in rows:
        host_us, torch_us = float(r[5]), float(r[6])
        assert host_us > 0 and torch_us > 0


def test_host_refuses_no_reps_and_a_selection_of_no_case(capsys):
    """--reps 0 (a traceback in the timing's summary before) and --cases matching nothing (an empty
    table, exit status 0 before) are usage errors."""
    pytest.importorskip("triton")
    with pytest.raises(SystemExit) as exc:
        host.main(["--reps", "0"])
    assert exc.value.code == 2 and "expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        host.main(["--reps", "1", "--cases", "nothing like it"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no case matches --cases 'nothing like it'" in err and "huber fp32" in err


def test_host_part_costs():
    """bench.host's parts, each timed on its own: on a CPU the aten ops and autograd (the Triton
    launches and the device context are timed on CUDA only)."""
    costs = host.part_costs(torch.device("cpu"), reps=3)
    assert list(costs) == ["aten sum of 8192", "0-dim cast to bf16", "empty 2 MiB",
                           "autograd.Function fwd + backward(), no kernel"]
    assert all(us > 0 for us in costs.values())


def test_ab_names_and_table(tmp_path, monkeypatch):
    """bench.ab: one name per tree (this checkout is ``head``; equal folder names get a suffix), and
    a table of fastloss's share of the floor per case and run, with a dash where a case failed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "old").mkdir(parents=True)
    (tmp_path / "b" / "old").mkdir(parents=True)
    assert ab.tree_names([".", "a/old", "b/old"]) == ["head", "old", "old2"]
    results = [
        dict(case="huber fp32", provider="fastloss", status="ok", pct_floor=94.96),
        dict(case="huber fp32", provider="torch", status="ok", pct_floor=36.0),
        dict(case="ce bf16", provider="fastloss", status="error", pct_floor=None),
        dict(case="ce bf16 V sweep", provider="fastloss", status="ok", pct_floor=50.0, sweep=True),
    ]
    assert ab.shares(results) == {"huber fp32": 94.96, "ce bf16": None}
    text = ab.table({"head 1": ab.shares(results), "old 1": {"huber fp32": 90.0}})
    lines = text.splitlines()
    assert lines[0].split() == ["case", "head", "1", "old", "1"]
    assert lines[1].split()[-2:] == ["95.0%", "90.0%"]
    assert lines[2].split()[-2:] == ["—", "—"]


def test_ab_checks_every_tree_before_installing_any(tmp_path, monkeypatch, capsys):
    """A tree that is no source tree of fastloss (a typo, a folder not made yet) and --rounds below 1 are
    usage errors before anything is installed or written (the first tree was installed before)."""
    monkeypatch.setattr(ab, "prepare", lambda *a: pytest.fail("installed a tree"))
    tree = tmp_path / "old"
    (tree / "bench").mkdir(parents=True)
    (tree / "pyproject.toml").write_text("")
    for argv, message in (([str(tree), str(tmp_path / "missing")], "is not a source tree of fastloss"),
                          ([str(tree), "--rounds", "0"], "--rounds: expected an integer >= 1, got 0")):
        with pytest.raises(SystemExit) as exc:
            ab.main([str(tmp_path / "out"), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ab_reports_a_failed_run(tmp_path, monkeypatch, capsys):
    """A benchmark run that fails (or times out) is named in ab.txt and makes the exit status 1: its
    cases would otherwise show only as dashes, like a case that failed its check."""
    tree = tmp_path / "old"
    (tree / "bench").mkdir(parents=True)
    (tree / "pyproject.toml").write_text("")
    monkeypatch.setattr(ab, "prepare", lambda t, raw: (raw / "site", raw / "run"))

    def python(args, workdir, site, log, timeout):  # the first round of the first tree times out
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        return 124 if "/old/round1" in " ".join(args) else 0

    monkeypatch.setattr(ab, "_python", python)
    assert ab.main([str(tmp_path / "out"), str(tree), str(tree)]) == 1
    text = (tmp_path / "out" / "ab.txt").read_text()
    assert "failed runs:" in text and "round 1: python -m bench exited with status 124" in text
    assert text.count("exited with status") == 1
    assert "status 124" in capsys.readouterr().out


@pytest.mark.parametrize("n_cols", [32768, 128256, 262144])
def test_tune_ce_tries_segments_held_in_registers(n_cols):
    """bench.tune_ce's joint candidates: each holds its whole segment in registers (the kernel's SINGLE
    case, one read and one write), the segments cover the row, and fp32's default launch is among
    them at V = 128256 (the one-field-at-a-time search never tried it for 16-bit rows)."""
    pytest.importorskip("triton")
    from fastloss.kernels.common import cdiv
    from fastloss.kernels.cross_entropy import MAX_SEGMENTS, _default_config

    from bench.tune_ce import in_registers

    configs = in_registers(n_cols)
    assert configs
    for cfg in configs:
        seg_len = cdiv(cdiv(n_cols, cfg.segments), cfg.block) * cfg.block  # as cross_entropy_fwd has it
        assert seg_len == cfg.block and cfg.segments * seg_len >= n_cols
        assert cfg.block // (32 * cfg.num_warps) <= 64
    if n_cols == 128256:
        assert _default_config(n_cols, 4, MAX_SEGMENTS) in configs


# ----------------------------------------------------------------------------------------------
# The arithmetic behind every published figure: the floor's speed of light, the accuracy gate,
# what one timed step does, and how the report ranks the runs.
# ----------------------------------------------------------------------------------------------


def test_copy_bandwidth_counts_the_read_and_the_write(monkeypatch):
    """The speed of light is (bytes read + bytes written) / time of dst.copy_(src): a copy of 1 MiB in
    1 ms moves 2 MiB, so the bandwidth is 2 MiB/ms. Counting one side would double every share of the floor."""
    monkeypatch.setattr(harness, "bench_ms", lambda fn, device, quick=False: harness.Timing(1.0, 0.9, 1.1))
    bandwidth, timing = harness.copy_bandwidth(CPU, 1 << 20, quick=True)
    assert timing.ms == 1.0 and bandwidth == 2 * 2**20 / 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times a GPU")
def test_the_gpus_time_alone_leaves_out_the_hosts():
    """A step whose host spends 5 ms before a short kernel: the benchmark's median is the host's time,
    the GPU's time alone is the kernel's, and the host's time is the sleep."""
    cuda = torch.device("cuda")
    x = torch.randn(1 << 20, device=cuda)

    def step():
        time.sleep(0.005)
        x.mul_(1.0001)

    host_ms, device_ms = harness.host_and_device_ms(step, cuda, quick=True)
    assert host_ms >= 4.5 and device_ms < 1.0
    assert harness.bench_ms(step, cuda, quick=True).ms >= 4.0


def test_relative_error_is_the_worst_difference_over_the_largest_reference(monkeypatch):
    monkeypatch.setattr(harness, "CHUNK", 3)  # the chunked loop, over 7 elements
    ref = torch.tensor([1.0, -4.0, 2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    value = ref.clone().float()
    value[5] += 0.2  # the worst difference, in the last chunk
    value[0] -= 0.1
    assert harness.relative_error(value, ref) == pytest.approx(0.2 / 4.0, rel=1e-6)
    assert harness.relative_error(ref.float().reshape(7, 1), ref) == 0.0  # shapes are flattened
    value[1] = float("nan")
    assert math.isnan(harness.relative_error(value, ref))  # a NaN anywhere is never within tolerance
    assert math.isnan(harness.relative_error(ref[:6], ref))  # so is a gradient of the wrong size
    zeros = torch.zeros(4, dtype=torch.float64)
    assert harness.relative_error(torch.full((4,), 1e-3), zeros) == pytest.approx(1e-3)  # absolute at 0


def test_check_provider_gates_on_every_gradient_and_on_nan():
    case = cases.Case("huber", "fp32", (64,), target_grad=True)
    inputs = case.make_inputs(CPU)
    ref = harness.reference_outputs(case, inputs, CPU)
    assert len(ref[1]) == 2  # input and target
    good = harness.check_provider(case, cases.Provider("torch", cases.TORCH_FNS["huber"]), inputs, ref)
    assert good.ok and good.loss_err < 1e-6 and good.grad_err < 1e-6

    def wrong_target_grad(x, y):  # the right loss and gradient for x, a zero gradient for y
        return F.huber_loss(x, y.detach()) + 0 * y.sum()

    wrong = harness.check_provider(case, cases.Provider("p", wrong_target_grad), inputs, ref)
    assert wrong.ok is False and wrong.loss_err < 1e-6
    nan = harness.check_provider(case, cases.Provider("p", lambda x, y: F.huber_loss(x, y) * float("nan")), inputs, ref)
    assert nan.ok is False and nan.note.startswith("error above tolerance")
    assert harness.check_provider(case, cases.Provider("p", cases.TORCH_FNS["huber"]), inputs, None).ok is None


def test_a_provider_that_writes_into_its_inputs_is_checked_on_a_copy():
    """Liger writes the gradient into the logits: checked on a copy, so the reference's inputs (and the
    inputs every other provider is timed on) keep their values."""
    case = cases.Case("ce", "fp32", (16, 50))
    inputs = case.make_inputs(CPU)
    before = inputs[0].detach().clone()

    def in_place(x, t):
        loss = F.cross_entropy(x, t)
        with torch.no_grad():
            x.zero_()
        return loss

    ref = harness.reference_outputs(case, inputs, CPU)
    check = harness.check_provider(case, cases.Provider("p", in_place, mutates_inputs=True), inputs, ref)
    assert check.ok and torch.equal(inputs[0].detach(), before)


def test_reference_outputs_run_in_float64_below_the_size_limit_and_float32_above(monkeypatch):
    case = cases.Case("ce", "bf16", (8, 30))
    x, t = case.make_inputs(CPU)
    loss, (grad,) = harness.reference_outputs(case, (x, t), CPU)
    assert loss.dtype == grad.dtype == torch.float64 and x.grad is None  # on a copy: x is left alone
    x64 = x.detach().double().requires_grad_()
    expected = F.cross_entropy(x64, t)
    assert torch.allclose(loss, expected) and torch.allclose(grad, torch.autograd.grad(expected, x64)[0])
    monkeypatch.setattr(harness, "REFERENCE_FP64_NUMEL", case.numel - 1)
    loss, (grad,) = harness.reference_outputs(case, (x, t), CPU)
    assert loss.dtype == grad.dtype == torch.float32
    fwd = cases.Case("ce", "bf16", (8, 30), mode="fwd")
    loss, grads = harness.reference_outputs(fwd, fwd.make_inputs(CPU), CPU)
    assert loss.dtype == torch.float32 and grads == ()


def test_a_timed_step_starts_from_fresh_gradients_and_cycles_the_input_sets():
    case = cases.Case("huber", "fp32", (32,), target_grad=True)
    input_sets = [case.make_inputs(CPU, seed=i) for i in range(2)]
    seen = []

    def fn(x, y):
        seen.append(x)
        return F.huber_loss(x, y, reduction="sum")

    step = harness.make_step(fn, input_sets, "fwdbwd")
    for _ in range(4):
        step()
    assert [s is input_sets[i % 2][0] for i, s in enumerate(seen)] == [True] * 4
    for x, y in input_sets:  # two backwards into each set: the last one's gradient, not their sum
        (gx, gy) = torch.autograd.grad(F.huber_loss(x, y, reduction="sum"), (x, y))
        assert torch.equal(x.grad, gx) and torch.equal(y.grad, gy)
    grad_modes = []

    def forward_only(x, y):
        grad_modes.append(torch.is_grad_enabled())
        return F.huber_loss(x, y)

    harness.clear_grads(input_sets)
    harness.make_step(forward_only, input_sets, "fwd")()
    assert grad_modes == [False]
    assert all(x.grad is None for s in input_sets for x in s)


def test_speedups_divide_the_baselines_time_by_the_providers():
    rows = [dict(provider="fastloss", status="ok", ms=1.0), dict(provider="torch", status="ok", ms=4.0),
            dict(provider="compile", status="ok", ms=2.0), dict(provider="liger", status="error")]  # fmt: skip
    harness._add_speedups(rows)
    assert (rows[0]["vs_torch"], rows[0]["vs_compile"]) == (4.0, 2.0)  # > 1: fastloss is faster
    assert (rows[2]["vs_torch"], rows[2]["vs_compile"]) == (2.0, 1.0)
    assert "vs_torch" not in rows[3]


def test_run_case_reports_a_provider_that_raises_and_goes_on():
    case = cases.Case("ce", "fp32", (16, 50))

    def broken(x, t):
        raise RuntimeError("no kernel for you\nsecond line")

    providers = {"broken": cases.Provider("broken", broken), "torch": cases.Provider("torch", cases.TORCH_FNS["ce"])}
    rows = {r["provider"]: r for r in harness.run_case(case, providers, CPU, bandwidth=1e10, quick=True)}
    assert rows["broken"]["status"] == "error" and rows["broken"]["note"] == "RuntimeError: no kernel for you"
    assert rows["torch"]["status"] == "ok" and rows["torch"]["floor_ms"] == case.floor_bytes() / 1e10 * 1e3


def test_targets_are_met_at_the_goal_and_short_below_it():
    def row(case, pct, status="ok", goal=90.0, provider="fastloss"):
        return dict(case=case, provider=provider, status=status, pct_floor=pct, goal_pct=goal)

    rows = [row("a", 90.0), row("b", 89.9), row("c", None, status="error"), row("d", 50.0, goal=None),
            row("a", 99.0, provider="torch")]  # fmt: skip
    targets = {t["case"]: t for t in report.target_rows(rows)}
    assert set(targets) == {"a", "b", "c"}  # d has no target; torch's rows are not fastloss's
    assert targets["a"]["met"] and targets["a"]["gap_pt"] == 0.0
    assert not targets["b"]["met"] and targets["b"]["gap_pt"] == pytest.approx(-0.1)
    assert not targets["c"]["met"] and targets["c"]["reached_pct"] is None
    text = report.format_targets(rows)
    assert text.splitlines()[0].endswith("1/3 met") and "not measured (error)" in text


def test_save_with_merge_keeps_the_other_records_and_replaces_the_measured_ones(tmp_path):
    meta = report.run_meta(CPU, 1e10)

    def row(case, provider, ms):
        return dict(case=case, loss="huber", provider=provider, status="ok", ms=ms)

    report.save(str(tmp_path), [row("a", "torch", 1.0), row("b", "torch", 2.0)], meta, plots=False)
    report.save(str(tmp_path), [row("b", "torch", 3.0), row("b", "fastloss", 4.0)], meta, merge=True, plots=False)
    got = {(r["case"], r["provider"]): r["ms"] for r in report.load(str(tmp_path))}
    assert got == {("a", "torch"): 1.0, ("b", "torch"): 3.0, ("b", "fastloss"): 4.0}
    report.save(str(tmp_path), [row("c", "torch", 5.0)], meta, plots=False)  # without merge: replaced
    assert [(r["case"], r["ms"]) for r in report.load(str(tmp_path))] == [("c", 5.0)]


def test_readme_table_ranks_the_headline_by_fastloss_and_bolds_a_met_target():
    def rec(case, provider, pct, goal=None, sweep=False, **kw):
        return dict(case=case, provider=provider, status="ok", pct_floor=pct, ms=1.0, floor_ms=pct / 100,
                    goal_pct=goal, sweep=sweep, peak_extra_mib=512.0, **kw)

    recs = [rec("slow", "fastloss", 40.0, goal=90.0), rec("slow", "torch", 20.0),
            rec("fast", "fastloss", 95.0, goal=90.0, device_ms=0.5), rec("fast", "torch", 30.0),
            rec("point", "fastloss", 99.0, sweep=True)]
    lines = report.readme_table(recs).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| fast | **95.0%** 1.00 ms | 190.0% |")
    assert lines[3].startswith("| slow | 40.0% 1.00 ms | — | 20.0% |") and "0.50 / 0.50" in lines[3]


def test_progress_prints_only_milestones_when_not_on_a_terminal():
    stream = io.StringIO()
    progress = report.Progress(4, stream=stream, width=4)
    progress.status("timing", milestone=False)
    progress.advance()
    progress.status("case 2", milestone=True)
    progress.clear()
    (line,) = stream.getvalue().splitlines()  # the milestone alone
    assert line.startswith("█░░░ 1/4  0:00") and line.endswith("case 2") and "\r" not in line


def test_sweep_plots_group_one_device_and_shape_and_leave_out_what_is_no_sweep_point():
    """plot.sweep_groups: one plot per (device, loss, dtype, mode, N) with at least MIN_POINTS
    vocabulary sizes, each provider's points sorted by V; failed rows, divided losses and other losses
    are left out, and runs merged from one device are drawn against their mean copy bandwidth."""

    def row(vocab, provider="fastloss", device="H100", copy=3000.0, **kw):
        return dict(dict(device=device, copy_gbps=copy, loss="ce", dtype="bf16", mode="fwdbwd", status="ok",
                         shape=f"8×{vocab}", provider=provider, gbps=vocab / 1000, loss_div=1), **kw)  # fmt: skip

    records = [row(4096, copy=2900.0), row(1024), row(2048, copy=3100.0), row(2048, provider="torch"),
               row(8192, status="error"), row(16384, loss_div=8), row(32768, loss="huber"),
               row(1024, device="H200"), row(2048, device="H200")]  # fmt: skip
    groups = plot.sweep_groups(records)
    assert list(groups) == [("H100", 3000.0, "ce", "bf16", "fwdbwd", 8)]  # the H200 has two points only
    (lines,) = groups.values()
    assert lines == {"fastloss": [(1024, 1.024), (2048, 2.048), (4096, 4.096)], "torch": [(2048, 2.048)]}


@pytest.mark.parametrize("loss", cases.LOSSES)
def test_every_baseline_computes_the_loss_it_is_compared_on(loss):
    """The baselines are timed only when they agree with the reference, as fastloss is: a wrong
    formula in eager torch's focal losses would otherwise drop out of the table silently (a mismatch
    fails the run only for fastloss). Inputs as the benchmark makes them: class targets across the
    vocabulary, detection-style targets with some positives."""
    shape = {"sigmoid_focal": (512, 80), "ce_seg": (4, 19, 6, 5)}.get(
        loss, (64, 300) if loss in cases.CLASS_LOSSES else (4096,))
    case = cases.Case(loss, "fp32", shape, target_grad=loss in ("huber", "smooth_l1"))
    inputs = case.make_inputs(CPU)
    target = inputs[1]
    if loss in cases.CLASS_LOSSES:
        assert target.min() >= 0 and target.max() < shape[1] and target.unique().numel() > shape[0] // 2
    elif loss == "sigmoid_focal":
        assert set(target.unique().tolist()) == {0.0, 1.0} and 0.05 < target.mean() < 0.2
    ref = harness.reference_outputs(case, inputs, CPU)
    for name in ("torch", "fastloss"):
        check = harness.check_provider(case, cases.make_provider(loss, name, CPU), inputs, ref)
        assert check.ok, (name, check)


def test_a_channels_last_case_checks_its_channels_last_logits():
    """ce_seg's channels_last case gives the providers channels_last logits (what the row measures),
    and every provider agrees with the reference on them."""
    case = cases.Case("ce_seg", "fp32", (2, 19, 3, 4), channels_last=True)
    assert "channels_last" in case.label
    inputs = case.make_inputs(CPU)
    assert inputs[0].is_contiguous(memory_format=torch.channels_last) and not inputs[0].is_contiguous()
    ref = harness.reference_outputs(case, inputs, CPU)
    for name in ("torch", "fastloss"):
        assert harness.check_provider(case, cases.make_provider("ce_seg", name, CPU), inputs, ref).ok


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows"])
def test_tune_ce_segmentation_cases_run_the_launcher_on_their_layout(layout):
    """bench.tune_ce's segmentation cases: the map in the layout the case names (classes strided, or
    together as (N, C, D) positions or as rows), the launch the loss would pick, and the launcher's
    loss and gradient under it, and under the columns launches the search tries, equal to torch's."""
    pytest.importorskip("triton")
    from bench import tune_ce
    from fastloss.kernels.cross_entropy import cross_entropy_fwd

    n, c, d = 2, 19, 40
    logits, target, default = tune_ce.seg_inputs(torch.float32, (n, c, d), layout, CPU)
    columns = logits.dim() == 3
    assert columns == (layout != "rows") and (logits.stride(1) == 1) == (layout != "contiguous")
    as_map = logits if columns else logits.view(n, d, c).transpose(1, 2)
    leaf = as_map.detach().requires_grad_()
    expected = F.cross_entropy(leaf, target.view(n, d), reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    launches = [default]
    if columns:
        launches += [dataclasses.replace(default, **{field: tune_ce.candidates(field, c, True, True)[0]})
                     for field in tune_ce.COLUMN_FIELDS]
    else:  # the rows a program it searches, the map's 80 rows in programs of 1 to 32 (the last one short)
        launches += [dataclasses.replace(default, rows=r) for r in tune_ce.candidates("rows", c, True)]
    for cfg in launches:
        grad = torch.empty_like(logits)
        loss = cross_entropy_fwd(logits, target, None, None, grad, config=cfg)
        torch.testing.assert_close(loss.view(-1), expected.detach().reshape(-1))
        torch.testing.assert_close(grad if columns else grad.view(n, d, c).transpose(1, 2), expected_grad)
        assert grad.stride() == logits.stride()


@pytest.mark.parametrize("layout", ["channels_last", "rows"])
def test_tune_ce_searches_a_segmentation_case(layout):
    """bench.tune_ce's search of one segmentation case, with a stand-in for the GPU timer: every launch
    it tries passes its check against the default launch (none rejected), the columns kernel's over
    its block and warps, the rows kernel's over its rows a program."""
    pytest.importorskip("triton")
    from bench import tune_ce

    timed = []
    record = tune_ce.tune_case("seg", torch.float32, (2, 19, 40), True, None, layout, device=CPU, bandwidth=1e9,
                               do_bench=lambda fn, **kw: timed.append(fn()) or 1.0, rounds=1,
                               deadline=time.monotonic() + 600)
    searched = {(c["block"], c["num_warps"]) for c in record["all"]}
    if layout == "rows":
        assert {c["rows"] for c in record["all"]} == set(tune_ce.candidates("rows", 19, True))
    else:
        blocks, warps = (tune_ce.candidates(f, 19, True, True) for f in tune_ce.COLUMN_FIELDS)
        default = (record["default"]["block"], record["default"]["num_warps"])
        assert searched == {default} | {(b, default[1]) for b in blocks} | {(default[0], w) for w in warps}
    assert all(c["ms"] == 1.0 for c in record["all"]) and len(timed) == record["tried"] + 1


def test_case_selection_filters_and_leaves_no_duplicate():
    everything = cases.select_cases(CPU, shapes="all")
    labels = [c.label for c in everything]
    assert len(labels) == len(set(labels))  # the sweep skips the V the headline measures
    assert {c.dtype for c in cases.select_cases(CPU, dtypes=("bf16",))} == {"bf16"}
    sweep = cases.select_cases(CPU, shapes="sweep")
    assert sweep and all(c.sweep for c in sweep)
    assert not any(c.sweep for c in cases.select_cases(CPU, shapes="headline"))
    assert cases.Case("huber", "fp32", (1000,)).label == "huber fp32 1000 fwd+bwd"
    assert cases.Case("huber", "fp32", (1 << 20,), target_grad=True).label == "huber fp32 2^20 +target grad fwd+bwd"
    assert cases.make_provider("focal", "liger", CPU) == "liger has no focal loss"
    with pytest.raises(ValueError, match="shapes must be one of"):
        cases.select_cases(CPU, shapes="some")


def test_command_line_refuses_an_empty_or_unknown_selection(capsys):
    for bad in (",", "ce,nope"):
        with pytest.raises(SystemExit):
            bench_main.parse_args(["--losses", bad])
        assert "expected a comma-separated subset of" in capsys.readouterr().err
    assert bench_main.parse_args(["--losses", " ce , huber "]).losses == ("ce", "huber")


@pytest.mark.parametrize("argv, message", [
    (["--copy-mib", "0"], "expected an integer >= 1, got 0"),
    (["--copy-mib", "-1"], "expected an integer >= 1, got -1"),
    (["--threads", "-1"], "expected an integer >= 0, got -1"),
    (["--merge"], "--merge needs --save DIR"),
])  # fmt: skip
def test_command_line_refuses_a_size_below_one_and_merge_without_save(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_train_curves_with_a_nan_do_not_agree(monkeypatch):
    """A NaN step anywhere on a curve is disagreement, even where max() of the differences skips it."""
    curves = {"torch": [3.0, 2.0, 1.0], "fastloss": [3.0, float("nan"), 1.0]}
    monkeypatch.setattr(train, "train", lambda cfg, name, *a: {"losses": curves[name]})
    result = train.run(train.CONFIGS["cpu"], CPU, verbose=False)
    assert result["max_rel_diff"] == 0.0 and not result["agree"]


def test_gpu_only_options_fail_with_a_message_without_cuda(monkeypatch, capsys):
    """Asked for CUDA where there is none, each entry point stops before any work with a usage error
    (exit status 2), not a traceback; --list still lists the CUDA cases."""
    from bench import tune_ce

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for main, argv in ((bench_main.main, ["--device", "cuda"]), (train.main, ["--device", "cuda"]),
                       (tune_ce.main, [])):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert bench_main.main(["--device", "cuda", "--list"]) == 0
    assert "8192×128256" in capsys.readouterr().out


def test_providers_of_cross_entropy_alone_run_only_its_cases(monkeypatch, capsys):
    """--providers liger (or cce): unavailable, the run stops before any work; available, the cases of
    the other losses, which it has not, are left out instead of failing the report."""
    args = ["--quick", "--device", "cpu", "--dtypes", "fp32", "--modes", "fwd", "--copy-mib", "16"]
    assert bench_main.main(args + ["--providers", "liger"]) == 2
    captured = capsys.readouterr()
    assert "no provider to run (liger: skipped" in captured.err and "copy bandwidth" not in captured.out

    real = bench_main.make_provider
    monkeypatch.setattr(bench_main, "make_provider", lambda loss, name, device: (
        cases.Provider(name, cases.TORCH_FNS[loss]) if name == "liger" and loss == "ce" else real(loss, name, device)))
    assert bench_main.main(args + ["--providers", "liger", "--losses", "ce,huber", "--list"]) == 0
    listed = capsys.readouterr().out.split("\n")
    assert listed[0].startswith("ce ") and not any("huber" in line for line in listed)
    assert bench_main.main(args + ["--providers", "liger", "--losses", "ce,huber"]) == 0
    printed = capsys.readouterr().out
    assert "▸ ce fp32" in printed and "huber" not in printed


def test_a_save_folder_that_cannot_be_written_fails_before_the_run(tmp_path, capsys):
    """--save into a path that is a file (or under one): python -m bench and bench.train stop before
    measuring anything, with exit status 2, where they failed with a traceback after the first case
    (after the whole training)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for where in (blocker, blocker / "sub"):
        args = ["--quick", "--device", "cpu", "--losses", "huber", "--dtypes", "fp32", "--copy-mib", "16"]
        assert bench_main.main(args + ["--save", str(where)]) == 2
        captured = capsys.readouterr()
        assert "error: --save: cannot write into" in captured.err and "copy bandwidth" not in captured.out
        with pytest.raises(SystemExit) as exc:
            train.main(["--config", "cpu", "--save", str(where)])
        assert exc.value.code == 2
        captured = capsys.readouterr()
        assert "--save: cannot write into" in captured.err and "TinyLM" not in captured.out
    assert report.unwritable(str(tmp_path / "new" / "folder")) is None  # created
    assert (tmp_path / "new" / "folder").is_dir() and not any((tmp_path / "new" / "folder").iterdir())


def test_report_prints_the_readme_table_and_refuses_a_folder_without_results(tmp_path, capsys):
    """python -m bench.report DIR: the table of DIR's results.json; --help, a folder with no results.json
    and one with nothing fastloss ran are usage errors (exit status 2), not an empty table."""
    with pytest.raises(SystemExit) as exc:
        report.main(["--help"])
    assert exc.value.code == 0 and "results.json" in capsys.readouterr().out
    for recs in (None, []):
        if recs is not None:
            (tmp_path / "results.json").write_text(json.dumps(recs))
        with pytest.raises(SystemExit) as exc:
            report.main([str(tmp_path)])
        assert exc.value.code == 2 and "python -m bench.report: error:" in capsys.readouterr().err
    meta = report.run_meta(CPU, 1e10)
    rows = [{"case": "huber fp32 2^20 fwd+bwd", "provider": "fastloss", "status": "ok", "sweep": False,
             "pct_floor": 50.0, "ms": 1.0, "goal_pct": None}]
    report.save(str(tmp_path), rows, meta, plots=False)
    assert report.main([str(tmp_path)]) == 0
    assert "| huber fp32 2^20 fwd+bwd | 50.0% 1.00 ms |" in capsys.readouterr().out


def test_sass_refuses_a_dtype_the_kernels_do_not_read(capsys):
    from bench import sass

    for bad in ("float16", "fp64"):
        with pytest.raises(SystemExit) as exc:
            sass.main(["--dtype", bad])
        assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_plot_redraws_a_saved_sweep_and_refuses_a_folder_without_one(tmp_path, capsys):
    """python -m bench.plot DIR: the V-sweep PNGs of DIR's results.json (it printed nothing and did
    nothing before); no results.json, or no sweep in it, is a usage error."""
    with pytest.raises(SystemExit) as exc:
        plot.main([str(tmp_path)])
    assert exc.value.code == 2 and "no results.json" in capsys.readouterr().err
    meta = report.run_meta(CPU, 1e10)
    rows = [{"case": f"ce fp32 256×{v} fwd+bwd", "loss": "ce", "dtype": "fp32", "shape": f"256×{v}", "mode": "fwdbwd",
             "loss_div": 1, "sweep": True, "provider": "fastloss", "status": "ok", "gbps": 5.0} for v in (1024, 2048)]
    report.save(str(tmp_path), rows, meta, plots=False)
    with pytest.raises(SystemExit) as exc:
        plot.main([str(tmp_path)])
    assert exc.value.code == 2 and "no V sweep" in capsys.readouterr().err
    if not HAVE_MATPLOTLIB:
        return
    rows.append(dict(rows[0], case="ce fp32 256×4096 fwd+bwd", shape="256×4096"))
    report.save(str(tmp_path), rows, meta, plots=False)
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / "ce_fp32_fwdbwd_N256.png").read_bytes()[:4] == b"\x89PNG"
