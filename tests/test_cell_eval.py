"""Kaggle 2021 cell-level metric and pseudo-label scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cpgcn.classes import N_CLASSES, SHORT_NAMES
from napari_cpgcn.evaluation.cell import (
    CellAPAccumulator,
    cell_map,
    detection_ap,
    pseudo_label_scores,
)
from napari_cpgcn.evaluation.matching import iou_matrix, match_labels


def _onehot(*ks):
    v = np.zeros(N_CLASSES, np.uint8)
    v[list(ks)] = 1
    return v


def _image():
    """True cells A (id 1, class 0) and B (id 2, class 1) in a 40x60 image."""
    true = np.zeros((40, 60), np.uint32)
    true[2:18, 2:22] = 1
    true[20:38, 30:58] = 2
    return true


def test_iou_matrix_and_matching():
    true = _image()
    pred = np.zeros_like(true)
    pred[2:18, 2:20] = 7          # 288 / 320 of cell 1 -> IoU 0.9
    pred[20:38, 30:40] = 9        # 180 / 504 of cell 2 -> IoU < 0.6
    iou, pids, tids = iou_matrix(pred, true)
    assert list(pids) == [7, 9] and list(tids) == [1, 2]
    assert iou[0, 0] == pytest.approx(288 / 320)
    assert iou[1, 1] == pytest.approx(180 / 504)
    assert iou[0, 1] == 0
    pids, tids, ious = match_labels(pred, true)
    assert list(pids) == [7] and list(tids) == [1] and ious[0] == pytest.approx(0.9)


def test_average_precision_hand_computed():
    # TP, FP, TP with 2 true: precision 1, .5, .667 at recall .5, .5, 1 -> .5*1 + .5*2/3
    assert detection_ap(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1]), 2) == pytest.approx(0.5 + 1 / 3)
    # a missed true instance caps recall
    assert detection_ap(np.array([0.9]), np.array([1]), 2) == pytest.approx(0.5)
    assert detection_ap(np.zeros(0), np.zeros(0), 3) == 0.0
    assert np.isnan(detection_ap(np.array([0.5]), np.array([0]), 0))


def _table(image_id, ids, scores, prefix="fused_"):
    df = pd.DataFrame({"image_id": image_id, "cell_id": ids})
    for k, s in enumerate(SHORT_NAMES):
        df[f"{prefix}{s}"] = [sc[k] for sc in scores]
    return df


def test_perfect_predictions_give_one():
    true = _image()
    labels = np.stack([_onehot(0, 4), _onehot(1)])
    # Predicted ids differ from the true ids: matching is by overlap, not by id.
    pred = np.where(true == 1, 5, np.where(true == 2, 3, 0)).astype(np.uint32)
    scores = [labels[0] * 0.9 + 0.01, labels[1] * 0.8 + 0.02]
    res = cell_map({"a": pred}, _table("a", [5, 3], scores), {"a": true},
                   {"a": (np.array([1, 2]), labels)})
    assert res.map == pytest.approx(1.0)
    assert set(np.flatnonzero(res.n_true)) == {0, 1, 4}
    assert np.isnan(res.ap[2])


def test_hand_computed_case():
    """Two images; hand-computed AP per class.

    Image a: true A (class 0), B (class 1); predictions A' (=A), B' (=B), C' (no true cell).
    Image b: true D (class 0); prediction D'' covering D with IoU < 0.6.

    class 0 (2 true: A, D): scores B' .9 FP, A' .5 TP, D'' .4 FP (IoU .5), C' .2 FP
        precision 0, .5, .33, .25 at recall 0, .5, .5, .5 -> AP = .5 * .5 = .25
    class 1 (1 true: B): C' .8 FP, B' .7 TP, A' .6 FP, D'' .1 FP -> AP = 1 * .5 = .5
    mAP = (.25 + .5) / 2 = .375
    """
    true_a = _image()
    pred_a = true_a.copy()
    pred_a[25:35, 2:20] = 3  # C'
    true_b = np.zeros((40, 60), np.uint32)
    true_b[5:35, 5:35] = 1
    pred_b = np.zeros_like(true_b)
    pred_b[5:35, 5:20] = 1  # IoU 0.5

    def sc(c0, c1):
        v = np.zeros(N_CLASSES)
        v[0], v[1] = c0, c1
        return v

    table = pd.concat([
        _table("a", [1, 2, 3], [sc(0.5, 0.6), sc(0.9, 0.7), sc(0.2, 0.8)]),
        _table("b", [1], [sc(0.4, 0.1)]),
    ])
    res = cell_map({"a": pred_a, "b": pred_b}, table, {"a": true_a, "b": true_b},
                   {"a": (np.array([1, 2]), np.stack([_onehot(0), _onehot(1)])),
                    "b": (np.array([1]), np.stack([_onehot(0)]))})
    assert res.n_true[0] == 2 and res.n_true[1] == 1
    assert res.ap[0] == pytest.approx(0.25)
    assert res.ap[1] == pytest.approx(0.5)
    assert res.map == pytest.approx((0.25 + 0.5) / 2)
    assert res.n_images == 2


def test_missed_cell_and_wrong_cell():
    """Only A is predicted: class 0 is perfect, class 1's only detection (A at score 0) misses B."""
    true = _image()
    acc = CellAPAccumulator()
    scores = np.zeros((1, N_CLASSES))
    scores[0, 0] = 0.9
    acc.add(true, [1], scores, true, [1, 2], np.stack([_onehot(0), _onehot(1)]))
    res = acc.result()
    assert res.ap[0] == pytest.approx(1.0)
    assert res.ap[1] == pytest.approx(0.0)
    assert res.map == pytest.approx(0.5)


def test_pseudo_label_scores():
    pred = np.stack([_onehot(0), _onehot(0, 1), _onehot(18)])
    true = np.stack([_onehot(0), _onehot(0), _onehot(2)])
    s = pseudo_label_scores(pred, true)
    # tp = 2 (cell 0 class 0, cell 1 class 0), fp = 2 (cell 1 class 1, cell 2 class 18), fn = 1
    assert s.precision == pytest.approx(0.5)
    assert s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert s.per_class_f1[0] == pytest.approx(1.0)
    assert s.per_class_f1[1] == 0.0 and np.isnan(s.per_class_f1[5])
    assert s.n_cells == 3
