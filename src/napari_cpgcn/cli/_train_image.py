"""``napari-cpgcn train-image DATA_DIR --labels CSV --out RUN_DIR``: train the CP-GCN image model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from napari_cpgcn.cli import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
    add_common_arguments,
)

log = logging.getLogger("napari_cpgcn.cli.train_image")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-image",
        help="train the image-level CP-GCN model on image labels",
        description=(
            "Train the image-level model (CP-GCN or an ablation variant) on a folder of HPA images "
            "and a Kaggle-format labels CSV (ID,Label). Writes RUN_DIR/config.json, latest.pt "
            "(every epoch), best.pt (best validation mAP), history.csv, split.json and oaa/. "
            "Rerunning with the same RUN_DIR resumes from latest.pt."
        ),
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder of images (ID_red.png ...; images/ inside accepted)")
    p.add_argument("--labels", required=True, metavar="CSV", help="labels CSV (ID,Label with |-joined class ids)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created; resumed if it holds latest.pt)")
    p.add_argument("--backbone", default=None,
                   help="resnet18/34/50, densenet121, efficientnet_b0, mobilenet_v3_small/large (default resnet50)")
    p.add_argument("--variant", default=None, choices=["cpgcn", "cnn", "cnn+cpm", "mlgcn"],
                   help="model: full CP-GCN or an ablation (default cpgcn)")
    p.add_argument("--epochs", type=int, default=None, help="default 50 (the paper)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8")
    p.add_argument("--image-size", type=int, default=None, help="network input side in pixels (default 512)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    p.add_argument("--device", default=None, help="auto (cuda, mps, cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=None, help="share of image ids for validation (default 0.2)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default 0)")
    p.add_argument("--imagenet-weights", default=None, metavar="PATH",
                   help="torchvision ImageNet weight file; default: look in the torch hub cache, else random "
                        "init; 'none' for random init")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="continue from RUN_DIR/latest.pt when it exists (default)")
    resume.add_argument("--no-resume", dest="resume", action="store_false", help="start again, overwriting the run")
    p.add_argument("--config", metavar="JSON", help="an ImageModelConfig JSON; command-line options given explicitly win")
    add_common_arguments(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The :class:`ImageModelConfig` of the parsed arguments.

    Options not given keep the value of ``--config``, else (when resuming) of the run's own
    ``config.json``, else the default.
    """
    from napari_cpgcn.training.config import ConfigError, ImageModelConfig

    try:
        previous = Path(args.out) / "config.json"
        if getattr(args, "config", None):
            base = ImageModelConfig.load(args.config)
        elif args.resume and previous.is_file():
            base = ImageModelConfig.load(previous)
            log.info("resuming with the settings of %s (options given on the command line win)", previous)
        else:
            base = ImageModelConfig()
        changes = dict(backbone=args.backbone, variant=args.variant, epochs=args.epochs,
                       batch_size=args.batch_size, image_size=args.image_size, lr=args.lr, device=args.device,
                       seed=args.seed, val_fraction=args.val_fraction, num_workers=args.workers)
        changes = {k: v for k, v in changes.items() if v is not None}
        if args.imagenet_weights is not None:
            w = args.imagenet_weights
            changes["imagenet_weights"] = None if w.lower() in ("none", "random", "") else w
        return base.replace(**changes)
    except (ConfigError, TypeError) as e:
        raise UsageError(str(e)) from e


def run(args: argparse.Namespace) -> int:
    from napari_cpgcn.cli import setup_logging

    data_dir, labels, out = Path(args.data_dir), Path(args.labels), Path(args.out)
    if not data_dir.is_dir():
        raise UsageError(f"DATA_DIR {data_dir} is not a folder")
    if not labels.is_file():
        raise UsageError(f"labels CSV {labels} does not exist")
    config = build_config(args)
    out.mkdir(parents=True, exist_ok=True)
    from napari_cpgcn.training.ddp import is_main_process

    main_process = is_main_process()  # under torchrun only rank 0 logs and shows progress
    if not main_process:
        args.quiet = True
    setup_logging(args, logfile=str(out / "train-image.log") if main_process else None)

    from napari_cpgcn.training.engine import CheckpointError
    from napari_cpgcn.training.events import EventKind
    from napari_cpgcn.training.image_trainer import train_image_model

    bar = None
    quiet = args.quiet
    try:
        for ev in train_image_model(data_dir, labels, out, config, resume=args.resume):
            if ev.kind == EventKind.EPOCH_START and not quiet:
                from tqdm import tqdm

                if bar is not None:
                    bar.close()
                bar = tqdm(total=ev.n_batches or None, desc=f"epoch {ev.epoch}/{ev.n_epochs}", unit="batch",
                           leave=True, dynamic_ncols=True)
            elif ev.kind == EventKind.BATCH and bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ev.loss:.4f}")
            elif ev.kind == EventKind.EPOCH_END:
                m = ev.metrics
                txt = (f"epoch {ev.epoch}/{ev.n_epochs}: train loss {m.get('train_loss', float('nan')):.4f}"
                       + (f", val loss {m['val_loss']:.4f}, val mAP {m['val_mAP']:.4f}" if "val_mAP" in m else "")
                       + f" ({m.get('seconds', 0):.1f} s)")
                if bar is not None:
                    bar.set_postfix_str(txt.split(": ", 1)[1])
                    bar.close()
                    bar = None
                log.info(txt)
            elif ev.kind == EventKind.LOG:
                log.debug(ev.message)  # the library has logged it already
            elif ev.kind == EventKind.STOPPED:
                log.warning(ev.message)
                return EXIT_INTERRUPTED
            elif ev.kind == EventKind.DONE:
                res = ev.result
                log.info("done: best validation mAP %.4f at epoch %d; checkpoints in %s",
                         getattr(res, "best_metric", float("nan")), getattr(res, "best_epoch", 0), out)
    except CheckpointError as e:
        log.error("%s", e)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        log.error("interrupted; %s keeps the last finished epoch, rerun the same command to resume",
                  out / "latest.pt")
        return EXIT_INTERRUPTED
    finally:
        if bar is not None:
            bar.close()
    return EXIT_OK
