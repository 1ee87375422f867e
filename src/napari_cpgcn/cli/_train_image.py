"""``napari-cpgcn train-image DATA_DIR --labels CSV --out RUN_DIR``: train the CP-GCN image model."""

from __future__ import annotations

import argparse
import logging

from napari_cpgcn.cli import UsageError
from napari_cpgcn.cli import _training as training

log = logging.getLogger("napari_cpgcn.cli.train_image")


COMMAND = "train-image"
HELP = "train the image-level CP-GCN model on image labels"
DESCRIPTION = """\
Train the image-level model (CP-GCN or an ablation variant) on a folder of HPA images and a
Kaggle-format labels CSV (ID,Label). Writes RUN_DIR/config.json, latest.pt (every epoch),
best.pt (best validation mAP), history.csv, split.json and oaa/. Rerunning with the same RUN_DIR
resumes from latest.pt.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    training.add_training_arguments(
        p,
        out="run folder (created; resumed if it holds latest.pt)",
        config="an ImageModelConfig JSON; command-line options given explicitly win",
        backbone="resnet18/34/50, densenet121, efficientnet_b0, mobilenet_v3_small/large (default resnet50)",
        image_size="network input side in pixels (default 512)",
        epochs="default 50 (the paper)",
        batch_size="default 8",
        imagenet_weights=("imagenet|URL|PATH|none",
                          "'imagenet' (default: the torch hub cache, else torchvision's download when "
                          "the network answers; offline: random init, said at the start), a mirror URL "
                          "(its folder, or a file named name-<sha256 prefix>.pth), a torchvision weight "
                          "file, or 'none' (random init)"),
        seed="random seed (default 0)",
        workers="DataLoader worker processes (default 0)",
    )
    p.add_argument("--variant", default=None, choices=["cpgcn", "cnn", "cnn+cpm", "mlgcn"],
                   help="model: full CP-GCN or an ablation (default cpgcn)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    p.add_argument("--val-fraction", type=float, default=None, help="share of image ids for validation (default 0.2)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="continue from RUN_DIR/latest.pt when it exists (default)")
    resume.add_argument("--no-resume", dest="resume", action="store_false", help="start again, overwriting the run")


def build_config(args: argparse.Namespace):
    """The :class:`ImageModelConfig` of the parsed arguments.

    Options not given keep the value of ``--config``, else (when resuming) of the run's own
    ``config.json``, else the default.
    """
    from napari_cpgcn.training.config import ConfigError, ImageModelConfig

    try:
        base = training.base_config(args, ImageModelConfig.load, ImageModelConfig, resume=args.resume)
        changes = dict(backbone=args.backbone, variant=args.variant, epochs=args.epochs,
                       batch_size=args.batch_size, image_size=args.image_size, lr=args.lr, device=args.device,
                       seed=args.seed, val_fraction=args.val_fraction, num_workers=args.workers)
        changes = {k: v for k, v in changes.items() if v is not None}
        if args.imagenet_weights is not None:
            changes["imagenet_weights"] = training.imagenet_weights(args.imagenet_weights)
        if args.init_from is not None:
            changes["init_from"] = training.init_from(args.init_from)
        return base.replace(**changes)
    except (ConfigError, TypeError) as e:
        raise UsageError(str(e)) from e


class _EpochBars(training.TrainingBars):
    """One tqdm bar per epoch and a log line per finished epoch."""

    def handle(self, ev) -> int | None:
        from napari_cpgcn.events import EventKind

        if ev.kind == EventKind.EPOCH_START:
            self.open(ev.n_batches, f"epoch {ev.epoch}/{ev.n_epochs}", "batch")
        elif ev.kind == EventKind.BATCH and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{ev.loss:.4f}")
        elif ev.kind == EventKind.EPOCH_END:
            m = ev.metrics
            txt = (f"epoch {ev.epoch}/{ev.n_epochs}: train loss {m.get('train_loss', float('nan')):.4f}"
                   + (f", val loss {m['val_loss']:.4f}, val mAP {m['val_mAP']:.4f}" if "val_mAP" in m else "")
                   + f" ({m.get('seconds', 0):.1f} s)")
            if self.bar is not None:
                self.bar.set_postfix_str(txt.split(": ", 1)[1])
                self.close()
            log.info(txt)
        elif ev.kind == EventKind.LOG:
            log.debug(ev.message)  # the library has logged it already
        elif ev.kind == EventKind.DONE:
            res = ev.result
            log.info("done: best validation mAP %.4f at epoch %d; checkpoints in %s",
                     getattr(res, "best_metric", float("nan")), getattr(res, "best_epoch", 0), self.out)
        return None


def run(args: argparse.Namespace) -> int:
    data_dir, labels, out, config = training.start_training_run(args, build_config, "train-image.log")
    from napari_cpgcn.training.image_trainer import train_image_model

    return training.run_training(train_image_model(data_dir, labels, out, config, resume=args.resume),
                        _EpochBars(args.quiet, out), logger=log,
                        interrupted=f"interrupted; {out / 'latest.pt'} keeps the last finished epoch, rerun the "
                                    "same command to resume")
