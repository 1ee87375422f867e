"""Cell-crop data for the cell classifier: a crop cache on disk and a torch Dataset over it.

The crops of every cell of every training image are cut once (bbox square, background
optionally zeroed, resized) and stored as uint16 (the 16-bit grid of
:func:`napari_cpgcn.models.cell.crop_cells`, the same values prediction sees) in one ``.npy`` memory map
(``(n_cells, 4, S, S)``) beside an index CSV, so that training epochs read small arrays instead
of decoding 2048² PNGs, and memory does not grow with the data set (the map is paged in on
demand). The cache is keyed by the crop settings and the cell list; a mismatch rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from napari_cpgcn.events import Event, EventKind, ShouldStop
from napari_cpgcn.io.masks import read_mask
from napari_cpgcn.models.cell import CROP_SCALE

__all__ = ["CropCache", "build_crop_cache", "CropDataset"]

log = logging.getLogger(__name__)


class CropCache:
    """A finished crop cache: ``crops`` memmap (n, 4, S, S) uint16 and ``index`` (image_id, cell_id)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta = json.loads((self.folder / "crops.json").read_text())
        self.meta = meta
        self.index = pd.read_csv(self.folder / "crops_index.csv", dtype={"image_id": str})
        self.crops = np.load(self.folder / "crops.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.index)


def _cache_key(table: pd.DataFrame, size: int, zero_background: bool, pad: float) -> str:
    h = hashlib.sha1()
    h.update(f"{size}:{int(zero_background)}:{pad:.4f}:uint16".encode())
    cols = ["image_id", "cell_id", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]
    h.update(pd.util.hash_pandas_object(table[cols].reset_index(drop=True), index=False).values.tobytes())
    return h.hexdigest()[:16]


def build_crop_cache(
    images_dir: str | Path,
    masks_dir: str | Path,
    table: pd.DataFrame,
    folder: str | Path,
    size: int = 128,
    zero_background: bool = True,
    pad: float = 0.05,
    should_stop: ShouldStop | None = None,
    stage: str = "cell_model",
) -> Iterator[Event]:
    """Cut and store the crops of every cell listed in ``table`` (geometry columns).

    Parameters
    ----------
    images_dir
        Folder of the images (any layout :func:`napari_cpgcn.io.read_image` reads).
    masks_dir
        Folder holding ``{image_id}.tif`` cell masks (the segmentation stage's output).
    table
        Cells to crop, with ``image_id``, ``cell_id`` and bbox columns; crops keep its order.
    folder
        Where ``crops.npy``, ``crops_index.csv`` and ``crops.json`` go.

    Yields
    ------
    Event
        ``ITEM`` per image, then ``DONE`` with ``result`` = :class:`CropCache`;
        ``STOPPED`` if ``should_stop`` turned true (the partial cache is discarded).
    """

    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.models.cell import crop_cells

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = table.reset_index(drop=True)
    key = _cache_key(table, size, zero_background, pad)
    meta_path = folder / "crops.json"
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("key") == key:
                yield Event(EventKind.LOG, stage=stage, message=f"reusing crop cache {folder}")
                yield Event(EventKind.DONE, stage=stage, result=CropCache(folder))
                return
        except (ValueError, OSError):
            pass
        meta_path.unlink(missing_ok=True)
    n = len(table)
    tmp = folder / "crops.npy.partial"
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(n, 4, size, size))
    groups = list(table.groupby("image_id", sort=False).indices.items())
    for k, (image_id, rows) in enumerate(groups, start=1):
        if should_stop is not None and should_stop():
            del arr
            tmp.unlink(missing_ok=True)
            yield Event(EventKind.STOPPED, stage=stage, message="stopped while cutting cell crops")
            return
        img = read_image(images_dir, image_id=str(image_id))
        cells = read_mask(Path(masks_dir) / f"{image_id}.tif")
        arr[rows] = crop_cells(img.data, cells, table.iloc[rows], size=size,
                               zero_background=zero_background, pad=pad, dtype=np.uint16)
        yield Event(EventKind.ITEM, stage=stage, batch=k, n_batches=len(groups),
                    message=f"cropped {len(rows)} cells of {image_id}")
    arr.flush()
    del arr
    tmp.replace(folder / "crops.npy")
    table[["image_id", "cell_id"]].to_csv(folder / "crops_index.csv", index=False)
    meta_path.write_text(json.dumps({"key": key, "n": n, "size": size,
                                     "zero_background": zero_background, "pad": pad}))
    yield Event(EventKind.DONE, stage=stage, result=CropCache(folder))


class CropDataset:
    """A torch ``Dataset`` of (crop float32 (4, S, S) in [0, 1], target (C,)) pairs.

    Parameters
    ----------
    crops
        (n, 4, S, S) uint16 array or memmap (the crop cache).
    targets
        (n, C) float targets (multi-hot or soft).
    indices
        Which rows to serve (a train or validation split).
    augment
        Random flips / 90° rotations (the cell's orientation means nothing) and intensity
        jitter per channel.
    seed
        Base seed; each item's randomness derives from (seed, epoch, index) so that a resumed
        run sees the same augmentations.
    """

    def __init__(self, crops: np.ndarray, targets: np.ndarray, indices: np.ndarray | None = None,
                 augment: bool = False, seed: int = 0) -> None:
        self.crops = crops
        self.targets = np.asarray(targets, dtype=np.float32)
        self.indices = np.arange(len(crops)) if indices is None else np.asarray(indices)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at each epoch: changes the augmentation stream deterministically."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch

        j = int(self.indices[i])
        x = np.asarray(self.crops[j], dtype=np.float32) / CROP_SCALE
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, j))
            x = np.rot90(x, k=int(rng.integers(4)), axes=(1, 2))
            if rng.random() < 0.5:
                x = x[:, :, ::-1]
            gain = rng.uniform(0.8, 1.2, size=(x.shape[0], 1, 1)).astype(np.float32)
            x = np.clip(x * gain, 0.0, 1.0)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self.targets[j])
