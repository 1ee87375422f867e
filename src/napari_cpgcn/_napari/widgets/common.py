"""Shared plumbing of the dock widgets: workers, notifications, remembered settings, run registry.

Qt lives here and in the other ``_widgets`` modules only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import sys
import traceback
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QHBoxLayout, QWidget

from napari_cpgcn._napari.layers import roles
from napari_cpgcn.classes import CHANNELS

log = logging.getLogger(__name__)

__all__ = [
    "notify_error",
    "notify_info",
    "start_worker",
    "load_settings",
    "update_settings",
    "RUNS",
    "PathEdit",
    "channel_layers_of",
    "current_image",
    "cells_layer_of",
    "prepare_torch",
    "install_single_image",
    "keep_only_image",
]


# --------------------------------------------------------------------------- notifications

def notify_error(message: str, exc: BaseException | None = None) -> None:
    """Show an error in napari's notification area (and log it with the traceback)."""
    from napari.utils.notifications import show_error

    if exc is not None:
        log.error("%s\n%s", message, "".join(traceback.format_exception(exc)))
    else:
        log.error("%s", message)
    show_error(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    log.info("%s", message)
    show_info(message)


def error_text(exc: BaseException) -> str:
    """One line for a user: the exception's own message (ours name the file and the fix)."""
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, (ValueError, OSError, KeyError, RuntimeError)) else f"{type(exc).__name__}: {text}"


class WorkerRuntimeError(Exception):
    """A RuntimeError raised inside a generator worker, carried as this exception's ``__cause__``.

    superqt's ``GeneratorWorker`` takes a RuntimeError out of the generator for a deleted
    worker: it emits neither ``errored`` nor ``finished``, so the failure would be silent and the
    widget's buttons would stay disabled. torch's errors (out-of-memory included) are
    RuntimeErrors. :func:`start_worker` re-raises them as this and hands ``on_error`` the original.
    """


def _reraise_runtime_errors(func: Callable) -> Callable:
    @functools.wraps(func)
    def body(*args: Any, **kwargs: Any):
        try:
            return (yield from func(*args, **kwargs))
        except RuntimeError as e:
            raise WorkerRuntimeError(error_text(e)) from e

    return body


def start_worker(
    func: Callable,
    *args: Any,
    on_yield: Callable[[Any], None] | None = None,
    on_return: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finish: Callable[[], None] | None = None,
    **kwargs: Any,
):
    """Run ``func(*args, **kwargs)`` (a function or a generator function) in a napari thread worker.

    Errors never escape as console tracebacks: they go to ``on_error`` (default: a napari
    error notification). ``on_finish`` runs after return, error or quit, so widgets can
    re-enable their buttons whatever happened.
    """
    from napari.qt.threading import create_worker

    if inspect.isgeneratorfunction(func):
        func = _reraise_runtime_errors(func)
    worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True, **kwargs)
    if on_yield is not None and hasattr(worker, "yielded"):
        worker.yielded.connect(on_yield)
    if on_return is not None:
        worker.returned.connect(on_return)
    report = on_error or (lambda e: notify_error(error_text(e), e))
    worker.errored.connect(lambda e: report(e.__cause__ if isinstance(e, WorkerRuntimeError) else e))
    if on_finish is not None:
        worker.finished.connect(on_finish)
    worker.start()
    return worker


# --------------------------------------------------------------------------- torch in a GUI process

def _mesa_llvm_loaded() -> bool:
    """True when Mesa's libLLVM is mapped into this process (software OpenGL: llvmpipe)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            return any("libLLVM" in line for line in fh)
    except OSError:  # not Linux
        return False


def prepare_torch() -> None:
    """Import torch and torchvision on the GUI thread, before a worker needs them.

    Why: under software OpenGL (Mesa llvmpipe: Xvfb, CI, remote desktops) the process already
    holds Mesa's libLLVM, and loading Triton's own LLVM next to it (torchvision imports
    ``torch._dynamo``, which imports ``triton`` when installed) kills the process with a
    segmentation fault. Triton only serves ``torch.compile`` on CUDA, which this plugin does
    not use, so in that situation it is hidden from torch. Importing here (once; later calls
    are free) also keeps first-time imports out of worker threads.
    """
    if "triton" not in sys.modules and _mesa_llvm_loaded():
        log.info("software OpenGL (Mesa LLVM) in this process: hiding triton from torch to avoid an LLVM clash")
        sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` → ImportError
    import torch  # noqa: F401
    import torchvision.models  # noqa: F401


# --------------------------------------------------------------------------- settings

def _settings_path() -> Path:
    root = os.environ.get("NAPARI_CPGCN_CONFIG_DIR")
    if root:
        return Path(root) / "gui.json"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "napari-cpgcn" / "gui.json"


def load_settings() -> dict[str, Any]:
    """The remembered GUI settings (last run folder, recent runs, last folders)."""
    try:
        return json.loads(_settings_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def update_settings(**changes: Any) -> None:
    """Merge ``changes`` into the remembered settings (failures to write are only logged)."""
    from napari_cpgcn.io.atomic import atomic_write_text

    settings = load_settings()
    settings.update(changes)
    try:
        atomic_write_text(_settings_path(), json.dumps(settings, indent=1))
    except OSError as e:
        log.warning("could not save GUI settings: %s", e)


class RunRegistry(QObject):
    """Trained runs known to this session; Train announces new runs, Predict lists them."""

    run_added = Signal(str)

    def runs(self) -> list[str]:
        return [r for r in load_settings().get("recent_runs", []) if Path(r).is_dir()]

    def add(self, run_dir: str | Path) -> None:
        run = str(Path(run_dir).resolve())
        recent = [r for r in load_settings().get("recent_runs", []) if r != run]
        update_settings(recent_runs=[run, *recent][:10])
        self.run_added.emit(run)


RUNS = RunRegistry()


# --------------------------------------------------------------------------- small widgets

class PathEdit(QWidget):
    """A path field: magicgui's :class:`~magicgui.widgets.FileEdit` (a line edit and a "…"
    button opening the file or folder dialog), with an empty text meaning "not set" (FileEdit
    alone reads an empty field as the current folder) and ``edit.editingFinished`` emitted after
    a choice in the dialog as after typing."""

    #: Our modes -> magicgui's FileDialogMode values.
    MODES = {"dir": "d", "file": "r", "save": "w"}

    def __init__(self, mode: str = "dir", placeholder: str = "", filter: str = "", parent=None):
        from magicgui.widgets import FileEdit

        super().__init__(parent)
        if mode not in self.MODES:
            raise ValueError(f"PathEdit mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode, self.filter = mode, filter
        self.file_edit = FileEdit(mode=self.MODES[mode], filter=filter or None)
        self.file_edit.choose_btn.text = "…"
        self.edit = self.file_edit.line_edit.native  # the QLineEdit
        self.edit.setText("")
        self.edit.setPlaceholderText(placeholder)
        self.button = self.file_edit.choose_btn.native
        self.button.setMaximumWidth(30)
        # connected after FileEdit's own handler: runs once the dialog has set the path
        self.file_edit.choose_btn.changed.connect(lambda *_: self.edit.editingFinished.emit())
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.file_edit.native)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:
        self.edit.setText(str(text))


# --------------------------------------------------------------------------- viewer state

def channel_layers_of(viewer) -> dict[str, Any]:
    """``{colour: layer}`` of the HPA channel layers in the viewer (the last one of each colour)."""
    return {ly.metadata["hpa_channel"]: ly for ly in roles(viewer.layers, "channel")
            if ly.metadata.get("hpa_channel") in CHANNELS}


def current_image(viewer):
    """The HPA image shown in the viewer, rebuilt from its four channel layers, or None."""
    from napari_cpgcn.io.hpa import HPAImage

    chans = channel_layers_of(viewer)
    if len(chans) < 4:
        return None
    ids = {chans[c].metadata.get("image_id") for c in CHANNELS}
    if len(ids) != 1:
        return None
    data = np.stack([np.asarray(chans[c].data) for c in CHANNELS])
    paths = {c: Path(chans[c].metadata.get("path") or "") for c in CHANNELS}
    return HPAImage(data=data, image_id=ids.pop(), paths=paths,
                    bit_depth=16 if data.dtype == np.uint16 else 8)


def cells_layer_of(viewer, image_id: str | None = None):
    """The ``cells`` Labels layer (of ``image_id`` when given), or None."""
    from napari_cpgcn._napari.layers import CELLS_LAYER

    candidates = [ly for ly in viewer.layers if type(ly).__name__ == "Labels"
                  and (ly.name == CELLS_LAYER or ly.metadata.get("hpa_role") == "cells")]
    if image_id is not None:
        candidates = [ly for ly in candidates if ly.metadata.get("image_id") in (None, image_id)]
    return candidates[-1] if candidates else None


def relink_cells_layer(viewer, old, on_selected):
    """Follow the viewer's current ``cells`` layer: ``(layer, changed)``; when it is another layer
    than ``old``, ``on_selected`` is moved from ``old``'s ``selected_label`` event to the new one's."""
    layer = cells_layer_of(viewer)
    if layer is old:
        return layer, False
    if old is not None:
        try:
            old.events.selected_label.disconnect(on_selected)
        except Exception:  # noqa: BLE001 - the layer is gone or was never connected
            pass
    if layer is not None:
        layer.events.selected_label.connect(on_selected)
    return layer, True


def batched(viewer):
    """A context in which napari updates its scene graph once, at the end (``LayerList.batched_update``).

    Why: napari's canvas runs ``gc.collect()`` after every removed layer; with torch loaded that
    took 0.8 s per layer here, so removing a prediction's ten layers froze the viewer for ~8 s.
    """
    batch = getattr(viewer.layers, "batched_update", None)
    return batch() if batch is not None else contextlib.nullcontext()


def remove_layers(viewer, layers: Iterable[Any]) -> None:
    """Remove ``layers`` from the viewer in one scene-graph update."""
    todo = [ly for ly in layers if ly in viewer.layers]
    if not todo:
        return
    with batched(viewer):
        for ly in todo:
            viewer.layers.remove(ly)


# --------------------------------------------------------------------------- one image at a time

_SINGLE_IMAGE_VIEWERS: weakref.WeakSet = weakref.WeakSet()  # their layer lists


def install_single_image(viewer) -> None:
    """Keep one HPA image in ``viewer``: opening another (File > Open, drag and drop) replaces the first.

    When channel layers of a new image id arrive, the channel, ``cells`` and CAM layers of the
    other image ids are removed (after the insert has finished: the reader adds four layers),
    so Segment, Predict and Export all work on the image just opened. Idempotent per viewer.
    """
    key = viewer.layers
    if key in _SINGLE_IMAGE_VIEWERS:
        return
    _SINGLE_IMAGE_VIEWERS.add(key)
    from qtpy.QtCore import QTimer

    def inserted(event) -> None:
        meta = getattr(event.value, "metadata", {}) or {}
        if meta.get("hpa_role") == "channel" and meta.get("image_id"):
            QTimer.singleShot(0, lambda: keep_only_image(viewer, meta["image_id"]))

    viewer.layers.events.inserted.connect(inserted)


def keep_only_image(viewer, image_id: str) -> list[str]:
    """Remove the channel / cells / CAM layers of every image but ``image_id``; returns their names."""
    others = [ly for role in ("channel", "cells", "cam") for ly in roles(viewer.layers, role)
              if ly.metadata.get("image_id") not in (None, image_id)]
    if not others:
        return []
    names = [ly.name for ly in others]
    remove_layers(viewer, others)
    log.info("opened %s: removed the layers of the previous image (%s)", image_id, ", ".join(names))
    viewer.reset_view()
    return names
