"""CAM layers (issue 19): brightness follows the class probability; large maps kept small and shown with scale."""

from __future__ import annotations

import numpy as np

from napari_cpgcn._napari.layers import block_mean, cam_layers
from napari_cpgcn.classes import N_CLASSES


def test_large_cams_are_block_averaged_and_placed_over_the_image():
    h, w = 1030, 700  # not multiples of the factor
    yy, xx = np.mgrid[0:h, 0:w]
    cams = np.zeros((N_CLASSES, h, w), np.float32)
    cams[0] = 0.8 * np.exp(-((yy - 300) ** 2 + (xx - 500) ** 2) / (2 * 60.0 ** 2))  # p = 0.8 → peak 0.8
    cams[3] = 0.01 * cams[0] / 0.8  # p = 0.01: a map scaled by its probability stays dark
    probs = np.zeros(N_CLASSES)
    probs[0], probs[3] = 0.8, 0.01
    layers = cam_layers(cams, probs, threshold=0.0, max_side=256)
    (d0, kw0, _), (d3, kw3, _) = layers[0], next(t for t in layers if t[1]["metadata"]["class_index"] == 3)
    f = int(np.ceil(h / 256))
    assert d0.shape == (int(np.ceil(h / f)), int(np.ceil(w / f))) and max(d0.shape) <= 256
    assert kw0["scale"] == (f, f) and kw0["translate"] == ((f - 1) / 2, (f - 1) / 2)
    assert kw0["metadata"]["image_shape"] == (h, w)
    # the peak lands where it was in image pixels: world = index * scale + translate
    iy, ix = np.unravel_index(np.argmax(d0), d0.shape)
    assert abs(iy * f + (f - 1) / 2 - 300) <= f and abs(ix * f + (f - 1) / 2 - 500) <= f
    # one shared scale: the dim class is dim, not stretched to its own maximum
    assert kw0["contrast_limits"] == kw3["contrast_limits"] == [0.2, 1.0]
    assert float(d3.max()) < 0.02 and float(d0.max()) > 0.7
    assert [kw["visible"] for _, kw, _ in layers][:2] == [True, True]  # n_visible (default 3) of the core


def test_block_mean_keeps_small_maps_and_averages_blocks():
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert block_mean(a, 1) is a
    np.testing.assert_allclose(block_mean(a, 2), [[2.5, 4.5], [10.5, 12.5]])
    assert block_mean(np.ones((5, 3), np.float32), 2).shape == (3, 2)
