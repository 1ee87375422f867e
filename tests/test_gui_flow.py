"""The whole GUI flow on synthetic data with a tiny model, through the plugin's dock widgets:

browse → segment → train (1 epoch per stage) → predict → hover / features → export CSV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cpgcn.classes import CHANNELS, SHORT_NAMES

pytestmark = [pytest.mark.gui, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_CPGCN_CONFIG_DIR", str(tmp_path / "config"))


def _dock(viewer, name: str):
    _dock_widget, widget = viewer.window.add_plugin_dock_widget("napari-cpgcn", name)
    return widget


def test_browse_segment_train_predict_hover_export(make_napari_viewer, qtbot, tmp_path):
    from napari_cpgcn.io.celltable import prediction_columns
    from napari_cpgcn.synth import generate_dataset

    data = generate_dataset(tmp_path / "synth", 6, size=96, seed=1)
    viewer = make_napari_viewer()

    # browse
    browser = _dock(viewer, "HPA browser")
    with qtbot.waitSignal(browser.image_loaded, timeout=20000):
        browser.set_folder(data)
    assert len(browser.image_ids) == 6
    image_id = browser.image_ids[0]
    chans = [ly for ly in viewer.layers if ly.metadata.get("hpa_role") == "channel"]
    assert [ly.name for ly in chans] == [f"{image_id} {c}" for c in CHANNELS]
    assert chans[0].metadata["labels"] is not None  # from synth's train.csv

    # segment
    seg = _dock(viewer, _segment_display_name())
    with qtbot.waitSignal(seg.segmented, timeout=60000) as blocker:
        seg.run()
    n_cells = blocker.args[0]
    assert n_cells > 0
    cells = viewer.layers["cells"]
    segmented = np.asarray(cells.data).copy()

    # train (1 epoch per stage)
    train = _dock(viewer, "Train (CP-GCN pipeline)")
    train.preset.setCurrentText("tiny (a test)")
    train.device.setCurrentText("cpu")
    assert (train.backbone.currentText(), train.image_size.value(), train.epochs.value()) == ("resnet18", 128, 2)
    train.image_size.setValue(64)  # smaller than the preset: seconds per stage in a test
    train.epochs.setValue(1)
    train.k.setValue(2)
    train.data_edit.setText(str(data / "images"))
    train.csv_edit.setText(str(data / "train.csv"))
    train.out_edit.setText(str(tmp_path / "run"))
    with qtbot.waitSignal(train.trained, timeout=300000) as blocker:
        train.start()
    run = Path(blocker.args[0])
    assert (run / "config.json").is_file()

    # predict: the new run is already chosen; the segmented cells are used
    predict = _dock(viewer, "Predict (CAMs + per-cell table)")
    assert predict.run_combo.currentText() == str(run.resolve())
    predict.device_combo.setCurrentText("cpu")
    with qtbot.waitSignal(predict.predicted, timeout=120000):
        predict.predict()
    names = [ly.name for ly in viewer.layers]
    assert names[:4] == [f"{image_id} {c}" for c in CHANNELS]
    assert names[-1] == "cells" and viewer.layers["cells"] is cells
    cams = [ly for ly in viewer.layers if ly.metadata.get("hpa_role") == "cam"]
    assert cams and all(ly.name.startswith("CAM ") and ly.blending == "additive" for ly in cams)
    assert all(ly.data.shape == segmented.shape for ly in cams)
    np.testing.assert_array_equal(cells.data, segmented)
    feats = cells.features
    ids = np.unique(segmented)
    assert sorted(feats["index"]) == [int(i) for i in ids if i]
    for s in SHORT_NAMES:
        np.testing.assert_allclose(feats[f"fused_{s}"], feats[f"image_{s}"] * feats[f"cell_{s}"], rtol=1e-4, atol=1e-6)
    assert set(feats["top_class"]) <= set(SHORT_NAMES)

    # hover: the status of a pixel inside cell k names its classes
    k = int(feats["index"].iloc[0])
    yx = np.argwhere(segmented == k)[0]
    status = cells.get_status(tuple(cells.data_to_world(yx)), world=True)
    text = status["coordinates"] if isinstance(status, dict) else str(status)
    assert f"top_class: {feats['top_class'].iloc[0]}" in text
    assert predict.table.table.rowCount() == len(feats)

    # export CSV
    export = _dock(viewer, "Export per-cell CSV")
    export.csv_edit.setText(str(tmp_path / "export" / f"{image_id}.csv"))
    with qtbot.waitSignal(export.exported, timeout=10000) as blocker:
        export.export_current()
    df = pd.read_csv(blocker.args[0])
    assert list(df.columns) == prediction_columns()
    assert set(df["image_id"]) == {image_id}
    assert list(df["cell_id"]) == list(feats["index"])
    for col in ("area", "centroid_y", "centroid_x"):
        np.testing.assert_allclose(df[col], feats[col], rtol=1e-5)
    for s in SHORT_NAMES:
        np.testing.assert_allclose(df[f"fused_{s}"], feats[f"fused_{s}"], rtol=1e-4, atol=1e-6)
    areas = {int(i): int((segmented == i).sum()) for i in df["cell_id"]}
    assert [areas[int(i)] for i in df["cell_id"]] == list(df["area"])


def _segment_display_name() -> str:
    """The Segment widget's display name, read from the manifest (another module owns that entry)."""
    import npe2

    pm = npe2.PluginManager.instance()
    manifest = pm.get_manifest("napari-cpgcn")
    for w in manifest.contributions.widgets or []:
        if w.command.endswith("segment_widget") or "Segment" in w.display_name:
            return w.display_name
    raise AssertionError("no Segment widget in napari.yaml")
