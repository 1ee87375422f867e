"""Image-level AP / mAP, charts, and the ``evaluate`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_cpgcn.evaluation.image import (
    ap_table,
    average_precision,
    mean_average_precision,
    per_class_ap,
    plot_ap_bars,
    plot_pr_curves,
)


def test_ap_hand_computed():
    # ranks: + - + -  -> precision at the positives 1/1 and 2/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    assert average_precision([0, 0, 1], [0.9, 0.8, 0.1]) == pytest.approx(1 / 3)
    # ties share one threshold
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_map_is_macro_over_present_classes():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    s = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.2], [0.7, 0.3, 0.1]])
    ap = per_class_ap(y, s)
    assert ap[0] == pytest.approx(1.0) and np.isnan(ap[2])
    # class 1: ranks 0.8(+) 0.3(+) 0.1(-) -> 1.0
    assert mean_average_precision(y, s) == pytest.approx(np.mean(ap[:2]))
    df = ap_table(y, s, ["a", "b", "c"])
    assert list(df["class"]) == ["a", "b", "c", "mAP"] and df["n_positive"].tolist()[:3] == [2, 2, 0]
    with pytest.raises(ValueError):
        per_class_ap(y, s[:, :2])
    assert np.isnan(mean_average_precision(np.zeros((2, 2)), np.ones((2, 2))))


def test_charts_written(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (30, 19))
    y[:, 5] = 0
    s = rng.random((30, 19))
    ap = per_class_ap(y, s)
    p1 = plot_ap_bars(ap, tmp_path / "ap.png")
    p2 = plot_pr_curves(y, s, tmp_path / "pr.png")
    p3 = plot_ap_bars(ap, tmp_path / "cmp.png", compare={"cnn": ap * 0.9, "cpgcn": ap})
    for p in (p1, p2, p3):
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_cli(tmp_path):
    from _tiny_hpa import make_tiny_dataset

    from napari_cpgcn.cli import main

    img_dir, csv = make_tiny_dataset(tmp_path / "data", n_images=8, size=64)
    run = tmp_path / "run"
    assert main(["train-image", str(img_dir), "--labels", str(csv), "--out", str(run), "--backbone",
                 "mobilenet_v3_small", "--epochs", "1", "--batch-size", "4", "--image-size", "64",
                 "--device", "cpu", "--imagenet-weights", "none", "-q"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--data", str(img_dir), "--labels", str(csv),
                 "--out", str(out), "-q"]) == 0
    for f in ("image_ap.csv", "image_ap.png", "image_pr.png", "image_predictions.csv", "summary.json"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["image_mAP"] <= 1 and summary["image_n_images"] == 8
    import pandas as pd

    pred = pd.read_csv(out / "image_predictions.csv")
    assert len(pred) == 8 and "image_nucleoplasm" in pred.columns
    # the numbers in the table are the ones the library computes from the predictions
    from napari_cpgcn.io.tables import read_labels_csv

    table = read_labels_csv(csv).subset(pred["image_id"].tolist())
    cols = [c for c in pred.columns if c != "image_id"]
    m = mean_average_precision(table.labels, pred[cols].to_numpy())
    assert summary["image_mAP"] == pytest.approx(m, abs=1e-5)
    # validation split only
    assert main(["evaluate", "--run", str(run), "--data", str(img_dir), "--labels", str(csv),
                 "--out", str(tmp_path / "ev2"), "--split", "val", "-q"]) == 0
    n_val = len(json.loads((run / "split.json").read_text())["val"])
    assert json.loads((tmp_path / "ev2" / "summary.json").read_text())["image_n_images"] == n_val
    # a foreign checkpoint is a clean failure
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert main(["evaluate", "--run", str(tmp_path / "bad.pt"), "--data", str(img_dir), "--labels", str(csv),
                 "--out", str(tmp_path / "ev3"), "-q"]) == 1
