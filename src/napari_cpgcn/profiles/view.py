"""What the UMAP dock widget shows, without Qt: the points, their colours, selections.

:func:`read_profiles` reads the per-cell ``obs`` and the 2-D coordinates of a ``cells.h5ad``
(``obsm["X_umap"]``, else computed from ``obsm["X_cpgcn"]``); :func:`point_colors` colours the
points by top class, uncertainty or a numeric column; :func:`points_in_polygon` /
:func:`points_in_box` are the lasso and box selections; :func:`selection_colormap` turns the
selected cells of one image into a direct label colormap for its ``cells`` layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from napari_cpgcn.classes import CLASSES, SHORT_NAMES

__all__ = ["read_profiles", "color_options", "point_colors", "points_in_polygon", "points_in_box",
           "selection_colormap", "HIGHLIGHT", "DIMMED"]

#: Colours of the selected cells and of the others in the ``cells`` layer.
HIGHLIGHT = "#ffff00"
DIMMED = "#80808040"

TOP_CLASS = "top class"
UNCERTAINTY = "uncertainty"


def read_profiles(path: str | Path, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """``(obs, coords)`` of a ``cells.h5ad``: the per-cell table and (n, 2) float32 UMAP coordinates.

    Raises
    ------
    ValueError
        The file lacks ``image_id`` / ``cell_id`` columns or any embedding (not written by
        ``napari-cpgcn predict --embeddings``).
    """
    import anndata as ad

    a = ad.read_h5ad(path)
    missing = [c for c in ("image_id", "cell_id") if c not in a.obs]
    if missing:
        raise ValueError(f"{path}: obs lacks {missing}; give the cells.h5ad written by "
                         "`napari-cpgcn predict --embeddings`")
    if "X_umap" in a.obsm:
        coords = np.asarray(a.obsm["X_umap"], np.float32)[:, :2]
    elif "X_cpgcn" in a.obsm:
        from napari_cpgcn.profiles.embeddings import compute_umap

        coords = compute_umap(np.asarray(a.obsm["X_cpgcn"]), seed=seed)
    else:
        raise ValueError(f"{path} has neither obsm['X_umap'] nor obsm['X_cpgcn']; rerun "
                         "`napari-cpgcn predict --embeddings --umap`")
    obs = a.obs.reset_index(drop=True).copy()
    obs["image_id"] = obs["image_id"].astype(str)
    obs["cell_id"] = obs["cell_id"].astype(np.int64)
    return obs, coords


def color_options(obs: pd.DataFrame) -> list[str]:
    """What the points can be coloured by: top class, uncertainty (when a column holds it), then
    every other numeric column."""
    opts = [TOP_CLASS] if "top_class" in obs else []
    if UNCERTAINTY in obs or any(c.startswith("fused_") for c in obs.columns):
        opts.append(UNCERTAINTY)
    opts += [c for c in obs.columns if c not in ("cell_id", UNCERTAINTY)
             and pd.api.types.is_numeric_dtype(obs[c]) and not pd.api.types.is_bool_dtype(obs[c])]
    return opts


def _uncertainty(obs: pd.DataFrame) -> np.ndarray:
    if UNCERTAINTY in obs:
        return obs[UNCERTAINTY].to_numpy(np.float64)
    fused = obs[[f"fused_{s}" for s in SHORT_NAMES if f"fused_{s}" in obs]].to_numpy(np.float64)
    # 1 - the top fused score: 0 for a confident cell, 1 when no class scores
    return 1.0 - fused.max(1) if fused.size else np.zeros(len(obs))


def point_colors(obs: pd.DataFrame, by: str, cmap: str = "viridis") -> np.ndarray:
    """(n, 4) RGBA float colours of the points coloured by ``by`` (see :func:`color_options`)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    n = len(obs)
    if by == TOP_CLASS:
        index = {s: k for k, s in enumerate(SHORT_NAMES)}
        table = np.array([to_rgba(c.color) for c in CLASSES])
        ks = np.array([index.get(str(t), len(CLASSES) - 1) for t in obs["top_class"].astype(str)], int)
        return table[ks] if n else np.zeros((0, 4))
    if by == UNCERTAINTY:
        v = _uncertainty(obs)
    elif by in obs:
        v = obs[by].to_numpy(np.float64)
    else:
        raise ValueError(f"cannot colour by {by!r}: choose one of {color_options(obs)}")
    lo, hi = (np.nanmin(v), np.nanmax(v)) if n else (0.0, 1.0)
    t = (v - lo) / (hi - lo) if hi > lo else np.zeros(n)
    return colormaps[cmap](np.nan_to_num(t, nan=0.0))


def points_in_polygon(coords: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Indices of the points inside a lasso polygon ((m, 2) vertices in plot coordinates)."""
    from matplotlib.path import Path as MplPath

    if len(vertices) < 3:
        return np.zeros(0, np.int64)
    return np.flatnonzero(MplPath(np.asarray(vertices)).contains_points(np.asarray(coords)))


def points_in_box(coords: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    """Indices of the points inside the box (corners in any order)."""
    c = np.asarray(coords)
    xa, xb = sorted((x0, x1))
    ya, yb = sorted((y0, y1))
    return np.flatnonzero((c[:, 0] >= xa) & (c[:, 0] <= xb) & (c[:, 1] >= ya) & (c[:, 1] <= yb))


def selection_colormap(obs: pd.DataFrame, selected: np.ndarray, image_id: str | None,
                       cell_ids: np.ndarray) -> dict[int | None, str]:
    """A direct label colormap for the ``cells`` layer of ``image_id``: its selected cells
    highlighted, its other cells dimmed (every id of ``cell_ids`` gets an entry)."""
    sel = obs.iloc[np.asarray(selected, np.int64)]
    if image_id is not None:
        sel = sel[sel["image_id"] == str(image_id)]
    chosen = set(sel["cell_id"].astype(np.int64).tolist())
    colors: dict[int | None, str] = {None: DIMMED, 0: "transparent"}
    for c in np.asarray(cell_ids, np.int64):
        if c:
            colors[int(c)] = HIGHLIGHT if int(c) in chosen else DIMMED
    return colors
