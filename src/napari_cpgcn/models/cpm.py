"""Class perception module (CPM): class-specific activation maps and per-class representations.

From a feature map X (B, D, h, w), a 1×1 convolution gives one raw map per class; the map is
normalised over space into weights M_c (sigmoid divided by its sum by default, or softmax) and
the class representation is the weighted sum t_c = Σ_ij M^c_ij x_ij, so T is (B, C, D).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassPerceptionModule", "spatial_normalize"]


def spatial_normalize(raw: torch.Tensor, norm: str = "sigmoid") -> torch.Tensor:
    """Raw maps (B, C, h, w) → weights over space that sum to 1 per (image, class)."""
    b, c, h, w = raw.shape
    flat = raw.float().flatten(2)
    if norm == "softmax":
        m = torch.softmax(flat, dim=-1)
    elif norm == "sigmoid":
        s = torch.sigmoid(flat)
        m = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-6)
    else:
        raise ValueError(f"unknown CPM normalisation {norm!r}; use 'softmax' or 'sigmoid'")
    return m.view(b, c, h, w)


class ClassPerceptionModule(nn.Module):
    """CPM: ``forward(X) -> (T, M)``.

    Parameters
    ----------
    in_channels
        Feature channels D.
    n_classes
        Number of classes C.
    norm
        Spatial normalisation of the maps: ``"sigmoid"`` (sigmoid / sum) or ``"softmax"``.

    Returns
    -------
    T : torch.Tensor
        (B, C, D) class representations.
    M : torch.Tensor
        (B, C, h, w) normalised class maps (each sums to 1 over space).
    """

    def __init__(self, in_channels: int, n_classes: int, norm: str = "sigmoid") -> None:
        super().__init__()
        if norm not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown CPM normalisation {norm!r}; use 'softmax' or 'sigmoid'")
        self.norm = norm
        self.conv = nn.Conv2d(in_channels, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = spatial_normalize(self.conv(x), self.norm)
        t = torch.einsum("bchw,bdhw->bcd", m.to(x.dtype), x)
        return t, m
