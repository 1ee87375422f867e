"""The npe2 reader: every real HPA format → four coloured layers; anything else → None."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import ARCHIVE_JPEG_IDS, KAGGLE2018_ID, KAGGLE2021_IDS

from napari_cpgcn._napari.layers import auto_contrast_limits
from napari_cpgcn._napari.reader import napari_get_reader
from napari_cpgcn.classes import CHANNELS

# (image id, expected shape, expected labels from ../shared/data/kaggle2021-train-labels.csv)
REAL_FORMATS = {
    "kaggle2021_png": (KAGGLE2021_IDS[0], (2048, 2048), [0, 1, 2, 7], "png"),
    "kaggle2018_png": (KAGGLE2018_ID, (512, 512), [5], "png"),
    "hpa_archive_jpeg": (ARCHIVE_JPEG_IDS[0], (2048, 2048), None, "jpg"),
    "cm4ai_jpeg": (ARCHIVE_JPEG_IDS[1], (2048, 2048), None, "jpg"),
}


def _check_layers(layers, image_id, shape, labels=None, dtype=np.uint8):
    assert len(layers) == 4
    for (data, kwargs, ltype), color in zip(layers, CHANNELS, strict=True):
        assert ltype == "image"
        assert data.shape == shape
        assert data.dtype == dtype
        assert kwargs["colormap"] == color
        assert kwargs["blending"] == "additive"
        assert kwargs["name"] == f"{image_id} {color}"
        lo, hi = kwargs["contrast_limits"]
        assert 0 <= lo < hi <= np.iinfo(dtype).max
        meta = kwargs["metadata"]
        assert meta["hpa_channel"] == color
        assert meta["hpa_role"] == "channel"
        assert meta["image_id"] == image_id
        assert meta["labels"] == labels


@pytest.mark.parametrize("fmt", sorted(REAL_FORMATS))
def test_real_format_loads_as_four_layers(hpa_samples, fmt):
    image_id, shape, labels, ext = REAL_FORMATS[fmt]
    path = str(hpa_samples / f"{image_id}_green.{ext}")
    reader = napari_get_reader(path)
    assert callable(reader)
    layers = reader(path)
    _check_layers(layers, image_id, shape, labels)


def test_archive_jpeg_signal_comes_from_colour_planes(hpa_samples):
    # The archive stores each channel as an RGB JPEG: the red layer must hold the red plane's
    # signal, not a grey conversion that would dim it by ~70 %.
    from PIL import Image

    image_id = ARCHIVE_JPEG_IDS[0]
    path = str(hpa_samples / f"{image_id}_red.jpg")
    layers = napari_get_reader(path)(path)
    rgb = np.asarray(Image.open(path))
    assert rgb.ndim == 3
    np.testing.assert_array_equal(layers[0][0], rgb[..., 0])


def test_real_formats_open_in_napari(make_napari_viewer, hpa_samples):
    viewer = make_napari_viewer()
    for image_id, _shape, _labels, ext in REAL_FORMATS.values():
        if image_id != KAGGLE2018_ID:  # the 2048² sets cost seconds; one viewer round trip suffices
            continue
        layers = viewer.open(str(hpa_samples / f"{image_id}_blue.{ext}"), plugin="napari-cpgcn")
        assert [ly.name for ly in layers] == [f"{image_id} {c}" for c in CHANNELS]
        assert [ly.colormap.name for ly in layers] == list(CHANNELS)
        assert all(ly.blending == "additive" for ly in layers)
        assert layers[2].metadata["labels"] == [5]


def test_all_four_files_selected_give_one_image(hpa_samples):
    paths = [str(hpa_samples / f"{KAGGLE2018_ID}_{c}.png") for c in CHANNELS]
    layers = napari_get_reader(paths)(paths)
    _check_layers(layers, KAGGLE2018_ID, (512, 512), [5])


@pytest.fixture
def one_image_folder(hpa_samples, tmp_path) -> Path:
    """A Kaggle-layout root: root/train.csv + root/images/{ID}_{color}.png (one image)."""
    images = tmp_path / "images"
    images.mkdir()
    for c in CHANNELS:
        shutil.copy(hpa_samples / f"{KAGGLE2018_ID}_{c}.png", images)
    (tmp_path / "train.csv").write_text(f"ID,Label\n{KAGGLE2018_ID},5|0\nother,3\n")
    return tmp_path


def test_folder_with_one_image_and_labels_one_level_up(one_image_folder):
    images = one_image_folder / "images"
    for path in (str(images), str(one_image_folder)):  # the images folder or the data set root
        reader = napari_get_reader(path)
        assert callable(reader), path
        _check_layers(reader(path), KAGGLE2018_ID, (512, 512), [0, 5])
    meta = napari_get_reader(str(images))(str(images))[1][1]["metadata"]
    assert meta["label_names"] == ["Nucleoplasm", "Nuclear bodies"]
    assert Path(meta["labels_csv"]).name == "train.csv"


def test_labels_csv_beside_images(one_image_folder):
    images = one_image_folder / "images"
    (one_image_folder / "train.csv").unlink()
    (images / "my_labels.csv").write_text(f"ID,Label\n{KAGGLE2018_ID},13\n")
    path = str(images / f"{KAGGLE2018_ID}_red.png")
    _check_layers(napari_get_reader(path)(path), KAGGLE2018_ID, (512, 512), [13])


def test_broken_labels_csv_is_ignored_not_fatal(one_image_folder):
    (one_image_folder / "train.csv").write_text(f"ID,Label\n{KAGGLE2018_ID},99\n")
    path = str(one_image_folder / "images")
    _check_layers(napari_get_reader(path)(path), KAGGLE2018_ID, (512, 512), None)


def test_multichannel_tiff_uses_ome_channel_names(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, size=(4, 64, 96), dtype=np.uint16)
    names = ["DAPI", "Tubulin", "Calreticulin", "Antibody"]  # blue, red, yellow, green
    path = tmp_path / "field_7.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX", "Channel": {"Name": names}})
    reader = napari_get_reader(str(path))
    assert callable(reader)
    layers = reader(str(path))
    _check_layers(layers, "field_7", (64, 96), None, dtype=np.uint16)
    by_color = {kw["metadata"]["hpa_channel"]: d for d, kw, _ in layers}
    np.testing.assert_array_equal(by_color["blue"], data[0])
    np.testing.assert_array_equal(by_color["red"], data[1])
    np.testing.assert_array_equal(by_color["yellow"], data[2])
    np.testing.assert_array_equal(by_color["green"], data[3])


def test_non_hpa_paths_return_none(hpa_samples, tmp_path):
    rng = np.random.default_rng(1)
    tifffile.imwrite(tmp_path / "grey.tif", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "rgb.tif", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), photometric="rgb")
    (tmp_path / "notes.txt").write_text("hello")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(hpa_samples / f"{KAGGLE2018_ID}_green.png", lonely)  # three channels missing
    empty = tmp_path / "empty"
    empty.mkdir()
    for p in [
        hpa_samples,  # several images: the browser's job, not the reader's
        hpa_samples / f"{KAGGLE2021_IDS[0]}_predictedmask.png",
        hpa_samples.parent / "README.md",
        tmp_path / "grey.tif",
        tmp_path / "rgb.tif",
        tmp_path / "notes.txt",
        tmp_path / "does_not_exist_red.png",
        lonely / f"{KAGGLE2018_ID}_green.png",
        lonely,
        empty,
    ]:
        assert napari_get_reader(str(p)) is None, p
    assert napari_get_reader([]) is None
    # one foreign file in a selection → not ours
    assert napari_get_reader([str(hpa_samples / f"{KAGGLE2018_ID}_red.png"), str(tmp_path / "grey.tif")]) is None


def test_contrast_limits_percentiles_and_dark_floor():
    rng = np.random.default_rng(2)
    plane = rng.integers(0, 50, size=(128, 128)).astype(np.uint8)
    plane[:2, :2] = 255  # 4 saturated pixels (0.02 %): clipped by the 99.95th percentile
    lo, hi = auto_contrast_limits(plane)
    assert lo <= 1 and 45 <= hi < 255
    dark = np.full((64, 64), 3, np.uint8)
    dark[0, 0] = 5
    lo, hi = auto_contrast_limits(dark)
    assert hi >= 0.05 * 255  # noise in an empty channel is not stretched into "staining"
    lo, hi = auto_contrast_limits(np.zeros((8, 8), np.float32))
    assert hi > lo
    lo, hi = auto_contrast_limits((rng.random((64, 64)) * 4000).astype(np.uint16))
    assert 0 <= lo < 100 and 3900 < hi <= 4000
