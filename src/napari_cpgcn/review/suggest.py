"""Which cells a biologist should check next: ``napari-cpgcn suggest PRED_DIR``.

Strategies over the per-cell table ``PRED_DIR/cells.csv`` of a prediction folder:

* ``uncertainty`` — the cells with the largest ``uncertainty`` (the predictor's per-cell
  uncertainty, :mod:`napari_cpgcn.pipeline.uncertainty`), most uncertain first;
* ``random`` — a seeded uniform sample (the baseline any strategy has to beat);
* ``diverse`` — from the ``4 n`` most uncertain cells, a greedy farthest-point selection in
  fused-probability space, so the list is not n near-copies of one confusing phenotype.

Cells already in ``PRED_DIR/corrections.csv`` are left out. The result is a table
``image_id, cell_id, reason`` (plus ``rank`` and ``uncertainty``); :func:`write_suggestions`
writes it atomically. No Qt, no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from napari_cpgcn.classes import SHORT_NAMES

__all__ = ["STRATEGIES", "SUGGEST_COLUMNS", "read_predictions", "cell_uncertainties", "suggest_cells",
           "suggest", "write_suggestions", "read_suggestions"]

STRATEGIES = ("uncertainty", "random", "diverse")
SUGGEST_COLUMNS = ("image_id", "cell_id", "reason")
_FUSED = [f"fused_{s}" for s in SHORT_NAMES]
_UNC = [f"unc_{s}" for s in SHORT_NAMES]


def read_predictions(pred_dir: str | Path) -> pd.DataFrame:
    """``PRED_DIR/cells.csv`` with its fused columns checked."""
    p = Path(pred_dir).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"prediction folder {p} does not exist; give the --out folder of "
                                "`napari-cpgcn predict`")
    f = p / "cells.csv"
    if not f.is_file():
        raise FileNotFoundError(f"{p} has no cells.csv: the prediction is unfinished or this is not a "
                                "prediction folder (rerun `napari-cpgcn predict ... --out` into it to finish)")
    table = pd.read_csv(f, dtype={"image_id": str})
    missing = [c for c in ["image_id", "cell_id", *_FUSED] if c not in table.columns]
    if missing:
        raise ValueError(f"{f} lacks the columns {missing[:3]}; it was not written by `napari-cpgcn predict`")
    return table


def cell_uncertainties(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell ``uncertainty`` (n,) and per-class ``unc_S`` (n, 19) of a table; tables from
    before the uncertainty columns get the entropy of their fused probabilities."""
    from napari_cpgcn.pipeline.uncertainty import binary_entropy, cell_uncertainty

    if all(c in table.columns for c in _UNC):
        per = table[_UNC].to_numpy(np.float64)
    else:
        per = binary_entropy(table[_FUSED].to_numpy(np.float64)).astype(np.float64)
    per = np.nan_to_num(per, nan=1.0)  # a cell without a score is worth a look
    cell = table["uncertainty"].to_numpy(np.float64) if "uncertainty" in table.columns else cell_uncertainty(per)
    return np.nan_to_num(np.asarray(cell, np.float64), nan=1.0), per


def _reason(per: np.ndarray, fused: np.ndarray, u: float, prefix: str) -> str:
    k = int(np.argmax(per))
    return f"{prefix}: uncertainty {u:.2f}, most unsure about {SHORT_NAMES[k]} (p={fused[k]:.2f})"


def suggest_cells(table: pd.DataFrame, n: int, strategy: str = "uncertainty", *, seed: int = 0,
                  exclude: set[tuple[str, int]] | None = None) -> pd.DataFrame:
    """The ``n`` cells of ``table`` most worth checking (fewer when the table has fewer).

    Parameters
    ----------
    table
        A per-cell prediction table (``image_id``, ``cell_id``, ``fused_S``; ``unc_S`` and
        ``uncertainty`` when present).
    n
        How many cells.
    strategy
        One of :data:`STRATEGIES`.
    seed
        Seed of ``random`` (``diverse`` and ``uncertainty`` are deterministic).
    exclude
        ``(image_id, cell_id)`` pairs to leave out (cells already corrected).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    t = table.reset_index(drop=True)
    if exclude:
        keep = [(str(i), int(c)) not in exclude for i, c in zip(t["image_id"], t["cell_id"], strict=True)]
        t = t[np.asarray(keep, bool)].reset_index(drop=True)
    u, per = cell_uncertainties(t)
    fused = t[_FUSED].to_numpy(np.float64)
    # most uncertain first; ties by image and cell id so the list is reproducible
    order = np.lexsort((t["cell_id"].to_numpy(), t["image_id"].astype(str).to_numpy(), -u))
    if strategy == "uncertainty":
        picked = list(order[:n])
        reasons = [_reason(per[i], fused[i], u[i], f"uncertainty rank {r + 1}") for r, i in enumerate(picked)]
    elif strategy == "random":
        rng = np.random.default_rng(seed)
        picked = list(rng.permutation(len(t))[:n])
        reasons = [_reason(per[i], fused[i], u[i], f"random (seed {seed})") for i in picked]
    else:
        pool = order[:max(4 * n, n)]
        picked, reasons = [], []
        if len(pool):
            x = np.sqrt(np.clip(fused[pool], 0, 1))  # Hellinger-like: spreads small probabilities
            dist = np.full(len(pool), np.inf)
            j = 0  # start with the most uncertain cell
            for _ in range(min(n, len(pool))):
                picked.append(int(pool[j]))
                d = "" if len(picked) == 1 else f", distance {dist[j]:.2f} from the cells above"
                reasons.append(_reason(per[pool[j]], fused[pool[j]], u[pool[j]], "diverse") + d)
                dist = np.minimum(dist, np.linalg.norm(x - x[j], axis=1))
                dist[[k for k, p in enumerate(pool) if p in set(picked)]] = -np.inf
                # farthest from everything picked, weighted by how uncertain it is
                j = int(np.argmax(np.where(np.isfinite(dist), dist * (0.5 + u[pool]), -np.inf)))
    out = pd.DataFrame({
        "image_id": t["image_id"].astype(str).to_numpy()[picked] if picked else np.array([], str),
        "cell_id": t["cell_id"].to_numpy(np.int64)[picked] if picked else np.array([], np.int64),
        "reason": reasons,
    })
    out["rank"] = np.arange(1, len(out) + 1)
    out["uncertainty"] = u[picked] if picked else np.array([], np.float64)
    return out


def suggest(pred_dir: str | Path, n: int, strategy: str = "uncertainty", *, seed: int = 0,
            skip_corrected: bool = True) -> pd.DataFrame:
    """:func:`suggest_cells` on ``PRED_DIR/cells.csv``, leaving out the cells in its corrections.csv."""
    table = read_predictions(pred_dir)
    exclude: set[tuple[str, int]] = set()
    if skip_corrected and (Path(pred_dir) / "corrections.csv").is_file():
        from napari_cpgcn.review.corrections import read_corrections

        exclude = {c.key for c in read_corrections(pred_dir, validate=False)}
    return suggest_cells(table, n, strategy, seed=seed, exclude=exclude)


def write_suggestions(path: str | Path, suggestions: pd.DataFrame) -> Path:
    """Write ``image_id,cell_id,reason,rank,uncertainty`` atomically."""
    from napari_cpgcn.io.atomic import atomic_write

    return atomic_write(Path(path), lambda tmp: suggestions.to_csv(tmp, index=False, float_format="%.4f",
                                                                  lineterminator="\n"))


def read_suggestions(path: str | Path) -> pd.DataFrame:
    """A suggestion list written by :func:`write_suggestions` (``image_id,cell_id`` at least)."""
    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"suggestion list {f} does not exist; make one with `napari-cpgcn suggest`")
    df = pd.read_csv(f, dtype={"image_id": str})
    missing = [c for c in ("image_id", "cell_id") if c not in df.columns]
    if missing:
        raise ValueError(f"{f} lacks the columns {missing}; expected {','.join(SUGGEST_COLUMNS)}")
    return df
