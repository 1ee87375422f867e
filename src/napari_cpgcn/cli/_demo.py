"""``napari-cpgcn demo``: the whole method end to end on synthetic data, in a few minutes on a CPU.

1. generate a small synthetic HPA-like data set with per-cell truth (:mod:`napari_cpgcn.synth`);
2. hold out a few images; train the whole pipeline (image model, CAM refinement, segmentation,
   pseudo-labels, cell model) on the rest with the ``tiny`` preset;
3. predict the held-out images with the batch engine (:mod:`napari_cpgcn.batch`);
4. evaluate: image-level mAP against the image labels and the Kaggle 2021 cell-level mAP
   against the synthetic cell truth; print the per-cell table head and both mAPs.

Every step resumes: rerunning with the same ``--out`` reuses the data, the finished training
stages and the finished predictions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("napari_cpgcn.cli.demo")

DESCRIPTION = """\
Run the whole CP-GCN method on synthetic data: generate a small HPA-like data set with
per-cell truth, train the pipeline with a tiny backbone (image model, CAM refinement, cell
segmentation, pseudo-labels, cell model), predict held-out images, evaluate, and print the
per-cell table and the image- and cell-level mAPs. A few minutes on a 2-core CPU.

Writes OUT/data (the data set), OUT/run (the trained run: use it with
`napari-cpgcn predict --model OUT/run` or in napari), OUT/predictions (masks, cells.csv,
images.csv) and OUT/demo.json (the scores). Rerunning with the same --out resumes.

Synthetic images are easy and the models tiny: the mAPs show that everything runs end to
end and learns, not what the method reaches on real HPA images.
"""


def register(subparsers) -> None:
    from napari_cpgcn.cli import add_common_arguments

    p = subparsers.add_parser("demo", help="synthetic data -> train -> predict -> evaluate, in minutes",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "-o", default="demo-output", metavar="DIR",
                   help="output folder (default ./demo-output; rerun to resume)")
    p.add_argument("--n-train", type=int, default=32, help="training images (default 32)")
    p.add_argument("--n-test", type=int, default=8, help="held-out test images (default 8)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--backbone", default="resnet18", help="backbone of both models (default resnet18)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per training stage (default 4)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0 = auto: the cores not busy with other work, at least "
                        "1; oversubscribed threads are many times slower on a busy machine)")
    p.add_argument("--rows", type=int, default=10, help="rows of the per-cell table to print (default 10)")
    add_common_arguments(p)
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------- steps

def auto_threads() -> int:
    """Cores not already busy (1-minute load average), at least 1, at most the cores.

    On a shared machine, torch's default of one thread per core competes with the other
    processes and its threads wait for each other: measured here, a resnet18 forward took
    0.66 s with 2 threads on a 2-core machine under load 8, and 0.05 s with 1.
    """
    import os

    cores = os.cpu_count() or 1
    try:
        busy = int(round(os.getloadavg()[0]))
    except (OSError, AttributeError):  # not available on this platform
        busy = 0
    return max(1, min(cores, cores - busy))


def make_data(out: Path, n_images: int, size: int, seed: int, quiet: bool) -> Path:
    """The synthetic data set (reused when ``synth.json`` says it was made with these settings)."""
    from napari_cpgcn.cli import progress_bar
    from napari_cpgcn.synth import generate_dataset

    data = out / "data"
    meta = data / "synth.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        if (m.get("n_images"), m.get("size"), m.get("seed")) == (n_images, size, seed):
            log.info("data: reusing %s", data)
            return data
        # Another data set: the run and predictions made from the old one would be reused
        # silently by the resumable steps, so they go (only the demo's own subfolders).
        import shutil

        log.info("data: settings changed; making a new data set, run and predictions in %s", out)
        for sub in ("data", "run", "predictions"):
            shutil.rmtree(out / sub, ignore_errors=True)
    with progress_bar(total=n_images, desc="1/4 synthetic data", unit="img", disable=quiet) as bar:
        generate_dataset(data, n_images, size=size, seed=seed, progress=bar)
    return data


def split(data: Path, n_test: int) -> tuple[Path, list[str], list[str]]:
    """Hold out the last ``n_test`` images; writes ``train_split.csv`` with the training labels."""
    from napari_cpgcn.io.tables import read_labels_csv, write_labels_csv

    labels = read_labels_csv(data / "train.csv")
    ids = list(labels.ids)
    if n_test >= len(ids):
        raise ValueError(f"--n-test {n_test} leaves no training image out of {len(ids)}")
    train_ids, test_ids = ids[:-n_test], ids[-n_test:]
    train_csv = data / "train_split.csv"
    write_labels_csv(train_csv, labels.subset(train_ids))
    return train_csv, train_ids, test_ids


def train(data: Path, train_csv: Path, run_dir: Path, args: argparse.Namespace) -> Path:
    """Train the whole pipeline with the tiny preset (finished stages are skipped on rerun)."""
    from napari_cpgcn.cli import progress_bar
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.pipeline import PipelineConfig, train_pipeline

    quiet = args.quiet
    config = PipelineConfig.tiny(backbone=args.backbone, image_size=args.size, epochs=args.epochs,
                                 seed=args.seed, device=args.device)
    bar = None
    stage = ""
    try:
        for ev in train_pipeline(data, train_csv, run_dir, config):
            if ev.kind == EventKind.STAGE_START:
                stage = ev.stage
                if bar is not None:
                    bar.close()
                bar = progress_bar(desc=f"2/4 train: {stage}", unit="batch", disable=quiet, leave=False)
            elif ev.kind == EventKind.STAGE_END:
                log.info("train: %s %s", ev.stage, ev.message)
            elif ev.kind in (EventKind.BATCH, EventKind.ITEM) and bar is not None:
                if ev.n_batches and bar.total != ev.n_batches:
                    bar.reset(total=ev.n_batches)
                if ev.n_epochs:
                    bar.set_description_str(f"2/4 train: {stage} epoch {ev.epoch}/{ev.n_epochs}", refresh=False)
                bar.n = ev.batch
                if ev.loss is not None:
                    bar.set_postfix_str(f"loss {ev.loss:.3f}", refresh=False)
                bar.refresh()
            elif ev.kind == EventKind.EPOCH_END and ev.metrics:
                log.debug("train %s epoch %d: %s", stage, ev.epoch, ev.metrics)
    finally:
        if bar is not None:
            bar.close()
    return run_dir


def predict(data: Path, run_dir: Path, pred_dir: Path, test_ids: list[str], device: str, quiet: bool):
    """Predict the held-out images with the batch engine."""
    from napari_cpgcn.batch import BatchConfigError, BatchOptions, predict_folder
    from napari_cpgcn.cli import progress_bar
    from napari_cpgcn.events import EventKind

    options = BatchOptions(device=device, submission=True)
    try:
        events = predict_folder(data / "images", run_dir, pred_dir, options, image_ids=test_ids)
        first = next(events)
    except BatchConfigError:  # the run was retrained since the last demo: predict again
        log.info("predict: the trained run changed since the last predictions; predicting again")
        options = BatchOptions(device=device, submission=True, overwrite=True)
        events = predict_folder(data / "images", run_dir, pred_dir, options, image_ids=test_ids)
        first = next(events)
    summary = None
    with progress_bar(total=len(test_ids), initial=first.batch, desc="3/4 predict", unit="img", disable=quiet) as bar:
        for ev in events:
            if ev.kind == EventKind.ITEM:
                bar.update(1)
            elif ev.kind == EventKind.DONE:
                summary = ev.result
    return summary


def evaluate(data: Path, pred_dir: Path, test_ids: list[str]) -> dict:
    """Image-level mAP (images.csv vs the image labels) and Kaggle cell mAP (vs the cell truth)."""
    import numpy as np
    import pandas as pd

    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.evaluation.cell import CellTruth, evaluate_prediction_folder
    from napari_cpgcn.evaluation.image import per_class_ap
    from napari_cpgcn.io.tables import read_labels_csv

    labels = read_labels_csv(data / "train.csv").subset(test_ids)
    images = pd.read_csv(pred_dir / "images.csv").set_index("image_id")
    missing = [i for i in test_ids if i not in images.index]
    if missing:
        raise RuntimeError(f"no prediction for {len(missing)} test images (see {pred_dir / 'failures.csv'})")
    scores = images.loc[test_ids, [f"image_{s}" for s in SHORT_NAMES]].to_numpy(np.float64)
    image_ap = per_class_ap(labels.labels, scores)

    truth = CellTruth.load(data / "truth")
    res = evaluate_prediction_folder(pred_dir, truth, test_ids)
    n_true = sum(len(truth.labels[i][0]) for i in test_ids if i in truth.labels)
    with open(pred_dir / "cells.csv", encoding="utf-8") as fh:
        n_cells = sum(1 for _ in fh) - 1
    present = np.isfinite(image_ap)
    return {
        "image_map": float(np.nanmean(image_ap)) if present.any() else float("nan"),
        "image_ap": {s: (None if not np.isfinite(a) else float(a)) for s, a in zip(SHORT_NAMES, image_ap, strict=True)},
        "cell_map": float(res["fused"].map),
        "cell_map_cell_model_only": float(res["cell"].map),
        "cell_map_image_model_only": float(res["image"].map),
        "n_test_images": len(test_ids),
        "n_predicted_cells": n_cells,
        "n_true_cells": n_true,
    }


def _table_head(pred_dir: Path, n: int) -> str:
    import pandas as pd

    cells = pd.read_csv(pred_dir / "cells.csv", keep_default_na=False)
    import numpy as np

    from napari_cpgcn.classes import SHORT_NAMES

    head = cells.head(n).copy()
    head["image_id"] = head["image_id"].str.slice(0, 18)
    fused = head[[f"fused_{s}" for s in SHORT_NAMES]].to_numpy(np.float64)
    head["top 3 classes (fused probability)"] = [
        "  ".join(f"{SHORT_NAMES[k]} {row[k]:.2f}" for k in np.argsort(-row, kind="stable")[:3]) for row in fused]
    cols = ["image_id", "cell_id", "area", "centroid_y", "centroid_x", "top 3 classes (fused probability)"]
    with pd.option_context("display.width", 160, "display.max_colwidth", 48, "display.precision", 1):
        return head[cols].to_string(index=False)


def run(args: argparse.Namespace) -> int:
    from napari_cpgcn.cli import UsageError, setup_logging

    if args.n_train < 4 or args.n_test < 1:
        raise UsageError("--n-train must be >= 4 and --n-test >= 1")
    if args.size < 64:
        raise UsageError(f"--size must be >= 64 pixels, got {args.size}")
    out = Path(args.out)
    from napari_cpgcn.io.atomic import check_writable

    check_writable(out)
    setup_logging(args, logfile=str(out / "demo.log"))
    from napari_cpgcn.cli._predict import close_log_file, progress_logging

    try:
        with progress_logging():
            return _run(args, out)
    finally:
        close_log_file(out / "demo.log")


def _run(args: argparse.Namespace, out: Path) -> int:
    import torch

    from napari_cpgcn.cli import EXIT_OK

    threads = args.threads if args.threads > 0 else auto_threads()
    torch.set_num_threads(threads)
    log.debug("torch threads: %d", threads)
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    t = time.perf_counter()
    data = make_data(out, args.n_train + args.n_test, args.size, args.seed, args.quiet)
    train_csv, train_ids, test_ids = split(data, args.n_test)
    times["data"] = time.perf_counter() - t
    log.info("data: %d training and %d held-out %dpx images in %s", len(train_ids), len(test_ids), args.size, data)

    t = time.perf_counter()
    run_dir = train(data, train_csv, out / "run", args)
    times["train"] = time.perf_counter() - t

    t = time.perf_counter()
    summary = predict(data, run_dir, out / "predictions", test_ids, args.device, args.quiet)
    if summary is None or summary.n_failed:
        raise RuntimeError(f"prediction failed for some images; see {out / 'predictions' / 'failures.csv'}")
    times["predict"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = evaluate(data, out / "predictions", test_ids)
    times["evaluate"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    scores["seconds"] = {k: round(v, 1) for k, v in times.items()}
    scores["failed_images"] = summary.n_failed if summary is not None else None
    scores["torch_threads"] = threads
    from napari_cpgcn.io.atomic import atomic_write_text

    atomic_write_text(out / "demo.json", json.dumps(scores, indent=1) + "\n")

    w = sys.stdout.write
    w(f"\nPer-cell predictions (first {args.rows} of {scores['n_predicted_cells']} rows of "
      f"{out / 'predictions' / 'cells.csv'}):\n")
    w(_table_head(out / "predictions", args.rows) + "\n\n")
    w(f"image-level mAP  (held-out images, vs image labels): {scores['image_map']:.3f}\n")
    w(f"cell-level mAP   (Kaggle 2021 metric, IoU >= 0.6, fused image x cell): {scores['cell_map']:.3f}\n")
    w(f"   cell model alone: {scores['cell_map_cell_model_only']:.3f}   "
      f"image model alone: {scores['cell_map_image_model_only']:.3f}\n")
    w(f"\n{len(train_ids)} training / {len(test_ids)} test images of {args.size}px; "
      f"{scores['n_predicted_cells']} cells predicted, {scores['n_true_cells']} true; "
      f"time {times['total']:.0f} s (data {times['data']:.0f}, train {times['train']:.0f}, "
      f"predict {times['predict']:.0f}, evaluate {times['evaluate']:.0f}); {threads} torch thread(s).\n"
      f"Trained run: {run_dir}  (napari-cpgcn predict IMAGES --model {run_dir} --out OUT)\n")
    return EXIT_OK
