"""Match two instance label images (prediction vs. truth) by IoU.

The Kaggle HPA 2021 cell-level metric counts a predicted cell as a true positive when it
overlaps a true cell with IoU >= 0.6. :func:`match_labels` returns the matched pairs (so the
cell-level mAP can reuse them with per-class confidences); :func:`match_summary` adds the
counts and scores.

For thresholds above 0.5 a cell can overlap at most one partner with IoU above the
threshold, so the matching is unique; below 0.5 an optimal one-to-one assignment (maximum
total IoU, Hungarian algorithm) decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["KAGGLE_IOU", "MatchResult", "iou_table", "iou_matrix", "match_labels", "match_summary"]

#: The IoU threshold of the Kaggle HPA 2021 cell-level metric.
KAGGLE_IOU = 0.6


@dataclass(frozen=True)
class MatchResult:
    """Counts and scores of one prediction/truth matching.

    Attributes
    ----------
    n_pred, n_true : int
        Number of predicted / true objects (non-zero label ids).
    tp, fp, fn : int
        Matched pairs; unmatched predictions; unmatched truths.
    precision, recall, f1 : float
        ``tp / n_pred``, ``tp / n_true``, their harmonic mean; 1.0 when both images are empty.
    mean_iou : float
        Mean IoU of the matched pairs (0.0 when there are none).
    threshold : float
        The IoU threshold used.
    """

    n_pred: int
    n_true: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_iou: float
    threshold: float

    def as_dict(self) -> dict:
        """Plain dict (for tables and JSON)."""
        return asdict(self)


def _check_pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(
            f"label images differ in shape: prediction {pred.shape} vs truth {true.shape}; "
            "resize the prediction to the truth's size (nearest neighbour) before matching"
        )
    for name, a in (("prediction", pred), ("truth", true)):
        if not np.issubdtype(a.dtype, np.integer) and a.dtype != bool:
            raise ValueError(f"{name} labels must be an integer image, got dtype {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError(f"{name} labels must be >= 0 (0 = background)")
    return pred, true


def iou_table(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (prediction, truth) pair of objects.

    Works on the sparse overlap table, so the cost is one pass over the pixels whatever the
    number of objects.

    Parameters
    ----------
    pred, true
        Integer label images of the same shape; 0 is background.

    Returns
    -------
    pred_ids, true_ids, ious : numpy.ndarray
        One entry per pair of objects that share at least one pixel.
    """
    pred, true = _check_pair(pred, true)
    p = pred.ravel().astype(np.int64)
    t = true.ravel().astype(np.int64)
    p_ids, p_area = np.unique(p[p > 0], return_counts=True)
    t_ids, t_area = np.unique(t[t > 0], return_counts=True)
    both = (p > 0) & (t > 0)
    if not both.any():
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.float64)
    # Pair code in a compact index space so that huge label ids do not overflow.
    pi = np.searchsorted(p_ids, p[both])
    ti = np.searchsorted(t_ids, t[both])
    codes, inter = np.unique(pi * len(t_ids) + ti, return_counts=True)
    pi, ti = np.divmod(codes, len(t_ids))
    union = p_area[pi] + t_area[ti] - inter
    return p_ids[pi], t_ids[ti], inter / union


def iou_matrix(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every predicted object with every true object: the dense form of :func:`iou_table`.

    Returns
    -------
    iou : numpy.ndarray
        (n_pred, n_true) float64.
    pred_ids, true_ids : numpy.ndarray
        The label ids of the rows / columns (ids present in the images, sorted).
    """
    pred, true = _check_pair(pred, true)
    pred_ids = np.unique(pred)
    pred_ids = pred_ids[pred_ids != 0].astype(np.int64)
    true_ids = np.unique(true)
    true_ids = true_ids[true_ids != 0].astype(np.int64)
    iou = np.zeros((len(pred_ids), len(true_ids)))
    pi, ti, v = iou_table(pred, true)  # sparse: only the overlapping pairs
    if len(v):
        iou[np.searchsorted(pred_ids, pi), np.searchsorted(true_ids, ti)] = v
    return iou, pred_ids, true_ids


def match_labels(
    pred: np.ndarray, true: np.ndarray, threshold: float = KAGGLE_IOU
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of predicted to true objects at IoU >= ``threshold``.

    Parameters
    ----------
    pred, true
        Integer label images of the same shape (0 = background).
    threshold
        Minimum IoU of a match, in (0, 1].

    Returns
    -------
    pred_ids, true_ids, ious : numpy.ndarray
        The matched pairs (sorted by true id) and their IoU.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    pid, tid, iou = iou_table(pred, true)
    keep = iou >= threshold
    pid, tid, iou = pid[keep], tid[keep], iou[keep]
    if threshold <= 0.5 and len(iou):
        # Several candidates per object are possible: take the assignment with maximum total IoU.
        from scipy.optimize import linear_sum_assignment

        up, pinv = np.unique(pid, return_inverse=True)
        ut, tinv = np.unique(tid, return_inverse=True)
        m = np.zeros((len(up), len(ut)))
        m[pinv, tinv] = iou
        r, c = linear_sum_assignment(m, maximize=True)
        ok = m[r, c] >= threshold
        pid, tid, iou = up[r[ok]], ut[c[ok]], m[r[ok], c[ok]]
    order = np.argsort(tid, kind="stable")
    return pid[order], tid[order], iou[order]


def match_summary(pred: np.ndarray, true: np.ndarray, threshold: float = KAGGLE_IOU) -> MatchResult:
    """Precision, recall, F1 and mean matched IoU of ``pred`` against ``true``.

    Parameters
    ----------
    pred, true
        Integer label images of the same shape (0 = background).
    threshold
        Minimum IoU of a match (Kaggle HPA 2021: 0.6).
    """
    pid, _, iou = match_labels(pred, true, threshold)
    n_pred = int(len(np.setdiff1d(np.unique(pred), [0])))
    n_true = int(len(np.setdiff1d(np.unique(true), [0])))
    tp = int(len(pid))
    fp, fn = n_pred - tp, n_true - tp
    if n_pred == 0 and n_true == 0:
        precision = recall = f1 = 1.0
    else:
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * tp / (n_pred + n_true)
    return MatchResult(
        n_pred=n_pred,
        n_true=n_true,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        mean_iou=float(iou.mean()) if tp else 0.0,
        threshold=float(threshold),
    )
