"""Cancel in the Predict widget, and the stage-by-stage prediction it stops
(``Predictor.iter_predict``).

The predictor here is the real :class:`napari_cpgcn.pipeline.predictor.CPGCNPredictor` (its ``iter_predict``,
table and fusion code) with fake, instant stages (segmentation, image model, cell model); a stage
can be held until the test releases it, so a Cancel lands while that stage runs.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_cpgcn.classes import CHANNELS, CLASSES, N_CLASSES
from napari_cpgcn.pipeline.predictor import CPGCNPredictor

SIZE = 64
STAGES = ("segment", "image_model", "cell_model")
MESSAGES = ("segmenting cells (classical)", "image model + CAMs", "cell model (4 cells)", "per-cell table")


def grid_cells(size: int = SIZE) -> np.ndarray:
    """Four square cells in a 2x2 grid."""
    cells = np.zeros((size, size), np.uint32)
    h = size // 2
    for k, (sy, sx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        cells[sy * h + 2:(sy + 1) * h - 2, sx * h + 2:(sx + 1) * h - 2] = k + 1
    return cells


class StagedPredictor(CPGCNPredictor):
    """The real Predictor with fake stages that record themselves; the stage named ``hold``
    blocks until ``release`` is set (``entered`` tells the test it is running), and the stage
    named ``fail`` raises a RuntimeError (like torch does)."""

    def __init__(self, hold: str | None = None, fail: str | None = None) -> None:
        super().__init__(None, None, None, None, "cpu")
        self.hold, self.fail = hold, fail
        self.stages: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def stage(self, name: str) -> None:
        self.stages.append(name)
        if name == self.fail:
            raise RuntimeError(f"{name} exploded")
        if name == self.hold:
            self.entered.set()
            if not self.release.wait(30):
                raise TimeoutError(f"the test never released the {name} stage")

    def segment(self, data: np.ndarray, method: str, **params) -> np.ndarray:
        self.stage("segment")
        return grid_cells(data.shape[-1])

    def predict_image(self, data, with_cams=True):
        self.stage("image_model")
        y, x = data.shape[1:]
        probs = np.full(N_CLASSES, 0.02, np.float32)
        probs[[2, 7]] = [0.9, 0.85]
        cams = np.zeros((N_CLASSES, y, x), np.float32)
        cams[2] = 1.0
        cams[7, :, : x // 2] = 1.0
        return probs, (cams if with_cams else None)

    def predict_cells(self, data, cells, geometry, batch_size=64):
        self.stage("cell_model")
        probs = np.full((len(geometry), N_CLASSES), 0.1, np.float32)
        probs[:, 2] = 0.8
        return probs


class PlainPredictor:
    """Only the ``predict`` contract (no ``iter_predict``): the widget runs it as one stage."""

    def __init__(self, inner: StagedPredictor) -> None:
        self.inner = inner

    def predict(self, image, cells=None, segmentation="classical", with_cams=True):
        return self.inner.predict(image, cells=cells, segmentation=segmentation, with_cams=with_cams)


@pytest.fixture
def staged() -> StagedPredictor:
    """A StagedPredictor (its ``segment`` is the one ``iter_predict`` calls)."""
    return StagedPredictor()


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((4, SIZE, SIZE)) * 200).astype(np.uint8)


# --------------------------------------------------------------------------- core (no Qt)

def test_iter_predict_yields_before_each_stage_and_returns_what_predict_returns(staged):
    steps = staged.iter_predict(_image(), image_id="img0")
    messages = []
    while True:
        try:
            messages.append(next(steps))
            assert len(staged.stages) == len(messages) - 1  # each message comes before its stage
        except StopIteration as done:
            pred = done.value
            break
    assert messages == list(MESSAGES)
    assert staged.stages == list(STAGES)
    staged.stages.clear()
    again = staged.predict(_image(), image_id="img0")
    assert staged.stages == list(STAGES)
    assert pred.image_id == again.image_id == "img0"
    np.testing.assert_array_equal(pred.cells, again.cells)
    assert pred.table.equals(again.table)
    assert list(pred.table["top_class"]) == ["nucleoli"] * 4
    # given cells: no segmentation stage
    staged.stages.clear()
    messages = list(staged.iter_predict(_image(), cells=grid_cells(), with_cams=False))
    assert messages == ["image model", "cell model (4 cells)", "per-cell table"]
    assert staged.stages == ["image_model", "cell_model"]


@pytest.mark.parametrize("n_messages", [1, 2, 3, 4])
def test_iter_predict_stops_between_stages(staged, n_messages):
    steps = staged.iter_predict(_image())
    for _ in range(n_messages):
        next(steps)
    steps.close()  # what a consumer that stops iterating amounts to
    assert staged.stages == list(STAGES[:n_messages - 1])


def test_iter_predict_checks_the_image_before_the_first_stage(staged):
    with pytest.raises(ValueError, match=r"expected a \(4, Y, X\) image"):
        next(staged.iter_predict(np.zeros((3, 8, 8), np.uint8)))
    assert staged.stages == []


# --------------------------------------------------------------------------- the widget

@pytest.fixture
def viewer_run(make_napari_viewer, tmp_path, monkeypatch, staged):
    """A viewer showing one 64² HPA image, a run folder whose predictor is ``staged``, and a
    record of the worker's last step (building the layer tuples)."""
    from napari_cpgcn._napari.widgets import predict as _predict
    from napari_cpgcn.pipeline import predictor as prediction

    monkeypatch.setenv("NAPARI_CPGCN_CONFIG_DIR", str(tmp_path / "config"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "stages.json").write_text("{}")  # a pipeline run folder
    holder = {"predictor": staged, "layers_built": 0}
    monkeypatch.setattr(prediction, "load_predictor", lambda model, device="auto": holder["predictor"])
    cam_layers = _predict.cam_layers

    def counted_cam_layers(*args, **kwargs):
        holder["layers_built"] += 1
        return cam_layers(*args, **kwargs)

    monkeypatch.setattr(_predict, "cam_layers", counted_cam_layers)
    viewer = make_napari_viewer()
    for c, plane in zip(CHANNELS, _image(), strict=True):
        viewer.add_image(plane, name=f"img0 {c}", metadata={"hpa_role": "channel", "hpa_channel": c,
                                                             "image_id": "img0", "path": ""})
    return viewer, run, holder


def _predict_widget(viewer, qtbot, run):
    from napari_cpgcn._napari.widgets.predict import PredictWidget

    w = PredictWidget(viewer)
    qtbot.addWidget(w)
    w.set_run(str(run))
    return w


def _add_cells_layer(viewer):
    return viewer.add_labels(grid_cells(), name="cells", metadata={"hpa_role": "cells", "image_id": "img0"})


@pytest.mark.gui
@pytest.mark.parametrize(("hold", "status", "plain"), [
    ("segment", "segmenting cells", False),
    ("image_model", "image model", False),
    ("cell_model", "cell model (4 cells)", False),
    ("image_model", "predicting", True),  # a predictor with only predict(): one stage
])
def test_cancel_during_a_stage_leaves_the_viewer_unchanged(viewer_run, qtbot, staged, hold, status, plain):
    from qtpy.QtCore import Qt

    viewer, run, holder = viewer_run
    if plain:
        holder["predictor"] = PlainPredictor(staged)
    if hold != "segment":  # the widget then takes the cells layer and skips the segmentation
        cells = _add_cells_layer(viewer)
        cells_before, features_before = cells.data.copy(), cells.features.copy()
    names_before = [ly.name for ly in viewer.layers]
    w = _predict_widget(viewer, qtbot, run)
    assert not w.cancel_btn.isEnabled()
    staged.hold = hold

    w.predict()
    assert w.cancel_btn.isEnabled() and not w.predict_btn.isEnabled()
    qtbot.waitUntil(staged.entered.is_set, timeout=10000)
    qtbot.waitUntil(lambda: status in w.status.text(), timeout=10000)  # per-stage progress
    qtbot.mouseClick(w.cancel_btn, Qt.MouseButton.LeftButton)
    assert not w.cancel_btn.isEnabled() and "cancelling" in w.status.text()
    with qtbot.waitSignal(w.cancelled, timeout=10000) as blocker:
        staged.release.set()
    assert blocker.args == ["img0"]

    # stopped at the next stage boundary: nothing after the held stage ran
    first = 0 if hold == "segment" else 1  # with a cells layer there is no segmentation
    last = len(STAGES) if plain else STAGES.index(hold) + 1  # predict() alone is one stage
    assert staged.stages == list(STAGES[first:last])
    assert holder["layers_built"] == 0  # the worker stopped before building layers
    assert [ly.name for ly in viewer.layers] == names_before  # no CAM layers, no new cells layer
    if hold != "segment":
        np.testing.assert_array_equal(cells.data, cells_before)
        assert cells.features.equals(features_before)  # no features written
        assert "top_class" not in cells.features
    assert w.status.text() == "prediction cancelled; the viewer is unchanged"
    assert w.predict_btn.isEnabled() and not w.cancel_btn.isEnabled()
    assert w.result is None and w.table.table.rowCount() == 0
    assert w._worker is None

    # Predict works again after a cancel
    staged.hold, staged.entered, staged.release = None, threading.Event(), threading.Event()
    with qtbot.waitSignal(w.predicted, timeout=10000):
        w.predict()
    assert [ly.name for ly in viewer.layers if ly.metadata.get("hpa_role") == "cam"] == [
        f"CAM {CLASSES[2].name}", f"CAM {CLASSES[7].name}"]
    assert list(viewer.layers["cells"].features["top_class"]) == ["nucleoli"] * 4
    assert w.table.table.rowCount() == 4


@pytest.mark.gui
def test_a_normal_run_reports_each_stage_and_fills_the_viewer(viewer_run, qtbot, staged):
    viewer, run, _ = viewer_run
    w = _predict_widget(viewer, qtbot, run)
    seen = []
    progress = w._progress
    w._progress = lambda message: (seen.append(message), progress(message))
    with qtbot.waitSignal(w.predicted, timeout=10000):
        w.predict()
    qtbot.waitUntil(lambda: w._worker is None, timeout=10000)
    assert seen == ["loading the model", *MESSAGES, "building layers"]
    assert staged.stages == list(STAGES)
    assert w.status.text() == "img0: 4 cells, 2 CAM layers"
    assert [ly.name for ly in viewer.layers][-3:] == [f"CAM {CLASSES[2].name}", f"CAM {CLASSES[7].name}", "cells"]
    feats = viewer.layers["cells"].features
    assert list(feats["index"]) == [1, 2, 3, 4] and "fused_nucleoli" in feats
    assert w.predict_btn.isEnabled() and not w.cancel_btn.isEnabled()


@pytest.mark.gui
def test_a_runtime_error_in_a_stage_is_reported_and_predict_comes_back(viewer_run, qtbot, staged, monkeypatch):
    """superqt's GeneratorWorker drops a RuntimeError from a generator silently (no errored, no
    finished); torch raises RuntimeErrors, so the widget must still report them."""
    from napari_cpgcn._napari.widgets import predict as _predict

    viewer, run, _ = viewer_run
    shown = []
    monkeypatch.setattr(_predict, "notify_error", lambda msg, exc=None: shown.append((msg, exc)))
    names_before = [ly.name for ly in viewer.layers]
    w = _predict_widget(viewer, qtbot, run)
    staged.fail = "image_model"
    w.predict()
    qtbot.waitUntil(lambda: w._worker is None, timeout=10000)
    assert shown and shown[-1][0] == "prediction failed: image_model exploded"
    assert isinstance(shown[-1][1], RuntimeError)  # the original exception, with its traceback
    assert w.status.text() == "prediction failed; the viewer is unchanged"
    assert [ly.name for ly in viewer.layers] == names_before
    assert w.predict_btn.isEnabled() and not w.cancel_btn.isEnabled()


def test_start_worker_reports_runtime_errors_of_any_generator_worker(qtbot):
    """The train/export/segment workers are generators too: their RuntimeErrors must surface."""
    from napari_cpgcn._napari.widgets.common import start_worker

    errors, finished, seen = [], [], []

    def steps():
        yield "one"
        raise RuntimeError("CUDA out of memory (simulated)")

    worker = start_worker(steps, on_yield=seen.append, on_error=errors.append,
                          on_finish=lambda: finished.append(True))
    qtbot.waitUntil(lambda: bool(finished), timeout=10000)
    assert seen == ["one"]
    assert len(errors) == 1 and type(errors[0]) is RuntimeError and "out of memory" in str(errors[0])
    assert worker is not None
