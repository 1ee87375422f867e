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

from napari_cpgcn.cli import UsageError
from napari_cpgcn.cli import _training as training
from napari_cpgcn.pipeline.config import FUSIONS, PRESETS

log = logging.getLogger("napari_cpgcn.cli.train")


COMMAND = "train"
HELP = "train the whole pipeline (image model, CAM refinement, segmentation, pseudo-labels, cell model)"
DESCRIPTION = """\
Train the single-cell pipeline on a folder of HPA images with image-level labels: the CP-GCN
image model, sub-category K-means CAM refinement, cell segmentation, per-cell pseudo-labels and
the cell classifier. Writes RUN_DIR/config.json, stages.json, image_model/, refine/,
segmentation/, pseudolabels.csv and cell_model/. Rerunning with the same RUN_DIR skips finished
stages and resumes an interrupted one.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    training.add_training_arguments(
        p,
        out="run folder (created; resumed when it exists)",
        config="a pipeline config JSON (as RUN_DIR/config.json); options win",
        backbone="backbone of the image and cell models (resnet18/34/50, densenet121, efficientnet_b0, "
                 "mobilenet_v3_small/large)",
        image_size="image model input side in pixels",
        epochs="epochs of the image model and the cell model",
        batch_size="image model (and refinement) batch size",
        imagenet_weights=("imagenet|URL|PATH|none",
                          "'imagenet' (default: the torch hub cache, else torchvision's download when "
                          "the network answers; offline: random init, said at the start), a mirror URL "
                          "(its folder, or a file named name-<sha256 prefix>.pth), a torchvision weight "
                          "file, or 'none' (random init)"),
        seed="random seed",
        workers="DataLoader worker processes",
    )
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="; ".join(f"{k}: {v}" for k, v in PRESETS.items()) + " (default paper)")
    p.add_argument("--cell-backbone", default=None, help="backbone of the cell model only")
    p.add_argument("--crop-size", type=int, default=None, help="cell crop side in pixels")
    p.add_argument("--refine-epochs", type=int, default=None, help="epochs per refinement round")
    p.add_argument("--cell-epochs", type=int, default=None, help="epochs of the cell model (overrides --epochs)")
    p.add_argument("--k", type=int, default=None, help="sub-classes per class in the refinement (1 = no clustering)")
    p.add_argument("--rounds", type=int, default=None, help="refinement rounds (0 = no refinement)")
    p.add_argument("--segmentation", default=None, choices=("classical", "cellpose"),
                   help="segmentation method: classical (default) or cellpose")
    p.add_argument("--masks-dir", default=None, metavar="DIR",
                   help="use ready cell masks ({ID}.tif / {ID}.png / {ID}_cells.png) instead of segmenting")
    p.add_argument("--cell-mode", choices=["pseudo", "baseline"], default=None,
                   help="cell model targets: pseudo-labels (default) or image labels copied to every cell")
    p.add_argument("--pseudo-threshold", type=float, default=None, help="pseudo-label score threshold (default 0.5)")
    p.add_argument("--pretrain", action="store_true",
                   help="first pretrain the backbone self-supervised on the labelled images (stage 'pretrain', "
                        "no labels used, no download; RUN_DIR/pretrain), and start both models from it "
                        "(docs/pretraining.md)")
    p.add_argument("--pretrain-epochs", type=int, default=None, metavar="N",
                   help="epochs of the --pretrain stage (default 100)")
    p.add_argument("--pretrain-views", choices=("cells", "tiles", "both"), default=None,
                   help="what the --pretrain stage learns from: cell crops (default), tiles of the field, or both")
    p.add_argument("--fusion", choices=FUSIONS, default=None,
                   help="how the image and cell scores become the fused one: product (the paper, default), "
                        "auto (chosen on the validation images), or one option (docs/cell_pipeline.md)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR with its saved settings (what a plain rerun does too); "
                        "an error when RUN_DIR holds no run")
    g.add_argument("--overwrite", action="store_true",
                   help="RUN_DIR holds a run made with other settings: redo the stages they change (their "
                        "outputs are replaced). Without it such a rerun is refused, naming what differs")


def build_config(args: argparse.Namespace):
    """The :class:`~napari_cpgcn.pipeline.PipelineConfig` of the parsed arguments.

    Base: ``--config``, else (resuming) ``RUN_DIR/config.json``, else the preset (paper by
    default); options given explicitly win.
    """
    import dataclasses

    from napari_cpgcn.pipeline import PipelineConfig
    from napari_cpgcn.training.checkpoint import CheckpointError
    from napari_cpgcn.training.config import ConfigError

    try:
        cfg = training.base_config(args, PipelineConfig.load, lambda: PipelineConfig.preset(args.preset or "paper"),
                          resume=args.preset is None)
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
            img["imagenet_weights"] = cell["imagenet_weights"] = training.imagenet_weights(args.imagenet_weights)
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
        if args.init_from is not None:
            cfg = cfg.starting_from(training.init_from(args.init_from))
        if args.fusion:
            cfg = dataclasses.replace(cfg, fusion=args.fusion)
        if args.pretrain or args.pretrain_epochs or args.pretrain_views:
            from napari_cpgcn.training.pretrain import PretrainConfig

            base = cfg.pretrain or PretrainConfig(views="cells")
            cfg = dataclasses.replace(cfg, pretrain=base.replace(
                backbone=cfg.image.backbone, image_size=cfg.image.image_size, crop_size=cfg.cell.crop_size,
                device=cfg.image.device, seed=cfg.image.seed,
                **({"epochs": args.pretrain_epochs} if args.pretrain_epochs else {}),
                **({"views": args.pretrain_views} if args.pretrain_views else {})))
        cfg.validate()
        return cfg
    except (ConfigError, CheckpointError, TypeError, ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e


class _Bars(training.TrainingBars):
    """Per-stage tqdm bars driven by pipeline events."""

    def handle(self, ev) -> int | None:
        from napari_cpgcn.events import EventKind

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
        elif k == EventKind.DONE:
            self.close()
            log.info("done: the trained pipeline is in %s (predict with `napari-cpgcn predict ... --model %s`)",
                     self.out, self.out)
        return None


def run(args: argparse.Namespace) -> int:
    if args.resume and not (Path(args.out) / "config.json").is_file():
        raise UsageError(f"--resume: {args.out} holds no run to resume (no config.json); leave --resume out to "
                         "start a new run there")
    data_dir, labels, out, config = training.start_training_run(args, build_config, "train.log")
    from napari_cpgcn.pipeline import RunSettingsChanged, check_settings, train_pipeline

    if not args.overwrite:
        try:  # train_pipeline checks it too; here it exits with the usage code
            check_settings(out, config)
        except RunSettingsChanged as e:
            raise UsageError(str(e)) from e
    events = train_pipeline(data_dir, labels, out, config, overwrite=args.overwrite)
    return training.run_training(events, _Bars(args.quiet, out), logger=log,
                        interrupted="interrupted; finished stages and the last finished epoch are kept; rerun "
                                    "the same command to resume")
