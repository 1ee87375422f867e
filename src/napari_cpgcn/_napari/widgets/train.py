"""Train: run the whole CP-GCN pipeline (:func:`napari_cpgcn.pipeline.train_pipeline`) in a worker.

The worker iterates the pipeline's event generator; every event is handed to the GUI thread,
which updates one progress bar per stage, a live loss / validation-mAP plot (redrawn at most
twice a second so the viewer stays responsive) and a log. Cancel sets a stop flag that the
trainers poll between batches: the latest checkpoint is kept and Resume carries on from it
(finished stages are skipped). When the run finishes it becomes selectable in Predict.

Train never replaces a run without asking: when the output folder already holds one, the widget
asks (:data:`RUN_CHOICES`: resume it, fine-tune a new run from it, train into a new folder, or
cancel). The question goes through :attr:`TrainWidget.ask_existing_run`, a plain function that
tests replace with one answering for the user.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_cpgcn.events import Event, EventKind
from napari_cpgcn.pipeline.config import OPTIONAL_STAGES
from napari_cpgcn.pipeline.config import STAGES as PIPELINE_STAGES

from .common import (
    RUNS,
    PathEdit,
    error_text,
    load_settings,
    notify_error,
    notify_info,
    prepare_torch,
    start_worker,
    update_settings,
)

log = logging.getLogger(__name__)

__all__ = ["TrainWidget", "build_config", "check_training_inputs", "PRESETS", "RUN_CHOICES",
           "existing_run_files", "free_folder", "checkpoints_of"]

#: The pipeline's stages with a progress bar here (the optional pretrain stage has no switch in
#: this widget yet: use `napari-cpgcn train --pretrain`, or "Start from" a pretraining folder).
STAGES = tuple(s for s in PIPELINE_STAGES if s not in OPTIONAL_STAGES)
STAGE_TITLES = {"pretrain": "self-supervised pretraining", "image_model": "CP-GCN image model",
                "refine": "K-means refinement", "segmentation": "segmentation", "pseudolabels": "cell pseudo-labels",
                "cell_model": "cell model", "fusion": "fusion (image x cell)"}
DEVICES = ("auto", "cpu", "cuda", "mps")
#: Preset menu: title -> :data:`napari_cpgcn.pipeline.config.PRESETS` name (the settings live there).
PRESETS: dict[str, str] = {"small (CPU, minutes)": "small", "tiny (a test)": "tiny", "paper (GPU)": "paper"}


def preset_form(title: str) -> dict[str, Any]:
    """The form values of a preset: backbone, image size, epochs, batch size, K, rounds."""
    from napari_cpgcn.pipeline import PipelineConfig

    c = PipelineConfig.preset(PRESETS.get(title, title))
    return dict(backbone=c.image.backbone, image_size=c.image.image_size, epochs=c.image.epochs,
                batch_size=c.image.batch_size, k=c.refine.k, rounds=c.refine.rounds)


# --------------------------------------------------------------------------- core helpers (no Qt)

def build_config(backbone: str, image_size: int, epochs: int, batch_size: int, k: int, rounds: int,
                 device: str = "auto", preset: str = "small", start_from: str = ""):
    """A :class:`~napari_cpgcn.pipeline.PipelineConfig` from the form's values.

    ``preset`` ``"paper"`` starts from the paper's settings (ImageNet weights when present); the
    others from :meth:`PipelineConfig.tiny` (random init, small GCN), then the form's values
    override backbone, image size, epochs (every stage), batch size, K and rounds.
    ``start_from``: a finished run whose image and cell backbones start this one (fine-tuning).
    """
    from napari_cpgcn.pipeline import PipelineConfig

    base = PipelineConfig.preset(PRESETS.get(preset, preset))
    base.image = base.image.replace(backbone=backbone, image_size=image_size, epochs=epochs,
                                    batch_size=batch_size)
    base.refine = base.refine.replace(k=k, rounds=rounds, epochs=epochs, batch_size=batch_size)
    base.cell = base.cell.replace(backbone=backbone, epochs=epochs)
    config = base.with_device(device).starting_from(start_from.strip() or None)
    config.validate()
    return config


def check_training_inputs(data_dir: str, labels_csv: str, out_dir: str) -> str:
    """Check the folder, the CSV and the output before anything starts; returns a summary line.

    Raises
    ------
    ValueError, FileNotFoundError
        Naming what is wrong: no images, a CSV with unknown class ids or ids that match no image.
    """
    from napari_cpgcn.io.hpa import list_image_ids
    from napari_cpgcn.io.tables import read_labels_csv

    if not data_dir:
        raise ValueError("choose the folder of training images")
    if not labels_csv:
        raise ValueError("choose the labels CSV (ID,Label with |-joined class ids)")
    if not out_dir:
        raise ValueError("choose an output folder for the run")
    ids = list_image_ids(data_dir)
    if not ids:
        raise FileNotFoundError(f"{data_dir} holds no HPA images (files named ID_red/_green/_blue/_yellow.png)")
    table = read_labels_csv(labels_csv)  # unknown class ids / bad header raise here, naming the line
    matched = set(table.ids) & set(ids)
    if not matched:
        raise ValueError(f"none of the {len(table.ids)} ids in {Path(labels_csv).name} matches an image in "
                         f"{data_dir} (e.g. {table.ids[0] if table.ids else '—'} vs {ids[0]})")
    return f"{len(matched)} labelled images of {len(ids)} in the folder"


#: The answers to "this folder already holds a run": what Train does then.
RUN_CHOICES = {
    "resume": "Resume it (its own saved settings; finished stages are kept)",
    "finetune": "Fine-tune from it (a new run in a new folder, starting from this run's models)",
    "new": "Train from scratch in a new folder (this run is left as it is)",
    "cancel": "Cancel (nothing is started, nothing is written)",
}


def existing_run_files(out_dir: str | Path) -> list[Path]:
    """The files that make ``out_dir`` a (started or finished) run: config, stage record, checkpoints."""
    run = Path(out_dir)
    if not run.is_dir():
        return []
    found = [run / n for n in ("config.json", "stages.json") if (run / n).is_file()]
    found += sorted(run.glob("*/*.pt"))
    return found


def checkpoints_of(out_dir: str | Path) -> list[Path]:
    """Every ``latest.pt`` / ``best.pt`` under the run folder (what a stopped run keeps)."""
    run = Path(out_dir)
    return sorted(p for p in run.glob("**/*.pt") if p.name in ("latest.pt", "best.pt")) if run.is_dir() else []


def free_folder(out_dir: str | Path, suffix: str = "") -> Path:
    """A sibling of ``out_dir`` that does not exist yet: ``RUN-2``, ``RUN-3``, ... (``RUN-finetune-2``...)."""
    run = Path(out_dir)
    stem = run.name + (f"-{suffix}" if suffix else "")
    for k in range(2, 10_000):
        cand = run.with_name(f"{stem}-{k}")
        if not cand.exists():
            return cand
    raise FileExistsError(f"no free folder name next to {run}; choose an output folder")


def ask_existing_run_dialog(parent: QWidget, run: Path, summary: str) -> str:
    """Ask what to do with the run already in ``run`` (a modal box); returns a :data:`RUN_CHOICES` key."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("This folder already holds a run")
    box.setText(f"{run} already holds a training run ({summary}).\n\nTraining into it would replace its "
                "models. What should Train do?")
    buttons = {}
    for key, title in (("resume", "Resume it"), ("finetune", "Fine-tune from it"),
                       ("new", "New folder"), ("cancel", "Cancel")):
        role = QMessageBox.ButtonRole.RejectRole if key == "cancel" else QMessageBox.ButtonRole.AcceptRole
        b = box.addButton(title, role)
        b.setToolTip(RUN_CHOICES[key])
        buttons[b] = key
    box.setDefaultButton(next(b for b, k in buttons.items() if k == "cancel"))
    box.exec()
    return buttons.get(box.clickedButton(), "cancel")


def _train_events(data_dir: str, labels_csv: str, out_dir: str, config, should_stop) -> Iterator[Event]:
    """Worker body."""
    from napari_cpgcn.pipeline import train_pipeline
    from napari_cpgcn.pipeline.model_card import write_training_data_record

    recorded = False
    for ev in train_pipeline(data_dir, labels_csv, out_dir, config, should_stop):
        if not recorded:  # the pipeline has checked the folder and saved config.json: the run is ours
            write_training_data_record(out_dir, data_dir, labels_csv)
            recorded = True
        yield ev


# --------------------------------------------------------------------------- the plot

class LossPlot(QWidget):
    """Batch loss (one line per stage, left axis) and validation mAP (dots, right axis 0-1).

    Painted with QPainter: a repaint costs about a millisecond, where a matplotlib canvas took
    0.2-0.5 s on a busy 2-core CPU and made the viewer stutter during training (measured by
    ``benchmarks/bench_gui_responsiveness.py``). Repaints are coalesced to at most 4 per second.
    """

    COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(160)
        self.clear()
        self._timer = QTimer(self)
        self._timer.setInterval(250)
        self._timer.timeout.connect(self._maybe_update)
        self._timer.start()

    def clear(self) -> None:
        self.loss: dict[str, list[tuple[int, float]]] = {}
        self.mAP: list[tuple[int, float]] = []
        self.step = 0
        self._dirty = True

    def add_loss(self, stage: str, loss: float) -> None:
        if loss != loss or loss in (float("inf"), float("-inf")):  # NaN / inf: nothing to draw
            return
        self.step += 1
        self.loss.setdefault(stage, []).append((self.step, float(loss)))
        self._dirty = True

    def add_map(self, value: float) -> None:
        self.mAP.append((self.step, float(value)))
        self._dirty = True

    def _maybe_update(self) -> None:
        if self._dirty:
            self._dirty = False
            self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        from qtpy.QtCore import QPointF, QRectF, Qt
        from qtpy.QtGui import QColor, QPainter, QPen

        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        fg = self.palette().color(self.foregroundRole())
        left, right, top, bottom = 44, 30, 8, 34
        plot = QRectF(left, top, max(w - left - right, 10), max(h - top - bottom, 10))
        p.setPen(QPen(fg, 1))
        p.drawRect(plot)
        values = [v for pts in self.loss.values() for _, v in pts]
        n = max(self.step, 1)
        ymax = max(values) if values else 1.0
        ymin = min(min(values), 0.0) if values else 0.0
        if ymax <= ymin:
            ymax = ymin + 1.0

        def to_xy(step: float, v: float, lo: float, hi: float) -> QPointF:
            x = plot.left() + plot.width() * (step - 1) / max(n - 1, 1)
            y = plot.bottom() - plot.height() * (v - lo) / (hi - lo)
            return QPointF(x, y)

        # axes labels
        p.drawText(QRectF(0, plot.top() - 4, left - 4, 14), Qt.AlignmentFlag.AlignRight, f"{ymax:.3g}")
        p.drawText(QRectF(0, plot.bottom() - 10, left - 4, 14), Qt.AlignmentFlag.AlignRight, f"{ymin:.3g}")
        p.drawText(QRectF(plot.right() + 4, plot.top() - 4, right, 14), Qt.AlignmentFlag.AlignLeft, "1.0")
        p.drawText(QRectF(plot.right() + 4, plot.bottom() - 10, right, 14), Qt.AlignmentFlag.AlignLeft, "0")
        p.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width(), 14), Qt.AlignmentFlag.AlignCenter,
                   f"batch (0-{self.step})   — loss (left)   ● val mAP (right)")
        # legend + lines
        x_leg = plot.left()
        for i, (stage, pts) in enumerate(self.loss.items()):
            color = QColor(self.COLORS[i % len(self.COLORS)])
            p.setPen(QPen(color, 1.5))
            if len(pts) > 1:
                p.drawPolyline([to_xy(s, v, ymin, ymax) for s, v in pts])
            elif pts:
                p.drawEllipse(to_xy(*pts[0], ymin, ymax), 2, 2)
            label = STAGE_TITLES.get(stage, stage)
            p.drawText(QRectF(x_leg, plot.bottom() + 17, 200, 14), Qt.AlignmentFlag.AlignLeft, label)
            x_leg += 8 + p.fontMetrics().horizontalAdvance(label)
        p.setPen(QPen(fg, 1))
        p.setBrush(fg)
        for s, v in self.mAP:
            p.drawEllipse(to_xy(s, min(max(v, 0.0), 1.0), 0.0, 1.0), 3, 3)
        p.end()


# --------------------------------------------------------------------------- the widget

class TrainWidget(QWidget):
    """Dock widget: train the pipeline on an annotated folder in a background worker."""

    #: Emitted with the run folder when training finished (not when stopped).
    trained = Signal(str)
    #: Emitted when the worker has ended, however it ended.
    worker_finished = Signal()

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        from napari_cpgcn.models.backbone import BACKBONES

        self.viewer = napari_viewer
        self._worker = None
        self._stop = threading.Event()
        self._stage: str | None = None
        self._t0 = 0.0
        self._out = ""  # the run folder of the running / last training
        #: Asked when Train's output folder already holds a run: ``(run, summary) -> choice``, one
        #: of :data:`RUN_CHOICES`. A modal box by default; tests put a function answering here.
        self.ask_existing_run: Callable[[Path, str], str] = (
            lambda run, summary: ask_existing_run_dialog(self, run, summary))
        settings = load_settings()

        self.data_edit = PathEdit("dir", "folder of training images")
        self.csv_edit = PathEdit("file", "labels CSV (ID,Label)", "CSV (*.csv)")
        self.out_edit = PathEdit("dir", "output (run) folder")
        self.start_edit = PathEdit("dir", "optional: a trained run or a pretraining folder to start from")
        self.start_edit.setToolTip("start both backbones from this run's refined image model and cell "
                                   "model, or from a `napari-cpgcn pretrain` folder's self-supervised "
                                   "backbone (same backbones); empty: ImageNet weights / random init. "
                                   "Resume continues the run's own checkpoints and ignores this field.")
        self.data_edit.setText(settings.get("train_data", ""))
        self.csv_edit.setText(settings.get("train_csv", ""))
        self.out_edit.setText(settings.get("train_out", ""))
        self.data_edit.edit.editingFinished.connect(self._guess_csv)
        self.preset = QComboBox()
        self.preset.addItems(list(PRESETS))
        self.preset.currentTextChanged.connect(self.apply_preset)
        self.backbone = QComboBox()
        self.backbone.addItems(list(BACKBONES))
        self.image_size = self._spin(32, 4096, 32)
        self.epochs = self._spin(1, 1000)
        self.batch_size = self._spin(1, 512)
        self.k = self._spin(1, 50)
        self.rounds = self._spin(0, 10)
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.apply_preset(self.preset.currentText())

        form = QFormLayout()
        form.addRow("Images", self.data_edit)
        form.addRow("Labels CSV", self.csv_edit)
        form.addRow("Output", self.out_edit)
        form.addRow("Start from", self.start_edit)
        form.addRow("Preset", self.preset)
        form.addRow("Backbone", self.backbone)
        form.addRow("Image size", self.image_size)
        form.addRow("Epochs / stage", self.epochs)
        form.addRow("Batch size", self.batch_size)
        form.addRow("K (sub-classes)", self.k)
        form.addRow("Rounds", self.rounds)
        form.addRow("Device", self.device)

        self.train_btn = QPushButton("Train")
        self.train_btn.clicked.connect(self.start)
        self.resume_btn = QPushButton("Resume")
        self.resume_btn.setToolTip("carry on the run in the output folder with its saved settings")
        self.resume_btn.clicked.connect(self.resume)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("stop within one batch; the latest checkpoint is kept")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        btns = QHBoxLayout()
        for b in (self.train_btn, self.resume_btn, self.cancel_btn):
            btns.addWidget(b)

        self.bars: dict[str, QProgressBar] = {}
        stages_box = QGroupBox("Stages")
        grid = QGridLayout(stages_box)
        for r, stage in enumerate(STAGES):
            bar = QProgressBar()
            bar.setRange(0, 100)
            bar.setValue(0)
            bar.setFormat("%p%")
            grid.addWidget(QLabel(STAGE_TITLES[stage]), r, 0)
            grid.addWidget(bar, r, 1)
            self.bars[stage] = bar
        self.plot = LossPlot()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(2000)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(btns)
        lay.addWidget(self.status)
        lay.addWidget(stages_box)
        lay.addWidget(self.plot)
        lay.addWidget(self.log, 1)

    @staticmethod
    def _spin(lo: int, hi: int, step: int = 1) -> QSpinBox:
        s = QSpinBox()
        s.setRange(lo, hi)
        s.setSingleStep(step)
        return s

    def apply_preset(self, name: str) -> None:
        p = preset_form(name)
        self.backbone.setCurrentText(p["backbone"])
        self.image_size.setValue(p["image_size"])
        self.epochs.setValue(p["epochs"])
        self.batch_size.setValue(p["batch_size"])
        self.k.setValue(p["k"])
        self.rounds.setValue(p["rounds"])

    def _guess_csv(self) -> None:
        if self.csv_edit.text() or not self.data_edit.text():
            return
        from napari_cpgcn._napari.layers import find_labels_csvs

        try:
            from napari_cpgcn.io.hpa import resolve_images_dir

            found = find_labels_csvs(resolve_images_dir(self.data_edit.text()))
        except OSError:
            return
        if found:
            self.csv_edit.setText(str(found[0]))

    # ------------------------------------------------------------------ start / stop

    def config(self):
        """The :class:`PipelineConfig` the form describes."""
        return build_config(self.backbone.currentText(), self.image_size.value(), self.epochs.value(),
                            self.batch_size.value(), self.k.value(), self.rounds.value(),
                            self.device.currentText(), preset=self.preset.currentText(),
                            start_from=self.start_edit.text())

    def _existing_run_choice(self, out: str) -> str | None:
        """When ``out`` holds a run, ask what to do and apply the answer to the form.

        Returns ``"resume"``, ``"train"`` (into the form's — possibly new — output folder) or
        None (cancelled: nothing started, nothing written; status and log say so).
        """
        found = existing_run_files(out)
        if not found:
            return "train"
        n_ckpt = sum(p.suffix == ".pt" for p in found)
        summary = f"{n_ckpt} checkpoint(s)" + (", config.json" if (Path(out) / "config.json").is_file() else "")
        choice = self.ask_existing_run(Path(out), summary)
        if choice == "resume":
            return "resume"
        if choice in ("new", "finetune"):
            target = free_folder(out, "finetune" if choice == "finetune" else "")
            if choice == "finetune":
                self.start_edit.setText(str(Path(out).resolve()))
            self.out_edit.setText(str(target))
            self._log(f"{out} holds a run; it is kept. "
                      + (f"fine-tuning from it into {target}" if choice == "finetune" else f"training into {target}"))
            return "train"
        msg = f"not started: {out} holds a run ({summary}); it is kept unchanged"
        self.status.setText(msg)
        self._log(msg)
        return None

    def start(self, resume: bool = False) -> None:
        """Check the inputs, then train in a worker (``resume``: with the run's saved config).

        Without ``resume``, an output folder that already holds a run is never trained over:
        :attr:`ask_existing_run` decides (resume / fine-tune from it / new folder / cancel).
        """
        if self._worker is not None:
            return
        data, csv, out = self.data_edit.text(), self.csv_edit.text(), self.out_edit.text()
        try:
            summary = check_training_inputs(data, csv, out)
            if not resume:
                choice = self._existing_run_choice(out)
                if choice is None:
                    return
                resume = choice == "resume"
                out = self.out_edit.text()
            if resume:
                if not (Path(out) / "config.json").is_file():
                    raise FileNotFoundError(f"{out} holds no run to resume (no config.json); press Train")
                from napari_cpgcn.pipeline import PipelineConfig

                config = PipelineConfig.load(Path(out) / "config.json").with_device(self.device.currentText())
            else:
                config = self.config()
        except Exception as e:
            notify_error(error_text(e), e)
            self.status.setText(f"not started: {error_text(e)}")
            return
        prepare_torch()
        update_settings(train_data=data, train_csv=csv, train_out=out)
        self._stop.clear()
        for bar in self.bars.values():
            bar.setValue(0)
        if not resume:  # a resumed run carries on its plot
            self.plot.clear()
        self._out = out
        self._t0 = time.perf_counter()
        self.train_btn.setEnabled(False)
        self.resume_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self._log(f"{'resuming' if resume else 'training'} {out}: {summary}")
        self.status.setText("training …")
        self._worker = start_worker(
            _train_events, data, csv, out, config, self._stop.is_set,
            on_yield=self.on_event,
            on_error=self._failed,
            on_finish=self._finished,
        )

    def resume(self) -> None:
        self.start(resume=True)

    def cancel(self) -> None:
        """Ask the trainer to stop after the current batch."""
        self._stop.set()
        self.cancel_btn.setEnabled(False)
        self.status.setText("stopping after the current batch …")

    def _failed(self, exc: BaseException) -> None:
        self.status.setText(f"training failed: {error_text(exc)} (finished stages and checkpoints are kept; "
                            "fix the cause and press Resume)")
        self._log(f"ERROR: {error_text(exc)}")
        notify_error(f"training failed: {error_text(exc)}", exc)

    def _finished(self) -> None:
        self._worker = None
        self.train_btn.setEnabled(True)
        self.resume_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self.worker_finished.emit()

    # ------------------------------------------------------------------ events (GUI thread)

    def _log(self, text: str) -> None:
        self.log.appendPlainText(f"[{time.strftime('%H:%M:%S')}] {text}")

    def on_event(self, ev: Event) -> None:
        """Update bars, plot and log from one pipeline event (cheap: runs on the GUI thread)."""
        stage = ev.stage if ev.stage in self.bars else self._stage
        bar = self.bars.get(stage) if stage else None
        kind = ev.kind
        if kind == EventKind.STAGE_START:
            self._stage = ev.stage
            if bar is not None:
                bar.setValue(0)
            self._log(ev.message or f"{ev.stage} started")
        elif kind == EventKind.STAGE_END:
            if bar is not None:
                bar.setValue(100)
            self._log(f"{ev.stage}: {ev.message}")
        elif kind == EventKind.BATCH:
            if ev.loss is not None:
                self.plot.add_loss(stage or "", ev.loss)
            if bar is not None and ev.n_epochs and ev.n_batches:
                frac = ((ev.epoch - 1) + ev.batch / ev.n_batches) / ev.n_epochs
                bar.setValue(int(100 * min(max(frac, 0.0), 1.0)))
        elif kind == EventKind.EPOCH_END:
            m = ev.metrics or {}
            if "val_mAP" in m and m["val_mAP"] == m["val_mAP"]:  # skip NaN (no positives in val)
                self.plot.add_map(m["val_mAP"])
            if bar is not None and ev.n_epochs:
                bar.setValue(int(100 * ev.epoch / ev.n_epochs))
            parts = [f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float) and k != "seconds"]
            self._log(f"{stage} epoch {ev.epoch}/{ev.n_epochs}: " + ", ".join(parts))
        elif kind == EventKind.ITEM:
            if bar is not None and ev.n_batches:
                bar.setValue(int(100 * ev.batch / ev.n_batches))
        elif kind == EventKind.LOG:
            if ev.message:
                self._log(f"{stage}: {ev.message}" if stage else ev.message)
        elif kind == EventKind.STOPPED:
            run = Path(self._out or self.out_edit.text())
            kept = checkpoints_of(run)
            what = (f"{len(kept)} checkpoint(s) kept ({', '.join(str(p.relative_to(run)) for p in kept[:4])}"
                    f"{' ...' if len(kept) > 4 else ''})" if kept else "no checkpoint was written yet")
            text = f"stopped ({ev.message or 'on request'}); {what}. Press Resume to carry on."
            self._log(text)
            self.status.setText(text)
            notify_info("training stopped; press Resume to carry on")
        elif kind == EventKind.DONE:
            run = str(ev.result or self.out_edit.text())
            minutes = (time.perf_counter() - self._t0) / 60
            self._log(f"done in {minutes:.1f} min: {run}")
            self.status.setText(f"trained: {run} (now selectable in Predict)")
            RUNS.add(run)
            notify_info(f"training finished: {run}")
            self.trained.emit(run)
