"""Review dock widget: walk through the cells most worth checking, tick their classes, confirm.

Thin over the core: :mod:`napari_cpgcn.review.suggest` (the list),
:mod:`napari_cpgcn.review.corrections` (``PRED_DIR/corrections.csv``, saved at once on every
confirmation, undo) and :mod:`napari_cpgcn.review.finetune` (in a thread worker). It works on
the viewer's ``cells`` Labels layer (its ``features`` hold the per-cell table) and a
prediction folder PRED_DIR; when PRED_DIR has no mask for the shown image yet, the layer's
mask is written to ``PRED_DIR/masks/{image_id}.tif`` before the first correction, so every
correction names a cell of a mask on disk.

Keys (on the ``cells`` layer): ``1``-``5`` toggle the five most common classes of the table,
``a`` accept the prediction, ``Enter`` confirm the ticks, ``n`` / ``b`` next / previous cell,
``u`` undo.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_cpgcn._napari.widgets.common import (
    PathEdit,
    error_text,
    notify_error,
    notify_info,
    relink_cells_layer,
    start_worker,
)
from napari_cpgcn.classes import CLASSES, N_CLASSES, NEGATIVE, SHORT_NAMES

log = logging.getLogger(__name__)

__all__ = ["ReviewWidget", "CORRECTED_LAYER"]

CORRECTED_LAYER = "corrected cells"
_UNC_CMAP = "magma"


class ReviewWidget(QWidget):
    """Correct per-cell labels on the ``cells`` layer; corrections go to PRED_DIR/corrections.csv."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.store = None
        self.layer = None
        self.suggestions: list[tuple[str, int]] = []
        self.position = -1
        self.cell_id: int | None = None
        self.worker = None
        self._hotkeys: list[int] = []

        self.pred_dir = PathEdit("dir", "prediction folder (napari-cpgcn predict --out)")
        self.pred_dir.edit.editingFinished.connect(self.open_pred_dir)
        self.strategy = QLabel("uncertainty")
        self.n_suggest = QSpinBox()
        self.n_suggest.setRange(1, 10000)
        self.n_suggest.setValue(50)
        self.info = QLabel("select a cell in the 'cells' layer")
        self.info.setWordWrap(True)
        self.position_label = QLabel("")

        self.boxes: list[QCheckBox] = []
        grid = QGridLayout()
        for k, c in enumerate(CLASSES):
            box = QCheckBox(c.short)
            box.setToolTip(f"{k}: {c.name}")
            box.setStyleSheet(f"QCheckBox {{ color: {c.color}; }}")
            box.toggled.connect(lambda on, k=k: self._exclusive(k, on))
            self.boxes.append(box)
            grid.addWidget(box, k // 3, k % 3)

        self.accept_button = QPushButton("Accept prediction (a)")
        self.confirm_button = QPushButton("Confirm ticks (Enter)")
        self.undo_button = QPushButton("Undo (u)")
        self.prev_button = QPushButton("◀ Previous (b)")
        self.next_button = QPushButton("Next (n) ▶")
        self.color_unc = QCheckBox("colour cells by uncertainty")
        self.accept_button.clicked.connect(self.accept_prediction)
        self.confirm_button.clicked.connect(self.confirm)
        self.undo_button.clicked.connect(self.undo)
        self.prev_button.clicked.connect(lambda: self.step(-1))
        self.next_button.clicked.connect(lambda: self.step(1))
        self.color_unc.toggled.connect(self._apply_colors)

        self.run_dir = PathEdit("dir", "run to fine-tune (napari-cpgcn train --out)")
        self.out_dir = PathEdit("dir", "new run folder (RUN2)")
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 100)
        self.epochs.setValue(3)
        self.finetune_button = QPushButton("Fine-tune on corrections")
        self.finetune_button.clicked.connect(self.start_finetune)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("PRED_DIR", self.pred_dir)
        form.addRow("cells to check", self.n_suggest)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        nav = QHBoxLayout()
        nav.addWidget(self.prev_button)
        nav.addWidget(self.position_label)
        nav.addWidget(self.next_button)
        lay.addLayout(nav)
        lay.addWidget(self.info)
        lay.addLayout(grid)
        row = QHBoxLayout()
        row.addWidget(self.accept_button)
        row.addWidget(self.confirm_button)
        row.addWidget(self.undo_button)
        lay.addLayout(row)
        lay.addWidget(self.color_unc)
        ft = QFormLayout()
        ft.addRow("RUN", self.run_dir)
        ft.addRow("RUN2", self.out_dir)
        ft.addRow("epochs", self.epochs)
        lay.addLayout(ft)
        lay.addWidget(self.finetune_button)
        lay.addWidget(self.status)
        lay.addStretch(1)

        self.viewer.layers.events.inserted.connect(self._bind_layer)
        self.viewer.layers.events.removed.connect(self._bind_layer)
        self._bind_layer()

    # ------------------------------------------------------------------ state

    @property
    def image_id(self) -> str | None:
        if self.layer is None:
            return None
        iid = self.layer.metadata.get("image_id")
        if iid:
            return str(iid)
        feats = self.layer.features
        return str(feats["image_id"].iloc[0]) if "image_id" in feats and len(feats) else None

    def _bind_layer(self, event=None) -> None:
        layer, changed = relink_cells_layer(self.viewer, self.layer, self._label_selected)
        if not changed:
            return
        self.layer = layer
        if layer is not None:
            self._bind_keys(layer)
            self._refresh_suggestions()
            self._draw_corrected()

    def _bind_keys(self, layer) -> None:
        feats = layer.features
        if "top_class" in feats and len(feats):
            common = [SHORT_NAMES.index(s) for s in feats["top_class"].astype(str).value_counts().index
                      if s in SHORT_NAMES]
        else:
            common = []
        common += [k for k in range(N_CLASSES) if k not in common]
        self._hotkeys = common[:5]
        for i, k in enumerate(self._hotkeys, start=1):
            self.boxes[k].setText(f"{SHORT_NAMES[k]} ({i})")
            layer.bind_key(str(i), lambda _ly, k=k: self.boxes[k].toggle(), overwrite=True)
        layer.bind_key("a", lambda _ly: self.accept_prediction(), overwrite=True)
        layer.bind_key("Enter", lambda _ly: self.confirm(), overwrite=True)
        layer.bind_key("n", lambda _ly: self.step(1), overwrite=True)
        layer.bind_key("b", lambda _ly: self.step(-1), overwrite=True)
        layer.bind_key("u", lambda _ly: self.undo(), overwrite=True)

    def open_pred_dir(self, path: str | Path | None = None) -> bool:
        """Use ``path`` (or the edit's text) as PRED_DIR: load its corrections. False on error."""
        from napari_cpgcn.review.corrections import CorrectionStore

        text = str(path) if path is not None else self.pred_dir.text()
        if path is not None:
            self.pred_dir.setText(text)
        if not text:
            return False
        folder = Path(text)
        try:
            (folder / "masks").mkdir(parents=True, exist_ok=True) if folder.is_dir() else None
            self.store = CorrectionStore(folder)
        except (OSError, ValueError) as e:
            self.store = None
            notify_error(error_text(e), e)
            return False
        self._refresh_suggestions()
        self._draw_corrected()
        self._set_status(f"{len(self.store)} corrected cells in {self.store.path}")
        return True

    def _refresh_suggestions(self) -> None:
        """The walk-through list: PRED_DIR/suggestions.csv of this image, else the layer's cells
        ranked by uncertainty (corrected cells left out)."""
        from napari_cpgcn._napari.layers import table_from_features
        from napari_cpgcn.review.suggest import read_suggestions, suggest_cells

        iid = self.image_id
        if self.layer is None or iid is None:
            self.suggestions = []
            return
        picked: list[tuple[str, int]] = []
        f = Path(self.pred_dir.text()) / "suggestions.csv" if self.pred_dir.text() else None
        if f is not None and f.is_file():
            try:
                s = read_suggestions(f)
                picked = [(i, int(c)) for i, c in zip(s.image_id, s.cell_id, strict=True) if i == iid]
            except (OSError, ValueError) as e:
                notify_error(error_text(e), e)
        if not picked and len(self.layer.features) and "fused_nucleoplasm" in self.layer.features:
            table = table_from_features(self.layer.features, iid)
            done = set(self.store.current()) if self.store is not None else set()
            s = suggest_cells(table, int(self.n_suggest.value()), "uncertainty", exclude=done)
            picked = [(i, int(c)) for i, c in zip(s.image_id, s.cell_id, strict=True)]
        self.suggestions = picked
        self.position = -1
        self._update_position()

    def _update_position(self) -> None:
        n = len(self.suggestions)
        self.position_label.setText(f"{self.position + 1} / {n}" if n else "no list")

    # ------------------------------------------------------------------ selection

    def _label_selected(self, event=None) -> None:
        if self.layer is None:
            return
        cid = int(self.layer.selected_label)
        ids = set(self.layer.features["index"].astype(int)) if "index" in self.layer.features else set()
        if cid <= 0 or (ids and cid not in ids):
            return
        self.show_cell(cid)

    def show_cell(self, cell_id: int, centre: bool = False) -> None:
        """Make ``cell_id`` the cell under review: ticks from its correction or its prediction."""
        self.cell_id = int(cell_id)
        feats = self.layer.features
        row = feats.loc[feats["index"].astype(int) == self.cell_id] if "index" in feats else feats.iloc[:0]
        corrected = self.store.for_image(self.image_id).get(self.cell_id) if self.store and self.image_id else None
        if corrected is not None:
            ticks = set(corrected.labels)
        else:
            ticks = set(self._predicted_labels(row))
        self._set_ticks(ticks)
        unc = float(row["uncertainty"].iloc[0]) if len(row) and "uncertainty" in row else float("nan")
        summary = str(row["classes"].iloc[0]) if len(row) and "classes" in row else ""
        state = f"<b>corrected</b>: {corrected.short_names}" if corrected else "not corrected yet"
        self.info.setText(f"cell <b>{self.cell_id}</b> of {self.image_id}: {summary}; "
                          f"uncertainty {unc:.2f}; {state}")
        if self.layer.selected_label != self.cell_id:
            self.layer.selected_label = self.cell_id
        if centre and len(row) and "centroid_y" in row:
            self._centre_on(row)

    @staticmethod
    def _predicted_labels(row) -> list[int]:
        if not len(row):
            return []
        p = np.array([float(row[f"fused_{s}"].iloc[0]) if f"fused_{s}" in row else 0.0 for s in SHORT_NAMES])
        on = [int(k) for k in np.flatnonzero(p >= 0.5)]
        return on or [int(np.argmax(p))]

    def _centre_on(self, row) -> None:
        yx = np.array([row["centroid_y"].iloc[0], row["centroid_x"].iloc[0]], float)
        side = max(float(row["bbox_y1"].iloc[0] - row["bbox_y0"].iloc[0]),
                   float(row["bbox_x1"].iloc[0] - row["bbox_x0"].iloc[0]), 8.0) if "bbox_y1" in row else 64.0
        world = self.layer.data_to_world(yx)
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9 moved the camera
        camera = scene.camera if scene is not None and hasattr(scene, "camera") else self.viewer.camera
        camera.center = tuple(float(v) for v in world[-2:])
        # the cell and about its own size around it fill a ~600 px canvas (no private API for the size)
        camera.zoom = float(np.clip(600.0 / (3.0 * side), 0.05, 50.0))

    def _set_ticks(self, ticks: set[int]) -> None:
        for k, box in enumerate(self.boxes):
            box.blockSignals(True)
            box.setChecked(k in ticks)
            box.blockSignals(False)

    def ticks(self) -> list[int]:
        return [k for k, b in enumerate(self.boxes) if b.isChecked()]

    def _exclusive(self, k: int, on: bool) -> None:
        """Negative excludes every other class (and the other way round)."""
        if not on:
            return
        others = [j for j in range(N_CLASSES) if j != NEGATIVE] if k == NEGATIVE else [NEGATIVE]
        for j in others:
            self.boxes[j].blockSignals(True)
            self.boxes[j].setChecked(False)
            self.boxes[j].blockSignals(False)

    # ------------------------------------------------------------------ actions

    def _ensure_store(self) -> bool:
        if self.store is None and not self.open_pred_dir():
            notify_error("choose the prediction folder (PRED_DIR) where corrections.csv is kept")
            return False
        iid = self.image_id
        mask = self.store.pred_dir / "masks" / f"{iid}.tif"
        if not mask.is_file():  # an image predicted in the viewer: keep its cells with the corrections
            from napari_cpgcn.io.masks import write_mask

            write_mask(mask, np.asarray(self.layer.data))
        return True

    def confirm(self) -> bool:
        """Save the ticked classes of the current cell (at once, to corrections.csv)."""
        if self.layer is None or self.cell_id is None:
            notify_error("select a cell in the 'cells' layer first")
            return False
        if not self._ensure_store():
            return False
        try:
            c = self.store.add(self.image_id, self.cell_id, self.ticks())
        except (OSError, ValueError) as e:
            notify_error(error_text(e), e)
            return False
        self._set_status(f"saved cell {c.cell_id}: {c.short_names} ({len(self.store)} corrected)")
        self._draw_corrected()
        self.show_cell(self.cell_id)
        return True

    def accept_prediction(self) -> bool:
        """Confirm the current cell's predicted classes as they are."""
        if self.layer is None or self.cell_id is None:
            notify_error("select a cell in the 'cells' layer first")
            return False
        feats = self.layer.features
        self._set_ticks(set(self._predicted_labels(feats.loc[feats["index"].astype(int) == self.cell_id])))
        return self.confirm()

    def undo(self) -> None:
        if self.store is None:
            return
        c = self.store.undo()
        self._set_status(f"undone: cell {c.cell_id} of {c.image_id} ({c.short_names})" if c else "nothing to undo")
        self._draw_corrected()
        if self.cell_id is not None:
            self.show_cell(self.cell_id)

    def step(self, delta: int) -> None:
        """Go to the next / previous cell of the list (centre and zoom on it)."""
        if not self.suggestions:
            self._refresh_suggestions()
        if not self.suggestions:
            notify_info("no cells to walk through (predict an image first)")
            return
        self.position = int(np.clip(self.position + delta, 0, len(self.suggestions) - 1))
        self._update_position()
        self.show_cell(self.suggestions[self.position][1], centre=True)

    # ------------------------------------------------------------------ drawing

    def _draw_corrected(self) -> None:
        """Corrected cells as white outlines in their own layer (the cell colours stay)."""
        if self.layer is None:
            return
        ids = sorted(self.store.for_image(self.image_id)) if self.store is not None and self.image_id else []
        data = np.asarray(self.layer.data)
        mask = np.where(np.isin(data, ids), data, 0).astype(data.dtype)
        existing = [ly for ly in self.viewer.layers if ly.name == CORRECTED_LAYER]
        if existing:
            existing[0].data = mask
            return
        from napari.utils.colormaps import DirectLabelColormap

        white = DirectLabelColormap(color_dict={None: "white", 0: "transparent"})
        ly = self.viewer.add_labels(mask, name=CORRECTED_LAYER, opacity=1.0, colormap=white,
                                    metadata={"hpa_role": "corrected"})
        ly.contour = 3
        ly.scale = self.layer.scale
        self.viewer.layers.selection.active = self.layer

    def _apply_colors(self, on: bool = False) -> None:
        if self.layer is None:
            return
        feats = self.layer.features
        if on and "uncertainty" in feats:
            from napari.utils.colormaps import ensure_colormap

            # by rank within the image: a model unsure about every cell still shows which cells
            # are the least sure (the values themselves are in the table and the status bar)
            cmap = ensure_colormap(_UNC_CMAP)
            u = np.nan_to_num(feats["uncertainty"].to_numpy(np.float64), nan=1.0)
            rank = (np.argsort(np.argsort(u, kind="stable"), kind="stable") / max(len(u) - 1, 1)) if len(u) else u
            colors: dict[int | None, Any] = {None: "transparent", 0: "transparent"}
            for cid, r in zip(feats["index"].astype(int), rank, strict=True):
                colors[int(cid)] = tuple(float(v) for v in cmap.map(np.array([0.15 + 0.85 * r]))[0])
            self.layer.colormap = colors
        else:
            from napari_cpgcn._napari.layers import table_from_features, top_class_color_dict

            if "top_class" in feats:
                self.layer.colormap = top_class_color_dict(table_from_features(feats, self.image_id))

    # ------------------------------------------------------------------ fine-tune

    def start_finetune(self) -> None:
        from napari_cpgcn.events import EventKind
        from napari_cpgcn.review.finetune import FinetuneOptions, finetune

        if self.store is None or not len(self.store):
            notify_error("no corrections yet: correct some cells first")
            return
        run, out = self.run_dir.text(), self.out_dir.text()
        if not run or not out:
            notify_error("choose the run to fine-tune (RUN) and a new folder for the result (RUN2)")
            return
        opts = FinetuneOptions(epochs=int(self.epochs.value()))
        images_dir = None
        if not (self.store.pred_dir / "run.json").is_file():
            # cells predicted in the viewer: their image is the one open (its channel files' folder)
            from napari_cpgcn._napari.widgets.common import current_image

            image = current_image(self.viewer)
            paths = [p for p in (image.paths.values() if image is not None else []) if str(p) not in ("", ".")]
            if not paths:
                notify_error(f"{self.store.pred_dir} has no run.json naming its images, and the open image has "
                             "no files; predict the folder with `napari-cpgcn predict` first")
                return
            images_dir = str(Path(paths[0]).parent)
        self.finetune_button.setEnabled(False)

        def on_yield(ev: Any) -> None:
            if ev.kind == EventKind.EPOCH_END:
                self._set_status(f"fine-tuning: epoch {ev.epoch}/{ev.n_epochs}, "
                                 f"loss {ev.metrics.get('train_loss', float('nan')):.3f}")
            elif ev.kind == EventKind.DONE:
                self._set_status(f"fine-tuned run written to {ev.path}; re-predicting the open image with it")
                self.repredict(ev.path)

        self.worker = start_worker(finetune, run, str(self.store.pred_dir), out, opts, on_yield=on_yield,
                                   on_finish=lambda: self.finetune_button.setEnabled(True), images_dir=images_dir)

    def repredict(self, run_dir: str | Path) -> None:
        """Predict the open image's cells again with ``run_dir`` (in a worker) and replace the
        ``cells`` layer's features (the cells themselves stay, so corrections still match)."""
        from napari_cpgcn._napari.widgets.common import current_image

        image, layer = current_image(self.viewer), self.layer
        if image is None or layer is None:
            notify_info(f"fine-tuned run written to {run_dir}; open an image and predict with it")
            return
        cells = np.asarray(layer.data)

        def work():
            from napari_cpgcn.pipeline.predictor import load_predictor

            return load_predictor(run_dir).predict(image, cells=cells, with_cams=False)

        def done(pred) -> None:
            from napari_cpgcn._napari.layers import cell_features

            layer.features = cell_features(pred.table)
            self._refresh_suggestions()
            self._apply_colors(self.color_unc.isChecked())
            self._set_status(f"re-predicted {pred.image_id} with {run_dir}")

        self.worker = start_worker(work, on_return=done)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)
        log.info("%s", text)
