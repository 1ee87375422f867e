"""Per-cell pseudo-labels from class activation maps (METHOD.md step 4).

For every training image with image-level labels, the class activation maps (the
OAA-accumulated maps where they exist, else the model's CAMs) are normalised, resized to the
image and intersected with each cell of the image's segmentation.

The combination rule (documented in ``docs/cell_pipeline.md``)
---------------------------------------------------------------
For an image with positive classes P (its image labels, Negative excluded), a cell i and a
class c ∈ P:

1. ``M_c`` = the class map min–max normalised over the image to [0, 1];
2. ``a_ic`` = mean of ``M_c`` over the pixels of cell i;
3. ``r_ic = a_ic / max_j a_jc`` — the activation relative to the most activated cell of the
   image. An image label says that *at least one* cell shows the class, so the most
   activated cell always gets r = 1, and the others are judged against it, whatever the
   absolute scale of that image's CAM;
4. ``s_ic = p_c · r_ic + (1 − p_c)`` where ``p_c`` is the image model's probability of class c
   for this image: the CAM is trusted as much as the image model is sure of the class. When
   the model is sure (p → 1) the score is the relative activation; when it did not recognise
   the class (p → 0) its CAM says nothing about where the class is, and the score falls back
   to the image label (every cell positive — the image-label baseline).

A cell gets class c when ``s_ic ≥ threshold`` (default 0.5); a cell with no class gets
Negative. Classes not in P score 0; the Negative soft score is ``1 − max_c s_ic``. An image
labelled Negative (or with no labels) makes every cell Negative with score 1.

No torch here: CAMs come in as numpy arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from napari_cpgcn.classes import N_CLASSES, NEGATIVE, SHORT_NAMES
from napari_cpgcn.io.celltable import GEOMETRY_COLUMNS, cell_geometry
from napari_cpgcn.training.config import RULES, PseudoLabelConfig  # noqa: F401 (part of this module's API)

__all__ = [
    "PseudoLabelConfig",
    "cell_mean_activation",
    "combine_scores",
    "image_pseudo_labels",
    "pseudo_label_matrix",
    "soft_score_matrix",
    "write_pseudolabels",
    "read_pseudolabels",
    "SOFT_COLUMNS",
    "ACT_COLUMNS",
]

log = logging.getLogger(__name__)

#: Soft score columns of the pseudo-label table (one per class).
SOFT_COLUMNS: tuple[str, ...] = tuple(f"soft_{s}" for s in SHORT_NAMES)
#: Mean normalised activation per class (NaN for classes not positive in the image).
ACT_COLUMNS: tuple[str, ...] = tuple(f"act_{s}" for s in SHORT_NAMES)
def _cell_map(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """A class map at image size, or None when it carries no location (flat or all zero).

    Maps come normalised once, by the model's own :func:`~napari_cpgcn.models.cpgcn.normalize_cams`
    (``predict_images`` and the OAA store both hold maps in [0, 1] scaled by their maximum), and
    are resized by the one CAM resizer, :func:`~napari_cpgcn.models.cpgcn.resize_cams`.
    """
    from napari_cpgcn.models.cpgcn import resize_cams

    m = np.nan_to_num(np.asarray(m, dtype=np.float32), nan=0.0)
    if float(m.max(initial=0.0)) - float(m.min(initial=0.0)) <= 1e-12:
        return None
    return resize_cams(m, shape)


def cell_mean_activation(m: np.ndarray, cells: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean of a (Y, X) map over each cell of ``cells`` (rows in the order of ``ids``)."""
    flat = np.asarray(cells).ravel().astype(np.int64)
    n = int(max(flat.max(initial=0), ids.max(initial=0))) + 1
    s = np.bincount(flat, weights=np.asarray(m, dtype=np.float64).ravel(), minlength=n)
    c = np.bincount(flat, minlength=n)
    return np.divide(s[ids], c[ids], out=np.zeros(len(ids)), where=c[ids] > 0)


def combine_scores(act: np.ndarray, prob: float, config: PseudoLabelConfig) -> np.ndarray:
    """Per-cell scores of one class from mean activations ``act`` (n,) and image probability ``prob``."""
    act = np.asarray(act, dtype=np.float64)
    if config.relative:
        top = act.max(initial=0.0)
        r = act / top if top > 0 else np.ones_like(act)
    else:
        r = act
    p = float(np.clip(prob, 0.0, 1.0))
    if config.rule == "mixture":
        return p * r + (1.0 - p)
    if config.rule == "product":
        return p * r
    return r


def image_pseudo_labels(
    image_id: str,
    cells: np.ndarray,
    image_labels: np.ndarray,
    image_probs: np.ndarray,
    cams: np.ndarray | Mapping[int, np.ndarray] | None,
    config: PseudoLabelConfig | None = None,
) -> pd.DataFrame:
    """Pseudo-labels of every cell of one training image.

    Parameters
    ----------
    image_id
        Written into the table.
    cells
        (Y, X) label image.
    image_labels
        (19,) multi-hot image-level labels (the annotation).
    image_probs
        (19,) image model probabilities for this image.
    cams
        (19, h, w) maps in [0, 1] (normalised by their maximum, as ``predict_images`` and the OAA
        store give them), or ``{class: (h, w) map}`` (OAA maps for some classes); any
        resolution, resized to the image here. ``None``, a missing class or a flat map = no
        location information for that class.
    config
        Threshold and rule.

    Returns
    -------
    pandas.DataFrame
        Geometry columns, ``labels`` (``|``-joined class ids), ``n_labels``, then
        ``soft_S`` and ``act_S`` for every class.
    """
    config = config or PseudoLabelConfig()
    cells = np.asarray(cells)
    geo = cell_geometry(cells, image_id)
    ids = geo["cell_id"].to_numpy(np.int64)
    n = len(ids)
    soft = np.zeros((n, N_CLASSES))
    act = np.full((n, N_CLASSES), np.nan)
    labels = np.asarray(image_labels).astype(bool).reshape(N_CLASSES)
    probs = np.asarray(image_probs, dtype=np.float64).reshape(N_CLASSES)
    positive = [k for k in np.flatnonzero(labels) if k != NEGATIVE]
    if n:
        for k in positive:
            m = None
            if isinstance(cams, Mapping):
                m = cams.get(int(k))
            elif cams is not None:
                m = np.asarray(cams)[k]
            full = None if m is None else _cell_map(m, cells.shape)
            a = np.ones(n) if full is None else cell_mean_activation(full, cells, ids)
            act[:, k] = a
            soft[:, k] = combine_scores(a, probs[k], config)
        soft[:, NEGATIVE] = 1.0 - soft.max(1) if positive else 1.0
    hard = soft >= config.threshold
    hard[:, NEGATIVE] = False
    none = ~hard.any(1)
    hard[none, NEGATIVE] = True
    geo["labels"] = ["|".join(str(k) for k in np.flatnonzero(h)) for h in hard]
    geo["n_labels"] = hard.sum(1).astype(np.int64)
    extra = pd.DataFrame(np.concatenate([soft, act], axis=1), columns=list(SOFT_COLUMNS) + list(ACT_COLUMNS))
    return pd.concat([geo.reset_index(drop=True), extra], axis=1)


def pseudo_label_matrix(table: pd.DataFrame) -> np.ndarray:
    """(n_cells, 19) uint8 multi-hot labels of a pseudo-label table (from its ``labels`` column)."""
    out = np.zeros((len(table), N_CLASSES), np.uint8)
    for i, s in enumerate(table["labels"].astype(str)):
        for tok in s.split("|"):
            if tok.strip() and tok.strip() != "nan":
                out[i, int(tok)] = 1
    return out


def soft_score_matrix(table: pd.DataFrame) -> np.ndarray:
    """(n_cells, 19) float32 soft scores of a pseudo-label table."""
    return table[list(SOFT_COLUMNS)].to_numpy(np.float32)


def write_pseudolabels(path: str | Path, table: pd.DataFrame) -> None:
    """Write the pseudo-label table as CSV atomically."""
    from napari_cpgcn.io.atomic import atomic_write_text

    atomic_write_text(path, table.to_csv(index=False, float_format="%.6g"))


def read_pseudolabels(path: str | Path) -> pd.DataFrame:
    """Read a pseudo-label table written by :func:`write_pseudolabels`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-label table {path} does not exist; run the 'pseudolabels' stage first")
    table = pd.read_csv(path, dtype={"image_id": str, "labels": str})
    missing = [c for c in (*GEOMETRY_COLUMNS, "labels", *SOFT_COLUMNS) if c not in table.columns]
    if missing:
        raise ValueError(f"{path} is not a pseudo-label table: missing columns {missing[:4]}")
    table["labels"] = table["labels"].fillna("")
    return table


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """Counts for logs: cells, mean labels per cell, fraction Negative."""
    mat = pseudo_label_matrix(table)
    return {
        "cells": float(len(table)),
        "labels_per_cell": float(mat.sum(1).mean()) if len(table) else 0.0,
        "negative_fraction": float(mat[:, NEGATIVE].mean()) if len(table) else 0.0,
    }

