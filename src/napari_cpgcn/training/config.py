"""Training configurations as dataclasses with a JSON round trip.

:class:`TrainConfig` holds what the generic engine (:mod:`napari_cpgcn.training.engine`) reads;
:class:`ImageModelConfig` adds the CP-GCN image model and its data. Other trainers (the cell
classifier, the sub-category refinement) subclass :class:`TrainConfig` the same way. Every
checkpoint stores ``config.to_dict()``; widgets map onto the same fields.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from napari_cpgcn.classes import SHORT_NAMES

__all__ = ["TrainConfig", "ImageModelConfig", "ConfigError", "PseudoLabelConfig"]

log = logging.getLogger(__name__)

T = TypeVar("T", bound="TrainConfig")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the allowed values."""


def check_choice(value, choices, what: str, error: type[ValueError] = ConfigError) -> None:
    """Raise ``error`` naming ``what`` and the allowed values unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise error(f"{what} {value!r} unknown; choose one of {', '.join(map(str, choices))}")


@dataclass
class TrainConfig:
    """Fields of the generic training engine (defaults = the paper's image-model settings).

    Attributes
    ----------
    epochs, batch_size, lr, weight_decay
        Optimisation (Adam).
    lr_schedule
        ``"constant"`` (the paper) or ``"cosine"`` (annealed to 1 % of ``lr`` over ``epochs``).
    focal_gamma, focal_alpha
        Focal loss parameters (``focal_alpha=None``: no class-balance factor).
    seed
        Seed of everything random (initialisation, split, shuffling, augmentation).
    device
        ``"auto"`` (cuda → mps → cpu), ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"cpu"``.
    amp
        Mixed precision on CUDA (ignored on other devices).
    num_workers
        DataLoader worker processes.
    val_fraction
        Share of image ids held out for validation (split by id, stable).
    grad_clip
        Max gradient norm (0 = off).
    """

    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    val_fraction: float = 0.2
    grad_clip: float = 0.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values."""
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (tuples become lists); includes the class name as ``_type``."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["_type"] = type(self).__name__
        return d

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """Build from a dict; unknown keys are logged and ignored (newer/older versions)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k != "_type")
        if unknown:
            log.warning("ignoring unknown %s fields: %s", cls.__name__, ", ".join(unknown))
        kwargs = {k: v for k, v in d.items() if k in names}
        if "_type" in d:  # a config this package saved: fields it lacked keep the values of its time
            for k, v in getattr(cls, "SAVED_BEFORE_DEFAULTS", {}).items():
                kwargs.setdefault(k, v)
        for f in dataclasses.fields(cls):
            if f.name in kwargs and isinstance(kwargs[f.name], list) and "tuple" in str(f.type):
                kwargs[f.name] = tuple(kwargs[f.name])
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write the config as JSON atomically."""
        from napari_cpgcn.io.atomic import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        path = Path(path)
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); fix or delete it") from e

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed (validated)."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg


def check_channel_stats(config) -> None:
    """Raise :class:`ConfigError` unless ``config.mean`` / ``config.std`` are None or 4 values (RGBY)."""
    for name in ("mean", "std"):
        v = getattr(config, name)
        if v is not None and len(v) != 4:
            raise ConfigError(f"{name} needs 4 values (red, green, blue, yellow), got {v}")


@dataclass
class ImageModelConfig(TrainConfig):
    """The CP-GCN image model and its training data (defaults = the paper, but for the
    measured ``gcn_residual`` / ``gcn_learn_inputs``).

    Attributes
    ----------
    backbone
        One of :data:`napari_cpgcn.models.backbone.BACKBONES`.
    variant
        ``"cpgcn"`` (full), ``"cnn"``, ``"cnn+cpm"`` or ``"mlgcn"``.
    image_size
        Images are resized to ``image_size``² (the paper: 512).
    imagenet_weights
        ``"imagenet"`` (torch hub cache, else a verified download; offline → random init with
        a message, see :mod:`napari_cpgcn.models.weights`), a mirror URL, a file path, or
        ``None`` (random init, no network).
    init_from
        A napari-cpgcn checkpoint (image or cell model, or a run folder holding
        ``image_model/best.pt``) with the same backbone, whose backbone weights start this
        model (fine-tuning from an earlier run, e.g. one trained on a large public data set);
        the heads start fresh. Takes the place of ``imagenet_weights``.
    output_stride
        ResNet feature stride: 32 (the paper) or 16 (last stage dilated; a 2× finer class-map
        grid, see docs/cell_pipeline.md "CAM localisation: diagnosis").
    cpm_norm
        CPM spatial normalisation: ``"sigmoid"`` (σ(a)/Σσ(a), default) or ``"softmax"``.
    tau, gcn_hidden, gcn_activation
        Label graph threshold, GCN hidden width and activation (``"leaky_relu"`` or ``"relu"``).
    gcn_normalize
        Unit-normalise the GCN classifiers l_c (times one learned scale) for stable training.
    gcn_lr_scale
        Learning-rate factor of the label-GCN weights (their Adam steps move every l_c at once).
    gcn_center
        Subtract the class mean from the GCN outputs before use (experimental, off).
    gcn_residual
        Classifier l_c + r_c with a free per-class vector r_c (default on: measured better than
        the paper's plain l_c from both a supervised and a self-supervised start, benchmarks.md
        "CP-GCN image model"; False is the paper's classifier).
    gcn_residual_std
        Initial std of r_c in units of 1/√D (0: starts at zero; 1: like the cnn+cpm w_c).
    gcn_learn_inputs
        Train the GCN node inputs, initialised from the GloVe word vectors (default on, measured
        together with ``gcn_residual``).
    oaa, oaa_threshold, oaa_size
        Online attention accumulation on/off, the probability a positive class needs for its map
        to be accumulated, and the side of the stored maps.
    augment
        Flips, 90° rotations, random resized crops and intensity jitter during training.
    cache_dir
        Folder for downscaled image tensors (``None``: ``RUN/cache`` when ``cache`` is on).
    cache
        Cache images resized to ``image_size`` as ``.npy`` (reading 2048² PNGs every epoch is slow).
    classes
        Class short names, in output order.
    mean, std
        Per-channel normalisation of [0, 1] input; ``None`` = measured on the training images.
    """

    backbone: str = "resnet50"
    variant: str = "cpgcn"
    image_size: int = 512
    imagenet_weights: str | None = "imagenet"
    init_from: str | None = None
    output_stride: int = 32
    cpm_norm: str = "sigmoid"
    tau: float = 0.3
    gcn_hidden: int = 1024
    gcn_activation: str = "leaky_relu"
    gcn_normalize: bool = True
    gcn_lr_scale: float = 0.01
    gcn_center: bool = False
    gcn_residual: bool = True
    gcn_residual_std: float = 0.0
    gcn_learn_inputs: bool = True
    oaa: bool = True
    oaa_threshold: float = 0.5
    oaa_size: int = 32
    augment: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)
    cache: bool = True
    cache_dir: str | None = None
    classes: tuple[str, ...] = field(default_factory=lambda: tuple(SHORT_NAMES))
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    #: A saved config without these fields predates them: its model had the paper's classifier.
    SAVED_BEFORE_DEFAULTS = {"gcn_residual": False, "gcn_learn_inputs": False}

    def validate(self) -> None:
        super().validate()
        from napari_cpgcn.models.backbone import BACKBONES
        from napari_cpgcn.models.cpgcn import VARIANTS

        check_choice(self.backbone, BACKBONES, "backbone")
        check_choice(self.variant, VARIANTS, "variant")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")
        if self.output_stride not in (16, 32):
            raise ConfigError(f"output_stride must be 16 or 32, got {self.output_stride!r}")
        if self.output_stride != 32 and not self.backbone.startswith("resnet"):
            raise ConfigError(f"output_stride {self.output_stride} needs a ResNet backbone, not {self.backbone!r}")
        if self.cpm_norm not in ("softmax", "sigmoid"):
            raise ConfigError(f"cpm_norm must be 'softmax' or 'sigmoid', got {self.cpm_norm!r}")
        if self.gcn_activation not in ("leaky_relu", "relu"):
            raise ConfigError(f"gcn_activation must be 'leaky_relu' or 'relu', got {self.gcn_activation!r}")
        if not self.gcn_lr_scale > 0:
            raise ConfigError(f"gcn_lr_scale must be > 0, got {self.gcn_lr_scale}")
        if not self.gcn_residual_std >= 0:
            raise ConfigError(f"gcn_residual_std must be >= 0, got {self.gcn_residual_std}")
        if not 0.0 <= self.tau < 1.0:
            raise ConfigError(f"tau must be in [0, 1), got {self.tau}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale must be (min, max) within (0, 1], got {self.crop_scale}")
        check_channel_stats(self)


#: How a cell's CAM score and the image probability combine (:mod:`napari_cpgcn.training.pseudolabels`).
RULES = ("mixture", "product", "cam")


@dataclass
class PseudoLabelConfig:
    """How CAMs become cell labels.

    Attributes
    ----------
    threshold : float
        A cell gets a class when its combined score is at least this.
    rule : str
        ``"mixture"`` (default: ``p·r + (1 − p)``), ``"product"`` (``p·r``) or ``"cam"``
        (``r`` alone, the image probability ignored).
    relative : bool
        Divide by the most activated cell of the image (step 3); False keeps ``a_ic``.
    """

    threshold: float = 0.5
    rule: str = "mixture"
    relative: bool = True

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown pseudo-label rule {self.rule!r}; use one of {RULES}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"pseudo-label threshold must be in [0, 1], got {self.threshold}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
