"""Per-(cell, class) uncertainty: columns in every per-cell table, finite and in [0, 1]."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cpgcn.classes import SHORT_NAMES
from napari_cpgcn.pipeline import uncertainty as U

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNC = [f"unc_{s}" for s in SHORT_NAMES]


def test_views_are_dihedral_and_invertible():
    x = np.arange(2 * 4 * 5 * 5, dtype=np.float32).reshape(2, 4, 5, 5)
    for v in U._ALL_VIEWS:
        y = U.augment_crops(x, v)
        assert y.shape == x.shape
        assert sorted(y.ravel()) == sorted(x.ravel())
    assert not np.array_equal(U.augment_crops(x, "rot90"), x)
    with pytest.raises(ValueError, match="unknown view"):
        U.augment_crops(x, "shear")


def test_uncertainty_measures_are_bounded_and_ordered():
    p = np.array([[0.0, 0.5, 1.0, 0.9]], np.float32)
    h = U.binary_entropy(p)
    assert h[0, 1] == pytest.approx(1.0) and h[0, 0] < 1e-4 and h[0, 2] < 1e-4
    spread = U.tta_uncertainty(np.array([[[0.0]], [[1.0]]], np.float32))
    assert spread[0, 0] == pytest.approx(1.0)          # the views disagree completely
    c = U.combine(p, np.array([[0, 0, 0.5, 0]], np.float32))
    assert np.all((c >= 0) & (c <= 1))
    assert c[0, 2] == pytest.approx(0.5, abs=1e-3)     # confident but unstable under flips
    assert c[0, 1] > c[0, 3] > c[0, 0]                 # nearer 0.5 → less sure
    assert U.disagreement(np.array([0.9, 0.1]), np.array([[0.1, 0.1]]))[0].tolist() == pytest.approx([0.8, 0.0])


def test_predictor_table_has_uncertainty_columns(tiny_trained, tiny_data):
    from napari_cpgcn.io.celltable import PREDICTION_COLUMNS
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.pipeline.predictor import CPGCNPredictor

    run, _ = tiny_trained
    pred = CPGCNPredictor.from_run(run, device="cpu")
    img = read_image(tiny_data / "images", image_id=sorted(p.name.split("_")[0] for p in
                                                          (tiny_data / "images").glob("*_green.png"))[0])
    out = pred.predict(img, with_cams=False)
    assert list(out.table.columns) == list(PREDICTION_COLUMNS)
    assert len(out.table) > 0
    u = out.table[UNC].to_numpy()
    assert np.isfinite(u).all() and (u >= 0).all() and (u <= 1).all()
    np.testing.assert_allclose(out.table["uncertainty"], u.max(1), rtol=1e-6)
    # The spread is real: where the image and cell models disagree a (cell, class) is more
    # uncertain than the entropy of its fused probability alone says.
    plain = U.combine(out.fused_probs, np.zeros_like(u))
    assert (u >= plain - 1e-6).all()
    assert (u > plain + 1e-4).any()
    np.testing.assert_allclose(u, U.combine(out.fused_probs, U.disagreement(out.image_probs, out.cell_probs)),
                               atol=1e-6)
    # test-time augmentation: the cell model is not flip-invariant, so its views disagree
    pred.uncertainty = "tta"
    try:
        tta = pred.predict(img, cells=out.cells, with_cams=False)
    finally:
        pred.uncertainty = "disagreement"
    ut = tta.table[UNC].to_numpy()
    assert np.isfinite(ut).all() and (ut >= 0).all() and (ut <= 1).all()
    np.testing.assert_allclose(tta.cell_probs, out.cell_probs, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ut, u)
    # the identity view reproduces the plain cell probabilities
    from napari_cpgcn.io.celltable import cell_geometry

    geo = cell_geometry(out.cells, out.image_id)
    np.testing.assert_allclose(pred.predict_cells(img.data, out.cells, geo), out.cell_probs, rtol=1e-5, atol=1e-6)


def test_uncertainty_in_cells_csv_and_layer_features(tiny_trained, tiny_data, tmp_path):
    from napari_cpgcn._napari.layers import cell_features
    from napari_cpgcn.batch import BatchOptions, run_predict_folder

    run, _ = tiny_trained
    out = tmp_path / "pred"
    run_predict_folder(tiny_data / "images", run, out, BatchOptions(batch_size=1, workers=1, device="cpu"))
    cells = pd.read_csv(out / "cells.csv")
    assert set(UNC + ["uncertainty"]) <= set(cells.columns)
    vals = cells[UNC + ["uncertainty"]].to_numpy()
    assert np.isfinite(vals).all() and vals.min() >= 0 and vals.max() <= 1
    feats = cell_features(cells[cells.image_id == cells.image_id.iloc[0]])
    assert set(UNC + ["uncertainty"]) <= set(feats.columns)
    assert np.isfinite(feats[UNC].to_numpy()).all()


def test_calibration_functions_and_evaluate_reliability_png(tiny_trained, tiny_data, tmp_path):
    import json

    from napari_cpgcn.cli import main
    from napari_cpgcn.evaluation.calibration import (
        apply_temperature,
        expected_calibration_error,
        fit_temperature,
    )

    rng = np.random.default_rng(0)
    p = rng.random(4000)
    y = (rng.random(4000) < p).astype(float)            # calibrated by construction
    assert expected_calibration_error(p, y) < 0.03
    over = apply_temperature(p, 0.3)                     # over-confident version of the same
    assert expected_calibration_error(over, y) > 0.08
    t = fit_temperature(over, y)
    assert 2.8 < t < 4.0                                 # the fitted temperature undoes it (1 / 0.3)
    assert expected_calibration_error(apply_temperature(over, t), y) < 0.03
    run, _ = tiny_trained
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--data", str(tiny_data / "images"), "--labels",
                 str(tiny_data / "train.csv"), "--truth", str(tiny_data / "truth"), "--levels", "cell",
                 "--true-cells", "--device", "cpu", "--out", str(out), "-q"]) == 0
    assert (out / "cell_reliability.png").stat().st_size > 1000
    s = json.loads((out / "summary.json").read_text())
    assert 0 <= s["cell_ece_fused"] <= 1
