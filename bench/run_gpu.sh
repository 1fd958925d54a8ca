#!/usr/bin/env bash
# One GPU session's checks, in order, each logged under OUT (default bench-out/) and each bounded in
# time (seconds, overridable) so that the whole fits a 10-minute slot (the limits add up to 580 s; the
# whole took 255 s on an H100 on 2026-11-23, tests 95 + 21 s, headline bench 49 s):
#   1. the test suite natively at full size: large shapes, N·V > 2^31, torch.compile, CUDA graphs
#      (the full-size tests run 3 at a time: each holds up to ~20 GB);
#   2. the benchmark's headline shapes with every provider, then the V sweep (fastloss and torch
#      eager) for the plots, both into OUT/results (the bench saves after every case);
#   3. the end-to-end training comparison, the host path of one step (python -m bench.host), and
#      what fastloss's direct launches of compiled kernels save a step (bench.host --direct-ab);
#   4. OUT/results.tgz, which unpacks into bench/results/ to commit (gpu_tests.txt: the tests' summary
#      and their failures' assertions).
# Usage: bash bench/run_gpu.sh [OUT]
set -uo pipefail
out=${1:-bench-out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $py -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/device.txt"

parallel=""
$py -c "import xdist" 2>/dev/null && parallel="-n 8"
large="large or 2_31 or 2_pow_31 or cuda_graph"
timeout "${TESTS_S:-140}" $py -m pytest tests -q -p no:cacheprovider $parallel -k "not ($large)" >"$out/tests.log" 2>&1
timeout "${LARGE_S:-60}" $py -m pytest tests -q -p no:cacheprovider ${parallel:+-n 3} -k "$large" >>"$out/tests.log" 2>&1
mkdir -p "$out/results"
{ cat "$out/device.txt"
  echo
  echo "python -m pytest tests at full size, in two runs (the full-size tests 3 at a time), at $(git describe --always --dirty 2>/dev/null) ($(date +%F)):"
  grep -E "passed|failed|^FAILED|^ERROR" "$out/tests.log"
  if grep -q "^FAILED\|^ERROR" "$out/tests.log"; then  # what each failure asserted, for the notes
    echo; echo "assertions (the first 60 lines):"
    grep -E "^E  |^_{3,} test" "$out/tests.log" | cut -c1-400 | head -60
  fi
} >"$out/results/gpu_tests.txt"
cat "$out/results/gpu_tests.txt"

timeout "${BENCH_S:-180}" $py -m bench --shapes headline --save "$out/results" >"$out/bench.log" 2>&1
tail -24 "$out/bench.log"
timeout "${SWEEP_S:-60}" $py -m bench --shapes sweep --providers fastloss,torch --save "$out/results" --merge \
    >"$out/bench_sweep.log" 2>&1
tail -3 "$out/bench_sweep.log"
timeout "${TRAIN_S:-70}" $py -m bench.train --save "$out/results" >"$out/train.log" 2>&1
tail -6 "$out/train.log"
timeout "${HOST_S:-40}" $py -m bench.host >"$out/results/host.txt" 2>&1
cat "$out/results/host.txt"
timeout "${DIRECT_S:-30}" $py -m bench.host --direct-ab --reps 50 >"$out/results/host_direct.txt" 2>&1
cat "$out/results/host_direct.txt"
tar czf "$out/results.tgz" -C "$out" results && rm -rf "$out/results"
