"""Issue 19: a workspace a biologist can trust (real widgets under Xvfb, make_napari_viewer + qtbot).

No run is destroyed by Train; Predict and Export keep the user's chosen run when a training ends;
results say which image and mask they were made from and turn visibly stale when that changes.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    """Remembered GUI settings go to a temporary folder, never to the user's config."""
    monkeypatch.setenv("NAPARI_CPGCN_CONFIG_DIR", str(tmp_path / "config"))


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: (sha1, mtime_ns) by relative path."""
    return {str(p.relative_to(folder)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tiny_trained, tmp_path) -> Path:
    """A copy of the session's tiny finished run (tests must not change the shared one)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_trained[0], run)
    return run


def _train_widget(viewer, qtbot, data: Path, out: Path, answers: list[str], asked: list):
    from napari_cpgcn._napari.widgets.train import TrainWidget

    w = TrainWidget(viewer)
    qtbot.addWidget(w)
    w.preset.setCurrentText("tiny (a test)")
    w.device.setCurrentText("cpu")
    w.image_size.setValue(64)
    w.epochs.setValue(1)
    w.data_edit.setText(str(data / "images"))
    w.csv_edit.setText(str(data / "train.csv"))
    w.out_edit.setText(str(out))

    def answer(run, summary):
        asked.append((Path(run), summary))
        return answers.pop(0)

    w.ask_existing_run = answer
    return w


def test_train_on_a_finished_run_asks_and_cancel_keeps_every_file(make_napari_viewer, qtbot, tiny_data,
                                                                   finished_run):
    before = _snapshot(finished_run)
    assert "image_model/best.pt" in before and "config.json" in before
    viewer = make_napari_viewer()
    asked: list = []
    w = _train_widget(viewer, qtbot, tiny_data, finished_run, ["cancel"], asked)
    w.epochs.setValue(3)  # other settings than the run's: training would have replaced its stages
    w.start()
    assert asked and asked[0][0] == finished_run and "checkpoint" in asked[0][1]
    assert w._worker is None and w.train_btn.isEnabled()
    assert _snapshot(finished_run) == before  # not one byte, not one mtime changed
    status = w.status.text()
    assert "not started" in status and "kept unchanged" in status
    assert w.log.toPlainText().splitlines()[-1].endswith(status)  # status and log say the same


def test_train_new_folder_keeps_the_old_run_and_stopped_status_matches_log(make_napari_viewer, qtbot, tiny_data,
                                                                          finished_run):
    from napari_cpgcn.events import EventKind

    before = _snapshot(finished_run)
    viewer = make_napari_viewer()
    asked: list = []
    w = _train_widget(viewer, qtbot, tiny_data, finished_run, ["new"], asked)

    def stop_at_once(ev):
        if ev.kind in (EventKind.STAGE_START, EventKind.BATCH) and not w._stop.is_set():
            w.cancel()

    with qtbot.waitSignal(w.worker_finished, timeout=120000):
        w.start()
        assert w._worker is not None
        w._worker.yielded.connect(stop_at_once)
    assert asked, "Train did not ask about the run in the output folder"
    new = Path(w.out_edit.text())
    assert new == finished_run.with_name("run-2") and (new / "config.json").is_file()
    assert _snapshot(finished_run) == before
    status = w.status.text()
    assert status.startswith("stopped") and "Resume" in status
    assert ("no checkpoint was written" in status) == (not list(new.rglob("*.pt")))
    assert status in w.log.toPlainText().splitlines()[-1]


def test_train_finetune_starts_from_the_run_and_resume_uses_it(make_napari_viewer, qtbot, tiny_data,
                                                               finished_run, monkeypatch):
    from napari_cpgcn._napari.widgets import train as _train

    started = []
    monkeypatch.setattr(_train, "start_worker", lambda *a, **k: started.append(a) or None)
    viewer = make_napari_viewer()
    asked: list = []
    w = _train_widget(viewer, qtbot, tiny_data, finished_run, ["finetune", "resume"], asked)
    w.start()
    _, data, csv, out, config, _ = started[-1]
    assert Path(out) == finished_run.with_name("run-finetune-2")
    assert Path(config.image.init_from).resolve() == finished_run.resolve()
    assert Path(w.start_edit.text()) == finished_run.resolve()
    w.out_edit.setText(str(finished_run))
    w.start_edit.setText("")
    w.start()
    _, _, _, out, config, _ = started[-1]
    assert Path(out) == finished_run and config.image.epochs == 1  # the run's own saved settings
    assert len(asked) == 2


def test_predict_and_export_keep_the_chosen_run_after_a_training_ends(make_napari_viewer, qtbot, tmp_path):
    from napari_cpgcn._napari.widgets.export import ExportWidget
    from napari_cpgcn._napari.widgets.predict import PredictWidget
    from napari_cpgcn._napari.widgets.train import TrainWidget
    from napari_cpgcn.events import Event, EventKind

    chosen, trained = tmp_path / "chosen", tmp_path / "trained"
    for r in (chosen, trained):
        r.mkdir()
    viewer = make_napari_viewer()
    predict, export, train = PredictWidget(viewer), ExportWidget(viewer), TrainWidget(viewer)
    for x in (predict, export, train):
        qtbot.addWidget(x)
    predict.set_run(str(chosen))
    export.run_edit.setText(str(chosen))
    train.out_edit.setText(str(trained))
    train.on_event(Event(EventKind.DONE, result=str(trained)))  # what the worker yields when a run ends
    assert predict.run_combo.currentText() == str(chosen)
    assert export.run_edit.text() == str(chosen)
    items = [predict.run_combo.itemText(i) for i in range(predict.run_combo.count())]
    assert str(chosen) in items and str(trained.resolve()) in items  # the new run is offered, not forced


# --------------------------------------------------------------------------- stale results

@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A run folder whose predictor is the test stand-in (real CellPrediction, fake models)."""
    from _fake_predictor import GridPredictor

    from napari_cpgcn.pipeline import predictor as prediction

    run = tmp_path / "fake-run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "stages.json").write_text("{}")
    predictor = GridPredictor()
    monkeypatch.setattr(prediction, "load_predictor", lambda model, device="auto": predictor)
    return run, predictor


def _predicted(viewer, qtbot, tmp_path, run, n=2):
    from test_widgets import write_tiny_folder

    from napari_cpgcn._napari.widgets.browser import BrowserWidget
    from napari_cpgcn._napari.widgets.predict import PredictWidget

    write_tiny_folder(tmp_path / "data", n=n)
    browser = BrowserWidget(viewer)
    qtbot.addWidget(browser)
    with qtbot.waitSignal(browser.image_loaded, timeout=10000):
        browser.set_folder(tmp_path / "data")
    w = PredictWidget(viewer)
    qtbot.addWidget(w)
    w.set_run(str(run))
    with qtbot.waitSignal(w.predicted, timeout=10000):
        w.predict()
    assert w.stale_reasons == [] and not w.stale_label.isVisible() and w.predict_btn.text() == "Predict"
    return browser, w


def test_browsing_marks_the_results_stale(make_napari_viewer, qtbot, tmp_path, fake_run):
    viewer = make_napari_viewer()
    browser, w = _predicted(viewer, qtbot, tmp_path, fake_run[0])
    assert w.result.image_id == "img0"
    with qtbot.waitSignal(browser.image_loaded, timeout=10000):
        browser.next()
    qtbot.waitUntil(lambda: bool(w.stale_reasons), timeout=5000)
    text = w.stale_label.text()
    assert "for img0" in text and "shows img1" in text
    assert w.predict_btn.text() == "Re-predict" and "stale" in w.table.stale_caption.text()
    assert "shows img1" in w.table.stale_caption.text() and w.table.stale_caption.isVisibleTo(w)
    with qtbot.waitSignal(w.predicted, timeout=10000):  # re-predict: fresh again
        w.predict()
    assert w.result.image_id == "img1" and w.stale_reasons == [] and w.table.stale_caption.isHidden()


def test_editing_cells_updates_rows_and_marks_stale(make_napari_viewer, qtbot, tmp_path, fake_run):
    from napari_cpgcn._napari.widgets.export import export_current_table

    viewer = make_napari_viewer()
    _, w = _predicted(viewer, qtbot, tmp_path, fake_run[0])
    cells = viewer.layers["cells"]
    assert sorted(cells.features["index"]) == [1, 2, 3, 4]
    cells.fill((10, 10), 0)  # erase cell 1
    qtbot.waitUntil(lambda: sorted(cells.features["index"]) == [2, 3, 4], timeout=3000)
    new_id = 9
    cells.brush_size = 3
    cells.paint((10, 10), new_id)  # paint a new cell where 1 was
    qtbot.waitUntil(lambda: new_id in set(cells.features["index"]), timeout=3000)
    feats = cells.features.set_index("index")
    assert new_id in feats.index and bool(feats.loc[new_id, "edited"])
    assert feats.loc[new_id, "top_class"] == "new cell: re-predict" and feats.loc[new_id, "area"] > 0
    assert not feats.loc[[2, 3, 4], "edited"].any()
    status = cells.get_status((10, 10), world=True)["coordinates"]
    assert "No Properties" not in status and "re-predict" in status
    assert w.stale_reasons and "edited" in w.stale_label.text() and "1 removed" in w.stale_label.text()
    assert w.table.table.rowCount() == 4
    assert any("(edited)" in w.table.table.item(r, 0).text() for r in range(4))
    table = __import__("pandas").read_csv(export_current_table(viewer, tmp_path / "out.csv"))
    assert 1 not in set(table["cell_id"]) and new_id in set(table["cell_id"])
    with qtbot.waitSignal(w.predicted, timeout=10000):
        w.predict()
    assert w.stale_reasons == []


def test_opening_a_second_image_replaces_the_first(make_napari_viewer, qtbot, tmp_path, fake_run):
    from napari.layers import Layer

    from napari_cpgcn._napari.reader import napari_get_reader
    from napari_cpgcn._napari.widgets.common import current_image
    from napari_cpgcn._napari.widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    _, w = _predicted(viewer, qtbot, tmp_path, fake_run[0], n=1)
    seg = SegmentWidget(viewer)
    qtbot.addWidget(seg)
    from test_widgets import write_tiny_folder

    write_tiny_folder(tmp_path / "other", n=2, size=80, seed=5)
    path = str(tmp_path / "other" / "img1_red.png")
    for data, kwargs, kind in napari_get_reader(path)(path):  # what File > Open adds
        viewer.add_layer(Layer.create(data, kwargs, kind))
    qtbot.waitUntil(lambda: all(ly.metadata.get("image_id") == "img1" for ly in viewer.layers), timeout=5000)
    assert [ly.metadata.get("hpa_role") for ly in viewer.layers] == ["channel"] * 4
    image = current_image(viewer)
    assert image is not None and image.image_id == "img1" and image.shape == (80, 80)
    qtbot.waitUntil(lambda: bool(w.stale_reasons), timeout=5000)
    assert "shows img1" in w.stale_label.text()


# --------------------------------------------------------------------------- real run: display, model card, export

def test_real_run_cams_follow_probability_card_and_single_image_export(make_napari_viewer, qtbot, tmp_path,
                                                                       tiny_data, tiny_trained, monkeypatch):
    """The real predictor of the session's tiny run on one of its synthetic images."""
    import json
    import os

    import numpy as np
    import pandas as pd

    from napari_cpgcn._napari.widgets.browser import BrowserWidget
    from napari_cpgcn._napari.widgets.export import ExportWidget
    from napari_cpgcn._napari.widgets.predict import PredictWidget
    from napari_cpgcn.io.masks import read_mask
    from napari_cpgcn.pipeline.model_card import model_card

    run = tiny_trained[0]
    viewer = make_napari_viewer()
    browser = BrowserWidget(viewer)
    qtbot.addWidget(browser)
    with qtbot.waitSignal(browser.image_loaded, timeout=20000):
        browser.set_folder(tiny_data / "images")
    w = PredictWidget(viewer)
    qtbot.addWidget(w)
    w.device_combo.setCurrentText("cpu")
    w.threshold.setValue(0.0)  # a layer for every class: the dim ones must look dim
    w.set_run(str(run))
    # the model card says what the run is, and warns: synthetic training data
    card = model_card(run)
    assert card.synthetic and card.n_images == 8 and card.backbone and card.start == "random initialisation"
    assert "synthetic" in w.card_label.text() and card.backbone in w.card_label.text()
    with qtbot.waitSignal(w.predicted, timeout=120000):
        w.predict()
    cams = [ly for ly in viewer.layers if ly.metadata.get("hpa_role") == "cam"]
    assert len(cams) >= 3
    limits = {tuple(np.round(ly.contrast_limits, 6)) for ly in cams}
    assert len(limits) == 1, f"each CAM on its own scale: {limits}"  # one shared scale
    probs = [ly.metadata["probability"] for ly in cams]
    brightest = [float(np.max(ly.data)) for ly in cams]
    for p, b in zip(probs, brightest, strict=True):
        assert b <= p + 1e-4, (p, b)  # a map is never brighter than its class probability
    assert [ly.visible for ly in cams] == [True] + [False] * (len(cams) - 1)  # top class only
    cells = viewer.layers["cells"]
    assert viewer.layers.selection.active is cells and cells.contour > 0
    # export: CSV + mask + run record, files follow the umask
    export = ExportWidget(viewer)
    qtbot.addWidget(export)
    export.csv_edit.setText("")
    assert export.export_current() is None and "path is empty" in export.status.text()
    assert not list(Path.home().glob(f"{w.result.image_id}_cells.csv"))
    old = os.umask(0o022)
    try:
        export.csv_edit.setText(str(tmp_path / "exp" / "one.csv"))
        out = export.export_current()
    finally:
        os.umask(old)
    assert out == tmp_path / "exp" / "one.csv"
    assert "Model card: trained on synthetic images" in export.status.text()
    table = pd.read_csv(out)
    mask = read_mask(tmp_path / "exp" / "one.mask.tif")
    assert sorted(table["cell_id"]) == sorted(int(v) for v in np.unique(mask) if v)
    record = json.loads((tmp_path / "exp" / "one.run.json").read_text())
    assert record["image_id"] == w.result.image_id and record["stale"] == []
    assert record["model"]["run"] == str(run.resolve()) and record["model"]["synthetic"] is True
    for f in ("one.csv", "one.mask.tif", "one.run.json"):
        assert (tmp_path / "exp" / f).stat().st_mode & 0o777 == 0o644, f


def test_row_click_centres_and_zooms_on_the_cell(make_napari_viewer, qtbot, tmp_path, fake_run):
    viewer = make_napari_viewer()
    _, w = _predicted(viewer, qtbot, tmp_path, fake_run[0])
    scene = getattr(viewer, "scene", None)
    camera = scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera
    viewer.reset_view()
    fit = camera.zoom
    assert w.table.table.verticalScrollBar().value() == 0  # opens at the top
    w.table.select_cell(2)
    feats = viewer.layers["cells"].features.set_index("index")
    assert tuple(camera.center[-2:]) == pytest.approx((feats.loc[2, "centroid_y"], feats.loc[2, "centroid_x"]), abs=0.5)
    side = max(feats.loc[2, "bbox_y1"] - feats.loc[2, "bbox_y0"], feats.loc[2, "bbox_x1"] - feats.loc[2, "bbox_x0"])
    assert camera.zoom == pytest.approx(fit * max(64 / (3 * side), 1.0), rel=0.01)
    feats.loc[2, ["bbox_y1", "bbox_x1"]] = feats.loc[2, ["bbox_y0", "bbox_x0"]].to_numpy() + 4  # a small cell
    viewer.layers["cells"].features = feats.reset_index()
    w.table.table.clearSelection()
    w.table.select_cell(2)
    assert camera.zoom == pytest.approx(fit * 64 / 12, rel=0.01)  # zoomed in: 4 px span a third of the view
