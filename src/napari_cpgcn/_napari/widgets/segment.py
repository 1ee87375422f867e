"""Segment widget: pick the channel layers, a method and its parameters; get a ``cells`` Labels layer.

A thin GUI over :func:`napari_cpgcn.segmentation.segment_cells`. The work runs in a napari
thread worker (a generator yielding progress messages), so the viewer stays responsive while
cellpose loads or a large image is segmented. The result replaces the data of an existing
``cells`` layer of the same image (keeping the user's colours and opacity) or adds one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .common import cells_layer_of, error_text, install_single_image, notify_error, start_worker

log = logging.getLogger(__name__)

__all__ = ["SegmentWidget", "default_channel_layer", "segment_job"]

#: The channels the segmentation reads, with what they show (for the combo box labels).
_INPUTS = (("blue", "Nucleus (blue)"), ("red", "Microtubules (red)"), ("yellow", "ER (yellow)"))
_NONE = "—"


def default_channel_layer(layers: list[Any], color: str) -> Any | None:
    """The layer that holds ``color``: ``metadata["hpa_channel"]`` first, else a name ending in the colour.

    The last matching layer wins (the most recently loaded image).
    """
    tagged = [ly for ly in layers if getattr(ly, "metadata", {}).get("hpa_channel") == color]
    if tagged:
        return tagged[-1]
    named = [ly for ly in layers if ly.name.lower().rstrip().endswith(color)]
    return named[-1] if named else None


def segment_job(data: np.ndarray, method: str, params: dict[str, Any]) -> Iterator[str]:
    """Generator run in the worker: yields progress messages, returns the labels."""
    from napari_cpgcn.segmentation import make_params, segment_cells

    p = make_params(method, **params)  # bad parameters fail before any work
    if method == "cellpose":
        from napari_cpgcn.segmentation import resolve_cellpose_weights

        resolve_cellpose_weights(p.model, p.models_dir)  # missing weights: fail now, clearly
        yield f"loading cellpose model {p.model} …"
    yield f"segmenting a {data.shape[2]}x{data.shape[1]} image with {method} …"
    return segment_cells(data, method=method, **params)


def _spin(special: str, maximum: float, decimals: int = 0, suffix: str = "") -> QDoubleSpinBox:
    """A spin box whose minimum (0) means ``special`` (e.g. "auto")."""
    box = QDoubleSpinBox()
    box.setRange(0, maximum)
    box.setDecimals(decimals)
    box.setSpecialValueText(special)
    box.setSuffix(suffix)
    box.setValue(0)
    return box


class SegmentWidget(QWidget):
    """Dock widget: segment the HPA image shown in the viewer into a ``cells`` Labels layer."""

    #: Emitted with the number of cells after each successful run.
    segmented = Signal(int)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        install_single_image(napari_viewer)
        self._worker = None

        chan_box = QGroupBox("Channels")
        chan_form = QFormLayout(chan_box)
        self.channel_combos: dict[str, QComboBox] = {}
        for color, label in _INPUTS:
            combo = QComboBox()
            combo.setToolTip(f"image layer holding the {color} channel")
            self.channel_combos[color] = combo
            chan_form.addRow(label, combo)

        par_box = QGroupBox("Method")
        form = QFormLayout(par_box)
        self.method_combo = QComboBox()
        self.method_combo.addItems(["classical", "cellpose"])
        self.method_combo.setToolTip("classical: nucleus-seeded watershed, needs no weights; "
                                     "cellpose: needs its weight file on this machine")
        self.method_combo.currentTextChanged.connect(self._method_changed)
        form.addRow("Method", self.method_combo)
        self.nucleus_spin = _spin("auto", 2000, suffix=" px")
        self.nucleus_spin.setToolTip("expected nucleus diameter in pixels (auto: measured on each image from its blue channel)")
        form.addRow("Nucleus diameter", self.nucleus_spin)
        self.downscale_spin = _spin("auto", 32, decimals=0)
        self.downscale_spin.setToolTip("segment at 1/F resolution, labels upsampled to full size; "
                                       "1 = full resolution (slow on large images)")
        form.addRow("Downscale", self.downscale_spin)
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItems(["cyto3", "nuclei", "cpsam"])
        self.model_combo.setToolTip("built-in cellpose model (weights in $CELLPOSE_LOCAL_MODELS_PATH "
                                    "or ~/.cellpose/models) or a path to a model file")
        form.addRow("Cellpose model", self.model_combo)
        self.diameter_spin = _spin("auto", 4000, suffix=" px")
        self.diameter_spin.setToolTip("cellpose: expected cell diameter (auto: 2 x nucleus diameter)")
        form.addRow("Cell diameter", self.diameter_spin)

        self.run_btn = QPushButton("Segment")
        self.run_btn.clicked.connect(self.run)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        lay = QVBoxLayout(self)
        lay.addWidget(chan_box)
        lay.addWidget(par_box)
        lay.addWidget(self.run_btn)
        lay.addWidget(self.status)
        lay.addStretch(1)

        self._method_changed(self.method_combo.currentText())
        self.refresh_layers()
        self.viewer.layers.events.inserted.connect(self.refresh_layers)
        self.viewer.layers.events.removed.connect(self.refresh_layers)

    # ------------------------------------------------------------------ layers

    def _image_layers(self) -> list[Any]:
        return [ly for ly in self.viewer.layers if type(ly).__name__ == "Image" and ly.ndim == 2
                and not getattr(ly, "rgb", False)]

    def refresh_layers(self, *_: Any) -> None:
        """Refill the channel choices; keep the user's choice, else pick the HPA layer of each colour."""
        layers = self._image_layers()
        names = [ly.name for ly in layers]
        for color, combo in self.channel_combos.items():
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([_NONE, *names])
            default = default_channel_layer(layers, color)
            if current in names and current != _NONE:
                combo.setCurrentText(current)
            elif default is not None:
                combo.setCurrentText(default.name)
            combo.blockSignals(False)

    def _method_changed(self, method: str) -> None:
        cp = method == "cellpose"
        self.model_combo.setEnabled(cp)
        self.diameter_spin.setEnabled(cp)

    def params(self) -> dict[str, Any]:
        """The parameters of the chosen method as keyword arguments of ``segment_cells``."""
        p: dict[str, Any] = {
            "nucleus_diameter": self.nucleus_spin.value() or None,
            "downscale": self.downscale_spin.value() or "auto",
        }
        if self.method_combo.currentText() == "cellpose":
            p["model"] = self.model_combo.currentText().strip() or "cyto3"
            p["diameter"] = self.diameter_spin.value() or None
        return p

    def _inputs(self) -> tuple[np.ndarray, Any]:
        """The (4, Y, X) image from the chosen layers (green is not used: zeros) and the nucleus layer."""
        chosen = {}
        for color, combo in self.channel_combos.items():
            name = combo.currentText()
            if name == _NONE or name not in self.viewer.layers:
                raise ValueError(f"choose the layer holding the {color} channel (open an HPA image "
                                 "with File > Open, or pick an image layer)")
            chosen[color] = self.viewer.layers[name]
        planes = {c: np.asarray(ly.data) for c, ly in chosen.items()}
        shapes = {c: p.shape for c, p in planes.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"the chosen channel layers differ in size ({shapes}); pick layers of one image")
        blue = planes["blue"]
        data = np.stack([planes["red"], np.zeros_like(blue), blue, planes["yellow"]])
        return data, chosen["blue"]

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        """Segment in a worker; the ``cells`` layer is added or replaced when it finishes."""
        if self._worker is not None:
            return
        method = self.method_combo.currentText()
        try:
            data, ref_layer = self._inputs()
            params = self.params()
        except Exception as e:
            notify_error(error_text(e), e)
            return
        self.run_btn.setEnabled(False)
        self.status.setText("segmenting …")
        self._worker = start_worker(
            segment_job, data, method, params,
            on_yield=self.status.setText,
            on_return=lambda labels: self._show(labels, ref_layer),
            on_error=self._failed,
            on_finish=self._finished,
        )

    def _failed(self, exc: BaseException) -> None:
        msg = f"segmentation failed: {error_text(exc)}"
        self.status.setText(msg)
        notify_error(msg, exc)

    def _finished(self) -> None:
        self._worker = None
        self.run_btn.setEnabled(True)

    def _show(self, labels: np.ndarray, ref_layer: Any) -> None:
        from napari_cpgcn._napari.layers import CELLS_LAYER, cells_layer

        image_id = ref_layer.metadata.get("image_id")
        data, kwargs, _ = cells_layer(labels, image_id=image_id)
        layer = cells_layer_of(self.viewer, image_id)
        if layer is None and CELLS_LAYER in self.viewer.layers:
            layer = self.viewer.layers[CELLS_LAYER]
            if type(layer).__name__ != "Labels":
                self.viewer.layers.remove(layer)
                layer = None
        if layer is not None and layer.data.shape == data.shape:
            import pandas as pd

            layer.data = data
            layer.metadata = {**layer.metadata, **kwargs["metadata"]}
            layer.features = pd.DataFrame()  # a per-cell table of the old mask no longer applies
        else:
            if layer is not None:
                self.viewer.layers.remove(layer)
            layer = self.viewer.add_labels(data, scale=ref_layer.scale, translate=ref_layer.translate, **kwargs)
        n = int(np.unique(labels).size - (1 if (labels == 0).any() else 0))
        self.status.setText(f"{n} cells" + (f" in {image_id}" if image_id else ""))
        self.segmented.emit(n)
