"""Make the Review widget screenshot of docs/gui.md (run under Xvfb).

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python scripts/review_screenshot.py RUN_DIR

The real image is the Kaggle 2021 field ``000a6c98-…`` of ``../shared/data/hpa-samples`` with
its HPA-Cell-Segmentation mask (``_predictedmask.png``); RUN_DIR predicts it (any trained run).
Two cells are corrected through the widget into a temporary PRED_DIR, then the view walks to
the next suggested cell. Writes ``docs/images/gui_review.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.modules.setdefault("triton", None)  # type: ignore[arg-type]  # see docs/gui.md, known issue
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gui_screenshots import IMAGE_ID, SAMPLES, save, settle  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="trained run folder")
    args = ap.parse_args(argv)
    os.environ.setdefault("NAPARI_CPGCN_CONFIG_DIR", tempfile.mkdtemp(prefix="cpgcn_shots_"))
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_cpgcn._napari.layers import cells_layer, channel_layers
    from napari_cpgcn._napari.widgets.review import ReviewWidget
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.io.masks import read_mask
    from napari_cpgcn.pipeline.predictor import load_predictor

    image = read_image(SAMPLES, image_id=IMAGE_ID)
    cells = read_mask(SAMPLES / f"{IMAGE_ID}_predictedmask.png")
    pred = load_predictor(args.run, device="cpu").predict(image, cells=cells, with_cams=False)
    viewer = napari.Viewer()
    viewer.window.resize(1900, 1040)
    for data, kw, _ in channel_layers(image):
        viewer.add_image(data, **kw)
    data, kw, _ = cells_layer(pred.cells, pred.table, IMAGE_ID)
    layer = viewer.add_labels(data, **kw)
    w = ReviewWidget(viewer)
    viewer.window.add_dock_widget(w, name="Review", area="right")
    w.open_pred_dir(tempfile.mkdtemp(prefix="cpgcn_review_"))
    app = QApplication.instance()
    w.color_unc.setChecked(True)
    for _ in range(2):
        w.step(1)
        w.boxes[0].setChecked(True)
        w.confirm()
    w.step(1)
    layer.opacity = 0.5
    settle(app, 2.0)
    save(viewer, "gui_review.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
