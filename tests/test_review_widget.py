"""Review dock widget under Xvfb: corrections land on disk at once, survive a close and a kill, undo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from napari_cpgcn.classes import N_CLASSES, NEGATIVE, SHORT_NAMES
from napari_cpgcn.review.corrections import read_corrections

GOLGI = SHORT_NAMES.index("golgi") if "golgi" in SHORT_NAMES else 7


def _grid(n: int) -> np.ndarray:
    m = np.zeros((40, 40 * n), np.uint32)
    for i in range(n):
        m[4:36, 40 * i + 4:40 * i + 36] = i + 1
    return m


def _cells_layer(viewer, image_id="img_a"):
    """A ``cells`` layer made by the real table builder: 4 confident cells, cell 3 ambiguous."""
    from napari_cpgcn._napari.layers import cells_layer
    from napari_cpgcn.pipeline.predictor import CellPrediction

    cells = _grid(4)
    image_p = np.full(N_CLASSES, 0.01, np.float32)
    image_p[[0, 7]] = 0.99
    cell_p = np.full((4, N_CLASSES), 0.01, np.float32)
    cell_p[:, 0] = 0.99
    cell_p[:, 7] = 0.98
    cell_p[2, 7] = 0.5
    table = CellPrediction.from_parts(image_id, cells, image_p, cell_p).table
    data, kwargs, _ = cells_layer(cells, table, image_id)
    return viewer.add_labels(data, **kwargs)


def test_correction_saved_at_once_survives_close_reload_and_undo(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.key_bindings import KeyBinding

    from napari_cpgcn._napari.widgets.review import CORRECTED_LAYER, ReviewWidget

    pred = tmp_path / "pred"
    pred.mkdir()
    viewer = make_napari_viewer()
    layer = _cells_layer(viewer)
    w = ReviewWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.open_pred_dir(pred)
    w.step(1)                                   # the most uncertain cell first
    assert w.cell_id == 3 and layer.selected_label == 3
    scene = getattr(viewer, "scene", None)
    camera = scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera
    np.testing.assert_allclose(camera.center[-2:], (19.5, 99.5), atol=1.0)   # centred on cell 3
    # colour by uncertainty: the ambiguous cell gets the brightest colour
    w.color_unc.setChecked(True)
    cols = {k: v for k, v in layer.colormap.color_dict.items() if k not in (None, 0)}
    assert max(cols, key=lambda k: sum(cols[k][:3])) == 3
    assert w.ticks() == [0]                     # the prediction (fused >= 0.5: golgi is 0.495)
    w.boxes[GOLGI].setChecked(True)             # the biologist: golgi too
    assert w.confirm()
    rows = read_corrections(pred)               # on disk at once
    assert [(c.image_id, c.cell_id, c.labels) for c in rows] == [("img_a", 3, (0, GOLGI))]
    assert (pred / "masks" / "img_a.tif").is_file()   # the cells the correction refers to
    drawn = viewer.layers[CORRECTED_LAYER].data
    assert set(np.unique(drawn)) == {0, 3}      # only the corrected cell is outlined
    # Negative excludes the other classes
    w.boxes[NEGATIVE].setChecked(True)
    assert w.ticks() == [NEGATIVE]
    w.boxes[0].setChecked(True)
    assert w.ticks() == [0]
    # keys: n = next cell, a = accept its prediction
    layer.keymap[KeyBinding.from_str("n")](layer)
    assert w.cell_id != 3 and w.position == 1
    layer.keymap[KeyBinding.from_str("a")](layer)
    assert len(read_corrections(pred)) == 2
    viewer.close()

    # reopened: the corrections are back and the corrected cell shows its labels
    viewer2 = make_napari_viewer()
    _cells_layer(viewer2)
    w2 = ReviewWidget(viewer2)
    assert w2.open_pred_dir(pred)
    w2.show_cell(3)
    assert w2.ticks() == [0, GOLGI]
    assert "corrected" in w2.info.text()
    w2.undo()
    w2.undo()
    assert read_corrections(pred) == []
    assert set(np.unique(viewer2.layers[CORRECTED_LAYER].data)) == {0}
    w2.show_cell(3)
    assert w2.ticks() == [0]                   # back to the prediction


def test_a_killed_viewer_keeps_every_confirmed_correction(tmp_path):
    """A viewer process killed (SIGKILL) mid-review: every confirmed correction is on disk."""
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs the X display of pytest-xvfb")
    pred = tmp_path / "pred"
    pred.mkdir()
    here = os.path.dirname(__file__)
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.modules.setdefault("triton", None)
        sys.path.insert(0, {here!r})
        import napari
        from test_review_widget import _cells_layer
        from napari_cpgcn._napari.widgets.review import ReviewWidget
        viewer = napari.Viewer(show=False)
        _cells_layer(viewer)
        w = ReviewWidget(viewer)
        w.open_pred_dir({str(pred)!r})
        for _ in range(3):
            w.step(1)
            assert w.accept_prediction()
        w.step(1)
        w.boxes[0].setChecked(False)   # a fourth cell half-edited, never confirmed
        print("confirmed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert "confirmed" in p.stdout
    rows = read_corrections(pred)
    assert len(rows) == 3 and len({c.cell_id for c in rows}) == 3
    assert not list(pred.glob(".corrections.csv.*"))


def test_finetune_button_trains_in_a_worker_and_repredicts(make_napari_viewer, qtbot, tmp_path, tiny_trained,
                                                           tiny_data, one_torch_thread):
    from napari_cpgcn._napari.layers import cells_layer, channel_layers
    from napari_cpgcn._napari.widgets.review import ReviewWidget
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.pipeline.predictor import load_predictor

    run, _ = tiny_trained
    iid = sorted(p.name[:-len("_green.png")] for p in (tiny_data / "images").glob("*_green.png"))[0]
    image = read_image(tiny_data / "images", image_id=iid)
    pred = load_predictor(run, device="cpu").predict(image, with_cams=False)
    viewer = make_napari_viewer()
    for data, kw, _ in channel_layers(image):
        viewer.add_image(data, **kw)
    data, kw, _ = cells_layer(pred.cells, pred.table, iid)
    layer = viewer.add_labels(data, **kw)
    w = ReviewWidget(viewer)
    (tmp_path / "pred").mkdir()
    assert w.open_pred_dir(tmp_path / "pred")
    w.step(1)
    w._set_ticks({5})
    assert w.confirm()
    before = layer.features.copy()
    w.run_dir.setText(str(run))
    w.out_dir.setText(str(tmp_path / "run2"))
    w.epochs.setValue(1)
    w.start_finetune()
    assert not w.finetune_button.isEnabled()       # the GUI thread is free, the worker trains
    qtbot.waitUntil(lambda: "re-predicted" in w.status.text(), timeout=240_000)
    assert (tmp_path / "run2" / "finetune.json").is_file()
    assert w.finetune_button.isEnabled()
    assert not np.allclose(before["cell_nuclear_bodies"], layer.features["cell_nuclear_bodies"])


def test_cell_table_sorts_by_uncertainty(make_napari_viewer, qtbot):
    from qtpy.QtCore import Qt

    from napari_cpgcn._napari.widgets.table import COLUMNS, CellTableWidget

    viewer = make_napari_viewer()
    layer = _cells_layer(viewer)
    t = CellTableWidget(viewer)
    t.set_layer(layer)
    col = COLUMNS.index("uncertainty")
    t.table.sortItems(col, Qt.SortOrder.DescendingOrder)
    assert t.table.item(0, 0).text() == "3"       # the ambiguous cell on top
    assert float(t.table.item(0, col).text()) > float(t.table.item(1, col).text())
