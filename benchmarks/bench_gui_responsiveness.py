"""How responsive the napari viewer stays while the Train widget trains in its worker.

A QTimer ticks every ``--tick-ms`` on the GUI thread; the delay of a tick is how much later than
scheduled it fired — the time the event loop was busy (handling the worker's events, redrawing
the loss plot, painting the canvas). It is measured while idle (baseline) and while the whole
pipeline trains on a small synthetic set through :class:`~napari_cpgcn._napari.widgets.train.TrainWidget`.
Target: worst delay < 200 ms.

Run (needs an X server; under a headless machine use Xvfb)::

    xvfb-run -a .venv/bin/python benchmarks/bench_gui_responsiveness.py

Prints a table of tick delays (median, 95th, 99th percentile, worst) per condition.

``--actions FOLDER --run RUN`` measures the viewer's actions on real images instead (issue 19):
open an image (HPA browser), Predict (a ``cells`` layer from FOLDER's ``{ID}_predictedmask.png``
is given, so the time is the widget's, not segmentation's), colour cells by top class, edit the
cells (one painted stroke), browse to the next image after a prediction. Worst tick per action::

    xvfb-run -a .venv/bin/python benchmarks/bench_gui_responsiveness.py --actions ../shared/data/hpa-samples \
        --run RUN
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _stats(delays: list[float]) -> dict[str, float]:
    a = np.asarray(delays) if delays else np.zeros(1)
    return {"ticks": len(delays), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "worst": float(a.max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=8)
    ap.add_argument("--size", type=int, default=128, help="synthetic image side")
    ap.add_argument("--image-size", type=int, default=96, help="model input side")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--tick-ms", type=int, default=20)
    ap.add_argument("--idle-s", type=float, default=3.0)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="list every delay > 100 ms with the stage it fell in")
    ap.add_argument("--actions", metavar="FOLDER", help="measure the viewer's actions on FOLDER's images instead")
    ap.add_argument("--run", help="with --actions: the trained run Predict uses")
    args = ap.parse_args(argv)
    if args.actions:
        return actions_main(args)

    import torch

    torch.set_num_threads(args.torch_threads)
    import napari
    from qtpy.QtCore import QElapsedTimer, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_cpgcn._napari.widgets.browser import BrowserWidget
    from napari_cpgcn._napari.widgets.common import prepare_torch
    from napari_cpgcn._napari.widgets.train import TrainWidget
    from napari_cpgcn.synth import generate_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench_gui_"))
    os.environ.setdefault("NAPARI_CPGCN_CONFIG_DIR", str(tmp / "config"))
    data = generate_dataset(tmp / "data", args.n_images, size=args.size, seed=0)

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    browser = BrowserWidget(viewer)
    viewer.window.add_dock_widget(browser, name="HPA browser")
    browser.set_folder(data)
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train")
    prepare_torch()  # the widget does this on its first start; keep it out of the measurement
    t_end = time.perf_counter() + 2
    while time.perf_counter() < t_end:  # let the first image load and the window settle
        app.processEvents()

    delays: dict[str, list[float]] = {"idle": [], "training": []}
    phase = {"name": "idle"}
    clock = QElapsedTimer()
    last = {"t": None}

    timeline: list[tuple[float, str]] = []  # (ms, "kind stage") of every worker event
    big: list[tuple[float, float]] = []

    def tick():
        now = clock.elapsed()
        if last["t"] is not None:
            d = max(0.0, now - last["t"] - args.tick_ms)
            delays[phase["name"]].append(d)
            if d > 100:
                big.append((now, d))
        last["t"] = now

    timer = QTimer()
    timer.setInterval(args.tick_ms)
    timer.timeout.connect(tick)
    clock.start()
    timer.start()
    t_end = time.perf_counter() + args.idle_s
    while time.perf_counter() < t_end:
        app.processEvents()
        time.sleep(0.001)

    train.preset.setCurrentText("tiny (a test)")
    train.device.setCurrentText("cpu")
    train.image_size.setValue(args.image_size)
    train.epochs.setValue(args.epochs)
    train.data_edit.setText(str(data / "images"))
    train.csv_edit.setText(str(data / "train.csv"))
    train.out_edit.setText(str(tmp / "run"))
    done = {"v": False}
    train.worker_finished.connect(lambda: done.update(v=True))
    phase["name"] = "training"
    last["t"] = None
    t0 = time.perf_counter()
    train.start()
    train._worker.yielded.connect(lambda ev: timeline.append((clock.elapsed(), f"{ev.kind.value} {ev.stage}")))
    while not done["v"]:
        app.processEvents()
        time.sleep(0.001)
    seconds = time.perf_counter() - t0
    timer.stop()
    n_batches = sum(len(v) for v in train.plot.loss.values())

    print(f"GUI responsiveness while training (tick every {args.tick_ms} ms; torch threads "
          f"{args.torch_threads}; {args.n_images} images {args.size}², model input {args.image_size}², "
          f"{args.epochs} epochs/stage; training took {seconds:.1f} s, {n_batches} batches)")
    print(f"{'condition':<10} {'ticks':>6} {'median ms':>10} {'p95 ms':>8} {'p99 ms':>8} {'worst ms':>9}")
    for name, d in delays.items():
        s = _stats(d)
        print(f"{name:<10} {s['ticks']:>6d} {s['median']:>10.1f} {s['p95']:>8.1f} {s['p99']:>8.1f} {s['worst']:>9.1f}")
    if args.verbose:
        for t, d in big:
            before = [e for tt, e in timeline if tt <= t - d][-1:] or ["(start)"]
            print(f"  delay {d:6.0f} ms at {t / 1000:7.2f} s, after event: {before[0]}")
    worst = _stats(delays["training"])["worst"]
    print(f"worst delay while training: {worst:.0f} ms ({'meets' if worst < 200 else 'misses'} the < 200 ms target)")
    viewer.close()
    return 0


def actions_main(args) -> int:
    """Worst 20 ms tick per viewer action on real images (see the module docstring)."""
    import torch

    torch.set_num_threads(args.torch_threads)
    import napari
    from qtpy.QtCore import QElapsedTimer, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_cpgcn._napari.widgets.browser import BrowserWidget
    from napari_cpgcn._napari.widgets.predict import PredictWidget
    from napari_cpgcn.io.masks import read_mask

    tmp = Path(tempfile.mkdtemp(prefix="bench_gui_actions_"))
    os.environ.setdefault("NAPARI_CPGCN_CONFIG_DIR", str(tmp / "config"))
    folder = Path(args.actions)
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    clock = QElapsedTimer()
    state = {"last": None, "delays": []}

    def tick():
        now = clock.elapsed()
        if state["last"] is not None:
            state["delays"].append(max(0.0, now - state["last"] - args.tick_ms))
        state["last"] = now

    timer = QTimer()
    timer.setInterval(args.tick_ms)
    timer.timeout.connect(tick)
    clock.start()
    timer.start()

    def pump(seconds: float, until=None) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds and not (until and until()):
            app.processEvents()
            time.sleep(0.001)
        return time.perf_counter() - t0

    rows: list[tuple[str, float, dict[str, float]]] = []

    def measure(name: str, action, until, settle: float = 0.5, limit: float = 300.0) -> None:
        pump(0.3)
        state["delays"], state["last"] = [], clock.elapsed()  # a synchronous action delays the next tick
        t0 = time.perf_counter()
        action()
        pump(limit, until)
        seconds = time.perf_counter() - t0
        pump(settle)
        rows.append((name, seconds, _stats(state["delays"])))

    browser = BrowserWidget(viewer)
    viewer.window.add_dock_widget(browser, name="HPA browser")
    predict = PredictWidget(viewer)
    viewer.window.add_dock_widget(predict, name="Predict")
    predict.device_combo.setCurrentText("cpu")
    predict.set_run(str(args.run))
    loaded: list[str] = []
    browser.image_loaded.connect(loaded.append)
    measure("open image (browser)", lambda: browser.set_folder(folder), lambda: bool(loaded))
    image_id = loaded[-1]
    shape = next(ly.data.shape for ly in viewer.layers)
    mask_path = folder / f"{image_id}_predictedmask.png"
    mask = read_mask(mask_path) if mask_path.is_file() else None

    def add_cells():
        if mask is not None:
            viewer.add_labels(mask, name="cells", metadata={"hpa_role": "cells", "image_id": image_id})

    measure("add the cells mask", add_cells, lambda: True)
    done: list[str] = []
    predict.predicted.connect(done.append)
    finished = {"v": False}

    def start():
        predict.predict()
        if predict._worker is not None:
            predict._worker.finished.connect(lambda: finished.update(v=True))
        else:
            finished.update(v=True)

    measure("Predict (first: imports, model, layers)", start, lambda: bool(done) or finished["v"], settle=1.0)
    done.clear()
    finished["v"] = False
    measure("Predict again", start, lambda: bool(done) or finished["v"], settle=1.0)
    measure("colour cells by top class", lambda: predict.color_by_class.setChecked(True), lambda: True)
    measure("colour back (label colours)", lambda: predict.color_by_class.setChecked(False), lambda: True)
    cells = next((ly for ly in viewer.layers if ly.name == "cells"), None)
    if cells is not None:
        cells.brush_size = 40

        def stroke():
            cy, cx = (s // 2 for s in cells.data.shape[-2:])
            cells.paint((cy, cx), int(cells.data.max()) + 1)

        measure("paint a new cell (edit)", stroke, lambda: True)
    n = len(loaded)
    measure("browse to the next image (after Predict)", browser.next, lambda: len(loaded) > n, settle=1.0)
    timer.stop()
    print(f"Worst GUI-thread stall per action (tick every {args.tick_ms} ms; torch threads {args.torch_threads}; "
          f"image {image_id} {shape[-1]}x{shape[-2]}; run {Path(args.run).name}; napari_cpgcn from "
          f"{Path(__import__('napari_cpgcn').__file__).parent})")
    print(f"{'action':<42} {'seconds':>8} {'ticks':>6} {'median ms':>10} {'p99 ms':>8} {'worst ms':>9}")
    for name, seconds, st in rows:
        print(f"{name:<42} {seconds:>8.2f} {st['ticks']:>6d} {st['median']:>10.1f} {st['p99']:>8.1f} {st['worst']:>9.1f}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
