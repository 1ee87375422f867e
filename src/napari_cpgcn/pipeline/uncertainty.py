"""Per-(cell, class) uncertainty of a prediction, computed at prediction time from the run's own
models (no second model, no download).

``unc_S = 1 − (1 − H(p_fused)) · (1 − spread)`` (:func:`combine`): the binary entropy of the
fused probability (high near 0.5) raised by a *spread* saying the models are unsure in another
way. Two spreads are implemented and measured by ``benchmarks/bench_uncertainty.py`` (how well
each ranks the (cell, class) decisions that are wrong at 0.5; docs/benchmarks.md):

* ``"disagreement"`` (the default) — ``|p_image − p_cell|``: the image model and the cell model
  disagree about the cell. No extra forward pass.
* ``"tta"`` — test-time augmentation of the cell model: the crops are classified under the
  dihedral views (:data:`TTA_VIEWS`), spread = ``2 · std`` over the views (a probability's
  standard deviation is at most 0.5). Four cell-model passes; on the synthetic benchmark its
  spread ranked wrong decisions no better than chance (AUROC 0.50), so it is opt-in
  (``CPGCNPredictor(..., uncertainty="tta")``).
* ``"entropy"`` — no spread.

Per cell, ``uncertainty`` is the largest ``unc_S`` over the classes. Every value is finite and
in [0, 1]. No Qt; torch only inside :func:`tta_cell_probs`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TTA_VIEWS", "UNCERTAINTY_METHODS", "augment_crops", "tta_cell_probs", "binary_entropy",
           "disagreement", "tta_uncertainty", "combine", "cell_uncertainty"]

#: The dihedral views used by default: identity, vertical flip, horizontal flip, 90° rotation
#: (four cell-model passes; the other four dihedral views can be asked for by name).
TTA_VIEWS: tuple[str, ...] = ("id", "flip_y", "flip_x", "rot90")
_ALL_VIEWS = ("id", "flip_y", "flip_x", "rot90", "rot180", "rot270", "transpose", "antitranspose")
UNCERTAINTY_METHODS = ("tta", "disagreement", "entropy")


def augment_crops(crops: np.ndarray, view: str) -> np.ndarray:
    """One dihedral view of crops (n, C, S, S)."""
    if view == "id":
        return crops
    if view == "flip_y":
        return crops[..., ::-1, :]
    if view == "flip_x":
        return crops[..., :, ::-1]
    if view.startswith("rot"):
        return np.rot90(crops, k=int(view[3:]) // 90, axes=(-2, -1))
    if view == "transpose":
        return np.swapaxes(crops, -1, -2)
    if view == "antitranspose":
        return np.rot90(np.swapaxes(crops, -1, -2), k=2, axes=(-2, -1))
    raise ValueError(f"unknown view {view!r}; use one of {_ALL_VIEWS}")


def tta_cell_probs(model, crops: np.ndarray, device, batch_size: int = 64,
                   views: tuple[str, ...] = TTA_VIEWS) -> np.ndarray:
    """Cell-model probabilities under each view: (V, n, C); view 0 is the identity when listed first."""
    from napari_cpgcn.pipeline.inference import predict_crops

    return np.stack([predict_crops(model, np.ascontiguousarray(augment_crops(crops, v)), device, batch_size)
                     for v in views])


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy of a Bernoulli probability in bits: 0 at p ∈ {0, 1}, 1 at p = 0.5."""
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).astype(np.float32)


def disagreement(image_probs: np.ndarray, cell_probs: np.ndarray) -> np.ndarray:
    """``|p_image − p_cell|`` per (cell, class), in [0, 1]."""
    return np.abs(np.asarray(cell_probs, np.float32) - np.asarray(image_probs, np.float32)[None, :])


def tta_uncertainty(view_probs: np.ndarray) -> np.ndarray:
    """``2 · std`` over the views (V, n, C) → (n, C) in [0, 1]."""
    v = np.asarray(view_probs, np.float32)
    return np.clip(2.0 * v.std(axis=0), 0.0, 1.0)


def combine(fused: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """The reported ``unc_S``: the binary entropy of the fused probability raised by the TTA
    spread, ``1 − (1 − H(p)) · (1 − spread)``.

    Entropy alone says "near the threshold"; the spread adds "the model changes its mind when
    the cell is flipped", which flags confident-but-unstable decisions. Both are in [0, 1] and
    so is the result.
    """
    h = binary_entropy(fused)
    s = np.clip(np.asarray(spread, np.float32), 0.0, 1.0)
    return np.clip(1.0 - (1.0 - h) * (1.0 - s), 0.0, 1.0).astype(np.float32)


def cell_uncertainty(unc: np.ndarray) -> np.ndarray:
    """One number per cell: the largest per-class uncertainty (n,)."""
    unc = np.asarray(unc, np.float32)
    return unc.max(axis=1) if unc.size else np.zeros(len(unc), np.float32)
