"""Calibration of per-(cell, class) probabilities: expected calibration error, a reliability
diagram, and one-parameter temperature scaling fitted on held-out cells.

All functions take flat or (n, C) arrays of probabilities and 0/1 truth of the same shape; every
(cell, class) pair is one binary decision. No Qt, no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["reliability_bins", "expected_calibration_error", "fit_temperature", "apply_temperature",
           "reliability_diagram", "matched_probabilities"]

_EPS = 1e-6


def reliability_bins(probs: np.ndarray, truth: np.ndarray, n_bins: int = 15
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of [0, 1]: mean predicted probability, observed frequency, count."""
    p = np.asarray(probs, np.float64).ravel()
    y = np.asarray(truth, np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"probabilities {p.shape} and truth {y.shape} differ in size")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf = np.bincount(idx, weights=p, minlength=n_bins)
    freq = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return conf / count, freq / count, count


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean ``|mean probability − observed frequency|`` over the bins."""
    conf, freq, count = reliability_bins(probs, truth, n_bins)
    ok = count > 0
    if not ok.any():
        return float("nan")
    return float(np.sum(count[ok] * np.abs(conf[ok] - freq[ok])) / count.sum())


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid(logit(p) / T)``, same shape as ``probs``."""
    return (1.0 / (1.0 + np.exp(-_logit(probs) / float(temperature)))).astype(np.float32)


def fit_temperature(probs: np.ndarray, truth: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising the binary log-loss on (validation) probabilities and truth."""
    from scipy.optimize import minimize_scalar

    z = _logit(probs).ravel()
    y = np.asarray(truth, np.float64).ravel()

    def nll(log_t: float) -> float:
        q = np.clip(1.0 / (1.0 + np.exp(-z / np.exp(log_t))), _EPS, 1 - _EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    res = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded")
    return float(np.exp(res.x))


def reliability_diagram(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], n_bins: int = 15) -> Path:
    """Write a reliability diagram PNG (atomically): one curve per ``{name: (probs, truth)}``,
    each labelled with its ECE."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from napari_cpgcn.io.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
    for name, (p, y) in curves.items():
        conf, freq, count = reliability_bins(p, y, n_bins)
        ok = count > 0
        ax.plot(conf[ok], freq[ok], marker="o", ms=3, label=f"{name} (ECE {expected_calibration_error(p, y, n_bins):.3f})")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out


def matched_probabilities(tables, masks, truth, prefix: str = "fused_") -> tuple[np.ndarray, np.ndarray]:
    """(n, 19) probabilities and 0/1 truth of the predicted cells that match a true cell
    (IoU >= 0.6), from per-image tables, ``{image id: predicted mask}`` and a
    :class:`~napari_cpgcn.evaluation.cell.CellTruth`."""
    from napari_cpgcn.classes import N_CLASSES, SHORT_NAMES
    from napari_cpgcn.evaluation.matching import match_labels

    cols = [f"{prefix}{s}" for s in SHORT_NAMES]
    ps, ys = [np.zeros((0, N_CLASSES))], [np.zeros((0, N_CLASSES))]
    for table in tables:
        if not len(table):
            continue
        iid = str(table["image_id"].iloc[0])
        pids, tids, _ = match_labels(np.asarray(masks[iid]), truth.mask(iid))
        rows = table.set_index("cell_id")
        ps.append(rows.loc[pids, cols].to_numpy(np.float64))
        ys.append(truth.cell_labels(iid, tids).astype(np.float64))
    return np.concatenate(ps), np.concatenate(ys)
