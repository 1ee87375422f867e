"""Tiny deterministic predictors implementing :class:`napari_cpgcn.pipeline.Predictor`, and the
small synthetic images they are run on (test-only; shared by the batch and the distributed tests, so it
lives in a module that Dask worker processes can import)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from napari_cpgcn.classes import CHANNELS, N_CLASSES
from napari_cpgcn.io.celltable import cell_geometry
from napari_cpgcn.pipeline.predictor import CellPrediction


class ThresholdPredictor:
    """Cells = connected components of the blue channel; probabilities from the pixel values.

    Implements :class:`napari_cpgcn.pipeline.Predictor`; its table comes from the real
    :meth:`CellPrediction.from_parts`, so only the models are fake.
    """

    run_dir = None

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __getstate__(self):  # shipped to Dask workers (a lock does not pickle)
        return {}

    def __setstate__(self, state):
        self.__init__()

    def predict(self, image, cells=None, segmentation=None, with_cams=True):
        from scipy import ndimage as ndi

        with self.lock:
            self.calls += 1
        data = image.data.astype(np.float32) / 255.0
        if cells is None:
            cells, _ = ndi.label(data[2] > 0.5)
            cells = cells.astype(np.uint32)
        rng = np.random.default_rng(int(data.sum() * 1000) % (2**32))
        image_probs = rng.random(N_CLASSES)
        geo = cell_geometry(cells, image.image_id)
        cell_p = rng.random((len(geo), N_CLASSES))
        cams = (np.broadcast_to(data[1][None], (N_CLASSES, *data.shape[1:])) * image_probs[:, None, None]
                if with_cams else None)
        return CellPrediction.from_parts(image.image_id, cells, image_probs, cell_p, cams, geo)


class GridPredictor:
    """Cells = a 2x2 grid of squares; nucleoli (2) everywhere, golgi (7) in the left cells
    (the widgets' stand-in; implements :class:`napari_cpgcn.pipeline.Predictor`)."""

    run_dir = None

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls = []

    def predict(self, image, cells=None, segmentation=None, with_cams=True):
        self.calls.append((image.image_id, cells is not None, segmentation))
        if self.fail:
            raise RuntimeError("model exploded")
        y, x = image.shape
        if cells is None:
            cells = np.zeros((y, x), np.uint32)
            for k, (sy, sx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                cells[sy * y // 2 + 2: (sy + 1) * y // 2 - 2, sx * x // 2 + 2: (sx + 1) * x // 2 - 2] = k + 1
        geo = cell_geometry(cells, image.image_id)
        probs = np.full(N_CLASSES, 0.02)
        probs[[2, 7]] = [0.9, 0.85]
        cams = np.zeros((N_CLASSES, y, x), np.float32)
        cams[2] = 1.0
        cams[7, :, : x // 2] = 1.0
        cell = np.full((len(geo), N_CLASSES), 0.1)
        cell[:, 2] = 0.8
        cell[geo["centroid_x"].to_numpy() < x / 2, 7] = 0.95
        return CellPrediction.from_parts(image.image_id, cells, probs, cell, cams, geo)


def write_image(folder: Path, image_id: str, rng: np.random.Generator, size: int = 48) -> None:
    """Four channel PNGs: blue rectangles as cells, noise elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    blue = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(2, 5)):
        y, x = rng.integers(4, size - 10, 2)
        blue[y:y + rng.integers(3, 7), x:x + rng.integers(3, 7)] = 200
    for c in CHANNELS:
        arr = blue if c == "blue" else rng.integers(0, 120, (size, size), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{image_id}_{c}.png")


class EmbeddingThresholdPredictor(ThresholdPredictor):
    """:class:`ThresholdPredictor` that also returns per-cell "embeddings" when asked
    (``with_embeddings=True``): each cell's mean of the four channels and its area, so they
    are deterministic and differ between cells."""

    def predict(self, image, cells=None, segmentation=None, with_cams=True, with_embeddings=False):
        pred = super().predict(image, cells=cells, segmentation=segmentation, with_cams=with_cams)
        if with_embeddings:
            lab = np.asarray(pred.cells).ravel().astype(np.int64)
            ids = pred.table["cell_id"].to_numpy(np.int64)
            n = int(lab.max()) + 1 if lab.size else 1
            counts = np.bincount(lab, minlength=n)
            feats = [np.bincount(lab, weights=image.data[c].ravel().astype(np.float64), minlength=n)[ids]
                     / np.maximum(counts[ids], 1) for c in range(4)]
            pred.embeddings = np.stack([*feats, counts[ids].astype(np.float64)], 1).astype(np.float32)
        return pred
