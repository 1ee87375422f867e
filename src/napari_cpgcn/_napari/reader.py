"""npe2 reader: HPA channel files, a folder holding one image, or a 4-channel TIFF → four image layers;
an OME-Zarr written by ``predict --ome-zarr`` → four image layers + the ``cells`` Labels layer.

A thin adapter over :mod:`napari_cpgcn.io` and :mod:`napari_cpgcn._napari.layers`. ``napari_get_reader``
answers quickly from file names (plus a TIFF header or zarr attribute peek) and returns ``None``
for anything that is not an HPA image or one of our zarrs, so napari's other readers (e.g.
napari-ome-zarr for other OME-Zarrs) get their turn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_cpgcn._napari.layers import LayerDataTuple, channel_layers, lookup_image_labels
from napari_cpgcn.io.hpa import TIFF_RE, list_image_ids, parse_channel_filename, resolve_images_dir

__all__ = ["napari_get_reader", "read_hpa", "read_cpgcn_ome_zarr"]

log = logging.getLogger(__name__)

PathOrPaths = str | Sequence[str]
ReaderFunction = Callable[[PathOrPaths], list[LayerDataTuple]]


def _is_multichannel_tiff(path: Path) -> bool:
    """True for a TIFF whose first series has a 4-long channel axis (read from the header only)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes = series.shape, series.axes
    except Exception:
        return False
    for ax in ("C", "S"):
        if ax in axes and shape[axes.index(ax)] == 4:
            return True
    squeezed = [s for s in shape if s != 1]
    return len(squeezed) == 3 and 4 in (squeezed[0], squeezed[-1])


def _image_key(path: Path) -> tuple[Path, str | None] | None:
    """``(folder or file, image id)`` if ``path`` is something this reader opens, else None."""
    if path.is_dir():
        try:
            ids = list_image_ids(path, complete_only=True)
        except OSError:
            return None
        return (path, ids[0]) if len(ids) == 1 else None
    if not path.is_file():
        return None
    parsed = parse_channel_filename(path)
    if parsed:
        image_id = parsed[0]
        siblings = {parse_channel_filename(p) for p in path.parent.glob("*_*")}
        have = {c for i, c in (s for s in siblings if s) if i == image_id}
        if len(have) < 4:
            log.info("%s: not all four channel files of %s are present; leaving it to other readers", path, image_id)
            return None
        return (path.parent, image_id)
    if TIFF_RE.search(path.name) and _is_multichannel_tiff(path):
        return (path, None)
    return None


def napari_get_reader(path: PathOrPaths) -> ReaderFunction | None:
    """Return :func:`read_hpa` when every path is an HPA image (channel file, one-image folder, 4-channel TIFF)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths:
        return None
    from napari_cpgcn.io.omezarr import (
        is_cpgcn_ome_zarr,  # cheap: reads .zattrs only, no zarr import
    )

    if all(is_cpgcn_ome_zarr(p) for p in paths):
        return read_cpgcn_ome_zarr
    if all(_image_key(Path(p)) for p in paths):
        return read_hpa
    return None


def read_cpgcn_ome_zarr(path: PathOrPaths) -> list[LayerDataTuple]:
    """Read OME-Zarrs written by ``napari-cpgcn predict --ome-zarr``: per zarr, the four channel
    layers and the ``cells`` Labels layer with the per-cell table as ``features``.

    Raises
    ------
    napari_cpgcn.io.omezarr.OmeZarrError
        A corrupt or incomplete zarr (the message names it and the broken part).
    """
    from napari_cpgcn._napari.layers import cells_layer
    from napari_cpgcn.io.hpa import HPAImage
    from napari_cpgcn.io.omezarr import read_ome_zarr

    layers: list[LayerDataTuple] = []
    for p in [path] if isinstance(path, str | Path) else list(path):
        z = read_ome_zarr(p)
        image = HPAImage(data=z.data, image_id=z.image_id, paths={c: z.path for c in ("red", "green", "blue", "yellow")},
                         bit_depth=16 if z.data.dtype == "uint16" else 8, source_format="ome-zarr")
        layers += channel_layers(image)
        if z.cells is not None:
            data, kwargs, kind = cells_layer(z.cells, z.table, image_id=z.image_id)
            kwargs["metadata"]["path"] = str(z.path)
            layers.append((data, kwargs, kind))
    return layers


def read_hpa(path: PathOrPaths) -> list[LayerDataTuple]:
    """Read one or more HPA images into four channel layers each.

    Several channel files of the same image (e.g. all four selected at once) give that image
    once. Labels come from a ``train.csv`` / ``*labels*.csv`` beside the images or one level up.
    """
    from napari_cpgcn.io.hpa import read_image, read_multichannel_tiff

    paths = [path] if isinstance(path, str | Path) else list(path)
    seen: set[tuple[str, str | None]] = set()
    layers: list[LayerDataTuple] = []
    for p in paths:
        key = _image_key(Path(p))
        if key is None:
            continue
        where, image_id = key
        ident = (str(where.resolve()), image_id)
        if ident in seen:
            continue
        seen.add(ident)
        if image_id is None:  # multi-channel TIFF
            image = read_multichannel_tiff(where)
            images_dir = where.parent
        else:
            image = read_image(where, image_id=image_id)
            images_dir = resolve_images_dir(where)
        labels, csv = lookup_image_labels(image.image_id, images_dir)
        layers += channel_layers(image, labels=labels, labels_csv=csv)
    return layers
