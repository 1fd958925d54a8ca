"""pytest-benchmark suite: fastloss against torch.nn for every loss, on whatever device is present.

    pytest bench --benchmark-only                # the timings, grouped per loss
    pytest bench --benchmark-only --benchmark-json out.json

The default ``pytest`` run does not collect this file (``testpaths = ["tests"]``). On CPU the shapes are
tiny and the rounds few, so the whole suite takes seconds; on CUDA it uses the issues' shapes.
Timings are wall-clock (pytest-benchmark's clock) with a device synchronize inside each call; the
CUDA-event numbers of ``python -m bench`` are the ones to quote.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.cases import FASTLOSS_FNS, LOSSES, TORCH_FNS, Case
from bench.harness import make_input_sets, make_step

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

if CUDA:
    CASES = {
        "ce": Case("ce", "bf16", (8192, 128256)),
        "ce_softcap": Case("ce_softcap", "bf16", (8192, 256000)),
        "ce_tokens": Case("ce_tokens", "bf16", (8192, 128256)),
        "ce_seg": Case("ce_seg", "bf16", (8, 19, 512, 1024)),
        "focal": Case("focal", "bf16", (8192, 128256)),
        "sigmoid_focal": Case("sigmoid_focal", "bf16", (1 << 20, 80)),
        "huber": Case("huber", "bf16", (1 << 27,)),
        "smooth_l1": Case("smooth_l1", "fp32", (1 << 27,)),
    }
    ROUNDS, WARMUP = 50, 5
else:
    CASES = {
        "ce": Case("ce", "fp32", (128, 2048)),
        "ce_softcap": Case("ce_softcap", "fp32", (128, 2048)),
        "ce_tokens": Case("ce_tokens", "fp32", (128, 2048)),
        "ce_seg": Case("ce_seg", "fp32", (2, 19, 32, 32)),
        "focal": Case("focal", "fp32", (128, 2048)),
        "sigmoid_focal": Case("sigmoid_focal", "fp32", (2048, 80)),
        "huber": Case("huber", "fp32", (1 << 16,)),
        "smooth_l1": Case("smooth_l1", "fp32", (1 << 16,)),
    }
    ROUNDS, WARMUP = 20, 2

PROVIDERS = {"fastloss": FASTLOSS_FNS, "torch": TORCH_FNS}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """On CPU, time with one thread as ``python -m bench`` does (steady on small shared machines)."""
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _synchronized(step):
    if not CUDA:
        return step

    def run():
        step()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["fwdbwd", "fwd"])
@pytest.mark.parametrize("loss", LOSSES)
def test_loss(benchmark, loss, mode, provider):
    case = dataclasses.replace(CASES[loss], mode=mode)
    benchmark.group = f"{loss} {case.dtype} {case.shape_str} {mode}"
    benchmark.extra_info.update(device=DEVICE.type, bytes=case.floor_bytes())
    input_sets = make_input_sets(case, DEVICE)
    step = _synchronized(make_step(PROVIDERS[provider][loss], input_sets, mode))
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
