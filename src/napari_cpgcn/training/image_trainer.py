"""Train the CP-GCN image-level model on a folder of HPA images + a labels CSV.

``train_image_model`` is the one call the CLI (``napari-cpgcn train-image``), the GUI and the
pipeline use. It writes into ``run_dir``:

``config.json``  the :class:`~napari_cpgcn.training.config.ImageModelConfig` (with the measured
                 channel mean/std), ``split.json`` (train/val image ids), ``latest.pt``,
                 ``best.pt``, ``history.csv`` and ``oaa/`` (accumulated class maps).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from napari_cpgcn.events import Event, EventKind, ShouldStop, relay
from napari_cpgcn.io.atomic import atomic_write_text, check_writable
from napari_cpgcn.io.hpa import image_index
from napari_cpgcn.io.tables import LabelTable, read_labels_csv
from napari_cpgcn.training import ddp
from napari_cpgcn.training.checkpoint import load_backbone_weights
from napari_cpgcn.training.config import ImageModelConfig
from napari_cpgcn.training.datasets import HPAImageDataset, channel_stats, check_images, split_ids
from napari_cpgcn.training.engine import fit, resolve_device, seed_everything
from napari_cpgcn.training.oaa import OAAStore

__all__ = ["train_image_model", "image_model_meta", "load_split", "init_class_bias", "SKIPPED_IMAGES",
           "unusable_images", "write_skipped_images", "read_skipped_images"]

log = logging.getLogger(__name__)


def image_model_meta(config: ImageModelConfig) -> dict:
    """What every image-model checkpoint records and what loading it checks."""
    return {
        "model": "cpgcn-image",
        "classes": list(config.classes),
        "backbone": config.backbone,
        "variant": config.variant,
        "image_size": int(config.image_size),
        "in_channels": 4,
        "channels": ["red", "green", "blue", "yellow"],
        "mean": [float(v) for v in config.mean] if config.mean is not None else None,
        "std": [float(v) for v in config.std] if config.std is not None else None,
    }


#: Written by :func:`train_image_model` in its run folder: the labelled images left out, and why.
SKIPPED_IMAGES = "skipped_images.csv"


def unusable_images(table: LabelTable, index, labels_csv: str | Path | LabelTable) -> dict[str, str]:
    """Labelled images that cannot be trained on without reading them: ``{image id: reason}``
    (not in the folder, a channel file missing, no label at all)."""
    out: dict[str, str] = {}
    for image_id, row in zip(table.ids, table.labels, strict=True):
        if image_id in index.incomplete:
            missing = [c for c in ("red", "green", "blue", "yellow") if c not in index.incomplete[image_id]]
            out[image_id] = f"missing the {', '.join(missing)} channel file (in {index.folder})"
        elif image_id not in index:
            out[image_id] = f"no such image in {index.folder}"
        elif not row.any():
            out[image_id] = (f"no label in {labels_csv if not isinstance(labels_csv, LabelTable) else 'the labels'} "
                             "(an empty Label; write 18 for Negative)")
    if len(out) == len(table) and all(v.startswith("no such image") for v in out.values()):
        raise FileNotFoundError(
            f"none of the {len(table.ids)} images of {labels_csv} is in {index.folder} (e.g. "
            f"{table.ids[0]}); point DATA_DIR to the folder holding ID_red.png ... files")
    return out


def write_skipped_images(path: str | Path, skipped: dict[str, str]) -> None:
    """``image_id,reason`` of the images a run left out (header only when none)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", "reason"])
    for image_id, reason in skipped.items():
        w.writerow([image_id, reason])
    atomic_write_text(path, buf.getvalue())


def read_skipped_images(path: str | Path) -> dict[str, str]:
    """The ``{image id: reason}`` of :func:`write_skipped_images` (empty when the file is absent)."""
    import csv

    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["image_id"]: r["reason"] for r in csv.DictReader(fh)}


def load_split(run_dir: str | Path) -> dict[str, list[str]] | None:
    """``{"train": [...], "val": [...]}`` of a run, or None."""
    p = Path(run_dir) / "split.json"
    return json.loads(p.read_text()) if p.is_file() else None


def init_class_bias(model, labels: np.ndarray, eps: float = 1e-3) -> None:
    """Start each class's bias at the logit of its training frequency (the prior).

    The usual focal-loss initialisation (Lin et al. 2017): rare classes start near their low
    prior instead of 0.5, so the first epochs are not spent pushing all 19 outputs down.
    """
    prior = np.clip(np.asarray(labels, dtype=np.float64).mean(axis=0), eps, 1 - eps)
    logit = torch.as_tensor(np.log(prior / (1 - prior)), dtype=torch.float32)
    bias = model.fc.bias if model.variant == "cnn" else model.class_bias
    with torch.no_grad():
        bias.copy_(logit.to(bias.device))


def _seed_worker(worker_id: int) -> None:  # numpy in workers follows torch's per-worker seed
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def train_image_model(
    data_dir: str | Path,
    labels_csv: str | Path | LabelTable,
    run_dir: str | Path,
    config: ImageModelConfig | None = None,
    should_stop: ShouldStop | None = None,
    *,
    resume: bool = True,
) -> Iterator[Event]:
    """Train the image model; a generator of progress events (stage ``"image_model"``).

    Parameters
    ----------
    data_dir
        Folder of the images (``ID_red.png`` ... or multi-channel TIFFs; ``images/`` accepted).
    labels_csv
        Kaggle ``ID,Label`` CSV (or a :class:`LabelTable`); rows whose images are absent raise.
    run_dir
        Output folder (``RUN/image_model`` in a pipeline run).
    config
        Settings; default :class:`ImageModelConfig` (the paper's).
    should_stop
        Polled after every batch; on True the job ends with a STOPPED event.
    resume
        Continue from ``run_dir/latest.pt`` when present.

    Yields
    ------
    Event
        From :func:`~napari_cpgcn.training.engine.fit`; the DONE event's ``result`` is a
        :class:`~napari_cpgcn.training.engine.FitResult`.
    """
    from napari_cpgcn.models import build_image_model

    stage = "image_model"
    config = config or ImageModelConfig()
    config.validate()
    run_dir = Path(run_dir)
    check_writable(run_dir)
    table = labels_csv if isinstance(labels_csv, LabelTable) else read_labels_csv(labels_csv)
    if len(table) == 0:
        raise ValueError(f"{labels_csv}: no labelled images")
    if table.labels.shape[1] != len(config.classes):
        raise ValueError(f"labels have {table.labels.shape[1]} classes, the config {len(config.classes)}")
    index = image_index(data_dir)
    cache_dir = None
    if config.cache:
        cache_dir = Path(config.cache_dir) if config.cache_dir else run_dir / "cache"
    # Every labelled image is read once before training (the resize cache fills on the way):
    # images that cannot be used are left out with their reason, never abort the run.
    skipped = unusable_images(table, index, labels_csv)
    usable = table.subset([i for i in table.ids if i not in skipped])
    check = HPAImageDataset(index.folder, usable, config.image_size, cache_dir=cache_dir, index=index)
    stopped, unreadable = yield from relay(check_images(check, workers=max(2, config.num_workers),
                                                        should_stop=should_stop), stage=stage)
    if stopped:
        return
    skipped.update(unreadable or {})
    write_skipped_images(run_dir / SKIPPED_IMAGES, skipped)
    if skipped:
        eg = next(iter(skipped.items()))
        msg = (f"{len(skipped)} of {len(table)} labelled images cannot be used and are left out (e.g. {eg[0]}: "
               f"{eg[1]}); the list with the reasons is in {run_dir / SKIPPED_IMAGES}")
        log.warning(msg)
        yield Event(EventKind.LOG, stage=stage, message=msg, path=str(run_dir / SKIPPED_IMAGES))
    if len(skipped) == len(table):
        raise ValueError(f"none of the {len(table)} labelled images of {labels_csv} can be used (e.g. "
                         f"{next(iter(skipped.items()))[1]}); see {run_dir / SKIPPED_IMAGES}")
    table = table.subset([i for i in table.ids if i not in skipped])

    # Stable split by image id; a resumed run keeps its recorded split.
    previous = load_split(run_dir) if resume else None
    train_ids, val_ids = split_ids(table.ids, config.val_fraction)
    if previous is not None and (previous["train"], previous["val"]) != (train_ids, val_ids):
        if set(previous["train"]) | set(previous["val"]) <= set(table.ids):
            train_ids, val_ids = previous["train"], previous["val"]
            log.info("using the train/validation split recorded in %s", run_dir / "split.json")
    atomic_write_text(run_dir / "split.json", json.dumps({"train": train_ids, "val": val_ids}, indent=1) + "\n")
    train_table, val_table = table.subset(train_ids), table.subset(val_ids)
    train_ds = HPAImageDataset(index.folder, train_table, config.image_size, augment=config.augment,
                               cache_dir=cache_dir, crop_scale=config.crop_scale, index=index)
    val_ds = HPAImageDataset(index.folder, val_table, config.image_size, augment=False,
                             cache_dir=cache_dir, index=index) if val_ids else None

    if config.mean is None or config.std is None:
        saved = run_dir / "config.json"
        prev_cfg = ImageModelConfig.load(saved) if (resume and saved.is_file()) else None
        if prev_cfg is not None and prev_cfg.mean is not None and prev_cfg.std is not None:
            mean, std = prev_cfg.mean, prev_cfg.std
        else:
            log.info("measuring channel statistics of the training images")
            yield Event(EventKind.LOG, stage=stage, message="measuring channel statistics of the training images")
            mean, std = channel_stats(train_ds)
        config = config.replace(mean=tuple(mean), std=tuple(std))
    config.save(run_dir / "config.json")

    device = resolve_device(config.device)
    seed_everything(config.seed)  # the same seed gives the same initial weights
    resuming = resume and (run_dir / "latest.pt").is_file()  # its weights replace any start
    with ddp.main_process_first():  # under torchrun rank 0 alone downloads missing weights
        model = build_image_model(config, label_matrix=train_table.labels,
                                  weights=None if config.init_from or resuming else "config")
    if config.init_from and resuming:
        msg = (f"resuming from {run_dir / 'latest.pt'}: init_from ({config.init_from}) only starts a fresh "
               "run (use --no-resume to start again from it)")
        log.warning(msg)
        yield Event(EventKind.LOG, stage=stage, message=msg)
    elif config.init_from:
        model.backbone.weights_source = str(load_backbone_weights(model.backbone, config.init_from, config.backbone))
    if model.backbone.weights_message:  # which start: ImageNet from a file / a download / offline
        yield Event(EventKind.LOG, stage=stage, message=model.backbone.weights_message)
    init_class_bias(model, train_table.labels)
    model.image_size = config.image_size
    msg = (f"{len(train_ids)} training / {len(val_ids)} validation images; {config.variant} on "
           f"{config.backbone} ({model.backbone.weights_source} init), {config.image_size}px, device {device}")
    log.info(msg)
    yield Event(EventKind.LOG, stage=stage, message=msg)

    gen = torch.Generator()
    gen.manual_seed(config.seed)
    train_loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, generator=gen,
                              num_workers=config.num_workers, worker_init_fn=_seed_worker,
                              pin_memory=device.type == "cuda", drop_last=len(train_ds) % config.batch_size == 1
                              and len(train_ds) > config.batch_size)
    val_loader = DataLoader(val_ds, batch_size=config.batch_size, shuffle=False,
                            num_workers=config.num_workers) if val_ds is not None else None

    batch_hook = None
    if config.oaa:
        from napari_cpgcn.models.cpgcn import normalize_cams

        store = OAAStore(run_dir / "oaa", len(config.classes), size=config.oaa_size, threshold=config.oaa_threshold)
        ids = train_ds.ids

        def batch_hook(output, batch, epoch):
            logits, cams = output
            store.update([ids[int(i)] for i in batch["index"]], normalize_cams(cams), torch.sigmoid(logits.float()),
                         batch["target"], batch["aug"])

    yield from fit(model, train_loader, val_loader, config, run_dir, should_stop,
                   meta=image_model_meta(config), batch_hook=batch_hook, resume=resume, stage=stage, device=device)
