"""``torch.nn``-style modules: they store the configuration and call :mod:`fastloss.functional`.

Constructors take the same arguments as the torch modules they replace (legacy ``size_average``
and ``reduce`` included), plus the keyword-only extras of the functional API.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn.modules.loss import _Loss, _WeightedLoss

from . import functional as F

__all__ = ["CrossEntropyLoss", "FocalLoss", "SigmoidFocalLoss", "HuberLoss", "SmoothL1Loss"]


class CrossEntropyLoss(_WeightedLoss):
    """Drop-in :class:`torch.nn.CrossEntropyLoss`; see :func:`fastloss.cross_entropy`."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: float | None = None, inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor, *, divisor: float | Tensor | None = None) -> Tensor:
        """``divisor`` (with ``reduction="sum"``): see :func:`fastloss.cross_entropy`."""
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, softcap=self.softcap,
                               inplace_backward=self.inplace_backward, divisor=divisor)


class FocalLoss(_WeightedLoss):
    """Softmax focal loss module; see :func:`fastloss.focal_loss`."""

    def __init__(self, gamma: float = 2.0, weight: Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean", *, softcap: float | None = None,
                 inplace_backward: bool = False) -> None:
        super().__init__(weight, None, None, reduction)
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor, *, divisor: float | Tensor | None = None) -> Tensor:
        """``divisor`` (with ``reduction="sum"``): see :func:`fastloss.cross_entropy`."""
        return F.focal_loss(input, target, gamma=self.gamma, weight=self.weight,
                            ignore_index=self.ignore_index, reduction=self.reduction,
                            softcap=self.softcap, inplace_backward=self.inplace_backward, divisor=divisor)


class SigmoidFocalLoss(_Loss):
    """Module form of :func:`fastloss.sigmoid_focal_loss` (torchvision's defaults)."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none") -> None:
        super().__init__(None, None, reduction)
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, inputs: Tensor, targets: Tensor, *, divisor: float | Tensor | None = None) -> Tensor:
        """``divisor`` (with ``reduction="sum"``): see :func:`fastloss.sigmoid_focal_loss`."""
        return F.sigmoid_focal_loss(inputs, targets, alpha=self.alpha, gamma=self.gamma,
                                    reduction=self.reduction, divisor=divisor)


class HuberLoss(_Loss):
    """Drop-in :class:`torch.nn.HuberLoss`; see :func:`fastloss.huber_loss`."""

    def __init__(self, reduction: str = "mean", delta: float = 1.0) -> None:
        if not isinstance(delta, (float, int)):  # as torch's module checks it
            raise TypeError(f"delta must be a float or int, got: {type(delta)}")
        super().__init__(None, None, reduction)
        self.delta = delta

    def forward(self, input: Tensor, target: Tensor, *, divisor: float | Tensor | None = None) -> Tensor:
        """``divisor`` (with ``reduction="sum"``): see :func:`fastloss.huber_loss`."""
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta, divisor=divisor)


class SmoothL1Loss(_Loss):
    """Drop-in :class:`torch.nn.SmoothL1Loss`; see :func:`fastloss.smooth_l1_loss`."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", beta: float = 1.0) -> None:
        super().__init__(size_average, reduce, reduction)
        self.beta = beta

    def forward(self, input: Tensor, target: Tensor, *, divisor: float | Tensor | None = None) -> Tensor:
        """``divisor`` (with ``reduction="sum"``): see :func:`fastloss.smooth_l1_loss`."""
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta, divisor=divisor)
