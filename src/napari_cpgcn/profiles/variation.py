"""Single-cell variation per image and class, after the Human Protein Atlas' definition.

The HPA annotates whether a protein's localisation varies between the cells of an image: some
cells express it and others not (*spatial* variation), or all express it at clearly different
levels (*intensity* variation). For each class predicted for an image this module gives

``n_cells``
    Cells of the image.
``n_expressing`` / ``share_expressing``
    Cells whose fused score for the class reaches the class threshold (the same rule that
    lists a class in a cell's ``top_classes``), and their share of ``n_cells``.
``intensity_cv``
    Coefficient of variation (std / mean) of the per-cell mean green (protein) intensity
    within the expressing cells (NaN with fewer than two of them, or without intensities).
``variable``
    The share disagrees with the image label (the class is predicted for the image, yet only
    ``share_expressing < spatial_share`` of its cells express it), or ``intensity_cv`` exceeds
    ``max_cv``.

No Qt, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from napari_cpgcn.classes import SHORT_NAMES

__all__ = [
    "VARIATION_COLUMNS",
    "VariationParams",
    "cell_green_means",
    "image_variation",
    "variation_of_prediction",
]

#: Columns of ``variation.csv`` (one row per image and predicted class).
VARIATION_COLUMNS: tuple[str, ...] = (
    "image_id", "class", "n_cells", "n_expressing", "share_expressing", "intensity_cv", "variable",
)


class VariationParams:
    """Thresholds of the variation score.

    Parameters
    ----------
    threshold
        A cell expresses a class when its fused score reaches this; a class is predicted for the
        image when its image-level probability does.
    spatial_share
        ``variable`` when fewer than this share of the cells express a predicted class.
    max_cv
        ``variable`` when the intensity CV of the expressing cells exceeds this.
    score
        Which per-cell score decides expression: ``"fused"`` (the default, image x cell) or
        ``"cell"`` (the cell model's probability alone; for models whose fused scores are not
        calibrated).
    """

    def __init__(self, threshold: float = 0.5, spatial_share: float = 0.75, max_cv: float = 0.5,
                 score: str = "fused") -> None:
        if score not in ("fused", "cell"):
            raise ValueError(f"score must be 'fused' or 'cell', got {score!r}")
        self.score = score
        for name, v in (("threshold", threshold), ("spatial_share", spatial_share)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if max_cv <= 0:
            raise ValueError(f"max_cv must be > 0, got {max_cv}")
        self.threshold, self.spatial_share, self.max_cv = float(threshold), float(spatial_share), float(max_cv)


def cell_green_means(data: np.ndarray, cells: np.ndarray, cell_ids: Sequence[int]) -> np.ndarray:
    """Mean green (channel 1) intensity in [0, 1] of each cell of ``cell_ids`` → (n,) float32.

    ``data`` is the (4, Y, X) image (red, green, blue, yellow), ``cells`` its label image; one
    bincount pass, so it costs little next to the models.
    """
    ids = np.asarray(cell_ids, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros(0, np.float32)
    lab = np.asarray(cells).ravel()
    if lab.dtype.kind != "i" or lab.dtype.itemsize < 8:
        lab = lab.astype(np.intp)
    n = max(int(lab.max()), int(ids.max())) + 1
    green = np.asarray(data[1])
    # integer images: sum the raw values, scale once (the same as io.hpa.to_float, one pass less)
    scale = float(np.iinfo(green.dtype).max) if np.issubdtype(green.dtype, np.integer) else 1.0
    sums = np.bincount(lab, weights=green.ravel(), minlength=n)
    counts = np.bincount(lab, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[ids] / counts[ids] / scale
    return means.astype(np.float32)


def image_variation(image_id: str, fused: np.ndarray, image_probs: np.ndarray,
                    green_mean: np.ndarray | None = None, params: VariationParams | None = None,
                    classes: Sequence[int] | None = None) -> pd.DataFrame:
    """The variation rows of one image.

    Parameters
    ----------
    image_id
        Written into every row.
    fused
        (n_cells, 19) fused per-cell scores.
    image_probs
        (19,) image-level probabilities: the classes at or above ``params.threshold`` are the
        image's predicted classes (the top class when none is).
    green_mean
        (n_cells,) per-cell mean green intensity (:func:`cell_green_means`); None: ``intensity_cv``
        is NaN.
    classes
        Score these class indices instead of the predicted ones (e.g. the true classes in a
        benchmark).
    """
    params = params or VariationParams()
    fused = np.asarray(fused, dtype=np.float64).reshape(-1, len(SHORT_NAMES))
    image_probs = np.asarray(image_probs, dtype=np.float64).reshape(len(SHORT_NAMES))
    n = len(fused)
    if green_mean is not None:
        green_mean = np.asarray(green_mean, dtype=np.float64).reshape(-1)
        if len(green_mean) != n:
            raise ValueError(f"{image_id}: {len(green_mean)} green intensities for {n} cells")
    if classes is None:
        ks = [int(k) for k in np.argsort(-image_probs, kind="stable") if image_probs[k] >= params.threshold]
        classes = ks or [int(np.argmax(image_probs))]
    rows = []
    for k in classes:
        expressing = fused[:, k] >= params.threshold if n else np.zeros(0, bool)
        m = int(expressing.sum())
        share = m / n if n else float("nan")
        cv = float("nan")
        if green_mean is not None and m >= 2:
            g = green_mean[expressing]
            mu = float(g.mean())
            cv = float(g.std(ddof=1) / mu) if mu > 0 else float("nan")
        variable = bool(n > 0 and ((share < params.spatial_share) or (np.isfinite(cv) and cv > params.max_cv)))
        rows.append({"image_id": image_id, "class": SHORT_NAMES[int(k)], "n_cells": n, "n_expressing": m,
                     "share_expressing": share, "intensity_cv": cv, "variable": variable})
    return pd.DataFrame(rows, columns=list(VARIATION_COLUMNS))


def variation_of_prediction(prediction, params: VariationParams | None = None,
                            classes: Sequence[int] | None = None) -> pd.DataFrame:
    """:func:`image_variation` of a :class:`~napari_cpgcn.pipeline.predictor.CellPrediction`
    (its fused columns, image probabilities and ``green_mean`` when present)."""
    params = params or VariationParams()
    table = prediction.table
    fused = table[[f"{params.score}_{s}" for s in SHORT_NAMES]].to_numpy(np.float64) if len(table) else \
        np.zeros((0, len(SHORT_NAMES)))
    return image_variation(str(prediction.image_id), fused, np.asarray(prediction.image_probs),
                           getattr(prediction, "green_mean", None), params, classes)
