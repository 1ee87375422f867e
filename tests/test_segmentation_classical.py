"""The classical backend's behaviour on purpose-built images: valleys, confluence, scale, mitosis."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import KAGGLE2018_ID

from napari_cpgcn.evaluation.matching import match_summary
from napari_cpgcn.segmentation import (
    estimate_nucleus_diameter,
    segment_cells,
    segment_cells_with_qc,
)


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def valley_image(valley_x: int = 125, shape=(128, 208), seed: int = 0) -> np.ndarray:
    """Two nuclei (x = 60 and 140, midline 100) in one continuous cytoplasm with a dark valley at ``valley_x``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    nuc = _ellipse(yy, xx, 64, 60, 16, 13) | _ellipse(yy, xx, 64, 140, 16, 13)
    body = _ellipse(yy, xx, 64, 102, 52, 92)
    cyto = body * (0.8 + 0.2 * rng.random(shape))
    cyto *= 1 - 0.85 * np.exp(-0.5 * ((xx - valley_x) / 2.5) ** 2)  # the membrane between the two cells
    data = np.stack([15 + 160 * cyto * ~nuc, np.full(shape, 10.0), 10 + 200 * nuc, 15 + 140 * cyto * ~nuc])
    return np.clip(data + rng.normal(0, 3, data.shape), 0, 255).astype(np.uint8)


def _boundary_columns(labels: np.ndarray, left: int, right: int) -> np.ndarray:
    """Per row crossing both cells, the last column of the left cell."""
    cols = []
    for row in labels:
        if (row == left).any() and (row == right).any():
            cols.append(np.flatnonzero(row == left).max())
    return np.asarray(cols)


@pytest.mark.parametrize("valley_x", [125, 80])
def test_touching_cells_are_cut_along_the_dark_valley_not_the_midline(valley_x):
    data = valley_image(valley_x)
    labels = segment_cells(data)  # defaults: the scale is measured, nothing is told
    left, right = labels[64, 60], labels[64, 140]
    assert labels.max() == 2 and left > 0 and right > 0 and left != right
    cols = _boundary_columns(labels, left, right)
    assert len(cols) > 40
    # Along the valley (within ~a valley width), far from the midline at x = 100.
    assert np.all(np.abs(cols - valley_x) <= 6), (valley_x, cols.min(), cols.max())
    # The test can fail: with the valley cost off, the same image is cut at the midline.
    voronoi = segment_cells(data, valley_weight=0)
    vcols = _boundary_columns(voronoi, voronoi[64, 60], voronoi[64, 140])
    assert np.all(np.abs(vcols - 100) <= 3)


def test_confluent_field_gets_the_right_count():
    """A confluent synthetic field (density 3: cells cover ~90 % of it, nuclei touch).

    The reference count is the cells a nucleus-seeded method *can* find: those whose nucleus
    shows at least 10 % of a typical nucleus inside the field (the HPA masks' rule too: they
    drop nuclei under 2,500 px of ~25,000). Tolerance: 3 cells of ~50 (6 %) — touching nuclei
    with a flat contact and no seam cannot be split from the blue channel alone.
    """
    synth = pytest.importorskip("napari_cpgcn.synth")
    s = synth.generate_image(201, size=512, density=3.0)  # a seed not used when choosing parameters
    areas = np.bincount(s.nuclei.ravel())[1:]
    areas = areas[areas > 0]
    findable = int(np.count_nonzero(areas >= 0.1 * np.median(areas)))
    assert (s.cells > 0).mean() > 0.85 and findable >= 40
    labels = segment_cells(s.data)
    n = int(labels.max())
    assert abs(n - findable) <= 3, (n, findable)
    assert match_summary(labels, s.cells).f1 >= 0.8


def test_nucleus_scale_is_measured_per_image():
    synth = pytest.importorskip("napari_cpgcn.synth")
    for scale in (1.0, 2.0):
        s = synth.generate_image(202, size=int(384 * scale), cell_scale=scale)
        areas = np.bincount(s.nuclei.ravel())[1:]
        true_d = 2 * np.sqrt(np.median(areas[areas > 0]) / np.pi)
        d = estimate_nucleus_diameter(s.data[2])
        assert d == pytest.approx(true_d, rel=0.15), (scale, d, true_d)
    assert estimate_nucleus_diameter(np.zeros((64, 64), np.uint8)) is None


def test_bit_depth_and_brightness_do_not_change_the_result():
    synth = pytest.importorskip("napari_cpgcn.synth")
    s = synth.generate_image(203, size=256)
    ref = segment_cells(s.data)
    assert ref.max() > 3
    as16 = s.data.astype(np.uint16) * 257 + 100  # 16-bit, with an offset
    dim = (s.data // 6).astype(np.uint8)  # a dim exposure
    for data in (as16, dim):
        got = segment_cells(data)
        assert abs(int(got.max()) - int(ref.max())) <= 1
        assert match_summary(got, ref).f1 >= 0.9


def mitosis_image(gap: float, shape=(160, 240), seed: int = 0) -> np.ndarray:
    """An interphase cell on the left; on the right a round dividing cell with two bright
    chromatin masses ``gap`` px apart (centre to centre)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    inter_nuc = _ellipse(yy, xx, 80, 60, 20, 16)
    inter_cell = _ellipse(yy, xx, 80, 65, 45, 45)
    cx = 165
    chrom = _ellipse(yy, xx, 80, cx - gap / 2, 10, 5) | _ellipse(yy, xx, 80, cx + gap / 2, 10, 5)
    div_cell = _ellipse(yy, xx, 80, cx, 36, 40 + gap / 3)
    cell = (inter_cell | div_cell)
    cyto = cell * (0.7 + 0.3 * rng.random(shape))
    cyto *= 1 - 0.85 * np.exp(-0.5 * ((xx - 112) / 2.5) ** 2)
    nuc = inter_nuc | chrom
    blue = 10 + 140 * inter_nuc + 240 * chrom
    data = np.stack([15 + 150 * cyto * ~nuc, np.full(shape, 10.0), blue, 15 + 130 * cyto * ~nuc])
    return np.clip(data + rng.normal(0, 3, data.shape), 0, 255).astype(np.uint8)


def test_a_dividing_cells_two_chromatin_masses_are_one_cell():
    data = mitosis_image(gap=26)
    res = segment_cells_with_qc(data, nucleus_diameter=36)
    labels = res.cells
    assert labels.max() == 2
    assert labels[80, 165 - 13] == labels[80, 165 + 13] != labels[80, 60]
    # Both masses carry their cell's id in the nuclei image; QC sees no disagreement.
    assert res.nuclei[80, 165 - 13] == res.nuclei[80, 165 + 13] == labels[80, 165]
    assert not res.qc["check_masks"]
    # Without the rule each mass seeds its own cell.
    assert segment_cells(data, nucleus_diameter=36, merge_mitotic=False).max() == 3


def test_debris_does_not_make_cells():
    data = mitosis_image(gap=26)
    data[2, 10:13, 10:13] = 255  # a speck of bright debris in the background, < 10 % of a nucleus
    data[2, 150:153, 230:233] = 255
    assert segment_cells(data, nucleus_diameter=36).max() == 2


def test_kaggle_2018_512_image_with_defaults(hpa_samples):
    from napari_cpgcn.io.hpa import read_image

    image = read_image(hpa_samples / f"{KAGGLE2018_ID}_blue.png")
    assert image.data.shape == (4, 512, 512)
    d = estimate_nucleus_diameter(image.data[2])
    assert 30 <= d <= 60  # nuclei are ~40 px at 512² (a 2048² field shrunk 4x)
    res = segment_cells_with_qc(image)
    n = res.qc["n_cells"]
    assert 15 <= n <= 40, n
    assert res.qc["n_nuclei"] >= n and not res.qc["check_masks"]
    # Cells are bigger than their nuclei and cover part, not all, of the field.
    assert 0.2 <= res.qc["cell_coverage"] <= 0.95
    assert res.qc["median_cell_area_px"] > 1.5 * np.pi * (d / 2) ** 2
