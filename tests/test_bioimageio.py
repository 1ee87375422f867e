"""bioimage.io packages of a really trained tiny run: written, tested with bioimageio.core, read back
for --init-from; and ``predict --ome-zarr`` through the CLI with that run."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import bioimageio.spec  # noqa: E402,F401  (the bioimageio extra is part of the test install)
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch  # noqa: E402
import yaml as yaml

from napari_cpgcn.classes import CLASS_NAMES, SHORT_NAMES  # noqa: E402
from napari_cpgcn.cli import EXIT_FAILURE, EXIT_OK, main  # noqa: E402
from napari_cpgcn.export.bioimageio import (  # noqa: E402
    CITATION_DOI,
    BioimageioExportError,
    PackageError,
    export_bioimageio,
    read_package_checkpoint,
    test_package,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")








@pytest.fixture(scope="module")
def synth_data(tiny_data) -> Path:
    return tiny_data


@pytest.fixture(scope="module")
def trained_run(tiny_trained) -> Path:
    return tiny_trained[0]


@pytest.fixture(scope="module")
def image_package(trained_run, tmp_path_factory) -> Path:
    return export_bioimageio(trained_run, tmp_path_factory.mktemp("bmz") / "image.zip", "image").path


def _rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as z:
        return yaml.safe_load(z.read("rdf.yaml"))


@pytest.mark.slow
def test_image_package_passes_bioimageio_core_test(image_package, trained_run):
    summary = test_package(image_package)
    assert summary.status == "passed", summary.format()
    tested = {d.loc[1] for d in summary.details if len(d.loc) > 1 and d.loc[0] == "weights"}
    assert tested == {"torchscript", "pytorch_state_dict"}

    rdf = _rdf(image_package)
    assert rdf["format_version"].startswith("0.5") and rdf["license"] == "BSD-3-Clause"
    assert any(c.get("doi") == CITATION_DOI for c in rdf["cite"])
    outputs = {o["id"]: o for o in rdf["outputs"]}
    assert set(outputs) == {"probabilities", "cams"}
    assert outputs["probabilities"]["axes"][1]["channel_names"] == list(SHORT_NAMES)
    ours = rdf["config"]["napari_cpgcn"]
    assert ours["class_names"] == list(CLASS_NAMES) and ours["backbone"] == "resnet18"
    # the preprocessing is the run's own normalisation (the model's buffers)
    from napari_cpgcn.training.checkpoint import load_image_model

    model, _ = load_image_model(trained_run / "refine" / "best.pt", "cpu")
    zmuv = next(p for p in rdf["inputs"][0]["preprocessing"] if p["id"] == "fixed_zero_mean_unit_variance")
    np.testing.assert_allclose(zmuv["kwargs"]["mean"], model.backbone.mean.flatten().numpy(), rtol=1e-6)
    np.testing.assert_allclose(zmuv["kwargs"]["std"], model.backbone.std.flatten().numpy(), rtol=1e-6)
    # the test tensors are napari-cpgcn's own predictions on the test input
    from napari_cpgcn.pipeline.inference import predict_images

    with zipfile.ZipFile(image_package) as z:
        x = np.load(z.open("test_input_image.npy"))
        want = np.load(z.open("test_output_probabilities.npy"))
        assert {"cover.png", "README.md"} <= set(z.namelist())
    probs, _ = predict_images(model, [x[0]])
    np.testing.assert_allclose(want, probs, atol=1e-6)


@pytest.mark.slow
def test_cell_package_through_the_cli(trained_run, tmp_path):
    out = tmp_path / "cell.zip"
    assert main(["export-bioimageio", str(trained_run), "--out", str(out), "--which", "cell", "-q"]) == EXIT_OK
    rdf = _rdf(out)  # the CLI ran bioimageio.core's test (it returns 1 when the test fails)
    assert [o["id"] for o in rdf["outputs"]] == ["probabilities"]
    assert rdf["inputs"][0]["id"] == "crop" and rdf["config"]["napari_cpgcn"]["kind"] == "cell"
    assert main(["export-bioimageio", str(trained_run), "--out", str(out), "--which", "cell", "-q"]) == EXIT_FAILURE
    assert main(["export-bioimageio", str(trained_run), "--out", str(tmp_path / "x.txt"), "-q"]) == EXIT_FAILURE


def test_init_from_package_starts_the_backbone(image_package, trained_run):
    from napari_cpgcn.models.backbone import Backbone
    from napari_cpgcn.training.checkpoint import load_backbone_weights, load_image_model

    fresh = Backbone("resnet18", weights=None)
    assert load_backbone_weights(fresh, image_package, "resnet18") == image_package
    exported, _ = load_image_model(trained_run / "refine" / "best.pt", "cpu")
    for k, v in exported.backbone.state_dict().items():
        if k not in ("mean", "std"):  # the new run keeps its own normalisation
            torch.testing.assert_close(fresh.state_dict()[k], v)
    # a whole pipeline can start from it (both backbones are checked up front)
    from napari_cpgcn.pipeline import PipelineConfig

    cfg = PipelineConfig.tiny().starting_from(image_package)
    assert cfg.image.init_from == str(image_package.resolve())


def _rewrite_rdf(src: Path, dst: Path, change) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "rdf.yaml":
                rdf = yaml.safe_load(data)
                change(rdf)
                data = yaml.safe_dump(rdf).encode()
            zout.writestr(item, data)
    return dst


def test_foreign_packages_are_refused_with_a_clear_message(image_package, tmp_path):
    five = ["nucleus", "cytoplasm", "membrane", "mitochondria", "negative"]

    def other_classes(rdf):
        rdf["config"]["napari_cpgcn"]["classes"] = five
        for o in rdf["outputs"]:
            o["axes"][1]["channel_names"] = five

    other = _rewrite_rdf(image_package, tmp_path / "other.zip", other_classes)
    with pytest.raises(PackageError, match=r"another class set \(5 classes.*19 classes here"):
        read_package_checkpoint(other)
    from napari_cpgcn.models.backbone import Backbone
    from napari_cpgcn.training.checkpoint import CheckpointError, load_backbone_weights

    with pytest.raises(CheckpointError, match="another class set"):  # the --init-from path
        load_backbone_weights(Backbone("resnet18", weights=None), other, "resnet18")
    with pytest.raises(PackageError, match="holds a resnet18 backbone but the model here uses resnet50"):
        read_package_checkpoint(image_package, backbone="resnet50")
    not_ours = _rewrite_rdf(image_package, tmp_path / "not_ours.zip", lambda rdf: rdf["config"].pop("napari_cpgcn"))
    with pytest.raises(PackageError, match="not one exported by napari-cpgcn"):
        read_package_checkpoint(not_ours)

    def tamper(rdf):
        rdf["weights"]["pytorch_state_dict"]["sha256"] = "0" * 64

    with pytest.raises(PackageError, match="does not match the SHA-256"):
        read_package_checkpoint(_rewrite_rdf(image_package, tmp_path / "tampered.zip", tamper))
    (tmp_path / "junk.zip").write_bytes(b"PK not really")
    with pytest.raises(PackageError, match="not a bioimage.io model package"):
        read_package_checkpoint(tmp_path / "junk.zip")


def test_export_refuses_what_it_cannot_write(trained_run, tmp_path):
    with pytest.raises(BioimageioExportError, match="does not exist"):
        export_bioimageio(trained_run, tmp_path / "missing" / "m.zip")
    with pytest.raises(BioimageioExportError, match="cannot be exported as the cell model.*not a cell model checkpoint .it holds an image model"):
        export_bioimageio(trained_run / "refine" / "best.pt", tmp_path / "m.zip", "cell")
    with pytest.raises(BioimageioExportError, match="nothing to export as the image model"):
        export_bioimageio(tmp_path, tmp_path / "m.zip", "image")


def test_predict_cli_writes_ome_zarr_with_a_trained_run(trained_run, synth_data, tmp_path):
    from napari_cpgcn._napari.reader import napari_get_reader
    from napari_cpgcn.io.omezarr import read_ome_zarr

    out = tmp_path / "pred"
    ids = sorted(p.name[: -len("_red.png")] for p in (synth_data / "images").glob("*_red.png"))[:2]
    inp = tmp_path / "inp"
    inp.mkdir()
    for i in ids:
        for f in (synth_data / "images").glob(f"{i}_*.png"):
            shutil.copy(f, inp / f.name)
    assert main(["predict", str(inp), "--model", str(trained_run), "--out", str(out), "--ome-zarr",
                 "-q", "--threads", "1"]) == EXIT_OK
    cells = pd.read_csv(out / "cells.csv", dtype={"image_id": str})
    cells["top_classes"] = cells["top_classes"].fillna("")
    for i in ids:
        z = read_ome_zarr(out / "zarr" / f"{i}.ome.zarr")
        np.testing.assert_array_equal(z.cells, tifffile.imread(out / "masks" / f"{i}.tif"))
        rows = cells[cells.image_id == i].reset_index(drop=True)
        pd.testing.assert_frame_equal(z.table, rows, check_dtype=False, rtol=1e-5)
        layers = napari_get_reader(str(z.path))(str(z.path))
        assert layers[-1][1]["features"]["index"].tolist() == rows.cell_id.tolist()
