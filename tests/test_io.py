"""HPA image I/O: every real format, synthetic 8/16-bit, TIFF, and clear errors on bad input."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import ARCHIVE_JPEG_IDS, KAGGLE2018_ID, KAGGLE2021_IDS
from PIL import Image

from napari_cpgcn.classes import CHANNELS, CLASSES, N_CLASSES, class_by_name
from napari_cpgcn.io import (
    HPAImageError,
    find_channel_files,
    list_image_ids,
    read_image,
    read_labels_csv,
    read_multichannel_tiff,
    to_float,
)
from napari_cpgcn.io.tables import LabelsCSVError, LabelTable, write_labels_csv


def write_channels(folder: Path, image_id: str, data: np.ndarray, ext: str = "png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for c, plane in zip(CHANNELS, data, strict=True):
        Image.fromarray(plane).save(folder / f"{image_id}_{c}.{ext}")


def random_image(shape=(32, 40), dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max
    return rng.integers(0, hi, size=(4, *shape), dtype=dtype)


# --------------------------------------------------------------------------- real data
@pytest.mark.parametrize("image_id", KAGGLE2021_IDS)
def test_real_kaggle2021(hpa_samples, image_id):
    im = read_image(hpa_samples, image_id=image_id)
    assert im.data.shape == (4, 2048, 2048)
    assert im.data.dtype == np.uint8 and im.bit_depth == 8
    assert set(im.paths) == set(CHANNELS)
    assert im.paths["yellow"].name == f"{image_id}_yellow.png"
    # channels differ (not the same file read four times)
    assert not np.array_equal(im.data[0], im.data[2])


def test_real_kaggle2018(hpa_samples):
    im = read_image(hpa_samples / f"{KAGGLE2018_ID}_green.png")
    assert im.image_id == KAGGLE2018_ID
    assert im.data.shape == (4, 512, 512)


@pytest.mark.parametrize("image_id", ARCHIVE_JPEG_IDS)
def test_real_archive_jpeg_colour_planes(hpa_samples, image_id):
    im = read_image(hpa_samples, image_id=image_id)
    assert im.data.shape[0] == 4 and im.data.ndim == 3 and im.data.dtype == np.uint8
    # the red channel JPEG stores its signal in the R plane: our plane equals it
    rgb = np.array(Image.open(hpa_samples / f"{image_id}_red.jpg"))
    if rgb.ndim == 3:
        np.testing.assert_array_equal(im.data[0], rgb[..., 0])
    for k in range(4):
        assert im.data[k].max() > 50, f"channel {CHANNELS[k]} has no signal"


def test_list_ids_real(hpa_samples):
    ids = list_image_ids(hpa_samples)
    assert set(KAGGLE2021_IDS) | {KAGGLE2018_ID} | set(ARCHIVE_JPEG_IDS) == set(ids)
    # the reference masks are not mistaken for channels
    assert not any("predictedmask" in i for i in ids)


def test_real_train_csv(shared_data):
    t = read_labels_csv(shared_data / "kaggle2021-train-labels.csv")
    assert len(t) == 21806 and t.labels.shape == (21806, N_CLASSES)
    assert t.labels.sum(axis=1).min() >= 1
    assert t.row("5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0").nonzero()[0].tolist() == [0, 5, 8]


# --------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_roundtrip_png(tmp_path, dtype):
    data = random_image(dtype=dtype)
    write_channels(tmp_path, "img1", data)
    im = read_image(tmp_path)  # folder of one image
    assert im.image_id == "img1"
    assert im.bit_depth == (16 if dtype == np.uint16 else 8)
    np.testing.assert_array_equal(im.data, data)


def test_archive_tif_gz(tmp_path):
    data = random_image(dtype=np.uint16)
    for c, plane in zip(CHANNELS, data, strict=True):
        raw = tmp_path / "x.tif"
        tifffile.imwrite(raw, plane)
        with open(raw, "rb") as src, gzip.open(tmp_path / f"12_A1_3_{c}.tif.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    im = read_image(tmp_path / "12_A1_3_blue.tif.gz")
    assert im.image_id == "12_A1_3"
    np.testing.assert_array_equal(im.data, data)


def test_multichannel_ome_tiff_order_from_metadata(tmp_path):
    data = random_image(dtype=np.uint16)
    # stored in the order blue, red, yellow, green with OME channel names
    order = ["DAPI", "Microtubules", "ER", "Protein"]
    stored = np.stack([data[2], data[0], data[3], data[1]])
    path = tmp_path / "field.ome.tif"
    tifffile.imwrite(path, stored, metadata={"axes": "CYX", "Channel": {"Name": order}}, ome=True)
    im = read_image(path)
    assert im.image_id == "field" and im.source_format == "tiff"
    np.testing.assert_array_equal(im.data, data)


def test_multichannel_tiff_explicit_order(tmp_path):
    data = random_image()
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data[[1, 0, 2, 3]], photometric="minisblack")
    im = read_multichannel_tiff(path, channels=["green", "red", "blue", "yellow"])
    np.testing.assert_array_equal(im.data, data)


def test_to_float():
    x = np.array([[0, 65535]], dtype=np.uint16)
    np.testing.assert_allclose(to_float(x), [[0.0, 1.0]])


# --------------------------------------------------------------------------- bad input
def test_missing_channel_names_colour(tmp_path):
    write_channels(tmp_path, "abc", random_image())
    (tmp_path / "abc_yellow.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing the yellow channel") as e:
        read_image(tmp_path / "abc_red.png")
    assert "abc" in str(e.value) and str(tmp_path) in str(e.value)


def test_channels_of_different_shapes(tmp_path):
    write_channels(tmp_path, "abc", random_image())
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "abc_green.png")
    with pytest.raises(HPAImageError, match=r"different sizes.*abc_green.png: 10x10"):
        read_image(tmp_path, image_id="abc")


def test_truncated_png(tmp_path):
    write_channels(tmp_path, "abc", random_image(shape=(64, 64)))
    p = tmp_path / "abc_blue.png"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(HPAImageError, match=r"abc_blue.png.*corrupt, truncated or not an image"):
        read_image(tmp_path, image_id="abc")


def test_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no HPA images.*ID_red.png"):
        read_image(tmp_path)
    assert list_image_ids(tmp_path) == []


def test_rgb_composite_refused(tmp_path):
    p = tmp_path / "composite.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(p)
    with pytest.raises(HPAImageError, match=r"composite.png.*RGB\) composite.*yellow"):
        read_image(p)


def test_three_channel_tiff_refused(tmp_path):
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, np.zeros((3, 16, 16), np.uint8), photometric="minisblack")
    with pytest.raises(HPAImageError, match=r"rgb.tif: 3 channels.*RGB composite"):
        read_image(p)


def test_folder_with_several_images_needs_id(tmp_path):
    write_channels(tmp_path, "a", random_image())
    write_channels(tmp_path, "b", random_image())
    with pytest.raises(HPAImageError, match="holds 2 images"):
        read_image(tmp_path)
    assert list_image_ids(tmp_path) == ["a", "b"]
    assert set(find_channel_files(tmp_path, "b")) == set(CHANNELS)


def test_images_subfolder_resolved(tmp_path):
    write_channels(tmp_path / "images", "a", random_image())
    assert list_image_ids(tmp_path) == ["a"]


# --------------------------------------------------------------------------- labels CSV
def test_labels_csv_roundtrip(tmp_path):
    labels = np.zeros((2, N_CLASSES), np.uint8)
    labels[0, [0, 5]] = 1
    labels[1, 18] = 1
    p = tmp_path / "train.csv"
    write_labels_csv(p, LabelTable(["x", "y"], labels))
    assert p.read_text().splitlines() == ["ID,Label", "x,0|5", "y,18"]
    t = read_labels_csv(p)
    np.testing.assert_array_equal(t.labels, labels)


def test_labels_csv_unknown_class(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("ID,Label\na,0|3\nb,7|25\n")
    with pytest.raises(LabelsCSVError, match=r"train.csv:3: unknown class id 25"):
        read_labels_csv(p)


def test_labels_csv_kaggle2018_header(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("Id,Target\na,0 3\n")
    with pytest.raises(LabelsCSVError, match="Kaggle 2018"):
        read_labels_csv(p)


def test_labels_csv_duplicate_id(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("ID,Label\na,0\na,1\n")
    with pytest.raises(LabelsCSVError, match="listed twice"):
        read_labels_csv(p)


def test_class_catalogue():
    assert len(CLASSES) == 19 and CLASSES[18].name == "Negative"
    assert len({c.short for c in CLASSES}) == 19 and len({c.color for c in CLASSES}) == 19
    assert class_by_name("Golgi apparatus").index == 7
    assert class_by_name("er").index == 6
    with pytest.raises(KeyError):
        class_by_name("nonsense")
