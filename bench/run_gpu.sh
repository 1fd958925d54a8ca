#!/usr/bin/env bash
# One GPU session's checks, in order, each logged under OUT (default bench-out/):
#   1. the test suite natively at full size (large shapes, N·V > 2^31, torch.compile, CUDA graphs);
#   2. the benchmark, into OUT/results (copy into bench/results/ to commit);
#   3. the end-to-end training comparison.
# Usage: bash bench/run_gpu.sh [OUT] [extra `python -m bench` options, e.g. --losses ce]
set -uo pipefail
out=${1:-bench-out}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$out/tests.log"
python -m bench --save "$out/results" "$@" 2>&1 | tee "$out/bench.log"
python -m bench.train --save "$out/results" 2>&1 | tee "$out/train.log"
