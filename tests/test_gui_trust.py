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
