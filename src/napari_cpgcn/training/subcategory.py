"""CAM refinement by sub-category exploration (Chang et al., CVPR 2020; METHOD.md step 2).

Starting from the trained image model, each *round*:

1. extracts a deep feature per training image (global average pool of the backbone's feature
   map, no augmentation) with the current model;
2. for each parent class c, clusters the features of the images labelled c into K sub-classes
   with K-means (scikit-learn; K = 1 means no clustering); an image gets one sub-class per
   positive parent class, so sub-class targets are multi-hot over C·K outputs;
3. trains backbone + parent head (the CP-GCN head: CPM + label GCN) + a new sub-class head
   (global pool → linear, C·K outputs) jointly: focal loss on the parent labels plus
   ``sub_loss_weight`` × focal loss on the sub-class pseudo-labels.

The sub-class task forces the backbone to separate the visual modes inside a class, so the
parent CAMs spread over more of the object than the single most discriminative part. CAMs
always come from the parent head. OAA keeps accumulating the parent maps during refinement
(``RUN/refine/oaa``).

Everything goes through :func:`napari_cpgcn.training.engine.fit`: each round is a resumable
engine run in ``RUN/refine/round{r}`` (its clusters saved beside it, so a resumed round
trains on the same sub-classes); a finished round is never redone. The final refined image
model is ``RUN/refine/best.pt``, in the image model's checkpoint format (the sub-class head is
dropped), so everything that loads an image model loads it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_cpgcn.events import Event, EventKind, ShouldStop
from napari_cpgcn.training.config import ConfigError, TrainConfig

__all__ = ["RefineConfig", "cluster_subcategories", "train_subcategory", "SubcategoryModel"]

log = logging.getLogger(__name__)


@dataclass
class RefineConfig(TrainConfig):
    """Sub-category refinement (defaults = the paper: K = 10, 3 rounds of 20 epochs, batch 8, lr 1e-3).

    Attributes
    ----------
    k
        Sub-classes per parent class (1 = no clustering).
    rounds
        Cluster-and-train rounds (0 = no refinement).
    epochs
        Training epochs per round.
    sub_loss_weight
        Weight of the sub-class loss against the parent loss.
    kmeans_init
        ``n_init`` of scikit-learn's K-means.
    oaa
        Keep accumulating the parent CAMs (OAA) during refinement.
    """

    epochs: int = 20
    batch_size: int = 8
    k: int = 10
    rounds: int = 3
    sub_loss_weight: float = 1.0
    kmeans_init: int = 4
    oaa: bool = True

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise ConfigError(f"k (sub-classes per class) must be >= 1, got {self.k}")
        if self.rounds < 0:
            raise ConfigError(f"rounds must be >= 0, got {self.rounds}")
        if self.sub_loss_weight < 0:
            raise ConfigError(f"sub_loss_weight must be >= 0, got {self.sub_loss_weight}")


def cluster_subcategories(features: np.ndarray, labels: np.ndarray, k: int, seed: int = 0,
                          n_init: int = 4) -> np.ndarray:
    """Sub-class of every (image, positive class): (n, C) int, -1 where the class is absent.

    Parameters
    ----------
    features
        (n, D) image features.
    labels
        (n, C) multi-hot parent labels.
    k
        Clusters per class (fewer when the class has fewer distinct images).
    """
    from sklearn.cluster import KMeans

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    out = np.full(labels.shape, -1, dtype=np.int64)
    # L2-normalised features: K-means then groups by direction, which is what a linear head sees.
    norm = np.linalg.norm(features, axis=1, keepdims=True)
    f = features / np.maximum(norm, 1e-12)
    for c in range(labels.shape[1]):
        rows = np.flatnonzero(labels[:, c])
        if len(rows) == 0:
            continue
        n_distinct = len(np.unique(np.round(f[rows], 6), axis=0))
        kc = int(min(k, len(rows), n_distinct))
        if kc <= 1:
            out[rows, c] = 0
            continue
        km = KMeans(n_clusters=kc, n_init=n_init, random_state=seed + c)
        out[rows, c] = km.fit_predict(f[rows])
    return out


def _sub_targets(assign: np.ndarray, k: int) -> np.ndarray:
    n, c = assign.shape
    t = np.zeros((n, c * k), np.float32)
    rows, cols = np.nonzero(assign >= 0)
    t[rows, cols * k + assign[rows, cols]] = 1.0
    return t


def _import_torch():
    import torch
    import torch.nn.functional as F
    from torch import nn

    return torch, F, nn


def SubcategoryModel(base, n_sub: int):  # noqa: N802 - a factory that keeps torch out of import time
    """Wrap an image model with a sub-class head: ``forward(x) -> (logits, cams, sub_logits)``."""
    torch, F, nn = _import_torch()

    class _SubcategoryModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base
            self.sub_head = nn.Linear(base.backbone.out_channels, n_sub)

        def forward(self, x):
            feats = self.base.forward_features(x)
            logits, cams = self.base.forward_head(feats)
            sub = self.sub_head(F.adaptive_avg_pool2d(feats, 1).flatten(1))
            return logits, cams, sub

        def param_groups(self, lr: float) -> list[dict]:
            """The base model's Adam groups (e.g. the slower label GCN), the sub-class head at ``lr``.

            Without this the engine would train the GCN at the full rate during refinement,
            unlike the image model it starts from.
            """
            if callable(getattr(self.base, "param_groups", None)):
                groups = self.base.param_groups(lr)
            else:
                groups = [{"params": [p for p in self.base.parameters() if p.requires_grad], "lr": lr}]
            groups[0]["params"] = list(groups[0]["params"]) + list(self.sub_head.parameters())
            return groups

    return _SubcategoryModel()


def _features(model, dataset, device, batch_size: int, should_stop) -> np.ndarray | None:
    torch, F, _ = _import_torch()
    model.eval()
    out = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for batch in loader:
            f = model.forward_features(batch["image"].to(device))
            out.append(F.adaptive_avg_pool2d(f, 1).flatten(1).float().cpu().numpy())
            if should_stop is not None and should_stop():
                return None
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def train_subcategory(
    data_dir: str | Path,
    labels_csv: str | Path,
    run_dir: str | Path,
    image_checkpoint: str | Path,
    config: RefineConfig | None = None,
    should_stop: ShouldStop | None = None,
    *,
    stage: str = "refine",
    cache_dir: str | Path | None = None,
) -> Iterator[Event]:
    """Refine the image model's CAMs by sub-category exploration; a generator of events.

    Parameters
    ----------
    data_dir, labels_csv
        The training images and their image-level labels (the image model's training data).
    run_dir
        Output folder (``RUN/refine``): ``round{r}/`` engine runs, ``oaa/``, ``best.pt``.
    image_checkpoint
        The image model to start from (``RUN/image_model/best.pt``).
    config
        :class:`RefineConfig`.
    should_stop
        Polled between batches; finished rounds and epochs are kept.
    cache_dir
        Resized-image cache shared with the image trainer (None: ``run_dir/cache``).

    Yields
    ------
    Event
        LOG events for clustering, the engine's events per round, then DONE (``result`` = path
        of the refined ``best.pt``) or STOPPED.
    """
    torch, F, nn = _import_torch()
    from napari_cpgcn.io.tables import read_labels_csv
    from napari_cpgcn.models.cpgcn import normalize_cams
    from napari_cpgcn.training.checkpoint import (
        load_checkpoint,
        load_image_model,
        resolve_checkpoint,
        save_checkpoint,
    )
    from napari_cpgcn.training.datasets import HPAImageDataset, split_ids
    from napari_cpgcn.training.engine import fit, resolve_device
    from napari_cpgcn.training.image_trainer import image_model_meta, load_split
    from napari_cpgcn.training.losses import focal_loss
    from napari_cpgcn.training.oaa import OAAStore

    config = config or RefineConfig()
    config.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / "best.pt"
    device = resolve_device(config.device)
    model, icfg = load_image_model(image_checkpoint, device, classes=None)
    meta = image_model_meta(icfg)
    if config.rounds == 0:
        yield Event(EventKind.LOG, stage=stage, message="refinement off (rounds = 0): the image model is used as is")
        yield Event(EventKind.DONE, stage=stage, message="no refinement", result=str(image_checkpoint))
        return

    table = read_labels_csv(labels_csv)
    # The image model's own split when its run folder recorded one (validation images stay unseen).
    split = load_split(resolve_checkpoint(image_checkpoint).parent)
    if split is not None and set(split["train"]) | set(split["val"]) <= set(table.ids):
        train_ids, val_ids = list(split["train"]), list(split["val"])
    else:
        train_ids, val_ids = split_ids(table.ids, icfg.val_fraction)
    cache = Path(cache_dir) if cache_dir else (run_dir / "cache" if icfg.cache else None)
    train_table = table.subset(train_ids)
    plain = HPAImageDataset(data_dir, train_table, icfg.image_size, augment=False, cache_dir=cache)
    train_aug = HPAImageDataset(data_dir, train_table, icfg.image_size, augment=icfg.augment and config.epochs > 0,
                                cache_dir=cache, crop_scale=icfg.crop_scale, index=plain.index)
    val_ds = (HPAImageDataset(data_dir, table.subset(val_ids), icfg.image_size, augment=False, cache_dir=cache,
                              index=plain.index) if val_ids else None)
    n_classes = len(icfg.classes)
    k = config.k
    store = OAAStore(run_dir / "oaa", n_classes, size=icfg.oaa_size, threshold=icfg.oaa_threshold) \
        if config.oaa else None

    class _WithSub(torch.utils.data.Dataset):
        def __init__(self, base, sub) -> None:
            self.base, self.sub = base, sub

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, i):
            item = dict(self.base[i])
            item["sub_target"] = torch.from_numpy(self.sub[i])
            return item

    gamma, alpha = config.focal_gamma, config.focal_alpha

    def loss_fn(out, batch):
        loss = focal_loss(out[0], batch["target"], gamma=gamma, alpha=alpha)
        if "sub_target" in batch and config.sub_loss_weight > 0:
            loss = loss + config.sub_loss_weight * focal_loss(out[2], batch["sub_target"], gamma=gamma, alpha=alpha)
        return loss

    def batch_hook(out, batch, epoch):
        if store is None:
            return
        ids = [train_aug.ids[int(i)] for i in batch["index"]]
        store.update(ids, normalize_cams(out[1]), torch.sigmoid(out[0].float()), batch["target"], batch.get("aug"))

    for r in range(1, config.rounds + 1):
        rdir = run_dir / f"round{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        done_flag = rdir / "done.json"
        wrapper = None
        if done_flag.is_file():
            ck = load_checkpoint(rdir / "best.pt", map_location="cpu")
            wrapper = SubcategoryModel(model, n_classes * k)
            wrapper.load_state_dict(ck["model"])
            model = wrapper.base.to(device)
            yield Event(EventKind.LOG, stage=stage, message=f"round {r}/{config.rounds} finished earlier; skipped")
            continue
        assign_path = rdir / "clusters.npy"
        if assign_path.is_file():
            assign = np.load(assign_path)
        else:
            yield Event(EventKind.LOG, stage=stage, message=f"round {r}/{config.rounds}: features + K-means (K = {k})")
            feats = _features(model, plain, device, max(1, config.batch_size), should_stop)
            if feats is None:
                yield Event(EventKind.STOPPED, stage=stage, message=f"stopped during round {r} feature extraction")
                return
            assign = cluster_subcategories(feats, plain.labels, k, seed=config.seed + 1000 * r,
                                           n_init=config.kmeans_init)
            np.save(assign_path, assign)
            sizes = {int(c): np.bincount(assign[assign[:, c] >= 0, c]).tolist()
                     for c in range(n_classes) if (assign[:, c] >= 0).any()}
            (rdir / "clusters.json").write_text(json.dumps({"k": k, "ids": plain.ids, "sizes": sizes}))
        sub = _sub_targets(assign, k)
        # The new sub-class head is initialised from a seed of its own, not from whatever state the
        # global generator is in, so that a run is reproducible whatever ran before it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 7919 * r)
            wrapper = SubcategoryModel(model, n_classes * k)
        gen = torch.Generator()
        gen.manual_seed(config.seed + r)
        train_loader = torch.utils.data.DataLoader(
            _WithSub(train_aug, sub), batch_size=config.batch_size, shuffle=True, generator=gen,
            num_workers=config.num_workers, drop_last=len(train_aug) > config.batch_size)
        val_loader = (torch.utils.data.DataLoader(val_ds, batch_size=config.batch_size, shuffle=False,
                                                  num_workers=config.num_workers) if val_ds is not None else None)
        rmeta = {**meta, "refine_k": k, "refine_round": r}
        rcfg = config.replace(seed=config.seed + r)
        stopped = False
        for ev in fit(wrapper, train_loader, val_loader, rcfg, rdir, should_stop, meta=rmeta, loss_fn=loss_fn,
                      logits_fn=lambda out: out[0], batch_hook=batch_hook, stage=stage, device=device):
            if ev.kind == EventKind.DONE:
                continue
            if ev.kind == EventKind.STOPPED:
                stopped = True
            ev.message = (f"round {r}/{config.rounds}: " + ev.message) if ev.message else ev.message
            yield ev
        if stopped:
            return
        best = rdir / "best.pt" if (rdir / "best.pt").is_file() else rdir / "latest.pt"
        ck = load_checkpoint(best, map_location="cpu")
        wrapper.load_state_dict(ck["model"])
        model = wrapper.base.to(device)
        done_flag.write_text(json.dumps({"round": r, "best": str(best.name)}))
    # The refined image model in the image model's own checkpoint format.
    hist: list[Any] = []
    save_checkpoint(final, model.state_dict(), meta, epoch=int(config.epochs * config.rounds), best_metric=float("nan"),
                    best_epoch=0, config=icfg.to_dict(), history=hist, stage=stage,
                    refine={"k": k, "rounds": config.rounds})
    yield Event(EventKind.CHECKPOINT, stage=stage, path=str(final), message="refined image model")
    yield Event(EventKind.DONE, stage=stage, message=f"{config.rounds} rounds, K = {k}", result=str(final))
