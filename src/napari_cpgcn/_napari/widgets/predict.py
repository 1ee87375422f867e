"""Predict: run a trained CP-GCN pipeline on the image in the viewer.

The worker loads the model (cached per run and device), segments the image unless a ``cells``
layer is there, runs the image and cell models and builds every layer tuple; the GUI thread
then swaps the results in at once (old CAM layers out, new ones in, the ``cells`` layer's data
and features replaced). A failure, a cancel or a changed image leaves the viewer as it was.

The worker body is a generator (:func:`run_prediction`) that yields a status line before each
stage, so Cancel (``GeneratorWorker.quit()``) stops it at the next stage boundary.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_cpgcn._napari.layers import (
    CELL_CONTOUR,
    EDITED_COLUMN,
    LayerDataTuple,
    cam_layers,
    cells_layer,
    paint_atom_ids,
    roles,
    sync_features_to_mask,
    top_class_color_dict,
)
from napari_cpgcn.classes import CLASSES

from .common import (
    RUNS,
    batched,
    cells_layer_of,
    channel_layers_of,
    current_image,
    error_text,
    install_single_image,
    load_settings,
    notify_error,
    notify_info,
    prepare_torch,
    remove_layers,
    start_worker,
    update_settings,
)
from .table import CellTableWidget

log = logging.getLogger(__name__)

__all__ = ["PredictWidget", "PredictResult", "run_prediction"]

DEVICES = ("auto", "cpu", "cuda", "mps")
#: CAM layers are kept at most this large (shown with ``scale`` over the image): a CAM is a
#: model's coarse feature grid upsampled, and full-resolution float layers of a 2048² image made
#: adding, colouring and removing them stall the viewer for seconds.
CAM_MAX_SIDE = 512
#: (label, predictor ``segmentation`` argument); None = the viewer's ``cells`` layer, else the
#: method the run was trained with (a cellpose-trained run is not predicted on classical cells).
SEGMENTATIONS = (("'cells' layer if present, else as the run was trained", None),
                 ("classical (no weights)", "classical"),
                 ("cellpose", "cellpose"))


@dataclass
class PredictResult:
    """What the worker hands the GUI thread."""

    image_id: str
    image_probs: np.ndarray
    cams: list[LayerDataTuple]
    cells: LayerDataTuple
    table: Any  # pandas DataFrame
    #: The run folder that made it.
    run: str = ""
    #: ``metadata["mask_version"]`` of the ``cells`` layer the results were put into (each edit
    #: of the layer adds one): results whose version differs from the layer's are stale.
    mask_version: int = 0
    #: Single-cell variation per predicted class (:mod:`napari_cpgcn.profiles.variation`).
    variation: Any = None


def run_prediction(
    model: str,
    device: str,
    image,
    cells: np.ndarray | None,
    segmentation: str | None,
    cam_threshold: float = 0.3,
    n_visible: int = 3,
) -> Generator[str, None, PredictResult]:
    """Worker body (no Qt): predict one image and build its layer tuples.

    A generator: yields a status line before each stage (model load, segmentation, image
    model, cell model, table, layers) and returns the :class:`PredictResult`. Stopping the
    iteration between two lines stops the prediction there. A predictor without
    ``iter_predict`` (anything with the :class:`~napari_cpgcn.pipeline.Predictor` contract)
    runs as one stage. ``segmentation=None`` segments as the run was trained.
    """
    from napari_cpgcn.pipeline import predictor as prediction
    from napari_cpgcn.profiles.variation import variation_of_prediction

    yield "loading the model"
    predictor = prediction.load_predictor(model, device)
    pred = yield from prediction.iter_predict(predictor, image, cells, segmentation, with_cams=True)
    yield "building layers"
    cams = [] if pred.cams is None else cam_layers(
        pred.cams, pred.image_probs, image_id=image.image_id, threshold=cam_threshold, n_visible=n_visible,
        max_side=CAM_MAX_SIDE)
    return PredictResult(
        run=str(model),
        image_id=image.image_id,
        image_probs=np.asarray(pred.image_probs),
        cams=cams,
        cells=cells_layer(np.asarray(pred.cells), pred.table, image_id=image.image_id),
        table=pred.table,
        variation=variation_of_prediction(pred),
    )


class PredictWidget(QWidget):
    """Dock widget: choose a trained run and device, predict the current image."""

    #: Emitted (image id) once the results are in the viewer.
    predicted = Signal(str)
    #: Emitted (image id) when a cancelled prediction has stopped (the viewer is unchanged).
    cancelled = Signal(str)

    _instances: weakref.WeakSet = weakref.WeakSet()

    @classmethod
    def instances(cls) -> list[PredictWidget]:
        """The Predict widgets alive (Export asks them whether their results are stale)."""
        return list(cls._instances)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        PredictWidget._instances.add(self)
        self.viewer = napari_viewer
        self.result: PredictResult | None = None
        self.card = None  # the chosen run's ModelCard
        self._worker = None
        self._image_id = ""  # of the running prediction
        self._cancelling = False
        self._error = False

        self.run_combo = QComboBox()
        self.run_combo.setEditable(True)
        self.run_combo.setToolTip("a trained run folder (napari-cpgcn train / the Train widget)")
        self.run_combo.lineEdit().setPlaceholderText("trained run folder")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_run)
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_combo, 1)
        run_row.addWidget(browse)
        self.card_label = QLabel("")
        self.card_label.setWordWrap(True)
        self.card_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.run_combo.currentTextChanged.connect(self.show_model_card)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.seg_combo = QComboBox()
        self.seg_combo.addItems([label for label, _ in SEGMENTATIONS])
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.3)
        self.threshold.setToolTip("classes with an image-level probability above this get a CAM layer")
        self.n_visible = QSpinBox()
        self.n_visible.setRange(0, 19)
        self.n_visible.setValue(1)  # the readable default: the top class's map only
        self.n_visible.setToolTip("CAM layers of the most probable classes shown; the others are added hidden")
        self.color_by_class = QCheckBox("colour cells by top class")
        self.color_by_class.toggled.connect(self._apply_colors)
        self.predict_btn = QPushButton("Predict")
        self.predict_btn.clicked.connect(self.predict)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("stop the prediction when the current stage ends (model load, "
                                   "segmentation, image model, cell model); the viewer stays unchanged")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.predict_btn, 1)
        buttons.addWidget(self.cancel_btn)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.probs_label = QLabel("")
        self.probs_label.setWordWrap(True)
        self.stale_label = QLabel("")
        self.stale_label.setWordWrap(True)
        self.stale_label.setStyleSheet("color: #ff8c69; font-weight: bold;")
        self.stale_label.setVisible(False)
        #: Why the shown results no longer describe the viewer (empty: they do).
        self.stale_reasons: list[str] = []
        self._watched_cells = None
        self._touched: set[int] = set()  # label ids painted since the last rows update
        self._applying = False
        self.variation_label = QLabel("")
        self.variation_label.setWordWrap(True)
        self.variation_label.setToolTip(
            "single-cell variation per predicted class: share of the cells expressing it (fused score "
            "above 0.5) and the CV of their mean green intensity; 'variable' after the HPA's definition")
        self.table = CellTableWidget(napari_viewer)

        form = QFormLayout()
        form.addRow("Run", run_row)
        form.addRow(self.card_label)
        form.addRow("Device", self.device_combo)
        form.addRow("Cells", self.seg_combo)
        form.addRow("CAM threshold", self.threshold)
        form.addRow("CAMs shown", self.n_visible)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.color_by_class)
        lay.addLayout(buttons)
        lay.addWidget(self.status)
        lay.addWidget(self.probs_label)
        lay.addWidget(self.stale_label)
        lay.addWidget(self.variation_label)
        lay.addWidget(self.table, 1)

        settings = load_settings()
        for run in RUNS.runs():
            self.run_combo.addItem(run)
        last = settings.get("last_run")
        if last:
            self.set_run(last)
        if settings.get("device") in DEVICES:
            self.device_combo.setCurrentText(settings["device"])
        RUNS.run_added.connect(self.add_run)
        install_single_image(napari_viewer)
        napari_viewer.layers.events.inserted.connect(self._layer_inserted)
        napari_viewer.layers.events.removed.connect(self._schedule_check)
        for ly in roles(napari_viewer.layers, "channel"):
            self._watch_channel(ly)

    # ------------------------------------------------------------------ run choice

    def set_run(self, run: str) -> None:
        """Make ``run`` the chosen run (adds it to the list)."""
        if self.run_combo.findText(run) < 0:
            self.run_combo.insertItem(0, run)
        self.run_combo.setCurrentText(run)

    def show_model_card(self, run: str = "") -> None:
        """Show what the chosen run is (folder, data, backbone, start, validation mAP) and its warnings."""
        from html import escape

        run = (run or self.run_combo.currentText()).strip()
        self.card = None
        if not run:
            self.card_label.setText("")
            return
        from napari_cpgcn.pipeline.model_card import model_card

        try:
            self.card = card = model_card(run)
        except (OSError, ValueError) as e:
            self.card_label.setText(f"<i>{escape(error_text(e))}</i>")
            return
        lines = [escape(x) for x in card.text().splitlines() if not x.startswith("WARNING")]
        warn = "".join(f'<br><span style="color:#ff8c69"><b>⚠ {escape(w)}</b></span>' for w in card.warnings)
        self.card_label.setText("<small>" + "<br>".join(lines[1:]) + "</small>" + warn)
        self.card_label.setToolTip(card.text())

    def add_run(self, run: str) -> None:
        """A run finished training: list it, but keep the user's chosen run (chosen only when none is)."""
        if self.run_combo.findText(run) < 0:
            self.run_combo.addItem(run)
        if not self.run_combo.currentText().strip():
            self.run_combo.setCurrentText(run)

    def _browse_run(self) -> None:
        start = self.run_combo.currentText() or str(Path.home())
        path = QFileDialog.getExistingDirectory(self, "Choose a trained run folder", start)
        if path:
            self.set_run(path)

    # ------------------------------------------------------------------ predict

    def predict(self) -> None:
        """Start a prediction of the current image (inputs are checked first)."""
        if self._worker is not None:
            return
        run = self.run_combo.currentText().strip()
        image = current_image(self.viewer)
        try:
            if image is None:
                raise ValueError("no HPA image in the viewer: open one (File > Open, or the HPA browser) first")
            if not run:
                raise ValueError("choose a trained run folder first (Train widget or `napari-cpgcn train`)")
            from napari_cpgcn.pipeline.predictor import resolve_model_path

            run = str(resolve_model_path(run))
        except Exception as e:
            notify_error(error_text(e), e)
            return
        seg = SEGMENTATIONS[self.seg_combo.currentIndex()][1]
        cells = None
        if seg is None:
            layer = cells_layer_of(self.viewer, image.image_id)
            if layer is not None and tuple(layer.data.shape) == image.shape:
                cells = np.asarray(layer.data)
        device = self.device_combo.currentText()
        prepare_torch()
        update_settings(last_run=run, device=device)
        self.predict_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self._image_id, self._cancelling, self._error = image.image_id, False, False
        self.status.setText(f"predicting {image.image_id} with {Path(run).name} on {device} …")
        self._worker = start_worker(
            run_prediction, run, device, image, cells, seg,
            float(self.threshold.value()), int(self.n_visible.value()),
            on_yield=self._progress,
            on_return=self._apply,
            on_error=self._failed,
            on_finish=self._finished,
        )

    def cancel(self) -> None:
        """Stop the running prediction when its current stage ends; the viewer stays unchanged."""
        if self._worker is None or self._cancelling:
            return
        self._cancelling = True
        self._worker.quit()  # the worker stops at its next yield, i.e. the next stage boundary
        self.cancel_btn.setEnabled(False)
        self.status.setText(f"cancelling {self._image_id} after the current stage …")

    def _progress(self, message: str) -> None:
        if not self._cancelling:
            self.status.setText(f"{self._image_id}: {message} …")

    def _failed(self, exc: BaseException) -> None:
        self._error = True
        self.status.setText("prediction failed; the viewer is unchanged")
        notify_error(f"prediction failed: {error_text(exc)}", exc)

    def _finished(self) -> None:
        self._worker = None
        self.predict_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        if self._cancelling:
            self._cancelling = False
            if not self._error:
                self.status.setText("prediction cancelled; the viewer is unchanged")
                self.cancelled.emit(self._image_id)

    def _apply(self, res: PredictResult) -> None:
        """Put a prediction into the viewer in one go (GUI thread)."""
        from napari.layers import Layer

        if self._cancelling:  # Cancel came after the worker's last stage: drop the result
            return
        image = current_image(self.viewer)
        if image is None or image.image_id != res.image_id:
            notify_info(f"the image changed during prediction; results for {res.image_id} were not shown")
            self.status.setText("")
            return
        try:  # build every layer before touching the viewer: a failure here changes nothing
            new_cams = [Layer.create(d, kw, t) for d, kw, t in res.cams]
            cells_data, cells_kw, _ = res.cells
            cells_new = Layer.create(cells_data, cells_kw, "labels")
        except Exception as e:
            self._failed(e)
            return
        self._applying = True  # our own layer changes are not user edits
        try:
            cells = self._put_layers(res, new_cams, cells_new, cells_data, cells_kw)
        finally:
            self._applying = False
        self.viewer.layers.move(self.viewer.layers.index(cells), len(self.viewer.layers))
        res.mask_version = int(cells.metadata.get("mask_version", 0))
        cells.metadata["edits"] = []  # edits are counted from this prediction on
        cells.metadata["run"] = res.run
        self.result = res
        self.viewer.layers.selection.active = cells  # hovering then shows the cell's classes
        self.table.set_layer(cells)
        self._watch_cells(cells)
        self._apply_colors()
        self._show_probs(res)
        self._show_variation(res)
        self.status.setText(f"{res.image_id}: {len(res.table)} cells, {len(res.cams)} CAM layers")
        self.check_stale()
        self.predicted.emit(res.image_id)

    def _put_layers(self, res: PredictResult, new_cams: list, cells_new, cells_data, cells_kw):
        with batched(self.viewer):  # one scene-graph update for the whole swap
            return self._swap_layers(res, new_cams, cells_new, cells_data, cells_kw)

    def _swap_layers(self, res: PredictResult, new_cams: list, cells_new, cells_data, cells_kw):
        remove_layers(self.viewer, roles(self.viewer.layers, "cam"))
        for layer in new_cams:
            self.viewer.add_layer(layer)
        cells = cells_layer_of(self.viewer, res.image_id)
        if cells is None:
            cells = self.viewer.add_layer(cells_new)
        else:
            if cells.data.shape != cells_data.shape or not np.array_equal(cells.data, cells_data):
                cells.data = cells_data
            cells.features = cells_new.features
            cells.metadata = {**cells.metadata, **cells_kw["metadata"]}
        cells.contour = CELL_CONTOUR
        cells.opacity = cells_kw.get("opacity", cells.opacity)
        return cells

    # ------------------------------------------------------------------ stale results

    def _layer_inserted(self, event) -> None:
        layer = event.value
        if getattr(layer, "metadata", {}).get("hpa_role") == "channel":
            self._watch_channel(layer)
        self._schedule_check()

    def _watch_channel(self, layer) -> None:
        # the browser swaps a channel layer's data, then its metadata and name: check after both
        layer.events.data.connect(self._schedule_check)
        layer.events.name.connect(self._schedule_check)

    def _schedule_check(self, *_: Any) -> None:
        QTimer.singleShot(0, self.check_stale)

    def _watch_cells(self, cells) -> None:
        old = self._watched_cells
        if old is cells:
            return
        if old is not None:
            for emitter, cb in ((old.events.paint, self._cells_painted), (old.events.data, self._cells_replaced)):
                try:
                    emitter.disconnect(cb)
                except Exception:  # noqa: BLE001 - already disconnected
                    pass
        self._watched_cells = cells
        cells.events.paint.connect(self._cells_painted)
        cells.events.data.connect(self._cells_replaced)

    def _cells_painted(self, event) -> None:
        """A paint / fill / erase in the ``cells`` layer: update the touched cells' rows, mark them.

        napari emits ``paint`` before a masked edit reaches the data, so the rows are updated
        once the event loop is back (edits in between are gathered into one update).
        """
        first = not self._touched
        self._touched |= paint_atom_ids(getattr(event, "value", None) or [])
        if first:
            QTimer.singleShot(0, self._flush_paint)

    def _flush_paint(self) -> None:
        touched, self._touched = self._touched, set()
        if touched:
            self._cells_edited(touched)

    def _cells_replaced(self, event=None) -> None:
        if not self._applying:
            self._cells_edited(None)

    def _cells_edited(self, touched) -> None:
        cells = self._watched_cells
        if cells is None or self._applying or "index" not in cells.features:
            return
        feats, removed, added = sync_features_to_mask(cells.features, np.asarray(cells.data), touched)
        cells.metadata["mask_version"] = int(cells.metadata.get("mask_version", 0)) + 1
        cells.metadata["edits"] = cells.metadata.get("edits", []) + [{"removed": removed, "added": added}]
        cells.features = feats
        self.check_stale()

    def check_stale(self) -> list[str]:
        """Compare the shown results with the viewer (image id, ``cells`` mask version); show why they are stale."""
        res = self.result
        reasons: list[str] = []
        if res is not None:
            ids = {ly.metadata.get("image_id") for ly in channel_layers_of(self.viewer).values()}
            shown = ids.pop() if len(ids) == 1 else None
            if shown != res.image_id:
                reasons.append(f"they are for {res.image_id}, the viewer shows {shown or 'no single image'}")
            cells = self.table.layer
            if cells is None or cells not in self.viewer.layers:
                reasons.append("their cells layer was removed")
            elif int(cells.metadata.get("mask_version", 0)) != res.mask_version:
                feats = cells.features
                n = int(feats[EDITED_COLUMN].sum()) if EDITED_COLUMN in feats else 0
                gone = sum(len(e["removed"]) for e in cells.metadata.get("edits", []))
                reasons.append(f"the cells were edited ({n} cells changed or new, {gone} removed; "
                               f"rows marked '{EDITED_COLUMN}')")
        self.stale_reasons = reasons
        if reasons:
            text = "Results are stale: " + "; ".join(reasons) + ". Press Re-predict."
            self.stale_label.setText(text)
            self.predict_btn.setText("Re-predict")
            self.table.set_stale("These rows are stale (" + reasons[0].split(" (")[0] + "): press Re-predict.")
        else:
            self.stale_label.setText("")
            self.predict_btn.setText("Predict")
            self.table.set_stale("")
        self.stale_label.setVisible(bool(reasons))
        return reasons

    def _show_probs(self, res: PredictResult) -> None:
        order = np.argsort(-res.image_probs, kind="stable")[:5]
        parts = [f'<span style="color:{CLASSES[k].color}">■</span> {CLASSES[k].name} {res.image_probs[k]:.2f}'
                 for k in order if res.image_probs[k] >= 0.05 or k == order[0]]
        self.probs_label.setText(f"<b>Image {res.image_id}:</b> " + ", ".join(parts)
                                 + "<br><small>CAMs (brightness = map × class probability, one scale for all): "
                                 + ", ".join(f'<span style="color:{kw["colormap"]}">■</span> '
                                             f'{kw["metadata"]["class_name"]} {kw["metadata"]["probability"]:.2f}'
                                             + ("" if kw["visible"] else " (hidden)") for _, kw, _ in res.cams)
                                 + "<br>table p = fused (image × cell) probability of the top class</small>")

    def _show_variation(self, res: PredictResult) -> None:
        self.variation_label.setText(variation_text(res.variation))

    def _apply_colors(self, *_: Any) -> None:
        cells = self.table.layer
        if cells is None or self.result is None:
            return
        if self.color_by_class.isChecked():
            cells.colormap = top_class_color_dict(self.result.table)
        else:
            from napari.utils.colormaps import label_colormap

            cells.colormap = label_colormap(max(int(np.max(cells.data)) + 1, 50), seed=0.5)


def variation_text(variation) -> str:
    """The Predict widget's variation line: one entry per predicted class (HTML, no Qt)."""
    if variation is None or len(variation) == 0:
        return ""
    parts = []
    for _, r in variation.iterrows():
        cv = "" if not np.isfinite(r["intensity_cv"]) else f", CV {r['intensity_cv']:.2f}"
        flag = " <b>variable</b>" if r["variable"] else ""
        parts.append(f"{r['class']} {int(r['n_expressing'])}/{int(r['n_cells'])} cells "
                     f"({r['share_expressing']:.0%}){cv}{flag}")
    return "<b>Variation:</b> " + "; ".join(parts)
