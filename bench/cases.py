"""What the benchmark measures: losses x providers x shapes.

A :class:`Case` is one loss at one shape, dtype and mode. It knows how to build random inputs and how
many bytes a perfect kernel must move (the *floor*). A :class:`Provider` is one implementation of a loss:
fastloss, eager torch, ``torch.compile`` of eager torch, and for cross-entropy Liger-Kernel when it is
installed. Every provider returns a scalar ``mean`` loss, so ``loss.backward()`` is the whole backward.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

import fastloss
import fastloss.reference as reference

LOSSES = ("ce", "ce_softcap", "ce_tokens", "ce_seg", "focal", "sigmoid_focal", "huber", "smooth_l1")
PROVIDERS = ("fastloss", "torch", "compile", "liger", "cce")
MODES = ("fwdbwd", "fwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPE_SETS = ("headline", "sweep", "all")

# [N, V] logits and int64 class targets; ce_seg: a segmentation map's [N, C, H, W] logits (classes
# strided in memory, as a model's output lays them out) and [N, H, W] targets
CLASS_LOSSES = ("ce", "ce_softcap", "ce_tokens", "ce_seg", "focal")
SOFTCAP = 30.0  # ce_softcap: cross-entropy of SOFTCAP * tanh(logits / SOFTCAP), as Gemma 2 trains
# ce_tokens: the summed loss over the counted tokens of this many micro-batches of this size, as
# gradient accumulation normalises (a count that changes every step, no power of two): fastloss
# divides inside the kernel (``divisor``); a sum divided afterwards makes the backward scale the gradient
MICRO_BATCHES = 3
GAMMA = 2.0  # focal losses
ALPHA = 0.25  # sigmoid focal loss (torchvision's default)

# Vocabulary sizes of the plot's sweep (cross-entropy and focal, N rows).
GPU_SWEEP = (4096, 8192, 16384, 32768, 65536, 128256, 262144)
CPU_SWEEP = (1024, 2048, 4096, 8192, 16384, 32768)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str  # one of LOSSES
    dtype: str  # key of DTYPES
    shape: tuple[int, ...]  # (N, V) for ce/focal ((N, C, H, W) for ce_seg), (rows, classes) for sigmoid focal, (n,) elementwise
    mode: str = "fwdbwd"  # "fwdbwd": forward + loss.backward(); "fwd": forward under no_grad
    target_grad: bool = False  # huber / smooth_l1: the target requires grad too
    # fwd+bwd: the loss is divided by this before ``backward()``, as gradient accumulation does (or a
    # loss scaler multiplies), so the backward gets grad_output = 1 / loss_div. fastloss's backward
    # then scales its saved gradient, a second read and write of it, which the floor does not count.
    loss_div: int = 1
    goal: float | None = None  # the target for fastloss, as a share of the floor
    sweep: bool = False  # only there for the plot's V sweep
    channels_last: bool = False  # ce_seg: the logits in channels_last, each position's classes together

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def shape_str(self) -> str:
        if len(self.shape) == 1:
            (n,) = self.shape
            return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
        return "×".join(str(s) for s in self.shape)

    @property
    def label(self) -> str:
        extra = (" +target grad" if self.target_grad else "") + (f" loss/{self.loss_div}" if self.loss_div != 1 else "")
        extra += " channels_last" if self.channels_last else ""
        mode = "fwd+bwd" if self.mode == "fwdbwd" else "fwd only"
        return f"{self.loss} {self.dtype} {self.shape_str}{extra} {mode}"

    @property
    def input_bytes(self) -> int:
        """Bytes of one set of inputs (logits/predictions, targets)."""
        e = self.torch_dtype.itemsize
        if self.loss in CLASS_LOSSES:
            return self.numel * e + self.numel // self.shape[1] * 8
        return 2 * self.numel * e

    def floor_bytes(self) -> int:
        """Bytes a perfect one-pass kernel must move: read every input once, write every gradient once.

        * ce / focal:     read N·V logits; fwd+bwd also writes the N·V gradient (the issues' 2·N·V·b).
        * sigmoid focal:  read x and t; fwd+bwd also writes grad x.
        * huber / smooth: read input and target; fwd+bwd also writes grad input (and grad target).
        The scalar loss, the N class indices (8·N bytes, 0.1% of CE fp32 65536×1000's floor and less
        elsewhere) and O(N) side buffers are not counted.
        """
        e = self.torch_dtype.itemsize
        read = self.numel * e if self.loss in CLASS_LOSSES else self.input_bytes
        if self.mode == "fwd":
            return read
        written = self.numel * e
        if self.target_grad:
            written *= 2
        return read + written

    def make_inputs(self, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs (never zeros): standard-normal logits and predictions, uniform class targets."""
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype, grad = self.torch_dtype, self.mode == "fwdbwd"

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

        if self.loss in CLASS_LOSSES:  # (the class dimension second)
            target = torch.randint(0, self.shape[1], self.shape[:1] + self.shape[2:], generator=gen, device=device)
            x = randn(*self.shape)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return x.requires_grad_(grad), target
        if self.loss == "sigmoid_focal":
            # Detection-style targets: mostly negatives, some positives.
            positive = torch.rand(self.shape, generator=gen, device=device) < 0.1
            return randn(*self.shape).requires_grad_(grad), positive.to(dtype)
        # |input - target| ~ N(0, 2) covers both sides of delta = beta = 1.
        return randn(*self.shape).requires_grad_(grad), randn(*self.shape).requires_grad_(grad and self.target_grad)


def _classes(loss, dtype, n_rows, vocab, **kw):
    return Case(loss, dtype, (n_rows, vocab), **kw)


def _elementwise(loss, dtype, n, **kw):
    return Case(loss, dtype, (n,), **kw)


def gpu_cases(quick: bool) -> tuple[list[Case], list[Case]]:
    """(headline, sweep) cases for CUDA: the shapes of the issues' performance tables."""
    n_rows, n_elem = 8192, 1 << 27
    headline = [
        _classes("ce", "bf16", n_rows, 32768, goal=0.90),
        _classes("ce", "bf16", n_rows, 128256, goal=0.90),
        _classes("ce", "bf16", n_rows, 262144, goal=0.85),
        _classes("ce", "fp32", n_rows, 128256, goal=0.85),
        _classes("ce", "fp32", 65536, 1000, goal=0.85),
        _classes("ce", "bf16", n_rows, 128256, mode="fwd", goal=0.90),
        _classes("ce", "bf16", n_rows, 128256, loss_div=8),  # no target: how gradient accumulation costs
        _classes("ce", "fp16", n_rows, 128256, loss_div=8),  # no target: fp16 takes no prediction below 1 (NOTES 12)
        _classes("ce_softcap", "bf16", n_rows, 256000),  # no target: Gemma 2's vocabulary and cap
        _classes("ce_tokens", "bf16", n_rows, 128256),  # no target: gradient accumulation's sum / tokens
        _classes("ce", "bf16", n_rows, 50257),  # no target: GPT-2's vocabulary, rows off 16-byte boundaries
        Case("ce_seg", "bf16", (8, 19, 512, 1024)),  # no target: Cityscapes' 19 classes, a segmentation map
        _classes("focal", "bf16", n_rows, 32768, goal=0.90),
        _classes("focal", "bf16", n_rows, 128256, goal=0.90),
        Case("sigmoid_focal", "fp32", (1 << 20, 80), goal=0.90),
        Case("sigmoid_focal", "bf16", (1 << 20, 80), goal=0.90),
        _elementwise("huber", "fp32", n_elem, goal=0.90),
        _elementwise("huber", "bf16", n_elem, goal=0.90),
        _elementwise("huber", "fp32", n_elem, target_grad=True, goal=0.90),
        _elementwise("huber", "bf16", n_elem, target_grad=True, goal=0.90),
        _elementwise("smooth_l1", "fp32", n_elem),
        _elementwise("huber", "fp32", n_elem, loss_div=8),  # no target: the predicted grad_output
        # no target: ce_seg's map as a channels_last model gives it (last: the run's time limit drops it first)
        Case("ce_seg", "bf16", (8, 19, 512, 1024), channels_last=True),
    ]
    vocabs = (4096, 32768, 262144) if quick else GPU_SWEEP
    return headline, _sweep(headline, ("ce", "focal"), "bf16", n_rows, vocabs)


def cpu_cases(quick: bool) -> tuple[list[Case], list[Case]]:
    """(headline, sweep) cases without CUDA: tiny shapes, so the whole run takes well under 2 minutes."""
    n_rows, n_elem = 256, 1 << 20
    headline = [
        _classes("ce", "fp32", 4 * n_rows, 1000),  # many rows, small V (like 65536×1000 on CUDA)
        _classes("ce", "fp32", n_rows, 8192),
        _classes("ce", "bf16", n_rows, 8192),
        _classes("ce", "fp32", n_rows, 8192, mode="fwd"),
        _classes("ce", "fp32", n_rows, 8192, loss_div=8),
        _classes("ce_softcap", "fp32", n_rows, 8192),
        _classes("ce_tokens", "fp32", n_rows, 8192),
        Case("ce_seg", "fp32", (4, 19, 64, 64)),
        Case("ce_seg", "fp32", (4, 19, 64, 64), channels_last=True),
        _classes("focal", "fp32", n_rows, 8192),
        Case("sigmoid_focal", "fp32", (n_elem // 64, 80)),
        _elementwise("huber", "fp32", n_elem),
        _elementwise("huber", "fp32", n_elem, target_grad=True),
        _elementwise("smooth_l1", "fp32", n_elem),
    ]
    if not quick:
        headline += [
            _classes("focal", "bf16", n_rows, 8192),
            Case("sigmoid_focal", "bf16", (n_elem // 64, 80)),
            _elementwise("huber", "bf16", n_elem),
        ]
    vocabs = (1024, 4096, 16384) if quick else CPU_SWEEP
    return headline, _sweep(headline, ("ce", "focal"), "fp32", n_rows, vocabs)


def _sweep(headline, losses, dtype, n_rows, vocabs) -> list[Case]:
    """The V sweep, minus the points the headline cases already measure."""
    have = {(c.loss, c.dtype, c.shape, c.mode) for c in headline if c.loss_div == 1}
    return [
        _classes(loss, dtype, n_rows, v, sweep=True)
        for loss in losses
        for v in vocabs
        if (loss, dtype, (n_rows, v), "fwdbwd") not in have
    ]


def select_cases(
    device: torch.device,
    *,
    quick: bool = False,
    losses=LOSSES,
    modes=MODES,
    dtypes=tuple(DTYPES),
    shapes: str | None = None,
) -> list[Case]:
    """The cases to run. ``shapes``: "headline" (the issues' shapes), "sweep" (the V sweep) or "all";
    by default "headline" with ``quick`` and "all" otherwise."""
    shapes = shapes or ("headline" if quick else "all")
    if shapes not in SHAPE_SETS:
        raise ValueError(f"shapes must be one of {SHAPE_SETS}, got {shapes!r}")
    headline, sweep = (gpu_cases if device.type == "cuda" else cpu_cases)(quick)
    chosen = (headline if shapes != "sweep" else []) + (sweep if shapes != "headline" else [])
    return [c for c in chosen if c.loss in losses and c.mode in modes and c.dtype in dtypes]


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    fn: Callable[..., torch.Tensor]  # fn(*case inputs) -> scalar mean loss
    mutates_inputs: bool = False  # writes the gradient into the logits (Liger): check on a copy


def torch_focal(x, target, gamma=GAMMA):
    """Softmax focal loss written the way a user would in eager torch: -(1 - p_y)^γ · log p_y, mean."""
    logp_y = F.log_softmax(x, dim=-1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (-((1 - logp_y.exp()) ** gamma) * logp_y).mean()


def torch_sigmoid_focal(x, t, alpha=ALPHA, gamma=GAMMA, reduction="mean"):
    """torchvision.ops.sigmoid_focal_loss's formula in eager torch (alpha >= 0)."""
    p = torch.sigmoid(x)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    loss = alpha_t * bce * (1 - p_t) ** gamma
    return {"none": lambda: loss, "mean": loss.mean, "sum": loss.sum}[reduction]()


def _tokens(target):
    """ce_tokens' divisor: the counted tokens of MICRO_BATCHES micro-batches like this one, a 0-dim
    tensor on the device, counted in every step as a training loop counts them."""
    return MICRO_BATCHES * (target != -100).sum()


TORCH_FNS = {
    "ce": lambda x, t: F.cross_entropy(x, t),
    "ce_softcap": lambda x, t: F.cross_entropy(SOFTCAP * torch.tanh(x / SOFTCAP), t),
    "ce_tokens": lambda x, t: F.cross_entropy(x, t, reduction="sum") / _tokens(t),
    "ce_seg": lambda x, t: F.cross_entropy(x, t),
    "focal": torch_focal,
    "sigmoid_focal": torch_sigmoid_focal,
    "huber": lambda x, y: F.huber_loss(x, y),
    "smooth_l1": lambda x, y: F.smooth_l1_loss(x, y),
}

FASTLOSS_FNS = {
    "ce": lambda x, t: fastloss.cross_entropy(x, t),
    "ce_softcap": lambda x, t: fastloss.cross_entropy(x, t, softcap=SOFTCAP),
    "ce_tokens": lambda x, t: fastloss.cross_entropy(x, t, reduction="sum", divisor=_tokens(t)),
    "ce_seg": lambda x, t: fastloss.cross_entropy(x, t),
    "focal": lambda x, t: fastloss.focal_loss(x, t, gamma=GAMMA),
    "sigmoid_focal": lambda x, t: fastloss.sigmoid_focal_loss(x, t, alpha=ALPHA, gamma=GAMMA, reduction="mean"),
    "huber": lambda x, y: fastloss.huber_loss(x, y),
    "smooth_l1": lambda x, y: fastloss.smooth_l1_loss(x, y),
}

# The oracle: fastloss.reference, all arguments spelled out, mean reduction.
REFERENCE_FNS = {
    "ce": lambda x, t: reference.cross_entropy(x, t, None, -100, "mean", 0.0, 0.0, None),
    "ce_softcap": lambda x, t: reference.cross_entropy(x, t, None, -100, "mean", 0.0, 0.0, SOFTCAP),
    "ce_tokens": lambda x, t: reference.cross_entropy(x, t, None, -100, "sum", 0.0, 0.0, None) / _tokens(t),
    "ce_seg": lambda x, t: reference.cross_entropy(x, t, None, -100, "mean", 0.0, 0.0, None),
    "focal": lambda x, t: reference.focal_loss(x, t, GAMMA, None, -100, "mean", None),
    "sigmoid_focal": lambda x, t: reference.sigmoid_focal_loss(x, t, ALPHA, GAMMA, "mean"),
    "huber": lambda x, y: reference.huber_loss(x, y, "mean", 1.0, None),
    "smooth_l1": lambda x, y: reference.smooth_l1_loss(x, y, "mean", 1.0),
}


def _liger_ce() -> Callable:
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:  # older releases: only the module
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger_cross_entropy = LigerCrossEntropyLoss()

    def fn(x, t):
        out = liger_cross_entropy(x, t)
        # Some releases return (loss, z_loss) or an output dataclass.
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "loss", out)

    return fn


def make_provider(loss: str, name: str, device: torch.device) -> Provider | str:
    """The provider ``name`` for ``loss``, or a string saying why it is skipped."""
    if name == "fastloss":
        return Provider(name, FASTLOSS_FNS[loss])
    if name == "torch":
        return Provider(name, TORCH_FNS[loss])
    if name == "compile":
        # A fresh wrapper per case; the harness resets dynamo between cases so that no recompile
        # limit is reached (past it torch.compile would silently fall back to eager).
        return Provider(name, torch.compile(TORCH_FNS[loss], dynamic=False))
    if name not in ("liger", "cce"):
        raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")
    if loss != "ce":
        return f"{name} has no {loss} loss"
    if name == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
        if device.type != "cuda":
            return "liger_kernel needs CUDA"
        return Provider(name, _liger_ce(), mutates_inputs=True)
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut_cross_entropy is not installed"
    # cut_cross_entropy exposes linear_cross_entropy(embeddings, classifier, targets): the classifier
    # matmul fused with the loss. It has no entry point that takes materialised logits.
    return "cut_cross_entropy is a fused linear+CE op (no plain-logits entry point)"
