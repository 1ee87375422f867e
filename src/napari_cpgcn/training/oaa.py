"""Online attention accumulation (OAA, Jiang et al. ICCV 2019) kept on disk.

During training, for every image and every class that is positive in its labels *and*
predicted with probability above a threshold, the class map of the current view (normalised to
[0, 1], mapped back through the view's crop/flip/rotation) is merged into the image's
accumulated map by an element-wise maximum: M_t = max(M_{t-1}, A_t).

Storage: one ``{image_id}.npy`` per image in ``RUN/image_model/oaa/``, a (C, S, S) uint8 array
(S = ``oaa_size``, 255 = 1.0), written atomically. Memory use does not grow with the data set;
on disk it is C·S² bytes per image (19 kB at S = 32). Classes never accumulated stay 0.

Several processes may update the same image at once (torchrun DDP: the distributed sampler
repeats a few images to even out the ranks, and ranks share the run folder): every
read–max–write holds an exclusive ``flock`` on one of 64 lock files in ``oaa/.locks`` (chosen
by a hash of the id), so no update is lost; the maximum makes a repeated update harmless.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from napari_cpgcn.io.atomic import atomic_save_npy
from napari_cpgcn.training.datasets import invert_augmentation

__all__ = ["OAAStore", "load_oaa", "oaa_dir"]

log = logging.getLogger(__name__)

try:  # POSIX; on Windows (no fcntl) a single process trains, so no lock is needed
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

N_LOCKS = 64


def oaa_dir(run_dir: str | Path) -> Path:
    """The OAA folder of a run: ``run_dir/oaa`` or ``run_dir/image_model/oaa``."""
    run_dir = Path(run_dir)
    if (run_dir / "oaa").is_dir() or not (run_dir / "image_model").is_dir():
        return run_dir / "oaa"
    return run_dir / "image_model" / "oaa"


def load_oaa(run_dir: str | Path, image_id: str) -> np.ndarray | None:
    """The accumulated maps of one training image: float32 (C, S, S) in [0, 1], or None if none.

    ``run_dir`` is the image-model run folder (holding ``oaa/``) or the pipeline run folder
    (holding ``image_model/oaa/``).
    """
    p = oaa_dir(run_dir) / f"{image_id}.npy"
    if not p.is_file():
        return None
    return np.load(p).astype(np.float32) / 255.0


class OAAStore:
    """Accumulates class maps per training image on disk.

    Parameters
    ----------
    folder
        Where the ``.npy`` files go.
    n_classes
        Number of classes C.
    size
        Side S of the stored maps.
    threshold
        Minimum predicted probability of a positive class for its map to be accumulated.
    """

    def __init__(self, folder: str | Path, n_classes: int, size: int = 32, threshold: float = 0.5) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n_classes = n_classes
        self.size = int(size)
        self.threshold = float(threshold)

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.npy"

    _lock_warned = False

    @contextlib.contextmanager
    def _locked(self, image_id: str) -> Iterator[None]:
        """Hold the image's lock (shared with other processes using the same folder).

        File systems without ``flock`` (Lustre mounted without ``-o flock``, NFS without a lock
        daemon) raise OSError: then one warning, and the update goes on unlocked.
        """
        if fcntl is None:
            yield
            return
        locks = self.folder / ".locks"
        locks.mkdir(exist_ok=True)
        stripe = zlib.crc32(image_id.encode("utf-8")) % N_LOCKS
        with open(locks / f"{stripe:02d}.lock", "ab") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            except OSError as e:
                if not OAAStore._lock_warned:
                    OAAStore._lock_warned = True
                    log.warning("OAA: %s does not support file locks (%s); under DDP an image repeated "
                                "on two ranks may lose one update per epoch", self.folder, e)
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def read(self, image_id: str) -> np.ndarray:
        """Stored uint8 maps (C, S, S) (zeros when absent)."""
        p = self.path(image_id)
        if p.is_file():
            try:
                arr = np.load(p)
                if arr.shape == (self.n_classes, self.size, self.size):
                    return arr
                log.warning("OAA file %s has shape %s; starting it again", p, arr.shape)
            except (OSError, ValueError):
                log.warning("OAA file %s unreadable; starting it again", p)
        return np.zeros((self.n_classes, self.size, self.size), dtype=np.uint8)

    def _write(self, image_id: str, arr: np.ndarray) -> None:
        atomic_save_npy(self.path(image_id), arr)

    @torch.no_grad()
    def update(self, image_ids: Sequence[str], cams: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor,
               aug: torch.Tensor | None = None) -> int:
        """Merge one batch; returns the number of (image, class) maps accumulated.

        Parameters
        ----------
        image_ids
            Ids of the batch images.
        cams
            (B, C, h, w) maps normalised to [0, 1] per (image, class).
        probs, targets
            (B, C) predicted probabilities and labels.
        aug
            (B, 7) augmentation parameters of the views (see :mod:`~napari_cpgcn.training.datasets`).
        """
        cams = cams.detach().float().cpu()
        take = ((targets.detach().cpu() > 0.5) & (probs.detach().float().cpu() > self.threshold))
        n = 0
        for b, image_id in enumerate(image_ids):
            classes = torch.nonzero(take[b]).flatten().tolist()
            if not classes:
                continue
            a = aug[b].cpu() if aug is not None else torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
            maps, (y0, x0, y1, x1) = invert_augmentation(cams[b, classes], a, self.size)
            new = np.round(maps.clamp(0, 1).numpy() * 255.0).astype(np.uint8)
            with self._locked(image_id):
                arr = self.read(image_id)
                region = arr[classes, y0:y1, x0:x1]
                arr[classes, y0:y1, x0:x1] = np.maximum(region, new)
                self._write(image_id, arr)
            n += len(classes)
        return n
