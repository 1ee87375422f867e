"""Bad input as users bring it: every case ends in a clear message naming the file and the fix,
the documented exit code, and no lost work; a folder run skips what it cannot use and goes on.

Read-only outputs use ``/sys/fs`` (a folder nobody can write in, root included); a full disk
uses ``/dev/full`` (every write fails with ENOSPC).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_cpgcn.classes import CHANNELS
from napari_cpgcn.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from napari_cpgcn.io.atomic import describe_os_error
from napari_cpgcn.io.hpa import HPAImageError, ImageIndex, list_image_ids, read_image
from napari_cpgcn.io.masks import write_mask
from napari_cpgcn.io.tables import LabelsCSVError, parse_label_string, read_labels_csv

READ_ONLY = Path("/sys/fs")


def _write_image(folder: Path, image_id: str, size: int = 32, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for c in CHANNELS:
        Image.fromarray(rng.integers(0, 200, (size, size), dtype=np.uint8)).save(folder / f"{image_id}_{c}.png")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from napari_cpgcn.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth"), 10, size=64, seed=11)


# ------------------------------------------------------------------------------------ reading


def test_mac_metadata_files_and_broken_links_are_named_not_read(tmp_path):
    _write_image(tmp_path, "a")
    (tmp_path / "._a_red.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _write_image(tmp_path, "b")
    (tmp_path / "b_yellow.png").unlink()
    os.symlink(tmp_path / "gone.png", tmp_path / "b_yellow.png")
    index = ImageIndex(tmp_path)
    assert index.ids == ["a"]
    assert "macOS" in index.skipped["._a_red.png"]
    assert "broken link" in index.skipped["b_yellow.png"]
    read_image(tmp_path, "a")  # the ._ file is not taken for a's red channel
    with pytest.raises(FileNotFoundError, match=r"missing the yellow channel file \(b_yellow.png: broken link\)"):
        read_image(tmp_path, "b")


def test_a_mask_beside_the_channel_files_is_not_an_image(tmp_path):
    _write_image(tmp_path, "a")
    write_mask(tmp_path / "a.tif", np.ones((32, 32), np.uint16))
    write_mask(tmp_path / "b_cells.tif", np.ones((32, 32), np.uint16))
    assert list_image_ids(tmp_path) == ["a"]
    assert read_image(tmp_path, "a").source_format == "channels"
    alone = tmp_path / "alone"
    write_mask(alone / "c.tif", np.ones((32, 32), np.uint16))
    with pytest.raises(HPAImageError, match="is a cell mask written by napari-cpgcn"):
        read_image(alone, "c")


def test_five_channel_tiff_is_called_five_channels_and_can_be_read_by_name(tmp_path):
    import tifffile

    data = np.random.default_rng(0).integers(0, 255, (5, 40, 40), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "five.tif", data)
    with pytest.raises(HPAImageError, match="5 channels, but an HPA image has 4.*'skip'"):
        read_image(tmp_path / "five.tif")
    img = read_image(tmp_path / "five.tif", channels=["red", "skip", "green", "blue", "yellow"])
    np.testing.assert_array_equal(img.data[1], data[2])
    tifffile.imwrite(tmp_path / "named.ome.tif", data, ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["Tubulin", "brightfield", "Protein", "DAPI", "ER"]}})
    np.testing.assert_array_equal(read_image(tmp_path / "named.ome.tif").data[2], data[3])


def test_a_png_over_the_pixel_limit_says_so(tmp_path, monkeypatch):
    from napari_cpgcn.io import hpa

    _write_image(tmp_path, "big", size=64)
    # The real guard is PIL's decompression-bomb check; lowering the reader's limit exercises
    # the same path without a 14000² test image.
    monkeypatch.setattr(hpa, "MAX_IMAGE_PIXELS", 2 * 1000)
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(HPAImageError, match="larger than this reader's limit.*TIFF"):
        read_image(tmp_path, "big")


def test_the_reader_accepts_stitched_fields_above_pils_default():
    from PIL import Image as PILImage

    from napari_cpgcn.io import hpa

    hpa._allow_large_images()
    assert PILImage.MAX_IMAGE_PIXELS is None or PILImage.MAX_IMAGE_PIXELS * 2 >= 14000 * 14000


def test_class_names_with_spaces_and_empty_labels(tmp_path):
    assert parse_label_string("Golgi apparatus|Nucleoplasm") == [7, 0]
    assert parse_label_string("golgi | nuclear  membrane") == [7, 1]
    assert parse_label_string("8 5 0") == [8, 5, 0]
    with pytest.raises(LabelsCSVError, match="unknown class 'Golgi aparatus'"):
        parse_label_string("Golgi aparatus")
    csv = tmp_path / "labels.csv"
    csv.write_text("ID,Label\na,Golgi apparatus|Cytosol\nb,\n")
    t = read_labels_csv(csv)
    assert t.labels[0].nonzero()[0].tolist() == [7, 16] and not t.labels[1].any()


# ------------------------------------------------------------------------------------ training


def _bad_copy(synth: Path, dest: Path) -> tuple[Path, Path, dict[str, str]]:
    """The synthetic set with five unusable images, and what each one's reason must say."""
    images = dest / "images"
    shutil.copytree(synth / "images", images)
    ids = sorted({p.name.rsplit("_", 1)[0] for p in images.glob("*_red.png")})
    a, b, c, d, e = ids[:5]
    green = (images / f"{a}_green.png").read_bytes()
    (images / f"{a}_green.png").write_bytes(green[: len(green) // 3])           # truncated
    (images / f"{b}_red.png").write_bytes(b"")                                 # zero bytes
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(images / f"{c}_blue.png")  # another size
    (images / f"{d}_yellow.png").unlink()                                     # a missing channel
    rows = (synth / "train.csv").read_text().splitlines()
    rows = [r if not r.startswith(f"{e},") else f"{e}," for r in rows]       # no label
    csv = dest / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    expect = {a: f"{a}_green.png", b: f"{b}_red.png", c: "different sizes", d: "missing the yellow",
              e: "no label"}
    return images, csv, expect


@pytest.mark.slow
def test_train_leaves_out_bad_images_and_finishes(synth, tmp_path):
    images, csv, expect = _bad_copy(synth, tmp_path / "data")
    run = tmp_path / "run"
    code = main(["train", str(images), "--labels", str(csv), "--out", str(run), "--preset", "tiny",
                 "--image-size", "64", "--epochs", "1", "--device", "cpu", "-q"])
    assert code == EXIT_OK
    import csv as csvlib

    with open(run / "image_model" / "skipped_images.csv", newline="") as fh:
        skipped = {r["image_id"]: r["reason"] for r in csvlib.DictReader(fh)}
    assert set(skipped) == set(expect)
    for image_id, needle in expect.items():
        assert needle in skipped[image_id], (image_id, skipped[image_id])
    import pandas as pd

    cells = pd.read_csv(run / "pseudolabels.csv")
    assert not set(cells.image_id) & set(expect)  # no later stage used them
    assert (run / "cell_model" / "best.pt").is_file()


def test_train_with_no_usable_image_fails_naming_the_list(synth, tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    ids = [r.split(",")[0] for r in (synth / "train.csv").read_text().splitlines()[1:3]]
    for i in ids:
        for c in CHANNELS:
            (images / f"{i}_{c}.png").write_bytes(b"")
    csv = tmp_path / "train.csv"
    csv.write_text("ID,Label\n" + "".join(f"{i},0\n" for i in ids))
    run = tmp_path / "run"
    code = main(["train-image", str(images), "--labels", str(csv), "--out", str(run), "--backbone", "resnet18",
                 "--image-size", "64", "--epochs", "1", "--device", "cpu", "--imagenet-weights", "none", "-q"])
    assert code == EXIT_FAILURE
    assert "none of the 2 labelled images" in caplog.text and "skipped_images.csv" in caplog.text
    assert (run / "skipped_images.csv").read_text().count("\n") == 3


# ------------------------------------------------------------------------------------ outputs


def test_segment_refuses_to_write_masks_among_the_images(tmp_path, caplog):
    _write_image(tmp_path / "imgs", "a", size=64)
    assert main(["segment", str(tmp_path / "imgs"), "--out", str(tmp_path / "imgs"), "-q"]) == EXIT_FAILURE
    assert "is the images folder" in caplog.text and "imgs_masks" in caplog.text
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == [f"a_{c}.png" for c in sorted(CHANNELS)]


@pytest.mark.parametrize("argv", [
    ["segment", "{imgs}", "--out", "{out}"],
    ["synth", "{out}", "--n-images", "1", "--size", "64"],
    ["train-image", "{imgs}", "--labels", "{csv}", "--out", "{out}", "--epochs", "1", "--image-size", "64",
     "--imagenet-weights", "none"],
    ["train", "{imgs}", "--labels", "{csv}", "--out", "{out}", "--preset", "tiny"],
])
@pytest.mark.parametrize("where", ["read-only", "a file"])
def test_unwritable_output_is_one_clear_message(argv, where, tmp_path, caplog):
    _write_image(tmp_path / "imgs", "a", size=64)
    (tmp_path / "labels.csv").write_text("ID,Label\na,0\n")
    if where == "read-only":
        out, needle = READ_ONLY, "permission denied"
    else:
        out = tmp_path / "a-file"
        out.write_text("my notes")
        needle = "is a file, not a folder"
    args = [a.format(imgs=tmp_path / "imgs", out=out, csv=tmp_path / "labels.csv") for a in argv]
    assert main([*args, "-q"]) == EXIT_FAILURE
    assert needle in caplog.text and str(out) in caplog.text
    assert "Traceback" not in caplog.text
    if where == "a file":
        assert out.read_text() == "my notes"


def test_predict_into_a_read_only_folder(tmp_path, caplog):
    from _fake_predictor import ThresholdPredictor

    from napari_cpgcn.batch import run_predict_folder
    from napari_cpgcn.io.atomic import OutputFolderError

    _write_image(tmp_path / "imgs", "a", size=48)
    with pytest.raises(OutputFolderError, match="permission denied"):
        run_predict_folder(tmp_path / "imgs", ThresholdPredictor(), READ_ONLY)


def test_full_disk_messages_and_a_quiet_log_file(capsys):
    import logging

    from napari_cpgcn.cli import setup_logging

    assert "the disk is full" in describe_os_error(OSError(errno.ENOSPC, "No space left on device"), "/x/cells.csv")
    assert "permission denied" in describe_os_error(PermissionError(errno.EACCES, "Permission denied"), "/x")

    class Args:
        quiet, verbose = False, False

    setup_logging(Args(), logfile="/dev/full")  # every write to it fails with ENOSPC
    log = logging.getLogger("napari_cpgcn.test")
    for i in range(50):
        log.info("message %d", i)
    err = capsys.readouterr().err
    assert err.count("is no longer written") == 1
    assert "Logging error" not in err and "message 49" in err


# ------------------------------------------------------------------------------------ predict


def test_mistyped_segmentation_is_a_usage_error_before_any_image(tmp_path, capsys):
    _write_image(tmp_path / "imgs", "a")
    run = tmp_path / "run"
    run.mkdir()
    assert main(["predict", str(tmp_path / "imgs"), "--model", str(run), "--out", str(tmp_path / "out"),
                 "--segmentation", "clasical"]) == EXIT_USAGE
    assert "invalid choice: 'clasical'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failed_run_does_not_lock_its_folder(tmp_path):
    """Every image failed (a setting that cannot work): nothing finished, so other settings may
    go into the folder; once an image is finished, mixing is refused."""
    from _fake_predictor import ThresholdPredictor

    from napari_cpgcn.batch import BatchConfigError, BatchOptions, run_predict_folder

    _write_image(tmp_path / "imgs", "a", size=48)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"settings": {"model_fingerprint": "other", "segmentation": "cellpose"}}))
    s = run_predict_folder(tmp_path / "imgs", ThresholdPredictor(), out, BatchOptions(segmentation="classical"))
    assert s.n_done == 1
    (out / "run.json").write_text(json.dumps({"settings": {"model_fingerprint": "other", "segmentation": "cellpose"}}))
    with pytest.raises(BatchConfigError, match="another model fingerprint"):
        run_predict_folder(tmp_path / "imgs", ThresholdPredictor(), out, BatchOptions(segmentation="classical"))


def test_missing_cellpose_weights_fail_once_not_per_image(tmp_path, monkeypatch, caplog):
    from _fake_predictor import ThresholdPredictor

    from napari_cpgcn.batch import BatchOptions, run_predict_folder

    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "no-models"))
    for i in range(3):
        _write_image(tmp_path / "imgs", f"i{i}", size=48, seed=i)

    class NeedsCellpose(ThresholdPredictor):
        segmentation = "cellpose"

    with pytest.raises(FileNotFoundError, match="cellpose"):
        run_predict_folder(tmp_path / "imgs", NeedsCellpose(), tmp_path / "out", BatchOptions())
    assert not list((tmp_path / "out").glob("parts/*.failed.json"))


# ------------------------------------------------------------------------------------ models


def test_model_given_as_a_checkpoint_inside_the_run(tmp_path):
    from napari_cpgcn.pipeline import resolve_model_path

    run = tmp_path / "run"
    (run / "image_model").mkdir(parents=True)
    (run / "cell_model").mkdir()
    (run / "config.json").write_text("{}")
    (run / "stages.json").write_text("{}")
    (run / "image_model" / "config.json").write_text("{}")  # train-image writes its own
    (run / "image_model" / "best.pt").write_bytes(b"")
    assert resolve_model_path(run / "image_model" / "best.pt") == run.resolve()
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "config.json").write_text("{}")
    (alone / "best.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="image model only.*--init-from"):
        resolve_model_path(alone / "best.pt")


def test_a_cell_model_of_another_class_set_gets_the_image_models_treatment(tmp_path):
    import torch

    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.models.cell import build_cell_model
    from napari_cpgcn.training.cell_trainer import CellModelConfig, _meta
    from napari_cpgcn.training.checkpoint import CheckpointError, load_cell_model, save_checkpoint

    torch.manual_seed(0)
    cfg = CellModelConfig(backbone="resnet18", crop_size=32, imagenet_weights=None, classes=tuple(SHORT_NAMES[:5]))
    model = build_cell_model(cfg, weights=None)
    save_checkpoint(tmp_path / "cell_model" / "best.pt", model.state_dict(), _meta(cfg), config=cfg.to_dict())
    with pytest.raises(CheckpointError, match="trained on 5 classes.*19 are needed"):
        load_cell_model(tmp_path)
