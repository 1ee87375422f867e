"""A tiny deterministic predictor with the pipeline's ``predict()`` contract, and the small
synthetic images it is run on (test-only; shared by the batch and the distributed tests, so it
lives in a module that Dask worker processes can import)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from napari_cpgcn.celltable import cell_geometry
from napari_cpgcn.classes import CHANNELS, N_CLASSES, SHORT_NAMES


@dataclass
class FakePrediction:
    image_id: str
    image_probs: np.ndarray
    cams: np.ndarray | None
    cells: np.ndarray
    table: pd.DataFrame


class ThresholdPredictor:
    """Cells = connected components of the blue channel; probabilities from the pixel values."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __getstate__(self):  # shipped to Dask workers (a lock does not pickle)
        return {}

    def __setstate__(self, state):
        self.__init__()

    def predict(self, image, cells=None, segmentation="classical", with_cams=True):
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
        table = geo.copy()
        fused = image_probs[None, :] * cell_p
        table["top_class"] = [SHORT_NAMES[k] for k in fused.argmax(1)] if len(geo) else []
        for prefix, arr in (("image", np.repeat(image_probs[None], len(geo), 0)), ("cell", cell_p), ("fused", fused)):
            for k, s in enumerate(SHORT_NAMES):
                table[f"{prefix}_{s}"] = arr[:, k]
        cams = (np.broadcast_to(data[1][None], (N_CLASSES, *data.shape[1:])) * image_probs[:, None, None]
                if with_cams else None)
        return FakePrediction(image.image_id, image_probs, cams, cells, table)


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
