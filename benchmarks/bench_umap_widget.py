"""Responsiveness of the UMAP dock widget with many points (a real napari viewer under Xvfb).

Times, on the GUI thread, with N random cells (the first 400 belonging to the image shown in a
``cells`` layer of 400 cells): showing the points (``set_profiles`` + a full canvas draw), a
box selection of about a quarter of them (highlighting the cells layer) + draw, a recolour +
draw, and a canvas click ringing a point + draw. Median of ``--repeats``.

Run::

    xvfb-run -a nice .venv/bin/python benchmarks/bench_umap_widget.py --points 20000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

sys.modules.setdefault("triton", None)  # as tests/conftest.py: Mesa's LLVM and Triton's clash


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import napari
    import numpy as np
    import pandas as pd

    from napari_cpgcn._napari.widgets.umap import UMAPWidget
    from napari_cpgcn.classes import SHORT_NAMES

    rng = np.random.default_rng(0)
    n = args.points
    cells = np.zeros((800, 800), np.uint32)
    for k in range(400):
        y, x = divmod(k, 20)
        cells[y * 40 + 2:y * 40 + 38, x * 40 + 2:x * 40 + 38] = k + 1
    obs = pd.DataFrame({"image_id": ["img0"] * 400 + [f"img{1 + i // 40}" for i in range(n - 400)],
                        "cell_id": np.r_[np.arange(1, 401), np.arange(n - 400) % 40 + 1],
                        "top_class": [SHORT_NAMES[k] for k in rng.integers(0, 19, n)],
                        "area": rng.integers(100, 5000, n)})
    for s in SHORT_NAMES:
        obs[f"fused_{s}"] = rng.random(n)
    coords = rng.normal(size=(n, 2)).astype(np.float32)

    viewer = napari.Viewer(show=True)
    viewer.add_labels(cells, name="cells", metadata={"hpa_role": "cells", "image_id": "img0"})
    w = UMAPWidget(viewer)
    viewer.window.add_dock_widget(w)
    layer = viewer.layers["cells"]
    app = napari.qt.get_qapp()

    def timed(fn) -> float:
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            w.canvas.draw()
            app.processEvents()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    rows = [
        ("a full canvas draw alone", timed(lambda: None)),
        ("show the points (set_profiles)", timed(lambda: w.set_profiles(obs, coords))),
        ("box selection (~1/4 of the points, cells layer highlighted)", timed(lambda: w.select_box(-5, 0, -5, 0))),
        ("recolour by uncertainty", timed(lambda: w.color_combo.setCurrentText("uncertainty")
                                            or w.color_combo.setCurrentText("top class"))),
        ("cell clicked in the canvas (ring its point)", timed(lambda: setattr(layer, "selected_label",
                                                                          int(rng.integers(1, 401))))),
    ]
    print(f"\n| UMAP widget, {n} points, median of {args.repeats} | seconds (incl. a full canvas draw) |")
    print("|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.3f} |")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
