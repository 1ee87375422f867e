"""Make the GUI screenshots of docs/gui.md (run under Xvfb).

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python scripts/gui_screenshots.py RUN_DIR

RUN_DIR is a trained run (``napari-cpgcn train`` / ``demo`` or the Train widget). The real
image is the Kaggle 2021 field ``000a6c98-…`` from ``../shared/data/hpa-samples``; cells come
from the Segment widget (classical backend). Writes ``docs/images/gui_*.png`` (< 400 KB each).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "data" / "hpa-samples"
IMAGE_ID = "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0"
OUT = REPO / "docs" / "images"


def wait_for(app, signal, timeout_s: float = 600):
    """Process events until ``signal`` fires; returns its arguments."""
    got: list = []
    signal.connect(lambda *a: got.append(a))
    t_end = time.perf_counter() + timeout_s
    while not got:
        if time.perf_counter() > t_end:
            raise TimeoutError(f"{signal} did not fire within {timeout_s} s")
        app.processEvents()
        time.sleep(0.01)
    return got[0]


def settle(app, seconds: float = 1.0) -> None:
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        app.processEvents()
        time.sleep(0.01)


def show_hover(app, viewer, layer, pos) -> None:
    """Put the cursor on ``pos`` and show what hovering there shows in the status bar."""
    viewer.cursor.position = pos
    for _ in range(3):
        app.processEvents()
        viewer.status = layer.get_status(pos, world=True)
        app.processEvents()
        time.sleep(0.05)


def save(viewer, name: str, max_kb: int = 390, width: int = 1500) -> Path:
    """Screenshot of the whole window, downsized and palette-quantised until it is < max_kb."""
    from PIL import Image

    arr = viewer.screenshot(canvas_only=False, flash=False)
    im = Image.fromarray(arr[..., :3])
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    path = OUT / name
    im.save(path, optimize=True)
    colors = 256
    while path.stat().st_size > max_kb * 1024 and colors >= 32:
        im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
        colors //= 2
    print(f"{path.relative_to(REPO)}: {im.width}x{im.height}, {path.stat().st_size // 1024} KB")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="trained run folder")
    ap.add_argument("--stacked", action="store_true",
                    help="also save gui_cams_stacked.png: the CAMs as one stacked layer with a class slider")
    ap.add_argument("--train-demo", action="store_true", help="also train a tiny run in the Train widget for gui_train.png")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NAPARI_CPGCN_CONFIG_DIR", tempfile.mkdtemp(prefix="cpgcn_shots_"))
    OUT.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari-cpgcn")
    viewer.window.resize(1900, 1040)
    app = QApplication.instance()

    def dock(name):
        return viewer.window.add_plugin_dock_widget("napari-cpgcn", name)

    # 1. browser on the real samples
    browser_dock, browser = dock("HPA browser")
    browser.set_folder(SAMPLES)
    wait_for(app, browser.image_loaded)
    row = browser.image_ids.index(IMAGE_ID)
    if browser.list.currentRow() != row:
        browser.list.setCurrentRow(row)
        wait_for(app, browser.image_loaded)
    viewer.layers[f"{IMAGE_ID} yellow"].visible = False  # HPA composites show red, green, blue
    viewer.reset_view()
    settle(app)
    save(viewer, "gui_browser.png")

    # 2. segment → predict: cells, CAMs, per-cell table
    seg_dock, seg = dock("Segment cells")
    seg.run()
    wait_for(app, seg.segmented)
    pred_dock, pred = dock("Predict (CAMs + per-cell table)")
    pred.set_run(str(Path(args.run).resolve()))
    pred.device_combo.setCurrentText("cpu")
    pred.predict()
    wait_for(app, pred.predicted)
    settle(app, 0.5)
    cells = viewer.layers["cells"]  # the widget's defaults: outlines, top-class CAM only
    pred.color_by_class.setChecked(True)
    viewer.layers[f"{IMAGE_ID} red"].visible = False  # protein (green) and nuclei (blue) under the CAMs
    # the table sorted by probability; its first cell selected (the view centres on it)
    from qtpy.QtCore import Qt

    pred.table.table.sortItems(2, Qt.SortOrder.DescendingOrder)
    pred.table.table.selectRow(0)
    pred.setMaximumWidth(560)
    feats = cells.features
    k = int(pred.table.table.item(0, 0).text())
    row = feats.loc[feats["index"] == k].iloc[0]
    pos = (float(row["centroid_y"]), float(row["centroid_x"]))
    viewer.layers.selection.active = cells  # the status bar describes the active layer
    browser_dock.hide()
    seg_dock.hide()
    viewer.reset_view()
    settle(app, 1.0)
    show_hover(app, viewer, cells, pos)
    save(viewer, "gui_predict.png")

    # 3. a row click: centred and zoomed on that cell
    pred.table.table.clearSelection()
    pred.table.select_cell(k)
    settle(app, 0.5)
    show_hover(app, viewer, cells, pos)
    save(viewer, "gui_predict_zoom.png")

    # 4. export the image: CSV + mask + run record (with the model card)
    exp_dock, exp = dock("Export per-cell CSV")
    exp.csv_edit.setText(str(Path(tempfile.mkdtemp(prefix="cpgcn_export_")) / f"{IMAGE_ID}.csv"))
    exp.export_current()
    settle(app, 0.5)
    save(viewer, "gui_export.png")
    # 5. stale: browse to the next image; the Predict widget says its results are for the old one
    exp_dock.hide()
    browser_dock.show()
    browser.next()
    wait_for(app, browser.image_loaded)
    viewer.reset_view()
    settle(app, 1.0)
    save(viewer, "gui_stale.png")
    # 6. Train on the run folder Predict used: it asks (here answered "cancel") and keeps every file
    browser_dock.hide()
    pred_dock.hide()
    train_dock, train = dock("Train (CP-GCN pipeline)")
    train.data_edit.setText(str(SAMPLES))
    train.csv_edit.setText(str(SAMPLES.parent / "kaggle2021-train-labels.csv"))
    train.out_edit.setText(str(Path(args.run).resolve()))
    train.ask_existing_run = lambda run, summary: "cancel"
    train.start()
    settle(app, 1.0)
    save(viewer, "gui_train_existing.png")
    train_dock.hide()
    pred_dock.show()

    if args.stacked:  # the alternative design, for comparison
        cam_layers_ = [ly for ly in viewer.layers if ly.metadata.get("hpa_role") == "cam"]
        stack = np.stack([ly.data for ly in cam_layers_])
        names = [ly.metadata["class_name"] for ly in cam_layers_]
        for ly in cam_layers_:
            viewer.layers.remove(ly)
        viewer.add_image(stack, name="CAMs (slider: " + ", ".join(names[:3]) + ", …)", colormap="magma",
                         blending="additive", opacity=0.6, contrast_limits=(0, 1))
        viewer.layers.move(len(viewer.layers) - 1, len(viewer.layers) - 2)
        viewer.reset_view()
        settle(app, 1.0)
        save(viewer, "gui_cams_stacked.png")

    if args.train_demo:
        from napari_cpgcn.synth import generate_dataset

        for ly in list(viewer.layers):
            viewer.layers.remove(ly)
        pred_dock.hide()
        data = generate_dataset(Path(tempfile.mkdtemp()) / "synth", 8, size=128, seed=0)
        browser_dock.show()
        browser.set_folder(data)
        wait_for(app, browser.image_loaded)
        train_dock, train = dock("Train (CP-GCN pipeline)")
        train.preset.setCurrentText("tiny (a test)")
        train.epochs.setValue(3)
        train.image_size.setValue(96)
        train.device.setCurrentText("cpu")
        train.data_edit.setText(str(data / "images"))
        train.csv_edit.setText(str(data / "train.csv"))
        train.out_edit.setText(str(data.parent / "run"))
        train.start()
        wait_for(app, train.worker_finished)
        settle(app, 1.0)
        save(viewer, "gui_train.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
