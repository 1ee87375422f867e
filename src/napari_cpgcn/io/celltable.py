"""The shared per-cell table: cell geometry columns and the per-class probability columns.

Every per-cell table in the package (prediction, pseudo-labels, exports) starts with the
columns ``image_id, cell_id, centroid_y, centroid_x, area, bbox_y0, bbox_x0, bbox_y1,
bbox_x1`` (bbox end exclusive, in pixels of the image); prediction tables go on with
``top_class`` and ``image_S``, ``cell_S``, ``fused_S``, ``unc_S`` for every class short name ``S``
and one ``uncertainty`` per cell (:mod:`napari_cpgcn.pipeline.uncertainty`).

No Qt, no torch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_cpgcn.classes import SHORT_NAMES

__all__ = ["GEOMETRY_COLUMNS", "PREDICTION_COLUMNS", "prediction_columns", "cell_geometry", "cell_ids"]

GEOMETRY_COLUMNS: tuple[str, ...] = (
    "image_id", "cell_id", "centroid_y", "centroid_x", "area",
    "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1",
)


def prediction_columns() -> list[str]:
    """All columns of a prediction table, in order."""
    cols = list(GEOMETRY_COLUMNS) + ["top_class"]
    for prefix in ("image_", "cell_", "fused_", "unc_"):
        cols += [f"{prefix}{s}" for s in SHORT_NAMES]
    return cols + ["uncertainty"]


PREDICTION_COLUMNS: tuple[str, ...] = tuple(prediction_columns())


def cell_ids(cells: np.ndarray) -> np.ndarray:
    """Sorted nonzero label ids present in a label image."""
    ids = np.unique(np.asarray(cells))
    return ids[ids != 0].astype(np.int64)


def cell_geometry(cells: np.ndarray, image_id: str = "") -> pd.DataFrame:
    """Geometry columns of every cell of a (Y, X) label image, one row per cell id (sorted).

    Computed with one pass of ``scipy.ndimage.find_objects`` and bincounts, so it stays fast
    on 3072² images with hundreds of cells.
    """
    from scipy import ndimage as ndi

    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise ValueError(f"expected a (Y, X) label image, got shape {cells.shape}")
    ids = cell_ids(cells)
    if len(ids) == 0:
        return pd.DataFrame({c: pd.Series(dtype="object" if c == "image_id" else "float64")
                             for c in GEOMETRY_COLUMNS}).astype(
            {c: "int64" for c in ("cell_id", "area", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")})
    flat = cells.ravel().astype(np.int64)
    n = int(ids.max()) + 1
    area = np.bincount(flat, minlength=n)
    # center_of_mass works with open grids: no full-size coordinate arrays.
    com = np.asarray(ndi.center_of_mass(np.ones(cells.shape, np.uint8), cells, ids), dtype=np.float64)
    slices = ndi.find_objects(cells.astype(np.int64, copy=False))
    rows = []
    for i in ids:
        sl = slices[i - 1]
        rows.append((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
    bb = np.asarray(rows, dtype=np.int64)
    return pd.DataFrame({
        "image_id": image_id,
        "cell_id": ids,
        "centroid_y": com[:, 0],
        "centroid_x": com[:, 1],
        "area": area[ids].astype(np.int64),
        "bbox_y0": bb[:, 0], "bbox_x0": bb[:, 1], "bbox_y1": bb[:, 2], "bbox_x1": bb[:, 3],
    })
