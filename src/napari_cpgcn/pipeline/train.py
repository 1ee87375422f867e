"""Training the whole pipeline: five resumable stages in a run folder ``RUN``::

    image_model   CP-GCN on image labels              RUN/image_model/{latest,best}.pt, oaa/
    refine        sub-category K-means refinement     RUN/refine/round{r}/, RUN/refine/best.pt, oaa/
    segmentation  cells of every training image      RUN/segmentation/{ID}.tif
    pseudolabels  per-cell labels from the CAMs        RUN/pseudolabels.csv
    cell_model    cell classifier on cell crops       RUN/cell_model/{latest,best}.pt

Each stage yields stage-tagged :class:`~napari_cpgcn.events.Event` objects; a finished stage is
recorded in ``RUN/stages.json`` with a key of its settings (and of the stages before it), so a
rerun skips it, and changing a stage's settings redoes that stage and the ones after it. Inside a
stage, the engine resumes from ``latest.pt`` and the segmentation skips finished images, so a stop
(``should_stop``) loses at most one epoch.

No Qt; torch is imported when a stage needs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_cpgcn.events import Event, EventKind, ShouldStop
from napari_cpgcn.io.atomic import atomic_write_text, check_writable
from napari_cpgcn.io.hpa import HPAImage
from napari_cpgcn.io.masks import MASK_NAMES, find_mask, read_mask, write_mask
from napari_cpgcn.pipeline.config import STAGES, PipelineConfig

__all__ = [
    "finished_stages",
    "segment",
    "train_pipeline",
]

log = logging.getLogger(__name__)

def _stage_keys(config: PipelineConfig) -> dict[str, str]:
    """Each active stage's key: its settings chained with the keys of the stages before it
    (an inactive optional stage is left out, so runs made before it existed keep their keys)."""
    keys: dict[str, str] = {}
    prev = ""
    for s in config.active_stages():
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


class RunSettingsChanged(ValueError):
    """A run folder whose finished stages were made with other settings than the ones asked for:
    training would replace their outputs. The message lists the settings that differ."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def changed_settings(run_dir: str | Path, config: PipelineConfig) -> dict[str, list[str]]:
    """The finished stages of ``run_dir`` that ``config`` would redo, with what differs.

    Returns ``{stage: ["epochs: 50 -> 2", ...]}`` (a stage redone only because an earlier one
    changed says so); empty when the run is new or every finished stage is still valid.
    """
    run = Path(run_dir)
    done = _read_stages(run)
    if not done or not (run / "config.json").is_file():
        return {}
    try:
        old = PipelineConfig.load(run / "config.json")
    except (ValueError, KeyError, TypeError):
        return {s: ["config.json unreadable"] for s in done}
    keys = _stage_keys(config)
    out: dict[str, list[str]] = {}
    for stage in STAGES:
        if stage not in done or done[stage].get("key") == keys.get(stage):
            continue
        a, b = _flat(old.stage_settings(stage)), _flat(config.stage_settings(stage))
        diffs = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k)]
        out[stage] = diffs or ["an earlier stage changed"]
    return out


def check_settings(run_dir: str | Path, config: PipelineConfig) -> None:
    """Refuse to train ``config`` into a run whose finished stages it would redo.

    Raises
    ------
    RunSettingsChanged
        Listing, per stage, the settings that differ and the ways out.
    """
    changed = changed_settings(run_dir, config)
    if changed:
        lines = "; ".join(f"{st}: {', '.join(d[:4])}{' ...' if len(d) > 4 else ''}" for st, d in changed.items())
        raise RunSettingsChanged(
            f"{run_dir} holds a trained run whose finished stages were made with other settings ({lines}). "
            "Training would replace them. Rerun with the run's own settings to resume it, redo these stages "
            "on purpose (--overwrite), or choose another output folder.")


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
    "pretrain": ("pretrain", ("cache", "cells")),
    "image_model": ("image_model", ("cache",)),
    "refine": ("refine", ("cache",)),
    "segmentation": ("segmentation", ()),
    "pseudolabels": ("pseudolabels.csv", ()),
    "cell_model": ("cell_model", ("crops",)),
    "fusion": ("fusion.json", ()),
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


def _image_checkpoint(run: Path) -> Path:
    for p in (run / "refine" / "best.pt", run / "image_model" / "best.pt", run / "image_model" / "latest.pt"):
        if p.is_file():
            return p
    raise FileNotFoundError(f"{run} holds no trained image model (image_model/best.pt); train the pipeline first")


def _usable(table, run: Path):
    """The labelled images the image model was trained on: the stages after it leave out the
    images that its check found unusable (``RUN/image_model/skipped_images.csv``)."""
    from napari_cpgcn.training.image_trainer import SKIPPED_IMAGES, read_skipped_images

    skipped = read_skipped_images(run / "image_model" / SKIPPED_IMAGES)
    return table.subset([i for i in table.ids if i not in skipped]) if skipped else table


def _cells_path(run: Path, image_id: str) -> Path:
    return run / "segmentation" / f"{image_id}.tif"


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
            if masks_dir:
                found = find_mask(masks_dir, iid)
                if found is None:
                    raise FileNotFoundError(
                        f"no mask for image {iid} in {masks_dir} (looked for "
                        f"{', '.join(n.format(iid) for n in MASK_NAMES)}); add it or unset masks_dir")
                cells = read_mask(found)
            else:
                try:
                    cells = segment(read_image(data_dir, image_id=iid), config.segmentation,
                                    **config.segmentation_params)
                except (OSError, ValueError, MemoryError) as e:  # one image: left out, the run goes on
                    msg = f"{iid} left out: it cannot be segmented ({type(e).__name__}: {e})"
                    log.warning(msg)
                    yield Event(EventKind.LOG, stage=stage, batch=k, n_batches=len(ids), message=msg)
                    continue
            write_mask(out, cells)
        yield Event(EventKind.ITEM, stage=stage, batch=k, n_batches=len(ids), message=iid, path=str(out))


def _oaa_maps(run: Path, image_id: str, use_refine: bool) -> np.ndarray | None:
    from napari_cpgcn.training.oaa import load_oaa

    folder = run / "refine" if use_refine else run / "image_model"
    return load_oaa(folder, image_id)


def _stage_pseudolabels(data_dir, table, run: Path, config: PipelineConfig, should_stop) -> Iterator[Event]:
    from napari_cpgcn.pipeline.inference import predict_images
    from napari_cpgcn.training.checkpoint import load_image_model
    from napari_cpgcn.training.datasets import HPAImageDataset
    from napari_cpgcn.training.pseudolabels import (
        image_pseudo_labels,
        summarise,
        write_pseudolabels,
    )

    stage = "pseudolabels"
    ckpt = _image_checkpoint(run)
    model, icfg = load_image_model(ckpt, config.image.device)
    use_refine = ckpt.parent.name == "refine"
    yield Event(EventKind.LOG, stage=stage, message=f"CAMs from {ckpt.relative_to(run)}"
                + (" + OAA maps" if config.use_oaa else ""))
    segmented = [i for i in table.ids if _cells_path(run, i).is_file()]
    if len(segmented) < len(table.ids):
        yield Event(EventKind.LOG, stage=stage, message=f"{len(table.ids) - len(segmented)} images without cells "
                    "(not segmented) are left out")
    table = table.subset(segmented)
    # The CAM pass needs the image at the model's input size only: the image model's resize
    # cache has it (no full-resolution decode here when the cache is on).
    images = HPAImageDataset(data_dir, table, icfg.image_size, cache_dir=_image_cache_dir(run, config))
    parts = []
    labels = table.as_dict()
    for k, iid in enumerate(table.ids, start=1):
        if should_stop():
            yield Event(EventKind.STOPPED, stage=stage, message=f"stopped after {k - 1} of {len(table.ids)} images")
            return
        probs, cams = predict_images(model, [images.load(k - 1)], batch_size=1, cam_method=config.cam_method,
                                     cam_size=None)
        maps: dict[int, np.ndarray] = {c: cams[0][c] for c in range(cams[0].shape[0])}
        if config.use_oaa:
            oaa = _oaa_maps(run, iid, use_refine)
            if oaa is not None:
                for c in range(oaa.shape[0]):
                    if oaa[c].max() > 0:  # never-accumulated classes stay zero: keep the model's map
                        maps[c] = oaa[c]
        cells = read_mask(_cells_path(run, iid))
        parts.append(image_pseudo_labels(iid, cells, labels[iid], probs[0], maps, config.pseudo))
        yield Event(EventKind.ITEM, stage=stage, batch=k, n_batches=len(table.ids), message=iid)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    write_pseudolabels(run / "pseudolabels.csv", out)
    s = summarise(out) if len(out) else {}
    yield Event(EventKind.LOG, stage=stage, metrics=s, path=str(run / "pseudolabels.csv"),
                message=f"{len(out)} cells pseudo-labelled; {s.get('labels_per_cell', 0):.2f} labels per cell, "
                        f"{100 * s.get('negative_fraction', 0):.0f}% Negative")


def _with_pretrain_start(config: PipelineConfig, run: Path) -> PipelineConfig:
    """With a ``pretrain`` stage, the image model (and the cell model, when its backbone is the
    same) start from its output ``RUN/pretrain``; another start at the same time is refused."""
    if config.pretrain is None:
        return config
    src = str((run / "pretrain").resolve())
    for name, cfg in (("image", config.image), ("cell", config.cell)):
        if cfg.init_from not in (None, src):
            raise ValueError(f"the {name} model starts from {cfg.init_from} and from the pretrain stage: "
                             "choose one (leave out --init-from, or --pretrain)")
    image = config.image.replace(init_from=src)
    cell = config.cell
    if cell.backbone == config.pretrain.backbone:
        cell = cell.replace(init_from=src)
    else:
        log.info("the cell model's backbone (%s) is not the pretrained one (%s): it starts as configured",
                 cell.backbone, config.pretrain.backbone)
    return dataclasses.replace(config, image=image, cell=cell)


def _stage_fusion(data_dir, run: Path, config: PipelineConfig) -> Iterator[Event]:
    """``RUN/fusion.json``: the fusion the predictor applies (chosen or fitted on the image
    model's validation images, whose cells neither model trained on, for the learned options)."""
    from napari_cpgcn.pipeline.fusion import (
        FusionParams,
        fit_fusion,
        select_fusion,
        validation_cells,
    )

    stage = "fusion"
    method = config.fusion
    if method in ("product", "image", "cell"):
        params = FusionParams(method)
    else:
        from napari_cpgcn.pipeline.predictor import CPGCNPredictor

        predictor = CPGCNPredictor.from_run(run, device=config.cell.device)
        image_p, cell_p, targets, groups = validation_cells(predictor, run, data_dir)
        if len(set(groups)) < 2:
            msg = (f"fusion {method}: {len(set(groups))} validation image(s) with cells, too few to choose "
                   "or fit on; using the product")
            log.warning(msg)
            yield Event(EventKind.LOG, stage=stage, message=msg)
            params = FusionParams("product", info={"asked": method, "reason": "too few validation images"})
        elif method == "auto":
            params = select_fusion(image_p, cell_p, targets, groups)
        else:
            params = fit_fusion(image_p, cell_p, targets, method)
    params.save(run / "fusion.json")
    yield Event(EventKind.LOG, stage=stage, path=str(run / "fusion.json"),
                message=f"fusion: {params.method}" + (f" (asked: {method})" if method != params.method else ""))


def _image_cache_dir(run: Path, config: PipelineConfig) -> Path | None:
    """The image model's resize cache (shared by the refinement and the pseudo-label CAM pass)."""
    if not config.image.cache:
        return None
    return Path(config.image.cache_dir) if config.image.cache_dir else run / "image_model" / "cache"


def _stage_cell_model(data_dir, table, run: Path, config: PipelineConfig, should_stop) -> Iterator[Event]:
    from napari_cpgcn.io.celltable import cell_geometry
    from napari_cpgcn.training.cell_trainer import cell_targets, train_cell_model
    from napari_cpgcn.training.pseudolabels import read_pseudolabels

    cfg = config.cell
    if cfg.mode == "pseudo":
        cells = read_pseudolabels(run / "pseudolabels.csv")
    else:
        cells = pd.concat([cell_geometry(read_mask(_cells_path(run, i)), i) for i in table.ids
                           if _cells_path(run, i).is_file()], ignore_index=True)
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
    overwrite: bool = False,
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
    overwrite
        Redo finished stages whose settings differ from ``config`` (their outputs are
        replaced). Without it such a run is refused with :class:`RunSettingsChanged`, before
        anything is written.

    Yields
    ------
    Event
        For each stage: STAGE_START, the stage's events (``stage`` set), STAGE_END (also for a
        skipped stage, ``message`` says so); finally DONE (``result`` = the run folder) or STOPPED.
    """
    from napari_cpgcn.io.tables import read_labels_csv

    should_stop = should_stop or (lambda: False)
    run = Path(out_dir)
    check_writable(run)
    if config is None:
        config = PipelineConfig.load(run / "config.json") if (run / "config.json").is_file() else PipelineConfig()
    config.validate()
    config = _with_pretrain_start(config, run)
    own_pretrain = (run / "pretrain").resolve()
    for init in {config.image.init_from, config.cell.init_from} - {None}:
        src = Path(init).expanduser().resolve()
        if src == own_pretrain:  # the pretrain stage's output: later stages never replace it
            continue
        if src == run.resolve() or run.resolve() in src.parents:
            raise ValueError(f"cannot start {run} from {init}: it lies inside the run folder, whose old "
                             "models training would replace; choose another output folder")
    if not overwrite:
        check_settings(run, config)
    config.save(run / "config.json")
    table = read_labels_csv(labels_csv)
    if len(table) == 0:
        raise ValueError(f"{labels_csv} lists no images")
    from napari_cpgcn.io.hpa import image_index
    from napari_cpgcn.training.image_trainer import unusable_images

    unusable_images(table, image_index(data_dir), labels_csv)  # none of them there: fail now, not in stage 1

    from napari_cpgcn.training import ddp
    from napari_cpgcn.training.engine import resolve_device

    # Under torchrun (no-ops otherwise): start the process group now, so that the ranks can meet
    # between stages; training stages run data-parallel, rank 0 alone writes the stage records.
    ddp.init_distributed(resolve_device(config.image.device))
    main_process = ddp.is_main_process()
    keys = _stage_keys(config)
    done = _read_stages(run)
    active = config.active_stages()
    wanted = stages or active
    for s in wanted:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
    valid_so_far = True
    for i, stage in enumerate(active):
        is_done = valid_so_far and done.get(stage, {}).get("key") == keys[stage]
        valid_so_far = is_done
        if stage not in wanted:
            continue
        if is_done:
            yield Event(EventKind.STAGE_START, stage=stage, message=f"{stage}: finished earlier")
            yield Event(EventKind.STAGE_END, stage=stage, message="skipped: finished earlier")
            continue
        if stage not in ("pretrain", "image_model"):
            table = _usable(table, run)
        yield Event(EventKind.STAGE_START, stage=stage, message=f"stage {i + 1}/{len(active)}: {stage}")
        t0 = time.perf_counter()
        if main_process:
            _prepare_stage(run, stage, keys[stage])
        ddp.barrier()
        if stage == "pretrain":  # the labelled images only: never images held out of training
            from napari_cpgcn.training.pretrain import pretrain_backbone

            events = pretrain_backbone(data_dir, run / "pretrain", config.pretrain, should_stop,
                                       image_ids=list(table.ids))
        elif stage == "image_model":
            from napari_cpgcn.training.image_trainer import train_image_model

            events = train_image_model(data_dir, table, run / "image_model", config.image, should_stop)
        elif stage == "refine":
            from napari_cpgcn.training.subcategory import train_subcategory

            cache = _image_cache_dir(run, config)
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
        elif stage == "cell_model":
            events = _stage_cell_model(data_dir, table, run, config, should_stop)
        else:  # fusion: one small file, rank 0 writes it
            events = _stage_fusion(data_dir, run, config) if main_process else iter(())
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
