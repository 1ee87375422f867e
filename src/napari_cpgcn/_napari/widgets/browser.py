"""HPA browser: pick a folder (and its labels CSV), step through its images.

Selecting an image reads it in a worker, then swaps the data of the four channel layers in one
go on the GUI thread: the layers (and the user's colormap, gamma, visibility and contrast
choices) survive from image to image; cell and CAM layers of the previous image are removed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_cpgcn._napari.layers import roles
from napari_cpgcn.classes import CLASSES

from .common import (
    PathEdit,
    channel_layers_of,
    error_text,
    install_single_image,
    notify_error,
    remove_layers,
    start_worker,
    update_settings,
)

log = logging.getLogger(__name__)

__all__ = ["BrowserWidget", "load_image_layers"]

NEXT_KEY, PREV_KEY = "PageDown", "PageUp"


def load_image_layers(folder: str, image_id: str, labels_csv: str | None = None) -> tuple[str, list]:
    """Worker body: read one image and build its channel layer tuples (no Qt)."""
    from napari_cpgcn._napari.layers import channel_layers, lookup_image_labels
    from napari_cpgcn.io.hpa import read_image, resolve_images_dir

    image = read_image(folder, image_id=image_id)
    labels, csv = lookup_image_labels(image_id, resolve_images_dir(folder), labels_csv=labels_csv or None)
    return image_id, channel_layers(image, labels=labels, labels_csv=csv)


class BrowserWidget(QWidget):
    """Dock widget listing the images of a folder; selecting one shows its four channels.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    """

    #: Emitted on the GUI thread after an image's layers are in the viewer (the image id).
    image_loaded = Signal(str)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        install_single_image(napari_viewer)
        self.folder: str | None = None
        self.labels_csv: str | None = None
        self._labels: dict[str, Any] = {}
        self._worker = None
        self._pending: str | None = None

        self.folder_edit = PathEdit("dir", "folder of HPA images")
        self.csv_edit = PathEdit("file", "labels CSV (optional: train.csv is found)", "CSV (*.csv)")
        self.folder_edit.edit.editingFinished.connect(self._folder_changed)
        self.csv_edit.edit.editingFinished.connect(self._folder_changed)
        self.list = QListWidget()
        self.list.currentTextChanged.connect(self._selected)
        self.prev_btn = QPushButton("◀ Previous")
        self.next_btn = QPushButton("Next ▶")
        self.prev_btn.setToolTip(f"previous image ({PREV_KEY})")
        self.next_btn.setToolTip(f"next image ({NEXT_KEY})")
        self.prev_btn.clicked.connect(self.previous)
        self.next_btn.clicked.connect(self.next)
        self.labels_label = QLabel("")
        self.labels_label.setWordWrap(True)
        self.labels_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Folder", self.folder_edit)
        form.addRow("Labels", self.csv_edit)
        nav = QHBoxLayout()
        nav.addWidget(self.prev_btn)
        nav.addWidget(self.next_btn)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.list)
        lay.addLayout(nav)
        lay.addWidget(QLabel("<b>Image labels</b>"))
        lay.addWidget(self.labels_label)
        lay.addWidget(self.status)

        for key, fn in ((NEXT_KEY, self.next), (PREV_KEY, self.previous)):
            try:
                self.viewer.bind_key(key, lambda _v, fn=fn: fn(), overwrite=True)
            except Exception as e:  # another plugin owns the key: buttons still work
                log.warning("could not bind %s: %s", key, e)

    # ------------------------------------------------------------------ folder

    def set_folder(self, folder: str | Path, labels_csv: str | Path | None = None) -> None:
        """List the images of ``folder`` (errors become notifications; the list stays as it was)."""
        from napari_cpgcn._napari.layers import find_labels_csvs
        from napari_cpgcn.io.hpa import list_image_ids, resolve_images_dir

        try:
            images_dir = resolve_images_dir(folder)
            ids = list_image_ids(images_dir)
            if not ids:
                raise FileNotFoundError(
                    f"{folder} holds no HPA images: expected files named ID_red.png, ID_green.png, "
                    "ID_blue.png, ID_yellow.png (or .jpg/.tif), or 4-channel TIFFs."
                )
            if labels_csv:
                from napari_cpgcn.io.tables import read_labels_csv

                read_labels_csv(labels_csv)  # malformed → error now, not per image
            else:
                found = find_labels_csvs(images_dir)
                labels_csv = str(found[0]) if found else None
        except Exception as e:
            notify_error(error_text(e), e)
            return
        self.folder, self.labels_csv = str(images_dir), (str(labels_csv) if labels_csv else None)
        self.folder_edit.setText(str(folder))
        self.csv_edit.setText(self.labels_csv or "")
        update_settings(browser_folder=str(folder))
        self.list.blockSignals(True)
        self.list.clear()
        self.list.addItems(ids)
        self.list.blockSignals(False)
        self.status.setText(f"{len(ids)} image{'s' if len(ids) != 1 else ''}"
                            + (f"; labels from {Path(self.labels_csv).name}" if self.labels_csv else "; no labels CSV"))
        self.list.setCurrentRow(0)

    def _folder_changed(self) -> None:
        folder = self.folder_edit.text()
        if folder and (folder != self.folder or self.csv_edit.text() != (self.labels_csv or "")):
            self.set_folder(folder, self.csv_edit.text() or None)

    # ------------------------------------------------------------------ navigation

    @property
    def image_ids(self) -> list[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]

    def next(self) -> None:
        if self.list.count():
            self.list.setCurrentRow(min(self.list.currentRow() + 1, self.list.count() - 1))

    def previous(self) -> None:
        if self.list.count():
            self.list.setCurrentRow(max(self.list.currentRow() - 1, 0))

    def _selected(self, image_id: str) -> None:
        if image_id:
            self.load(image_id)

    def load(self, image_id: str) -> None:
        """Read ``image_id`` in a worker; a request made while one runs waits for it (last one wins)."""
        if self.folder is None:
            return
        if self._worker is not None:
            self._pending = image_id
            return
        self.status.setText(f"loading {image_id} …")
        self._worker = start_worker(
            load_image_layers, self.folder, image_id, self.labels_csv,
            on_return=self._show,
            on_error=lambda e: notify_error(f"could not open {image_id}: {error_text(e)}", e),
            on_finish=self._finished,
        )

    def _finished(self) -> None:
        self._worker = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load(pending)
        elif self.status.text().startswith("loading"):
            self.status.setText("")

    # ------------------------------------------------------------------ layers

    def _show(self, result: tuple[str, list]) -> None:
        """Swap the channel layers' data (GUI thread, all at once)."""
        image_id, tuples = result
        if self._pending is not None:  # a newer request supersedes this one
            return
        existing = channel_layers_of(self.viewer)
        old_shape = next((tuple(ly.data.shape) for ly in existing.values()), None)
        stale = [ly for ly in (*roles(self.viewer.layers, "cells"), *roles(self.viewer.layers, "cam"))
                 if ly.metadata.get("image_id") != image_id]
        stale += [ly for ly in self.viewer.layers if ly.name == "cells" and ly not in stale
                  and ly.metadata.get("image_id") != image_id]
        remove_layers(self.viewer, stale)
        for data, kwargs, _ in tuples:
            color = kwargs["metadata"]["hpa_channel"]
            layer = existing.get(color)
            if layer is None:
                self.viewer.add_image(data, **kwargs)
                continue
            old_auto = layer.metadata.get("auto_contrast")
            user_changed = old_auto is not None and not np.allclose(layer.contrast_limits, old_auto)
            keep = list(layer.contrast_limits) if user_changed and layer.data.dtype == data.dtype else None
            layer.data = data
            layer.reset_contrast_limits_range()
            layer.contrast_limits = keep or kwargs["contrast_limits"]
            layer.metadata = kwargs["metadata"]
            layer.name = kwargs["name"]
        if old_shape is not None and old_shape != tuple(np.shape(tuples[0][0])):
            self.viewer.reset_view()  # another size: the old view would show a corner or a speck
        self._show_labels(tuples[0][1]["metadata"])
        self.status.setText(f"{image_id} ({self.list.currentRow() + 1}/{self.list.count()})")
        self.image_loaded.emit(image_id)

    def _show_labels(self, meta: dict) -> None:
        labels = meta.get("labels")
        if labels is None:
            self.labels_label.setText("<i>not in a labels CSV</i>")
            return
        if not labels:
            self.labels_label.setText("<i>no labels</i>")
            return
        self.labels_label.setText(", ".join(
            f'<span style="color:{CLASSES[k].color}">■</span> {k} {CLASSES[k].name}' for k in labels))

