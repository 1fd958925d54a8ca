"""Compiles representative variants of every kernel for an H100 (sm_90) without a GPU.

Run by tests/test_gpu_compile.py in a subprocess with TRITON_INTERPRET=0: under the interpreter
``@triton.jit`` gives interpreted functions, which cannot be compiled. Triton's full pipeline
(frontend, LLVM, ptxas) rejects code that the interpreter accepts, such as a plain Python global
inside a kernel or a loop-carried value that changes type.
"""

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastloss.kernels.common import FP_FUSION, _scale_grad_kernel, _sum_kernel
from fastloss.kernels.cross_entropy import (PARTS, STATS, LaunchConfig, _cross_entropy_columns_kernel,
                                            _cross_entropy_kernel, _prologue_kernel)
from fastloss.kernels.focal import _sigmoid_focal_kernel
from fastloss.kernels.huber import _huber_kernel

TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(kernel, runtime: dict, constexprs: dict, num_warps: int = 8) -> None:
    signature = {**runtime, **{name: "constexpr" for name in constexprs}}
    triton.compile(ASTSource(kernel, signature, constexprs), target=TARGET,
                   options={"num_warps": num_warps, "enable_fp_fusion": FP_FUSION})


def cross_entropy_variants():
    for dt, (prob, smooth, z, cap, focal, weight), (single, split, rows) in itertools.product(
        ["bf16", "fp32"],
        [(0, 0, 0, 0, 0, 0), (0, 1, 1, 1, 0, 1), (1, 1, 1, 1, 0, 1), (0, 0, 0, 1, 1, 1), (1, 0, 0, 0, 0, 0)],
        [(False, False, 1), (True, False, 1), (True, True, 1), (False, True, 1), (True, False, 4)],
    ):
        runtime = {"logits_ptr": f"*{dt}", "logits_stride": "i64", "target_ptr": "*fp32" if prob else "*i64",
                   "target_stride": "i64", "weight_ptr": "*fp32", "div_ptr": "*fp32", "n_parts": "i32", "z_off": "i32",
                   "grad_ptr": f"*{dt}",
                   "grad_stride": "i64", "loss_ptr": "*fp32" if single else f"*{dt}",  # fp32: reduced
                   "n_rows": "i32", "V": "i32", "ignore_index": "i64", "eps": "fp32",
                   "z_coef": "fp32", "cap": "fp32", "inv_cap": "fp32", "gamma": "fp32", "sync_ptr": "*i32",
                   "stats_ptr": "*fp32", "seg_len": "i32", "prediction_ptr": "*fp32", "predicted_ptr": "*fp32"}
        # chunked sweeps pipelined by Triton (a split one: both sweeps), a split launch's wait asleep
        # between polls (the default sleep_ns), a row in one chunk at the default's 2 warps
        # (SINGLE_ROW_VALUES a thread), short rows 4 a program of one warp (ROWS_VALUES)
        launch = LaunchConfig(block=8192 if split else 256 if rows > 1 else 1024 if single else 4096,
                              num_warps=1 if rows > 1 else 2 if single and not split else 8,
                              stages=0 if single else 4 if split else 3, stages2=4 if split and not single else 0,
                              rows=rows, **({} if split else {"sleep_ns": 0}))
        # softcap's tanh with its series: fp32, and (as a cap past FAST_TANH_MAX_CAP) bf16 probabilities
        constexprs = dict(HAS_WEIGHT=bool(weight), SMOOTH=bool(smooth), ZLOSS=bool(z), SOFTCAP=bool(cap),
                          TANH_SERIES=bool(cap) and (dt == "fp32" or bool(prob)), PROB=bool(prob),
                          FOCAL=bool(focal), WRITE_GRAD=True, NEED_A=bool(prob or smooth),
                          REST=bool(prob or smooth or z), INTERPRET=False, SCALED=True,
                          BLOCK=launch.block, SINGLE=single, SPLIT=split, SEGMENTS=16 if split else 1,
                          STATS=STATS, PARTS=PARTS, PREDICT=single != split, SHIFT=0, **launch.kernel_constexprs)
        yield _cross_entropy_kernel, runtime, constexprs, launch.num_warps
        if rows == 1 and not prob and (split or not single):  # rows off 16-byte boundaries, swept in chunks
            yield _cross_entropy_kernel, runtime, {**constexprs, "SHIFT": 8 if dt == "bf16" else 4}, launch.num_warps
        if dt == "bf16" and constexprs["PREDICT"]:  # fp16 takes its own prediction branch (a mean or not)
            yield (_cross_entropy_kernel, {**runtime, "logits_ptr": "*fp16", "grad_ptr": "*fp16"},
                   {**constexprs, "SCALED": bool(weight)}, launch.num_warps)
    # the columns kernel ((N, C, D) logits, classes strided): the same families of options, each dtype
    for dt, (prob, smooth, z, cap, focal, weight) in itertools.product(
        ["bf16", "fp32", "fp16"],
        [(0, 0, 0, 0, 0, 0), (0, 1, 1, 1, 0, 1), (1, 1, 1, 1, 0, 1), (0, 0, 0, 1, 1, 1), (1, 0, 0, 0, 0, 0)],
    ):
        runtime = {"logits_ptr": f"*{dt}", "x_sn": "i64", "x_sc": "i64", "x_sd": "i64",
                   "target_ptr": "*fp32" if prob else "*i64", "t_sn": "i64", "t_sc": "i64", "t_sd": "i64",
                   "weight_ptr": "*fp32", "div_ptr": "*fp32", "n_parts": "i32", "z_off": "i32", "grad_ptr": f"*{dt}",
                   "g_sn": "i64", "g_sc": "i64", "g_sd": "i64", "loss_ptr": "*fp32",
                   "prediction_ptr": "*fp32", "predicted_ptr": "*fp32", "P": "i64", "D": "i32", "V": "i32",
                   "ignore_index": "i64", "eps": "fp32", "z_coef": "fp32", "cap": "fp32", "inv_cap": "fp32",
                   "gamma": "fp32"}
        constexprs = dict(HAS_WEIGHT=bool(weight), SMOOTH=bool(smooth), ZLOSS=bool(z), SOFTCAP=bool(cap),
                          TANH_SERIES=bool(cap) and (dt == "fp32" or bool(prob)), PROB=bool(prob),
                          FOCAL=bool(focal), WRITE_GRAD=True, NEED_A=bool(prob or smooth),
                          REST=bool(prob or smooth or z), INTERPRET=False, SCALED=True, PREDICT=True,
                          BLOCK=512, PARTS=PARTS, ROW_BLOCKS=not prob)
        yield _cross_entropy_columns_kernel, runtime, constexprs
        if not prob and not focal:  # narrow rows (channels_last): the class strides are 1, as launches specialize
            narrow = {k: v for k, v in runtime.items() if k not in ("x_sc", "g_sc")}
            yield _cross_entropy_columns_kernel, narrow, {**constexprs, "x_sc": 1, "g_sc": 1}
    for count, weighted, prob, zero_sync in [(1, 0, 0, 0), (1, 1, 0, 1), (1, 0, 1, 0), (0, 0, 0, 1)]:
        yield _prologue_kernel, {"target_ptr": "*fp32" if prob else "*i64", "weight_ptr": "*fp32",
                                 "parts_ptr": "*fp32", "sync_ptr": "*i32", "N": "i32", "V": "i32",
                                 "ignore_index": "i64"}, dict(
            COUNT=bool(count), WEIGHTED=bool(weighted), PROB=bool(prob), ZERO_SYNC=bool(zero_sync), BLOCK=1024)


def elementwise_variants():
    # reduced: with a prediction (fp16 takes its own branch of it); unreduced: without
    for dt, reduce in [("bf16", False), ("fp32", False), ("bf16", True), ("fp32", True), ("fp16", True)]:
        predict = {"prediction_ptr": "*fp32", "predicted_ptr": "*fp32"}
        divisor = "*i64" if dt == "fp16" else "*fp32"  # (DIVIDE with reduce: a token count as it is counted)
        for l1, inf_delta in ((False, False), (True, False), (False, True)):
            yield _huber_kernel, {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": f"*{dt}",
                                  "out_ptr": "*fp32" if reduce else f"*{dt}", "gx_ptr": f"*{dt}", "gy_ptr": f"*{dt}",
                                  "n": "i64", "beta": "fp32", "inv_beta": "fp32", "c": "fp32",
                                  "cap_c": "fp32", "w_bound": "fp32", **predict, "wmax_ptr": f"*{dt}",
                                  "div_ptr": divisor}, dict(
                BLOCK=4096, INTERPRET=False, L1=l1, INF_DELTA=inf_delta, HAS_WEIGHT=True, REDUCE=reduce,
                WRITE_GRAD_INPUT=True, WRITE_GRAD_TARGET=True, PREDICT=reduce,
                WMAX=dt == "fp16" and not l1,  # fp16 with a weight (and a prediction)
                DIVIDE=reduce)
        for gamma_int in (0, 1, 2, -1):  # each a path of its own
            yield _sigmoid_focal_kernel, {"x_ptr": f"*{dt}", "t_ptr": f"*{dt}",
                                          "out_ptr": "*fp32" if reduce else f"*{dt}", "gx_ptr": f"*{dt}",
                                          "n": "i64", "k1": "fp32", "k0": "fp32", "gamma": "fp32", "scale": "fp32",
                                          **predict, "div_ptr": divisor}, dict(
                BLOCK=4096, INTERPRET=False, GAMMA_INT=gamma_int, REDUCE=reduce,
                WRITE_GRAD_INPUT=True, PREDICT=reduce, DIVIDE=reduce)
    for dt in ("bf16", "fp16"):
        yield _sum_kernel, {"x_ptr": "*fp32", "out_ptr": f"*{dt}", "n": "i32"}, dict(INTERPRET=False, BLOCK=4096)
    for per_row, strided, predicted, pair in itertools.product([False, True], repeat=4):
        if per_row and predicted or pair and (per_row or strided):
            continue
        yield _scale_grad_kernel, {"grad_ptr": "*bf16", "other_ptr": "*bf16", "go_ptr": "*fp32",
                                   "predicted_ptr": "*fp32", "prediction_ptr": "*fp32", "n_elements": "i64",
                                   "row_len": "i64", "inner": "i64", "row_stride": "i64", "col_stride": "i64",
                                   "inner_stride": "i64"}, dict(
            PER_ROW=per_row, STRIDED=strided, PREDICTED=predicted, PAIR=pair, INTERPRET=False, BLOCK=4096)


if __name__ == "__main__":
    count = 0
    for variant in itertools.chain(cross_entropy_variants(), elementwise_variants()):
        compile_variant(*variant)  # (kernel, runtime, constexprs[, num_warps])
        count += 1
    print(f"compiled {count} kernel variants for sm_90")
    sys.exit(0)
