"""``napari-cpgcn demo``: the whole method end to end on synthetic data, in a few minutes on a CPU.

1. generate a small synthetic HPA-like data set with per-cell truth (:mod:`napari_cpgcn.synth`);
2. hold out a few images; pretrain the backbone self-supervised on the rest (no labels,
   :mod:`napari_cpgcn.training.pretrain`), then train the whole pipeline (image model, CAM
   refinement, segmentation, pseudo-labels, cell model) from it with the ``tiny`` preset;
3. predict the held-out images with the batch engine (:mod:`napari_cpgcn.batch`);
4. choose the fusion of the image and cell scores on the run's validation images
   (:func:`napari_cpgcn.pipeline.fusion.select_fusion`, recorded in ``RUN/fusion.json``);
5. evaluate: image-level mAP against the image labels and the Kaggle 2021 cell-level mAP
   against the synthetic cell truth of the image model alone, the cell model alone, the
   paper's product and the chosen fusion; print the per-cell table head and the mAPs.

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

#: Default self-supervised pretraining epochs (docs/pretraining.md, "The demo": measured budget).
PRETRAIN_EPOCHS = 10

DESCRIPTION = """\
Run the whole CP-GCN method on synthetic data: generate a small HPA-like data set with
per-cell truth, pretrain the backbone self-supervised on the training images, train the
pipeline from it with a tiny backbone (image model, CAM refinement, cell segmentation,
pseudo-labels, cell model), predict held-out images, choose the fusion of the image and cell
scores on validation images, evaluate, and print the per-cell table and the image- and
cell-level mAPs. About three minutes on a 2-core CPU.

Writes OUT/data (the data set), OUT/pretrain (the self-supervised backbone), OUT/run (the
trained run: use it with `napari-cpgcn predict --model OUT/run` or in napari; RUN/fusion.json
records the fusion chosen), OUT/predictions (masks, cells.csv, images.csv) and OUT/demo.json
(the scores). Rerunning with the same --out resumes.

Synthetic images are easy and the models tiny: the mAPs show that everything runs end to
end and learns, not what the method reaches on real HPA images.
"""


COMMAND = "demo"
HELP = "synthetic data -> train -> predict -> evaluate, in minutes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", default="demo-output", metavar="DIR",
                   help="output folder (default ./demo-output; rerun to resume)")
    p.add_argument("--n-train", type=int, default=32, help="training images (default 32)")
    p.add_argument("--n-test", type=int, default=8, help="held-out test images (default 8)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--backbone", default="resnet18", help="backbone of both models (default resnet18)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per training stage (default 4)")
    p.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS,
                   help=f"epochs of self-supervised pretraining on the training images before training "
                        f"(default {PRETRAIN_EPOCHS}; 0: start from random weights)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0 = auto: the cores not busy with other work, at least "
                        "1; oversubscribed threads are many times slower on a busy machine)")
    p.add_argument("--rows", type=int, default=10, help="rows of the per-cell table to print (default 10)")


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
    with progress_bar(total=n_images, desc="1/5 synthetic data", unit="img", disable=quiet) as bar:
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


def pretrain_config(args: argparse.Namespace):
    """The demo's self-supervised pretraining: VICReg on the cells of the training images, cut
    as the tiny preset's cell model cuts them (32 px)."""
    from napari_cpgcn.training.pretrain import PretrainConfig

    return PretrainConfig(backbone=args.backbone, method="vicreg", views="cells", image_size=args.size,
                          crop_size=32, batch_size=32, epochs=args.pretrain_epochs, hidden_dim=512,
                          projection_dim=128, seed=args.seed, device=args.device)


def train(data: Path, train_csv: Path, run_dir: Path, args: argparse.Namespace) -> Path:
    """Train the whole pipeline with the tiny preset, self-supervised pretraining first and the
    fusion chosen on the validation images (finished stages are skipped on rerun)."""
    import dataclasses

    from napari_cpgcn.cli import progress_bar
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.pipeline import PipelineConfig, train_pipeline

    quiet = args.quiet
    config = PipelineConfig.tiny(backbone=args.backbone, image_size=args.size, epochs=args.epochs,
                                 seed=args.seed, device=args.device)
    config = dataclasses.replace(config, fusion="auto",
                                 pretrain=pretrain_config(args) if args.pretrain_epochs > 0 else None)
    bar = None
    stage = ""
    try:
        for ev in train_pipeline(data, train_csv, run_dir, config):
            if ev.kind == EventKind.STAGE_START:
                stage = ev.stage
                if bar is not None:
                    bar.close()
                bar = progress_bar(desc=f"3/5 train: {stage}", unit="batch", disable=quiet, leave=False)
            elif ev.kind == EventKind.STAGE_END:
                log.info("train: %s %s", ev.stage, ev.message)
            elif ev.kind in (EventKind.BATCH, EventKind.ITEM) and bar is not None:
                if ev.n_batches and bar.total != ev.n_batches:
                    bar.reset(total=ev.n_batches)
                if ev.n_epochs:
                    bar.set_description_str(f"3/5 train: {stage} epoch {ev.epoch}/{ev.n_epochs}", refresh=False)
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
    with progress_bar(total=len(test_ids), initial=first.batch, desc="4/5 predict", unit="img", disable=quiet) as bar:
        for ev in events:
            if ev.kind == EventKind.ITEM:
                bar.update(1)
            elif ev.kind == EventKind.DONE:
                summary = ev.result
    return summary


def evaluate(data: Path, pred_dir: Path, test_ids: list[str], run_dir: Path) -> dict:
    """Image-level mAP (images.csv vs the image labels) and Kaggle cell mAP (vs the cell truth):
    the run's fused score, the image and cell models alone, and the paper's product."""
    import numpy as np
    import pandas as pd

    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.evaluation.cell import CellTruth, evaluate_prediction_folder
    from napari_cpgcn.evaluation.image import per_class_ap
    from napari_cpgcn.io.tables import read_labels_csv
    from napari_cpgcn.pipeline.fusion import FusionParams

    labels = read_labels_csv(data / "train.csv").subset(test_ids)
    images = pd.read_csv(pred_dir / "images.csv").set_index("image_id")
    missing = [i for i in test_ids if i not in images.index]
    if missing:
        raise RuntimeError(f"no prediction for {len(missing)} test images (see {pred_dir / 'failures.csv'})")
    scores = images.loc[test_ids, [f"image_{s}" for s in SHORT_NAMES]].to_numpy(np.float64)
    image_ap = per_class_ap(labels.labels, scores)

    def product(table):
        return (table[[f"image_{s}" for s in SHORT_NAMES]].to_numpy(np.float64)
                * table[[f"cell_{s}" for s in SHORT_NAMES]].to_numpy(np.float64))

    truth = CellTruth.load(data / "truth")
    res = evaluate_prediction_folder(pred_dir, truth, test_ids, extra_scores={"product": product})
    n_true = sum(len(truth.labels[i][0]) for i in test_ids if i in truth.labels)
    with open(pred_dir / "cells.csv", encoding="utf-8") as fh:
        n_cells = sum(1 for _ in fh) - 1
    fusion = FusionParams.load(run_dir / "fusion.json") if (run_dir / "fusion.json").is_file() else FusionParams()
    present = np.isfinite(image_ap)
    return {
        "image_map": float(np.nanmean(image_ap)) if present.any() else float("nan"),
        "image_ap": {s: (None if not np.isfinite(a) else float(a)) for s, a in zip(SHORT_NAMES, image_ap, strict=True)},
        "cell_map": float(res["fused"].map),
        "cell_map_product": float(res["product"].map),
        "cell_map_cell_model_only": float(res["cell"].map),
        "cell_map_image_model_only": float(res["image"].map),
        "fusion": fusion.method,
        "fusion_cv_mAP": dict(fusion.info.get("cv_mAP", {})),
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
    t0, cpu0 = time.perf_counter(), time.process_time()
    times: dict[str, float] = {}

    t = time.perf_counter()
    data = make_data(out, args.n_train + args.n_test, args.size, args.seed, args.quiet)
    train_csv, train_ids, test_ids = split(data, args.n_test)
    times["data"] = time.perf_counter() - t
    log.info("data: %d training and %d held-out %dpx images in %s", len(train_ids), len(test_ids), args.size, data)

    t = time.perf_counter()
    run_dir = train(data, train_csv, out / "run", args)
    times["train"] = time.perf_counter() - t
    times["pretrain"] = _stage_seconds(run_dir, "pretrain")

    t = time.perf_counter()
    summary = predict(data, run_dir, out / "predictions", test_ids, args.device, args.quiet)
    if summary is None or summary.n_failed:
        raise RuntimeError(f"prediction failed for some images; see {out / 'predictions' / 'failures.csv'}")
    times["predict"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = evaluate(data, out / "predictions", test_ids, run_dir)
    times["evaluate"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    scores["seconds"] = {k: round(v, 1) for k, v in times.items()}
    scores["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    start = args.pretrain_epochs > 0
    scores["start"] = "self-supervised (pretrain stage)" if start else "random"
    scores["failed_images"] = summary.n_failed if summary is not None else None
    scores["torch_threads"] = threads
    from napari_cpgcn.io.atomic import atomic_write_text

    atomic_write_text(out / "demo.json", json.dumps(scores, indent=1) + "\n")

    w = sys.stdout.write
    w(f"\nPer-cell predictions (first {args.rows} of {scores['n_predicted_cells']} rows of "
      f"{out / 'predictions' / 'cells.csv'}):\n")
    w(_table_head(out / "predictions", args.rows) + "\n\n")
    w(f"image-level mAP  (held-out images, vs image labels): {scores['image_map']:.3f}\n")
    w("cell-level mAP   (Kaggle 2021 metric, IoU >= 0.6, held-out images):\n")
    w(f"   image model alone {scores['cell_map_image_model_only']:.3f}   "
      f"cell model alone {scores['cell_map_cell_model_only']:.3f}   "
      f"fused image x cell (the paper) {scores['cell_map_product']:.3f}\n")
    w(f"   fused, chosen on validation images ({scores['fusion']}): {scores['cell_map']:.3f}\n")
    w(_verdict(scores) + "\n")
    how = (f"from a self-supervised backbone pretrained on the {len(train_ids)} training images"
           if start else "from random weights (--pretrain-epochs 0)")
    w(f"\n{len(train_ids)} training / {len(test_ids)} test images of {args.size}px, {how}; "
      f"{scores['n_predicted_cells']} cells predicted, {scores['n_true_cells']} true; "
      f"time {times['total']:.0f} s (data {times['data']:.0f}, train {times['train']:.0f} of which pretrain "
      f"{times['pretrain']:.0f}, predict {times['predict']:.0f}, evaluate {times['evaluate']:.0f}), "
      f"{scores['cpu_seconds']:.0f} s CPU; {threads} torch thread(s).\n"
      f"Trained run: {run_dir}  (napari-cpgcn predict IMAGES --model {run_dir} --out OUT)\n")
    return EXIT_OK


def _stage_seconds(run_dir: Path, stage: str) -> float:
    """Seconds a finished stage took (``RUN/stages.json``), 0 when it did not run."""
    try:
        return float(json.loads((run_dir / "stages.json").read_text())["finished"][stage]["seconds"])
    except (OSError, ValueError, KeyError):
        return 0.0


def _verdict(scores: dict) -> str:
    """One plain sentence: does the fusion (the method's last step) beat the image model alone?"""
    fused, img, cell = scores["cell_map"], scores["cell_map_image_model_only"], scores["cell_map_cell_model_only"]
    if scores.get("fusion") == "image":
        return ("   -> the validation images chose the image model alone: at this budget the cell model "
                "does not add to it, so the fused score is the image model's"
                + (" (the paper's product would lose to it here)." if scores["cell_map_product"] < img else "."))
    if scores.get("fusion") == "cell":
        return ("   -> the validation images chose the cell model alone: the image model does not add to it "
                "at this budget.")
    if fused >= max(img, cell):
        return "   -> the fused score is the best of the three: per-cell evidence adds to the image model."
    if fused >= img:
        return ("   -> the fused score beats the image model alone but not the cell model alone: the image "
                "model is the weaker part here.")
    return ("   -> the fused score loses to the image model alone: at this tiny budget the cell model "
            "does not separate the cells well enough (the validation images chose the fusion, not the "
            "test images). More images or epochs help; see docs/pretraining.md.")
