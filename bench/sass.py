"""``python -m bench.sass``: compile the kernels for an H100 (sm_90) on any machine and report what
costs no GPU time: registers, spills, shared memory, and the SASS instruction mix.

Triton's own ptxas and nvdisasm do the work, so no GPU is needed. Run it with TRITON_INTERPRET unset.
A kernel whose SASS shows local-memory traffic (LDL/STL) or few 128-bit loads (LDG.E.128) is
slower than its byte count suggests; the instruction count per element bounds how fast an
elementwise or row kernel can be when it is not waiting on memory.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def compile_sm90(kernel, signature: dict, constexprs: dict, num_warps: int, aligned: tuple[str, ...] = ()):
    """Compiles ``kernel`` as a launch would: pointers and the integer arguments named in ``aligned``
    are known to be multiples of 16 (Triton specializes arguments that are), which is what lets
    it vectorize loads and stores."""
    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name in aligned or str(signature.get(name, "")).startswith("*")}
    return triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=TARGET, options={"num_warps": num_warps})


def sass_mix(compiled) -> collections.Counter:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def registers(compiled) -> int:
    """Registers per thread, from the cubin's resource usage (cuobjdump)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1))


def report(name: str, compiled, elements_per_thread: int | None = None) -> None:
    ops = sass_mix(compiled)
    total = sum(ops.values())
    meta = compiled.metadata
    local = sum(v for k, v in ops.items() if k.startswith(("LDL", "STL")))
    mufu = sum(v for k, v in ops.items() if k.startswith("MUFU"))
    wide = sum(v for k, v in ops.items() if k.startswith(("LDG", "STG")) and k.endswith(".128"))
    per = f", {total / elements_per_thread:.1f} per element" if elements_per_thread else ""
    print(f"{name}: {total} SASS instructions{per}; MUFU {mufu}; local-memory {local}; 128-bit global "
          f"{wide}; shared {meta.shared} B; warps {meta.num_warps}; registers {registers(compiled)}")
    top = ", ".join(f"{k} {v}" for k, v in ops.most_common(12))
    print(f"    {top}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--reduce", action="store_true",
                        help="compile the elementwise kernels' reduced-loss variants (one partial per program)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile")

    from fastloss.kernels.cross_entropy import PARTS, STATS, _cross_entropy_kernel
    from fastloss.kernels.focal import _sigmoid_focal_kernel
    from fastloss.kernels.huber import _huber_kernel

    dt = args.dtype
    ce_sig = {"logits_ptr": f"*{dt}", "logits_stride": "i64", "target_ptr": "*i64", "target_stride": "i64",
              "weight_ptr": "*fp32", "div_ptr": "*fp32", "n_parts": "i32", "z_off": "i32", "grad_ptr": f"*{dt}",
              "grad_stride": "i64",
              "loss_ptr": "*fp32", "sync_ptr": "*i32", "stats_ptr": "*fp32", "V": "i32", "seg_len": "i32",
              "ignore_index": "i64", "eps": "fp32", "z_coef": "fp32", "cap": "fp32", "inv_cap": "fp32",
              "gamma": "fp32"}
    plain = dict(HAS_WEIGHT=False, SMOOTH=False, ZLOSS=False, SOFTCAP=False, PROB=False, FOCAL=False,
                 WRITE_GRAD=True, NEED_A=False, REST=False, INTERPRET=False, SCALED=True, REVERSE=True,
                 STATS=STATS, PARTS=PARTS)
    for block, warps, single, split, segs in [(8192, 8, False, False, 1), (8192, 8, True, True, 16),
                                              (16384, 16, True, True, 8), (1024, 2, True, False, 1)]:
        c = compile_sm90(_cross_entropy_kernel, ce_sig,
                         dict(plain, BLOCK=block, SINGLE=single, SPLIT=split, SEGMENTS=segs), warps,
                         aligned=("logits_stride", "grad_stride", "V", "seg_len"))
        report(f"cross-entropy BLOCK={block} warps={warps} single={single} split={split}", c,
               block // (32 * warps) if single else None)
    out = {"out_ptr": "*fp32" if args.reduce else f"*{dt}"}
    ew = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": f"*{dt}", **out, "gx_ptr": f"*{dt}",
          "gy_ptr": f"*{dt}", "n": "i64", "beta": "fp32", "inv_beta": "fp32", "c": "fp32"}
    for block, warps in [(4096, 8), (8192, 8), (16384, 16)]:
        c = compile_sm90(_huber_kernel, ew, dict(BLOCK=block, INTERPRET=False, L1=False, HAS_WEIGHT=False,
                                                 REDUCE=args.reduce, WRITE_GRAD_INPUT=True, WRITE_GRAD_TARGET=False), warps,
                         aligned=("n",))
        report(f"huber BLOCK={block} warps={warps}", c, block // (32 * warps))
        c = compile_sm90(_sigmoid_focal_kernel,
                         {"x_ptr": f"*{dt}", "t_ptr": f"*{dt}", **out, "gx_ptr": f"*{dt}", "n": "i64",
                          "k1": "fp32", "k0": "fp32", "gamma": "fp32"},
                         dict(BLOCK=block, INTERPRET=False, GAMMA_INT=2, REDUCE=args.reduce,
                              WRITE_GRAD_INPUT=True), warps, aligned=("n",))
        report(f"sigmoid focal BLOCK={block} warps={warps}", c, block // (32 * warps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
