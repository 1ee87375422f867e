"""Layer-data helpers (no Qt): CAM overlays, cell features, top-class colours, table round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cpgcn._napari.layers import (
    cam_layers,
    cell_features,
    cells_layer,
    table_columns,
    table_from_features,
    top_class_color_dict,
)
from napari_cpgcn.classes import CLASSES, N_CLASSES, NEGATIVE, SHORT_NAMES


def make_table(n_cells: int = 3, image_id: str = "img0", seed: int = 0) -> pd.DataFrame:
    """A per-cell table in the pipeline's column layout with random probabilities."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_cells):
        img = rng.random(N_CLASSES)
        cell = rng.random(N_CLASSES)
        fused = img * cell
        row = {"image_id": image_id, "cell_id": i + 1, "centroid_y": 10.0 * i, "centroid_x": 5.0,
               "area": 100 + i, "bbox_y0": 0, "bbox_x0": 0, "bbox_y1": 10, "bbox_x1": 10,
               "top_class": SHORT_NAMES[int(np.argmax(fused))]}
        for k, s in enumerate(SHORT_NAMES):
            row[f"image_{s}"], row[f"cell_{s}"], row[f"fused_{s}"] = img[k], cell[k], fused[k]
        rows.append(row)
    return pd.DataFrame(rows, columns=table_columns())


def test_cam_layers_threshold_visibility_and_colours():
    probs = np.zeros(N_CLASSES)
    probs[[2, 7, 0, 14, NEGATIVE]] = [0.9, 0.8, 0.7, 0.5, 0.95]
    cams = np.random.default_rng(0).random((N_CLASSES, 16, 16)).astype(np.float32)
    layers = cam_layers(cams, probs, image_id="x", threshold=0.4)
    assert [kw["metadata"]["class_index"] for _, kw, _ in layers] == [2, 7, 0, 14]  # Negative left out
    assert [kw["visible"] for _, kw, _ in layers] == [True, True, True, False]
    for data, kw, ltype in layers:
        k = kw["metadata"]["class_index"]
        assert ltype == "image" and data.shape == (16, 16)
        assert kw["colormap"] == CLASSES[k].color
        assert kw["name"] == f"CAM {CLASSES[k].name}"
        assert kw["blending"] == "additive"
        assert kw["metadata"]["hpa_role"] == "cam"
        assert kw["contrast_limits"] == [pytest.approx(0.2), 1.0]
    # nothing above threshold: the top class still gets a (visible) layer
    low = cam_layers(cams, np.full(N_CLASSES, 0.01) + np.eye(N_CLASSES)[5] * 0.1, threshold=0.5)
    assert [kw["metadata"]["class_index"] for _, kw, _ in low] == [5]
    with pytest.raises(ValueError, match="cams must be"):
        cam_layers(cams[:3], probs)


def test_cell_features_and_round_trip():
    table = make_table(4)
    feats = cell_features(table)
    assert list(feats.columns[:3]) == ["index", "top_class", "classes"]
    np.testing.assert_array_equal(feats["index"], [1, 2, 3, 4])
    for s in SHORT_NAMES:
        for kind in ("fused", "image", "cell"):
            np.testing.assert_allclose(feats[f"{kind}_{s}"], table[f"{kind}_{s}"])
    top = table.loc[0, "top_class"]
    assert feats.loc[0, "classes"].startswith(f"{top} ")
    back = table_from_features(feats)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)

    data, kwargs, ltype = cells_layer(np.zeros((8, 8), np.uint32), table, image_id="img0")
    assert ltype == "labels" and kwargs["name"] == "cells"
    assert kwargs["metadata"] == {"hpa_role": "cells", "image_id": "img0"}
    assert len(kwargs["features"]) == 4


def test_top_class_color_dict():
    table = make_table(3)
    colors = top_class_color_dict(table)
    assert colors[0] == "transparent" and colors[None] == "transparent"
    for cid, top in zip(table["cell_id"], table["top_class"], strict=True):
        assert colors[int(cid)] == CLASSES[SHORT_NAMES.index(top)].color
