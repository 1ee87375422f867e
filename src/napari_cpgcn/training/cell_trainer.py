"""Train the single-cell classifier on cell crops (METHOD.md step 5) with the shared engine.

Targets per cell come either from the pseudo-labels (``mode="pseudo"``, the method) or from
the image labels copied to every cell of the image (``mode="baseline"``, the paper's Table 2
baseline). Training runs through :func:`napari_cpgcn.training.engine.fit`: the same events,
stop request, ``latest.pt`` / ``best.pt`` checkpoints and bit-identical resume as the image
model. The validation split is by image id (cells of one image never sit on both sides).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_cpgcn.classes import N_CLASSES, SHORT_NAMES
from napari_cpgcn.events import Event, EventKind, ShouldStop, relay
from napari_cpgcn.training.config import ConfigError, TrainConfig, check_channel_stats, check_choice

__all__ = [
    "CellModelConfig",
    "cell_targets",
    "split_by_image",
    "train_cell_model",
    "CELL_MODEL_KIND",
]

log = logging.getLogger(__name__)

CELL_MODEL_KIND = "cell_classifier"
MODES = ("pseudo", "baseline")


@dataclass
class CellModelConfig(TrainConfig):
    """The cell classifier and its training (defaults = the paper: ResNet50, 20 epochs, batch 32, Adam 1e-3).

    Attributes
    ----------
    backbone
        One of :data:`napari_cpgcn.models.backbone.BACKBONES`.
    crop_size
        Side of the square cell crops.
    zero_background
        Zero the pixels outside the cell in its crop.
    crop_pad
        Margin around the cell's bounding box (fraction of its longer side, each side).
    mode
        ``"pseudo"`` (pseudo-labels) or ``"baseline"`` (image labels copied to every cell).
    soft_targets
        Train on the pseudo-labels' soft scores instead of their 0/1 labels.
    imagenet_weights
        ``"imagenet"`` (torch hub cache, else a verified download; offline → random init with
        a message), a mirror URL, a file path, or ``None`` (random init, no network).
    init_from
        A napari-cpgcn checkpoint or run folder (its ``cell_model/best.pt``) with the same
        backbone whose backbone weights start this model; takes the place of ``imagenet_weights``.
    dropout
        Before the linear layer.
    augment
        Random flips / 90° rotations and intensity jitter of the crops.
    classes
        Class short names in output order.
    mean, std
        Per-channel crop normalisation; ``None`` = measured on the training crops.
    """

    epochs: int = 20
    batch_size: int = 32
    backbone: str = "resnet50"
    crop_size: int = 128
    zero_background: bool = True
    crop_pad: float = 0.05
    mode: str = "pseudo"
    soft_targets: bool = False
    imagenet_weights: str | None = "imagenet"
    init_from: str | None = None
    dropout: float = 0.2
    augment: bool = True
    classes: tuple[str, ...] = field(default_factory=lambda: tuple(SHORT_NAMES))
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def validate(self) -> None:
        super().validate()
        from napari_cpgcn.models.backbone import BACKBONES

        check_choice(self.backbone, BACKBONES, "cell backbone")
        check_choice(self.mode, MODES, "cell model mode")
        if self.crop_size < 16:
            raise ConfigError(f"crop_size must be >= 16, got {self.crop_size}")
        if not 0.0 <= self.crop_pad <= 1.0:
            raise ConfigError(f"crop_pad must be in [0, 1], got {self.crop_pad}")
        check_channel_stats(self)


def cell_targets(cells: pd.DataFrame, mode: str, image_labels: dict[str, np.ndarray] | None = None,
                 soft: bool = False) -> np.ndarray:
    """(n_cells, 19) float32 training targets.

    Parameters
    ----------
    cells
        Per-cell table; for ``mode="pseudo"`` a pseudo-label table (``labels`` / ``soft_*`` columns).
    mode
        ``"pseudo"`` or ``"baseline"``.
    image_labels
        ``{image id: (19,) multi-hot}``, needed by ``"baseline"``.
    soft
        Use the soft scores (``"pseudo"`` only).
    """
    if mode == "baseline":
        if image_labels is None:
            raise ValueError("the baseline cell model needs the image labels")
        missing = sorted(set(cells["image_id"]) - set(image_labels))
        if missing:
            raise ValueError(f"no image labels for {len(missing)} images, e.g. {missing[0]}")
        return np.stack([np.asarray(image_labels[i], np.float32) for i in cells["image_id"]]) \
            if len(cells) else np.zeros((0, N_CLASSES), np.float32)
    from napari_cpgcn.training.pseudolabels import pseudo_label_matrix, soft_score_matrix

    return soft_score_matrix(cells) if soft else pseudo_label_matrix(cells).astype(np.float32)


def split_by_image(image_ids: list[str] | np.ndarray, val_fraction: float, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val) with every image's cells on one side.

    The images are split as the image model splits them
    (:func:`napari_cpgcn.training.datasets.split_ids`: a hash of each image id, independent of
    the other ids), so with the same ``val_fraction`` the image model, its refinement and the
    cell model of a pipeline run keep the same validation images unseen — the cells the fusion
    of the two models is chosen on (:func:`napari_cpgcn.pipeline.fusion.validation_cells`). ``seed`` is
    not used (the split does not change with the training seed).
    """
    from napari_cpgcn.training.datasets import split_ids

    ids = np.asarray(image_ids).astype(str)
    uniq = sorted(set(ids.tolist()))
    if val_fraction <= 0 or len(uniq) < 2:
        return np.arange(len(ids)), np.zeros(0, np.int64)
    _, val_ids = split_ids(uniq, val_fraction)
    val = set(val_ids)
    is_val = np.array([i in val for i in ids])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _crop_stats(crops: np.ndarray, rows: np.ndarray, max_n: int = 2000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from napari_cpgcn.models.cell import CROP_SCALE

    sel = rows[np.linspace(0, len(rows) - 1, min(len(rows), max_n)).astype(int)] if len(rows) else rows
    x = np.asarray(crops[np.sort(sel)], dtype=np.float32) / CROP_SCALE
    if x.size == 0:
        from napari_cpgcn.models.backbone import DEFAULT_MEAN, DEFAULT_STD

        return tuple(DEFAULT_MEAN), tuple(DEFAULT_STD)
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


class _DictDataset:
    """Wrap :class:`CropDataset` items as the engine's dict batches."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = self.base[i]
        return {"image": x, "target": y}


def _meta(config: CellModelConfig) -> dict[str, Any]:
    return {
        "kind": CELL_MODEL_KIND,
        "classes": list(config.classes),
        "backbone": config.backbone,
        "crop_size": config.crop_size,
        "zero_background": config.zero_background,
        "crop_pad": config.crop_pad,
        "mean": list(config.mean or ()),
        "std": list(config.std or ()),
    }


def train_cell_model(
    images_dir: str | Path,
    masks_dir: str | Path,
    cells: pd.DataFrame,
    targets: np.ndarray,
    run_dir: str | Path,
    config: CellModelConfig | None = None,
    should_stop: ShouldStop | None = None,
    *,
    stage: str = "cell_model",
    resume: bool = True,
) -> Iterator[Event]:
    """Train the cell classifier; a generator of progress events.

    Parameters
    ----------
    images_dir
        Folder of the training images.
    masks_dir
        Folder of ``{image_id}.tif`` cell masks.
    cells
        One row per training cell (``image_id``, ``cell_id`` and bbox columns).
    targets
        (n_cells, 19) targets in the row order of ``cells`` (see :func:`cell_targets`).
    run_dir
        Output folder: ``crops/`` cache, ``latest.pt``, ``best.pt``, ``history.csv``,
        ``cell_config.json``.
    config
        :class:`CellModelConfig` (defaults: the paper's).
    should_stop
        Polled between batches; a stop leaves ``latest.pt`` at the last finished epoch.

    Yields
    ------
    Event
        Crop-cache ``ITEM`` events, then the engine's events, ending in ``DONE`` / ``STOPPED``.
    """
    import torch

    from napari_cpgcn.models.cell import build_cell_model
    from napari_cpgcn.training.checkpoint import load_backbone_weights
    from napari_cpgcn.training.crops import CropDataset, build_crop_cache
    from napari_cpgcn.training.engine import fit

    config = config or CellModelConfig()
    config.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cells = cells.reset_index(drop=True)
    targets = np.asarray(targets, dtype=np.float32)
    if len(cells) != len(targets):
        raise ValueError(f"{len(cells)} cells but {len(targets)} target rows")
    if len(cells) == 0:
        raise ValueError("no cells to train the cell model on: the segmentation found no cells in the "
                         "training images (check the segmentation stage's masks)")

    from napari_cpgcn.training import ddp
    from napari_cpgcn.training.engine import resolve_device

    # Under torchrun rank 0 builds the crop cache and the other ranks then open it (no-op otherwise).
    ddp.init_distributed(resolve_device(config.device))
    if not ddp.is_main_process():
        ddp.barrier()
    stopped, cache = yield from relay(build_crop_cache(
        images_dir, masks_dir, cells, run_dir / "crops", size=config.crop_size,
        zero_background=config.zero_background, pad=config.crop_pad, should_stop=should_stop, stage=stage))
    if stopped:
        return
    if ddp.is_main_process():
        ddp.barrier()
    assert cache is not None

    train_rows, val_rows = split_by_image(cells["image_id"].to_numpy(), config.val_fraction, config.seed)
    # Normalisation measured once and kept with the run, so a resumed run has the same meta.
    cfg_path = run_dir / "cell_config.json"
    if config.mean is None or config.std is None:
        saved = None
        if cfg_path.is_file():
            try:
                saved = CellModelConfig.load(cfg_path)
            except (ConfigError, OSError):
                saved = None
        if saved is not None and saved.mean is not None and saved.crop_size == config.crop_size:
            config = config.replace(mean=saved.mean, std=saved.std)
        else:
            mean, std = _crop_stats(cache.crops, train_rows)
            config = config.replace(mean=config.mean or mean, std=config.std or std)
    config.save(cfg_path)

    # Seeded initialisation: the same weights whatever ran before in this process.
    resuming = resume and (run_dir / "latest.pt").is_file()  # its weights replace any start
    with torch.random.fork_rng(devices=[]), ddp.main_process_first():  # rank 0 alone downloads weights
        torch.manual_seed(config.seed)
        model = build_cell_model(config, weights=None if config.init_from or resuming else "config")
    if model.backbone.weights_message:  # which start: ImageNet from a file / a download / offline
        yield Event(EventKind.LOG, stage=stage, message=model.backbone.weights_message)
    if config.init_from and not resuming:
        used = load_backbone_weights(model.backbone, config.init_from, config.backbone, stage="cell_model")
        yield Event(EventKind.LOG, stage=stage, message=f"cell backbone initialised from {used}")
    n_pos = targets[train_rows].sum(0)
    yield Event(EventKind.LOG, stage=stage, message=(
        f"cell model ({config.mode}): {len(train_rows)} training / {len(val_rows)} validation cells, "
        f"positives per class {n_pos.astype(int).tolist()}"))
    train_ds = _DictDataset(CropDataset(cache.crops, targets, train_rows, augment=config.augment, seed=config.seed))
    gen = torch.Generator()
    gen.manual_seed(config.seed)

    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=config.batch_size, shuffle=True, generator=gen, num_workers=config.num_workers,
        drop_last=len(train_ds) > config.batch_size)
    val_loader = None
    if len(val_rows):
        val_loader = torch.utils.data.DataLoader(
            _DictDataset(CropDataset(cache.crops, targets, val_rows)), batch_size=config.batch_size,
            shuffle=False, num_workers=config.num_workers)

    def epoch_hook(epoch: int, metrics: dict[str, float]) -> None:
        train_ds.base.set_epoch(epoch + 1)

    train_ds.base.set_epoch(0)
    yield from fit(model, train_loader, val_loader, config, run_dir, should_stop, meta=_meta(config),
                   epoch_hook=epoch_hook, resume=resume, stage=stage)


