"""fastloss: fused one-pass GPU loss kernels as drop-in replacements for torch.nn losses."""

from . import nn
from .backend import use_backend
from .functional import cross_entropy, focal_loss, huber_loss, sigmoid_focal_loss, smooth_l1_loss

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "focal_loss",
    "sigmoid_focal_loss",
    "huber_loss",
    "smooth_l1_loss",
    "nn",
    "use_backend",
]
