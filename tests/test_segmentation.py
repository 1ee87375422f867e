"""Cell segmentation (classical + cellpose backends), mask folder CLI, and label matching."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from _weight_server import weight_server  # noqa: F401 - a fixture
from conftest import KAGGLE2021_IDS
from PIL import Image

from napari_cpgcn.classes import CHANNELS
from napari_cpgcn.cli import main
from napari_cpgcn.evaluation.matching import iou_table, match_labels, match_summary
from napari_cpgcn.io.hpa import HPAImage, read_image
from napari_cpgcn.io.masks import read_mask, write_mask
from napari_cpgcn.segmentation import (
    ClassicalParams,
    default_nucleus_diameter,
    make_params,
    resolve_cellpose_weights,
    segment_cells,
)

# --------------------------------------------------------------------------- helpers

#: (row, col) nucleus centres of the hand-made image: a grid of cells plus a touching pair.
CENTRES = [(40, 40), (40, 120), (40, 200), (120, 40), (120, 200), (200, 40), (200, 120),
           (200, 200), (120, 108), (120, 138)]


def cells_image(shape=(256, 256), centres=CENTRES, nucleus_r=10.0, cell_r=30.0, seed=0):
    """A (4, Y, X) uint8 HPA-like image: round nuclei (blue) in larger round cells (red, yellow).

    Cells that overlap are split at the perpendicular bisector (Voronoi), like touching cells.
    Returns the image and the true cell labels.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.stack([np.hypot(yy - cy, xx - cx) for cy, cx in centres])
    nearest = d.argmin(0)
    dmin = d.min(0)
    truth = np.where(dmin <= cell_r, nearest + 1, 0).astype(np.uint32)
    nuc = dmin <= nucleus_r
    # Cytoplasm: bright near the nucleus, dimmer at the edge; a dark seam between touching cells.
    second = np.sort(d, axis=0)[1] if len(centres) > 1 else np.full(shape, np.inf)
    seam = np.clip((second - dmin) / 4.0, 0, 1)
    cyto = (truth > 0) * (0.5 + 0.5 * (1 - dmin / cell_r)) * seam
    red = 20 + 150 * cyto * ~nuc
    yellow = 20 + 120 * cyto * ~nuc
    blue = 15 + 200 * nuc
    green = 10 + 60 * cyto
    data = np.stack([red, green, blue, yellow]).astype(np.float32)
    data += rng.normal(0, 4, data.shape)
    return np.clip(data, 0, 255).astype(np.uint8), truth


# --------------------------------------------------------------------------- classical


def test_hand_made_image_gives_one_cell_per_nucleus():
    data, truth = cells_image()
    labels = segment_cells(data, nucleus_diameter=20)
    assert labels.shape == truth.shape and labels.dtype == np.uint32
    assert labels.max() == len(CENTRES) == len(np.unique(labels)) - 1
    s = match_summary(labels, truth)
    assert s.f1 == 1.0 and s.mean_iou > 0.8
    # The touching pair (last two centres) is split, each cell holding its own nucleus.
    a, b = (labels[cy, cx] for cy, cx in CENTRES[-2:])
    assert a != b and a > 0 and b > 0


def test_accepts_hpa_image_and_odd_sizes():
    data, truth = cells_image(shape=(250, 263))
    image = HPAImage(data=data, image_id="x")
    for downscale in ("auto", 1, 2, 3):
        labels = segment_cells(image, nucleus_diameter=20, downscale=downscale)
        assert labels.shape == (250, 263)
        assert match_summary(labels, truth).f1 >= 0.9, downscale


def test_blank_and_noise_images_give_empty_labels():
    for data in (np.zeros((4, 64, 80), np.uint8), np.full((4, 64, 64), 200, np.uint16),
                 np.random.default_rng(1).poisson(3, (4, 128, 128)).astype(np.uint8),
                 np.random.default_rng(2).integers(0, 255, (4, 128, 128)).astype(np.uint8)):
        labels = segment_cells(data)
        assert labels.shape == data.shape[1:] and labels.dtype == np.uint32
        assert labels.max() == 0


def test_one_small_cell_in_a_large_empty_field():
    # Nuclei cover < 0.1 % of the image: Otsu alone would threshold the noise.
    data, truth = cells_image(shape=(400, 400), centres=[(200, 200)], nucleus_r=4, cell_r=12)
    clipped = np.where(data < 30, 0, data).astype(np.uint8)  # hot pixels on a zero background
    for image in (data, clipped):
        labels = segment_cells(image, nucleus_diameter=8)
        assert labels.max() == 1 and match_summary(labels, truth).f1 == 1.0
    assert segment_cells(clipped).max() == 1  # even with a 4x too large default diameter


def test_default_nucleus_diameter_scales_with_image():
    assert default_nucleus_diameter((512, 512)) == pytest.approx(43.5, abs=1)
    assert default_nucleus_diameter((2048, 2048)) == pytest.approx(4 * default_nucleus_diameter((512, 512)))


def test_bad_input_and_parameters_are_explained():
    with pytest.raises(ValueError, match=r"\(4, Y, X\)"):
        segment_cells(np.zeros((3, 32, 32)))
    with pytest.raises(ValueError, match="no parameter.*nucleus_size.*valid: nucleus_diameter"):
        segment_cells(np.zeros((4, 32, 32)), nucleus_size=3)
    with pytest.raises(ValueError, match="unknown segmentation method"):
        segment_cells(np.zeros((4, 32, 32)), method="unet")
    with pytest.raises(ValueError, match="downscale"):
        segment_cells(np.zeros((4, 32, 32)), downscale=0.5)
    assert isinstance(make_params("classical", downscale=None), ClassicalParams)


def test_synthetic_generator_images():
    from napari_cpgcn import synth
    f1 = []
    for seed in range(2):
        s = synth.generate_image(seed, size=256)
        labels = segment_cells(s.data)
        f1.append(match_summary(labels, s.cells).f1)
    assert np.mean(f1) >= 0.8, f1


@pytest.mark.parametrize("image_id", KAGGLE2021_IDS)
def test_real_images_against_hpa_reference(hpa_samples, image_id):
    image = read_image(hpa_samples / f"{image_id}_blue.png")
    ref = np.array(Image.open(hpa_samples / f"{image_id}_predictedmask.png"))
    labels = segment_cells(image)
    s = match_summary(labels, ref)
    assert s.f1 >= 0.8, s


# --------------------------------------------------------------------------- cellpose


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch):
    """Every cellpose download in this module goes to a closed port on 127.0.0.1, never out."""
    monkeypatch.setenv("NAPARI_CPGCN_CELLPOSE_URL", "http://127.0.0.1:9/models")


def test_cellpose_missing_weights_offline_fail_fast(tmp_path, monkeypatch):
    # Changed with on-demand downloads (issue 15): the message no longer says "never
    # downloaded"; it names the file, the URL that could not be reached and where to put it.
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "models"))
    data, _ = cells_image(shape=(64, 64), centres=[(32, 32)])
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        segment_cells(data, method="cellpose", model="cyto3")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert str(tmp_path / "models" / "cyto3") in msg and "'cyto3'" in msg
    assert "http://127.0.0.1:9/models/cyto3" in msg and "offline" in msg
    with pytest.raises(FileNotFoundError, match="nucleitorch_0"):
        segment_cells(data, method="cellpose", model="nuclei")
    with pytest.raises(FileNotFoundError, match="no such file"):
        segment_cells(data, method="cellpose", model=str(tmp_path / "my_model"))
    # Downloads switched off: the same advice, without touching the network.
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        segment_cells(data, method="cellpose", model="cyto3", download=False)


def test_cellpose_weights_lookup(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "cyto3").write_bytes(b"x")
    (models / "my_trained").write_bytes(b"x")
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(models))
    assert resolve_cellpose_weights("cyto3") == models / "cyto3"
    assert resolve_cellpose_weights("my_trained") == models / "my_trained"
    assert resolve_cellpose_weights(models / "my_trained") == models / "my_trained"
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "nucleitorch_0").write_bytes(b"x")
    assert resolve_cellpose_weights("nuclei", models_dir=other) == other / "nucleitorch_0"


def test_cellpose_cli_missing_weights_exit_1(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "models"))
    folder = tmp_path / "imgs"
    write_channels(folder, "a", cells_image(shape=(64, 64), centres=[(32, 32)])[0])
    t0 = time.perf_counter()
    assert main(["segment", str(folder), "--out", str(tmp_path / "out"), "--method", "cellpose", "-q"]) == 1
    assert time.perf_counter() - t0 < 10


@pytest.mark.slow
def test_cellpose_runs_with_a_local_random_weight_model(tmp_path, weight_server):  # noqa: F811
    """The whole cellpose path, the download included (random weights: only shape/dtype are checked).

    The random-weight file is served as ``cyto3`` from 127.0.0.1, fetched into an empty
    models folder by cellpose's downloader, loaded and run; then the same file by path.
    """
    from cellpose import models

    from napari_cpgcn.segmentation import cellpose_backend

    net = models.CellposeModel(gpu=False, pretrained_model=False)
    path = tmp_path / "random_cp3"
    net.net.save_model(str(path))
    url, requests = weight_server({"cyto3": path.read_bytes()})
    data, _ = cells_image(shape=(96, 128), centres=[(48, 40), (48, 90)], nucleus_r=8, cell_r=20)
    models_dir = tmp_path / "models"
    labels = segment_cells(data, method="cellpose", model="cyto3", models_dir=str(models_dir),
                           url_base=url, diameter=40, gpu=False)
    assert labels.shape == (96, 128) and labels.dtype == np.uint32
    assert (models_dir / "cyto3").read_bytes() == path.read_bytes() and requests == ["/cyto3"]
    labels = segment_cells(data, method="cellpose", model=str(path), diameter=40, gpu=False)
    assert labels.shape == (96, 128) and labels.dtype == np.uint32
    # The model object is cached: a second call does not load it again.
    info = cellpose_backend.load_cellpose_model.cache_info()
    segment_cells(data, method="cellpose", model=str(path), diameter=40, gpu=False)
    assert cellpose_backend.load_cellpose_model.cache_info().hits == info.hits + 1
    assert requests == ["/cyto3"]  # the cached file is used, nothing fetched again


# --------------------------------------------------------------------------- folder + CLI


def write_channels(folder: Path, image_id: str, data: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for c, plane in zip(CHANNELS, data, strict=True):
        Image.fromarray(plane).save(folder / f"{image_id}_{c}.png")


def test_mask_roundtrip(tmp_path):
    small = np.arange(12, dtype=np.uint32).reshape(3, 4)
    write_mask(tmp_path / "a.tif", small)
    assert np.array_equal(read_mask(tmp_path / "a.tif"), small)
    big = np.array([[0, 70000]], dtype=np.uint32)
    write_mask(tmp_path / "b.tif", big)
    assert np.array_equal(read_mask(tmp_path / "b.tif"), big)
    assert not list(tmp_path.glob(".*tmp"))


def test_cli_segments_folder_skips_failures_and_resumes(tmp_path, caplog):
    folder = tmp_path / "images"
    data, truth = cells_image()
    write_channels(folder, "good", data)
    write_channels(folder, "blank", np.zeros((4, 64, 64), np.uint8))
    write_channels(folder, "broken", data)
    (folder / "broken_red.png").write_bytes(b"not a png")
    out = tmp_path / "masks"
    assert main(["segment", str(folder), "--out", str(out), "--nucleus-diameter", "20", "-q"]) == 3
    # The masks, plus (since issue 15) the per-image QC table; the broken image has neither.
    assert sorted(p.name for p in out.iterdir()) == ["blank.tif", "good.tif", "qc.csv"]
    good = read_mask(out / "good.tif")
    assert good.shape == truth.shape and good.max() == len(CENTRES)
    assert read_mask(out / "blank.tif").max() == 0
    assert any("broken" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    # Rerun: finished masks are skipped; with the broken image fixed everything is done.
    (folder / "broken_red.png").unlink()
    Image.fromarray(data[0]).save(folder / "broken_red.png")
    before = (out / "good.tif").stat().st_mtime_ns
    assert main(["segment", str(folder), "--out", str(out), "--nucleus-diameter", "20", "-q"]) == 0
    assert (out / "good.tif").stat().st_mtime_ns == before and (out / "broken.tif").exists()


def test_cli_usage_errors(tmp_path):
    assert main(["segment", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--downscale", "0.3"]) == 2
    assert main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "nuclei"]) == 2
    assert main(["segment", str(tmp_path), "--out", str(tmp_path / "o")]) == 1  # no images


# --------------------------------------------------------------------------- matching


def squares(*boxes, shape=(20, 20)):
    lab = np.zeros(shape, np.uint32)
    for i, (y0, x0, y1, x1) in enumerate(boxes, 1):
        lab[y0:y1, x0:x1] = i
    return lab


def test_matching_perfect_and_relabelled():
    true = squares((0, 0, 5, 5), (10, 10, 15, 20))
    s = match_summary(true, true)
    assert (s.precision, s.recall, s.f1, s.mean_iou) == (1.0, 1.0, 1.0, 1.0)
    swapped = np.where(true == 1, 7, np.where(true == 2, 3, 0)).astype(np.int32)
    pid, tid, iou = match_labels(swapped, true)
    assert pid.tolist() == [7, 3] and tid.tolist() == [1, 2] and iou.tolist() == [1.0, 1.0]


def test_matching_known_partial_case():
    true = squares((0, 0, 4, 4), (10, 0, 14, 4), (0, 10, 4, 14))
    # cell 1 exact; cell 2 shifted by 2 rows: inter 8, union 24 -> IoU 1/3;
    # cell 3 missed; one false positive far away.
    pred = squares((0, 0, 4, 4), (12, 0, 16, 4), (16, 16, 20, 20))
    pid, tid, iou = iou_table(pred, true)
    assert dict(zip(zip(pid.tolist(), tid.tolist(), strict=True), iou.tolist(), strict=True)) == {(1, 1): 1.0, (2, 2): pytest.approx(1 / 3)}
    s = match_summary(pred, true, threshold=0.6)
    assert (s.n_pred, s.n_true, s.tp, s.fp, s.fn) == (3, 3, 1, 2, 2)
    assert s.precision == pytest.approx(1 / 3) and s.recall == pytest.approx(1 / 3)
    assert s.f1 == pytest.approx(1 / 3) and s.mean_iou == 1.0
    s = match_summary(pred, true, threshold=0.3)
    assert s.tp == 2 and s.f1 == pytest.approx(2 / 3) and s.mean_iou == pytest.approx(2 / 3)


def test_matching_low_threshold_is_one_to_one():
    # One prediction covering two true cells half each: it may match only one of them.
    true = squares((0, 0, 4, 4), (0, 4, 4, 8))
    pred = squares((0, 0, 4, 8))
    pid, tid, iou = match_labels(pred, true, threshold=0.3)
    assert len(pid) == 1 and iou[0] == pytest.approx(0.5)


def test_matching_empty_and_errors():
    empty = np.zeros((5, 5), np.uint8)
    assert match_summary(empty, empty).f1 == 1.0
    s = match_summary(empty, squares((0, 0, 2, 2), shape=(5, 5)))
    assert (s.f1, s.fn, s.tp) == (0.0, 1, 0)
    with pytest.raises(ValueError, match="differ in shape"):
        match_summary(np.zeros((4, 4), int), np.zeros((5, 5), int))
    with pytest.raises(ValueError, match="integer"):
        match_summary(np.zeros((4, 4)), np.zeros((4, 4), int))
