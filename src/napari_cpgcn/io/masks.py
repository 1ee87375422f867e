"""Cell masks on disk: one writer, one reader, one dtype rule, one way to find a mask for an image.

A cell mask is a (Y, X) label image, 0 = background, cells 1..n. napari-cpgcn writes it as a
zlib-compressed TIFF (``uint16`` when every id fits, else ``uint32``: the one dtype rule), whose
ImageDescription marks it as a napari-cpgcn cell mask, so that a mask left in an image folder is
never read as an image (:func:`is_cell_mask`). Reading always gives ``uint32``.

Ready-made masks from elsewhere (the HPA's ``{ID}_predictedmask.png``, cellpose's
``{ID}_cp_masks.png``, ``{ID}_cells.png``, plain ``{ID}.tif``) are found by :func:`find_mask`.

No Qt, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from napari_cpgcn.io.atomic import atomic_write

__all__ = ["MASK_DESCRIPTION", "MASK_NAMES", "write_mask", "read_mask", "find_mask", "is_cell_mask",
           "mask_dtype"]

#: ImageDescription of the mask TIFFs napari-cpgcn writes.
MASK_DESCRIPTION = json.dumps({"napari_cpgcn": "cell mask", "axes": "YX"})
#: File names (``{}`` = image id) looked for by :func:`find_mask`, first found wins.
MASK_NAMES = ("{}.tif", "{}.tiff", "{}.png", "{}_cells.png", "{}_cells.tif", "{}_predictedmask.png",
              "{}_cp_masks.png", "{}_cp_masks.tif")


def mask_dtype(labels: np.ndarray) -> type[np.unsignedinteger]:
    """``uint16`` when every id fits, else ``uint32``."""
    labels = np.asarray(labels)
    return np.uint16 if labels.size == 0 or int(labels.max()) <= np.iinfo(np.uint16).max else np.uint32


def write_mask(path: str | Path, labels: np.ndarray) -> Path:
    """Write a (Y, X) label image as a compressed TIFF, atomically.

    Raises
    ------
    ValueError
        Not a 2-D image of non-negative integer labels.
    """
    import tifffile

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a cell mask is a 2-D label image, got shape {labels.shape}")
    if labels.dtype.kind not in "ui" and labels.dtype != bool:
        raise ValueError(f"a cell mask holds integer labels, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("a cell mask holds labels >= 0 (0 = background)")
    data = np.ascontiguousarray(labels, dtype=mask_dtype(labels))
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib",
                                                           description=MASK_DESCRIPTION, metadata=None))


def is_cell_mask(path: str | Path) -> bool:
    """Whether ``path`` is a mask TIFF written by :func:`write_mask` (read from its header only)."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            desc = tif.pages.first.description if tif.pages else ""
    except Exception:  # unreadable: not ours (the image reader reports it)
        return False
    return '"napari_cpgcn": "cell mask"' in (desc or "")


def read_mask(path: str | Path) -> np.ndarray:
    """Read a cell mask (TIFF or PNG) as a (Y, X) ``uint32`` label image.

    Raises
    ------
    ValueError
        The file is not a 2-D label image (e.g. an RGB picture), naming the file.
    """
    path = Path(path)
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)
    else:
        import tifffile

        arr = np.asarray(tifffile.imread(path))
    while arr.ndim > 2 and arr.shape[0] == 1:  # (1, Y, X) pages
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.dtype.kind not in "uib":
        raise ValueError(f"{path} is not a cell mask: expected a 2-D integer label image, got "
                         f"{arr.dtype} of shape {arr.shape}")
    return arr.astype(np.uint32, copy=False)


def find_mask(folder: str | Path, image_id: str) -> Path | None:
    """The mask file of ``image_id`` in ``folder`` (one of :data:`MASK_NAMES`), or None."""
    folder = Path(folder)
    for pattern in MASK_NAMES:
        p = folder / pattern.format(image_id)
        if p.is_file():
            return p
    return None
