"""Losses for multi-label training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["focal_loss"]


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
               alpha: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) for multi-label targets.

    FL = -α_t (1 - p_t)^γ log(p_t) per (sample, class); ``gamma=0, alpha=None`` is binary
    cross-entropy. ``reduction="mean"`` sums over classes and averages over samples, so the loss
    scale does not depend on the number of classes being mostly negative.

    Parameters
    ----------
    logits, targets
        (B, C); targets in [0, 1] (soft targets allowed).
    gamma
        Focusing parameter (≥ 0).
    alpha
        Weight of positives (negatives get 1 - alpha); ``None`` = no weighting.
    reduction
        ``"mean"``, ``"sum"`` or ``"none"``.
    """
    logits = logits.float()
    targets = targets.float()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma) if gamma else ce
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if reduction == "mean":
        return loss.sum(dim=-1).mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")
