"""``python -m bench.sass``: compile the kernels for an H100 (sm_90) on any machine and report what
costs no GPU time: registers, spills, shared memory, and the SASS instruction mix.

Triton's own ptxas and nvdisasm do the work, so no GPU is needed. Run it with TRITON_INTERPRET unset.
A kernel whose SASS shows local-memory traffic (LDL/STL) or few 128-bit loads (LDG.E.128) is
slower than its byte count suggests; the instruction count per element bounds how fast an
elementwise or row kernel can be when it is not waiting on memory.

The cross-entropy variants are the ones the default launch (``launch_config``) picks for the
benchmark's headline shapes. For a kernel that sweeps a row in chunks, the static count says little:
each loop's body is reported with its instructions per element (one chunk's values per thread), and
the code outside the loops, which a program runs once, per element of the program's segment.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes, by --dtype


def compile_sm90(kernel, signature: dict, constexprs: dict, num_warps: int, aligned: tuple[str, ...] = (),
                 maxnreg: int | None = None):
    """Compiles ``kernel`` as a launch would: pointers and the integer arguments named in ``aligned``
    are known to be multiples of 16 (Triton specializes arguments that are), which is what lets
    it vectorize loads and stores. Fused multiply-adds, and the register cap (``maxnreg``), as the
    launches ask for them."""
    from fastloss.kernels.common import FP_FUSION

    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name in aligned or str(signature.get(name, "")).startswith("*")}
    return triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=TARGET,
                          options={"num_warps": num_warps, "enable_fp_fusion": FP_FUSION, "maxnreg": maxnreg})


def _nvidia_tool(name: str, compiled, *args: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([path, *args, f.name], capture_output=True, text=True, check=True).stdout


_INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s+`\((\.L_x_\d+)\)")


@dataclass
class Sass:
    """A kernel's SASS: the opcodes in order, and its loops as (first, last) opcode indices (a
    branch back to a label earlier in the code closes a loop). Subroutines placed after the kernel's
    body (the slow paths of a correctly rounded division, say) are left out: they run rarely."""

    ops: list[str]
    loops: list[tuple[int, int]]

    @classmethod
    def of(cls, compiled) -> Sass:
        ops: list[str] = []
        labels: dict[str, int] = {}
        loops = []
        for line in _nvidia_tool("nvdisasm", compiled, "-c").splitlines():
            if line.startswith("$__internal"):
                break
            if m := _LABEL.match(line):
                labels[m.group(1)] = len(ops)
            elif m := _INSTRUCTION.match(line):
                b = _BRANCH.search(line)
                if b and b.group(1) in labels:
                    loops.append((labels[b.group(1)], len(ops)))
                ops.append(m.group(1))
        return cls(ops, loops)

    def loop_ops(self, loop: tuple[int, int]) -> list[str]:
        return self.ops[loop[0]:loop[1] + 1]

    def outside_loops(self) -> int:
        inside = set()
        for first, last in self.loops:
            inside.update(range(first, last + 1))
        return len(self.ops) - len(inside)


def registers(compiled) -> int:
    """Registers per thread, from the cubin's resource usage (cuobjdump)."""
    return int(re.search(r"REG:(\d+)", _nvidia_tool("cuobjdump", compiled, "-res-usage")).group(1))


def programs_per_sm(regs: int, warps: int, shared: int) -> int:
    """How many programs of a kernel an H100 SM holds at once: 64K registers (allocated per warp in
    units of 256, i.e. a multiple of 8 per thread), 64 warps, 32 blocks, 227 KiB of shared memory."""
    by_regs = 65536 // (-(-regs // 8) * 8 * 32 * warps)
    by_shared = (227 * 1024) // shared if shared else 32
    return min(by_regs, 64 // warps, 32, by_shared)


def report(name: str, compiled, per_thread: int | None = None, chunk_per_thread: int | None = None) -> None:
    """Prints the instruction mix. ``per_thread``: the values each thread handles in one program
    (gives instructions per element); ``chunk_per_thread``: the values each thread handles in one
    iteration of a sweep (gives each loop's instructions per element)."""
    sass = Sass.of(compiled)
    ops = collections.Counter(sass.ops)
    total = len(sass.ops)
    meta = compiled.metadata
    local = sum(v for k, v in ops.items() if k.startswith(("LDL", "STL")))
    mufu = sum(v for k, v in ops.items() if k.startswith("MUFU"))
    wide = sum(v for k, v in ops.items() if k.startswith(("LDG", "STG")) and k.endswith(".128"))
    per = f", {total / per_thread:.1f} per element" if per_thread and not chunk_per_thread else ""
    regs = registers(compiled)
    print(f"{name}: {total} SASS instructions{per}; MUFU {mufu}; local-memory {local}; 128-bit global "
          f"{wide}; shared {meta.shared} B; warps {meta.num_warps}; registers {regs} "
          f"({programs_per_sm(regs, meta.num_warps, meta.shared)} programs an SM)")
    if chunk_per_thread:
        executed = sass.outside_loops()
        bodies = []
        for loop in sass.loops:
            body = sass.loop_ops(loop)
            if any(op.startswith("LDG") and ".STRONG" not in op for op in body):  # a sweep: once per chunk
                executed += len(body) * (per_thread // chunk_per_thread)
                bodies.append(f"sweep {len(body)} ({len(body) / chunk_per_thread:.1f} per element)")
            else:
                bodies.append(f"loop {len(body)}")
        print(f"    loops: {', '.join(bodies)}; outside them {sass.outside_loops()} "
              f"({sass.outside_loops() / per_thread:.1f} per element of a {per_thread}-value share); "
              f"in all {executed / per_thread:.1f} per element, once through every other loop")
    print("    " + ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))


def _ce_signature(dt: str) -> dict:
    """The rows kernel's runtime arguments, for logits and gradient of dtype ``dt``."""
    return {"logits_ptr": f"*{dt}", "logits_stride": "i64", "target_ptr": "*i64", "target_stride": "i64",
            "weight_ptr": "*fp32", "div_ptr": "*fp32", "n_parts": "i32", "z_off": "i32", "grad_ptr": f"*{dt}",
            "grad_stride": "i64", "loss_ptr": "*fp32", "sync_ptr": "*i32", "stats_ptr": "*fp32", "n_rows": "i32",
            "V": "i32", "seg_len": "i32", "ignore_index": "i64", "eps": "fp32", "z_coef": "fp32", "cap": "fp32",
            "inv_cap": "fp32", "gamma": "fp32", "prediction_ptr": "*fp32", "predicted_ptr": "*fp32"}


def _ce_plain() -> dict:
    """The constexprs both cross-entropy kernels take, for a plain loss with a gradient (mean: SCALED)."""
    from fastloss.kernels.cross_entropy import PARTS

    return dict(HAS_WEIGHT=False, SMOOTH=False, ZLOSS=False, SOFTCAP=False, TANH_SERIES=False, PROB=False,
                FOCAL=False, WRITE_GRAD=True, NEED_A=False, REST=False, INTERPRET=False, SCALED=True, PARTS=PARTS)


def _cross_entropy_variants(dtype: str):
    """(name, constexprs, warps, values per thread, values per thread per chunk or None, the integer
    arguments Triton knows to be multiples of 16) for the default launches of the benchmark's headline
    shapes, and of GPT-2's vocabulary (V = 50257: rows off 16-byte boundaries, SHIFT in the kernel), as
    ``cross_entropy_fwd`` derives them."""
    from fastloss.kernels.common import cdiv
    from fastloss.kernels.cross_entropy import MAX_SEGMENTS, STATS, _default_config, row_shift, segment_length

    plain = dict(_ce_plain(), STATS=STATS)
    size = ELEMENT_SIZE[dtype]
    cases = [(f"{dtype} V=32768", 32768, {}), (f"{dtype} V=128256", 128256, {}),
             (f"{dtype} V=262144", 262144, {}), (f"{dtype} V=1000", 1000, {}),
             (f"{dtype} V=128256, focal", 128256, {"FOCAL": True}),
             (f"{dtype} V=256000, softcap", 256000,  # Gemma 2's vocabulary and cap (30)
              {"SOFTCAP": True, "TANH_SERIES": dtype == "fp32"}),
             (f"{dtype} V=128256, forward only", 128256, {"WRITE_GRAD": False}),
             (f"{dtype} V=50257, rows off 16-byte boundaries", 50257, {})]
    for name, v, extra in cases:
        write_grad = extra.get("WRITE_GRAD", True)
        cfg = _default_config(v, size, MAX_SEGMENTS if write_grad else 0, write_grad)  # an H100's
        segments = max(cfg.segments, 1)
        # the shift of contiguous logits of this element size (a 16-byte aligned allocation)
        shift = row_shift(torch.empty(2, v, dtype={2: torch.bfloat16, 4: torch.float32}[size]), None)
        seg_len = segment_length(v, segments, cfg.block, shift) if cfg.segments else v
        single = seg_len <= cfg.block
        threads = 32 * cfg.num_warps
        # the headline's mean loss predicts grad_output when it writes a gradient (autograd._PREDICTIONS)
        constexprs = dict(plain, BLOCK=cfg.block, SINGLE=single, SPLIT=cfg.segments > 0, SEGMENTS=segments,
                          SHIFT=shift, **cfg.kernel_constexprs, PREDICT=write_grad, **extra)
        label = (f"{name}: BLOCK={cfg.block} warps={cfg.num_warps} "
                 + (f"segments={segments} of {seg_len}" if cfg.segments else "one row per program"))
        aligned = ("seg_len",) if shift else ("logits_stride", "grad_stride", "V", "seg_len")
        yield (label, constexprs, cfg.num_warps, cdiv(min(seg_len, v), threads),
               None if single else cfg.block // threads, aligned)


def _report_columns(dt: str) -> None:
    """The columns kernel at the benchmark's segmentation shape (ce_seg: 19 classes), its mean loss with
    a gradient, in both layouts: contiguous (classes strided in memory, positions contiguous) and
    channels_last (classes contiguous, positions 19 apart: rows too narrow for the rows kernel, see
    functional._narrow_rows). Each loop steps through one class for every position of the thread's,
    so a loop's instructions per element are per position a class."""
    from fastloss.kernels.cross_entropy import _cross_entropy_columns_kernel, _default_config, columns_config

    classes = 19
    # the rows kernel on such rows at its default launch (several a program; what functional._rows sends
    # to the columns kernel instead, see _COLUMNS_MAX_ROW_COST)
    _report_rows_in_one_chunk(dt, classes, _default_config(classes, ELEMENT_SIZE[dt], 0), "rows kernel")
    cfg = columns_config(classes)
    positions = cfg.block // (32 * cfg.num_warps)
    for layout, unit in (("(N, C, H, W)", "d"), ("channels_last", "c")):
        strided = "c" if unit == "d" else "d"  # the other of the two strides, an argument
        sig = {"logits_ptr": f"*{dt}", "x_sn": "i64", f"x_s{strided}": "i64", "target_ptr": "*i64", "t_sn": "i64",
               "t_sc": "i64", "t_sd": "i64", "weight_ptr": "*fp32", "div_ptr": "*fp32", "n_parts": "i32",
               "z_off": "i32", "grad_ptr": f"*{dt}", "g_sn": "i64", f"g_s{strided}": "i64", "loss_ptr": "*fp32",
               "prediction_ptr": "*fp32", "predicted_ptr": "*fp32", "P": "i64", "D": "i64", "V": "i32",
               "ignore_index": "i64", "eps": "fp32", "z_coef": "fp32", "cap": "fp32", "inv_cap": "fp32",
               "gamma": "fp32"}
        constexprs = dict(_ce_plain(), PREDICT=True, BLOCK=cfg.block, ROW_BLOCKS=True,  # (H W positions a row)
                          **{f"x_s{unit}": 1, f"g_s{unit}": 1})  # (strides of 1: constants)
        # a class's stride is H W (a multiple of 16), a position's in channels_last 19
        aligned = ("x_sn", "g_sn", "D") + (("x_sc", "g_sc") if unit == "d" else ())
        c = compile_sm90(_cross_entropy_columns_kernel, sig, constexprs, cfg.num_warps, aligned=aligned)
        report(f"cross-entropy {dt} {layout}, {classes} classes, columns kernel: {cfg.block} positions a "
               f"program, warps={cfg.num_warps}", c)
        # The compiler unrolls a sweep over the classes (a loop of several class steps, and one of the
        # rest): a loop's class steps are its loads of the logits, a vector of the thread's positions a
        # step where they are contiguous, else one load a position.
        sass = Sass.of(c)
        sweeps = []
        for loop in sass.loops:
            body = sass.loop_ops(loop)
            loads = sum(op.startswith("LDG") for op in body)
            if loads:
                steps = loads if unit == "d" else loads / positions
                plural = "s" if steps > 1 else ""
                sweeps.append(f"{len(body) / (steps * positions):.1f} ({steps:g} step{plural} a loop)")
        print(f"    per element, a class step of a sweep: {', '.join(sweeps)}; outside the loops "
              f"{sass.outside_loops() / positions:.0f} a position ({sass.outside_loops() / (positions * classes):.1f} "
              f"per element at {classes} classes)")


def _report_rows_in_one_chunk(dt: str, v: int, cfg, note: str = "") -> None:
    """The rows kernel's launch ``cfg`` on rows of ``v`` columns that fit one chunk (plain mean loss,
    a gradient), aligned to 16 bytes where v values are (as Triton specializes the launch)."""
    from fastloss.kernels.cross_entropy import STATS, _cross_entropy_kernel

    aligned = ("logits_stride", "grad_stride", "V", "seg_len") if v * ELEMENT_SIZE[dt] % 16 == 0 else ()
    c = compile_sm90(_cross_entropy_kernel, _ce_signature(dt), dict(_ce_plain(), STATS=STATS, BLOCK=cfg.block,
                     SINGLE=True, SPLIT=False, SEGMENTS=1, PREDICT=True, SHIFT=0, **cfg.kernel_constexprs),
                     cfg.num_warps, aligned=aligned)
    report(f"cross-entropy {dt} V={v}{note and f', {note}'}: BLOCK={cfg.block} warps={cfg.num_warps} "
           f"rows={cfg.rows} a program", c, v * cfg.rows / (32 * cfg.num_warps))


def _report_short_rows(dt: str) -> None:
    """Short rows at their default launch (several a program up to 256 columns, ROWS in the kernel)
    beside one row a program of one warp, what they ran before (bench/NOTES.md, section 29): a
    tagger's 50 classes and ADE20K's 150, rows not aligned to 16 bytes in 16 bits (no vector loads),
    and 64, aligned. Plain mean loss with a gradient."""
    import dataclasses

    from fastloss.kernels.cross_entropy import _default_config

    for v in (50, 64, 150):
        default = _default_config(v, ELEMENT_SIZE[dt], 0)
        _report_rows_in_one_chunk(dt, v, default)
        _report_rows_in_one_chunk(dt, v, dataclasses.replace(default, rows=1), "one a program, as before section 29")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=tuple(ELEMENT_SIZE), default="bf16",
                        help="the logits' (and elementwise inputs') dtype (default: bf16)")
    parser.add_argument("--reduce", action="store_true",
                        help="compile the elementwise kernels' reduced-loss variants (one partial per program)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile")

    from fastloss.kernels.cross_entropy import _cross_entropy_kernel
    from fastloss.kernels.focal import _sigmoid_focal_kernel, maxnreg
    from fastloss.kernels.huber import _huber_kernel

    dt = args.dtype
    ce_sig = _ce_signature(dt)
    for name, constexprs, warps, per_thread, chunk_per_thread, aligned in _cross_entropy_variants(dt):
        c = compile_sm90(_cross_entropy_kernel, ce_sig, constexprs, warps, aligned=aligned)
        report(f"cross-entropy {name}", c, per_thread, chunk_per_thread)
    _report_columns(dt)
    _report_short_rows(dt)
    out = {"out_ptr": "*fp32" if args.reduce else f"*{dt}"}
    predict = {"prediction_ptr": "*fp32", "predicted_ptr": "*fp32"}  # used with reduce
    ew = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": f"*{dt}", **out, "gx_ptr": f"*{dt}",
          "gy_ptr": f"*{dt}", "n": "i64", "beta": "fp32", "inv_beta": "fp32", "c": "fp32",
          "cap_c": "fp32", "w_bound": "fp32", **predict, "wmax_ptr": f"*{dt}", "div_ptr": "*fp32"}
    for block, warps in [(4096, 8), (8192, 8), (16384, 16)]:
        c = compile_sm90(_huber_kernel, ew, dict(BLOCK=block, INTERPRET=False, L1=False, INF_DELTA=False,
                                                 HAS_WEIGHT=False, REDUCE=args.reduce, WRITE_GRAD_INPUT=True,
                                                 WRITE_GRAD_TARGET=False, PREDICT=args.reduce, WMAX=False,
                                                 DIVIDE=False), warps,
                         aligned=("n",))
        report(f"huber BLOCK={block} warps={warps}", c, block // (32 * warps))
        c = compile_sm90(_sigmoid_focal_kernel,
                         {"x_ptr": f"*{dt}", "t_ptr": f"*{dt}", **out, "gx_ptr": f"*{dt}", "n": "i64",
                          "k1": "fp32", "k0": "fp32", "gamma": "fp32", "scale": "fp32", **predict,
                          "div_ptr": "*fp32"},
                         dict(BLOCK=block, INTERPRET=False, GAMMA_INT=2, REDUCE=args.reduce,
                              WRITE_GRAD_INPUT=True, PREDICT=args.reduce, DIVIDE=False), warps, aligned=("n",),
                         maxnreg=maxnreg(ELEMENT_SIZE[dt]))
        report(f"sigmoid focal BLOCK={block} warps={warps}", c, block // (32 * warps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
