"""The ``napari-cpgcn`` command line through ``main([...])``: predict (real trained pipeline), help, info.

A tiny pipeline is trained once per session on synthetic data (``PipelineConfig.tiny()``),
then ``predict`` runs it on the real HPA samples and on synthetic folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_cpgcn import batch
from napari_cpgcn.batch import local as batch_local
from napari_cpgcn.classes import N_CLASSES, SHORT_NAMES
from napari_cpgcn.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, build_parser, main
from napari_cpgcn.io.masks import read_mask


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``predict --threads 1`` sets torch's threads process-wide: give other tests theirs back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------- help


def _subcommands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_subcommands_registered():
    assert {"predict", "info", "demo"} <= set(_subcommands())


@pytest.mark.parametrize("cmd", _subcommands())
def test_every_subcommand_has_help(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: napari-cpgcn {cmd}" in out and "--quiet" in out


def test_top_level_help_and_usage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("predict", "demo", "info"):
        assert cmd in out
    assert main([]) == EXIT_USAGE
    assert main(["predict"]) == EXIT_USAGE  # missing INPUT_DIR / --model / --out


def test_info_reports_versions_and_weight_folders(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["napari-cpgcn"]
    assert info["versions"]["torch"]
    assert info["devices"]["auto"] in ("cpu", "cuda", "mps")
    assert info["imagenet_weights"]["folder"].endswith("checkpoints")
    assert "resnet18" in info["imagenet_weights"]["found"]
    assert info["cellpose_models"]["folder"]
    assert main(["info"]) == 0
    assert "ImageNet weights: the torch hub cache" in capsys.readouterr().out


def test_predict_bad_usage(tmp_path, hpa_samples):
    assert main(["predict", str(tmp_path / "nope"), "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    # a folder that is not a trained run
    assert main(["predict", str(hpa_samples), "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == EXIT_USAGE


# ------------------------------------------------------------------------- a real trained run







def _predict(inp: Path, run: Path, out: Path, *extra: str) -> int:
    # one torch thread: far faster than two oversubscribed ones on a busy shared CI machine
    return main(["predict", str(inp), "--model", str(run), "--out", str(out), "-q", "--threads", "1", *extra])


@pytest.fixture(scope="module")
def synth_data(tiny_data) -> Path:
    return tiny_data


@pytest.fixture(scope="module")
def trained_run(tiny_trained) -> Path:
    return tiny_trained[0]


@pytest.fixture(scope="module")
def hpa_prediction(hpa_samples, trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred_hpa") / "out"
    assert _predict(hpa_samples, trained_run, out, "--submission") == EXIT_OK
    return out


def test_predict_real_samples_one_row_per_cell(hpa_prediction, hpa_samples):
    from napari_cpgcn.io.hpa import list_image_ids

    out = hpa_prediction
    ids = list_image_ids(hpa_samples)
    images = pd.read_csv(out / "images.csv")
    cells = pd.read_csv(out / "cells.csv")
    assert sorted(images.image_id) == sorted(ids)
    assert list(cells.columns) == list(batch.CELL_COLUMNS)
    total = 0
    for iid in ids:
        mask = read_mask(out / "masks" / f"{iid}.tif")
        labels = np.unique(mask)
        labels = labels[labels != 0]
        rows = cells[cells.image_id == iid]
        assert list(rows.cell_id) == list(labels), iid
        assert (rows.area.to_numpy() == np.bincount(mask.ravel())[labels]).all()
        total += len(labels)
    assert total == len(cells) > 0
    probs = cells[[f"{p}_{s}" for p in ("image", "cell", "fused") for s in SHORT_NAMES]].to_numpy()
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    # fused = image x cell (the method's fusion)
    for s in SHORT_NAMES[:3]:
        np.testing.assert_allclose(cells[f"fused_{s}"], cells[f"image_{s}"] * cells[f"cell_{s}"], rtol=1e-4, atol=1e-5)
    assert (out / "predict.log").stat().st_size > 0
    assert pd.read_csv(out / "failures.csv").empty


def test_submission_decodes_back_to_the_masks(hpa_prediction):
    from napari_cpgcn.io.rle import decode_binary_mask, read_submission

    out = hpa_prediction
    cells = pd.read_csv(out / "cells.csv")
    for row in read_submission(out / "submission.csv"):
        mask = read_mask(out / "masks" / f"{row.image_id}.tif")
        assert (row.height, row.width) == mask.shape
        ids = [int(i) for i in np.unique(mask) if i]
        assert len(row.predictions) == N_CLASSES * len(ids)
        rebuilt = np.zeros_like(mask)
        tab = cells[cells.image_id == row.image_id].set_index("cell_id")
        for n, (k, conf, enc) in enumerate(row.predictions):
            cid = ids[n // N_CLASSES]
            assert k == n % N_CLASSES
            assert conf == pytest.approx(tab.loc[cid, f"fused_{SHORT_NAMES[k]}"], rel=1e-5, abs=1e-6)
            if k == 0:  # the 19 triples of a cell share its mask string: decode it once
                first = enc
                m = decode_binary_mask(enc, row.height, row.width)
                assert not rebuilt[m].any()  # cells do not overlap
                rebuilt[m] = cid
            else:
                assert enc == first
        assert np.array_equal(rebuilt, mask), row.image_id


def _files(out: Path) -> dict[str, bytes]:
    files = {n: (out / n).read_bytes() for n in ("cells.csv", "images.csv", "failures.csv", "submission.csv")}
    for f in sorted((out / "masks").glob("*.tif")):
        files[f.name] = tifffile.imread(f).tobytes()
    return files


def test_killed_run_then_rerun_equals_uninterrupted_run(synth_data, trained_run, tmp_path, monkeypatch):
    images = synth_data / "images"
    ref = tmp_path / "ref"
    assert _predict(images, trained_run, ref, "--submission") == EXIT_OK

    out = tmp_path / "out"
    real = batch_local.write_image_outputs
    n = {"written": 0}

    def dies_after_4(*a, **k):  # the process is killed while writing the 5th image
        if n["written"] == 4:
            raise KeyboardInterrupt
        n["written"] += 1
        return real(*a, **k)

    monkeypatch.setattr(batch_local, "write_image_outputs", dies_after_4)
    assert _predict(images, trained_run, out, "--submission", "--batch-size", "1") == 130
    monkeypatch.setattr(batch_local, "write_image_outputs", real)
    assert len(list((out / "parts").glob("*.done.json"))) == 4
    assert not (out / "cells.csv").exists()
    assert not list(out.rglob("*.tmp"))

    assert _predict(images, trained_run, out, "--submission") == EXIT_OK
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["n_skipped"] == 4 and run["summary"]["n_done"] == 4
    assert _files(out) == _files(ref)


def test_corrupt_image_partial_exit_code(synth_data, trained_run, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synth_data / "images", images)
    ids = sorted({p.name.rsplit("_", 1)[0] for p in images.glob("*.png")})
    bad = ids[3]
    (images / f"{bad}_blue.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00truncated")
    out = tmp_path / "out"
    assert _predict(images, trained_run, out) == EXIT_PARTIAL
    fails = pd.read_csv(out / "failures.csv")
    assert list(fails.image_id) == [bad] and fails.stage[0] == "read"
    assert f"{bad}_blue.png" in fails.error[0]
    done = pd.read_csv(out / "images.csv")
    assert sorted(done.image_id) == [i for i in ids if i != bad]
    assert bad in (out / "predict.log").read_text()


def test_every_image_failing_is_a_failure(trained_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for color in ("red", "green", "blue", "yellow"):
        (images / f"broken_{color}.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert _predict(images, trained_run, out) == 1
    assert list(pd.read_csv(out / "failures.csv").image_id) == ["broken"]
    assert pd.read_csv(out / "cells.csv").empty


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-train", "6", "--n-test", "2", "--size", "96", "--epochs", "1",
            "--pretrain-epochs", "2", "--threads", "1", "-q"]
    assert main(args) == EXIT_OK
    printed = capsys.readouterr().out
    assert "image-level mAP" in printed and "cell-level mAP" in printed and "image model alone" in printed
    scores = json.loads((out / "demo.json").read_text())
    for key in ("image_map", "cell_map", "cell_map_product", "cell_map_cell_model_only", "cell_map_image_model_only"):
        assert 0.0 <= scores[key] <= 1.0, key
    # the run started from the self-supervised backbone, and records the fusion it was scored with
    assert scores["start"] == "self-supervised (pretrain stage)"
    assert (out / "run" / "pretrain" / "backbone.pt").is_file()
    assert json.loads((out / "run" / "config.json").read_text())["cell"]["init_from"] == str(
        (out / "run" / "pretrain").resolve())
    assert json.loads((out / "run" / "fusion.json").read_text())["method"] == scores["fusion"]
    cells = pd.read_csv(out / "predictions" / "cells.csv")
    assert len(cells) == scores["n_predicted_cells"] > 0
    assert cells.image_id.nunique() == 2
    assert (out / "run" / "cell_model").is_dir()
    # a rerun reuses the data, the trained stages and the predictions
    parts_before = sorted((out / "predictions" / "parts").iterdir())
    assert main(args) == EXIT_OK
    assert json.loads((out / "demo.json").read_text())["cell_map"] == scores["cell_map"]
    # weights that changed since (a retrained run) are not mixed with old predictions: redone
    import os

    ckpt = next((out / "run" / "cell_model").glob("*.pt"))
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    done = next((out / "predictions" / "parts").glob("*.done.json"))
    t_done = done.stat().st_mtime_ns
    assert main(args) == EXIT_OK
    assert done.stat().st_mtime_ns > t_done
    assert json.loads((out / "demo.json").read_text())["cell_map"] == scores["cell_map"]
    assert parts_before == sorted((out / "predictions" / "parts").iterdir())


def test_save_cams_writes_one_tiff_per_image(synth_data, trained_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    ids = sorted({p.name.rsplit("_", 1)[0] for p in (synth_data / "images").glob("*.png")})[:2]
    for iid in ids:
        for p in (synth_data / "images").glob(f"{iid}_*.png"):
            shutil.copy(p, images / p.name)
    out = tmp_path / "out"
    assert _predict(images, trained_run, out) == EXIT_OK
    assert not (out / "cams").exists()
    # asking for CAMs on a rerun redoes the images finished without them
    assert _predict(images, trained_run, out, "--save-cams") == EXIT_OK
    assert json.loads((out / "run.json").read_text())["summary"]["n_done"] == 2
    for iid in ids:
        with tifffile.TiffFile(out / "cams" / f"{iid}.tif") as tf:
            cams = tf.asarray()
            meta = json.loads(tf.pages[0].description)
        mask = read_mask(out / "masks" / f"{iid}.tif")
        assert cams.shape == (N_CLASSES, *mask.shape) and cams.dtype == np.uint8
        assert meta["classes"][0] == "Nucleoplasm" and len(meta["classes"]) == N_CLASSES
        assert cams.max() > 0
    # without --save-cams nothing is redone
    assert _predict(images, trained_run, out) == EXIT_OK
    assert json.loads((out / "run.json").read_text())["summary"]["n_skipped"] == 2


def test_info_follows_cellpose_env(tmp_path, monkeypatch, capsys):
    (tmp_path / "cyto3").write_bytes(b"x")
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    assert main(["info", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["cellpose_models"]
    assert c["folder"] == str(tmp_path) and c["files"] == ["cyto3"]


def test_train_image_init_from_an_earlier_run(synth_data, trained_run, tmp_path):
    """--init-from: a missing path is a usage error; a run folder starts the backbone from it."""
    base = ["train-image", str(synth_data), "--labels", str(synth_data / "train.csv"), "--backbone", "resnet18",
            "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--imagenet-weights", "none",
            "--device", "cpu", "-q"]
    assert main([*base, "--out", str(tmp_path / "a"), "--init-from", str(tmp_path / "missing")]) == EXIT_USAGE
    assert not (tmp_path / "a" / "latest.pt").exists()
    assert main([*base, "--out", str(tmp_path / "b"), "--init-from", str(trained_run)]) == EXIT_OK
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["init_from"] == str(trained_run.resolve())
    assert str(trained_run.resolve() / "refine" / "best.pt") in (tmp_path / "b" / "train-image.log").read_text()
