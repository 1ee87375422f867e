"""Fine-tune a run's cell model on a biologist's corrections: ``napari-cpgcn finetune``.

The cell model of ``RUN`` is trained further (all of its weights, from where the run left
them) on

* the run's own pseudo-labelled training cells (their crops are the run's crop cache,
  ``RUN/cell_model/crops``, so the training images are not needed again), and
* the corrected cells of a prediction folder (``PRED_DIR/corrections.csv``: the last labels of
  each cell), cut from the images recorded in ``PRED_DIR/run.json`` and the masks in
  ``PRED_DIR/masks``; each corrected cell is repeated ``weight`` times per epoch (weighted up).

The result ``RUN2`` is a complete run: everything of ``RUN`` except the cell model is linked
(hard links where the file system allows, else copied), the new cell model is in
``RUN2/cell_model``, and ``RUN2/finetune.json`` records where it came from; ``load_predictor``
accepts it like any run. The image model is left as it is. No Qt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_cpgcn.events import Event, EventKind, ShouldStop, relay

__all__ = ["FinetuneOptions", "finetune", "run_finetune", "corrected_cells", "prediction_images_dir"]

log = logging.getLogger(__name__)

STAGE = "finetune"


@dataclass
class FinetuneOptions:
    """Settings of :func:`finetune`.

    Attributes
    ----------
    epochs : int
        Passes over the pseudo-labelled + corrected cells.
    weight : float
        How many times each corrected cell is seen per epoch (rounded; >= 1).
    lr : float or None
        Learning rate (None: a third of the run's cell-model rate: fine-tuning, not training).
    device : str
        ``auto``, ``cpu``, ``cuda``, ...
    seed : int
    batch_size : int or None
        None: the run's.
    """

    epochs: int = 3
    weight: float = 5.0
    lr: float | None = None
    device: str = "auto"
    seed: int = 0
    batch_size: int | None = None


def prediction_images_dir(pred_dir: str | Path, images_dir: str | Path | None = None) -> Path:
    """The image folder a prediction folder was made from (``run.json``), or ``images_dir``."""
    pred = Path(pred_dir)
    if images_dir is not None:
        p = Path(images_dir)
        if not p.is_dir():
            raise FileNotFoundError(f"image folder {p} does not exist")
        return p
    f = pred / "run.json"
    try:
        p = Path(json.loads(f.read_text(encoding="utf-8"))["settings"]["input_dir"])
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"{f} does not say which images {pred} was predicted from ({e}); "
                                "give them with --images DIR") from None
    if not p.is_dir():
        raise FileNotFoundError(f"the images of {pred} ({p}, from {f}) are gone; give them with --images DIR")
    return p


def corrected_cells(pred_dir: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Geometry rows (``image_id``, ``cell_id``, bbox, ...) and (n, 19) multi-hot targets of the
    corrected cells of a prediction folder (the current labels of each cell)."""
    from napari_cpgcn.io.celltable import cell_geometry
    from napari_cpgcn.io.masks import read_mask
    from napari_cpgcn.review.corrections import read_corrections

    current = {c.key: c for c in read_corrections(pred_dir)}
    if not current:
        raise ValueError(f"{Path(pred_dir) / 'corrections.csv'} holds no corrections; correct some cells "
                         "first (the Review widget, or write image_id,cell_id,labels rows)")
    rows, targets = [], []
    for iid in sorted({k[0] for k in current}):
        geo = cell_geometry(read_mask(Path(pred_dir) / "masks" / f"{iid}.tif"), iid)
        geo = geo.set_index("cell_id", drop=False)
        for (i, cid), c in sorted(current.items()):
            if i == iid:
                rows.append(geo.loc[cid])
                targets.append(c.multi_hot())
    return pd.DataFrame(rows).reset_index(drop=True), np.stack(targets).astype(np.float32)


class _Stacked:
    """Two crop arrays seen as one (rows of ``a`` then rows of ``b``), without copying them."""

    def __init__(self, a, b) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, j: int):
        return self.a[j] if j < len(self.a) else self.b[j - len(self.a)]


def _link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Hard-link (else copy) ``src`` into ``dst``, leaving out top-level names in ``skip`` and
    every cache folder."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    for item in src.iterdir():
        if item.name in skip:
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, copy_function=link,
                            ignore=shutil.ignore_patterns("cache", "crops"), dirs_exist_ok=True)
        else:
            link(str(item), str(dst / item.name))


def _pseudo_cells(run: Path, config) -> tuple[Any, np.ndarray]:
    """The run's crop cache and its targets (in the cache's row order)."""
    from napari_cpgcn.training.cell_trainer import cell_targets
    from napari_cpgcn.training.crops import CropCache
    from napari_cpgcn.training.pseudolabels import read_pseudolabels

    if config.mode != "pseudo":
        raise ValueError(f"{run}: its cell model was trained in {config.mode!r} mode; fine-tuning keeps the "
                         "run's pseudo-labels and needs a run trained on them (mode 'pseudo')")
    folder = run / "cell_model" / "crops"
    if not (folder / "crops.json").is_file():
        raise FileNotFoundError(f"{folder} (the run's cell crops) is missing; rerun `napari-cpgcn train` into "
                                f"{run} to rebuild it (finished stages are kept)")
    cache = CropCache(folder)
    table = read_pseudolabels(run / "pseudolabels.csv")
    if len(table) != len(cache) or not (table["cell_id"].to_numpy() == cache.index["cell_id"].to_numpy()).all():
        raise ValueError(f"{folder} does not match {run / 'pseudolabels.csv'}; rerun `napari-cpgcn train` into {run}")
    return cache, cell_targets(table, "pseudo", soft=config.soft_targets), table["image_id"].astype(str).to_numpy()


def finetune(run_dir: str | Path, pred_dir: str | Path, out_dir: str | Path, options: FinetuneOptions | None = None,
             should_stop: ShouldStop | None = None, *, images_dir: str | Path | None = None) -> Iterator[Event]:
    """Fine-tune the cell model of ``run_dir`` on the corrections of ``pred_dir`` into ``out_dir``.

    A generator of :class:`Event` (crop cutting, the engine's epochs) ending in ``DONE`` with
    ``path`` = ``out_dir`` (or ``STOPPED``; ``out_dir`` is then incomplete and should be removed).

    Raises
    ------
    FileNotFoundError
        A missing run, prediction folder, or images of the prediction.
    ValueError
        ``out_dir`` is ``run_dir`` or already holds a run, no corrections, a bad correction row
        (:class:`~napari_cpgcn.review.corrections.CorrectionError`, naming file and row).
    """
    import torch

    from napari_cpgcn.pipeline.predictor import resolve_model_path
    from napari_cpgcn.review.corrections import check_pred_dir
    from napari_cpgcn.training.cell_trainer import _DictDataset, _meta, split_by_image
    from napari_cpgcn.training.checkpoint import load_cell_model
    from napari_cpgcn.training.crops import CropDataset, build_crop_cache
    from napari_cpgcn.training.engine import fit

    opts = options or FinetuneOptions()
    if opts.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {opts.epochs}")
    run = resolve_model_path(run_dir)
    pred = check_pred_dir(pred_dir)
    out = Path(out_dir).expanduser()
    if out.resolve() == run.resolve():
        raise ValueError(f"--out {out} is the run being fine-tuned; give a new folder")
    if (out / "cell_model" / "best.pt").is_file() or (out / "finetune.json").is_file():
        raise ValueError(f"{out} already holds a run; give a new --out folder (or remove it)")
    images = prediction_images_dir(pred, images_dir)
    cells, targets = corrected_cells(pred)
    model, config, dev = load_cell_model(run, opts.device)
    cache, pseudo_y, pseudo_ids = _pseudo_cells(run, config)
    yield Event(EventKind.LOG, stage=STAGE, message=(
        f"fine-tuning {run / 'cell_model'} on {len(cells)} corrected cells of {pred} (x{opts.weight:g}) and "
        f"{len(pseudo_y)} pseudo-labelled cells, {opts.epochs} epochs"))

    out.mkdir(parents=True, exist_ok=True)
    _link_tree(run, out, skip={"cell_model", "finetune.json"})
    cm = out / "cell_model"
    stopped, ccache = yield from relay(build_crop_cache(
        images, pred / "masks", cells, cm / "corrections_crops", size=config.crop_size,
        zero_background=config.zero_background, pad=config.crop_pad, should_stop=should_stop, stage=STAGE))
    if stopped:
        return
    assert ccache is not None

    lr = float(opts.lr) if opts.lr else float(config.lr) / 3.0
    config = config.replace(epochs=int(opts.epochs), lr=lr, device=opts.device, seed=int(opts.seed),
                            init_from=None, batch_size=int(opts.batch_size or config.batch_size))
    crops = _Stacked(cache.crops, ccache.crops)
    y = np.concatenate([pseudo_y, targets]).astype(np.float32)
    train_rows, val_rows = split_by_image(pseudo_ids, config.val_fraction, config.seed)
    n_rep = max(1, int(round(opts.weight)))
    corrected_rows = np.arange(len(pseudo_y), len(y))
    train_rows = np.concatenate([train_rows, np.repeat(corrected_rows, n_rep)])
    config.save(cm / "cell_config.json")
    train_ds = _DictDataset(CropDataset(crops, y, train_rows, augment=config.augment, seed=config.seed))
    gen = torch.Generator()
    gen.manual_seed(config.seed)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, generator=gen,
                                               num_workers=0, drop_last=len(train_ds) > config.batch_size)
    val_loader = None
    if len(val_rows):
        val_loader = torch.utils.data.DataLoader(_DictDataset(CropDataset(crops, y, val_rows)),
                                                 batch_size=config.batch_size, shuffle=False, num_workers=0)

    def epoch_hook(epoch: int, metrics: dict[str, float]) -> None:
        train_ds.base.set_epoch(epoch + 1)

    train_ds.base.set_epoch(0)
    model.train()
    stopped, _ = yield from relay(fit(model, train_loader, val_loader, config, cm, should_stop, meta=_meta(config),
                                      epoch_hook=epoch_hook, resume=False, stage=STAGE, device=dev))
    if stopped:
        return
    # best.pt follows the validation loss of the pseudo-labelled cells, which the corrections are
    # meant to move away from; the fine-tuned model is the last epoch's.
    from napari_cpgcn.io.atomic import atomic_write, atomic_write_text

    atomic_write(cm / "best.pt", lambda tmp: shutil.copyfile(cm / "latest.pt", tmp))

    atomic_write_text(out / "finetune.json", json.dumps({
        "source_run": str(run), "pred_dir": str(pred), "images": str(images),
        "n_corrected_cells": int(len(cells)), "n_pseudo_cells": int(len(pseudo_y)),
        "weight": float(opts.weight), "epochs": int(opts.epochs), "lr": lr, "seed": int(opts.seed),
    }, indent=1))
    yield Event(EventKind.DONE, stage=STAGE, path=str(out), result=out,
                message=f"fine-tuned run written to {out}")


def run_finetune(run_dir, pred_dir, out_dir, options: FinetuneOptions | None = None, **kwargs) -> Path:
    """:func:`finetune` drained; returns ``out_dir``."""
    last = None
    for ev in finetune(run_dir, pred_dir, out_dir, options, **kwargs):
        last = ev
    if last is None or last.kind != EventKind.DONE:
        raise RuntimeError(f"fine-tuning stopped before the end ({last.message if last else 'no events'})")
    return Path(out_dir)
