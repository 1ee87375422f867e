"""Fusion of image- and cell-level scores: the paper's product unchanged, learned options that do
not lose to the better part."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cpgcn.pipeline.fusion import (
    FUSION_METHODS,
    FusionParams,
    fit_fusion,
    fuse,
    mean_ap,
    select_fusion,
)


def _case(noisy: str, seed: int = 0, n_images: int = 60, cells: int = 8, n_classes: int = 5):
    """Cells with labels; the image scores know which images hold a class, the cell scores which
    cells. ``noisy`` ('image' or 'cell') replaces one part by noise."""
    rng = np.random.default_rng(seed)
    img_has = rng.random((n_images, n_classes)) < 0.3
    y = (img_has[:, None, :] & (rng.random((n_images, cells, n_classes)) < 0.5)).reshape(-1, n_classes)
    img_score = 1 / (1 + np.exp(-(3.0 * img_has - 1.5 + rng.normal(0, 1.0, img_has.shape))))
    ip = np.repeat(img_score, cells, axis=0)
    cp = 1 / (1 + np.exp(-(3.0 * y - 1.5 + rng.normal(0, 1.2, y.shape))))
    if noisy == "image":
        ip = np.repeat(rng.random((n_images, n_classes)), cells, axis=0)
    elif noisy == "cell":
        cp = rng.random(y.shape)
    groups = np.repeat([f"img{i:03d}" for i in range(n_images)], cells)
    return ip.astype(np.float32), cp.astype(np.float32), y.astype(np.uint8), groups


def test_product_is_the_papers_fusion_unchanged():
    from napari_cpgcn.pipeline import fuse as pipeline_fuse

    rng = np.random.default_rng(1)
    image, cells = rng.random(19).astype(np.float32), rng.random((7, 19)).astype(np.float32)
    out = fuse(image, cells)
    assert out.dtype == np.float32 and out.shape == (7, 19)
    assert np.array_equal(out, pipeline_fuse(image, cells))  # bit for bit what the predictor writes today
    assert np.array_equal(fuse(image, cells, "product"), cells * image[None])
    assert fuse(np.array([0.5, 0.2]), np.array([[0.4, 0.9]]))[0].tolist() == pytest.approx([0.2, 0.18])
    # per-cell image rows broadcast the same way; the parts alone
    assert np.array_equal(fuse(np.repeat(image[None], 7, 0), cells), out)
    assert np.array_equal(fuse(image, cells, "cell"), cells)
    assert np.array_equal(fuse(image, cells, "image"), np.repeat(image[None], 7, 0))


def test_geometric_mean_at_one_half_ranks_like_the_product():
    ip, cp, _, _ = _case("none")
    g = fuse(ip, cp, "geometric")
    p = fuse(ip, cp, "product")
    for k in range(cp.shape[1]):
        assert np.array_equal(np.argsort(g[:, k], kind="stable"), np.argsort(p[:, k], kind="stable"))
    w0 = FusionParams("geometric", weights=[0.0] * cp.shape[1])  # all cell model
    assert np.allclose(fuse(ip, cp, params=w0), cp, atol=1e-6)


@pytest.mark.parametrize("noisy", ["image", "cell"])
@pytest.mark.parametrize("method", ["logistic", "geometric"])
def test_learned_fusion_is_not_worse_than_the_better_part(noisy, method):
    """Fitted on some images, scored on others: when one part is noise the learned fusion keeps up
    with the good part, where the product loses to it."""
    ip, cp, y, groups = _case(noisy, seed=2)
    fit_rows = np.arange(len(y)) < len(y) // 2
    test = ~fit_rows
    params = fit_fusion(ip[fit_rows], cp[fit_rows], y[fit_rows], method)
    assert params.method == method
    fused = mean_ap(y[test], fuse(ip[test], cp[test], params=params))
    better = max(mean_ap(y[test], ip[test]), mean_ap(y[test], cp[test]))
    product = mean_ap(y[test], fuse(ip[test], cp[test]))
    assert fused >= better - 0.01
    assert product < better - 0.02  # the case is one where the product does lose


def test_both_parts_informative_fusion_beats_each():
    ip, cp, y, groups = _case("none", seed=3)
    fit_rows = np.arange(len(y)) < len(y) // 2
    params = fit_fusion(ip[fit_rows], cp[fit_rows], y[fit_rows], "logistic")
    test = ~fit_rows
    fused = mean_ap(y[test], fuse(ip[test], cp[test], params=params))
    assert fused > max(mean_ap(y[test], ip[test]), mean_ap(y[test], cp[test])) + 0.02


def test_select_fusion_cross_validates_and_records_the_choice(tmp_path):
    ip, cp, y, groups = _case("cell", seed=4)
    params = select_fusion(ip, cp, y, groups)
    cv = params.info["cv_mAP"]
    assert set(cv) == set(FUSION_METHODS) - {"image"} and params.info["chosen"] == params.method
    assert params.method != "product" and cv[params.method] > cv["product"]
    params.save(tmp_path / "fusion.json")
    again = FusionParams.load(tmp_path / "fusion.json")
    assert again.to_dict() == params.to_dict()
    assert np.array_equal(fuse(ip, cp, params=again), fuse(ip, cp, params=params))
    # too few images to choose on: the product stays
    one = select_fusion(ip[:8], cp[:8], y[:8], groups[:8])
    assert one.method == "product" and "fewer than two images" in one.info["reason"]


def test_rare_classes_keep_the_product_and_bad_input_is_refused():
    ip, cp, y, _ = _case("none", seed=5)
    y[:, 0] = 0
    y[0, 0] = 1  # one positive cell only: not fitted
    params = fit_fusion(ip, cp, y, "logistic")
    assert params.coef[0] is None and params.info["fitted_classes"] == cp.shape[1] - 1
    assert np.array_equal(fuse(ip, cp, params=params)[:, 0], (cp * ip)[:, 0])
    with pytest.raises(ValueError, match="unknown"):
        fuse(ip, cp, "sum")
    with pytest.raises(ValueError, match="needs fitted parameters"):
        fuse(ip, cp, "logistic")
    with pytest.raises(ValueError, match="do not fit"):
        fuse(ip[:3], cp)
    with pytest.raises(ValueError, match="unknown"):
        FusionParams("max")
