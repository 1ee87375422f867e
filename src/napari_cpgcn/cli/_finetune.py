"""``napari-cpgcn finetune RUN --corrections PRED_DIR --out RUN2 [--epochs E --weight W]``."""

from __future__ import annotations

import argparse
import logging

from napari_cpgcn.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK

log = logging.getLogger("napari_cpgcn.cli.finetune")


COMMAND = "finetune"
HELP = "fine-tune a run's cell model on corrected cells (writes a new run)"
DESCRIPTION = """\
Train the cell model of RUN further on the corrected cells of a prediction folder
(PRED_DIR/corrections.csv, weighted up) together with RUN's pseudo-labels; write a complete new
run RUN2 (the image model is RUN's) that predicts like any run.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="trained run folder (napari-cpgcn train)")
    p.add_argument("--corrections", required=True, metavar="PRED_DIR",
                   help="prediction folder holding corrections.csv and masks/")
    p.add_argument("--out", required=True, metavar="RUN2", help="new run folder")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--weight", type=float, default=5.0, help="times each corrected cell is seen per epoch (default 5)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: a third of the run's)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="images of PRED_DIR (default: the folder recorded in PRED_DIR/run.json)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from napari_cpgcn.cli import UsageError
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.review.finetune import FinetuneOptions, finetune
    from napari_cpgcn.training.checkpoint import CheckpointError

    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.weight < 1:
        raise UsageError(f"--weight must be at least 1, got {args.weight}")
    opts = FinetuneOptions(epochs=args.epochs, weight=args.weight, lr=args.lr, device=args.device, seed=args.seed)
    try:
        for ev in finetune(args.run, args.corrections, args.out, opts, images_dir=args.images):
            if ev.kind == EventKind.EPOCH_END:
                m = ev.metrics
                log.info("epoch %d/%d: train loss %.4f, val loss %.4f", ev.epoch, ev.n_epochs,
                         m.get("train_loss", float("nan")), m.get("val_loss", float("nan")))
            elif ev.kind == EventKind.LOG:
                log.info("%s", ev.message)
            elif ev.kind == EventKind.STOPPED:
                log.error("stopped: %s", ev.message)
                return EXIT_INTERRUPTED
            elif ev.kind == EventKind.DONE:
                log.info("%s", ev.message)
    except CheckpointError as e:
        log.error("%s", e)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        log.error("interrupted; remove %s and rerun", args.out)
        return EXIT_INTERRUPTED
    return EXIT_OK
