"""Per-cell pseudo-labels from CAMs."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cpgcn.classes import N_CLASSES, NEGATIVE
from napari_cpgcn.training.pseudolabels import (
    PseudoLabelConfig,
    combine_scores,
    image_pseudo_labels,
    pseudo_label_matrix,
    read_pseudolabels,
    write_pseudolabels,
)


def _two_cells():
    """A 64x64 image with cell 1 on the left and cell 2 on the right."""
    cells = np.zeros((64, 64), np.uint32)
    cells[8:56, 4:28] = 1
    cells[8:56, 36:60] = 2
    return cells


def _labels(*ks):
    v = np.zeros(N_CLASSES, np.uint8)
    v[list(ks)] = 1
    return v


def test_cam_covering_one_cell():
    """Image labels {0 nucleoplasm, 14 mitochondria}; the class-14 CAM covers only cell 2,
    the class-0 CAM covers both: cell 1 -> {0}, cell 2 -> {0, 14}. CAMs are low-resolution."""
    cells = _two_cells()
    cams = np.zeros((N_CLASSES, 8, 8), np.float32)
    cams[0, 1:7, :] = 1.0            # both cells
    cams[14, 1:7, 4:8] = 3.0         # right half only (raw scale does not matter)
    probs = np.full(N_CLASSES, 0.05)
    probs[[0, 14]] = 0.95
    table = image_pseudo_labels("img", cells, _labels(0, 14), probs, cams)
    assert list(table["cell_id"]) == [1, 2]
    assert list(table["labels"]) == ["0", "0|14"]
    mat = pseudo_label_matrix(table)
    assert mat.shape == (2, N_CLASSES)
    assert mat[0].tolist() == _labels(0).tolist()
    assert mat[1].tolist() == _labels(0, 14).tolist()
    # soft scores: the most activated cell gets 1 for each positive class
    assert table.loc[1, "soft_mitochondria"] == pytest.approx(1.0)
    assert table.loc[0, "soft_mitochondria"] < 0.2
    assert table.loc[0, "soft_cytosol"] == 0.0  # not an image label
    assert table["area"].tolist() == [48 * 24, 48 * 24]


def test_negative_cells_and_images():
    cells = _two_cells()
    cams = np.zeros((N_CLASSES, 8, 8), np.float32)
    cams[5, 1:7, 4:8] = 1.0
    probs = np.full(N_CLASSES, 0.9)
    table = image_pseudo_labels("img", cells, _labels(5), probs, cams)
    assert list(table["labels"]) == [str(NEGATIVE), "5"]
    assert table.loc[0, "soft_negative"] > 0.8
    neg = image_pseudo_labels("img", cells, _labels(NEGATIVE), probs, cams)
    assert list(neg["labels"]) == [str(NEGATIVE)] * 2


def test_unsure_image_model_falls_back_to_image_label():
    """With p -> 0 the CAM is not trusted: every cell keeps the image label (mixture rule);
    the product rule instead drops the class."""
    cells = _two_cells()
    cams = np.zeros((N_CLASSES, 8, 8), np.float32)
    cams[7, 1:7, 4:8] = 1.0
    probs = np.zeros(N_CLASSES)
    probs[7] = 0.1
    t = image_pseudo_labels("img", cells, _labels(7), probs, cams)
    assert list(t["labels"]) == ["7", "7"]
    t = image_pseudo_labels("img", cells, _labels(7), probs, cams, PseudoLabelConfig(rule="product"))
    assert list(t["labels"]) == [str(NEGATIVE)] * 2


def test_oaa_mapping_and_missing_maps():
    cells = _two_cells()
    oaa = {3: np.array([[0.0, 1.0]])}  # 1x2 map: right half
    probs = np.full(N_CLASSES, 0.99)
    t = image_pseudo_labels("img", cells, _labels(3, 16), probs, oaa)
    # class 3 localised on cell 2; class 16 has no map -> every cell
    assert list(t["labels"]) == ["16", "3|16"]


def test_combine_scores_rules():
    act = np.array([0.2, 0.4])
    np.testing.assert_allclose(combine_scores(act, 1.0, PseudoLabelConfig()), [0.5, 1.0])
    np.testing.assert_allclose(combine_scores(act, 0.5, PseudoLabelConfig()), [0.75, 1.0])
    np.testing.assert_allclose(combine_scores(act, 0.5, PseudoLabelConfig(rule="product")), [0.25, 0.5])
    np.testing.assert_allclose(combine_scores(act, 0.5, PseudoLabelConfig(rule="cam", relative=False)), act)
    with pytest.raises(ValueError):
        PseudoLabelConfig(rule="nope")


def test_write_read_round_trip(tmp_path):
    cells = _two_cells()
    cams = np.random.default_rng(0).random((N_CLASSES, 8, 8))
    t = image_pseudo_labels("img", cells, _labels(0, 2), np.full(N_CLASSES, 0.8), cams)
    write_pseudolabels(tmp_path / "p.csv", t)
    back = read_pseudolabels(tmp_path / "p.csv")
    np.testing.assert_array_equal(pseudo_label_matrix(back), pseudo_label_matrix(t))
    assert back["image_id"].tolist() == ["img", "img"]


def test_empty_segmentation():
    t = image_pseudo_labels("img", np.zeros((16, 16), np.uint32), _labels(0), np.ones(N_CLASSES), None)
    assert len(t) == 0
