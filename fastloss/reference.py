"""CPU reference implementations in plain PyTorch (autograd does the gradients).

They are the test oracle for the Triton kernels and the fallback where those cannot run. They receive
arguments already validated by ``fastloss.functional``. bf16/fp16 inputs are computed in fp32 (float64
inputs in float64) and the result is returned in the input dtype.

Class-index losses work on rows: ``(C,)``, ``(N, C)`` and ``(N, C, d1, ...)`` logits become ``(M, C)``
with the class dim last, and the targets ``(M,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import fake, transforming

__all__ = ["cross_entropy", "focal_loss", "sigmoid_focal_loss", "huber_loss", "smooth_l1_loss"]


def _acc(*tensors: torch.Tensor) -> torch.dtype:
    """Compute dtype: float64 if any operand is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def n_classes(input: torch.Tensor) -> int:
    """C of (C,), (N, C) or (N, C, d1, ...) logits."""
    return input.shape[1] if input.dim() > 1 else input.shape[0]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C); (N, C, d1, ...) -> (N·d1·..., C), class dim last."""
    return x.unsqueeze(0) if x.dim() == 1 else x.movedim(1, -1).flatten(0, -2)  # C = 0 too


def _logits(input: torch.Tensor, softcap: float | None, *others: torch.Tensor) -> torch.Tensor:
    """Logit rows in the compute dtype (of the input and ``others``), softcapped:
    x <- softcap·tanh(x/softcap)."""
    x = _rows(input).to(_acc(input, *others))
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _class_rows(input, target, weight, ignore_index, softcap):
    """Shared by CE and focal for class-index targets.

    Returns the logit rows x (M, C), log-probs (M, C), log p_y (M,), w_y (M,; 0 on ignored rows),
    the counted-row mask (M,) and the class weights (C,) or None.
    """
    x = _logits(input, softcap)
    num_classes = x.shape[-1]
    t = target.reshape(-1).long()
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= num_classes))
    # torch's CPU behaviour (nll_loss raises IndexError). torch.compile and torch.func cannot branch
    # on data: there, as in the kernels, such a row's loss is NaN. A meta tensor has no data to check,
    # nor has a fake one (FakeTensorMode; the mask is fake there even for a real target).
    checked = not (torch.compiler.is_compiling() or transforming() or t.is_meta or fake(bad))
    if checked and bad.any():
        raise IndexError(f"Target {t[bad][0].item()} is out of bounds.")
    t = torch.where(valid if checked else valid & ~bad, t, 0)  # in range; ignored rows are masked below
    logp = torch.log_softmax(x, dim=-1)
    w = None if weight is None else weight.to(x.dtype)
    if num_classes:
        logp_y = logp.gather(-1, t[:, None]).squeeze(-1)
        w_y = valid.to(x.dtype) if w is None else torch.where(valid, w[t], 0)
    else:  # no classes: every row is ignored (a counted one raised above, or is NaN below)
        logp_y = logp.sum(-1)  # zeros, in the graph
        w_y = torch.zeros_like(logp_y)
    if not checked:
        logp_y = torch.where(bad, float("nan"), logp_y)
    return x, logp, logp_y, w_y, valid, w


def _reduce(loss, reduction, denom, shape, dtype):
    """none -> loss reshaped to ``shape``; sum; mean = sum / denom (0/0 gives nan, as torch does)."""
    if reduction == "none":
        out = loss.reshape(shape)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / denom
    return out.to(dtype)


def _focal_factor(u: torch.Tensor, gamma: float) -> torch.Tensor:
    """u^gamma for u >= 0, with a zero gradient at u == 0.

    pow's backward is gamma·u^(gamma-1), which is inf at u == 0 for gamma < 1 and turns the
    product with a zero loss into nan. At u == 0 (a saturated, correct prediction) the exact
    gradient of the focal loss is 0 for every gamma > 0, so the u == 0 lanes are taken out.
    """
    if gamma == 0:
        return torch.ones_like(u)
    pos = u > 0
    return torch.where(pos, torch.where(pos, u, 1).pow(gamma), 0)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None):
    """``torch.nn.functional.cross_entropy`` plus ``z_loss`` and ``softcap``.

    Class-index targets, label smoothing eps over C classes, class weights w:
        row loss = (1-eps)·(-w_y log p_y) + eps/C·(-sum_c w_c log p_c),  0 on ignored rows,
        mean = sum of row losses / sum of w_y over counted rows.
    Probability targets q (same shape as input): q <- (1-eps)·q + eps/C,
        row loss = -sum_c w_c q_c log p_c,  mean = sum / number of rows.
    z-loss adds z_loss·lse² per counted row, unweighted; its mean divides by the counted-row count.
    """
    eps = label_smoothing
    c = n_classes(input)
    # No classes (every row is ignored): eps / C is inf, as in torch, where it multiplies the smoothing
    # term (0) of each row, or their sum: the loss is NaN for every reduction, even over no rows.
    # (Probability targets have no elements for it to reach: there it changes nothing.)
    eps_c = eps / c if c else float("inf")  # used only where eps > 0
    smooth_mean = None  # class indices, mean: the smoothing term's, added apart as torch adds it
    out_dtype = input.dtype  # (class indices: torch requires the weight's dtype to be the input's)
    if target.shape == input.shape:  # class probabilities: torch promotes the three dtypes
        others = (target,) if weight is None else (target, weight)
        for t in others:
            out_dtype = torch.promote_types(out_dtype, t.dtype)
        x = _logits(input, softcap, *others)
        w = None if weight is None else weight.to(x.dtype)
        q = _rows(target).to(x.dtype)
        if eps > 0:
            q = q * (1 - eps) + eps_c
        wq = q if w is None else q * w
        loss = -(torch.log_softmax(x, dim=-1) * wq).sum(-1)
        valid = torch.ones_like(loss, dtype=torch.bool)
        denom = loss.numel() if c else 0  # torch divides by numel / C: without classes, 0 / 0 = nan
        shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
    else:  # class indices
        x, logp, logp_y, w_y, valid, w = _class_rows(input, target, weight, ignore_index, softcap)
        loss = torch.where(valid, -logp_y * w_y, 0)
        denom = w_y.sum()
        if eps > 0:
            smooth = eps_c * torch.where(valid, -(logp if w is None else logp * w).sum(-1), 0)
            if reduction == "mean":
                # torch divides each term's sum by the denominator: where the counted rows weigh 0,
                # the first is 0 / 0 and the loss NaN, not the smoothing term's inf
                loss, smooth_mean = (1 - eps) * loss, smooth.sum() / denom
            else:
                loss = (1 - eps) * loss + smooth
        shape = target.shape

    z_mean = None
    if z_loss:
        z = torch.where(valid, z_loss * torch.logsumexp(x, dim=-1).square(), 0)
        if reduction == "mean":
            z_mean = z.sum() / valid.sum()
        else:
            loss = loss + z
    out = _reduce(loss, reduction, denom, shape, x.dtype)
    if smooth_mean is not None:
        out = out + smooth_mean
    if z_mean is not None:  # (not 0.0 otherwise: that would turn torch's -0.0 into 0.0)
        out = out + z_mean
    if not c and eps > 0 and reduction == "sum" and target.shape != input.shape:
        out = out * eps_c  # torch's sum of the rows' smoothing terms (0, or none) times eps / C: NaN
    return out.to(out_dtype)


def focal_loss(input, target, gamma=2.0, weight=None, ignore_index=-100, reduction="mean",
               softcap=None):
    """Softmax focal loss -w_y·(1-p_y)^gamma·log p_y for class-index targets.

    Ignored rows give 0; mean divides by the sum of w_y over counted rows, like weighted CE, so
    gamma = 0 gives exactly ``cross_entropy(input, target, weight=weight, ignore_index=..., reduction=...)``.
    1 - p_y is computed as -expm1(log p_y), accurate as p_y -> 1.
    """
    x, _, logp_y, w_y, valid, _ = _class_rows(input, target, weight, ignore_index, softcap)
    factor = _focal_factor(-torch.expm1(logp_y), gamma)
    # p_y = 0 exactly (the target's logit is -inf): the loss is inf, and the factor's derivative, 0,
    # times it would be NaN; its limit is 0, so the gradient is the CE one, as the kernels give.
    factor = torch.where(logp_y == float("-inf"), factor.detach(), factor)
    loss = torch.where(valid, -logp_y * w_y * factor, 0)
    return _reduce(loss, reduction, w_y.sum(), target.shape, input.dtype)


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss's formula, for any shape and soft targets t in [0, 1]:

        p = sigmoid(x), ce = BCE-with-logits(x, t), p_t = p·t + (1-p)·(1-t),
        loss = ce·(1-p_t)^gamma, times alpha_t = alpha·t + (1-alpha)·(1-t) if alpha >= 0.

    Both factors are evaluated without cancellation, so they stay accurate (relative to their
    size) and have finite gradients however saturated the logits:
        ce    = t·softplus(-x) + (1-t)·softplus(x)   (torch's BCE-with-logits rounds e.g. x=-20, t=0 to 0)
        1-p_t = sigmoid(x)·(1-t) + sigmoid(-x)·t     (1 - sigmoid(x) rounds to 0 for x > 17 in fp32)
    """
    x, t = torch.broadcast_tensors(inputs, targets)
    acc = _acc(x, t)
    x, t = x.to(acc), t.to(acc)
    ce = t * F.softplus(-x) + (1 - t) * F.softplus(x)
    loss = ce * _focal_factor(torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t, gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return _reduce(loss, reduction, loss.numel(), loss.shape, torch.promote_types(inputs.dtype, targets.dtype))


def _elementwise(input, target, weight, fn, reduction, promote_target=True):
    """Broadcast (silently), compute fn(input, target) per element in the compute dtype, weight, reduce.
    The result's dtype is torch's: the input's, promoted with the target's (``promote_target``;
    huber_loss does not) and then with the weight's."""
    x, y = torch.broadcast_tensors(input, target)
    acc = _acc(x, y)
    loss = fn(x.to(acc), y.to(acc))
    if weight is not None:
        loss = loss * weight.to(acc)
    dtype = torch.promote_types(input.dtype, target.dtype) if promote_target else input.dtype
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)  # torch multiplies by the weight last
    return _reduce(loss, reduction, loss.numel(), loss.shape, dtype)


# Huber and SmoothL1 use torch's own fused elementwise ops: they are the definition, and they keep
# the CPU fallback as fast as torch.nn.


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """``torch.nn.functional.huber_loss``; ``weight`` multiplies the per-element loss (mean = its mean)."""
    return _elementwise(input, target, weight,
                        lambda x, y: F.huber_loss(x, y, reduction="none", delta=delta), reduction,
                        promote_target=False)


def smooth_l1_loss(input, target, reduction="mean", beta=1.0):
    """``torch.nn.functional.smooth_l1_loss`` = huber(delta=beta) / beta; beta = 0 is the L1 loss."""
    return _elementwise(input, target, None,
                        lambda x, y: F.smooth_l1_loss(x, y, reduction="none", beta=beta), reduction)
