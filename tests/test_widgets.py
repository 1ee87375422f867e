"""Dock widgets under Xvfb (make_napari_viewer + qtbot): browser, table, predict, export, train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_cpgcn.classes import CHANNELS

from conftest import ARCHIVE_JPEG_IDS, KAGGLE2018_ID, KAGGLE2021_IDS

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    """Remembered GUI settings go to a temporary folder, never to the user's config."""
    monkeypatch.setenv("NAPARI_CPGCN_CONFIG_DIR", str(tmp_path / "config"))


def write_tiny_folder(folder: Path, n: int = 3, size: int = 64, seed: int = 0) -> list[str]:
    """``n`` small 8-bit four-channel images + a train.csv; returns their ids."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"img{i}" for i in range(n)]
    for i, image_id in enumerate(ids):
        for k, c in enumerate(CHANNELS):
            plane = (rng.random((size, size)) * (60 + 40 * k + 20 * i)).astype(np.uint8)
            Image.fromarray(plane).save(folder / f"{image_id}_{c}.png")
    (folder / "train.csv").write_text("ID,Label\n" + "\n".join(f"{x},{i}" for i, x in enumerate(ids)) + "\n")
    return ids


def _channel_names(viewer):
    return [ly.name for ly in viewer.layers if ly.metadata.get("hpa_role") == "channel"]


def test_browser_steps_through_a_folder_keeping_layers(make_napari_viewer, qtbot, tmp_path):
    from napari_cpgcn._widgets._browser import BrowserWidget

    viewer = make_napari_viewer()
    ids = write_tiny_folder(tmp_path / "data")
    w = BrowserWidget(viewer)
    qtbot.addWidget(w)
    with qtbot.waitSignal(w.image_loaded, timeout=10000):
        w.set_folder(tmp_path / "data")
    assert w.image_ids == ids
    assert _channel_names(viewer) == [f"img0 {c}" for c in CHANNELS]
    assert "Nucleoplasm" in w.labels_label.text()
    green = viewer.layers["img0 green"]
    green.contrast_limits = [3, 17]  # the user's choice…
    green.gamma = 0.7
    red_auto = list(viewer.layers["img0 red"].contrast_limits)
    layer_ids = [id(ly) for ly in viewer.layers]
    viewer.add_labels(np.zeros((64, 64), np.uint32), name="cells", metadata={"hpa_role": "cells", "image_id": "img0"})

    with qtbot.waitSignal(w.image_loaded, timeout=10000):
        w.next()
    assert _channel_names(viewer) == [f"img1 {c}" for c in CHANNELS]
    assert [id(ly) for ly in viewer.layers] == layer_ids  # same layer objects; the old cells layer is gone
    green = viewer.layers["img1 green"]
    assert list(green.contrast_limits) == [3, 17] and green.gamma == 0.7  # …survives
    assert list(viewer.layers["img1 red"].contrast_limits) != red_auto  # auto limits follow the image
    assert viewer.layers["img1 red"].metadata["labels"] == [1]
    assert "Nuclear membrane" in w.labels_label.text()
    np.testing.assert_array_equal(viewer.layers["img1 blue"].data,
                                  np.asarray(Image.open(tmp_path / "data" / "img1_blue.png")))

    with qtbot.waitSignal(w.image_loaded, timeout=10000):
        w.previous()
    assert _channel_names(viewer)[0] == "img0 red"


def test_browser_on_real_formats(make_napari_viewer, qtbot, hpa_samples):
    from napari_cpgcn._widgets._browser import BrowserWidget

    viewer = make_napari_viewer()
    w = BrowserWidget(viewer)
    qtbot.addWidget(w)
    with qtbot.waitSignal(w.image_loaded, timeout=20000):
        w.set_folder(hpa_samples)
    assert set(w.image_ids) == set(KAGGLE2021_IDS) | {KAGGLE2018_ID} | set(ARCHIVE_JPEG_IDS)
    assert w.labels_csv and Path(w.labels_csv).name == "kaggle2021-train-labels.csv"
    for image_id, shape in ((KAGGLE2018_ID, (512, 512)), (ARCHIVE_JPEG_IDS[0], (2048, 2048)),
                            (KAGGLE2021_IDS[0], (2048, 2048))):
        row = w.image_ids.index(image_id)
        if w.list.currentRow() != row:
            with qtbot.waitSignal(w.image_loaded, timeout=20000):
                w.list.setCurrentRow(row)
        layers = [ly for ly in viewer.layers if ly.metadata.get("hpa_role") == "channel"]
        assert [ly.colormap.name for ly in layers] == list(CHANNELS)
        assert all(ly.data.shape == shape and ly.data.dtype == np.uint8 for ly in layers)
        assert layers[0].metadata["image_id"] == image_id
    assert viewer.layers[f"{KAGGLE2021_IDS[0]} red"].metadata["labels"] == [0, 1, 2, 7]


def test_browser_errors_are_notifications(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_cpgcn._widgets import _browser, _common

    shown = []
    monkeypatch.setattr(_common, "notify_error", lambda msg, exc=None: shown.append(msg))
    monkeypatch.setattr(_browser, "notify_error", lambda msg, exc=None: shown.append(msg))
    viewer = make_napari_viewer()
    w = _browser.BrowserWidget(viewer)
    qtbot.addWidget(w)
    (tmp_path / "empty").mkdir()
    w.set_folder(tmp_path / "empty")
    assert shown and "holds no HPA images" in shown[-1]
    assert len(viewer.layers) == 0

    ids = write_tiny_folder(tmp_path / "data", n=2)
    with qtbot.waitSignal(w.image_loaded, timeout=10000):
        w.set_folder(tmp_path / "data")
    (tmp_path / "data" / f"{ids[1]}_yellow.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    before = [(ly.name, ly.data.copy()) for ly in viewer.layers]
    w.next()
    qtbot.waitUntil(lambda: w._worker is None, timeout=10000)
    assert "img1_yellow.png" in shown[-1]
    after = [(ly.name, ly.data) for ly in viewer.layers]
    assert [n for n, _ in after] == [n for n, _ in before]  # the viewer still shows img0, intact
    for (_, a), (_, b) in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
