"""Dock widgets under Xvfb (make_napari_viewer + qtbot): browser, table, predict, export, train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ARCHIVE_JPEG_IDS, KAGGLE2018_ID, KAGGLE2021_IDS
from PIL import Image

from napari_cpgcn.classes import CHANNELS

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
    from napari_cpgcn._napari.widgets.browser import BrowserWidget

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

    # keyboard: PageDown / PageUp step through the list
    keys = {str(k): f for k, f in viewer.keymap.items()}
    assert "PageDown" in keys and "PageUp" in keys
    with qtbot.waitSignal(w.image_loaded, timeout=10000):
        keys["PageDown"](viewer)
    assert _channel_names(viewer)[0] == "img1 red"


def test_browser_on_real_formats(make_napari_viewer, qtbot, hpa_samples):
    from napari_cpgcn._napari.widgets.browser import BrowserWidget

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
    from napari_cpgcn._napari.widgets import browser as _browser
    from napari_cpgcn._napari.widgets import common as _common

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


# --------------------------------------------------------------------------- predict / table / export
# The widgets are tested with a stand-in predictor (tests/_fake_predictor.py: the real
# CellPrediction, fake models); the full flow with the real pipeline is in test_gui_flow.py.
from _fake_predictor import GridPredictor as FakePredictor  # noqa: E402


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A run folder whose predictor is the fake (the widgets load it through pipeline.predictor.load_predictor)."""
    from napari_cpgcn.pipeline import predictor as prediction

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "stages.json").write_text("{}")  # a pipeline run folder
    predictor = FakePredictor()
    from napari_cpgcn.batch import local as batch_local

    monkeypatch.setattr(prediction, "load_predictor", lambda model, device="auto": predictor)
    monkeypatch.setattr(batch_local, "load_predictor", lambda model, device="auto": predictor)
    return run, predictor


def _camera(viewer):
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _open_tiny(viewer, qtbot, folder):
    from napari_cpgcn._napari.widgets.browser import BrowserWidget

    browser = BrowserWidget(viewer)
    qtbot.addWidget(browser)
    with qtbot.waitSignal(browser.image_loaded, timeout=10000):
        browser.set_folder(folder)
    return browser


def test_predict_adds_cams_cells_features_and_table(make_napari_viewer, qtbot, tmp_path, fake_run):
    from napari_cpgcn._napari.widgets.predict import PredictWidget
    from napari_cpgcn.classes import CLASSES

    run, predictor = fake_run
    viewer = make_napari_viewer()
    write_tiny_folder(tmp_path / "data", n=2)
    browser = _open_tiny(viewer, qtbot, tmp_path / "data")
    w = PredictWidget(viewer)
    qtbot.addWidget(w)
    w.set_run(str(run))
    with qtbot.waitSignal(w.predicted, timeout=10000):
        w.predict()
    names = [ly.name for ly in viewer.layers]
    assert names[-1] == "cells"  # on top
    assert names[4:6] == [f"CAM {CLASSES[2].name}", f"CAM {CLASSES[7].name}"]
    cam = viewer.layers[f"CAM {CLASSES[7].name}"]
    assert cam.blending == "additive" and cam.metadata["probability"] == pytest.approx(0.85)
    # the readable default (issue 19): only the top class's CAM is visible, the others are there hidden
    assert viewer.layers[f"CAM {CLASSES[2].name}"].visible and not cam.visible
    cells = viewer.layers["cells"]
    feats = cells.features
    assert list(feats["index"]) == [1, 2, 3, 4]
    assert list(feats["top_class"]) == ["golgi", "nucleoli", "golgi", "nucleoli"]
    assert {"fused_golgi", "image_golgi", "cell_golgi", "classes"} <= set(feats.columns)
    # hovering a cell shows its classes
    status = cells.get_status((10, 10), world=True)["coordinates"]
    assert "top_class: golgi" in status and "classes: golgi" in status
    # the single-cell variation of the predicted classes: golgi in the two left cells only
    text = w.variation_label.text()
    assert "golgi 2/4 cells (50%)" in text and "variable" in text and "nucleoli 4/4 cells (100%)" in text
    # the table lists the cells; choosing a row selects and centres the cell
    assert w.table.table.rowCount() == 4
    w.table.select_cell(4)
    assert cells.selected_label == 4
    np.testing.assert_allclose(_camera(viewer).center[-2:], feats.loc[3, ["centroid_y", "centroid_x"]].astype(float), atol=0.5)
    cells.selected_label = 3  # selecting in the canvas highlights the row
    row = w.table.table.selectedItems()[0].row()
    assert w.table.table.item(row, 0).text() == "3"
    # colour by top class
    w.color_by_class.setChecked(True)
    np.testing.assert_allclose(cells.get_color(1)[:3], np.array([int(CLASSES[7].color[i:i + 2], 16) for i in (1, 3, 5)]) / 255, atol=0.01)
    w.color_by_class.setChecked(False)
    # predicting again uses the existing cells layer and replaces, not duplicates, the CAMs
    qtbot.waitUntil(lambda: w._worker is None, timeout=10000)
    with qtbot.waitSignal(w.predicted, timeout=10000):
        w.predict()
    assert predictor.calls[-1] == ("img0", True, None)  # given cells; None: as the run was trained
    assert [ly.name for ly in viewer.layers] == names
    # the next image drops this image's cells and CAMs
    with qtbot.waitSignal(browser.image_loaded, timeout=10000):
        browser.next()
    assert [ly.name for ly in viewer.layers] == [f"img1 {c}" for c in CHANNELS]


def test_predict_failure_leaves_viewer_unchanged(make_napari_viewer, qtbot, tmp_path, fake_run, monkeypatch):
    from napari_cpgcn._napari.widgets import predict as _predict

    run, predictor = fake_run
    shown = []
    monkeypatch.setattr(_predict, "notify_error", lambda msg, exc=None: shown.append(msg))
    viewer = make_napari_viewer()
    w = _predict.PredictWidget(viewer)
    qtbot.addWidget(w)
    w.set_run(str(run))
    w.predict()  # no image yet
    assert "no HPA image" in shown[-1]
    write_tiny_folder(tmp_path / "data", n=1)
    _open_tiny(viewer, qtbot, tmp_path / "data")
    w.set_run(str(tmp_path / "nowhere"))
    w.predict()
    assert "does not exist" in shown[-1]
    w.set_run(str(run))
    predictor.fail = True
    before = [ly.name for ly in viewer.layers]
    w.predict()
    qtbot.waitUntil(lambda: w._worker is None, timeout=10000)
    assert "model exploded" in shown[-1]
    assert [ly.name for ly in viewer.layers] == before
    assert w.predict_btn.isEnabled()


def test_export_current_image_and_folder(make_napari_viewer, qtbot, tmp_path, fake_run):
    import pandas as pd

    from napari_cpgcn._napari.layers import table_columns
    from napari_cpgcn._napari.widgets.export import ExportWidget
    from napari_cpgcn._napari.widgets.predict import PredictWidget

    run, _ = fake_run
    viewer = make_napari_viewer()
    ids = write_tiny_folder(tmp_path / "data", n=2)
    _open_tiny(viewer, qtbot, tmp_path / "data")
    p = PredictWidget(viewer)
    qtbot.addWidget(p)
    p.set_run(str(run))
    with qtbot.waitSignal(p.predicted, timeout=10000):
        p.predict()
    w = ExportWidget(viewer)
    qtbot.addWidget(w)
    w.csv_edit.setText(str(tmp_path / "out" / "img0.csv"))
    out = w.export_current()
    df = pd.read_csv(out)
    assert list(df.columns) == table_columns()
    assert list(df["cell_id"]) == [1, 2, 3, 4] and set(df["image_id"]) == {"img0"}
    np.testing.assert_allclose(df["fused_nucleoli"], p.result.table["fused_nucleoli"], rtol=1e-5)
    assert list(df["top_class"]) == list(p.result.table["top_class"])

    # whole folder, in a worker, through the batch engine
    assert w.run_edit.text() == str(run)  # remembered from Predict
    w.out_edit.setText(str(tmp_path / "folder_out"))
    with qtbot.waitSignal(w.exported, timeout=30000) as blocker:
        w.export_folder()
    qtbot.waitUntil(lambda: w._worker is None, timeout=10000)
    cells = pd.read_csv(blocker.args[0])
    assert sorted(set(cells["image_id"])) == ids and len(cells) == 8
    assert w.progress.value() == 2


# --------------------------------------------------------------------------- train (real pipeline, tiny)

@pytest.fixture(scope="module")
def synth_set(tmp_path_factory) -> Path:
    """Six 96² synthetic images with labels (napari_cpgcn.synth)."""
    from napari_cpgcn.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth") / "data", 6, size=96, seed=3)


def _train_widget(viewer, qtbot, data: Path, out: Path):
    from napari_cpgcn._napari.widgets.train import TrainWidget

    w = TrainWidget(viewer)
    qtbot.addWidget(w)
    w.preset.setCurrentText("tiny (a test)")
    w.device.setCurrentText("cpu")
    w.data_edit.setText(str(data / "images"))
    w.csv_edit.setText(str(data / "train.csv"))
    w.out_edit.setText(str(out))
    return w


def test_train_cancel_then_resume(make_napari_viewer, qtbot, tmp_path, synth_set):
    import json

    from napari_cpgcn._napari.widgets.predict import PredictWidget
    from napari_cpgcn.events import EventKind

    viewer = make_napari_viewer()
    predict = PredictWidget(viewer)
    qtbot.addWidget(predict)
    w = _train_widget(viewer, qtbot, synth_set, tmp_path / "run")
    seen = []

    def cancel_on_first_batch(ev):
        seen.append(ev.kind)
        if ev.kind == EventKind.BATCH and not w._stop.is_set():
            w.cancel()

    with qtbot.waitSignal(w.worker_finished, timeout=120000):
        w.start()
        w._worker.yielded.connect(cancel_on_first_batch)
    assert EventKind.STOPPED in seen and EventKind.DONE not in seen
    assert seen.index(EventKind.STOPPED) - seen.index(EventKind.BATCH) <= 3  # stopped within one batch
    assert "Resume" in w.status.text()
    stages = tmp_path / "run" / "stages.json"  # {"finished": {stage: ...}, "started": {...}}
    assert stages.is_file() and "image_model" in json.loads(stages.read_text())["started"]
    assert "image_model" not in json.loads(stages.read_text())["finished"]
    assert w.train_btn.isEnabled() and w.resume_btn.isEnabled()

    trained = []
    w.trained.connect(trained.append)
    with qtbot.waitSignal(w.worker_finished, timeout=240000):  # ends early when training fails
        w.resume()
    assert trained, f"resumed training did not finish:\n{w.log.toPlainText()[-3000:]}"
    run = Path(trained[0])
    assert (run / "cell_model" / "best.pt").is_file() or (run / "cell_model" / "latest.pt").is_file()
    assert all(bar.value() == 100 for bar in w.bars.values())
    assert w.plot.loss and "image_model" in w.plot.loss
    assert str(run.resolve()) == predict.run_combo.currentText()  # selectable in Predict
    assert "done in" in w.log.toPlainText()


def test_train_refuses_bad_inputs_before_starting(make_napari_viewer, qtbot, tmp_path, synth_set, monkeypatch):
    from napari_cpgcn._napari.widgets import train as _train

    shown = []
    monkeypatch.setattr(_train, "notify_error", lambda msg, exc=None: shown.append(msg))
    viewer = make_napari_viewer()
    w = _train_widget(viewer, qtbot, synth_set, tmp_path / "run")
    (tmp_path / "empty").mkdir()
    w.data_edit.setText(str(tmp_path / "empty"))
    w.start()
    assert "holds no HPA images" in shown[-1]
    w.data_edit.setText(str(synth_set / "images"))
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Label\nx,42\n")
    w.csv_edit.setText(str(bad))
    w.start()
    assert "unknown class id 42" in shown[-1]
    other = tmp_path / "other.csv"
    other.write_text("ID,Label\nnot_an_image,3\n")
    w.csv_edit.setText(str(other))
    w.start()
    assert "matches an image" in shown[-1]
    assert w._worker is None and not (tmp_path / "run").exists()
