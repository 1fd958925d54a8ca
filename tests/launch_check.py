"""Every launch through ``common.launch`` makes the driver call that Triton's own launch path makes.

Run by tests/test_gpu_compile.py in a subprocess with TRITON_INTERPRET unset, on a machine without a
GPU: the kernels compile for an H100 (sm_90) and each launch runs up to the driver call, which
records its arguments instead of launching (bench.host's stand-in driver). Each launch that the
launchers ask for below is made three times with the same arguments: through Triton's launch path,
then twice through ``launch`` (whose first launch of a variant goes through Triton, and the next
calls the compiled kernel). The three must record the same driver call: the compiled variant, the
grid, the stream, Triton's launch hooks and every argument. The launches change what Triton
specializes on from one to the next (a tensor's address modulo 16, an int that is 1, a multiple of
16 or past int32), so that a direct launch of a variant compiled for other arguments fails here.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for its stand-in driver

from bench.host import _NoLaunchDriver, use_launch_path  # noqa: E402

CALLS: list = []


def _recorded(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr()
    return a if a is None or isinstance(a, (int, float, str, tuple)) or callable(a) else type(a).__name__


class _RecordingDriver(_NoLaunchDriver):
    @staticmethod
    def launcher_cls(src, metadata):
        return lambda *args: CALLS.append((id(metadata), *map(_recorded, args)))


def _offset(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t``'s values at an address k elements into a larger buffer (k = 1: not a multiple of 16 bytes)."""
    buf = torch.empty(t.numel() + k, dtype=t.dtype)
    out = buf[k:].view(t.shape)
    out.copy_(t)
    return out


def calls():
    """The launcher calls, each a function of no arguments."""
    from fastloss.kernels import common, cross_entropy as ce, focal, huber

    out = []
    for dtype, n, k in [(torch.float32, 4096, 0), (torch.float32, 4096, 1), (torch.float32, 17, 0),
                        (torch.float32, 1, 0), (torch.float32, 16, 1), (torch.bfloat16, 4096, 0)]:
        # n: a multiple of 16, not, 1 (a constant to Triton); k = 1: x at an address off 16 bytes
        x, y, w = _offset(torch.randn(n, dtype=dtype), k), torch.randn(n, dtype=dtype), torch.rand(n, dtype=dtype)
        for reduce in (True, False):  # a 16-bit reduce adds the sum's launch
            out.append(lambda x=x, y=y, w=w, reduce=reduce: huber.huber_fwd(
                x, y, w, beta=0.5, mul=0.5, scale=1 / x.numel(), reduce=reduce,
                grad_input=torch.empty_like(x), grad_target=None))
        out.append(lambda x=x, y=y: huber.huber_fwd(x, y, None, beta=0.0, mul=1.0, scale=1.0, reduce=True,
                                                    grad_input=None, grad_target=torch.empty_like(y),
                                                    prediction=torch.ones(1), predicted=torch.empty(1)))
        out.append(lambda x=x, y=y: focal.sigmoid_focal_fwd(x, y.sigmoid(), alpha=0.25, gamma=2.0, scale=1.0,
                                                           reduce=True, grad_input=torch.empty_like(x),
                                                           prediction=torch.ones(1), predicted=torch.empty(1)))
    for dtype, n, v, k in [(torch.float32, 16, 17, 0), (torch.float32, 16, 17, 1), (torch.bfloat16, 5, 64, 0)]:
        logits = _offset(torch.randn(n, v + k, dtype=dtype), 0)[:, k:]  # k = 1: rows off 16 bytes
        t, probs, w = torch.randint(0, v, (n,)), torch.softmax(torch.randn(n, v), -1), torch.rand(v)
        out += [
            lambda logits=logits, t=t, w=w: ce.cross_entropy_fwd(
                logits, t, w, None, None, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, mean=True),
            lambda logits=logits, t=t, w=w: ce.cross_entropy_fwd(
                logits, t, w, None, torch.empty_like(logits), gamma=2.0, reduce=True, loss_dtype=logits.dtype,
                prediction=torch.ones(1), predicted=torch.empty(1)),
            lambda logits=logits, probs=probs: ce.cross_entropy_fwd(
                logits, probs.to(logits.dtype), None, torch.full((1,), 1.0 * n), torch.empty_like(logits)),
        ]
    logits, t = torch.randn(16, 40), torch.randint(0, 40, (16,))
    for ignore_index in (-100, 2**31, 16, -2**31 - 1, 1):  # int32, int64, multiples of 16 or not, 1
        out.append(lambda ii=ignore_index: ce.cross_entropy_fwd(
            logits, t, None, None, torch.empty_like(logits), ignore_index=ii, mean=True, reduce=True))
    out.append(lambda: ce.cross_entropy_fwd(logits, t, None, None, torch.empty_like(logits), mean=True,
                                            config=ce.LaunchConfig(block=16, num_warps=1, segments=4)))
    for grad in (torch.randn(64, 40), _offset(torch.randn(64, 40), 1), torch.randn(64, 48)[:, :40]):
        out += [
            lambda g=grad: common.scale_grad_(g, torch.full((1,), 0.5)),
            lambda g=grad: common.scale_grad_(g, torch.rand(64)),
            lambda g=grad: common.scale_grad_(g, torch.full((1,), 2.0), torch.ones(1), torch.ones(1)),
        ]
    out.append(lambda g=torch.randn(64, 40): common.scale_grad_(g, torch.full((1,), 0.5), other=torch.randn(64, 40)))
    return out


def main() -> int:
    use_launch_path()
    import triton
    from triton.runtime import driver, jit

    driver.set_active(_RecordingDriver())
    from fastloss.kernels import common, cross_entropy, focal, huber

    launch = common.launch
    through_triton = []
    jit_run = jit.JITFunction.run

    def counted_run(self, *args, **kwargs):
        through_triton.append(self.__name__)
        return jit_run(self, *args, **kwargs)

    def checked(kernel, programs, *args, **constexprs):
        CALLS.clear()
        kernel[(programs,)](*args, **constexprs)
        launch(kernel, programs, *args, **constexprs)
        through_triton.clear()
        jit.JITFunction.run = counted_run
        try:
            launch(kernel, programs, *args, **constexprs)
        finally:
            jit.JITFunction.run = jit_run
        assert not through_triton, f"{kernel.__name__}: the second launch went through Triton's launch path"
        want, first, second = CALLS
        assert want == first == second, f"{kernel.__name__}: Triton's path {want}, launch {first} then {second}"
        checked.count += 1

    checked.count = 0
    for module in (common, cross_entropy, focal, huber):
        module.launch = checked
    cross_entropy.launch_with = lambda kernel, programs, args, constexprs: checked(kernel, programs, *args, **constexprs)
    hook = lambda metadata: None  # noqa: E731
    for enter_hook in (None, hook):  # a profiler's hook goes to the driver call as Triton's path passes it
        triton.knobs.runtime.launch_enter_hook = enter_hook
        for fn in calls():
            fn()
    print(f"{checked.count} launches the same through Triton and through launch ({len(common._COMPILED)} variants)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
