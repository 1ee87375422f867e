"""Per-cell embeddings: the cell model's pooled features, per image and as one ``cells.h5ad``.

A folder prediction with embeddings (``predict --embeddings``, ``BatchOptions(embeddings=True)``)
writes ``embeddings/{ID}.npy`` (n_cells, D) float32 with every finished image, atomically and
before the image's done marker (so resuming works as for the other outputs). At the end
:func:`assemble_h5ad` streams the parts into one AnnData file:

``obs``
    One row per cell, the same rows and order as ``cells.csv``: ``image_id``, ``cell_id``,
    ``top_class``, ``area``, ``centroid_y``, ``centroid_x`` and the ``fused_S`` probabilities;
    index ``"{image_id}:{cell_id}"``.
``X`` / ``var``
    The fused probabilities (one variable per class short name) so scanpy's plots work as is.
``obsm["X_cpgcn"]``
    The embeddings; ``obsm["X_umap"]`` (2-D) when asked (umap-learn, seeded).
``uns``
    ``cpgcn``: the run settings (model, fingerprint, segmentation), the class names and short
    names, the embedding dimension, the UMAP parameters.

Memory: the embeddings of all cells (n x D float32: 100,000 x 512 = 200 MB) plus a small
obs table; images are never held.

No Qt; torch only in :func:`predict_crops_with_features`; anndata / umap-learn on use.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from napari_cpgcn.classes import CLASS_NAMES, SHORT_NAMES
from napari_cpgcn.io.atomic import atomic_save_npy, atomic_write

__all__ = [
    "OBS_COLUMNS",
    "EMBEDDING_KEY",
    "UMAP_KEY",
    "predict_crops_with_features",
    "embeddings_path",
    "write_embeddings",
    "read_embeddings",
    "compute_umap",
    "require_umap",
    "assemble_h5ad",
]

log = logging.getLogger(__name__)

#: ``obsm`` keys of the embeddings and of their UMAP.
EMBEDDING_KEY = "X_cpgcn"
UMAP_KEY = "X_umap"

#: Per-cell columns of ``obs`` (then the fused probabilities).
OBS_COLUMNS: tuple[str, ...] = ("image_id", "cell_id", "top_class", "area", "centroid_y", "centroid_x",
                                *(f"fused_{s}" for s in SHORT_NAMES))


def predict_crops_with_features(model, crops: np.ndarray, device, batch_size: int = 64
                                ) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities (n, C) and pooled features (n, D) of float crops (n, 4, S, S) in one
    forward pass of a :class:`~napari_cpgcn.models.cell.CellClassifier` (the features are the
    globally average-pooled backbone output, the input of its dropout + linear head)."""
    import torch

    probs, feats = [], []
    with torch.no_grad():
        for i in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[i:i + batch_size], dtype=np.float32)).to(device)
            pooled = model.backbone.forward_head(model.forward_features(x))
            probs.append(torch.sigmoid(model.fc(model.dropout(pooled)).float()).cpu().numpy())
            feats.append(pooled.float().cpu().numpy())
    if not probs:
        return (np.zeros((0, model.n_classes), np.float32),
                np.zeros((0, int(model.backbone.out_channels)), np.float32))
    return np.concatenate(probs), np.concatenate(feats)


def embeddings_path(out_dir: str | Path, image_id: str) -> Path:
    """Where one image's embeddings go: ``OUT/embeddings/{ID}.npy``."""
    return Path(out_dir) / "embeddings" / f"{image_id}.npy"


def write_embeddings(path: str | Path, embeddings: np.ndarray, n_cells: int, image_id: str) -> Path:
    """Write one image's (n_cells, D) float32 embeddings atomically, checking their row count."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n_cells:
        raise ValueError(f"{image_id}: embeddings of shape {emb.shape} for {n_cells} cells; expected "
                         f"({n_cells}, D)")
    return atomic_save_npy(path, emb)


def read_embeddings(path: str | Path) -> np.ndarray:
    """One image's embeddings (memory-mapped, read-only)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def require_umap() -> None:
    """Raise a clear ImportError when umap-learn is missing."""
    try:
        import umap  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--umap needs umap-learn ({e}); install it with `pip install umap-learn` "
                          "or `pip install napari-cpgcn[profiles]`") from e


def compute_umap(x: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """2-D UMAP of the rows of ``x`` (umap-learn; deterministic for a given ``seed``).

    With fewer than 4 rows there is no neighbourhood to embed: raises ValueError.
    """
    require_umap()
    import umap

    x = np.asarray(x, dtype=np.float32)
    if len(x) < 4:
        raise ValueError(f"UMAP needs at least 4 cells, got {len(x)}")
    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(n_neighbors, len(x) - 1)),
                        min_dist=min_dist, random_state=int(seed), transform_seed=int(seed),
                        n_jobs=1)  # a seed makes umap-learn single-threaded anyway
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def _obs_of_part(cells_csv: Path):
    import pandas as pd

    df = pd.read_csv(cells_csv, usecols=list(OBS_COLUMNS), dtype={"image_id": str, "top_class": str})
    return df[list(OBS_COLUMNS)]


def assemble_h5ad(out_dir: str | Path, image_ids: Iterable[str], *, umap: bool = False, seed: int = 0,
                  dest: str | Path | None = None, metadata: dict[str, Any] | None = None,
                  cells_part: Callable[[str], Path] | None = None) -> dict[str, Any]:
    """Assemble ``OUT/cells.h5ad`` from the finished images' cell parts and embeddings.

    Parameters
    ----------
    out_dir
        A folder prediction's output folder (``parts/{ID}.cells.csv`` + ``embeddings/{ID}.npy``).
    image_ids
        The finished images, in the order of ``cells.csv``.
    umap
        Also compute ``obsm["X_umap"]`` (umap-learn, ``seed``).
    dest
        Output file (default ``OUT/cells.h5ad``).
    metadata
        Extra entries for ``uns["cpgcn"]`` (default: the ``settings`` of ``OUT/run.json``).
    cells_part
        The per-cell CSV of an image id (default ``OUT/parts/{ID}.cells.csv``, where
        :func:`napari_cpgcn.batch.outputs.image_paths` puts it; the batch passes its own, so
        this module does not import the batch layer above it).

    Returns
    -------
    dict
        ``path``, ``n_obs``, ``n_images``, ``dim``, ``seconds``.

    Raises
    ------
    FileNotFoundError
        A finished image has no embeddings (it was predicted without ``--embeddings``).
    ValueError
        An image's embeddings and cell rows disagree.
    """
    import anndata as ad
    import pandas as pd

    t0 = time.perf_counter()
    out = Path(out_dir)
    part = cells_part or (lambda i: out / "parts" / f"{i}.cells.csv")
    ids = list(image_ids)
    shapes: list[tuple[int, int]] = []
    for i in ids:
        f = embeddings_path(out, i)
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: image {i} was predicted without --embeddings; rerun "
                                    "`napari-cpgcn predict --embeddings` with --overwrite (or into a new --out)")
        shapes.append(tuple(read_embeddings(f).shape))  # header only (memory-mapped)
    dims = {s[1] for s in shapes if s[0]}
    if len(dims) > 1:
        raise ValueError(f"{out / 'embeddings'} holds embeddings of different sizes {sorted(dims)}: made by "
                         "different models; rerun with --overwrite")
    dim = dims.pop() if dims else 0
    n_total = sum(s[0] for s in shapes)
    x_emb = np.zeros((n_total, dim), np.float32)
    obs_parts = []
    row = 0
    for i, (n, _) in zip(ids, shapes, strict=True):
        obs = _obs_of_part(part(i))
        if len(obs) != n:
            raise ValueError(f"{embeddings_path(out, i)} has {n} rows but {part(i)} "
                             f"{len(obs)} cells; rerun with --overwrite")
        if n:
            x_emb[row:row + n] = read_embeddings(embeddings_path(out, i))
        row += n
        obs_parts.append(obs)
    obs = (pd.concat(obs_parts, ignore_index=True) if obs_parts
           else pd.DataFrame({c: pd.Series(dtype=float) for c in OBS_COLUMNS}))
    del obs_parts
    obs["image_id"] = obs["image_id"].astype(str)
    obs["top_class"] = pd.Categorical(obs["top_class"].astype(str), categories=list(SHORT_NAMES))
    obs.index = (obs["image_id"] + ":" + obs["cell_id"].astype(np.int64).astype(str)).to_numpy()
    fused_cols = [f"fused_{s}" for s in SHORT_NAMES]
    x = obs[fused_cols].to_numpy(np.float32)
    var = pd.DataFrame({"name": list(CLASS_NAMES)}, index=list(SHORT_NAMES))
    if metadata is None:
        try:
            metadata = json.loads((out / "run.json").read_text(encoding="utf-8")).get("settings", {})
        except (OSError, ValueError):
            metadata = {}
    meta = {str(k): (v if isinstance(v, (str, int, float, bool)) else json.dumps(v))
            for k, v in (metadata or {}).items() if v is not None}
    uns: dict[str, Any] = {"cpgcn": {
        "run": meta, "class_names": list(CLASS_NAMES), "short_names": list(SHORT_NAMES),
        "embedding_key": EMBEDDING_KEY, "embedding_dim": int(dim),
        "embedding": "cell model: global average pooled backbone features",
        "X": "fused probabilities",
    }}
    obsm = {EMBEDDING_KEY: x_emb}
    if umap:
        obsm[UMAP_KEY] = compute_umap(x_emb, seed=seed)
        uns["cpgcn"]["umap"] = {"seed": int(seed), "n_neighbors": 15, "min_dist": 0.1}
    adata = ad.AnnData(X=x, obs=obs, var=var, obsm=obsm, uns=uns)
    path = Path(dest) if dest is not None else out / "cells.h5ad"
    atomic_write(path, lambda tmp: adata.write_h5ad(tmp))
    secs = time.perf_counter() - t0
    log.info("wrote %s: %d cells x %d features (%.1f s)", path, n_total, dim, secs)
    return {"path": str(path), "n_obs": int(n_total), "n_images": len(ids), "dim": int(dim), "seconds": secs}
