"""Self-supervised pretraining of a backbone on the user's own (unlabelled) images.

The whole weak-supervision chain stands on a pretrained backbone: from random initialisation
the class maps barely localise and the per-cell pseudo-labels are no better than the image
labels (docs/benchmarks.md). Where no ImageNet weights exist (offline, or for four-channel
microscopy at all), :func:`pretrain_backbone` trains the backbone on the images of a folder
without any label, with a self-supervised objective from the `lightly
<https://docs.lightly.ai>`_ library (``pip install napari-cpgcn[pretrain]``):

``simclr``   contrastive (NT-Xent) between two views of an image, the batch as negatives;
``byol``     a predictor regresses a momentum teacher's projection of the other view;
``vicreg``   invariance + variance + covariance terms, no negatives, no teacher;
``dino``     self-distillation of a momentum teacher's softmax output.

The losses and heads are lightly's; what this module adds is the four-channel data, the
augmentations and the project's training engine (:func:`napari_cpgcn.training.engine.fit`:
resumable ``latest.pt``, seeded epochs, AMP on CUDA, stop requests, typed events).

Views
-----
``tiles``  random resized crops of the whole field of view (resized to ``image_size`` first,
           the scale the image model sees it at), output ``crop_size``²;
``cells``  crops of single cells (classical segmentation of every image, cut as the cell model
           cuts them: square box, background zeroed), then a random resized crop of the crop;
``both``   the tiles and the cell crops in one data set.

Augmentations fit fluorescence microscopy: flips, 90° rotations, crops, and intensity jitter
per channel (gain, offset, gamma) plus a little Gaussian noise. No colour-hue or
channel-mixing transforms: each channel keeps its meaning (red microtubules, green protein,
blue nucleus, yellow ER).

Output folder
-------------
``pretrain_config.json``  the :class:`PretrainConfig` (with the measured channel statistics)
``latest.pt``             the whole self-supervised model, optimizer and RNG state (resume)
``history.csv``           loss per epoch
``backbone.pt``           the finished backbone alone: what ``train --init-from`` and
                          ``train-image --init-from`` read (a napari-cpgcn checkpoint whose
                          tensors are named ``backbone.*`` and whose ``meta`` says
                          ``kind = "pretrained_backbone"`` and the backbone name)
``cache/``, ``cells/``    resized images and cell crops (rebuilt when missing)

:func:`pretrained_backbone_path` gives the ``backbone.pt`` of a finished folder; the engine's
:func:`~napari_cpgcn.training.engine.resolve_init_checkpoint` accepts the folder itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_cpgcn.events import Event, EventKind, ShouldStop, relay
from napari_cpgcn.io.atomic import atomic_save_npy
from napari_cpgcn.training.config import ConfigError, TrainConfig, check_channel_stats, check_choice

__all__ = [
    "PretrainConfig",
    "PretrainResult",
    "METHODS",
    "VIEWS",
    "PRETRAIN_KIND",
    "BACKBONE_FILE",
    "CONFIG_FILE",
    "pretrain_backbone",
    "pretrained_backbone_path",
    "is_pretrain_dir",
    "random_view",
]

log = logging.getLogger(__name__)

#: Self-supervised objectives (lightly's losses and heads).
METHODS: tuple[str, ...] = ("simclr", "byol", "vicreg", "dino")
#: What the views are cut from.
VIEWS: tuple[str, ...] = ("tiles", "cells", "both")
#: ``meta["kind"]`` of the finished backbone checkpoint and of the training checkpoints.
PRETRAIN_KIND = "pretrained_backbone"
TRAINING_KIND = "self_supervised_pretraining"
BACKBONE_FILE = "backbone.pt"
CONFIG_FILE = "pretrain_config.json"
STAGE = "pretrain"


# ============================================================================ configuration

@dataclass
class PretrainConfig(TrainConfig):
    """Self-supervised pretraining of a backbone (see the module docstring).

    The engine fields (``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``lr_schedule``,
    ``seed``, ``device``, ``amp``, ``num_workers``, ``grad_clip``) are those of
    :class:`~napari_cpgcn.training.config.TrainConfig`; ``val_fraction`` is not used (there
    are no labels to validate on).

    Attributes
    ----------
    backbone
        One of :data:`napari_cpgcn.models.backbone.BACKBONES`; the models it starts must use the
        same one.
    method
        One of :data:`METHODS`.
    views
        One of :data:`VIEWS`: field-of-view tiles, single-cell crops, or both.
    image_size
        Each image is first resized to ``image_size``² (as the image model sees it).
    crop_size
        Side of the views fed to the network.
    crop_scale
        Area of a tile as a fraction of the (resized) image, (min, max).
    cell_scale
        Area of a view as a fraction of its cell crop, (min, max).
    tiles_per_image
        Tiles drawn from every image per epoch (small folders still give enough steps).
    cell_crop_pad
        Margin around a cell's box, as the cell model's ``crop_pad``.
    segmentation
        Segmentation method for the cell views (``"classical"`` or ``"cellpose"``).
    intensity_jitter
        Strength of the per-channel gain / offset / gamma jitter (0: none).
    noise
        Largest std of the additive Gaussian noise (images in [0, 1]).
    reference_dropout
        Probability with which each reference channel (red, blue, yellow: microtubules,
        nucleus, ER) is blanked in a view, independently per view: the two views of an image
        then agree in the protein channel (green) more reliably than in the references, which
        steers the embedding towards the protein's pattern (the channel the classes are about).
    projection_dim, hidden_dim
        Output and hidden width of the projection head.
    temperature
        NT-Xent temperature (``simclr``).
    momentum
        Start of the teacher's momentum (``byol``, ``dino``), annealed to 1 by a cosine.
    dino_out_dim
        Output width of the DINO head.
    cache, cache_dir
        Cache the resized images as ``.npy`` (default folder: ``OUT/cache``).
    mean, std
        Input normalisation; ``None`` = measured on the images.
    """

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-6
    lr_schedule: str = "cosine"
    val_fraction: float = 0.0
    backbone: str = "resnet50"
    method: str = "vicreg"
    views: str = "tiles"
    image_size: int = 512
    crop_size: int = 128
    crop_scale: tuple[float, float] = (0.08, 0.5)
    cell_scale: tuple[float, float] = (0.5, 1.0)
    tiles_per_image: int = 4
    cell_crop_pad: float = 0.05
    segmentation: str = "classical"
    intensity_jitter: float = 0.4
    noise: float = 0.02
    reference_dropout: float = 0.0
    projection_dim: int = 128
    hidden_dim: int = 512
    temperature: float = 0.2
    momentum: float = 0.99
    dino_out_dim: int = 2048
    cache: bool = True
    cache_dir: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def validate(self) -> None:
        super().validate()
        from napari_cpgcn.models.backbone import BACKBONES

        check_choice(self.backbone, BACKBONES, "backbone")
        check_choice(self.method, METHODS, "method")
        check_choice(self.views, VIEWS, "views")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")
        if not 16 <= self.crop_size <= self.image_size:
            raise ConfigError(f"crop_size must be between 16 and image_size ({self.image_size}), got {self.crop_size}")
        for name in ("crop_scale", "cell_scale"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
                raise ConfigError(f"{name} must be (min, max) within (0, 1], got {lo_hi}")
        if self.tiles_per_image < 1:
            raise ConfigError(f"tiles_per_image must be >= 1, got {self.tiles_per_image}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 for self-supervised losses, got {self.batch_size}")
        if not 0.0 <= self.intensity_jitter < 1.0:
            raise ConfigError(f"intensity_jitter must be in [0, 1), got {self.intensity_jitter}")
        if self.noise < 0:
            raise ConfigError(f"noise must be >= 0, got {self.noise}")
        if not 0.0 <= self.reference_dropout < 1.0:
            raise ConfigError(f"reference_dropout must be in [0, 1), got {self.reference_dropout}")
        if not 0.0 < self.momentum < 1.0:
            raise ConfigError(f"momentum must be in (0, 1), got {self.momentum}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.segmentation not in ("classical", "cellpose"):
            raise ConfigError(f"segmentation must be 'classical' or 'cellpose', got {self.segmentation!r}")
        check_channel_stats(self)

    def stage_settings(self) -> dict[str, Any]:
        """The settings that decide the pretrained weights (a pipeline stage key; device and
        worker counts excluded)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in ("device", "num_workers", "amp", "cache_dir", "cache")}


@dataclass
class PretrainResult:
    """What the DONE event of :func:`pretrain_backbone` carries in ``result``."""

    out_dir: str
    backbone_path: str
    epochs: int
    final_loss: float
    first_loss: float
    n_images: int
    n_views: int
    seconds: float
    history: list[dict[str, Any]]


# ============================================================================ folder helpers

def is_pretrain_dir(path: str | Path) -> bool:
    """Whether ``path`` is a pretraining output folder (finished or not)."""
    p = Path(path)
    return p.is_dir() and ((p / CONFIG_FILE).is_file() or (p / BACKBONE_FILE).is_file())


def pretrained_backbone_path(out_dir: str | Path) -> Path:
    """The ``backbone.pt`` of a finished pretraining folder.

    Raises
    ------
    FileNotFoundError
        The folder does not exist, or its pretraining has not finished (the message says how to
        resume it).
    """
    out = Path(out_dir).expanduser()
    if not out.is_dir():
        raise FileNotFoundError(f"pretraining folder {out} does not exist; make it with `napari-cpgcn pretrain`")
    p = out / BACKBONE_FILE
    if p.is_file():
        return p
    if (out / "latest.pt").is_file() or (out / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"the pretraining in {out} has not finished (no {BACKBONE_FILE} yet); continue it with "
            f"`napari-cpgcn pretrain DATA_DIR --out {out} --resume`")
    raise FileNotFoundError(f"{out} is not a pretraining folder (no {BACKBONE_FILE}); make one with "
                            "`napari-cpgcn pretrain DATA_DIR --out DIR`")


# ============================================================================ augmentation

def random_view(img, size: int, scale: tuple[float, float], jitter: float = 0.4, noise: float = 0.02,
                generator=None, reference_dropout: float = 0.0):
    """One random view of a (C, H, W) float image in [0, 1] → (C, size, size).

    Random resized crop (area fraction in ``scale``, aspect ratio in [3/4, 4/3]), vertical and
    horizontal flips, a random number of 90° rotations, then per channel independently a gain
    (×[1 - j, 1 + j]), an offset (±j/10) and a gamma (in [1 - j, 1 + j]^±1), and Gaussian noise
    with a random std up to ``noise``; each reference channel (0, 2, 3: red, blue, yellow) is
    blanked with probability ``reference_dropout``. Channels are never mixed. Randomness comes from
    ``generator`` (default: torch's global generator, which the engine seeds every epoch).
    """
    import torch
    import torch.nn.functional as F

    g = generator

    def u(*shape):
        return torch.rand(shape, generator=g) if shape else float(torch.rand((), generator=g))

    c, h, w = img.shape
    lo, hi = scale
    area = (lo + (hi - lo) * u()) * h * w
    log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u()
    ch = int(round(min(h, math.sqrt(area / math.exp(log_r)))))
    cw = int(round(min(w, math.sqrt(area * math.exp(log_r)))))
    ch, cw = max(ch, 2), max(cw, 2)
    y0 = int((h - ch) * u())
    x0 = int((w - cw) * u())
    x = img[:, y0:y0 + ch, x0:x0 + cw]
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                      antialias=bool(ch > size or cw > size))[0]
    if u() < 0.5:
        x = torch.flip(x, dims=(-2,))
    if u() < 0.5:
        x = torch.flip(x, dims=(-1,))
    k = int(4 * u()) % 4
    if k:
        x = torch.rot90(x, k, dims=(-2, -1))
    if jitter > 0:
        gain = 1.0 + jitter * (2 * u(c, 1, 1) - 1)
        offset = 0.1 * jitter * (2 * u(c, 1, 1) - 1)
        gamma = torch.exp(math.log1p(jitter) * (2 * u(c, 1, 1) - 1))
        x = (x.clamp(0, 1) ** gamma) * gain + offset
    if noise > 0:
        x = x + noise * u() * torch.randn(x.shape, generator=g)
    if reference_dropout > 0 and c == 4:
        keep = (u(c, 1, 1) >= reference_dropout).to(x.dtype)
        keep[1] = 1.0  # the protein channel stays
        x = x * keep
    return x.clamp_(0, 1).contiguous()


# ============================================================================ data

class _Views:
    """A torch Dataset of two random views per item (tiles of images and/or cell crops)."""

    def __init__(self, images, crops, config: PretrainConfig) -> None:
        self.images = images          # an HPAImageDataset: .load(k) -> (4, S, S) float tensor
        self.crops = crops            # (n, 4, s, s) uint16 array (CROP_SCALE grid) or None
        self.config = config
        self.n_tiles = len(images) * config.tiles_per_image if config.views in ("tiles", "both") else 0
        self.n_cells = len(crops) if crops is not None and config.views in ("cells", "both") else 0

    def __len__(self) -> int:
        return self.n_tiles + self.n_cells

    def __getitem__(self, i: int) -> dict:
        import torch

        cfg = self.config
        if i < self.n_tiles:
            img = self.images.load(i % len(self.images))
            scale = cfg.crop_scale
        else:
            from napari_cpgcn.models.cell import CROP_SCALE

            img = torch.from_numpy(np.asarray(self.crops[i - self.n_tiles], dtype=np.float32) / CROP_SCALE)
            scale = cfg.cell_scale
        v0 = random_view(img, cfg.crop_size, scale, cfg.intensity_jitter, cfg.noise,
                         reference_dropout=cfg.reference_dropout)
        v1 = random_view(img, cfg.crop_size, scale, cfg.intensity_jitter, cfg.noise,
                         reference_dropout=cfg.reference_dropout)
        return {"image": v0, "view1": v1, "target": torch.zeros(1)}


def _crop_key(ids: list[str], config: PretrainConfig) -> str:
    h = hashlib.sha1()
    h.update(json.dumps(["uint16", config.crop_size, config.cell_crop_pad, config.segmentation, sorted(ids)]).encode())
    return h.hexdigest()[:16]


def _cell_crops(index, ids: list[str], folder: Path, config: PretrainConfig,
                should_stop: ShouldStop) -> Iterator[Event]:
    """Segment every image and cut its cells (as the cell model does); DONE result = (n, 4, s, s) uint16
    on the cell model's :data:`~napari_cpgcn.models.cell.CROP_SCALE` grid."""
    from napari_cpgcn.io.celltable import cell_geometry
    from napari_cpgcn.models.cell import crop_cells
    from napari_cpgcn.segmentation import segment_cells

    folder.mkdir(parents=True, exist_ok=True)
    key = _crop_key(ids, config)
    path = folder / f"crops_{key}.npy"
    if path.is_file():
        yield Event(EventKind.LOG, stage=STAGE, message=f"reusing the cell crops in {path}")
        yield Event(EventKind.DONE, stage=STAGE, result=np.load(path, mmap_mode="r"))
        return
    parts = []
    for k, iid in enumerate(ids, start=1):
        if should_stop():
            yield Event(EventKind.STOPPED, stage=STAGE, message=f"stopped while cutting cell crops ({k - 1} of "
                                                                 f"{len(ids)} images)")
            return
        try:
            data = index.read(iid).data
            cells = np.asarray(segment_cells(data, method=config.segmentation), dtype=np.uint32)
            geo = cell_geometry(cells, iid)
            if len(geo):
                parts.append(crop_cells(data, cells, geo, size=config.crop_size, zero_background=True,
                                        pad=config.cell_crop_pad, dtype=np.uint16))
        except Exception as e:  # a folder run skips a bad image and goes on
            log.warning("pretraining: skipping the cells of %s (%s: %s)", iid, type(e).__name__, e)
        yield Event(EventKind.ITEM, stage=STAGE, batch=k, n_batches=len(ids), message=f"cells of {iid}")
    arr = np.concatenate(parts) if parts else np.zeros((0, 4, config.crop_size, config.crop_size), np.uint16)
    atomic_save_npy(path, arr)
    yield Event(EventKind.DONE, stage=STAGE, result=arr)


# ============================================================================ model

def _build_model(config: PretrainConfig, total_steps: int):
    """The backbone with the method's heads, loss and (for byol/dino) momentum teacher."""
    import torch
    from torch import nn

    from napari_cpgcn.models.backbone import Backbone

    try:
        from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
        from lightly.models.modules.heads import (
            BYOLPredictionHead,
            BYOLProjectionHead,
            DINOProjectionHead,
            SimCLRProjectionHead,
            VICRegProjectionHead,
        )
        from lightly.models.utils import deactivate_requires_grad, update_momentum
        from lightly.utils.scheduler import cosine_schedule
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("self-supervised pretraining needs the 'lightly' package: "
                          "pip install 'napari-cpgcn[pretrain]'") from e

    class Model(nn.Module):
        """Backbone + projection head(s) + loss; ``forward(view0, view1)`` returns the loss."""

        def __init__(self) -> None:
            super().__init__()
            cfg = config
            mean = cfg.mean if cfg.mean is not None else (0.08, 0.05, 0.05, 0.08)
            std = cfg.std if cfg.std is not None else (0.13, 0.10, 0.10, 0.13)
            self.method = cfg.method
            self.backbone = Backbone(cfg.backbone, in_chans=4, weights=None, mean=mean, std=std)
            d = self.backbone.out_channels
            self.total_steps = max(1, int(total_steps))
            self.register_buffer("step", torch.zeros((), dtype=torch.long))
            self.teacher_backbone = self.teacher_projection = self.prediction = None
            if cfg.method == "simclr":
                self.projection = SimCLRProjectionHead(d, cfg.hidden_dim, cfg.projection_dim)
                self.criterion = NTXentLoss(temperature=cfg.temperature)
            elif cfg.method == "byol":
                self.projection = BYOLProjectionHead(d, cfg.hidden_dim, cfg.projection_dim)
                self.prediction = BYOLPredictionHead(cfg.projection_dim, cfg.hidden_dim, cfg.projection_dim)
                self.criterion = NegativeCosineSimilarity()
            elif cfg.method == "vicreg":
                self.projection = VICRegProjectionHead(d, cfg.hidden_dim, cfg.projection_dim, num_layers=2)
                self.criterion = VICRegLoss()
            else:  # dino
                self.projection = self._dino_head()
                self.criterion = DINOLoss(output_dim=cfg.dino_out_dim, warmup_teacher_temp_epochs=0)
            if cfg.method in ("byol", "dino"):
                self.teacher_backbone = copy.deepcopy(self.backbone)
                if cfg.method == "dino":  # weight-normed layers cannot be deep-copied: a twin, same weights
                    self.teacher_projection = self._dino_head()
                    self.teacher_projection.load_state_dict(self.projection.state_dict())
                else:
                    self.teacher_projection = copy.deepcopy(self.projection)
                deactivate_requires_grad(self.teacher_backbone)
                deactivate_requires_grad(self.teacher_projection)

        def _dino_head(self):
            import warnings

            cfg = config
            with warnings.catch_warnings():  # lightly's head uses torch's older weight_norm
                warnings.simplefilter("ignore", FutureWarning)
                return DINOProjectionHead(self.backbone.out_channels, cfg.hidden_dim, min(256, cfg.hidden_dim),
                                          cfg.dino_out_dim, batch_norm=True)

        def embed(self, x):
            return self.backbone.forward_head(self.backbone.forward_features(x))

        def _teacher(self, x):
            with torch.no_grad():
                self.teacher_backbone.train(self.training)
                f = self.teacher_backbone.forward_head(self.teacher_backbone.forward_features(x))
                return self.teacher_projection(f).detach()

        def forward(self, x0, x1):
            if self.method in ("simclr", "vicreg"):
                z = self.projection(self.embed(torch.cat([x0, x1])))
                z0, z1 = z.float().chunk(2)
                return self.criterion(z0, z1)
            if self.method == "byol":
                p = self.prediction(self.projection(self.embed(torch.cat([x0, x1])))).float()
                p0, p1 = p.chunk(2)
                t0, t1 = self._teacher(torch.cat([x0, x1])).float().chunk(2)
                return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))
            s = self.projection(self.embed(torch.cat([x0, x1]))).float()
            t = self._teacher(torch.cat([x0, x1])).float()
            return self.criterion(list(t.chunk(2)), list(s.chunk(2)))

        @torch.no_grad()
        def after_step(self) -> None:
            """Advance the step; move the momentum teacher (cosine from ``momentum`` to 1)."""
            if self.teacher_backbone is not None:
                m = cosine_schedule(int(self.step), self.total_steps, config.momentum, 1.0)
                update_momentum(self.backbone, self.teacher_backbone, m)
                update_momentum(self.projection, self.teacher_projection, m)
            self.step += 1

    return Model()


def _meta(config: PretrainConfig, n_images: int) -> dict[str, Any]:
    return {
        "kind": TRAINING_KIND,
        "backbone": config.backbone,
        "method": config.method,
        "views": config.views,
        "image_size": config.image_size,
        "crop_size": config.crop_size,
        "mean": list(config.mean or ()),
        "std": list(config.std or ()),
    }


def _seed_worker(worker_id: int) -> None:
    import random

    import torch

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# ============================================================================ the job

def pretrain_backbone(
    data_dir: str | Path,
    out_dir: str | Path,
    config: PretrainConfig | None = None,
    should_stop: ShouldStop | None = None,
    *,
    image_ids: list[str] | None = None,
    resume: bool = True,
) -> Iterator[Event]:
    """Train a backbone self-supervised on the images of ``data_dir``; a generator of events.

    Parameters
    ----------
    data_dir
        Folder of four-channel images (``ID_red.png`` ... or multichannel TIFFs; ``images/``
        inside accepted). No labels are read.
    out_dir
        Output folder (see the module docstring); ``out_dir/backbone.pt`` is the result.
    config
        :class:`PretrainConfig` (default: resnet50, VICReg on tiles, 100 epochs).
    should_stop
        Polled after every batch; a stop keeps ``latest.pt`` at the last finished epoch.
    image_ids
        Use only these images of the folder (default: all; e.g. leave test images out).
    resume
        Continue from ``out_dir/latest.pt`` when it exists (the settings saved in
        ``pretrain_config.json`` must match, else a
        :class:`~napari_cpgcn.training.engine.CheckpointError` names the difference).

    Yields
    ------
    Event
        Stage ``"pretrain"``: LOG / ITEM while the images are read (and, for cell views,
        segmented), then the engine's EPOCH_START / BATCH / EPOCH_END / CHECKPOINT, finally DONE
        with a :class:`PretrainResult` (or STOPPED).

    Raises
    ------
    FileNotFoundError
        No usable image in ``data_dir``.
    """
    import torch

    from napari_cpgcn.io.atomic import atomic_write_text
    from napari_cpgcn.io.hpa import image_index
    from napari_cpgcn.io.tables import LabelTable
    from napari_cpgcn.training.checkpoint import save_checkpoint
    from napari_cpgcn.training.datasets import HPAImageDataset, channel_stats
    from napari_cpgcn.training.engine import fit

    t_start = time.perf_counter()
    should_stop = should_stop or (lambda: False)
    config = config or PretrainConfig()
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = image_index(data_dir)
    ids = index.ids
    if image_ids is not None:
        wanted = list(dict.fromkeys(image_ids))
        missing = [i for i in wanted if i not in index]
        if missing:
            log.warning("%d of the requested images are not in %s and are skipped (e.g. %s)", len(missing),
                        index.folder, missing[0])
        ids = [i for i in wanted if i in index]
    if index.incomplete:
        log.warning("%d images in %s lack some of the four channel files and are skipped (e.g. %s)",
                    len(index.incomplete), index.folder, index.incomplete[0])
    if not ids:
        raise FileNotFoundError(f"no four-channel images in {index.folder}: pretraining needs ID_red/_green/"
                                "_blue/_yellow files (or multichannel TIFFs) there")

    # Resized images, cached; an unreadable image is skipped with a warning.
    cache_dir = (Path(config.cache_dir) if config.cache_dir else out / "cache") if config.cache else None
    table = LabelTable(list(ids), np.zeros((len(ids), 1), np.uint8))
    ds = HPAImageDataset(index.folder, table, config.image_size, augment=False, cache_dir=cache_dir, index=index)
    good: list[int] = []
    for k, _ in enumerate(ids):
        if should_stop():
            yield Event(EventKind.STOPPED, stage=STAGE, message="stopped while reading the images")
            return
        try:
            ds.load(k)
            good.append(k)
        except Exception as e:  # a folder run skips a bad image and goes on
            log.warning("pretraining: skipping %s (%s: %s)", ids[k], type(e).__name__, e)
        yield Event(EventKind.ITEM, stage=STAGE, batch=k + 1, n_batches=len(ids), message=f"read {ids[k]}")
    if not good:
        raise FileNotFoundError(f"none of the {len(ids)} images in {index.folder} could be read")
    if len(good) < len(ids):
        table = table.subset([ids[k] for k in good])
        ds = HPAImageDataset(index.folder, table, config.image_size, augment=False, cache_dir=cache_dir, index=index)
    ids = list(table.ids)

    # Channel statistics: measured once, kept in the folder (a resumed run has the same meta).
    cfg_path = out / CONFIG_FILE
    if config.mean is None or config.std is None:
        saved = None
        if resume and cfg_path.is_file():
            try:
                saved = PretrainConfig.load(cfg_path)
            except (ConfigError, OSError, TypeError):
                saved = None
        if saved is not None and saved.mean is not None and saved.std is not None:
            config = config.replace(mean=saved.mean, std=saved.std)
        else:
            mean, std = channel_stats(ds)
            config = config.replace(mean=tuple(round(v, 6) for v in mean), std=tuple(round(v, 6) for v in std))
    config.save(cfg_path)

    crops = None
    if config.views in ("cells", "both"):
        stopped, crops = yield from relay(_cell_crops(index, ids, out / "cells", config, should_stop))
        if stopped:
            return
        if crops is None or len(crops) == 0:
            if config.views == "cells":
                raise ValueError(f"the segmentation found no cells in the images of {index.folder}; "
                                 "use --views tiles")
            log.warning("no cells found for the cell views; pretraining on tiles only")
        yield Event(EventKind.LOG, stage=STAGE, message=f"{0 if crops is None else len(crops)} cell crops")

    views = _Views(ds, crops, config)
    if len(views) < 2:
        raise ValueError(f"only {len(views)} view(s) to pretrain on; add images or raise tiles_per_image")
    batch_size = min(config.batch_size, len(views))
    gen = torch.Generator()
    gen.manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(views, batch_size=batch_size, shuffle=True, generator=gen,
                                         num_workers=config.num_workers, worker_init_fn=_seed_worker,
                                         drop_last=True)
    steps = config.epochs * len(loader)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = _build_model(config, steps)
    msg = (f"self-supervised pretraining ({config.method}, {config.views}) of a {config.backbone} on "
           f"{len(ids)} images ({views.n_tiles} tiles + {views.n_cells} cell crops per epoch, "
           f"{config.crop_size}px views), {config.epochs} epochs of {len(loader)} batches")
    log.info(msg)
    yield Event(EventKind.LOG, stage=STAGE, message=msg)

    def forward_fn(m, batch):
        return m(batch["image"], batch["view1"])

    def batch_hook(output, batch, epoch):
        model.after_step()

    fit_result = None
    trained = False
    for ev in fit(model, loader, None, config, out, should_stop, meta=_meta(config, len(ids)),
                  loss_fn=lambda output, batch: output, forward_fn=forward_fn, batch_hook=batch_hook,
                  resume=resume, stage=STAGE):
        if ev.kind == EventKind.DONE:
            fit_result = ev.result
            break
        trained = trained or ev.kind == EventKind.EPOCH_END
        yield ev
        if ev.kind == EventKind.STOPPED:
            return
    assert fit_result is not None
    history = list(fit_result.history or [])
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    meta = {**_meta(config, len(ids)), "kind": PRETRAIN_KIND, "epochs": int(fit_result.epochs_done),
            "n_images": len(ids)}
    from napari_cpgcn.training import ddp

    path = out / BACKBONE_FILE
    if ddp.is_main_process() and (trained or not path.is_file()):  # a finished rerun leaves it as it is
        save_checkpoint(path, state, meta, config=config.to_dict(), history=history)
        atomic_write_text(out / "pretrain.json", json.dumps(
            {"backbone": str(path), "epochs": int(fit_result.epochs_done), "n_images": len(ids),
             "n_tiles": views.n_tiles, "n_cells": views.n_cells, "history": history}, indent=1, default=float) + "\n")
        # the engine's best.pt follows the lowest self-supervised loss: not a better backbone than
        # the last one, and a second copy of it on disk
        (out / "best.pt").unlink(missing_ok=True)
    ddp.barrier()
    losses = [float(h["train_loss"]) for h in history if "train_loss" in h]
    res = PretrainResult(str(out), str(path), int(fit_result.epochs_done), losses[-1] if losses else float("nan"),
                         losses[0] if losses else float("nan"), len(ids), len(views),
                         time.perf_counter() - t_start, history)
    yield Event(EventKind.CHECKPOINT, stage=STAGE, epoch=res.epochs, n_epochs=config.epochs, path=str(path),
                message="pretrained backbone")
    yield Event(EventKind.DONE, stage=STAGE, epoch=res.epochs, n_epochs=config.epochs, path=str(path),
                message=f"pretrained {config.backbone} backbone in {path}", result=res)
