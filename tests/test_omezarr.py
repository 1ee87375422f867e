"""OME-Zarr outputs: written by the folder prediction, read back by ome_zarr.reader and the plugin's reader.

The folder tests use the small deterministic predictor of tests/_fake_predictor.py (the zarr
writer needs only a prediction); tests/test_bioimageio.py runs ``predict --ome-zarr`` with a
really trained run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata  # noqa: E402,F401  (the ome-zarr extra is part of the test install)
import numpy as np
import pandas as pd
import pytest
import tifffile
from _fake_predictor import ThresholdPredictor  # noqa: E402
from _fake_predictor import write_image as _write_image  # noqa: E402

from napari_cpgcn._napari.layers import cell_features  # noqa
from napari_cpgcn._napari.reader import napari_get_reader, read_cpgcn_ome_zarr  # noqa
from napari_cpgcn.batch import BatchOptions, image_paths, is_done, run_predict_folder  # noqa: E402
from napari_cpgcn.classes import CHANNELS, SHORT_NAMES  # noqa: E402
from napari_cpgcn.io.hpa import read_image  # noqa: E402
from napari_cpgcn.io.omezarr import (  # noqa: E402
    INSTALL_HINT,
    OmeZarrError,
    is_cpgcn_ome_zarr,
    pyramid_factors,
    read_ome_zarr,
    write_ome_zarr,
)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """Three small images predicted with --ome-zarr: (input folder, output folder)."""
    root = tmp_path_factory.mktemp("omezarr")
    rng = np.random.default_rng(3)
    folder = root / "images"
    for i in range(3):
        _write_image(folder, f"img{i}", rng, size=64)
    out = root / "out"
    summary = run_predict_folder(folder, ThresholdPredictor(), out, BatchOptions(ome_zarr=True, batch_size=2))
    assert summary.n_done == 3 and summary.n_failed == 0
    return folder, out


def _ome_zarr_nodes(path: Path):
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(path), fmt=FormatV04()))())
    image = next(n for n in nodes if "channel_names" in n.metadata)
    labels = next(n for n in nodes if n.zarr.path.rstrip("/").endswith("labels/cells"))
    return image, labels


def _cells_csv(out: Path) -> pd.DataFrame:
    t = pd.read_csv(out / "cells.csv", dtype={"image_id": str})
    t["top_classes"] = t["top_classes"].fillna("")  # a cell without a class above threshold: "" in the CSV
    return t


def test_folder_zarrs_match_the_tiff_and_csv_outputs(predicted):
    folder, out = predicted
    cells_csv = _cells_csv(out)
    for image_id in ("img0", "img1", "img2"):
        zarr_path = out / "zarr" / f"{image_id}.ome.zarr"
        assert zarr_path.is_dir() and is_cpgcn_ome_zarr(zarr_path)
        mask = tifffile.imread(out / "masks" / f"{image_id}.tif")
        rows = cells_csv[cells_csv.image_id == image_id].reset_index(drop=True)

        # --- ome-zarr-py's own reader: channels, names and colours, label ids
        image_node, label_node = _ome_zarr_nodes(zarr_path)
        np.testing.assert_array_equal(np.asarray(image_node.data[0]), read_image(folder, image_id=image_id).data)
        assert [n.split(" ")[0] for n in image_node.metadata["channel_names"]] == list(CHANNELS)
        attrs = json.loads((zarr_path / ".zattrs").read_text())
        assert attrs["multiscales"][0]["version"] == "0.4"
        assert [c["color"] for c in attrs["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF", "FFFF00"]
        labels = np.asarray(label_node.data[0])
        np.testing.assert_array_equal(labels, mask)
        assert sorted(set(np.unique(labels)) - {0}) == sorted(rows.cell_id)

        # --- the AnnData table (spatialdata's convention) = the CSV rows
        import zarr

        tgroup = zarr.open_group(str(zarr_path), mode="r")["tables/cells"]
        assert tgroup.attrs["spatialdata-encoding-type"] == "ngff:regions_table"
        assert (tgroup.attrs["region"], tgroup.attrs["instance_key"]) == ("cells", "cell_id")
        adata = anndata.io.read_elem(tgroup)
        assert list(adata.var_names) == list(SHORT_NAMES)
        np.testing.assert_array_equal(adata.obs["cell_id"].to_numpy(), rows.cell_id.to_numpy())
        np.testing.assert_allclose(adata.X, rows[[f"fused_{s}" for s in SHORT_NAMES]].to_numpy(), rtol=1e-5)
        assert list(adata.obs["region"].cat.categories) == ["cells"]

        # --- our reader: same table, column for column
        z = read_ome_zarr(zarr_path)
        assert z.image_id == image_id and z.n_levels == 1  # 64 px: no pyramid level needed
        assert list(z.table.columns) == list(rows.columns)
        pd.testing.assert_frame_equal(z.table, rows, check_dtype=False, rtol=1e-5)
        images = pd.read_csv(out / "images.csv", dtype={"image_id": str}).set_index("image_id")
        np.testing.assert_allclose(z.image_probs, images.loc[image_id, [f"image_{s}" for s in SHORT_NAMES]]
                                   .to_numpy(np.float64), rtol=1e-5)


def test_plugin_reader_opens_our_zarr_as_channels_and_cells(predicted):
    folder, out = predicted
    path = out / "zarr" / "img1.ome.zarr"
    reader = napari_get_reader(str(path))
    assert reader is read_cpgcn_ome_zarr
    layers = reader(str(path))
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image"] * 4 + ["labels"]
    np.testing.assert_array_equal(np.stack([d for d, _, _ in layers[:4]]), read_image(folder, image_id="img1").data)
    assert [kw["colormap"] for _, kw, _ in layers[:4]] == list(CHANNELS)
    data, kwargs, _ = layers[4]
    assert kwargs["name"] == "cells" and kwargs["metadata"]["hpa_role"] == "cells"
    np.testing.assert_array_equal(data, tifffile.imread(out / "masks" / "img1.tif"))
    rows = _cells_csv(out).query("image_id == 'img1'").reset_index(drop=True)
    feats = kwargs["features"]
    np.testing.assert_array_equal(feats["index"].to_numpy(), rows.cell_id.to_numpy())
    pd.testing.assert_frame_equal(feats, cell_features(rows), check_dtype=False, rtol=1e-5)


def test_is_done_needs_the_zarr_when_asked_for(predicted, tmp_path):
    folder, _ = predicted
    out = tmp_path / "out"
    run_predict_folder(folder, ThresholdPredictor(), out, BatchOptions())
    assert is_done(out, "img0", BatchOptions()) and not is_done(out, "img0", BatchOptions(ome_zarr=True))
    summary = run_predict_folder(folder, ThresholdPredictor(), out, BatchOptions(ome_zarr=True))
    assert summary.n_done == 3 and summary.n_skipped == 0  # redone: the zarrs were missing
    assert all(image_paths(out, f"img{i}")["zarr"].is_dir() for i in range(3))
    summary = run_predict_folder(folder, ThresholdPredictor(), out, BatchOptions(ome_zarr=True))
    assert summary.n_skipped == 3
    assert not [p for p in (out / "zarr").iterdir() if p.name.startswith(".")]  # no temporary folders left


def _synthetic(size: int = 600):
    from napari_cpgcn.io.celltable import cell_geometry
    from napari_cpgcn.synth import generate_image

    img = generate_image(7, size=size)
    table = cell_geometry(img.cells, img.image_id)
    table["top_class"] = "golgi"
    return img, table


def test_large_image_gets_a_pyramid_with_matching_labels(tmp_path):
    img, table = _synthetic(600)
    path = write_ome_zarr(tmp_path / "a.ome.zarr", img, img.cells, table)
    image_node, label_node = _ome_zarr_nodes(path)
    assert [tuple(d.shape) for d in image_node.data] == [(4, 600, 600), (4, 300, 300)]
    assert [tuple(d.shape) for d in label_node.data] == [(600, 600), (300, 300)]
    np.testing.assert_array_equal(np.asarray(label_node.data[1]), img.cells[::2, ::2])  # nearest: no new ids
    box = img.data.reshape(4, 300, 2, 300, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(np.asarray(image_node.data[1]).astype(np.float64) - box).max() <= 0.5  # 2x2 mean, rounded
    assert pyramid_factors((3072, 3072)) == (2, 4, 8)
    small = read_ome_zarr(path, level=1)
    assert small.data.shape == (4, 300, 300) and small.cells.shape == (300, 300)


def test_bad_targets_give_clear_errors(tmp_path):
    img, table = _synthetic(64)
    a_file = tmp_path / "x.ome.zarr"
    a_file.write_text("not a zarr")
    with pytest.raises(OmeZarrError, match="is a file"):
        write_ome_zarr(a_file, img, img.cells, table)
    foreign = tmp_path / "foreign.ome.zarr"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OmeZarrError, match="not an OME-Zarr written by napari-cpgcn"):
        write_ome_zarr(foreign, img, img.cells, table, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    stale = tmp_path / ".ours.ome.zarr.x1y2.partial"  # what a killed write leaves behind
    (stale / "s0").mkdir(parents=True)
    ours = write_ome_zarr(tmp_path / "ours.ome.zarr", img, img.cells, table)
    assert not stale.exists()
    with pytest.raises(OmeZarrError, match="already exists"):
        write_ome_zarr(ours, img, img.cells, table)
    write_ome_zarr(ours, img, img.cells, table, overwrite=True)  # ours may be replaced
    assert read_ome_zarr(ours).table is not None


def test_read_only_folder_gives_a_clear_error(tmp_path, monkeypatch):
    img, table = _synthetic(64)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root ignores the mode bits: make the folder refuse like a read-only one
            import napari_cpgcn.io.omezarr as omezarr

            def refuse(path):
                raise PermissionError(13, "Permission denied", str(path.parent))

            monkeypatch.setattr(omezarr, "_make_temp_dir", refuse)
        with pytest.raises(OmeZarrError, match=r"ro.*not writable"):
            write_ome_zarr(ro / "a.ome.zarr", img, img.cells, table)
    finally:
        ro.chmod(0o755)
    assert not (ro / "a.ome.zarr").exists()


def test_corrupt_zarr_gives_a_clear_error_naming_it(tmp_path):
    img, table = _synthetic(64)
    path = write_ome_zarr(tmp_path / "c.ome.zarr", img, img.cells, table)
    chunk = next(p for p in sorted((path / "s0").rglob("*")) if p.is_file() and not p.name.startswith("."))
    chunk.write_bytes(b"garbage, not a zstd frame")
    with pytest.raises(OmeZarrError, match=r"c\.ome\.zarr is corrupt.*image array s0"):
        read_ome_zarr(path)
    reader = napari_get_reader(str(path))  # still ours: the reader reports the damage
    with pytest.raises(OmeZarrError, match=r"c\.ome\.zarr"):
        reader(str(path))

    path2 = write_ome_zarr(tmp_path / "d.ome.zarr", img, img.cells, table)
    text = (path2 / ".zattrs").read_text()
    (path2 / ".zattrs").write_text(text[: len(text) // 2])  # truncated metadata
    assert is_cpgcn_ome_zarr(path2)
    with pytest.raises(OmeZarrError, match=r"d\.ome\.zarr is corrupt.*root metadata"):
        read_ome_zarr(path2)


def test_reader_leaves_other_zarrs_to_other_readers(tmp_path):
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    other = tmp_path / "other.ome.zarr"
    write_image(np.zeros((2, 32, 32), np.uint8), zarr.open_group(str(other), mode="w", zarr_format=2),
                fmt=FormatV04(), axes="cyx", scale_factors=())
    assert napari_get_reader(str(other)) is None
    assert napari_get_reader(str(tmp_path)) is None
    with pytest.raises(OmeZarrError, match="not an OME-Zarr written by napari-cpgcn"):
        read_ome_zarr(other)


_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('zarr', 'ome_zarr', 'anndata', 'bioimageio'):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
"""


def test_core_works_without_the_extras_and_says_how_to_install_them(tmp_path, hpa_samples):
    """A core install (no ome-zarr, zarr, anndata, bioimageio): the reader still opens HPA images, a
    zarr of ours is recognised, and writing one says which extra to install."""
    img, table = _synthetic(64)
    ours = write_ome_zarr(tmp_path / "ours.ome.zarr", img, img.cells, table)
    code = _BLOCK + f"""
from napari_cpgcn._napari.reader import napari_get_reader
from napari_cpgcn.io.omezarr import write_ome_zarr
from napari_cpgcn.cli import main
import numpy as np
assert napari_get_reader({str(hpa_samples / '837e738c-bba8-11e8-b2ba-ac1f6b6435d0_red.png')!r}) is not None
reader = napari_get_reader({str(ours)!r})
try:
    reader({str(ours)!r})
except ImportError as e:
    print("READ:", e)
try:
    write_ome_zarr({str(tmp_path / 'new.ome.zarr')!r}, np.zeros((4, 8, 8), np.uint8))
except ImportError as e:
    print("WRITE:", e)
from napari_cpgcn.export import bioimageio
try:
    bioimageio.export_bioimageio({str(tmp_path)!r}, {str(tmp_path / 'm.zip')!r})
except ImportError as e:
    print("BMZ:", e)
print("EXIT", main(["predict", {str(tmp_path)!r}, "--model", {str(tmp_path)!r}, "--out",
                    {str(tmp_path / 'o')!r}, "--ome-zarr", "-q"]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in res.stdout.splitlines() if ":" in line)
    for key in ("READ", "WRITE"):
        assert INSTALL_HINT in lines[key]
    assert "pip install napari-cpgcn[bioimageio]" in lines["BMZ"]
    assert "EXIT 2" in res.stdout and INSTALL_HINT in res.stderr
