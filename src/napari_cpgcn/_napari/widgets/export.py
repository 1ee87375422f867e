"""Export per-cell CSVs: the current image's table, or a whole folder predicted in a worker.

The current image's CSV is the ``cells`` layer's features in the canonical per-cell column
order (image id, cell id, centroid, area, bbox, top class, image/cell/fused probability per
class). The folder export runs :func:`napari_cpgcn.batch.predict_folder` (the same engine as
``napari-cpgcn predict``: resumable, atomic writes) and leaves ``OUT/cells.csv``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_cpgcn.events import Event, EventKind

from .common import (
    RUNS,
    PathEdit,
    cells_layer_of,
    channel_layers_of,
    error_text,
    load_settings,
    notify_error,
    notify_info,
    prepare_torch,
    start_worker,
)

log = logging.getLogger(__name__)

__all__ = ["ExportWidget", "export_current_table"]


def export_paths(csv_path: str | Path) -> dict[str, Path]:
    """Where a single-image export goes: ``X.csv``, its mask ``X.mask.tif`` and its record ``X.run.json``."""
    csv_path = Path(csv_path)
    stem = csv_path.with_suffix("") if csv_path.suffix.lower() == ".csv" else csv_path
    return {"csv": stem.with_suffix(".csv"), "mask": Path(f"{stem}.mask.tif"), "record": Path(f"{stem}.run.json")}


def export_current_table(viewer, path: str | Path, stale: list[str] | None = None) -> Path:
    """Write the current image's per-cell table, its cell mask and a run record, each atomically.

    The CSV is the ``cells`` layer's features in the canonical column order (plus ``edited``
    when cells were edited after Predict); the mask is the layer's data (:func:`io.masks.write_mask`,
    the ids of the CSV's ``cell_id``); the record (JSON) names the image, the mask version, the
    run and its model card, and why the results are stale (``stale``), if they are.

    Raises
    ------
    ValueError
        An empty ``path``, or no per-cell table yet.
    """
    import json

    from napari_cpgcn._napari.layers import EDITED_COLUMN, table_from_features
    from napari_cpgcn.io.atomic import atomic_write_text
    from napari_cpgcn.io.masks import write_mask

    if not str(path).strip():
        raise ValueError("choose where to write the CSV (the path is empty)")
    chans = channel_layers_of(viewer)
    image_id = next(iter(chans.values())).metadata.get("image_id") if chans else None
    layer = cells_layer_of(viewer, image_id)
    if layer is None or "index" not in layer.features or len(layer.features) == 0:
        raise ValueError("no per-cell table yet: run Predict on the image first (the 'cells' layer has no features)")
    image_id = layer.metadata.get("image_id") or image_id
    table = table_from_features(layer.features, image_id=image_id)
    if EDITED_COLUMN in layer.features:
        table[EDITED_COLUMN] = layer.features[EDITED_COLUMN].to_numpy(bool)
    paths = export_paths(Path(path).expanduser())
    atomic_write_text(paths["csv"], table.to_csv(index=False, float_format="%.6g"))
    write_mask(paths["mask"], np.asarray(layer.data))
    run = layer.metadata.get("run")
    card = None
    if run:
        from napari_cpgcn.pipeline.model_card import model_card

        try:
            card = model_card(run).to_dict()
        except (OSError, ValueError) as e:
            card = {"run": run, "error": error_text(e)}
    record = {"image_id": image_id, "n_cells": int(len(table)),
              "mask_version": int(layer.metadata.get("mask_version", 0)),
              "stale": list(stale or []), "files": {k: v.name for k, v in paths.items()},
              "model": card}
    atomic_write_text(paths["record"], json.dumps(record, indent=1, default=str) + "\n")
    return paths["csv"]


class ExportWidget(QWidget):
    """Dock widget: per-cell CSV of the current image, or of a whole folder (in a worker)."""

    #: Emitted with the written CSV path.
    exported = Signal(str)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._worker = None
        self._stop = threading.Event()
        settings = load_settings()

        self.csv_edit = PathEdit("save", "where to write the current image's CSV", "CSV (*.csv)")
        self.export_btn = QPushButton("Export current image")
        self.export_btn.clicked.connect(self.export_current)
        cur = QGroupBox("Current image")
        cur_lay = QVBoxLayout(cur)
        cur_lay.addWidget(self.csv_edit)
        cur_lay.addWidget(self.export_btn)

        self.folder_edit = PathEdit("dir", "folder of HPA images (default: the browser's)")
        self.run_edit = PathEdit("dir", "trained run folder")
        self.run_edit.setText(settings.get("last_run", ""))
        RUNS.run_added.connect(self._run_added)
        self.out_edit = PathEdit("dir", "output folder (cells.csv, masks/, …)")
        self.zarr_check = QCheckBox("also OME-Zarr (zarr/{ID}.ome.zarr: image, labels/cells, table)")
        self.h5ad_check = QCheckBox("also cells.h5ad (per-cell embeddings + UMAP, for scanpy)")
        self.folder_btn = QPushButton("Predict + export folder")
        self.folder_btn.clicked.connect(self.export_folder)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m images")
        fol = QGroupBox("Whole folder")
        form = QFormLayout(fol)
        form.addRow("Images", self.folder_edit)
        form.addRow("Run", self.run_edit)
        form.addRow("Output", self.out_edit)
        form.addRow(self.zarr_check)
        form.addRow(self.h5ad_check)
        btns = QHBoxLayout()
        btns.addWidget(self.folder_btn)
        btns.addWidget(self.cancel_btn)
        form.addRow(btns)
        form.addRow(self.progress)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addWidget(cur)
        lay.addWidget(fol)
        lay.addWidget(self.status)
        lay.addStretch(1)

    def _run_added(self, run: str) -> None:
        """A training finished: offer its run only when the user has not chosen one."""
        if not self.run_edit.text():
            self.run_edit.setText(run)

    # ------------------------------------------------------------------ current image

    def export_current(self) -> Path | None:
        """Write CSV + mask + run record of the current image where the path field says (never a guess)."""
        path = self.csv_edit.text()
        stale = self._stale_reasons()
        try:
            out = export_current_table(self.viewer, path, stale=stale)
        except Exception as e:
            notify_error(f"export failed: {error_text(e)}", e)
            self.status.setText(f"not exported: {error_text(e)}")
            return None
        paths = export_paths(out)
        msg = f"wrote {out.name}, {paths['mask'].name}, {paths['record'].name} in {out.parent}"
        if stale:
            msg += " (results are stale: " + "; ".join(stale) + ")"
        warnings = self._card_warnings(paths["record"])
        if warnings:
            msg += ". Model card: " + "; ".join(warnings)
        self.status.setText(msg)
        notify_info(msg)
        self.exported.emit(str(out))
        return out

    @staticmethod
    def _card_warnings(record: Path) -> list[str]:
        """The model card's warnings from the run record just written (shown with the export)."""
        import json

        try:
            model = json.loads(record.read_text(encoding="utf-8")).get("model") or {}
        except (OSError, ValueError):
            return []
        return list(model.get("warnings") or [])

    def _stale_reasons(self) -> list[str]:
        """The Predict widget's stale reasons, when one is docked in this viewer."""
        from napari_cpgcn._napari.widgets.predict import PredictWidget

        for w in PredictWidget.instances():
            if w.viewer is self.viewer:
                return list(w.check_stale())
        return []

    # ------------------------------------------------------------------ whole folder

    def _default_folder(self) -> str:
        chans = channel_layers_of(self.viewer)
        p = next(iter(chans.values())).metadata.get("path") if chans else ""
        return str(Path(p).parent) if p else load_settings().get("browser_folder", "")

    def export_folder(self) -> None:
        """Predict every image of the folder in a worker and assemble ``OUT/cells.csv``."""
        if self._worker is not None:
            return
        folder = self.folder_edit.text() or self._default_folder()
        run, out = self.run_edit.text(), self.out_edit.text()
        try:
            if not folder:
                raise ValueError("choose the folder of images to export")
            if not run:
                raise ValueError("choose a trained run folder")
            if not out:
                raise ValueError("choose an output folder")
            from napari_cpgcn.io.hpa import list_image_ids
            from napari_cpgcn.pipeline.predictor import resolve_model_path

            resolve_model_path(run)
            if not list_image_ids(folder):
                raise FileNotFoundError(f"{folder} holds no HPA images")
        except Exception as e:
            notify_error(error_text(e), e)
            return
        prepare_torch()
        self.folder_edit.setText(folder)
        self._stop.clear()
        self.folder_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText(f"predicting {folder} …")
        device = load_settings().get("device", "auto")
        self._worker = start_worker(
            _predict_folder_events, folder, run, out, device, self._stop.is_set, self.zarr_check.isChecked(),
            self.h5ad_check.isChecked(),
            on_yield=self._on_event,
            on_error=lambda e: self._done(f"folder export failed: {error_text(e)}", e),
            on_finish=self._finished,
        )

    def cancel(self) -> None:
        self._stop.set()
        self.status.setText("stopping after the images in flight …")

    def _on_event(self, ev: Event) -> None:
        if ev.kind in (EventKind.STAGE_START, EventKind.ITEM):
            if ev.n_batches:
                self.progress.setMaximum(ev.n_batches)
                self.progress.setValue(ev.batch)
            if ev.message:
                self.status.setText(ev.message)
        elif ev.kind == EventKind.DONE:
            summary = ev.result
            paths = getattr(summary, "paths", {}) or {}
            cells_csv = Path(paths.get("cells") or Path(self.out_edit.text()) / "cells.csv")
            failed = getattr(summary, "n_failed", 0)
            msg = f"wrote {cells_csv}" + (f" ({failed} images failed: see failures.csv)" if failed else "")
            self._done(msg)
            self.exported.emit(str(cells_csv))
        elif ev.kind == EventKind.STOPPED:
            self._done("stopped; rerun to resume (finished images are kept)")

    def _done(self, message: str, exc: BaseException | None = None) -> None:
        self.status.setText(message)
        if exc is not None:
            notify_error(message, exc)
        else:
            notify_info(message)

    def _finished(self) -> None:
        self._worker = None
        self.folder_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)


def _predict_folder_events(folder: str, run: str, out: str, device: str, should_stop, ome_zarr: bool = False,
                           h5ad: bool = False):
    """Worker body: :func:`napari_cpgcn.batch.predict_folder` with the GUI's device (``h5ad``: also
    the embeddings and ``cells.h5ad``, with a UMAP when umap-learn is installed); the run's model
    card is written to ``OUT/model_card.json`` first."""
    import importlib.util
    import json

    from napari_cpgcn.batch import BatchOptions, predict_folder
    from napari_cpgcn.io.atomic import atomic_write_text
    from napari_cpgcn.pipeline.model_card import model_card
    from napari_cpgcn.pipeline.predictor import resolve_model_path

    try:  # the model card travels with the export
        card = model_card(resolve_model_path(run)).to_dict()
    except (OSError, ValueError) as e:
        card = {"run": run, "error": str(e)}
    atomic_write_text(Path(out) / "model_card.json", json.dumps(card, indent=1, default=str) + "\n")
    umap = h5ad and importlib.util.find_spec("umap") is not None
    yield from predict_folder(folder, run, out, BatchOptions(device=device, workers=1, batch_size=1,
                                                             ome_zarr=ome_zarr, embeddings=h5ad, umap=umap),
                              should_stop=should_stop)
