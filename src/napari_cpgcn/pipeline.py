"""The whole single-cell pipeline: training (five resumable stages) and prediction.

Training — :func:`train_pipeline` runs, in a run folder ``RUN``::

    image_model   CP-GCN on image labels              RUN/image_model/{latest,best}.pt, oaa/
    refine        sub-category K-means refinement     RUN/refine/round{r}/, RUN/refine/best.pt, oaa/
    segmentation  cells of every training image      RUN/segmentation/{ID}.tif
    pseudolabels  per-cell labels from the CAMs        RUN/pseudolabels.csv
    cell_model    cell classifier on cell crops       RUN/cell_model/{latest,best}.pt

Each stage yields stage-tagged :class:`~napari_cpgcn.training.events.Event` objects; a finished
stage is recorded in ``RUN/stages.json`` with a key of its settings (and of the stages before
it), so a rerun skips it, and changing a stage's settings redoes that stage and the ones after
it. Inside a stage, the engine resumes from ``latest.pt`` and the segmentation skips finished
images, so a stop (``should_stop``) loses at most one epoch.

Prediction — :class:`Predictor` loads the image model (the refined one when present) and the
cell model once; :meth:`Predictor.predict` segments an image (or takes given cells), predicts
image-level probabilities and CAMs, classifies every cell crop and fuses
``C_final = C_image × C_cell`` (METHOD.md step 6), returning a :class:`CellPrediction` whose
``table`` has the shared per-cell columns (:mod:`napari_cpgcn.celltable`).
:meth:`Predictor.iter_predict` is the same as a generator that yields a message before each
stage, so a GUI can show progress and stop between stages.

No Qt; torch is imported when a stage or a predictor needs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_cpgcn.classes import N_CLASSES, SHORT_NAMES
from napari_cpgcn.io.hpa import HPAImage
from napari_cpgcn.io.tables import atomic_write_text
from napari_cpgcn.pseudolabels import PseudoLabelConfig
from napari_cpgcn.training.events import Event, EventKind, ShouldStop

__all__ = [
    "STAGES",
    "PipelineConfig",
    "train_pipeline",
    "finished_stages",
    "CellPrediction",
    "Predictor",
    "predict",
    "fuse",
]

log = logging.getLogger(__name__)

#: Pipeline stages in order.
STAGES: tuple[str, ...] = ("image_model", "refine", "segmentation", "pseudolabels", "cell_model")


# ============================================================================ configuration

def _image_config(**kw):
    from napari_cpgcn.training.config import ImageModelConfig

    return ImageModelConfig(**kw)


def _refine_config(**kw):
    from napari_cpgcn.training.subcategory import RefineConfig

    return RefineConfig(**kw)


def _cell_config(**kw):
    from napari_cpgcn.training.cell_trainer import CellModelConfig

    return CellModelConfig(**kw)


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
        :class:`~napari_cpgcn.pseudolabels.PseudoLabelConfig` (threshold, combination rule).
    cam_method
        Which maps make the pseudo-labels where no OAA map exists (``"model"``, ``"score"``,
        ``"gradcam"``).
    use_oaa
        Use the OAA-accumulated maps where they exist.
    cell
        :class:`~napari_cpgcn.training.cell_trainer.CellModelConfig` (ResNet50, 20 epochs,
        batch 32; ``mode="baseline"`` trains on image labels instead of pseudo-labels).
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
        from napari_cpgcn.training.engine import check_init_checkpoint

        src = str(Path(run).expanduser().resolve())
        check_init_checkpoint(src, self.image.backbone, "image_model")
        check_init_checkpoint(src, self.cell.backbone, "cell_model")
        return dataclasses.replace(self, image=self.image.replace(init_from=src),
                                   cell=self.cell.replace(init_from=src))

    def with_device(self, device: str) -> PipelineConfig:
        """The same settings on another device (``auto``, ``cpu``, ``cuda``, ``mps``)."""
        return dataclasses.replace(
            self, image=self.image.replace(device=device), refine=self.refine.replace(device=device),
            cell=self.cell.replace(device=device))

    def validate(self) -> None:
        """Raise a ``ConfigError`` / ``ValueError`` naming the bad field."""
        self.image.validate()
        self.refine.validate()
        self.cell.validate()
        if self.cam_method not in ("model", "score", "gradcam"):
            raise ValueError(f"cam_method must be 'model', 'score' or 'gradcam', got {self.cam_method!r}")
        if tuple(self.cell.classes) != tuple(self.image.classes):
            raise ValueError("the cell model and the image model must use the same classes")

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
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")


# ============================================================================ stage bookkeeping

def _stage_keys(config: PipelineConfig) -> dict[str, str]:
    keys: dict[str, str] = {}
    prev = ""
    for s in STAGES:
        blob = json.dumps(config.stage_settings(s), sort_keys=True, default=str)
        prev = hashlib.sha1((prev + s + blob).encode()).hexdigest()[:16]
        keys[s] = prev
    return keys


def _read_stages(run: Path) -> dict[str, Any]:
    p = run / "stages.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text()).get("finished", {})
    except (ValueError, OSError):
        log.warning("%s unreadable; every stage will be checked again", p)
        return {}


def finished_stages(run_dir: str | Path, config: PipelineConfig | None = None) -> list[str]:
    """Stages recorded as finished in ``RUN/stages.json`` (with ``config``: only those still valid for it)."""
    run = Path(run_dir)
    done = _read_stages(run)
    if config is None:
        return [s for s in STAGES if s in done]
    keys = _stage_keys(config)
    return [s for s in STAGES if done.get(s, {}).get("key") == keys[s]]


def _write_stages(run: Path, done: dict[str, Any], started: dict[str, str]) -> None:
    atomic_write_text(run / "stages.json", json.dumps({"finished": done, "started": started}, indent=2) + "\n")


def _read_started(run: Path) -> dict[str, str]:
    p = run / "stages.json"
    try:
        return dict(json.loads(p.read_text()).get("started", {})) if p.is_file() else {}
    except (ValueError, OSError):
        return {}


def _mark_finished(run: Path, stage: str, key: str, seconds: float) -> None:
    done = _read_stages(run)
    done[stage] = {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 2)}
    # Later stages were made from this stage's previous output: they are stale now.
    for s in STAGES[STAGES.index(stage) + 1:]:
        done.pop(s, None)
    _write_stages(run, done, _read_started(run))


#: What each stage writes (relative to RUN); caches that are keyed by content are kept on a redo.
_STAGE_OUTPUTS = {
    "image_model": ("image_model", ("cache",)),
    "refine": ("refine", ("cache",)),
    "segmentation": ("segmentation", ()),
    "pseudolabels": ("pseudolabels.csv", ()),
    "cell_model": ("cell_model", ("crops",)),
}


def _prepare_stage(run: Path, stage: str, key: str) -> None:
    """Before (re)starting a stage: if it was started with other settings, clear its old output
    (so the engine does not resume a run made with other settings); then record the new key."""
    import shutil

    started = _read_started(run)
    if started.get(stage) not in (None, key):
        target, keep = _STAGE_OUTPUTS[stage]
        path = run / target
        log.info("%s: settings changed since it was started; clearing %s", stage, path)
        if path.is_file():
            path.unlink()
        elif path.is_dir():
            for child in path.iterdir():
                if child.name in keep:
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    started[stage] = key
    _write_stages(run, _read_stages(run), started)


# ============================================================================ stages

def _image_checkpoint(run: Path) -> Path:
    for p in (run / "refine" / "best.pt", run / "image_model" / "best.pt", run / "image_model" / "latest.pt"):
        if p.is_file():
            return p
    raise FileNotFoundError(f"{run} holds no trained image model (image_model/best.pt); train the pipeline first")


def _cells_path(run: Path, image_id: str) -> Path:
    return run / "segmentation" / f"{image_id}.tif"


def _read_mask_file(folder: Path, image_id: str) -> np.ndarray | None:
    for name in (f"{image_id}.tif", f"{image_id}.tiff", f"{image_id}.png", f"{image_id}_cells.png",
                 f"{image_id}_predictedmask.png", f"{image_id}_cells.tif"):
        p = folder / name
        if p.is_file():
            if p.suffix == ".png":
                from PIL import Image

                return np.asarray(Image.open(p)).astype(np.uint32)
            import tifffile

            return tifffile.imread(p).astype(np.uint32)
    return None


def _write_mask(path: Path, cells: np.ndarray) -> None:
    import os
    import tempfile

    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tif.tmp")
    os.close(fd)
    try:
        tifffile.imwrite(tmp, np.asarray(cells, dtype=np.uint32), compression="zlib")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def segment(image: HPAImage | np.ndarray, method: str = "classical", **params: Any) -> np.ndarray:
    """Cells of one image with the segmentation package (``(Y, X)`` uint32)."""
    from napari_cpgcn.segmentation import segment_cells

    data = image.data if isinstance(image, HPAImage) else np.asarray(image)
    return np.asarray(segment_cells(data, method=method, **params), dtype=np.uint32)


def _stage_segmentation(data_dir, ids, run: Path, config: PipelineConfig, should_stop) -> Iterator[Event]:
    from napari_cpgcn.io.hpa import read_image

    stage = "segmentation"
    masks_dir = Path(config.masks_dir) if config.masks_dir else None
    for k, iid in enumerate(ids, start=1):
        if should_stop():
            yield Event(EventKind.STOPPED, stage=stage, message=f"stopped after {k - 1} of {len(ids)} images")
            return
        out = _cells_path(run, iid)
        if not out.is_file():
            cells = _read_mask_file(masks_dir, iid) if masks_dir else None
            if masks_dir and cells is None:
                raise FileNotFoundError(f"no mask for image {iid} in {masks_dir} (looked for {iid}.tif, "
                                        f"{iid}.png, {iid}_cells.png); add it or unset masks_dir")
            if cells is None:
                cells = segment(read_image(data_dir, image_id=iid), config.segmentation, **config.segmentation_params)
            _write_mask(out, cells)
        yield Event(EventKind.ITEM, stage=stage, batch=k, n_batches=len(ids), message=iid, path=str(out))


def _oaa_maps(run: Path, image_id: str, use_refine: bool) -> np.ndarray | None:
    from napari_cpgcn.training.oaa import load_oaa

    folder = run / "refine" if use_refine else run / "image_model"
    return load_oaa(folder, image_id)


def _stage_pseudolabels(data_dir, table, run: Path, config: PipelineConfig, should_stop) -> Iterator[Event]:
    import tifffile

    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.pseudolabels import image_pseudo_labels, summarise, write_pseudolabels
    from napari_cpgcn.training.inference import load_image_model, predict_images

    stage = "pseudolabels"
    ckpt = _image_checkpoint(run)
    model, icfg = load_image_model(ckpt, config.image.device)
    use_refine = ckpt.parent.name == "refine"
    yield Event(EventKind.LOG, stage=stage, message=f"CAMs from {ckpt.relative_to(run)}"
                + (" + OAA maps" if config.use_oaa else ""))
    parts = []
    labels = table.as_dict()
    for k, iid in enumerate(table.ids, start=1):
        if should_stop():
            yield Event(EventKind.STOPPED, stage=stage, message=f"stopped after {k - 1} of {len(table.ids)} images")
            return
        img = read_image(data_dir, image_id=iid)
        probs, cams = predict_images(model, [img.data], batch_size=1, cam_method=config.cam_method,
                                     cam_size=None)
        maps: dict[int, np.ndarray] = {c: cams[0][c] for c in range(cams[0].shape[0])}
        if config.use_oaa:
            oaa = _oaa_maps(run, iid, use_refine)
            if oaa is not None:
                for c in range(oaa.shape[0]):
                    if oaa[c].max() > 0:  # never-accumulated classes stay zero: keep the model's map
                        maps[c] = oaa[c]
        cells = tifffile.imread(_cells_path(run, iid))
        parts.append(image_pseudo_labels(iid, cells, labels[iid], probs[0], maps, config.pseudo))
        yield Event(EventKind.ITEM, stage=stage, batch=k, n_batches=len(table.ids), message=iid)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    write_pseudolabels(run / "pseudolabels.csv", out)
    s = summarise(out) if len(out) else {}
    yield Event(EventKind.LOG, stage=stage, metrics=s, path=str(run / "pseudolabels.csv"),
                message=f"{len(out)} cells pseudo-labelled; {s.get('labels_per_cell', 0):.2f} labels per cell, "
                        f"{100 * s.get('negative_fraction', 0):.0f}% Negative")


def _stage_cell_model(data_dir, table, run: Path, config: PipelineConfig, should_stop) -> Iterator[Event]:
    from napari_cpgcn.celltable import cell_geometry
    from napari_cpgcn.pseudolabels import read_pseudolabels
    from napari_cpgcn.training.cell_trainer import cell_targets, train_cell_model

    cfg = config.cell
    if cfg.mode == "pseudo":
        cells = read_pseudolabels(run / "pseudolabels.csv")
    else:
        import tifffile

        cells = pd.concat([cell_geometry(tifffile.imread(_cells_path(run, i)), i) for i in table.ids],
                          ignore_index=True)
    y = cell_targets(cells, cfg.mode, table.as_dict(), soft=cfg.soft_targets)
    yield from train_cell_model(data_dir, run / "segmentation", cells, y, run / "cell_model", cfg, should_stop)


def train_pipeline(
    data_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    config: PipelineConfig | None = None,
    should_stop: ShouldStop | None = None,
    *,
    stages: tuple[str, ...] | None = None,
) -> Iterator[Event]:
    """Train the whole pipeline; a generator of stage-tagged progress events.

    Parameters
    ----------
    data_dir
        Folder of the training images (Kaggle layout, ``images/`` accepted).
    labels_csv
        Image-level labels (``ID,Label``).
    out_dir
        The run folder (created); rerunning with the same folder resumes.
    config
        :class:`PipelineConfig`; default: the config saved in the run folder, else the paper's.
    should_stop
        Polled between batches / images; when it returns True the generator yields STOPPED
        and ends, keeping everything finished so far.
    stages
        Run only these stages (default: all, in order); earlier stages must be finished.

    Yields
    ------
    Event
        For each stage: STAGE_START, the stage's events (``stage`` set), STAGE_END (also for a
        skipped stage, ``message`` says so); finally DONE (``result`` = the run folder) or STOPPED.
    """
    from napari_cpgcn.io.tables import read_labels_csv

    should_stop = should_stop or (lambda: False)
    run = Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = PipelineConfig.load(run / "config.json") if (run / "config.json").is_file() else PipelineConfig()
    config.validate()
    for init in {config.image.init_from, config.cell.init_from} - {None}:
        src = Path(init).expanduser().resolve()
        if src == run.resolve() or run.resolve() in src.parents:
            raise ValueError(f"cannot start {run} from {init}: it lies inside the run folder, whose old "
                             "models training would replace; choose another output folder")
    config.save(run / "config.json")
    table = read_labels_csv(labels_csv)
    if len(table) == 0:
        raise ValueError(f"{labels_csv} lists no images")
    from napari_cpgcn.io.hpa import list_image_ids

    present = set(list_image_ids(data_dir))
    missing = [i for i in table.ids if i not in present]
    if len(missing) == len(table.ids):
        raise FileNotFoundError(f"none of the {len(table.ids)} images of {labels_csv} is in {data_dir} "
                                f"(e.g. {missing[0]}); point DATA_DIR to the folder holding the images")
    if missing:
        log.warning("%d labelled images are missing from %s and are skipped (e.g. %s)", len(missing), data_dir,
                    missing[0])
        table = table.subset([i for i in table.ids if i in present])

    from napari_cpgcn.training import ddp
    from napari_cpgcn.training.engine import resolve_device

    # Under torchrun (no-ops otherwise): start the process group now, so that the ranks can meet
    # between stages; training stages run data-parallel, rank 0 alone writes the stage records.
    ddp.init_distributed(resolve_device(config.image.device))
    main_process = ddp.is_main_process()
    keys = _stage_keys(config)
    done = _read_stages(run)
    wanted = stages or STAGES
    for s in wanted:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
    valid_so_far = True
    for i, stage in enumerate(STAGES):
        is_done = valid_so_far and done.get(stage, {}).get("key") == keys[stage]
        valid_so_far = is_done
        if stage not in wanted:
            continue
        if is_done:
            yield Event(EventKind.STAGE_START, stage=stage, message=f"{stage}: finished earlier")
            yield Event(EventKind.STAGE_END, stage=stage, message="skipped: finished earlier")
            continue
        yield Event(EventKind.STAGE_START, stage=stage, message=f"stage {i + 1}/{len(STAGES)}: {stage}")
        t0 = time.perf_counter()
        if main_process:
            _prepare_stage(run, stage, keys[stage])
        ddp.barrier()
        if stage == "image_model":
            from napari_cpgcn.training.image_trainer import train_image_model

            events = train_image_model(data_dir, table, run / "image_model", config.image, should_stop)
        elif stage == "refine":
            from napari_cpgcn.training.subcategory import train_subcategory

            cache = None
            if config.image.cache:
                cache = Path(config.image.cache_dir) if config.image.cache_dir else run / "image_model" / "cache"
            (run / "refine").mkdir(exist_ok=True)
            csv_path = run / "refine" / "labels.csv"
            from napari_cpgcn.io.tables import write_labels_csv

            write_labels_csv(csv_path, table)
            events = train_subcategory(data_dir, csv_path, run / "refine", run / "image_model" / "best.pt",
                                       config.refine, should_stop, cache_dir=cache)
        elif stage == "segmentation":  # under torchrun each rank segments its slice of the images
            events = _stage_segmentation(data_dir, ddp.shard_ids(table.ids), run, config, should_stop)
        elif stage == "pseudolabels":  # one table: rank 0 writes it, the other ranks wait below
            events = _stage_pseudolabels(data_dir, table, run, config, should_stop) if main_process else iter(())
        else:
            events = _stage_cell_model(data_dir, table, run, config, should_stop)
        for ev in events:
            if not ev.stage or ev.stage != stage:
                ev.stage = stage
            if ev.kind == EventKind.DONE:
                # A stage's own DONE becomes the pipeline's STAGE_END below.
                yield Event(EventKind.LOG, stage=stage, message=ev.message or f"{stage} done", result=ev.result)
                continue
            yield ev
            if ev.kind == EventKind.STOPPED:
                return
        ddp.barrier()
        if main_process:
            _mark_finished(run, stage, keys[stage], time.perf_counter() - t0)
        ddp.barrier()
        yield Event(EventKind.STAGE_END, stage=stage, message=f"{stage} finished in {time.perf_counter() - t0:.1f} s")
        done = _read_stages(run)
    yield Event(EventKind.DONE, stage="pipeline", message=f"pipeline trained in {run}", result=run)


# ============================================================================ prediction

def fuse(image_probs: np.ndarray, cell_probs: np.ndarray) -> np.ndarray:
    """C_final(cell, class) = C_image(class) × C_cell(cell, class): (19,) × (n, 19) → (n, 19)."""
    return np.asarray(cell_probs, dtype=np.float32) * np.asarray(image_probs, dtype=np.float32)[None, :]


@dataclass
class CellPrediction:
    """Everything predicted for one image.

    Attributes
    ----------
    image_id : str
    image_probs : numpy.ndarray
        (19,) image-level probabilities.
    cams : numpy.ndarray or None
        (19, Y, X) float32 class maps in [0, 1] at image size (None when not asked for).
    cells : numpy.ndarray
        (Y, X) uint32 cell label image.
    table : pandas.DataFrame
        One row per cell: geometry, ``top_class``, ``image_S``, ``cell_S``, ``fused_S``.
    """

    image_id: str
    image_probs: np.ndarray
    cams: np.ndarray | None
    cells: np.ndarray
    table: pd.DataFrame

    @property
    def cell_probs(self) -> np.ndarray:
        return self.table[[f"cell_{s}" for s in SHORT_NAMES]].to_numpy(np.float32)

    @property
    def fused_probs(self) -> np.ndarray:
        return self.table[[f"fused_{s}" for s in SHORT_NAMES]].to_numpy(np.float32)


def _prediction_table(image_id: str, cells: np.ndarray, image_probs: np.ndarray, cell_probs: np.ndarray,
                      geometry: pd.DataFrame | None = None) -> pd.DataFrame:
    from napari_cpgcn.celltable import cell_geometry

    geo = geometry if geometry is not None else cell_geometry(cells, image_id)
    fused = fuse(image_probs, cell_probs)
    n = len(geo)
    cols: dict[str, Any] = {}
    cols["top_class"] = [SHORT_NAMES[int(k)] for k in fused.argmax(1)] if n else []
    for prefix, arr in (("image_", np.repeat(np.asarray(image_probs, np.float32)[None], n, 0)),
                        ("cell_", np.asarray(cell_probs, np.float32).reshape(n, N_CLASSES)),
                        ("fused_", fused.reshape(n, N_CLASSES))):
        for k, s in enumerate(SHORT_NAMES):
            cols[f"{prefix}{s}"] = arr[:, k]
    return pd.concat([geo.reset_index(drop=True), pd.DataFrame(cols, index=range(n))], axis=1)


class Predictor:
    """A trained pipeline ready to predict: the image model and the cell model, loaded once.

    Use :meth:`from_run`; then :meth:`predict` per image. Thread-compatible (one predict at a
    time per predictor).
    """

    def __init__(self, image_model, image_config, cell_model, cell_config, device, *,
                 run_dir: str | Path | None = None, config: PipelineConfig | None = None) -> None:
        self.image_model = image_model
        self.image_config = image_config
        self.cell_model = cell_model
        self.cell_config = cell_config
        self.device = device
        self.run_dir = Path(run_dir) if run_dir else None
        self.config = config

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> Predictor:
        """Load a trained run folder (``RUN/refine/best.pt`` or ``RUN/image_model/best.pt`` + ``RUN/cell_model``).

        Raises
        ------
        FileNotFoundError
            When the folder holds no trained image or cell model (the message says which).
        """
        from napari_cpgcn.training.cell_trainer import load_cell_model
        from napari_cpgcn.training.inference import load_image_model

        run = Path(run_dir)
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {run} does not exist; train with `napari-cpgcn train` first")
        image_model, icfg = load_image_model(_image_checkpoint(run), device)
        cell_model, ccfg, dev = load_cell_model(run / "cell_model", device)
        config = PipelineConfig.load(run / "config.json") if (run / "config.json").is_file() else None
        if list(ccfg.classes) != list(icfg.classes):
            raise ValueError(f"{run}: the image and cell models were trained on different classes")
        return cls(image_model, icfg, cell_model, ccfg, dev, run_dir=run, config=config)

    @property
    def segmentation(self) -> str:
        return self.config.segmentation if self.config else "classical"

    def predict_image(self, data: np.ndarray, with_cams: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Image-level probabilities (19,) and CAMs (19, Y, X) at image size (or None)."""
        from napari_cpgcn.training.inference import predict_images

        method = self.config.cam_method if self.config else "model"
        probs, cams = predict_images(self.image_model, [data], batch_size=1, device=self.device,
                                     cam_method=method if with_cams else "model",
                                     cam_size="image" if with_cams else None)
        return probs[0], (np.asarray(cams[0], np.float32) if with_cams else None)

    def predict_cells(self, data: np.ndarray, cells: np.ndarray, geometry: pd.DataFrame,
                      batch_size: int = 64) -> np.ndarray:
        """Cell-model probabilities (n, 19) for the cells of ``geometry`` (crops cut batch by batch)."""
        from napari_cpgcn.models.cell import crop_cells
        from napari_cpgcn.training.cell_trainer import predict_crops

        c = self.cell_config
        out = []
        for i in range(0, len(geometry), batch_size):
            crops = crop_cells(data, cells, geometry.iloc[i:i + batch_size], size=c.crop_size,
                               zero_background=c.zero_background, pad=c.crop_pad)
            out.append(predict_crops(self.cell_model, crops, self.device, batch_size))
        return np.concatenate(out) if out else np.zeros((0, N_CLASSES), np.float32)

    def predict(
        self,
        image: HPAImage | np.ndarray,
        cells: np.ndarray | None = None,
        segmentation: str | None = "classical",
        with_cams: bool = True,
        *,
        image_id: str | None = None,
        segmentation_params: Mapping[str, Any] | None = None,
    ) -> CellPrediction:
        """Predict one image.

        Parameters
        ----------
        image
            An :class:`HPAImage` or a (4, Y, X) array (red, green, blue, yellow).
        cells
            A (Y, X) cell label image to use instead of segmenting.
        segmentation
            Method for :func:`napari_cpgcn.segmentation.segment_cells` when ``cells`` is None
            (None: the method the run was trained with).
        with_cams
            Also return the (19, Y, X) class maps.
        image_id
            Id written into the table (default: the HPAImage's id, else ``"image"``).
        segmentation_params
            Extra keyword arguments of the segmentation.
        """
        steps = self.iter_predict(image, cells, segmentation, with_cams, image_id=image_id,
                                  segmentation_params=segmentation_params)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def iter_predict(
        self,
        image: HPAImage | np.ndarray,
        cells: np.ndarray | None = None,
        segmentation: str | None = "classical",
        with_cams: bool = True,
        *,
        image_id: str | None = None,
        segmentation_params: Mapping[str, Any] | None = None,
    ) -> Generator[str, None, CellPrediction]:
        """:meth:`predict` as a generator that can be stopped between stages.

        Yields a short message (``"segmenting cells (classical)"``, ``"image model + CAMs"``,
        ``"cell model (n cells)"``, ``"per-cell table"``) just before each stage starts and
        returns the :class:`CellPrediction` (``StopIteration.value``; ``yield from`` gives it).
        Stopping the iteration (not calling ``next`` again, ``close()``, or a napari
        ``GeneratorWorker.quit()``) ends the prediction at the next stage boundary: the running
        stage finishes, nothing after it runs, and nothing is written anywhere. The arguments
        are those of :meth:`predict`; a wrong image shape raises before the first message.
        """
        if isinstance(image, HPAImage):
            data, iid = image.data, image_id or image.image_id
        else:
            data, iid = np.asarray(image), image_id or "image"
        if data.ndim != 3 or data.shape[0] != 4:
            raise ValueError(f"expected a (4, Y, X) image (red, green, blue, yellow), got shape {data.shape}")
        if cells is None:
            method = segmentation or self.segmentation
            params = dict(segmentation_params or (self.config.segmentation_params if self.config
                                                  and method == self.config.segmentation else {}))
            yield f"segmenting cells ({method})"
            cells = segment(data, method, **params)
        cells = np.asarray(cells)
        if cells.shape != data.shape[1:]:
            raise ValueError(f"cell mask shape {cells.shape} does not match the image {data.shape[1:]}")
        cells = cells.astype(np.uint32, copy=False)
        from napari_cpgcn.celltable import cell_geometry

        yield "image model + CAMs" if with_cams else "image model"
        image_probs, cams = self.predict_image(data, with_cams)
        geo = cell_geometry(cells, iid)
        yield f"cell model ({len(geo)} cells)"
        cell_probs = self.predict_cells(data, cells, geo)
        yield "per-cell table"
        table = _prediction_table(iid, cells, image_probs, cell_probs, geo)
        return CellPrediction(iid, image_probs.astype(np.float32), cams, cells, table)


def predict(image: HPAImage | np.ndarray, run_dir: str | Path, device: str = "auto", **kwargs: Any) -> CellPrediction:
    """One-shot prediction (loads the run each call; keep a :class:`Predictor` for many images)."""
    return Predictor.from_run(run_dir, device=device).predict(image, **kwargs)
