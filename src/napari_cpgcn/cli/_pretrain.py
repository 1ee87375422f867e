"""``napari-cpgcn pretrain DATA_DIR --out PRETRAIN_DIR``: self-supervised backbone pretraining.

Trains a backbone on the folder's images without labels (:mod:`napari_cpgcn.training.pretrain`);
``PRETRAIN_DIR`` then starts the image and cell models: ``napari-cpgcn train ... --init-from
PRETRAIN_DIR`` (or ``train-image --init-from``, or the Train widget's "Start from").
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from napari_cpgcn.cli import UsageError
from napari_cpgcn.cli._training import TrainingBars, run_training

log = logging.getLogger("napari_cpgcn.cli.pretrain")

DESCRIPTION = """\
Pretrain a backbone self-supervised on your own images: no labels, no downloads. The
backbone learns from pairs of random views of each image (tiles of the field of view and/or
single-cell crops; flips, 90-degree rotations, crops, per-channel intensity jitter) with a
self-supervised objective of the lightly library (VICReg by default; SimCLR, BYOL, DINO).

Writes PRETRAIN_DIR/backbone.pt (the result), latest.pt (to resume), history.csv and
pretrain_config.json. Start training from it with
  napari-cpgcn train DATA_DIR --labels CSV --out RUN --backbone B --init-from PRETRAIN_DIR
(the same backbone B). Needs the 'pretrain' extra: pip install 'napari-cpgcn[pretrain]'.
"""


COMMAND = "pretrain"
HELP = "self-supervised backbone pretraining on unlabelled images"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder of images (ID_red.png ...; images/ inside accepted)")
    p.add_argument("--out", required=True, metavar="PRETRAIN_DIR", help="output folder (created)")
    p.add_argument("--backbone", default=None,
                   help="resnet18/34/50, densenet121, efficientnet_b0, mobilenet_v3_small/large (default resnet50, "
                        "as the image and cell models)")
    p.add_argument("--method", default=None, choices=["simclr", "byol", "vicreg", "dino"],
                   help="self-supervised objective (default vicreg)")
    p.add_argument("--views", default=None, choices=["tiles", "cells", "both"],
                   help="what the views are cut from: field-of-view tiles (default), single-cell crops (segments "
                        "every image first), or both")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 100)")
    p.add_argument("--batch-size", type=int, default=None, help="view pairs per batch (default 64)")
    p.add_argument("--crop-size", type=int, default=None, help="side of the views in pixels (default 128)")
    p.add_argument("--image-size", type=int, default=None,
                   help="images are resized to this side first, as the image model sees them (default 512)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3, cosine schedule)")
    p.add_argument("--device", default=None, help="auto (cuda, mps, cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default 0)")
    p.add_argument("--config", metavar="JSON", help="a PretrainConfig JSON (as PRETRAIN_DIR/pretrain_config.json); "
                                                   "options given explicitly win")
    p.add_argument("--resume", action="store_true",
                   help="continue the pretraining in PRETRAIN_DIR (its settings; options given win, e.g. a larger "
                        "--epochs trains a finished one longer)")


def build_config(args: argparse.Namespace):
    """The :class:`~napari_cpgcn.training.pretrain.PretrainConfig` of the parsed arguments.

    Base: ``--config``, else (with ``--resume``) ``PRETRAIN_DIR/pretrain_config.json``, else the
    defaults; options given explicitly win.
    """
    from napari_cpgcn.training.config import ConfigError
    from napari_cpgcn.training.pretrain import CONFIG_FILE, PretrainConfig

    out = Path(args.out)
    try:
        if args.config:
            base = PretrainConfig.load(args.config)
        elif args.resume and (out / CONFIG_FILE).is_file():
            base = PretrainConfig.load(out / CONFIG_FILE)
            log.info("resuming with the settings of %s (options given on the command line win)", out / CONFIG_FILE)
        else:
            base = PretrainConfig()
        changes = dict(backbone=args.backbone, method=args.method, views=args.views, epochs=args.epochs,
                       batch_size=args.batch_size, crop_size=args.crop_size, image_size=args.image_size,
                       lr=args.lr, device=args.device, seed=args.seed, num_workers=args.workers)
        return base.replace(**{k: v for k, v in changes.items() if v is not None})
    except (ConfigError, TypeError, ValueError) as e:
        raise UsageError(str(e)) from e


class _Bars(TrainingBars):
    """A bar while the images are read (and segmented), then one per epoch."""

    def handle(self, ev) -> int | None:
        from napari_cpgcn.events import EventKind

        k = ev.kind
        if k == EventKind.ITEM:
            if self.bar is None or ev.batch == 1:
                self.open(ev.n_batches, "reading images" if ev.message.startswith("read") else "cells", "img")
            if self.bar is not None:
                self.bar.update(1)
        elif k == EventKind.EPOCH_START:
            self.open(ev.n_batches, f"pretrain epoch {ev.epoch}/{ev.n_epochs}", "batch")
        elif k == EventKind.BATCH and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{ev.loss:.4f}")
        elif k == EventKind.EPOCH_END:
            m = ev.metrics
            self.close()
            log.info("pretrain epoch %d/%d: loss %.4f (%.1f s)", ev.epoch, ev.n_epochs,
                     m.get("train_loss", float("nan")), m.get("seconds", 0.0))
        elif k == EventKind.LOG:
            log.debug("%s", ev.message)
        elif k == EventKind.DONE:
            self.close()
            res = ev.result
            log.info("done: %s (loss %.4f -> %.4f over %d epochs). Start training from it with "
                     "`napari-cpgcn train DATA_DIR --labels CSV --out RUN --backbone %s --init-from %s`",
                     res.backbone_path, res.first_loss, res.final_loss, res.epochs, self.backbone, self.out)
        return None


def run(args: argparse.Namespace) -> int:
    from napari_cpgcn.cli import setup_logging
    from napari_cpgcn.training.pretrain import BACKBONE_FILE

    data_dir, out = Path(args.data_dir), Path(args.out)
    if not data_dir.is_dir():
        raise UsageError(f"DATA_DIR {data_dir} is not a folder")
    if not args.resume and ((out / "latest.pt").is_file() or (out / BACKBONE_FILE).is_file()):
        what = "a finished pretraining (backbone.pt)" if (out / BACKBONE_FILE).is_file() else "an unfinished pretraining"
        raise UsageError(f"{out} already holds {what}; pass --resume to continue it (with a larger --epochs to "
                         "train a finished one longer), or choose another --out")
    config = build_config(args)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(args, logfile=str(out / "pretrain.log"))
    from napari_cpgcn.training.pretrain import pretrain_backbone

    bars = _Bars(args.quiet, out)
    bars.backbone = config.backbone
    return run_training(pretrain_backbone(data_dir, out, config, resume=args.resume), bars, logger=log,
                        interrupted=f"interrupted; {out / 'latest.pt'} keeps the last finished epoch, continue with "
                                    "the same command and --resume")
