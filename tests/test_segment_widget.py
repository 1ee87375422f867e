"""Segment dock widget under Xvfb: default channel layers, a ``cells`` Labels layer, errors."""

from __future__ import annotations

import numpy as np
import pytest
from test_segmentation import CENTRES, cells_image

from napari_cpgcn.classes import CHANNELS

pytestmark = pytest.mark.gui


def add_channels(viewer, data, image_id="img", tag=True):
    for color, plane in zip(CHANNELS, data, strict=True):
        meta = {"hpa_channel": color, "hpa_role": "channel", "image_id": image_id} if tag else {}
        viewer.add_image(plane, name=f"{image_id} {color}", metadata=meta, blending="additive")


def test_widget_adds_then_replaces_cells_layer(make_napari_viewer, qtbot):
    from napari_cpgcn._napari.widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    data, truth = cells_image()
    viewer.add_image(np.zeros((8, 8)), name="unrelated")
    add_channels(viewer, data)
    w = SegmentWidget(viewer)
    qtbot.addWidget(w)
    assert {c: w.channel_combos[c].currentText() for c in ("blue", "red", "yellow")} == {
        "blue": "img blue", "red": "img red", "yellow": "img yellow"}
    w.nucleus_spin.setValue(20)
    with qtbot.waitSignal(w.segmented, timeout=30000) as sig:
        w.run()
    assert sig.args == [len(CENTRES)]
    layer = viewer.layers["cells"]
    assert type(layer).__name__ == "Labels"
    assert layer.data.shape == truth.shape and layer.data.max() == len(CENTRES)
    assert layer.metadata["hpa_role"] == "cells" and layer.metadata["image_id"] == "img"
    assert f"{len(CENTRES)} cells" in w.status.text()

    # Second run: the same layer object gets the new labels (no duplicate layer).
    qtbot.waitUntil(w.run_btn.isEnabled, timeout=5000)
    layer.opacity = 0.9
    w.downscale_spin.setValue(2)
    with qtbot.waitSignal(w.segmented, timeout=30000):
        w.run()
    assert [ly.name for ly in viewer.layers].count("cells") == 1
    assert viewer.layers["cells"] is layer and layer.opacity == 0.9


def test_widget_defaults_by_layer_name_and_reports_errors(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    from napari_cpgcn._napari.widgets import segment as _segment
    from napari_cpgcn._napari.widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    data, _ = cells_image(shape=(64, 64), centres=[(32, 32)], nucleus_r=6, cell_r=15)
    add_channels(viewer, data, image_id="x", tag=False)  # plain layers named "x red" …
    w = SegmentWidget(viewer)
    qtbot.addWidget(w)
    assert w.channel_combos["yellow"].currentText() == "x yellow"

    errors = []
    monkeypatch.setattr(_segment, "notify_error", lambda msg, exc=None: errors.append(msg))
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "none"))
    w.method_combo.setCurrentText("cellpose")
    assert w.model_combo.isEnabled()
    w.run()
    qtbot.waitUntil(lambda: w.run_btn.isEnabled() and bool(errors), timeout=10000)
    assert "cyto3" in errors[-1] and str(tmp_path / "none") in errors[-1]
    assert "cells" not in viewer.layers

    w.channel_combos["blue"].setCurrentText("—")
    w.run()
    assert "blue channel" in errors[-1]
