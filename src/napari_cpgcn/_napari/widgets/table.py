"""Per-cell table: a sortable view of the ``cells`` layer's features, linked to the canvas.

Clicking a row selects that cell in the Labels layer and centres the view on it; clicking a
cell in the canvas (or changing the layer's selected label) highlights its row.
"""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_cpgcn.classes import CLASSES, SHORT_NAMES

log = logging.getLogger(__name__)

__all__ = ["CellTableWidget"]

COLUMNS = ("cell", "top class", "p", "classes (fused p)", "area", "uncertainty")
_COLOR = {c.short: c.color for c in CLASSES}


class _NumItem(QTableWidgetItem):
    """An item that sorts by number, not by text."""

    def __init__(self, value: float, text: str):
        super().__init__(text)
        self.setData(Qt.ItemDataRole.UserRole, float(value))

    def __lt__(self, other):
        a, b = self.data(Qt.ItemDataRole.UserRole), other.data(Qt.ItemDataRole.UserRole)
        if a is None or b is None:
            return super().__lt__(other)
        return a < b


class CellTableWidget(QWidget):
    """Sortable per-cell table bound to one Labels layer (its ``features``)."""

    #: Emitted with the cell id when a row is chosen.
    cell_chosen = Signal(int)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.layer = None
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        hdr = self.table.horizontalHeader()
        hdr.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        hdr.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._row_selected)
        #: Above the rows: why they are stale (hidden while they describe the viewer).
        self.stale_caption = QLabel("")
        self.stale_caption.setWordWrap(True)
        self.stale_caption.setStyleSheet("color: #ff8c69;")
        self.stale_caption.setVisible(False)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.stale_caption)
        lay.addWidget(self.table)
        self._syncing = False

    # ------------------------------------------------------------------ binding

    def set_stale(self, text: str) -> None:
        """Say above the rows why they no longer describe the viewer ("" hides it)."""
        self.stale_caption.setText(text)
        self.stale_caption.setVisible(bool(text))
        self.table.setToolTip(text)

    def set_layer(self, layer) -> None:
        """Show ``layer.features`` and follow the layer's selection (None clears the table)."""
        if self.layer is not None:
            for emitter, cb in ((self.layer.events.selected_label, self._label_selected),
                                (self.layer.events.features, self._refresh)):
                try:
                    emitter.disconnect(cb)
                except Exception:  # noqa: BLE001 - already disconnected
                    pass
            if self._on_click in self.layer.mouse_drag_callbacks:
                self.layer.mouse_drag_callbacks.remove(self._on_click)
        self.layer = layer
        if layer is not None:
            layer.events.selected_label.connect(self._label_selected)
            layer.events.features.connect(self._refresh)
            layer.mouse_drag_callbacks.append(self._on_click)
        self._refresh()

    def _refresh(self, event=None) -> None:
        feats = None if self.layer is None else self.layer.features
        self.table.setSortingEnabled(False)
        self.table.clearContents()
        if feats is None or len(feats) == 0 or "index" not in feats:
            self.table.setRowCount(0)
            self.table.setSortingEnabled(True)
            return
        self.table.setRowCount(len(feats))
        ids = feats["index"].to_numpy()
        tops = feats["top_class"].astype(str).to_numpy() if "top_class" in feats else [""] * len(feats)
        summary = feats["classes"].astype(str).to_numpy() if "classes" in feats else [""] * len(feats)
        areas = feats["area"].to_numpy() if "area" in feats else np.zeros(len(feats))
        unc = feats["uncertainty"].to_numpy(float) if "uncertainty" in feats else np.full(len(feats), np.nan)
        edited = feats["edited"].to_numpy(bool) if "edited" in feats else np.zeros(len(feats), bool)
        for r in range(len(feats)):
            top = str(tops[r])
            p = float(feats[f"fused_{top}"].iloc[r]) if f"fused_{top}" in feats else float("nan")
            items = [
                _NumItem(ids[r], str(int(ids[r]))),
                QTableWidgetItem(top),
                _NumItem(p, f"{p:.2f}"),
                QTableWidgetItem(str(summary[r])),
                _NumItem(areas[r], str(int(areas[r]))),
                _NumItem(unc[r], f"{unc[r]:.2f}"),
            ]
            if top in _COLOR:
                items[1].setForeground(QColor(_COLOR[top]))
            if edited[r]:  # pixels changed since Predict: its scores describe the old cell
                for it in items:
                    it.setBackground(QColor(120, 60, 30))
                items[0].setText(f"{int(ids[r])} (edited)")
            items[3].setToolTip(self._tooltip(feats, r))
            for c, it in enumerate(items):
                self.table.setItem(r, c, it)
        self.table.setSortingEnabled(True)
        self.table.scrollToTop()

    @staticmethod
    def _tooltip(feats, r: int) -> str:
        lines = []
        for s in SHORT_NAMES:
            vals = [feats[f"{k}_{s}"].iloc[r] for k in ("fused", "image", "cell") if f"{k}_{s}" in feats]
            if len(vals) == 3 and vals[0] >= 0.05:
                lines.append(f"{s}: fused {vals[0]:.2f} = image {vals[1]:.2f} × cell {vals[2]:.2f}")
        return "\n".join(lines) or "no class above 0.05"

    # ------------------------------------------------------------------ linking

    def row_of(self, cell_id: int) -> int | None:
        for r in range(self.table.rowCount()):
            it = self.table.item(r, 0)
            if it is not None and int(it.data(Qt.ItemDataRole.UserRole)) == int(cell_id):
                return r
        return None

    def select_cell(self, cell_id: int) -> None:
        """Select the row of ``cell_id`` (and, through it, the cell in the canvas)."""
        r = self.row_of(cell_id)
        if r is not None:
            self.table.selectRow(r)

    def _row_selected(self) -> None:
        if self._syncing or self.layer is None:
            return
        rows = {i.row() for i in self.table.selectedItems()}
        if not rows:
            return
        cell_id = int(self.table.item(rows.pop(), 0).data(Qt.ItemDataRole.UserRole))
        self._syncing = True
        try:
            self.layer.selected_label = cell_id
            feats = self.layer.features
            row = feats.loc[feats["index"] == cell_id]
            if len(row) and "centroid_y" in row:
                yx = np.array([row["centroid_y"].iloc[0], row["centroid_x"].iloc[0]])
                world = self.layer.data_to_world(yx)
                scene = getattr(self.viewer, "scene", None)  # napari >= 0.9 moved the camera
                camera = scene.camera if scene is not None and hasattr(scene, "camera") else self.viewer.camera
                camera.center = tuple(float(v) for v in world[-2:])
                self._zoom_to(row, camera)
        finally:
            self._syncing = False
        self.cell_chosen.emit(cell_id)

    def _zoom_to(self, row, camera) -> None:
        """Zoom so that the cell's bounding box spans about a third of the view (centre kept; a big
        cell: the whole-image zoom)."""
        cols = ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")
        if not all(c in row for c in cols) or row[list(cols)].isna().any(axis=None):
            return
        y0, x0, y1, x1 = (float(row[c].iloc[0]) for c in cols)
        side = max(y1 - y0, x1 - x0, 1.0)
        shape = self.layer.data.shape[-2:]
        center = tuple(camera.center)
        self.viewer.reset_view()  # the zoom that fits the whole image: the scale to start from
        fit = float(camera.zoom)
        camera.zoom = fit * max(max(shape) / (3.0 * side), 1.0)  # data pixels both: a unitless ratio
        camera.center = center

    def _label_selected(self, event=None) -> None:
        if self._syncing or self.layer is None:
            return
        r = self.row_of(self.layer.selected_label)
        self._syncing = True
        try:
            if r is None:
                self.table.clearSelection()
            else:
                self.table.selectRow(r)
                self.table.scrollToItem(self.table.item(r, 0))
        finally:
            self._syncing = False

    def _on_click(self, layer, event):
        """A click (press + release without dragging) on a cell selects it (pan/zoom mode only)."""
        if str(layer.mode) != "pan_zoom":
            return
        start = tuple(event.position)
        yield
        moved = False
        while event.type == "mouse_move":
            moved = True
            yield
        if moved and np.hypot(*np.subtract(event.position, start)[-2:]) > 2:
            return
        value = layer.get_value(event.position, view_direction=event.view_direction,
                                dims_displayed=event.dims_displayed, world=True)
        if value is not None and int(value) > 0:
            layer.selected_label = int(value)
