"""``napari-cpgcn train DATA_DIR --labels CSV --out RUN_DIR``: train the whole single-cell pipeline.

Stages: image model → sub-category refinement → segmentation → pseudo-labels → cell model,
one progress bar per stage (per epoch for the training stages). Rerunning with the same
RUN_DIR resumes: finished stages are skipped, an interrupted training stage continues from its
``latest.pt``.
"""

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

log = logging.getLogger("napari_cpgcn.cli.train")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the whole pipeline (image model, CAM refinement, segmentation, pseudo-labels, cell model)",
        description=(
            "Train the single-cell pipeline on a folder of HPA images with image-level labels: the CP-GCN "
            "image model, sub-category K-means CAM refinement, cell segmentation, per-cell pseudo-labels "
            "and the cell classifier. Writes RUN_DIR/config.json, stages.json, image_model/, refine/, "
            "segmentation/, pseudolabels.csv and cell_model/. Rerunning with the same RUN_DIR skips "
            "finished stages and resumes an interrupted one."
        ),
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder of images (ID_red.png ...; images/ inside accepted)")
    p.add_argument("--labels", required=True, metavar="CSV", help="labels CSV (ID,Label with |-joined class ids)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created; resumed when it exists)")
    p.add_argument("--preset", choices=["paper", "tiny"], default=None,
                   help="paper: ResNet50, 512 px, 50/3x20/20 epochs, K=10 (default); tiny: resnet18, 128 px, "
                        "2 epochs, K=3, 1 round (tests and demos)")
    p.add_argument("--config", metavar="JSON", help="a pipeline config JSON (as RUN_DIR/config.json); options win")
    p.add_argument("--backbone", default=None, help="backbone of the image and cell models (resnet18/34/50, "
                                                    "densenet121, efficientnet_b0, mobilenet_v3_small/large)")
    p.add_argument("--cell-backbone", default=None, help="backbone of the cell model only")
    p.add_argument("--image-size", type=int, default=None, help="image model input side in pixels")
    p.add_argument("--crop-size", type=int, default=None, help="cell crop side in pixels")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the image model and the cell model")
    p.add_argument("--refine-epochs", type=int, default=None, help="epochs per refinement round")
    p.add_argument("--cell-epochs", type=int, default=None, help="epochs of the cell model (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="image model (and refinement) batch size")
    p.add_argument("--k", type=int, default=None, help="sub-classes per class in the refinement (1 = no clustering)")
    p.add_argument("--rounds", type=int, default=None, help="refinement rounds (0 = no refinement)")
    p.add_argument("--segmentation", default=None, help="segmentation method: classical (default) or cellpose")
    p.add_argument("--masks-dir", default=None, metavar="DIR",
                   help="use ready cell masks ({ID}.tif / {ID}.png / {ID}_cells.png) instead of segmenting")
    p.add_argument("--cell-mode", choices=["pseudo", "baseline"], default=None,
                   help="cell model targets: pseudo-labels (default) or image labels copied to every cell")
    p.add_argument("--pseudo-threshold", type=float, default=None, help="pseudo-label score threshold (default 0.5)")
    p.add_argument("--imagenet-weights", default=None, metavar="PATH|none",
                   help="'imagenet' (torch hub cache), a torchvision weight file, or 'none'")
    p.add_argument("--device", default=None, help="auto (cuda, mps, cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    add_common_arguments(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The :class:`~napari_cpgcn.pipeline.PipelineConfig` of the parsed arguments.

    Base: ``--config``, else (resuming) ``RUN_DIR/config.json``, else the preset (paper by
    default); options given explicitly win.
    """
    import dataclasses

    from napari_cpgcn.pipeline import PipelineConfig
    from napari_cpgcn.training.config import ConfigError

    try:
        previous = Path(args.out) / "config.json"
        if args.config:
            cfg = PipelineConfig.load(args.config)
        elif previous.is_file() and args.preset is None:
            cfg = PipelineConfig.load(previous)
            log.info("resuming with the settings of %s (options given on the command line win)", previous)
        elif args.preset == "tiny":
            cfg = PipelineConfig.tiny()
        else:
            cfg = PipelineConfig.paper()
        img, ref, cell = {}, {}, {}
        if args.backbone:
            img["backbone"] = cell["backbone"] = args.backbone
        if args.cell_backbone:
            cell["backbone"] = args.cell_backbone
        if args.image_size:
            img["image_size"] = args.image_size
        if args.crop_size:
            cell["crop_size"] = args.crop_size
        if args.epochs:
            img["epochs"] = cell["epochs"] = args.epochs
        if args.cell_epochs:
            cell["epochs"] = args.cell_epochs
        if args.refine_epochs:
            ref["epochs"] = args.refine_epochs
        if args.batch_size:
            img["batch_size"] = ref["batch_size"] = args.batch_size
        if args.k is not None:
            ref["k"] = args.k
        if args.rounds is not None:
            ref["rounds"] = args.rounds
        if args.cell_mode:
            cell["mode"] = args.cell_mode
        if args.imagenet_weights is not None:
            w = None if args.imagenet_weights.lower() in ("none", "random", "") else args.imagenet_weights
            img["imagenet_weights"] = cell["imagenet_weights"] = w
        for name in ("device", "seed"):
            v = getattr(args, name)
            if v is not None:
                img[name] = ref[name] = cell[name] = v
        if args.workers is not None:
            img["num_workers"] = ref["num_workers"] = cell["num_workers"] = args.workers
        changes = {"image": cfg.image.replace(**img), "refine": cfg.refine.replace(**ref),
                   "cell": cfg.cell.replace(**cell)}
        if args.segmentation:
            changes["segmentation"] = args.segmentation
        if args.masks_dir:
            changes["masks_dir"] = str(Path(args.masks_dir).resolve())
        if args.pseudo_threshold is not None:
            changes["pseudo"] = dataclasses.replace(cfg.pseudo, threshold=args.pseudo_threshold)
        cfg = dataclasses.replace(cfg, **changes)
        cfg.validate()
        return cfg
    except (ConfigError, TypeError, ValueError) as e:
        raise UsageError(str(e)) from e


class _Bars:
    """Per-stage tqdm bars driven by pipeline events."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def open(self, total: int | None, desc: str, unit: str) -> None:
        from tqdm import tqdm

        self.close()
        if not self.quiet:
            self.bar = tqdm(total=total or None, desc=desc, unit=unit, leave=True, dynamic_ncols=True)

    def handle(self, ev) -> None:
        from napari_cpgcn.training.events import EventKind

        k = ev.kind
        if k == EventKind.STAGE_START:
            self.close()
            log.info("%s", ev.message)
        elif k == EventKind.STAGE_END:
            self.close()
            log.info("%s: %s", ev.stage, ev.message)
        elif k == EventKind.EPOCH_START:
            self.open(ev.n_batches, f"{ev.stage} epoch {ev.epoch}/{ev.n_epochs}", "batch")
        elif k == EventKind.BATCH:
            if self.bar is not None:
                self.bar.update(1)
                if ev.loss is not None:
                    self.bar.set_postfix(loss=f"{ev.loss:.4f}")
        elif k == EventKind.EPOCH_END:
            m = ev.metrics
            txt = (f"{ev.stage} epoch {ev.epoch}/{ev.n_epochs}: train loss {m.get('train_loss', float('nan')):.4f}"
                   + (f", val mAP {m['val_mAP']:.4f}" if "val_mAP" in m else "") + f" ({m.get('seconds', 0):.1f} s)")
            self.close()
            log.info(txt)
        elif k == EventKind.ITEM:
            if self.bar is None or self.bar.desc != ev.stage:
                self.open(ev.n_batches, ev.stage, "img")
                if self.bar is not None:
                    self.bar.desc = ev.stage
            if self.bar is not None:
                self.bar.update(1)
        elif k == EventKind.LOG:
            if ev.message:
                log.debug("%s: %s", ev.stage, ev.message)


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
    setup_logging(args, logfile=str(out / "train.log") if main_process else None)

    from napari_cpgcn.pipeline import train_pipeline
    from napari_cpgcn.training.engine import CheckpointError
    from napari_cpgcn.training.events import EventKind

    bars = _Bars(args.quiet)
    try:
        for ev in train_pipeline(data_dir, labels, out, config):
            bars.handle(ev)
            if ev.kind == EventKind.STOPPED:
                bars.close()
                log.warning("%s", ev.message)
                return EXIT_INTERRUPTED
            if ev.kind == EventKind.DONE:
                bars.close()
                log.info("done: the trained pipeline is in %s (predict with `napari-cpgcn predict ... --model %s`)",
                         out, out)
    except CheckpointError as e:
        log.error("%s", e)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        log.error("interrupted; finished stages and the last finished epoch are kept; rerun the same command "
                  "to resume")
        return EXIT_INTERRUPTED
    finally:
        bars.close()
    return EXIT_OK
