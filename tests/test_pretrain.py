"""Self-supervised pretraining: it learns, resumes bit-identically, and starts the models it should."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightly")

from napari_cpgcn.events import EventKind  # noqa

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The smallest backbone: 1 M parameters, checkpoints of a few MB, 4x faster steps than resnet18.
BB = "mobilenet_v3_small"


@pytest.fixture(scope="module")
def synth_data(tiny_data):
    return tiny_data


def _config(**kw):
    from napari_cpgcn.training.pretrain import PretrainConfig

    base = dict(backbone=BB, image_size=64, crop_size=64, crop_scale=(0.3, 1.0), tiles_per_image=2,
                batch_size=8, epochs=6, lr=1e-3, hidden_dim=64, projection_dim=32, dino_out_dim=64, device="cpu")
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pretrained(synth_data, tmp_path_factory):
    from napari_cpgcn.training.pretrain import pretrain_backbone

    torch.set_num_threads(1)
    from napari_cpgcn.io.hpa import ImageIndex

    out = tmp_path_factory.mktemp("pretrain")
    _DATA.update(images=synth_data / "images", ids=ImageIndex(synth_data / "images").ids)
    # VICReg: at this size its loss falls the most steadily (SimCLR's needs larger batches)
    events = list(pretrain_backbone(synth_data / "images", out, _config(method="vicreg", epochs=4)))
    return out, events


def _fixed_views_loss(out, trained: bool) -> float:
    from napari_cpgcn.io.tables import LabelTable
    from napari_cpgcn.training.datasets import HPAImageDataset
    from napari_cpgcn.training.pretrain import PretrainConfig, _build_model, random_view

    cfg = PretrainConfig.load(out / "pretrain_config.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the initial weights of the run
        model = _build_model(cfg, 1)
    if trained:
        model.load_state_dict(_weights(out / "latest.pt"))
    g = torch.Generator().manual_seed(123)

    ds = HPAImageDataset(_DATA["images"], LabelTable(_DATA["ids"], np.zeros((len(_DATA["ids"]), 1))),
                         cfg.image_size)
    imgs = [ds.load(i) for i in range(len(ds))]
    model.train()  # batch statistics, as in training
    losses = []
    with torch.no_grad():
        for _ in range(4):
            v0 = torch.stack([random_view(x, cfg.crop_size, cfg.crop_scale, cfg.intensity_jitter, cfg.noise, g)
                              for x in imgs])
            v1 = torch.stack([random_view(x, cfg.crop_size, cfg.crop_scale, cfg.intensity_jitter, cfg.noise, g)
                              for x in imgs])
            losses.append(float(model(v0, v1)))
    return float(np.mean(losses))


_DATA: dict = {}


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_pretraining_lowers_its_loss_and_writes_a_backbone(pretrained):
    from napari_cpgcn.training.checkpoint import load_checkpoint
    from napari_cpgcn.training.pretrain import (
        PRETRAIN_KIND,
        PretrainConfig,
        pretrained_backbone_path,
    )

    out, events = pretrained
    assert events[-1].kind == EventKind.DONE
    res = events[-1].result
    losses = [e.metrics["train_loss"] for e in events if e.kind == EventKind.EPOCH_END]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert res.final_loss == pytest.approx(losses[-1]) and res.n_images == 8
    # It learns: on the same fixed views the trained weights have a lower loss than the initial
    # ones (the per-epoch losses of random views are too noisy to compare at this size).
    assert _fixed_views_loss(out, trained=True) < _fixed_views_loss(out, trained=False) - 0.3
    path = pretrained_backbone_path(out)
    assert path == out / "backbone.pt" and str(path) == res.backbone_path
    ckpt = load_checkpoint(path)  # digest-checked, weights_only
    assert ckpt["meta"]["kind"] == PRETRAIN_KIND and ckpt["meta"]["backbone"] == BB
    assert all(k.startswith("backbone.") for k in ckpt["model"])
    cfg = PretrainConfig.load(out / "pretrain_config.json")
    assert cfg.mean is not None and len(cfg.mean) == 4  # measured on the images
    assert (out / "history.csv").is_file() and (out / "latest.pt").is_file()


def test_a_pretrain_folder_starts_the_image_and_the_cell_model(pretrained, synth_data, tmp_path):
    from napari_cpgcn.models.backbone import Backbone
    from napari_cpgcn.pipeline import PipelineConfig
    from napari_cpgcn.training.checkpoint import load_backbone_weights, resolve_init_checkpoint
    from napari_cpgcn.training.config import ImageModelConfig
    from napari_cpgcn.training.image_trainer import train_image_model

    out, _ = pretrained
    saved = _weights(out / "backbone.pt")
    for stage in ("image_model", "cell_model"):
        assert resolve_init_checkpoint(out, stage) == out / "backbone.pt"
        fresh = Backbone(BB, weights=None)
        load_backbone_weights(fresh, out, BB, stage=stage)
        for k, v in fresh.state_dict().items():
            if k not in ("mean", "std"):  # the new model keeps its own input normalisation
                assert torch.equal(v, saved[f"backbone.{k}"]), k
    # the pipeline's start (train --init-from, the Train widget's "Start from"): both backbones
    cfg = PipelineConfig.tiny(backbone=BB, image_size=64, epochs=1, device="cpu").starting_from(out)
    assert cfg.image.init_from == cfg.cell.init_from == str(out.resolve())

    # and an image model trains from it
    icfg = ImageModelConfig(backbone=BB, variant="cnn", image_size=64, epochs=1, batch_size=4,
                            imagenet_weights=None, oaa=False, device="cpu", init_from=str(out))
    events = list(train_image_model(synth_data / "images", synth_data / "train.csv", tmp_path / "img", icfg))
    assert events[-1].kind == EventKind.DONE
    assert any(e.kind == EventKind.LOG and f"{BB} (" + str(out / "backbone.pt") in (e.message or "")
               for e in events)


def test_train_cli_starts_from_a_pretrain_folder(pretrained, synth_data, tmp_path):
    from napari_cpgcn.cli import main

    out, _ = pretrained
    run = tmp_path / "run"
    argv = ["train", str(synth_data / "images"), "--labels", str(synth_data / "train.csv"), "--out", str(run),
            "--preset", "tiny", "--backbone", BB, "--image-size", "64", "--epochs", "1", "--k", "2",
            "--device", "cpu", "--init-from", str(out), "-q"]
    assert main(argv) == 0
    log_text = (run / "train.log").read_text()
    assert f"cell backbone initialised from {out / 'backbone.pt'}" in log_text
    assert json.loads((run / "config.json").read_text())["image"]["init_from"] == str(out.resolve())


def test_a_pretrain_checkpoint_with_another_backbone_is_refused(pretrained, synth_data, tmp_path, caplog):
    from napari_cpgcn.cli import main
    from napari_cpgcn.pipeline import PipelineConfig
    from napari_cpgcn.training.checkpoint import CheckpointError

    out, _ = pretrained
    msg = f"self-supervised pretraining of a {BB} backbone, but the image model here uses resnet18"
    with pytest.raises(CheckpointError, match=msg):
        PipelineConfig.tiny(backbone="resnet18").starting_from(out)
    with pytest.raises(CheckpointError, match="cell model here uses resnet18"):  # the file itself, cell model
        cfg = PipelineConfig.tiny(backbone=BB)
        cfg.cell = cfg.cell.replace(backbone="resnet18")
        cfg.starting_from(out / "backbone.pt")
    caplog.set_level(logging.ERROR, logger="napari_cpgcn")
    common = ["--labels", str(synth_data / "train.csv"), "--backbone", "resnet18", "--image-size", "64",
              "--epochs", "1", "--device", "cpu", "--init-from", str(out), "-q"]
    assert main(["train", str(synth_data / "images"), "--out", str(tmp_path / "r"), "--preset", "tiny",
                 *common]) == 2
    assert msg in caplog.text and f"--backbone {BB}" in caplog.text
    assert not (tmp_path / "r" / "image_model").exists()  # refused before any training
    caplog.clear()
    assert main(["train-image", str(synth_data / "images"), "--out", str(tmp_path / "i"),
                 "--imagenet-weights", "none", *common]) == 1
    assert msg in caplog.text
    assert not (tmp_path / "i" / "latest.pt").exists()


def test_an_unfinished_pretraining_is_not_a_start(synth_data, tmp_path):
    import threading

    from napari_cpgcn.training.checkpoint import resolve_init_checkpoint
    from napari_cpgcn.training.pretrain import pretrain_backbone

    stop = threading.Event()
    events = []
    for ev in pretrain_backbone(synth_data / "images", tmp_path / "p", _config(epochs=2), stop.is_set):
        events.append(ev)
        if ev.kind == EventKind.EPOCH_END:
            stop.set()
    assert events[-1].kind == EventKind.STOPPED
    with pytest.raises(FileNotFoundError, match="has not finished.*--resume"):
        resolve_init_checkpoint(tmp_path / "p", "image_model")


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_interrupt_and_resume_gives_the_same_weights(synth_data, tmp_path, method):
    """A stop in the middle of epoch 2, then a resume, ends with the weights of an uninterrupted run."""
    import threading

    from napari_cpgcn.training.pretrain import pretrain_backbone

    cfg = _config(method=method, epochs=2)
    images = synth_data / "images"
    ref = list(pretrain_backbone(images, tmp_path / "a", cfg))
    assert ref[-1].kind == EventKind.DONE
    stop = threading.Event()
    for ev in pretrain_backbone(images, tmp_path / "b", cfg, stop.is_set):
        if ev.kind == EventKind.BATCH and ev.epoch == 2:
            stop.set()  # honoured after this batch: latest.pt keeps epoch 1
        last = ev
    assert last.kind == EventKind.STOPPED and not (tmp_path / "b" / "backbone.pt").exists()
    resumed = list(pretrain_backbone(images, tmp_path / "b", cfg))
    assert any("resumed from" in (e.message or "") for e in resumed)
    assert resumed[-1].kind == EventKind.DONE
    a, b = _weights(tmp_path / "a" / "backbone.pt"), _weights(tmp_path / "b" / "backbone.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if method == "byol":  # the momentum teacher resumed too
        la, lb = _weights(tmp_path / "a" / "latest.pt"), _weights(tmp_path / "b" / "latest.pt")
        teacher = [k for k in la if k.startswith("teacher_")]
        assert teacher and all(torch.equal(la[k], lb[k]) for k in teacher)
        assert int(la["step"]) == int(lb["step"]) == 4


def test_every_method_and_the_cell_views_run(synth_data, tmp_path):
    from napari_cpgcn.training.pretrain import METHODS, pretrain_backbone

    for method in METHODS:
        if method in ("simclr", "byol", "vicreg"):
            continue  # covered above
        events = list(pretrain_backbone(synth_data / "images", tmp_path / method, _config(method=method, epochs=1)))
        assert events[-1].kind == EventKind.DONE and np.isfinite(events[-1].result.final_loss), method
    events = list(pretrain_backbone(synth_data / "images", tmp_path / "cells",
                                    _config(views="both", epochs=1, crop_size=32)))
    res = events[-1].result
    assert events[-1].kind == EventKind.DONE and res.n_views > 8 * 2  # tiles and cell crops
    assert list((tmp_path / "cells" / "cells").glob("crops_*.npy"))


def test_views_keep_channels_apart():
    """The augmentation never mixes channels: a view of a one-channel image stays one-channel."""
    from napari_cpgcn.training.pretrain import random_view

    img = torch.zeros(4, 64, 64)
    img[1] = torch.rand(64, 64)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = random_view(img, 32, (0.2, 1.0), jitter=0.4, noise=0.0, generator=g)
        assert v.shape == (4, 32, 32) and float(v.min()) >= 0 and float(v.max()) <= 1
        assert float(v[[0, 2, 3]].max()) <= 0.04 + 1e-6  # at most the per-channel offset, no green leaks in
    a = random_view(img, 32, (0.2, 1.0), generator=torch.Generator().manual_seed(5))
    b = random_view(img, 32, (0.2, 1.0), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # seeded


def test_pretrain_cli(synth_data, tmp_path, caplog):
    from napari_cpgcn.cli import main
    from napari_cpgcn.training.pretrain import PretrainConfig

    out = tmp_path / "pt"
    argv = ["pretrain", str(synth_data / "images"), "--out", str(out), "--backbone", BB, "--epochs", "1",
            "--batch-size", "8", "--crop-size", "32", "--image-size", "64", "--device", "cpu", "--seed", "3", "-q"]
    assert main(argv) == 0
    assert (out / "backbone.pt").is_file() and (out / "pretrain.log").is_file()
    assert PretrainConfig.load(out / "pretrain_config.json").seed == 3
    caplog.set_level(logging.ERROR, logger="napari_cpgcn")
    assert main(argv) == 2  # never overwritten silently
    assert "already holds a finished pretraining" in caplog.text
    before = (out / "backbone.pt").read_bytes()
    assert main(["pretrain", str(synth_data / "images"), "--out", str(out), "--resume", "--epochs", "2", "-q"]) == 0
    assert json.loads((out / "pretrain.json").read_text())["epochs"] == 2  # trained one epoch longer
    assert (out / "backbone.pt").read_bytes() != before
    assert main(["pretrain", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "-q"]) == 2
    assert main(["pretrain", str(synth_data / "images"), "--out", str(tmp_path / "y"), "--crop-size", "8",
                 "-q"]) == 2


def test_train_with_a_pretrain_stage_and_a_chosen_fusion(synth_data, tmp_path):
    """``train --pretrain --fusion auto`` as the pipeline runs it: the pretrain stage first (keyed
    like the others), both models start from RUN/pretrain, the fusion stage writes fusion.json
    and the predictor's fused scores follow it."""
    import dataclasses

    import numpy as np

    from napari_cpgcn.events import EventKind
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.pipeline import PipelineConfig, finished_stages, train_pipeline
    from napari_cpgcn.pipeline import fusion as fusions
    from napari_cpgcn.pipeline.predictor import CPGCNPredictor

    run = tmp_path / "run"
    cfg = PipelineConfig.tiny(backbone=BB, image_size=64, epochs=1, device="cpu")
    # 8 images: a validation split of 0.6 leaves enough (4) validation images to choose a fusion on
    cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, val_fraction=0.6),
                              pretrain=_config(views="cells", crop_size=32, epochs=2), fusion="auto")
    events = list(train_pipeline(synth_data / "images", synth_data / "train.csv", run, cfg))
    assert events[-1].kind == EventKind.DONE
    starts = [e.stage for e in events if e.kind == EventKind.STAGE_START]
    assert starts[0] == "pretrain" and starts[-1] == "fusion"
    assert finished_stages(run)[0] == "pretrain" and (run / "pretrain" / "backbone.pt").is_file()
    saved = PipelineConfig.load(run / "config.json")
    assert saved.image.init_from == saved.cell.init_from == str((run / "pretrain").resolve())
    params = fusions.FusionParams.load(run / "fusion.json")
    assert params.method in fusions.FUSION_METHODS and "cv_mAP" in params.info
    predictor = CPGCNPredictor.from_run(run, device="cpu")
    assert predictor.fusion.method == params.method
    image = read_image(synth_data / "images", image_id=saved_ids(synth_data)[0])
    table = predictor.predict(image, with_cams=False).table
    from napari_cpgcn.classes import SHORT_NAMES

    parts = [table[[f"{p}_{s}" for s in SHORT_NAMES]].to_numpy(np.float32) for p in ("image", "cell", "fused")]
    np.testing.assert_allclose(parts[2], fusions.fuse(parts[0], parts[1], params=params), atol=1e-6)
    # the same run again: every stage finished, nothing redone
    again = list(train_pipeline(synth_data / "images", synth_data / "train.csv", run, cfg))
    assert all("skipped" in e.message for e in again if e.kind == EventKind.STAGE_END)


def saved_ids(data):
    from napari_cpgcn.io.hpa import list_image_ids

    return list_image_ids(data / "images")
