"""Cell-level evaluation: the Kaggle HPA 2021 metric and pseudo-label precision / recall / F1.

The Kaggle 2021 metric is the Open Images instance-segmentation AP at IoU ≥ 0.6:

* every predicted cell carries one confidence per class (one ``class confidence mask``
  triple of a submission);
* per class, the predictions of all images are ranked by confidence; within an image each
  prediction is matched to the true cell *of that class* with the highest IoU with it; it is
  a true positive when that IoU is ≥ 0.6 and that true cell was not matched by a
  higher-ranked prediction, otherwise a false positive; true cells of the class that no
  prediction matched are false negatives (they lower the recall);
* AP = area under the precision/recall curve with precision made monotonically
  non-increasing (the VOC / Open Images rule);
* mAP = mean of the per-class APs over the classes with at least one true cell.

No Qt, no torch. Works image by image (:class:`CellAPAccumulator`) so memory does not grow
with the number of images beyond one score record per (predicted cell, class).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_cpgcn.classes import N_CLASSES, SHORT_NAMES
from napari_cpgcn.evaluation.matching import KAGGLE_IOU, iou_matrix, match_labels

__all__ = [
    "KAGGLE_IOU",
    "detection_ap",
    "evaluate_prediction_folder",
    "SCORE_KINDS",
    "CellAPAccumulator",
    "CellMAPResult",
    "cell_map",
    "PseudoLabelScores",
    "pseudo_label_scores",
    "CellTruth",
    "evaluate_pseudo_labels",
    "evaluate_predictor",
]

#: IoU a predicted cell needs with a true cell to count as the same cell (Kaggle 2021).
def detection_ap(scores: np.ndarray, tp: np.ndarray, n_true: int) -> float:
    """Open Images / VOC AP of ranked detections (interpolated precision envelope: the Kaggle 2021
    cell metric; the image level uses scikit-learn's non-interpolated AP instead).

    Parameters
    ----------
    scores
        Confidence of each detection.
    tp
        1 for a true positive, 0 for a false positive (same order as ``scores``).
    n_true
        Number of true instances (the recall denominator).

    Returns
    -------
    float
        AP in [0, 1]; NaN when ``n_true`` is 0.
    """
    if n_true == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(tp, dtype=np.float64)[order]
    ctp = np.cumsum(tp)
    cfp = np.cumsum(1.0 - tp)
    recall = ctp / n_true
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    # Envelope: precision at recall r = max precision at any recall >= r.
    precision = np.concatenate([[0.0], precision, [0.0]])
    recall = np.concatenate([[0.0], recall, [1.0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    idx = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[idx] - recall[idx - 1]) * precision[idx]))


@dataclass
class CellMAPResult:
    """Outcome of the cell-level metric.

    Attributes
    ----------
    map : float
        Mean AP over the classes with at least one true cell (NaN if none).
    ap : numpy.ndarray
        (19,) per-class AP (NaN for classes without true cells).
    n_true : numpy.ndarray
        (19,) number of true cells per class.
    n_images : int
        Number of images evaluated.
    """

    map: float
    ap: np.ndarray
    n_true: np.ndarray
    n_images: int

    def as_dict(self) -> dict[str, float]:
        """``{"cell_mAP": .., "AP_<short name>": ..}`` (classes without true cells omitted)."""
        out = {"cell_mAP": self.map}
        for k, s in enumerate(SHORT_NAMES):
            if self.n_true[k] > 0:
                out[f"AP_{s}"] = float(self.ap[k])
        return out


@dataclass
class CellAPAccumulator:
    """Accumulate the Kaggle cell-level metric image by image.

    Examples
    --------
    >>> acc = CellAPAccumulator()
    >>> acc.add(pred_cells, pred_ids, pred_scores, true_cells, true_ids, true_labels)  # doctest: +SKIP
    >>> acc.result().map  # doctest: +SKIP
    """

    iou_threshold: float = KAGGLE_IOU
    n_classes: int = N_CLASSES
    _scores: list[list[np.ndarray]] = field(default_factory=list, repr=False)
    _tp: list[list[np.ndarray]] = field(default_factory=list, repr=False)
    _n_true: np.ndarray | None = field(default=None, repr=False)
    _n_images: int = 0

    def __post_init__(self) -> None:
        self._scores = [[] for _ in range(self.n_classes)]
        self._tp = [[] for _ in range(self.n_classes)]
        self._n_true = np.zeros(self.n_classes, dtype=np.int64)

    def add(
        self,
        pred_cells: np.ndarray,
        pred_ids: np.ndarray,
        pred_scores: np.ndarray,
        true_cells: np.ndarray,
        true_ids: np.ndarray,
        true_labels: np.ndarray,
    ) -> None:
        """Add one image.

        Parameters
        ----------
        pred_cells
            (Y, X) predicted label image.
        pred_ids
            (n,) label ids of the predicted cells that carry scores.
        pred_scores
            (n, 19) confidence per predicted cell and class.
        true_cells
            (Y, X) true label image.
        true_ids
            (m,) label ids of the true cells.
        true_labels
            (m, 19) multi-hot labels of the true cells.
        """
        pred_ids = np.asarray(pred_ids, dtype=np.int64)
        pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(len(pred_ids), self.n_classes)
        true_ids = np.asarray(true_ids, dtype=np.int64)
        true_labels = np.asarray(true_labels).astype(bool).reshape(len(true_ids), self.n_classes)
        iou, pids, tids = iou_matrix(pred_cells, true_cells)
        # Rows for the scored predictions, columns for the labelled true cells (a predicted id
        # absent from the mask overlaps nothing; a true id absent from the mask cannot be hit).
        r = np.searchsorted(pids, pred_ids)
        vp = (r < len(pids)) & (pids[np.minimum(r, len(pids) - 1)] == pred_ids) if len(pids) else np.zeros(len(pred_ids), bool)
        c = np.searchsorted(tids, true_ids)
        vt = (c < len(tids)) & (tids[np.minimum(c, len(tids) - 1)] == true_ids) if len(tids) else np.zeros(len(true_ids), bool)
        iou_s = np.zeros((len(pred_ids), len(true_ids)))
        iou_s[np.ix_(vp, vt)] = iou[np.ix_(r[vp], c[vt])]
        self._n_true += true_labels.sum(0)
        self._n_images += 1
        for k in range(self.n_classes):
            scores = pred_scores[:, k]
            if len(scores) == 0:
                continue
            gt = np.flatnonzero(true_labels[:, k])
            tp = np.zeros(len(scores), dtype=np.uint8)
            if len(gt):
                sub = iou_s[:, gt]
                best = sub.argmax(1)
                best_iou = sub[np.arange(len(scores)), best]
                taken = np.zeros(len(gt), dtype=bool)
                for a in np.argsort(-scores, kind="stable"):
                    if best_iou[a] >= self.iou_threshold and not taken[best[a]]:
                        taken[best[a]] = True
                        tp[a] = 1
            self._scores[k].append(scores)
            self._tp[k].append(tp)

    def result(self) -> CellMAPResult:
        """Per-class AP and mAP over everything added so far."""
        ap = np.full(self.n_classes, np.nan)
        for k in range(self.n_classes):
            if self._n_true[k] == 0:
                continue
            s = np.concatenate(self._scores[k]) if self._scores[k] else np.zeros(0)
            t = np.concatenate(self._tp[k]) if self._tp[k] else np.zeros(0)
            ap[k] = detection_ap(s, t, int(self._n_true[k]))
        valid = self._n_true > 0
        m = float(np.nanmean(ap[valid])) if valid.any() else float("nan")
        return CellMAPResult(m, ap, self._n_true.copy(), self._n_images)


def _scores_from_table(table, image_id: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    rows = table[table["image_id"] == image_id]
    cols = [f"{prefix}{s}" for s in SHORT_NAMES]
    missing = [c for c in cols if c not in rows.columns]
    if missing:
        raise KeyError(f"per-cell table lacks the columns {missing[:3]}...; expected {prefix}<class short name>")
    return rows["cell_id"].to_numpy(np.int64), rows[cols].to_numpy(np.float64)


def cell_map(
    pred_masks: Mapping[str, np.ndarray],
    pred_table,
    true_masks: Mapping[str, np.ndarray],
    true_labels: Mapping[str, tuple[np.ndarray, np.ndarray]],
    score_prefix: str = "fused_",
    iou_threshold: float = KAGGLE_IOU,
    image_ids: Iterable[str] | None = None,
) -> CellMAPResult:
    """Kaggle 2021 cell-level mAP of a per-cell prediction table.

    Parameters
    ----------
    pred_masks
        ``{image id: (Y, X) predicted label image}``.
    pred_table
        Per-cell DataFrame with ``image_id``, ``cell_id`` and ``{score_prefix}{short name}`` columns.
    true_masks
        ``{image id: (Y, X) true label image}``.
    true_labels
        ``{image id: (true cell ids (m,), multi-hot labels (m, 19))}``.
    score_prefix
        Which scores to rank: ``"fused_"``, ``"cell_"`` or ``"image_"``.
    image_ids
        Images to evaluate (default: every image of ``true_masks``); an image without
        predictions contributes only false negatives.
    """
    acc = CellAPAccumulator(iou_threshold=iou_threshold)
    for iid in (image_ids if image_ids is not None else sorted(true_masks)):
        tmask = np.asarray(true_masks[iid])
        tids, tlab = true_labels[iid]
        if iid in pred_masks:
            pids, sc = _scores_from_table(pred_table, iid, score_prefix)
            pmask = np.asarray(pred_masks[iid])
        else:
            pids, sc = np.zeros(0, np.int64), np.zeros((0, N_CLASSES))
            pmask = np.zeros_like(tmask)
        acc.add(pmask, pids, sc, tmask, tids, tlab)
    return acc.result()


@dataclass
class PseudoLabelScores:
    """Precision / recall / F1 of cell pseudo-labels against cell truth.

    Attributes
    ----------
    precision, recall, f1 : float
        Micro-averaged over every (matched cell, class) pair.
    macro_f1 : float
        Mean F1 over the classes present in the truth or the pseudo-labels.
    per_class_f1 : numpy.ndarray
        (19,) F1 per class (NaN where the class appears in neither).
    n_cells : int
        Number of cells compared (pseudo-labelled cells matched to true cells).
    n_unmatched : int
        Pseudo-labelled cells without a true cell at the IoU threshold (not scored).
    """

    precision: float
    recall: float
    f1: float
    macro_f1: float
    per_class_f1: np.ndarray
    n_cells: int
    n_unmatched: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1,
                "macro_f1": self.macro_f1, "n_cells": self.n_cells, "n_unmatched": self.n_unmatched}


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def pseudo_label_scores(pred: np.ndarray, true: np.ndarray, n_unmatched: int = 0) -> PseudoLabelScores:
    """Compare multi-hot cell labels row by row.

    Parameters
    ----------
    pred, true
        (n_cells, 19) multi-hot pseudo-labels and true labels of the same cells (matched
        beforehand, e.g. with :func:`napari_cpgcn.evaluation.matching.match_labels`).
    n_unmatched
        Reported as is (cells that could not be compared).
    """
    pred = np.asarray(pred).astype(bool)
    true = np.asarray(true).astype(bool)
    if pred.shape != true.shape:
        raise ValueError(f"pseudo-labels {pred.shape} and truth {true.shape} differ in shape")
    tp = (pred & true).sum(0).astype(float)
    fp = (pred & ~true).sum(0).astype(float)
    fn = (~pred & true).sum(0).astype(float)
    p, r, f = _prf(tp.sum(), fp.sum(), fn.sum())
    per = np.full(pred.shape[1], np.nan)
    for k in range(pred.shape[1]):
        if tp[k] + fp[k] + fn[k] > 0:
            per[k] = _prf(tp[k], fp[k], fn[k])[2]
    macro = float(np.nanmean(per)) if np.isfinite(per).any() else 0.0
    return PseudoLabelScores(p, r, f, macro, per, int(pred.shape[0]), n_unmatched)


@dataclass
class CellTruth:
    """Per-cell ground truth of a folder (the synthetic generator's ``truth/``).

    Attributes
    ----------
    folder : Path
        Holds ``{image_id}_cells.png`` (or ``.tif``) masks and ``cells.csv``
        (``image_id,cell_id,labels`` with ``|``-joined class ids).
    labels : dict
        ``{image id: (cell ids (m,), multi-hot (m, 19))}``.
    """

    folder: Path
    labels: dict[str, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def load(cls, folder) -> CellTruth:
        """Read ``cells.csv`` of a truth folder (a data set root holding ``truth/`` works too)."""
        import csv

        folder = Path(folder)
        if not (folder / "cells.csv").is_file() and (folder / "truth" / "cells.csv").is_file():
            folder = folder / "truth"
        path = folder / "cells.csv"
        if not path.is_file():
            raise FileNotFoundError(
                f"no cell truth in {folder}: expected cells.csv (image_id,cell_id,labels) and "
                "{image_id}_cells.png masks, as `napari-cpgcn synth` writes under truth/")
        rows: dict[str, list[tuple[int, list[int]]]] = {}
        with open(path, newline="") as fh:
            for rec in csv.DictReader(fh):
                ks = [int(t) for t in str(rec["labels"]).split("|") if t.strip()]
                rows.setdefault(rec["image_id"], []).append((int(rec["cell_id"]), ks))
        labels = {}
        for iid, lst in rows.items():
            ids = np.array([c for c, _ in lst], np.int64)
            mh = np.zeros((len(lst), N_CLASSES), np.uint8)
            for r, (_, ks) in enumerate(lst):
                mh[r, ks] = 1
            labels[iid] = (ids, mh)
        return cls(folder, labels)

    @property
    def image_ids(self) -> list[str]:
        return sorted(self.labels)

    def mask(self, image_id: str) -> np.ndarray:
        """The (Y, X) true cell mask of one image."""
        from napari_cpgcn.io.masks import read_mask

        for ext in ("png", "tif", "tiff"):
            p = self.folder / f"{image_id}_cells.{ext}"
            if p.is_file():
                return read_mask(p)
        raise FileNotFoundError(f"no true cell mask {image_id}_cells.png/.tif in {self.folder}")

    def cell_labels(self, image_id: str, cell_ids: np.ndarray) -> np.ndarray:
        """Multi-hot truth rows for the given true cell ids (zeros for unknown ids)."""
        ids, mh = self.labels.get(image_id, (np.zeros(0, np.int64), np.zeros((0, N_CLASSES), np.uint8)))
        lut = {int(c): r for r, c in enumerate(ids)}
        out = np.zeros((len(cell_ids), N_CLASSES), np.uint8)
        for i, c in enumerate(cell_ids):
            r = lut.get(int(c))
            if r is not None:
                out[i] = mh[r]
        return out


def evaluate_pseudo_labels(table, masks_dir, truth: CellTruth, iou_threshold: float = KAGGLE_IOU
                           ) -> PseudoLabelScores:
    """Pseudo-label P/R/F1 of a pseudo-label table whose cells are the masks in ``masks_dir``.

    Each pseudo-labelled cell is matched to a true cell at IoU ≥ ``iou_threshold``; matched
    cells are compared class by class, unmatched ones are counted in ``n_unmatched``.
    """
    from napari_cpgcn.io.masks import read_mask
    from napari_cpgcn.training.pseudolabels import pseudo_label_matrix

    pred_rows, true_rows, unmatched = [], [], 0
    for iid, sub in table.groupby("image_id", sort=True):
        if iid not in truth.labels:
            continue
        pmask = read_mask(Path(masks_dir) / f"{iid}.tif")
        tmask = truth.mask(iid)
        pairs = dict(zip(*match_labels(pmask, tmask, iou_threshold)[:2], strict=True))
        mat = pseudo_label_matrix(sub)
        for r, cid in enumerate(sub["cell_id"].to_numpy()):
            t = pairs.get(int(cid))
            if t is None:
                unmatched += 1
                continue
            pred_rows.append(mat[r])
            true_rows.append(truth.cell_labels(iid, np.array([t]))[0])
    if not pred_rows:
        return pseudo_label_scores(np.zeros((0, N_CLASSES)), np.zeros((0, N_CLASSES)), unmatched)
    return pseudo_label_scores(np.stack(pred_rows), np.stack(true_rows), unmatched)


def evaluate_predictor(
    predictor,
    images_dir,
    image_ids,
    truth: CellTruth,
    *,
    segmentation: str | None = None,
    use_true_cells: bool = False,
    iou_threshold: float = KAGGLE_IOU,
    progress=None,
    tables: list | None = None,
    masks: dict | None = None,
) -> dict[str, CellMAPResult]:
    """Kaggle cell-level mAP of a trained pipeline on images with cell truth.

    Parameters
    ----------
    predictor
        A :class:`napari_cpgcn.pipeline.Predictor` (anything with its ``predict``).
    images_dir, image_ids
        The evaluation images.
    truth
        Their :class:`CellTruth`.
    segmentation
        Segmentation method (None: the run's own).
    use_true_cells
        Predict on the true cell masks (isolates classification from segmentation errors).
    progress
        tqdm-like (``update(1)`` per image) or None.
    tables
        When a list is given, each image's per-cell prediction table is appended to it.
    masks
        When a dict is given, each image's predicted cell mask is stored in it by image id.

    Returns
    -------
    dict
        ``{"fused": .., "cell": .., "image": ..}`` :class:`CellMAPResult` for the three scores.
    """
    from napari_cpgcn.io.hpa import read_image

    accs = {k: CellAPAccumulator(iou_threshold=iou_threshold) for k in SCORE_KINDS}
    for iid in image_ids:
        img = read_image(images_dir, image_id=iid)
        tmask = truth.mask(iid)
        out = predictor.predict(img, cells=tmask if use_true_cells else None, segmentation=segmentation,
                                with_cams=False)
        _add_image(accs, truth, iid, out.cells, out.table, tmask)
        if tables is not None:
            tables.append(out.table)
        if masks is not None:
            masks[iid] = out.cells
        if progress is not None:
            progress.update(1)
    return {k: acc.result() for k, acc in accs.items()}


#: The three per-cell scores of a prediction table: fused (image × cell), cell model, image model.
SCORE_KINDS = ("fused", "cell", "image")


def _add_image(accs: Mapping[str, CellAPAccumulator], truth: CellTruth, image_id: str, cells: np.ndarray,
               table, true_mask: np.ndarray) -> None:
    tids, tlab = truth.labels.get(image_id, (np.zeros(0, np.int64), np.zeros((0, N_CLASSES), np.uint8)))
    pids = table["cell_id"].to_numpy(np.int64)
    for k, acc in accs.items():
        sc = table[[f"{k}_{s}" for s in SHORT_NAMES]].to_numpy(np.float64)
        acc.add(cells, pids, sc, true_mask, tids, tlab)


def evaluate_prediction_folder(pred_dir: str | Path, truth: CellTruth, image_ids: Iterable[str] | None = None,
                               iou_threshold: float = KAGGLE_IOU, extra_scores: Mapping | None = None
                               ) -> dict[str, CellMAPResult]:
    """Kaggle cell-level mAP of a finished ``napari-cpgcn predict`` folder (``cells.csv`` +
    ``masks/``) against cell truth, for the fused, cell-model and image-model scores.

    ``image_ids`` default: every image of the truth; an image without a prediction counts its
    true cells as missed. ``extra_scores``: ``{name: f(table) -> (n, 19) scores}`` evaluated too
    (e.g. the paper's product ``image × cell`` when the run fuses otherwise), given the
    ``{name}_S`` columns they produce.
    """
    import pandas as pd

    from napari_cpgcn.io.masks import read_mask

    pred_dir = Path(pred_dir)
    cells = pd.read_csv(pred_dir / "cells.csv")
    by_image = dict(tuple(cells.groupby("image_id", sort=False)))
    extra = dict(extra_scores or {})
    accs = {k: CellAPAccumulator(iou_threshold=iou_threshold) for k in (*SCORE_KINDS, *extra)}
    for iid in (list(image_ids) if image_ids is not None else truth.image_ids):
        tmask = truth.mask(iid)
        mask_file = pred_dir / "masks" / f"{iid}.tif"
        rows = by_image.get(iid)
        if rows is None or not mask_file.is_file():
            rows, pmask = cells.iloc[:0], np.zeros_like(tmask)
        else:
            pmask = read_mask(mask_file)
        if extra:
            rows = rows.copy()
            for name, f in extra.items():
                scores = np.asarray(f(rows), dtype=np.float64).reshape(len(rows), N_CLASSES)
                for k, short in enumerate(SHORT_NAMES):
                    rows[f"{name}_{short}"] = scores[:, k]
        _add_image(accs, truth, iid, pmask, rows, tmask)
    return {k: acc.result() for k, acc in accs.items()}
