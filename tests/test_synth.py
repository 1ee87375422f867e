"""Synthetic HPA-like data: determinism, truth consistency, weak-supervision rules, I/O round trip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from napari_cpgcn.classes import N_CLASSES, NEGATIVE
from napari_cpgcn.synth import (
    PATTERNS,
    generate_dataset,
    generate_image,
    load_label_stats,
    sample_label_set,
    synth_sample,
)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shapes_and_dtypes():
    im = generate_image(3, size=160, labels=[0, 14])
    assert im.data.shape == (4, 160, 160) and im.data.dtype == np.uint8
    assert im.cells.shape == (160, 160) and im.cells.dtype == np.uint32
    assert im.nuclei.shape == (160, 160)
    n = int(im.cells.max())
    assert n >= 1 and im.n_cells == n
    # Ids are consecutive 1..n and every id has pixels.
    assert set(np.unique(im.cells)) - {0} == set(range(1, n + 1))
    assert im.cell_labels.shape == (n, N_CLASSES) and im.cell_labels.dtype == np.uint8
    assert im.image_labels.shape == (N_CLASSES,)
    # Nuclei lie inside their own cell.
    nz = im.nuclei > 0
    assert nz.any() and np.array_equal(im.nuclei[nz], im.cells[nz])
    # Non-trivial images: the signal is not flat in any channel.
    assert all(im.data[c].std() > 2 for c in range(4))


def test_deterministic_per_seed():
    a = generate_image(11, size=128)
    b = generate_image(11, size=128)
    c = generate_image(12, size=128)
    assert np.array_equal(a.data, b.data) and np.array_equal(a.cells, b.cells)
    assert np.array_equal(a.cell_labels, b.cell_labels) and a.image_id == b.image_id
    assert not np.array_equal(a.data, c.data)


@pytest.mark.parametrize("seed", range(12))
def test_image_labels_are_union_of_cell_labels(seed):
    im = generate_image(seed, size=128, heterogeneity=0.8)
    cells = im.cell_labels.astype(bool)
    # Every cell has at least one label; Negative cells have nothing else.
    assert cells.any(1).all()
    neg = cells[:, NEGATIVE]
    assert not cells[neg][:, :NEGATIVE].any()
    union = cells.any(0)
    if neg.all():
        assert im.image_labels[NEGATIVE] == 1 and im.image_labels[:NEGATIVE].sum() == 0
    else:
        # Negative only when every cell is negative, even if some cells are negative.
        assert im.image_labels[NEGATIVE] == 0
        assert np.array_equal(im.image_labels[:NEGATIVE].astype(bool), union[:NEGATIVE])


def test_requested_labels_are_expressed():
    for labels in ([0], [2, 16], [11], [6, 7, 12], [13, 17]):
        im = generate_image(5, size=192, labels=labels, heterogeneity=1.0)
        assert set(np.flatnonzero(im.image_labels)) == set(labels)
    neg = generate_image(5, size=128, labels=[NEGATIVE])
    assert (neg.cell_labels[:, NEGATIVE] == 1).all()
    assert np.flatnonzero(neg.image_labels).tolist() == [NEGATIVE]


def test_mitotic_spindle_only_in_dividing_cells():
    for seed in range(4):
        im = generate_image(seed, size=256, labels=[11], mitosis_rate=0.0)
        spindle = im.cell_labels[:, 11].astype(bool)
        assert spindle.any()
        assert np.array_equal(spindle, im.mitotic)
    # Unstained dividing cells: visible in red, not labelled 11.
    im = generate_image(1, size=256, labels=[0], mitosis_rate=1.0)
    assert im.mitotic.sum() == 1 and im.cell_labels[:, 11].sum() == 0
    assert im.cell_labels[im.mitotic, 0].sum() == 0  # no nucleus, no nuclear class
    both = generate_image(3, size=256, labels=[11], mitosis_rate=1.0)
    spindle = both.cell_labels[:, 11].astype(bool)
    assert spindle.any() and (spindle <= both.mitotic).all() and both.mitotic.sum() > spindle.sum()


def test_heterogeneity_lowers_expressing_fraction():
    def frac(h: float) -> float:
        expressing = total = 0
        for seed in range(10):
            im = generate_image(seed, size=192, labels=[0, 16], heterogeneity=h)
            expressing += int(im.cell_labels[:, [0, 16]].sum())
            total += 2 * im.n_cells
        return expressing / total

    f0, f5, f1 = frac(0.0), frac(0.5), frac(1.0)
    assert f0 == 1.0
    assert f1 < f5 < f0
    assert f1 < 0.75


def test_each_class_pattern_is_distinct_and_in_cells():
    """Every class puts green signal inside the expressing cells only, and patterns differ."""
    greens = {}
    for k in range(N_CLASSES):
        im = generate_image(4, size=256, labels=[k], heterogeneity=0.0)
        g = im.data[1].astype(np.float32)
        inside = im.cells > 0
        if k == NEGATIVE:
            assert g[inside].mean() < 12
            continue
        expressing = np.isin(im.cells, 1 + np.flatnonzero(im.cell_labels[:, k]))
        # Sparse patterns (dots) are judged by their bright pixels, not the mean.
        assert np.percentile(g[expressing], 99.8) > np.percentile(g[~inside], 99.8) + 15, k
        assert g[~inside].mean() < 10, k
        greens[k] = g
    assert set(PATTERNS) == set(range(N_CLASSES))
    # Same layout (same seed) -> compare patterns pixelwise: no two classes are near-identical.
    keys = sorted(greens)
    for i in keys:
        for j in keys:
            if i < j:
                r = np.corrcoef(greens[i].ravel(), greens[j].ravel())[0, 1]
                assert r < 0.97, (i, j, r)


def test_label_stats_and_sampling_resemble_real_frequencies():
    stats = load_label_stats()
    assert stats["n_images"] > 20000 and len(stats["label_sets"]) == len(stats["counts"])
    real = np.asarray(stats["class_counts"], float) / stats["n_images"]
    rng = np.random.default_rng(0)
    sampled = np.zeros(N_CLASSES)
    for _ in range(3000):
        sampled[sample_label_set(rng)] += 1
    sampled /= 3000
    assert np.corrcoef(real, sampled)[0, 1] > 0.95


def test_dataset_reads_back_and_is_reproducible(tmp_path):
    from PIL import Image

    from napari_cpgcn.io.hpa import list_image_ids, read_image
    from napari_cpgcn.io.tables import read_labels_csv

    out = generate_dataset(tmp_path / "a", n_images=3, size=96, seed=7, heterogeneity=0.5)
    ids = list_image_ids(out / "images")
    table = read_labels_csv(out / "train.csv")
    assert sorted(ids) == sorted(table.ids) and len(ids) == 3
    import pandas as pd

    cells = pd.read_csv(out / "truth" / "cells.csv", dtype={"labels": str})
    assert list(cells.columns) == ["image_id", "cell_id", "labels"]
    for iid in ids:
        img = read_image(out / "images", iid)
        assert img.data.shape == (4, 96, 96) and img.data.dtype == np.uint8
        mask = np.asarray(Image.open(out / "truth" / f"{iid}_cells.png"))
        assert mask.shape == (96, 96) and mask.dtype == np.uint16
        sub = cells[cells.image_id == iid]
        assert sorted(sub.cell_id) == list(range(1, int(mask.max()) + 1))
        union = set()
        for s in sub["labels"]:
            union |= {int(k) for k in s.split("|")}
        image = set(np.flatnonzero(table.row(iid)).tolist())
        if union == {NEGATIVE}:
            assert image == {NEGATIVE}
        else:
            assert image == union - {NEGATIVE}
    params = json.loads((out / "synth.json").read_text())
    assert params["seed"] == 7 and params["n_images"] == 3 and params["size"] == 96
    # Same seed -> identical bytes; image i does not depend on n_images.
    again = generate_dataset(tmp_path / "b", n_images=3, size=96, seed=7, heterogeneity=0.5)
    assert _digest(out) == _digest(again)
    fewer = generate_dataset(tmp_path / "c", n_images=2, size=96, seed=7, heterogeneity=0.5)
    first = sorted(ids)[0]
    assert ((fewer / "images" / f"{first}_green.png").read_bytes()
            == (out / "images" / f"{first}_green.png").read_bytes())


def test_cli_synth(tmp_path):
    from napari_cpgcn.cli import main
    from napari_cpgcn.io.tables import read_labels_csv

    out = tmp_path / "synth"
    rc = main(["synth", str(out), "--n-images", "2", "--size", "64", "--seed", "3",
               "--heterogeneity", "0.7", "--quiet"])
    assert rc == 0
    assert len(read_labels_csv(out / "train.csv")) == 2
    assert len(list((out / "images").glob("*.png"))) == 8
    assert main(["synth", str(tmp_path / "bad"), "--heterogeneity", "1.5", "--quiet"]) == 2
    assert main(["synth", str(tmp_path / "bad"), "--n-images", "0", "--quiet"]) == 2


def test_sample_data_layers():
    from napari_cpgcn._napari.sample_data import synth_layer_data

    layers = synth_layer_data(seed=1, size=128)
    kinds = [k for _, _, k in layers]
    assert kinds == ["image"] * 4 + ["labels"]
    cmaps = [kw["colormap"] for _, kw, _ in layers[:4]]
    assert cmaps == ["red", "green", "blue", "yellow"]
    for data, kw, _ in layers[:4]:
        assert kw["blending"] == "additive" and data.shape == (128, 128)
        assert kw["metadata"]["image_id"] == "synth_sample_1"
        assert kw["metadata"]["labels"] is not None
        lo, hi = kw["contrast_limits"]
        assert hi > lo
    data, kw, _ = layers[4]
    assert kw["name"] == "cells (truth)" and data.max() >= 1
    assert len(kw["features"]) == int(data.max())
    im = synth_sample(seed=1, size=128)
    assert np.array_equal(im.cells, data)


def test_synth_core_imports_no_torch_or_qt():
    import subprocess
    import sys

    code = ("import sys, napari_cpgcn.synth, napari_cpgcn.cli._synth; "
            "print(','.join(m for m in ('torch', 'napari', 'qtpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.gui
def test_napari_open_sample(make_napari_viewer):
    """The manifest's sample data opens in a viewer: 4 coloured additive channels + truth cells."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cpgcn", "synthetic")
    names = [layer.name for layer in viewer.layers]
    assert len(viewer.layers) == 5 and names[-1] == "cells (truth)"
    for layer, colour in zip(viewer.layers[:4], ("red", "green", "blue", "yellow"), strict=True):
        assert layer.colormap.name == colour
        assert layer.blending == "additive"
        assert layer.metadata["image_id"] == "synth_sample_0"
    cells = viewer.layers[-1]
    assert int(cells.data.max()) == len(cells.features)
