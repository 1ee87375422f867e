"""OME-Zarr (NGFF 0.4) results: the image pyramid, the ``labels/cells`` mask and the per-cell table.

One image's prediction becomes one ``{ID}.ome.zarr`` that napari (napari-ome-zarr or this
plugin's reader), Fiji (MoBIE, BigDataViewer / n5-viewer), QuPath and spatialdata open::

    {ID}.ome.zarr/            NGFF image: (c, y, x) multiscale pyramid s0, s1, ... (2x steps),
                              "omero" metadata: the four channel names and HPA colours
      labels/cells/           NGFF label image: the cell mask (uint32, ids = cell_id of the CSV),
                              same pyramid (nearest), "image-label" colours = top class
      tables/cells/           AnnData table (anndata's zarr encoding), the spatialdata table
                              convention: X = fused probabilities, layers image/cell/fused,
                              obs = cell_id, geometry, top class; annotates region "cells"

Why NGFF 0.4 on zarr v2, although ome-zarr 0.18 writes 0.5 on zarr v3 by default: Fiji's
readers (MoBIE, n5-viewer, the HDF5/N5/Zarr importer) do not open zarr v3 yet
(mobie/mobie-viewer-fiji#1250, mobie/mobie-utils-python#148), nor do many QuPath installs;
napari-ome-zarr and spatialdata read both. 0.4 is what every NGFF reader reads.

The table follows spatialdata's table format (``spatialdata/_io/io_table.py``, TablesFormat 0.1):
the group attributes ``spatialdata-encoding-type = "ngff:regions_table"``, ``region``,
``region_key``, ``instance_key``, ``version`` and the same keys in
``uns["spatialdata_attrs"]``; ``obs[region_key]`` is categorical. That is the tables
convention spatialdata reads; the older NGFF tables proposal (ome/ngff PR 64) was not merged.

Images, labels and their NGFF metadata are written by ``ome_zarr.writer``
(``write_multiscale``, ``write_multiscale_labels``: arrays, multiscales, image-label and
omero metadata) from pyramids computed here (2x2 box means; every other pixel for labels),
the table by ``anndata.io.write_elem``. Every write goes to a temporary
folder beside the target that is renamed into place: a crash never leaves a half-written zarr
under the real name.

Optional dependencies: ``pip install napari-cpgcn[ome-zarr]`` (ome-zarr, zarr, anndata),
imported only when a zarr is written or read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_cpgcn.classes import (
    CHANNEL_STAINS,
    CHANNELS,
    CLASS_NAMES,
    CLASSES,
    NEGATIVE,
    SHORT_NAMES,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "INSTALL_HINT",
    "NGFF_VERSION",
    "LABEL_NAME",
    "TABLE_NAME",
    "OmeZarrError",
    "require_ome_zarr",
    "OmeZarrResult",
    "write_ome_zarr",
    "read_ome_zarr",
    "is_cpgcn_ome_zarr",
    "table_to_anndata",
    "anndata_to_table",
    "pyramid_factors",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install napari-cpgcn[ome-zarr]"
NGFF_VERSION = "0.4"
#: Name of the label image (``labels/cells``) and of the table (``tables/cells``).
LABEL_NAME = "cells"
TABLE_NAME = "cells"
#: Our key in the root attributes (its presence marks a zarr written by napari-cpgcn).
ATTRS_KEY = "napari_cpgcn"
FORMAT_VERSION = 1
#: HPA display colours (hex RGB) of the channels, as in the HPA image viewer.
CHANNEL_HEX = {"red": "FF0000", "green": "00FF00", "blue": "0000FF", "yellow": "FFFF00"}
_PROB_KINDS = ("fused", "image", "cell")
_REGION_KEY = "region"
_INSTANCE_KEY = "cell_id"


class OmeZarrError(ValueError):
    """An OME-Zarr cannot be written or read; the message names the path and the fix."""


def require_ome_zarr() -> None:
    """Raise an ImportError saying how to install the `ome-zarr` extra when it is missing."""
    try:
        import anndata  # noqa: F401
        import ome_zarr  # noqa: F401
        import zarr  # noqa: F401
    except ImportError as e:
        raise ImportError(f"OME-Zarr output needs ome-zarr, zarr and anndata ({e}); install them with "
                          f"`{INSTALL_HINT}`") from e


# --------------------------------------------------------------------------- tables

def table_to_anndata(table: pd.DataFrame, image_id: str | None = None,
                     image_probs: np.ndarray | None = None):
    """A per-cell table (the CSV's columns) → AnnData in spatialdata's table convention.

    ``X`` holds the fused probabilities (one variable per class short name), ``layers`` the
    ``fused``, ``image`` and ``cell`` probabilities, ``obs`` every other column plus the
    categorical ``region`` (``"cells"``), ``obsm["spatial"]`` the centroids (x, y), and
    ``uns["columns"]`` the table's column order (so :func:`anndata_to_table` restores it).
    """
    import anndata as ad
    import pandas as pd

    df = pd.DataFrame(table).reset_index(drop=True)
    if _INSTANCE_KEY not in df.columns:
        raise ValueError(f"the per-cell table lacks the {_INSTANCE_KEY!r} column (has {list(df.columns)[:6]}...)")
    prob_cols = {kind: [f"{kind}_{s}" for s in SHORT_NAMES] for kind in _PROB_KINDS}
    layers = {kind: df[cols].to_numpy(np.float64) for kind, cols in prob_cols.items()
              if all(c in df.columns for c in cols)}
    used = {c for kind in layers for c in prob_cols[kind]}
    obs = df[[c for c in df.columns if c not in used]].copy()
    for c in obs.columns:  # AnnData writes str columns; keep ints/floats as they are
        if obs[c].dtype == object:
            obs[c] = obs[c].astype(str)
    obs[_REGION_KEY] = pd.Categorical([LABEL_NAME] * len(obs), categories=[LABEL_NAME])
    obs.index = df[_INSTANCE_KEY].astype(np.int64).astype(str).to_numpy()
    var = pd.DataFrame({"name": list(CLASS_NAMES)}, index=list(SHORT_NAMES)) if layers else None
    x = layers.get("fused", next(iter(layers.values()), None))
    uns: dict[str, Any] = {
        "spatialdata_attrs": {"region": LABEL_NAME, "region_key": _REGION_KEY, "instance_key": _INSTANCE_KEY},
        "columns": [str(c) for c in df.columns],
    }
    if image_id is not None:
        uns["image_id"] = str(image_id)
    if image_probs is not None:
        uns["image_probs"] = np.asarray(image_probs, np.float64)
    obsm = {}
    if {"centroid_x", "centroid_y"} <= set(df.columns):
        obsm["spatial"] = df[["centroid_x", "centroid_y"]].to_numpy(np.float64)
    return ad.AnnData(X=x, obs=obs, var=var, layers=layers if layers else None, obsm=obsm or None, uns=uns)


def anndata_to_table(adata) -> pd.DataFrame:
    """AnnData from :func:`table_to_anndata` → the per-cell table with the original columns."""
    import pandas as pd

    obs = adata.obs.reset_index(drop=True)
    cols: dict[str, Any] = {}
    for c in obs.columns:
        v = obs[c]
        if isinstance(v.dtype, pd.CategoricalDtype):
            v = v.astype(str)
        cols[str(c)] = v.to_numpy()
    for kind, arr in (adata.layers or {}).items():
        arr = np.asarray(arr)
        for k, s in enumerate(adata.var_names):
            cols[f"{kind}_{s}"] = arr[:, k]
    order = list(adata.uns.get("columns", [])) or list(cols)
    missing = [c for c in order if c not in cols]
    if missing:
        raise ValueError(f"the table lacks the columns {missing[:4]} that its column list names")
    return pd.DataFrame({c: cols[c] for c in order})


# --------------------------------------------------------------------------- metadata helpers

def pyramid_factors(shape: tuple[int, int], min_size: int = 256) -> tuple[int, ...]:
    """Downsampling factors 2, 4, 8, ... while the smaller side stays >= ``min_size``."""
    out: list[int] = []
    f = 2
    while min(shape) // f >= min_size:
        out.append(f)
        f *= 2
    return tuple(out)


def _halve(a: np.ndarray, labels: bool = False) -> np.ndarray:
    """One 2x pyramid step over the last two axes: the rounded mean of each 2x2 block (images) or
    its top-left pixel (labels: no new ids); odd sides keep their last row / column."""
    if labels:
        return a[..., ::2, ::2]
    y, x = a.shape[-2:]
    if y % 2 or x % 2:
        a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, y % 2), (0, x % 2)], mode="edge")
    if a.dtype.kind in "ui" and a.dtype.itemsize <= 2:
        s = a[..., ::2, ::2].astype(np.uint32) + a[..., 1::2, ::2] + a[..., ::2, 1::2] + a[..., 1::2, 1::2]
        return ((s + 2) // 4).astype(a.dtype)
    s = a[..., ::2, ::2].astype(np.float64) + a[..., 1::2, ::2] + a[..., ::2, 1::2] + a[..., 1::2, 1::2]
    return (s / 4).astype(a.dtype)


def _pyramid(a: np.ndarray, n_levels: int, labels: bool = False) -> list[np.ndarray]:
    """Full resolution and ``n_levels - 1`` 2x steps, each computed from the one before.

    Chained 2x2 box means equal ome-zarr's ``local_mean`` downsampling of the full image (up
    to rounding) at a fraction of its cost: it dominated the zarr write time of 3072² images.
    """
    levels = [a]
    for _ in range(n_levels - 1):
        levels.append(np.ascontiguousarray(_halve(levels[-1], labels)))
    return levels


def _omero(data: np.ndarray) -> dict[str, Any]:
    """OMERO rendering metadata: channel names, HPA colours and display windows."""
    from napari_cpgcn._napari.layers import auto_contrast_limits

    top = float(np.iinfo(data.dtype).max) if data.dtype.kind in "ui" else float(np.nanmax(data) or 1.0)
    channels = []
    for k, color in enumerate(CHANNELS):
        lo, hi = auto_contrast_limits(data[k, ::4, ::4])  # percentiles of a 1/16 sample: enough for display
        channels.append({
            "label": f"{color} ({CHANNEL_STAINS[color]})",
            "color": CHANNEL_HEX[color],
            "active": True,
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
            "window": {"start": float(lo), "end": float(hi), "min": 0.0, "max": top},
        })
    return {"channels": channels, "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0}}


def _rgba(hex_color: str) -> list[int]:
    h = hex_color.lstrip("#")
    return [int(h[i:i + 2], 16) for i in (0, 2, 4)] + [255]


def _label_metadata(table: pd.DataFrame | None) -> dict[str, Any]:
    """``image-label`` metadata: each cell coloured by its top class, its probabilities as properties."""
    meta: dict[str, Any] = {"source": {"image": "../../"}}
    if table is None or not len(table):
        return meta
    index = {s: k for k, s in enumerate(SHORT_NAMES)}
    ids = table[_INSTANCE_KEY].astype(np.int64).to_numpy()
    tops = table["top_class"].astype(str).to_numpy() if "top_class" in table else np.full(len(ids), "")
    meta["colors"] = [{"label-value": int(i), "rgba": _rgba(CLASSES[index.get(t, NEGATIVE)].color)}
                      for i, t in zip(ids, tops, strict=True)]
    fused = [f"fused_{s}" for s in SHORT_NAMES]
    have = all(c in table.columns for c in fused)
    props = []
    for row_i, (i, t) in enumerate(zip(ids, tops, strict=True)):
        p: dict[str, Any] = {"label-value": int(i), "top_class": str(t)}
        if have:
            vals = table[fused].iloc[row_i].to_numpy(np.float64)
            p.update({c: round(float(v), 6) for c, v in zip(fused, vals, strict=True)})
        props.append(p)
    meta["properties"] = props
    return meta


# --------------------------------------------------------------------------- recognising ours

def _root_attrs_text(path: Path) -> str | None:
    f = path / ".zattrs"
    try:
        return f.read_text(encoding="utf-8") if f.is_file() else None
    except OSError:
        return None


def is_cpgcn_ome_zarr(path: str | Path) -> bool:
    """Whether ``path`` is an OME-Zarr written by napari-cpgcn (a cheap look at its root attributes).

    A zarr whose root attributes mention napari-cpgcn but do not parse counts as ours, so that
    reading it reports the damage instead of leaving it to other readers silently.
    """
    p = Path(path)
    if not p.is_dir():
        return False
    text = _root_attrs_text(p)
    if text is None:
        return False
    try:
        attrs = json.loads(text)
    except ValueError:
        return f'"{ATTRS_KEY}"' in text
    return isinstance(attrs, dict) and ATTRS_KEY in attrs


# --------------------------------------------------------------------------- write

def _prepare_target(path: Path, overwrite: bool) -> None:
    """Refuse paths that are not ours to replace; create the parent folder."""
    if path.is_file() or path.is_symlink() and not path.is_dir():
        raise OmeZarrError(f"{path} exists and is a file, not an OME-Zarr; choose another output path "
                           "or remove the file")
    if path.is_dir():
        try:
            empty = not any(path.iterdir())
        except OSError as e:
            raise OmeZarrError(f"{path} exists and cannot be listed ({e})") from e
        if not empty and not is_cpgcn_ome_zarr(path):
            raise OmeZarrError(f"{path} exists and is not an OME-Zarr written by napari-cpgcn; it is left "
                               "alone: choose another output path or remove it")
        if not empty and not overwrite:
            raise OmeZarrError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OmeZarrError(f"cannot create the folder {path.parent} for {path.name}: {e}; choose another "
                           "output folder") from e


def _make_temp_dir(path: Path) -> Path:
    """A temporary folder beside ``path`` (same file system: the final rename is atomic)."""
    for pattern in (f".{path.name}.*.partial", f".{path.name}.*.old"):  # left by a killed earlier write
        for stale in path.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))


def _move_into_place(tmp: Path, path: Path) -> None:
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, old / "zarr")
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old / "zarr", path)  # put the old one back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_ome_zarr(
    path: str | Path,
    image: Any,
    cells: np.ndarray | None = None,
    table: pd.DataFrame | None = None,
    *,
    image_id: str | None = None,
    image_probs: np.ndarray | None = None,
    overwrite: bool = False,
    chunk_size: int = 1024,
    min_level_size: int = 256,
    pixel_size_um: float | None = None,
) -> Path:
    """Write one image, its cell mask and its per-cell table as an OME-Zarr (NGFF 0.4).

    Parameters
    ----------
    path
        The zarr folder to write (``{ID}.ome.zarr`` by convention).
    image
        An :class:`~napari_cpgcn.io.hpa.HPAImage` or a (4, Y, X) array (red, green, blue, yellow).
    cells
        (Y, X) cell instance mask (0 = background; ids = ``cell_id`` of ``table``), or None.
    table
        Per-cell table (the columns of ``cells.csv``), or None.
    image_id
        Default: the HPAImage's id, else the folder name without ``.ome.zarr``.
    image_probs
        (19,) image-level probabilities, stored in the root attributes and the table's ``uns``.
    overwrite
        Replace an existing zarr written by napari-cpgcn (anything else at ``path`` is never replaced).
    chunk_size
        Chunk side in pixels (one channel per chunk).
    min_level_size
        Pyramid levels are added (2x steps) while the smaller side stays at least this large.
    pixel_size_um
        Pixel size in micrometres, when known (HPA confocal images: about 0.08); otherwise the
        axes carry no unit.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OmeZarrError
        ``path`` is a file or a folder that is not ours, exists (without ``overwrite``), or its
        folder cannot be written.
    ImportError
        The ``ome-zarr`` extra is not installed (the message says how to install it).
    """
    require_ome_zarr()
    import zarr
    from anndata.io import write_elem
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale, write_multiscale_labels

    from napari_cpgcn import __version__

    data = np.asarray(getattr(image, "data", image))
    path = Path(path).expanduser()
    if image_id is None:
        image_id = getattr(image, "image_id", None) or path.name.removesuffix(".zarr").removesuffix(".ome")
    if data.ndim != 3 or data.shape[0] != len(CHANNELS):
        raise ValueError(f"{image_id}: expected a (4, Y, X) image (red, green, blue, yellow), got {data.shape}")
    if cells is not None:
        cells = np.asarray(cells)
        if cells.shape != data.shape[1:]:
            raise ValueError(f"{image_id}: the cell mask {cells.shape} does not match the image {data.shape[1:]}")
        # the same ids in the smallest unsigned type that holds them (napari, Fiji take any)
        top = int(cells.max()) if cells.size else 0
        cells = cells.astype(np.uint16 if top < 2**16 else np.uint32, copy=False)
    _prepare_target(path, overwrite)
    try:
        tmp = _make_temp_dir(path)
    except OSError as e:
        raise OmeZarrError(f"cannot write {path}: the folder {path.parent} is not writable ({e}); choose "
                           "another output folder") from e
    try:
        fmt = FormatV04()
        factors = pyramid_factors(data.shape[1:], min_level_size)
        unit = {"unit": "micrometer"} if pixel_size_um else {}
        axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit},
                {"name": "x", "type": "space", **unit}]
        scale = {"c": 1.0, "y": float(pixel_size_um or 1.0), "x": float(pixel_size_um or 1.0)}
        chunks = (1, min(chunk_size, data.shape[1]), min(chunk_size, data.shape[2]))
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        ours: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "napari_cpgcn_version": __version__,
            "image_id": str(image_id),
            "channels": list(CHANNELS),
            "labels": LABEL_NAME if cells is not None else None,
            "table": f"tables/{TABLE_NAME}" if table is not None else None,
            "classes": list(SHORT_NAMES),
        }
        if image_probs is not None:
            ours["image_probs"] = {s: float(p) for s, p in zip(SHORT_NAMES, np.asarray(image_probs).ravel(), strict=True)}
        # first in .zattrs, so that even a truncated file is recognised as ours (and reported)
        root.attrs[ATTRS_KEY] = ours
        # The pyramids are computed here (2x2 box means; nearest for labels) and written with
        # ome-zarr's multiscale writers, which lay out the arrays and the NGFF metadata.
        n_levels = len(factors) + 1
        write_multiscale(_pyramid(data, n_levels), root, fmt=fmt, axes=axes, scale=scale,
                         storage_options={"chunks": chunks}, name=str(image_id),
                         metadata={"omero": _omero(data)})
        if cells is not None:
            write_multiscale_labels(_pyramid(cells, n_levels, labels=True), root, name=LABEL_NAME, fmt=fmt,
                                    axes=axes[1:], scale={"y": scale["y"], "x": scale["x"]},
                                    storage_options={"chunks": chunks[1:]}, label_metadata=_label_metadata(table))
        if table is not None:
            tables = root.require_group("tables")
            write_elem(tables, TABLE_NAME, table_to_anndata(table, image_id, image_probs))
            tables[TABLE_NAME].attrs.update({
                "spatialdata-encoding-type": "ngff:regions_table",
                "region": LABEL_NAME,
                "region_key": _REGION_KEY,
                "instance_key": _INSTANCE_KEY,
                "version": "0.1",
            })
        # set again in case the ome-zarr writers replaced the root attributes (they merge in 0.18)
        root.attrs[ATTRS_KEY] = ours
        _move_into_place(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OmeZarrError(f"cannot write {path}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("wrote %s (%d levels, %s cells)", path, len(factors) + 1,
              "no" if cells is None else int(len(table)) if table is not None else "?")
    return path


# --------------------------------------------------------------------------- read

@dataclass
class OmeZarrResult:
    """An OME-Zarr written by :func:`write_ome_zarr`, read back.

    Attributes
    ----------
    path : Path
    image_id : str
    data : numpy.ndarray
        (4, Y, X) image at the requested pyramid level.
    cells : numpy.ndarray or None
        (Y, X) cell mask at that level.
    table : pandas.DataFrame or None
        The per-cell table (the CSV's columns).
    image_probs : numpy.ndarray or None
        (19,) image-level probabilities.
    n_levels : int
        Pyramid levels in the image.
    channel_names : list[str]
        The ``omero`` channel labels.
    attrs : dict
        napari-cpgcn's root attributes.
    """

    path: Path
    image_id: str
    data: np.ndarray
    cells: np.ndarray | None = None
    table: pd.DataFrame | None = None
    image_probs: np.ndarray | None = None
    n_levels: int = 1
    channel_names: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)


def read_ome_zarr(path: str | Path, level: int = 0) -> OmeZarrResult:
    """Read an OME-Zarr written by :func:`write_ome_zarr` (image, cell mask, per-cell table).

    Raises
    ------
    OmeZarrError
        Not such a zarr, or a part of it is missing or corrupt (the message names the path and the part).
    """
    require_ome_zarr()
    import zarr

    p = Path(path).expanduser()
    if not p.is_dir():
        raise OmeZarrError(f"{p} is not an OME-Zarr folder")
    part = "its root metadata (.zattrs)"
    try:
        root = zarr.open_group(str(p), mode="r", zarr_format=2)
        attrs = dict(root.attrs)
        ours = attrs.get(ATTRS_KEY)
        if not isinstance(ours, dict):
            raise OmeZarrError(f"{p} is not an OME-Zarr written by napari-cpgcn (no {ATTRS_KEY!r} attributes); "
                               "open it with napari-ome-zarr instead")
        ms = attrs["multiscales"][0]
        datasets = [d["path"] for d in ms["datasets"]]
        if not 0 <= level < len(datasets):
            raise OmeZarrError(f"{p} has {len(datasets)} pyramid levels; level {level} does not exist")
        part = f"the image array {datasets[level]}"
        data = np.asarray(root[datasets[level]][...])
        cells = None
        if ours.get("labels"):
            part = f"the label image labels/{ours['labels']}"
            lab = root[f"labels/{ours['labels']}"]
            lpaths = [d["path"] for d in lab.attrs["multiscales"][0]["datasets"]]
            cells = np.asarray(lab[lpaths[min(level, len(lpaths) - 1)]][...])
        table = None
        if ours.get("table"):
            from anndata.io import read_elem

            part = f"the table {ours['table']}"
            table = anndata_to_table(read_elem(root[ours["table"]]))
        probs = ours.get("image_probs")
        names = [c.get("label", "") for c in attrs.get("omero", {}).get("channels", [])]
    except OmeZarrError:
        raise
    except Exception as e:  # zarr, numcodecs, JSON and anndata errors come in many types
        raise OmeZarrError(f"{p} is corrupt or incomplete: {part} cannot be read ({type(e).__name__}: {e}); "
                           "write it again (napari-cpgcn predict --ome-zarr --overwrite)") from e
    return OmeZarrResult(
        path=p, image_id=str(ours.get("image_id", p.name)), data=data, cells=cells, table=table,
        image_probs=None if probs is None else np.asarray([probs[s] for s in SHORT_NAMES], np.float32),
        n_levels=len(datasets), channel_names=names, attrs=dict(ours))
