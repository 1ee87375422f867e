"""Per-cell profiles: embeddings (predictor, folder parts, cells.h5ad) and single-cell variation."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from napari_cpgcn.classes import N_CLASSES, SHORT_NAMES
from napari_cpgcn.profiles.variation import (
    VARIATION_COLUMNS,
    VariationParams,
    cell_green_means,
    image_variation,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------- variation


def _split_image():
    """10 cells in a row; class 3 expressed (fused 0.9) by cells 1-4 only, at green 0.2/0.4 alternately."""
    cells = np.zeros((20, 100), np.uint32)
    data = np.zeros((4, 20, 100), np.uint8)
    for k in range(10):
        cells[5:15, k * 10 + 1:k * 10 + 9] = k + 1
        data[1, 5:15, k * 10 + 1:k * 10 + 9] = 51 if k % 2 == 0 else 102  # 0.2 / 0.4 of 255
    fused = np.full((10, N_CLASSES), 0.05)
    fused[:4, 3] = 0.9
    fused[:, 5] = 0.8  # every cell expresses class 5
    probs = np.full(N_CLASSES, 0.05)
    probs[[3, 5]] = [0.7, 0.95]
    return data, cells, fused, probs


def test_cell_green_means_are_per_cell_means():
    data, cells, _, _ = _split_image()
    g = cell_green_means(data, cells, np.arange(1, 11))
    np.testing.assert_allclose(g, [0.2, 0.4] * 5, atol=1e-6)
    assert cell_green_means(data, cells, []).shape == (0,)


def test_variation_of_a_known_split():
    data, cells, fused, probs = _split_image()
    green = cell_green_means(data, cells, np.arange(1, 11))
    v = image_variation("img", fused, probs, green)
    assert list(v.columns) == list(VARIATION_COLUMNS)
    assert list(v["class"]) == [SHORT_NAMES[5], SHORT_NAMES[3]]  # predicted classes, best first
    r3 = v[v["class"] == SHORT_NAMES[3]].iloc[0]
    assert r3.n_cells == 10 and r3.n_expressing == 4 and r3.share_expressing == pytest.approx(0.4)
    g = np.array([0.2, 0.4, 0.2, 0.4])
    assert r3.intensity_cv == pytest.approx(g.std(ddof=1) / g.mean(), rel=1e-5)
    assert bool(r3.variable)  # 40 % of the cells of a class predicted for the image
    r5 = v[v["class"] == SHORT_NAMES[5]].iloc[0]
    assert r5.share_expressing == 1.0 and r5.intensity_cv == pytest.approx(
        np.array([0.2, 0.4] * 5).std(ddof=1) / 0.3, rel=1e-5)
    assert not bool(r5.variable)  # everyone expresses it, CV 0.35 < 0.5
    assert bool(image_variation("img", fused, probs, green, VariationParams(max_cv=0.3)).variable.all())


def test_variation_matches_the_synthetic_truth():
    """Fused scores equal to the generator's per-cell truth give its expressing share exactly."""
    from napari_cpgcn.io.celltable import cell_ids
    from napari_cpgcn.synth import generate_image

    im = generate_image(5, size=128, heterogeneity=0.8)
    ids = cell_ids(im.cells)
    sets = im.cell_label_sets()
    fused = np.zeros((len(ids), N_CLASSES))
    for r, c in enumerate(ids):
        for k in sets.get(int(c), set()):
            fused[r, k] = 1.0
    labels = [int(k) for k in np.flatnonzero(im.image_labels) if k != 18]
    v = image_variation("s", fused, np.ones(N_CLASSES), cell_green_means(im.data, im.cells, ids), classes=labels)
    for k, row in zip(labels, v.itertuples(index=False), strict=True):
        truth = np.mean([k in sets.get(int(c), set()) for c in ids])
        assert row.share_expressing == pytest.approx(truth)


def test_variation_rejects_bad_input():
    with pytest.raises(ValueError, match="2 green intensities for 3 cells"):
        image_variation("x", np.zeros((3, N_CLASSES)), np.ones(N_CLASSES), np.zeros(2))
    with pytest.raises(ValueError, match="threshold"):
        VariationParams(threshold=2)


# ------------------------------------------------------------------------------- embeddings


def test_predictor_embeddings_are_optional(tiny_data, tiny_trained):
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.pipeline import load_predictor

    run, _ = tiny_trained
    pred = load_predictor(run, device="cpu")
    iid = sorted(p.name.rsplit("_", 1)[0] for p in (tiny_data / "images").glob("*_green.png"))[0]
    image = read_image(tiny_data / "images", image_id=iid)
    plain = pred.predict(image, with_cams=False)
    assert plain.embeddings is None
    assert plain.green_mean is not None and len(plain.green_mean) == len(plain.table)
    withe = pred.predict(image, with_cams=False, with_embeddings=True)
    assert withe.embeddings.shape == (len(withe.table), pred.cell_model.backbone.out_channels)
    assert withe.embeddings.dtype == np.float32 and np.isfinite(withe.embeddings).all()
    # the same forward pass: the probabilities do not change
    np.testing.assert_allclose(withe.cell_probs, plain.cell_probs, atol=1e-6)


def test_predict_embeddings_h5ad_round_trip_with_a_failing_image(tiny_data, tiny_trained, tmp_path):
    import anndata as ad

    from napari_cpgcn.cli import EXIT_PARTIAL, main

    run, _ = tiny_trained
    images = tmp_path / "images"
    shutil.copytree(tiny_data / "images", images)
    ids = sorted({p.name.rsplit("_", 1)[0] for p in images.glob("*.png")})
    bad = ids[2]
    (images / f"{bad}_green.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00truncated")
    out = tmp_path / "out"
    argv = ["predict", str(images), "--model", str(run), "--out", str(out), "--device", "cpu",
            "--threads", "1", "--embeddings", "--umap", "--quiet"]
    assert main(argv) == EXIT_PARTIAL
    good = [i for i in ids if i != bad]
    assert sorted(p.stem for p in (out / "embeddings").glob("*.npy")) == good
    assert list(pd.read_csv(out / "failures.csv").image_id) == [bad]

    cells = pd.read_csv(out / "cells.csv")
    a = ad.read_h5ad(out / "cells.h5ad")
    assert a.n_obs == len(cells) > 0
    assert list(a.obs["image_id"]) == list(cells.image_id.astype(str))
    assert list(a.obs["cell_id"]) == list(cells.cell_id)
    assert list(a.obs_names) == [f"{i}:{c}" for i, c in zip(cells.image_id, cells.cell_id, strict=True)]
    np.testing.assert_allclose(a.obs[f"fused_{SHORT_NAMES[0]}"], cells[f"fused_{SHORT_NAMES[0]}"], rtol=1e-5)
    assert list(a.obs["top_class"].astype(str)) == list(cells.top_class)
    assert a.obsm["X_cpgcn"].shape[0] == a.n_obs and a.obsm["X_cpgcn"].shape[1] > 0
    assert a.obsm["X_umap"].shape == (a.n_obs, 2) and np.isfinite(a.obsm["X_umap"]).all()
    assert list(a.var_names) == list(SHORT_NAMES)
    assert a.uns["cpgcn"]["short_names"].tolist() == list(SHORT_NAMES)
    assert a.uns["cpgcn"]["run"]["embeddings"]
    # the per-image embeddings are the rows of the h5ad, in the order of cells.csv
    first = np.load(out / "embeddings" / f"{good[0]}.npy")
    np.testing.assert_allclose(a.obsm["X_cpgcn"][:len(first)], first)
    # variation.csv: one row per finished image and predicted class
    var = pd.read_csv(out / "variation.csv")
    assert list(var.columns) == list(VARIATION_COLUMNS) and set(var.image_id.astype(str)) == set(good)

    # resuming: the finished images are skipped, the failed one failed again, same h5ad rows
    assert main(argv) == EXIT_PARTIAL
    b = ad.read_h5ad(out / "cells.h5ad")
    assert list(b.obs_names) == list(a.obs_names)
    np.testing.assert_allclose(b.obsm["X_cpgcn"], a.obsm["X_cpgcn"])
    np.testing.assert_allclose(b.obsm["X_umap"], a.obsm["X_umap"])  # seeded: the same layout


def test_umap_without_embeddings_is_a_usage_error(tmp_path, tiny_trained):
    from napari_cpgcn.cli import EXIT_USAGE, main

    run, _ = tiny_trained
    (tmp_path / "in").mkdir()
    assert main(["predict", str(tmp_path / "in"), "--model", str(run), "--out", str(tmp_path / "o"),
                 "--umap", "--quiet"]) == EXIT_USAGE


def test_assemble_refuses_parts_without_embeddings(tmp_path):
    from _fake_predictor import ThresholdPredictor
    from _fake_predictor import write_image as _write_image

    from napari_cpgcn.batch import BatchOptions, run_predict_folder
    from napari_cpgcn.profiles.embeddings import assemble_h5ad

    rng = np.random.default_rng(0)
    for i in range(2):
        _write_image(tmp_path / "images", f"img{i}", rng)
    out = tmp_path / "out"
    s = run_predict_folder(tmp_path / "images", ThresholdPredictor(), out, BatchOptions(workers=1))
    assert s.n_done == 2 and (out / "variation.csv").is_file()
    with pytest.raises(FileNotFoundError, match="without --embeddings"):
        assemble_h5ad(out, ["img0", "img1"])
    # a predictor that gives no embeddings: every image is a clear failure, not a crash
    s = run_predict_folder(tmp_path / "images", ThresholdPredictor(), tmp_path / "o2",
                           BatchOptions(workers=1, embeddings=True))
    assert s.n_failed == 2


def test_compute_umap_is_seeded():
    from napari_cpgcn.profiles.embeddings import compute_umap

    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    np.testing.assert_allclose(compute_umap(x, seed=1), compute_umap(x, seed=1))
    with pytest.raises(ValueError, match="at least 4 cells"):
        compute_umap(x[:3])


def test_embeddings_on_a_local_dask_cluster_equal_serial(tmp_path):
    """The Dask engine writes the same embeddings and cells.h5ad as the in-process one."""
    pytest.importorskip("distributed")
    import anndata as ad
    from _fake_predictor import EmbeddingThresholdPredictor
    from _fake_predictor import write_image as _write_image

    from napari_cpgcn.batch import BatchOptions, run_predict_folder
    from napari_cpgcn.batch.dask import predict_folder_distributed
    from napari_cpgcn.events import EventKind

    rng = np.random.default_rng(1)
    for i in range(4):
        _write_image(tmp_path / "images", f"img{i}", rng)
    opts = BatchOptions(workers=1, embeddings=True)
    s = run_predict_folder(tmp_path / "images", EmbeddingThresholdPredictor(), tmp_path / "serial", opts)
    assert (s.n_done, s.n_failed) == (4, 0)
    events = list(predict_folder_distributed(tmp_path / "images", EmbeddingThresholdPredictor(), tmp_path / "dist",
                                             opts, cluster="local:2"))
    assert events[-1].kind == EventKind.DONE and events[-1].result.n_done == 4
    a, b = (ad.read_h5ad(tmp_path / d / "cells.h5ad") for d in ("serial", "dist"))
    assert a.n_obs == len(pd.read_csv(tmp_path / "serial" / "cells.csv")) > 0
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(a.obsm["X_cpgcn"], b.obsm["X_cpgcn"])
    assert a.obsm["X_cpgcn"].shape[1] == 5
    assert (tmp_path / "dist" / "variation.csv").read_bytes() == (tmp_path / "serial" / "variation.csv").read_bytes()


def test_variation_can_use_the_cell_score():
    """score='cell' decides expression by the cell model's probability, not the fused one."""
    from napari_cpgcn.pipeline.predictor import CellPrediction
    from napari_cpgcn.profiles.variation import variation_of_prediction

    data, cells, _, _ = _split_image()
    image_probs = np.full(N_CLASSES, 0.05)
    image_probs[3] = 0.6
    cell_probs = np.full((10, N_CLASSES), 0.05)
    cell_probs[:6, 3] = 0.7  # fused 0.42 < 0.5: no cell by the fused score, 6 by the cell score
    pred = CellPrediction.from_parts("img", cells, image_probs, cell_probs)
    fused = variation_of_prediction(pred)
    cell = variation_of_prediction(pred, VariationParams(score="cell"))
    assert fused.iloc[0]["class"] == cell.iloc[0]["class"] == SHORT_NAMES[3]
    assert fused.iloc[0].n_expressing == 0 and cell.iloc[0].n_expressing == 6
    with pytest.raises(ValueError, match="score"):
        VariationParams(score="image")


def test_image_done_without_embeddings_that_fails_now_is_left_out(tmp_path, caplog):
    """An image finished by an earlier run without embeddings and failing on the rerun is left out
    of cells.h5ad with a warning; the others are in it."""
    import anndata as ad
    from _fake_predictor import EmbeddingThresholdPredictor
    from _fake_predictor import write_image as _write_image

    from napari_cpgcn.batch import BatchOptions, run_predict_folder

    rng = np.random.default_rng(2)
    for i in range(3):
        _write_image(tmp_path / "images", f"img{i}", rng)
    out = tmp_path / "out"
    assert run_predict_folder(tmp_path / "images", EmbeddingThresholdPredictor(), out,
                              BatchOptions(workers=1)).n_done == 3
    (tmp_path / "images" / "img1_green.png").write_bytes(b"broken")
    s = run_predict_folder(tmp_path / "images", EmbeddingThresholdPredictor(), out,
                           BatchOptions(workers=1, embeddings=True))
    # img1 failed now, but its earlier result stays finished (as for every output): not a failure
    assert (s.n_done, s.n_failed) == (2, 0)
    assert set(pd.read_csv(out / "cells.csv").image_id) == {"img0", "img1", "img2"}
    a = ad.read_h5ad(out / "cells.h5ad")
    assert set(a.obs["image_id"]) == {"img0", "img2"}
    assert "left out of cells.h5ad" in caplog.text and "img1" in caplog.text
