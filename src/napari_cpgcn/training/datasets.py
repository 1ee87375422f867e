"""HPA image-level dataset: a folder of four-channel images + a label table → resized tensors.

Each item is a dict:

``image``  float32 (4, S, S) in [0, 1] (S = ``image_size``), augmented when training;
``target`` float32 (C,) multi-hot labels;
``index``  int, the row in ``dataset.ids``;
``aug``    float32 (7,): crop box (y0, x0, y1, x1) as fractions of the image, vertical flip,
           horizontal flip, number of 90° rotations — what :func:`invert_augmentation` needs to
           map a CAM of the augmented view back onto the image (used by OAA).

Augmentations that fit microscopy (orientation carries no meaning; intensities vary by
acquisition): random resized crop, flips, 90° rotations, per-channel gain/offset jitter. All
randomness comes from torch's generator, which DataLoader workers seed from the loader, so
epochs are reproducible.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from napari_cpgcn.events import Event, EventKind, ShouldStop
from napari_cpgcn.io.atomic import atomic_save_npy
from napari_cpgcn.io.hpa import ImageIndex, image_index, to_float
from napari_cpgcn.io.tables import LabelTable

__all__ = [
    "HPAImageDataset",
    "split_ids",
    "resize_image",
    "invert_augmentation",
    "channel_stats",
    "check_images",
]

log = logging.getLogger(__name__)


def split_ids(ids: Sequence[str], val_fraction: float, salt: str = "napari-cpgcn") -> tuple[list[str], list[str]]:
    """Split image ids into (train, val) by a hash of each id.

    The split of an id does not depend on the other ids or their order, so adding images to a
    data set never moves an image between train and validation. At least one image stays on
    each side when there are two or more and ``val_fraction > 0``.
    """
    ids = list(ids)
    if val_fraction <= 0 or len(ids) < 2:
        return ids, []
    u = {i: int.from_bytes(hashlib.sha1(f"{salt}:{i}".encode()).digest()[:8], "little") / 2**64 for i in ids}
    val = [i for i in ids if u[i] < val_fraction]
    train = [i for i in ids if u[i] >= val_fraction]
    if not val:
        j = min(train, key=lambda i: u[i])
        train.remove(j)
        val.append(j)
    if not train:
        j = max(val, key=lambda i: u[i])
        val.remove(j)
        train.append(j)
    return train, val


def resize_image(data: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(C, Y, X) integer or float image → float32 tensor (C, S, S) in [0, 1] (antialiased bilinear)."""
    if isinstance(data, np.ndarray):
        t = torch.from_numpy(to_float(data))
    else:
        t = data.float()
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(t.shape[-2:]) == size:
        return t.contiguous()
    return F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp_(0, 1)


def invert_augmentation(cams: torch.Tensor, aug: torch.Tensor, out_size: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Map maps of an augmented view (C, h, w) back onto the original image grid.

    Returns the maps resized to the crop box on an ``out_size``² grid of the whole image and the
    box ``(y0, x0, y1, x1)`` in that grid's pixels.
    """
    y0, x0, y1, x1, fv, fh, k = (float(v) for v in aug)
    c = cams
    if int(k):
        c = torch.rot90(c, -int(k), dims=(-2, -1))
    if fh > 0.5:
        c = torch.flip(c, dims=(-1,))
    if fv > 0.5:
        c = torch.flip(c, dims=(-2,))
    by0, bx0 = int(math.floor(y0 * out_size)), int(math.floor(x0 * out_size))
    by1 = max(by0 + 1, min(out_size, int(math.ceil(y1 * out_size))))
    bx1 = max(bx0 + 1, min(out_size, int(math.ceil(x1 * out_size))))
    c = F.interpolate(c[None].float(), size=(by1 - by0, bx1 - bx0), mode="bilinear", align_corners=False)[0]
    return c, (by0, bx0, by1, bx1)


class HPAImageDataset(Dataset):
    """Image-level training data over an images folder and a :class:`LabelTable`.

    Parameters
    ----------
    data_dir
        Folder with the images (or a root holding ``images/`` / ``train/``).
    table
        Labels of the images to use (ids not found in the folder raise, naming them).
    image_size
        Side S of the square network input.
    augment
        Random crops, flips, rotations and intensity jitter.
    cache_dir
        Where resized images are cached as ``.npy`` (None: no cache; read + resize every time).
    crop_scale
        Range of the crop area as a fraction of the image.
    index
        A prebuilt :class:`ImageIndex` of ``data_dir`` (saves a directory listing).
    """

    def __init__(self, data_dir: str | Path, table: LabelTable, image_size: int = 512, augment: bool = False,
                 cache_dir: str | Path | None = None, crop_scale: tuple[float, float] = (0.6, 1.0),
                 index: ImageIndex | None = None) -> None:
        self.index = index or image_index(data_dir)
        missing = [i for i in table.ids if i not in self.index]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(table.ids)} labelled images are not in {self.index.folder} "
                f"(e.g. {', '.join(missing[:3])}). Each needs ID_red/_green/_blue/_yellow files there; "
                "remove those rows from the labels CSV or point to the right folder.")
        self.ids = list(table.ids)
        self.labels = np.asarray(table.labels, dtype=np.float32)
        self.image_size = int(image_size)
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.ids)

    def _cache_path(self, image_id: str) -> Path:
        assert self.cache_dir is not None
        h = hashlib.sha1()
        for p in sorted(self.index.files(image_id)):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return self.cache_dir / f"{image_id}_{self.image_size}_{h.hexdigest()[:10]}.npy"

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` resized to (4, S, S), float32 in [0, 1], without augmentation."""
        image_id = self.ids[i]
        if self.cache_dir is None:
            return resize_image(self.index.read(image_id).data, self.image_size)
        path = self._cache_path(image_id)
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path).astype(np.float32) / 65535.0)
            except (OSError, ValueError):
                log.warning("cache file %s unreadable; rebuilding it", path)
        img = resize_image(self.index.read(image_id).data, self.image_size)
        q = np.round(img.numpy() * 65535.0).astype(np.uint16)
        atomic_save_npy(path, q)
        # What a later epoch reads back from the cache: the same values every epoch.
        return torch.from_numpy(q.astype(np.float32) / 65535.0)

    def _augment(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.image_size
        # Random resized crop (area in crop_scale, aspect in [3/4, 4/3]).
        y0 = x0 = 0.0
        y1 = x1 = 1.0
        lo, hi = self.crop_scale
        if lo < 1.0:
            area = lo + (hi - lo) * float(torch.rand(()))
            aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(torch.rand(())))
            h = min(1.0, math.sqrt(area / aspect))
            w = min(1.0, math.sqrt(area * aspect))
            y0 = (1.0 - h) * float(torch.rand(()))
            x0 = (1.0 - w) * float(torch.rand(()))
            y1, x1 = y0 + h, x0 + w
            iy0, ix0 = int(round(y0 * s)), int(round(x0 * s))
            iy1, ix1 = max(iy0 + 1, int(round(y1 * s))), max(ix0 + 1, int(round(x1 * s)))
            img = F.interpolate(img[None, :, iy0:iy1, ix0:ix1], size=(s, s), mode="bilinear",
                                align_corners=False)[0]
            y0, x0, y1, x1 = iy0 / s, ix0 / s, iy1 / s, ix1 / s
        fv = float(torch.rand(()) < 0.5)
        fh = float(torch.rand(()) < 0.5)
        k = int(torch.randint(0, 4, ()))
        if fv:
            img = torch.flip(img, dims=(-2,))
        if fh:
            img = torch.flip(img, dims=(-1,))
        if k:
            img = torch.rot90(img, k, dims=(-2, -1))
        # Intensity jitter per channel: gain 0.8..1.2, offset ±0.02.
        gain = 0.8 + 0.4 * torch.rand(img.shape[0], 1, 1)
        offset = 0.04 * (torch.rand(img.shape[0], 1, 1) - 0.5)
        img = (img * gain + offset).clamp_(0, 1)
        return img.contiguous(), torch.tensor([y0, x0, y1, x1, fv, fh, float(k)], dtype=torch.float32)

    def __getitem__(self, i: int) -> dict:
        img = self.load(i)
        if self.augment:
            img, aug = self._augment(img)
        else:
            aug = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
        return {"image": img, "target": torch.from_numpy(self.labels[i]), "index": i, "aug": aug}


def check_images(dataset: HPAImageDataset, workers: int = 2,
                 should_stop: ShouldStop | None = None) -> Iterator[Event]:
    """Read every image of ``dataset`` once (building its resize cache on the way); yields progress.

    A bad image (truncated, zero-byte, channels of different sizes, 3 channels, unreadable) is
    not an error: it is reported, and training goes on without it. With the cache on, this pass
    is the first epoch's reading done ahead (nothing is decoded twice); an image already in the
    cache is not decoded again.

    Yields
    ------
    Event
        ``ITEM`` every ~5 % of the images; finally ``DONE`` with ``result`` = ``{image id: reason}``
        of the images that cannot be used (empty when all are fine). ``STOPPED`` on a stop.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = len(dataset)
    bad: dict[str, str] = {}

    def one(i: int) -> tuple[int, str]:
        try:
            dataset.load(i)
        except (OSError, ValueError) as e:  # HPAImageError is a ValueError; FileNotFoundError an OSError
            return i, f"{type(e).__name__}: {e}"
        return i, ""

    step = max(1, n // 20)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cpgcn-check") as pool:
        for k, (i, err) in enumerate(pool.map(one, range(n)), start=1):
            if err:
                bad[dataset.ids[i]] = err
            if should_stop is not None and should_stop():
                yield Event(EventKind.STOPPED, message=f"stopped while checking images ({k} of {n})")
                return
            if k % step == 0 or k == n:
                yield Event(EventKind.ITEM, batch=k, n_batches=n, message=f"checked {k} of {n} images")
    yield Event(EventKind.DONE, message=f"{n - len(bad)} of {n} images usable", result=bad)


def channel_stats(dataset: HPAImageDataset, max_images: int = 200) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of (up to ``max_images`` evenly spaced) un-augmented images."""
    n = len(dataset)
    if n == 0:
        raise ValueError("no images to measure channel statistics on")
    pick = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))
    s = torch.zeros(4, dtype=torch.float64)
    s2 = torch.zeros(4, dtype=torch.float64)
    count = 0
    for i in pick:
        x = dataset.load(int(i)).double()
        s += x.sum(dim=(1, 2))
        s2 += (x * x).sum(dim=(1, 2))
        count += x.shape[1] * x.shape[2]
    mean = s / count
    std = (s2 / count - mean * mean).clamp_min(1e-8).sqrt().clamp_min(1e-3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
