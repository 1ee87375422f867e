"""The settings of the whole pipeline (:class:`PipelineConfig`) and its stage list.

A run folder keeps its settings in ``RUN/config.json``; each stage's part of them decides whether a
finished stage is still valid (:meth:`PipelineConfig.stage_settings`). No torch at import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_cpgcn.io.atomic import atomic_write_text
from napari_cpgcn.training.config import PseudoLabelConfig

__all__ = [
    "STAGES",
    "PipelineConfig",
    "FUSIONS",
]

log = logging.getLogger(__name__)

#: Pipeline stages in order.
STAGES: tuple[str, ...] = ("pretrain", "image_model", "refine", "segmentation", "pseudolabels", "cell_model", "fusion")
#: Stages that are off unless asked for (a run without them keeps the keys it always had).
OPTIONAL_STAGES: tuple[str, ...] = ("pretrain",)
#: How the image and cell probabilities become one score (:mod:`napari_cpgcn.pipeline.fusion`);
#: ``auto`` chooses among them on the run's validation images.
FUSIONS: tuple[str, ...] = ("product", "auto", "geometric", "logistic", "image", "cell")


def _image_config(**kw):
    from napari_cpgcn.training.config import ImageModelConfig

    return ImageModelConfig(**kw)


def _refine_config(**kw):
    from napari_cpgcn.training.subcategory import RefineConfig

    return RefineConfig(**kw)


def _pretrain_config(d):
    if not d:
        return None
    from napari_cpgcn.training.pretrain import PretrainConfig

    return PretrainConfig.from_dict(d)


def _cell_config(**kw):
    from napari_cpgcn.training.cell_trainer import CellModelConfig

    return CellModelConfig(**kw)


#: Named settings, used by ``napari-cpgcn train --preset`` and the Train widget:
#: name -> what it is for.
PRESETS: dict[str, str] = {
    "paper": "the paper: ResNet50, 512 px, 50 / 3x20 / 20 epochs, K = 10 (a GPU)",
    "small": "a CPU in minutes to hours: resnet18, 256 px, 5 epochs, K = 5",
    "tiny": "seconds to minutes: resnet18, 128 px, 2 epochs, K = 3 (tests and the demo)",
}


@dataclass
class PipelineConfig:
    """Every setting of the pipeline (defaults = the paper's).

    Attributes
    ----------
    image
        :class:`~napari_cpgcn.training.config.ImageModelConfig` (CP-GCN, ResNet50, 512², 50 epochs).
    refine
        :class:`~napari_cpgcn.training.subcategory.RefineConfig` (K = 10, 3 rounds × 20 epochs).
    segmentation
        Segmentation method for training images and for prediction (``"classical"`` or ``"cellpose"``).
    segmentation_params
        Keyword arguments of :func:`napari_cpgcn.segmentation.segment_cells`.
    masks_dir
        A folder of ready cell masks (``{ID}.tif``/``.png`` or ``{ID}_cells.png``) used instead of
        segmenting the training images (e.g. the HPA's own masks).
    pseudo
        :class:`~napari_cpgcn.training.pseudolabels.PseudoLabelConfig` (threshold, combination rule).
    cam_method
        Which maps make the pseudo-labels where no OAA map exists (``"model"``, ``"score"``,
        ``"gradcam"``).
    use_oaa
        Use the OAA-accumulated maps where they exist.
    cell
        :class:`~napari_cpgcn.training.cell_trainer.CellModelConfig` (ResNet50, 20 epochs,
        batch 32; ``mode="baseline"`` trains on image labels instead of pseudo-labels).
    pretrain
        A :class:`~napari_cpgcn.training.pretrain.PretrainConfig`: the ``pretrain`` stage
        trains the backbone self-supervised on the training folder first, and the image and cell
        models start from it (``RUN/pretrain/``); None (default): no such stage.
    fusion
        One of :data:`FUSIONS`: ``product`` (the paper, default), ``auto`` (chosen on the
        validation images), or a fixed option; the ``fusion`` stage writes ``RUN/fusion.json``,
        which the predictor applies.
    """

    image: Any = field(default_factory=_image_config)
    refine: Any = field(default_factory=_refine_config)
    segmentation: str = "classical"
    segmentation_params: dict[str, Any] = field(default_factory=dict)
    masks_dir: str | None = None
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    cam_method: str = "model"
    use_oaa: bool = True
    cell: Any = field(default_factory=_cell_config)
    pretrain: Any = None
    fusion: str = "product"

    @classmethod
    def paper(cls) -> PipelineConfig:
        """The paper's settings (ResNet50 image and cell models, 512² images, K = 10, 3 rounds)."""
        return cls()

    @classmethod
    def tiny(cls, backbone: str = "resnet18", image_size: int = 128, epochs: int = 2, seed: int = 0,
             device: str = "auto") -> PipelineConfig:
        """Seconds-to-minutes settings for tests and the demo: a small backbone, small images, few epochs."""
        common = dict(seed=seed, device=device)
        return cls(
            image=_image_config(backbone=backbone, image_size=image_size, epochs=epochs, batch_size=4,
                                imagenet_weights=None, gcn_hidden=64, oaa_size=16, **common),
            refine=_refine_config(k=3, rounds=1, epochs=max(1, epochs // 2), batch_size=4, **common),
            cell=_cell_config(backbone=backbone, crop_size=32, epochs=epochs, batch_size=16,
                              imagenet_weights=None, **common),
        )

    @classmethod
    def small(cls, seed: int = 0, device: str = "auto") -> PipelineConfig:
        """CPU-sized settings for real use on a workstation: resnet18, 256 px, 5 epochs, K = 5."""
        cfg = cls.tiny(image_size=256, epochs=5, seed=seed, device=device)
        return dataclasses.replace(cfg, image=cfg.image.replace(batch_size=8),
                                   refine=cfg.refine.replace(k=5, epochs=5, batch_size=8),
                                   cell=cfg.cell.replace(crop_size=64))

    @classmethod
    def preset(cls, name: str, **kwargs: Any) -> PipelineConfig:
        """The settings of a named preset (:data:`PRESETS`): ``paper``, ``small`` or ``tiny``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return getattr(cls, name)(**kwargs)

    def starting_from(self, run: str | Path | None) -> PipelineConfig:
        """The same settings, with the image and cell backbones started from an earlier run.

        ``run`` is a finished pipeline run folder (the image model starts from its refined
        image model, the cell model from its cell model) or ``None`` (ImageNet / random init as
        configured). Both checkpoints are found and their backbones checked here, before
        anything trains; the path is stored absolute.

        Raises
        ------
        FileNotFoundError
            No such folder, or it lacks an image or a cell model.
        napari_cpgcn.training.engine.CheckpointError
            A checkpoint with another backbone, or not a napari-cpgcn checkpoint.
        """
        if run in (None, ""):
            return dataclasses.replace(self, image=self.image.replace(init_from=None),
                                       cell=self.cell.replace(init_from=None))
        from napari_cpgcn.training.checkpoint import check_init_checkpoint

        src = str(Path(run).expanduser().resolve())
        check_init_checkpoint(src, self.image.backbone, "image_model")
        check_init_checkpoint(src, self.cell.backbone, "cell_model")
        return dataclasses.replace(self, image=self.image.replace(init_from=src),
                                   cell=self.cell.replace(init_from=src))

    def with_device(self, device: str) -> PipelineConfig:
        """The same settings on another device (``auto``, ``cpu``, ``cuda``, ``mps``)."""
        return dataclasses.replace(
            self, image=self.image.replace(device=device), refine=self.refine.replace(device=device),
            cell=self.cell.replace(device=device),
            pretrain=self.pretrain.replace(device=device) if self.pretrain is not None else None)

    def validate(self) -> None:
        """Raise a ``ConfigError`` / ``ValueError`` naming the bad field."""
        self.image.validate()
        self.refine.validate()
        self.cell.validate()
        if self.cam_method not in ("model", "score", "gradcam"):
            raise ValueError(f"cam_method must be 'model', 'score' or 'gradcam', got {self.cam_method!r}")
        if tuple(self.cell.classes) != tuple(self.image.classes):
            raise ValueError("the cell model and the image model must use the same classes")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.pretrain is not None:
            self.pretrain.validate()
            if self.pretrain.backbone != self.image.backbone:
                raise ValueError(f"the pretrain stage trains a {self.pretrain.backbone} backbone but the image "
                                 f"model uses {self.image.backbone}; give both the same backbone")

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image.to_dict(),
            "refine": self.refine.to_dict(),
            "segmentation": self.segmentation,
            "segmentation_params": dict(self.segmentation_params),
            "masks_dir": self.masks_dir,
            "pseudo": self.pseudo.to_dict(),
            "cam_method": self.cam_method,
            "use_oaa": self.use_oaa,
            "cell": self.cell.to_dict(),
            "pretrain": self.pretrain.to_dict() if self.pretrain is not None else None,
            "fusion": self.fusion,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PipelineConfig:
        from napari_cpgcn.training.cell_trainer import CellModelConfig
        from napari_cpgcn.training.config import ImageModelConfig
        from napari_cpgcn.training.subcategory import RefineConfig

        base = cls()
        return cls(
            image=ImageModelConfig.from_dict(d["image"]) if "image" in d else base.image,
            refine=RefineConfig.from_dict(d["refine"]) if "refine" in d else base.refine,
            segmentation=d.get("segmentation", base.segmentation),
            segmentation_params=dict(d.get("segmentation_params", {})),
            masks_dir=d.get("masks_dir"),
            pseudo=PseudoLabelConfig(**d["pseudo"]) if "pseudo" in d else base.pseudo,
            cam_method=d.get("cam_method", base.cam_method),
            use_oaa=bool(d.get("use_oaa", True)),
            cell=CellModelConfig.from_dict(d["cell"]) if "cell" in d else base.cell,
            pretrain=_pretrain_config(d.get("pretrain")),
            fusion=d.get("fusion", base.fusion),
        )

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PipelineConfig:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from e

    def active_stages(self) -> tuple[str, ...]:
        """The stages this config trains, in order (the optional ``pretrain`` only when set)."""
        return tuple(s for s in STAGES if s not in OPTIONAL_STAGES or getattr(self, s) is not None)

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings that decide a stage's output (device and worker counts excluded)."""
        def strip(d: dict[str, Any]) -> dict[str, Any]:
            # init_from left out while unset: runs trained before the field existed keep their keys
            return {k: v for k, v in d.items() if k not in ("device", "num_workers", "amp", "cache_dir")
                    and not (k == "init_from" and v is None)}

        if stage == "image_model":
            return strip(self.image.to_dict())
        if stage == "refine":
            return strip(self.refine.to_dict())
        if stage == "segmentation":
            return {"method": self.segmentation, "params": self.segmentation_params, "masks_dir": self.masks_dir}
        if stage == "pseudolabels":
            return {"pseudo": self.pseudo.to_dict(), "cam_method": self.cam_method, "use_oaa": self.use_oaa}
        if stage == "cell_model":
            return strip(self.cell.to_dict())
        if stage == "pretrain":
            return self.pretrain.stage_settings() if self.pretrain is not None else {}
        if stage == "fusion":
            return {"fusion": self.fusion}
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
