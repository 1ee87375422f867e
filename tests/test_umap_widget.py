"""The UMAP dock widget: selection in the plot -> highlighted cells; a cell clicked -> ringed point."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cpgcn.classes import SHORT_NAMES


def _grid_cells() -> np.ndarray:
    cells = np.zeros((40, 40), np.uint32)
    for k, (sy, sx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        cells[sy * 20 + 2:(sy + 1) * 20 - 2, sx * 20 + 2:(sx + 1) * 20 - 2] = k + 1
    return cells


def _profiles():
    """4 cells of img0 (1, 2 bottom left of the plot, 3, 4 top right) and 2 of img1 (bottom left)."""
    obs = pd.DataFrame({
        "image_id": ["img0"] * 4 + ["img1"] * 2,
        "cell_id": [1, 2, 3, 4, 1, 2],
        "top_class": [SHORT_NAMES[2], SHORT_NAMES[2], SHORT_NAMES[7], SHORT_NAMES[7], SHORT_NAMES[0], SHORT_NAMES[0]],
        "area": [100, 110, 120, 130, 140, 150],
        **{f"fused_{s}": np.linspace(0.1, 0.9, 6) for s in SHORT_NAMES},
    })
    coords = np.array([[0, 0], [0.2, 0.1], [5, 5], [5.1, 4.9], [0.1, 0.2], [0.3, 0.3]], np.float32)
    return obs, coords


@pytest.fixture
def widget(make_napari_viewer, qtbot):
    from napari_cpgcn._napari.widgets.umap import UMAPWidget

    viewer = make_napari_viewer()
    layer = viewer.add_labels(_grid_cells(), name="cells", metadata={"hpa_role": "cells", "image_id": "img0"})
    w = UMAPWidget(viewer)
    qtbot.addWidget(w)
    return w, layer


def test_box_and_lasso_selection_highlight_cells(widget):
    from napari_cpgcn.profiles.view import DIMMED, HIGHLIGHT

    w, layer = widget
    w.set_profiles(*_profiles())
    assert w.color_combo.count() >= 3 and w.color_combo.itemText(0) == "top class"
    with_signal = []
    w.selection_changed.connect(with_signal.append)
    w.select_box(-1, 1, -1, 1)  # cells 1, 2 of img0 and both of img1
    assert sorted(w.selected.tolist()) == [0, 1, 4, 5] and len(with_signal) == 1
    assert layer.metadata["umap_selected"] == [1, 2]  # only the shown image's cells
    hi, dim = (np.array(_rgba(c)) for c in (HIGHLIGHT, DIMMED))
    np.testing.assert_allclose(layer.get_color(1), hi, atol=0.01)
    np.testing.assert_allclose(layer.get_color(2), hi, atol=0.01)
    np.testing.assert_allclose(layer.get_color(3), dim, atol=0.01)
    np.testing.assert_allclose(w.sel_scatter.get_offsets(), w.coords[w.selected])
    # a lasso around the top-right pair
    w.selector_combo.setCurrentText("box")
    w.selector_combo.setCurrentText("lasso")
    w.select_polygon([[4, 4], [6, 4], [6, 6], [4, 6]])
    assert layer.metadata["umap_selected"] == [3, 4]
    np.testing.assert_allclose(layer.get_color(3), hi, atol=0.01)
    np.testing.assert_allclose(layer.get_color(1), dim, atol=0.01)
    w.clear_btn.click()
    assert layer.metadata["umap_selected"] == [] and len(w.selected) == 0


def test_cell_clicked_in_canvas_is_ringed_in_the_plot(widget):
    w, layer = widget
    w.set_profiles(*_profiles())
    layer.selected_label = 3
    assert w.highlighted == 2
    np.testing.assert_allclose(w.marker.get_offsets(), [[5, 5]])
    layer.selected_label = 9  # not a cell of the table: no ring
    assert w.highlighted is None and len(w.marker.get_offsets()) == 0


def test_colour_modes_and_bad_coordinates(widget):
    w, _ = widget
    obs, coords = _profiles()
    w.set_profiles(obs, coords)
    for mode in ("top class", "uncertainty", "area"):
        w.color_combo.setCurrentText(mode)
        assert w.scatter.get_facecolors().shape == (6, 4)
    assert not np.allclose(w.scatter.get_facecolors()[0], w.scatter.get_facecolors()[-1])
    with pytest.raises(ValueError, match="expected \\(6, 2\\)"):
        w.set_profiles(obs, coords[:3])


def test_load_cells_h5ad(widget, qtbot, tmp_path):
    import anndata as ad

    w, layer = widget
    obs, coords = _profiles()
    a = ad.AnnData(obs=obs.set_index(obs.image_id + ":" + obs.cell_id.astype(str)), obsm={"X_umap": coords})
    a.write_h5ad(tmp_path / "cells.h5ad")
    with qtbot.waitSignal(w.loaded, timeout=20000):
        w.load(tmp_path / "cells.h5ad")
    assert len(w.obs) == 6 and "6 cells of 2 images" in w.status.text()
    w.select_box(4, 6, 4, 6)
    assert layer.metadata["umap_selected"] == [3, 4]


def _rgba(color: str):
    from matplotlib.colors import to_rgba

    return to_rgba(color)


def test_export_widget_writes_cells_h5ad_that_the_umap_widget_shows(make_napari_viewer, qtbot, tmp_path,
                                                                     tiny_data, tiny_trained, one_torch_thread):
    """The GUI export (real tiny run): embeddings + cells.h5ad, then opened in the UMAP widget."""
    import anndata as ad

    from napari_cpgcn._napari.widgets.export import ExportWidget
    from napari_cpgcn._napari.widgets.umap import UMAPWidget

    run, _ = tiny_trained
    viewer = make_napari_viewer()
    w = ExportWidget(viewer)
    qtbot.addWidget(w)
    w.folder_edit.setText(str(tiny_data / "images"))
    w.run_edit.setText(str(run))
    w.out_edit.setText(str(tmp_path / "out"))
    w.h5ad_check.setChecked(True)
    with qtbot.waitSignal(w.exported, timeout=300000):
        w.export_folder()
    qtbot.waitUntil(lambda: w._worker is None, timeout=10000)
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    a = ad.read_h5ad(tmp_path / "out" / "cells.h5ad")
    assert a.n_obs == len(cells) and "X_cpgcn" in a.obsm and "X_umap" in a.obsm
    u = UMAPWidget(viewer)
    qtbot.addWidget(u)
    with qtbot.waitSignal(u.loaded, timeout=60000):
        u.load(tmp_path / "out" / "cells.h5ad")
    np.testing.assert_allclose(u.coords, a.obsm["X_umap"])
