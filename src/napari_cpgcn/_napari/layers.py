"""Build napari layer-data tuples for HPA images, cell masks, CAMs and per-cell tables.

No Qt and no napari import here: every function returns plain ``(data, kwargs, layer_type)``
tuples (napari's ``LayerDataTuple``) or plain Python/pandas objects, so the reader, the sample
data provider, the widgets and scripts share one definition of how things look.

Every layer this package makes carries ``metadata["hpa_role"]`` (``"channel"``, ``"cells"`` or
``"cam"``) so widgets can find "their" layers without relying on layer names.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_cpgcn.classes import (
    CHANNEL_COLORMAPS,
    CHANNEL_STAINS,
    CHANNELS,
    CLASSES,
    NEGATIVE,
    SHORT_NAMES,
)

if TYPE_CHECKING:  # pandas is imported lazily: the reader must stay light
    import pandas as pd

    from napari_cpgcn.io.hpa import HPAImage

__all__ = [
    "LayerDataTuple",
    "CELLS_LAYER",
    "auto_contrast_limits",
    "find_labels_csvs",
    "lookup_image_labels",
    "channel_layer_name",
    "channel_layers",
    "cells_layer",
    "cell_features",
    "table_from_features",
    "TABLE_BASE_COLUMNS",
    "table_columns",
    "cam_layers",
    "top_class_color_dict",
    "class_color",
    "summarise_cell",
]

log = logging.getLogger(__name__)

LayerDataTuple = tuple[Any, dict[str, Any], str]

#: Name of the Labels layer holding the cell instance mask (shared with the Segment widget).
CELLS_LAYER = "cells"
#: Outline width of the ``cells`` layer after Predict: the channels and CAMs stay readable inside.
CELL_CONTOUR = 2

#: Per-cell table columns that precede the per-class probabilities.
TABLE_BASE_COLUMNS: tuple[str, ...] = (
    "image_id", "cell_id", "centroid_y", "centroid_x", "area",
    "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "top_class",
)


def table_columns() -> list[str]:
    """All per-cell prediction table columns in their canonical order (:mod:`napari_cpgcn.io.celltable`)."""
    from napari_cpgcn.io.celltable import prediction_columns

    return prediction_columns()


# --------------------------------------------------------------------------- contrast

def auto_contrast_limits(
    plane: np.ndarray,
    percentiles: tuple[float, float] = (0.5, 99.95),
    min_high_fraction: float = 0.05,
) -> tuple[float, float]:
    """Display limits from intensity percentiles.

    Parameters
    ----------
    plane
        One channel (any shape, integer or float).
    percentiles
        Lower and upper percentile. The low one removes the camera offset / background haze;
        the high one lets a few saturated pixels clip so that the structure is visible.
    min_high_fraction
        The upper limit is at least this fraction of the dtype range (integer images). A
        channel with almost no signal (a Negative protein) must not be stretched until its
        noise looks like staining, which would mislead the eye.

    Returns
    -------
    (low, high) with ``high > low``.
    """
    a = np.asarray(plane)
    if a.size == 0:
        return (0.0, 1.0)
    if a.dtype in (np.uint8, np.uint16):
        # Exact percentiles from a histogram: ~10x faster than np.percentile on 2048² images.
        counts = np.bincount(a.ravel(), minlength=int(np.iinfo(a.dtype).max) + 1 if a.dtype == np.uint8 else 0)
        cdf = np.cumsum(counts, dtype=np.float64)
        cdf /= cdf[-1]
        lo = float(np.searchsorted(cdf, percentiles[0] / 100.0))
        hi = float(np.searchsorted(cdf, percentiles[1] / 100.0))
        floor = min_high_fraction * float(np.iinfo(a.dtype).max)
    else:
        sample = a.ravel()[:: max(1, a.size // 1_000_000)].astype(np.float64)
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            return (0.0, 1.0)
        lo, hi = (float(v) for v in np.percentile(sample, percentiles))
        floor = lo
    hi = max(hi, floor)
    if hi <= lo:
        hi = lo + 1.0
    return (lo, hi)


# --------------------------------------------------------------------------- labels CSV lookup

def _is_labels_csv_name(name: str) -> bool:
    n = name.lower()
    return n.endswith(".csv") and (n == "train.csv" or "labels" in n)


def find_labels_csvs(images_dir: str | Path) -> list[Path]:
    """Candidate Kaggle labels CSVs for images in ``images_dir``.

    Looks for ``train.csv`` or ``*labels*.csv`` beside the images, then one level up (a
    Kaggle-layout root holds ``train.csv`` next to the ``train/`` or ``images/`` folder).
    Nearer files come first.
    """
    images_dir = Path(images_dir)
    out: list[Path] = []
    for folder in (images_dir, images_dir.parent):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        # train.csv first: it is the canonical name.
        names.sort(key=lambda n: n.lower() != "train.csv")
        out += [folder / n for n in names if _is_labels_csv_name(n) and (folder / n).is_file()]
    return out


@functools.lru_cache(maxsize=8)
def _labels_dict(path: str, mtime: float) -> dict[str, np.ndarray]:
    from napari_cpgcn.io.tables import read_labels_csv

    return read_labels_csv(path).as_dict()


def lookup_image_labels(
    image_id: str, images_dir: str | Path | None = None, labels_csv: str | Path | None = None
) -> tuple[list[int] | None, Path | None]:
    """The image-level class ids of ``image_id`` and the CSV they came from.

    Parameters
    ----------
    image_id
        The image to look up.
    images_dir
        Where the image lies; CSVs beside it or one level up are searched (see
        :func:`find_labels_csvs`). Ignored when ``labels_csv`` is given.
    labels_csv
        An explicit labels CSV.

    Returns
    -------
    (class ids, csv path), or ``(None, None)`` when no CSV lists the image. A malformed CSV
    that was found by searching is skipped with a warning; an explicit one raises.
    """
    if labels_csv is not None:
        candidates = [Path(labels_csv)]
    elif images_dir is not None:
        candidates = find_labels_csvs(images_dir)
    else:
        return None, None
    for csv in candidates:
        try:
            table = _labels_dict(str(csv.resolve()), csv.stat().st_mtime)
        except Exception as e:
            if labels_csv is not None:
                raise
            log.warning("ignoring %s as a labels CSV: %s", csv, e)
            continue
        if image_id in table:
            return [int(k) for k in np.flatnonzero(table[image_id])], csv
    return None, None


# --------------------------------------------------------------------------- channel layers

def channel_layer_name(image_id: str, color: str) -> str:
    """``"{image_id} {color}"`` — the name of one channel layer."""
    return f"{image_id} {color}"


def channel_layers(
    image: HPAImage,
    labels: Sequence[int] | None = None,
    labels_csv: str | Path | None = None,
    contrast_limits: dict[str, tuple[float, float]] | None = None,
) -> list[LayerDataTuple]:
    """Four image layers (red, green, blue, yellow) for one HPA image.

    Parameters
    ----------
    image
        The image (``data`` (4, Y, X)).
    labels
        Its image-level class ids, when known.
    labels_csv
        The CSV the labels came from (recorded in the metadata).
    contrast_limits
        Per-colour limits to use instead of the automatic percentile ones.

    Returns
    -------
    list of ``(data (Y, X), kwargs, "image")`` in channel order, with colormap = channel
    colour, additive blending and ``metadata = {"hpa_role": "channel", "hpa_channel": colour,
    "image_id", "labels" (class ids or None), "label_names", "stain", ...}``.
    """
    label_list = None if labels is None else [int(k) for k in labels]
    label_names = None if label_list is None else [CLASSES[k].name for k in label_list]
    out: list[LayerDataTuple] = []
    for k, color in enumerate(CHANNELS):
        plane = image.data[k]
        cl = (contrast_limits or {}).get(color) or auto_contrast_limits(plane)
        meta = {
            "hpa_role": "channel",
            "hpa_channel": color,
            "image_id": image.image_id,
            "labels": label_list,
            "label_names": label_names,
            "labels_csv": None if labels_csv is None else str(labels_csv),
            "stain": CHANNEL_STAINS[color],
            "path": str(image.paths.get(color, "")),
            "bit_depth": image.bit_depth,
            # what the automatic limits were: a widget replacing the data can tell whether the
            # user has changed them since (and then keep the user's choice)
            "auto_contrast": [float(cl[0]), float(cl[1])],
        }
        kwargs = {
            "name": channel_layer_name(image.image_id, color),
            "colormap": CHANNEL_COLORMAPS[color],
            "blending": "additive",
            "contrast_limits": [float(cl[0]), float(cl[1])],
            "metadata": meta,
        }
        out.append((plane, kwargs, "image"))
    return out


# --------------------------------------------------------------------------- cells + table

def class_color(k: int) -> str:
    """Hex colour of class ``k``."""
    return CLASSES[k].color


def summarise_cell(row: Any, n: int = 3, min_p: float = 0.1) -> str:
    """``"nucleoli 0.91, golgi 0.40"``: the cell's most likely classes by fused probability."""
    probs = [(float(row[f"fused_{s}"]), s) for s in SHORT_NAMES if f"fused_{s}" in row]
    probs.sort(reverse=True)
    picked = [f"{s} {p:.2f}" for p, s in probs[:n] if p >= min_p]
    return ", ".join(picked) if picked else "none"


def cell_features(table: pd.DataFrame) -> pd.DataFrame:
    """Per-cell table → ``Labels.features`` frame.

    Columns: ``index`` (= label id = ``cell_id``), ``top_class``, ``classes`` (a short
    summary, first so the status bar shows it first when hovering), ``uncertainty``, then the
    fused, image and cell probability and the uncertainty (``unc_S``) of every class, then image
    id, centroid, area and bbox.
    """
    import pandas as pd

    if "cell_id" not in table.columns:
        raise ValueError(f"per-cell table lacks the 'cell_id' column (has {list(table.columns)[:6]}...)")
    feats = pd.DataFrame({"index": table["cell_id"].astype(np.int64).to_numpy()})
    feats["top_class"] = table["top_class"].astype(str).to_numpy() if "top_class" in table else ""
    feats["classes"] = [summarise_cell(r) for _, r in table.iterrows()]
    prob_cols = ["uncertainty"] + [f"{kind}_{s}" for kind in ("fused", "image", "cell", "unc") for s in SHORT_NAMES]
    rest = [c for c in TABLE_BASE_COLUMNS if c not in ("cell_id", "top_class")]
    for c in prob_cols + rest:
        if c in table.columns:
            feats[c] = table[c].to_numpy()
    return feats


def table_from_features(features: pd.DataFrame, image_id: str | None = None) -> pd.DataFrame:
    """``Labels.features`` (from :func:`cell_features`) → per-cell table in the canonical column order."""
    import pandas as pd

    f = features.copy()
    if "cell_id" not in f.columns:
        f["cell_id"] = f["index"].astype(np.int64)
    if "image_id" not in f.columns:
        f["image_id"] = image_id or ""
    cols = [c for c in table_columns() if c in f.columns]
    return pd.DataFrame(f[cols]).reset_index(drop=True)


def top_class_color_dict(table: pd.DataFrame) -> dict[int | None, str]:
    """A direct label colormap: each cell coloured by its top class (for ``Labels.colormap``)."""
    index = {s: k for k, s in enumerate(SHORT_NAMES)}
    colors: dict[int | None, str] = {None: "transparent", 0: "transparent"}
    for cid, top in zip(table["cell_id"].to_numpy(), table["top_class"].astype(str), strict=True):
        colors[int(cid)] = CLASSES[index.get(top, NEGATIVE)].color
    return colors


def cells_layer(
    cells: np.ndarray,
    table: pd.DataFrame | None = None,
    image_id: str | None = None,
    name: str = CELLS_LAYER,
) -> LayerDataTuple:
    """The Labels layer tuple of a cell instance mask, with the per-cell table as ``features``."""
    kwargs: dict[str, Any] = {
        "name": name,
        "opacity": 0.8,  # drawn as outlines (CELL_CONTOUR, set on the layer: not a constructor argument)
        "metadata": {"hpa_role": "cells", "image_id": image_id},
    }
    if table is not None:
        kwargs["features"] = cell_features(table)
    return (np.asarray(cells), kwargs, "labels")


# --------------------------------------------------------------------------- CAM overlays

def cam_layers(
    cams: np.ndarray,
    image_probs: np.ndarray,
    image_id: str | None = None,
    threshold: float = 0.3,
    n_visible: int = 3,
    opacity: float = 0.7,
    include_negative: bool = False,
    floor: float = 0.2,
    max_side: int | None = None,
) -> list[LayerDataTuple]:
    """One image layer per predicted class: the class activation map in the class colour.

    Parameters
    ----------
    cams
        (C, Y, X) class activation maps at image resolution (normalised to [0, 1] per class).
    image_probs
        (C,) image-level probabilities.
    threshold
        Classes with a probability >= this get a layer; the top class always does (even below
        it) so the user sees where the model looked.
    n_visible
        The ``n_visible`` most probable classes are visible; the others are added hidden.
    opacity
        Layer opacity (blending is additive, so the channels stay readable underneath).
    include_negative
        Also overlay the Negative class (its map carries no localisation, off by default).
    floor
        Lower contrast limit as a fraction of the map's maximum: the weak, diffuse tail of an
        upsampled CAM stays transparent and only where the model looked lights up (the data
        are untouched; drag the contrast slider to see all of it).
    max_side
        Keep each map at most this many pixels on its longer side: a map is smooth (a model's
        feature grid, upsampled), so it is block-averaged by an integer factor f and shown with
        ``scale = (f, f)`` and ``translate = ((f-1)/2, (f-1)/2)`` over the image's pixels. A 2048²
        image's maps at 512² are 16 times cheaper to add, draw and remove on the GUI thread.

    Returns
    -------
    list of ``(cam (Y, X) float32, kwargs, "image")``, most probable class first. Names are
    ``"CAM <class name>"``; ``metadata = {"hpa_role": "cam", "class_index", "class_name",
    "probability", "image_id"}``.
    """
    cams = np.asarray(cams)
    probs = np.asarray(image_probs, dtype=np.float64).ravel()
    if cams.ndim != 3 or cams.shape[0] != probs.size:
        raise ValueError(f"cams must be (C, Y, X) with C = len(image_probs) = {probs.size}; got {cams.shape}")
    order = [int(k) for k in np.argsort(-probs, kind="stable") if include_negative or k != NEGATIVE]
    chosen = [k for k in order if probs[k] >= threshold] or order[:1]
    out: list[LayerDataTuple] = []
    factor = 1
    if max_side and max(cams.shape[1:]) > max_side:
        factor = int(np.ceil(max(cams.shape[1:]) / max_side))
    for rank, k in enumerate(chosen):
        cam = np.asarray(cams[k], dtype=np.float32)
        hi = float(np.nanmax(cam)) if cam.size else 1.0
        cam = block_mean(cam, factor)
        top = max(hi, 1e-6) if hi > 1.0 else 1.0
        kwargs = {
            "name": f"CAM {CLASSES[k].name}",
            "colormap": CLASSES[k].color,  # napari builds a black → class colour map from a hex
            "blending": "additive",
            "opacity": opacity,
            "contrast_limits": [floor * top, top],
            "visible": rank < n_visible,
            "scale": (float(factor), float(factor)),
            "translate": ((factor - 1) / 2, (factor - 1) / 2),
            "metadata": {
                "hpa_role": "cam",
                "image_shape": tuple(int(v) for v in cams.shape[1:]),
                "class_index": k,
                "class_name": CLASSES[k].name,
                "probability": float(probs[k]),
                "image_id": image_id,
            },
        }
        out.append((cam, kwargs, "image"))
    return out


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """``a`` (Y, X) averaged over f×f blocks (edges padded by repetition); ``a`` itself when f = 1."""
    if f <= 1:
        return a
    y, x = a.shape
    py, px = -y % f, -x % f
    if py or px:
        a = np.pad(a, ((0, py), (0, px)), mode="edge")
    return a.reshape(a.shape[0] // f, f, a.shape[1] // f, f).mean(axis=(1, 3), dtype=np.float32)


def roles(layers: Iterable[Any], role: str) -> list[Any]:
    """The napari layers among ``layers`` whose ``metadata["hpa_role"]`` is ``role``."""
    return [ly for ly in layers if getattr(ly, "metadata", {}).get("hpa_role") == role]


#: ``Labels.features`` column set True for a cell whose pixels were edited after Predict (its
#: scores describe the cell as it was; a new cell has none): re-predict to update them.
EDITED_COLUMN = "edited"


def paint_atom_ids(atoms: Iterable[Any]) -> set[int]:
    """The label ids a napari Labels paint event touched (old values and painted values).

    ``atoms`` is the event's ``value``: napari's history atoms, either ``(index, old, new)``
    tuples (``data_setitem``) or masked atoms with ``old_values`` and ``new_value``.
    """
    ids: set[int] = set()
    for atom in atoms:
        if hasattr(atom, "old_values"):
            old, new = atom.old_values, atom.new_value
        else:
            old, new = atom[1], atom[2]
        ids.update(int(v) for v in np.unique(np.asarray(old)))
        ids.update(int(v) for v in np.unique(np.asarray(new)))
    ids.discard(0)
    return ids


def sync_features_to_mask(features: pd.DataFrame, mask: np.ndarray,
                          touched: Iterable[int] | None = None) -> tuple[pd.DataFrame, list[int], list[int]]:
    """``features`` made to describe the cells of ``mask`` after an edit: ``(features, removed, added)``.

    Rows of cells no longer in the mask are dropped; a cell new in the mask gets a row with its
    id, area and centroid and no scores (NaN); every touched cell that remains is marked in
    :data:`EDITED_COLUMN`. ``touched``: the ids an edit changed (:func:`paint_atom_ids`); None
    checks every id (a replaced mask).
    """
    f = features.copy()
    if EDITED_COLUMN not in f.columns:
        f[EDITED_COLUMN] = False
    known = set(int(i) for i in f["index"].to_numpy()) if "index" in f.columns else set()
    if touched is None:
        present = set(int(v) for v in np.unique(mask)) - {0}
        touched = known | present
    else:
        touched = set(int(v) for v in touched) - {0}
        present = {i for i in touched if bool(np.any(mask == i))}
    removed = sorted(i for i in touched & known if i not in present)
    added = sorted(i for i in present if i not in known)
    if removed:
        f = f[~f["index"].isin(removed)]
    f.loc[f["index"].isin(list(touched & present)), EDITED_COLUMN] = True
    if added:  # new rows by reindexing (NaN scores; pandas warns when concatenating all-NaN rows)
        f = f.set_index("index", drop=False)
        f = f.reindex([*f.index, *added])
        for i in added:
            ys, xs = np.nonzero(mask == i)
            f.loc[i, ["index", "area", "centroid_y", "centroid_x"]] = [i, ys.size, ys.mean(), xs.mean()]
            f.loc[i, EDITED_COLUMN] = True
            for c in ("top_class", "classes"):
                if c in f.columns:
                    f.loc[i, c] = "new cell: re-predict"
        f["index"] = f["index"].astype(np.int64)
    f[EDITED_COLUMN] = f[EDITED_COLUMN].astype(bool)
    return f.reset_index(drop=True), removed, added
