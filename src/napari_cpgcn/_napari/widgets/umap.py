"""UMAP dock widget: the cells' UMAP from a ``cells.h5ad``, linked to the ``cells`` layer.

A matplotlib Qt canvas (the ``plots`` extra) draws every cell as one point of a single scatter
collection, so 20,000 points redraw in a fraction of a second; colour by top class,
uncertainty or any numeric column. A lasso or box selection highlights the selected cells of
the image shown in the ``cells`` layer (the others are dimmed); clicking a cell in the canvas
(its ``selected_label``) rings its point in the plot. Reading the file (and computing a UMAP
when the file has none) runs in a thread worker. The data side is
:mod:`napari_cpgcn.profiles.view` (no Qt).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_cpgcn._napari.widgets.common import (
    current_image,
    notify_error,
    relink_cells_layer,
    start_worker,
)
from napari_cpgcn.profiles import view

log = logging.getLogger(__name__)

__all__ = ["UMAPWidget"]

SELECTORS = ("lasso", "box")


class UMAPWidget(QWidget):
    """Dock widget: a cells.h5ad's UMAP, selections linked to the ``cells`` layer."""

    #: Emitted with the selected row indices of ``obs`` after every selection.
    selection_changed = Signal(object)
    #: Emitted once a file's profiles are shown.
    loaded = Signal()

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = napari_viewer
        self.obs = None
        self.coords = np.zeros((0, 2), np.float32)
        self.selected = np.zeros(0, np.int64)
        self.highlighted: int | None = None
        self.layer = None
        self._worker = None

        self.open_btn = QPushButton("Open cells.h5ad…")
        self.open_btn.clicked.connect(self._browse)
        self.color_combo = QComboBox()
        self.color_combo.currentTextChanged.connect(self._recolor)
        self.selector_combo = QComboBox()
        self.selector_combo.addItems(SELECTORS)
        self.selector_combo.currentTextChanged.connect(self._make_selector)
        self.clear_btn = QPushButton("Clear selection")
        self.clear_btn.clicked.connect(lambda: self.select_indices(np.zeros(0, np.int64)))
        self.status = QLabel("open the cells.h5ad of `napari-cpgcn predict --embeddings --umap`")
        self.status.setWordWrap(True)

        self.figure = Figure(figsize=(4, 4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax = self.figure.add_subplot(111)
        self.ax.set_xticks([])
        self.ax.set_yticks([])
        self.scatter = self.ax.scatter(np.zeros(0), np.zeros(0), s=4, linewidths=0, rasterized=True)
        self.sel_scatter = self.ax.scatter(np.zeros(0), np.zeros(0), s=10, facecolors="none",
                                           edgecolors="black", linewidths=0.6)
        self.marker = self.ax.scatter(np.zeros(0), np.zeros(0), s=120, facecolors="none",
                                      edgecolors="red", linewidths=1.5)
        self.selector = None
        self._make_selector(SELECTORS[0])

        row = QHBoxLayout()
        row.addWidget(self.open_btn, 1)
        row.addWidget(self.clear_btn)
        form = QFormLayout()
        form.addRow("Colour by", self.color_combo)
        form.addRow("Select with", self.selector_combo)
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addLayout(form)
        lay.addWidget(self.canvas, 1)
        lay.addWidget(self.status)

        self.viewer.layers.events.inserted.connect(self._relink)
        self.viewer.layers.events.removed.connect(self._relink)
        self._relink()

    # ------------------------------------------------------------------ data

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open cells.h5ad", "", "AnnData (*.h5ad)")
        if path:
            self.load(path)

    def load(self, path: str | Path) -> None:
        """Read ``path`` in a worker (a UMAP is computed there when the file has none), then show it."""
        self.status.setText(f"reading {Path(path).name}…")
        self.open_btn.setEnabled(False)

        def done(result):
            self.set_profiles(*result)
            self.status.setText(f"{Path(path).name}: {len(self.obs)} cells of "
                                f"{self.obs['image_id'].nunique()} images")

        def failed(exc):
            self.status.setText("")
            notify_error(f"cannot show {path}: {exc}", exc)

        def finish():
            self.open_btn.setEnabled(True)
            self._worker = None

        self._worker = start_worker(view.read_profiles, str(path), on_return=done, on_error=failed,
                                    on_finish=finish)

    def set_profiles(self, obs, coords: np.ndarray) -> None:
        """Show the cells of ``obs`` (per-cell table with ``image_id``, ``cell_id``) at ``coords`` (n, 2)."""
        coords = np.asarray(coords, np.float32)
        if len(coords) != len(obs) or coords.ndim != 2 or coords.shape[1] < 2:
            raise ValueError(f"{len(obs)} cells but coordinates of shape {coords.shape}; expected ({len(obs)}, 2)")
        self.obs = obs.reset_index(drop=True)
        self.coords = coords[:, :2]
        self._keys = {(str(i), int(c)): r for r, (i, c) in
                      enumerate(zip(self.obs["image_id"].astype(str), self.obs["cell_id"], strict=True))}
        self.scatter.set_offsets(self.coords)
        if len(self.coords):
            lo, hi = self.coords.min(0), self.coords.max(0)
            pad = np.maximum((hi - lo) * 0.05, 1e-3)
            self.ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            self.ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        self.color_combo.blockSignals(True)
        self.color_combo.clear()
        self.color_combo.addItems(view.color_options(self.obs))
        self.color_combo.blockSignals(False)
        self.selected = np.zeros(0, np.int64)
        self.highlighted = None
        self._recolor()
        self._update_selection()
        self._label_selected()
        self.loaded.emit()

    def _recolor(self, *_: Any) -> None:
        if self.obs is None or not self.color_combo.currentText():
            return
        self.scatter.set_facecolors(view.point_colors(self.obs, self.color_combo.currentText()))
        self.canvas.draw_idle()

    # ------------------------------------------------------------------ selection

    def _make_selector(self, kind: str) -> None:
        from matplotlib.widgets import LassoSelector, RectangleSelector

        if self.selector is not None:
            self.selector.set_active(False)
            self.selector.disconnect_events()
        if kind == "box":
            self.selector = RectangleSelector(self.ax, self._on_box, useblit=True, interactive=False)
        else:
            self.selector = LassoSelector(self.ax, self._on_lasso, useblit=True)

    def _on_lasso(self, vertices) -> None:
        self.select_indices(view.points_in_polygon(self.coords, np.asarray(vertices)))

    def _on_box(self, press, release) -> None:
        self.select_indices(view.points_in_box(self.coords, press.xdata, release.xdata, press.ydata, release.ydata))

    def select_polygon(self, vertices) -> None:
        """A lasso selection with these (m, 2) plot-coordinate vertices."""
        self._on_lasso(vertices)

    def select_box(self, x0: float, x1: float, y0: float, y1: float) -> None:
        """A box selection between these plot coordinates."""
        self.select_indices(view.points_in_box(self.coords, x0, x1, y0, y1))

    def select_indices(self, indices) -> None:
        """Select these rows of ``obs``: ring them in the plot, highlight them in the ``cells`` layer."""
        self.selected = np.asarray(indices, np.int64)
        self._update_selection()
        self.selection_changed.emit(self.selected)

    def _image_id(self) -> str | None:
        if self.layer is not None and self.layer.metadata.get("image_id"):
            return str(self.layer.metadata["image_id"])
        image = current_image(self.viewer)
        if image is not None:
            return image.image_id
        if self.obs is not None and self.obs["image_id"].nunique() == 1:
            return str(self.obs["image_id"].iloc[0])
        return None

    def _update_selection(self) -> None:
        self.sel_scatter.set_offsets(self.coords[self.selected] if len(self.selected) else np.zeros((0, 2)))
        self.canvas.draw_idle()
        if self.layer is None or self.obs is None:
            return
        if len(self.selected) == 0:
            self.layer.metadata = {**self.layer.metadata, "umap_selected": []}
            self.layer.colormap = self._plain_colormap()
            return
        ids = np.unique(np.asarray(self.layer.data))
        image_id = self._image_id()
        self.layer.colormap = view.selection_colormap(self.obs, self.selected, image_id, ids)
        sel = self.obs.iloc[self.selected]
        chosen = sorted(int(c) for c in sel.loc[sel["image_id"] == str(image_id), "cell_id"])
        self.layer.metadata = {**self.layer.metadata, "umap_selected": chosen}
        self.status.setText(f"{len(self.selected)} cells selected, {len(chosen)} in {image_id}")

    def _plain_colormap(self):
        from napari.utils.colormaps import label_colormap

        return label_colormap(max(int(np.max(self.layer.data)) + 1, 50), seed=0.5)

    # ------------------------------------------------------------------ the cells layer

    def _relink(self, *_: Any) -> None:
        self.layer, _ = relink_cells_layer(self.viewer, self.layer, self._label_selected)

    def _label_selected(self, *_: Any) -> None:
        """The cell chosen in the canvas (the layer's ``selected_label``) gets a ring in the plot."""
        row = None
        if self.layer is not None and self.obs is not None:
            row = self._keys.get((str(self._image_id()), int(self.layer.selected_label)))
        self.highlighted = row
        self.marker.set_offsets(self.coords[[row]] if row is not None else np.zeros((0, 2)))
        self.canvas.draw_idle()
