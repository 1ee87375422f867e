"""How responsive the napari viewer stays while the Train widget trains in its worker.

A QTimer ticks every ``--tick-ms`` on the GUI thread; the delay of a tick is how much later than
scheduled it fired — the time the event loop was busy (handling the worker's events, redrawing
the loss plot, painting the canvas). It is measured while idle (baseline) and while the whole
pipeline trains on a small synthetic set through :class:`~napari_cpgcn._napari.widgets.train.TrainWidget`.
Target: worst delay < 200 ms.

Run (needs an X server; under a headless machine use Xvfb)::

    xvfb-run -a .venv/bin/python benchmarks/bench_gui_responsiveness.py

Prints a table of tick delays (median, 95th, 99th percentile, worst) per condition.
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
    args = ap.parse_args(argv)

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


if __name__ == "__main__":
    raise SystemExit(main())
