"""Image-level evaluation: per-class average precision, mAP, AP bar chart and PR curves.

AP is the area under the precision-recall curve as the ranked probabilities are swept
(non-interpolated: Σ_n (R_n − R_{n−1}) P_n), computed by scikit-learn. The mAP is the macro
mean over the classes that have at least one positive image (a class without positives has no
defined AP and is reported as NaN).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_cpgcn.classes import SHORT_NAMES

__all__ = [
    "average_precision",
    "per_class_ap",
    "mean_average_precision",
    "ap_table",
    "plot_ap_bars",
    "plot_pr_curves",
]

log = logging.getLogger(__name__)


def _check(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return (y > 0.5).astype(np.int64), s


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class (:func:`sklearn.metrics.average_precision_score`); NaN when there is no positive."""
    from sklearn.metrics import average_precision_score

    y, s = _check(y_true, scores)
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, s))


def per_class_ap(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(C,) AP per class for (N, C) labels and scores; NaN for classes without positives."""
    y, s = _check(y_true, scores)
    if y.ndim != 2:
        raise ValueError(f"expected (n_images, n_classes) arrays, got {y.shape}")
    return np.array([average_precision(y[:, c], s[:, c]) for c in range(y.shape[1])])


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro mAP over the classes present (with ≥ 1 positive); NaN if none is present."""
    ap = per_class_ap(y_true, scores)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def ap_table(y_true: np.ndarray, scores: np.ndarray, class_names: Sequence[str] = SHORT_NAMES):
    """A pandas DataFrame: class, n_positive, ap (one row per class, plus a final ``mAP`` row)."""
    import pandas as pd

    y, _ = _check(y_true, scores)
    ap = per_class_ap(y_true, scores)
    df = pd.DataFrame({"class": list(class_names), "n_positive": y.sum(axis=0).astype(int), "ap": ap})
    m = float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")
    return pd.concat([df, pd.DataFrame({"class": ["mAP"], "n_positive": [int(y.sum())], "ap": [m]})],
                     ignore_index=True)


def _pyplot():
    """matplotlib's pyplot on the non-interactive backend, or a clear ImportError."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install \"napari-cpgcn[plots]\"") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_ap_bars(ap: np.ndarray, path: str | Path, class_names: Sequence[str] = SHORT_NAMES,
                 title: str = "Image-level AP per class", compare: dict[str, np.ndarray] | None = None) -> Path:
    """Per-class AP bar chart (the paper's Fig. 3 kind) as a PNG; ``compare`` adds more models."""
    from napari_cpgcn.classes import CLASSES

    plt = _pyplot()
    series = {"model": np.asarray(ap, dtype=float)} if not compare else {k: np.asarray(v, float) for k, v in compare.items()}
    n = len(class_names)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * n), 4.5), dpi=120)
    x = np.arange(n)
    for k, (label, vals) in enumerate(series.items()):
        colors = [CLASSES[i].color if i < len(CLASSES) else "#888888" for i in range(n)]
        pos = x + (k - (len(series) - 1) / 2) * width
        m = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        ax.bar(pos, np.nan_to_num(vals), width, color=colors if len(series) == 1 else None,
               label=f"{label} (mAP {m:.3f})", edgecolor="black", linewidth=0.4)
        for xi, v in zip(pos, vals, strict=True):
            if not np.isfinite(v):  # no positive image: AP undefined, not zero
                ax.text(xi, 0.01, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color="0.4")
    ax.set_xticks(x)
    ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("average precision")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_pr_curves(y_true: np.ndarray, scores: np.ndarray, path: str | Path,
                   class_names: Sequence[str] = SHORT_NAMES, title: str = "Precision-recall per class") -> Path:
    """Precision-recall curves of every class present, one panel, as a PNG."""
    from sklearn.metrics import precision_recall_curve

    from napari_cpgcn.classes import CLASSES

    plt = _pyplot()
    y, s = _check(y_true, scores)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    for c in range(y.shape[1]):
        if not y[:, c].any():
            continue
        p, r, _ = precision_recall_curve(y[:, c], s[:, c])
        color = CLASSES[c].color if c < len(CLASSES) else None
        ax.step(r, p, where="post", color=color, lw=1.2,
                label=f"{class_names[c]} ({average_precision(y[:, c], s[:, c]):.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
