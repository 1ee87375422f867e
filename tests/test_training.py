"""Training engine, image trainer, OAA, checkpoints and inference on tiny random data."""

from __future__ import annotations

import argparse
import json
import shutil
import threading

import numpy as np
import pytest
import torch  # noqa: E402
from _tiny_hpa import make_tiny_dataset  # noqa: E402

from napari_cpgcn.classes import N_CLASSES  # noqa: E402
from napari_cpgcn.events import EventKind  # noqa
from napari_cpgcn.io.tables import read_labels_csv  # noqa: E402
from napari_cpgcn.pipeline.inference import predict_images  # noqa
from napari_cpgcn.training.checkpoint import (  # noqa
    CheckpointError,
    load_checkpoint,
    load_image_model,  # noqa
)
from napari_cpgcn.training.config import ConfigError, ImageModelConfig, TrainConfig  # noqa: E402
from napari_cpgcn.training.datasets import HPAImageDataset, invert_augmentation, split_ids  # noqa: E402
from napari_cpgcn.training.engine import resolve_device  # noqa
from napari_cpgcn.training.image_trainer import train_image_model  # noqa: E402
from napari_cpgcn.training.losses import focal_loss  # noqa: E402
from napari_cpgcn.training.oaa import OAAStore, load_oaa  # noqa: E402


def tiny_config(**kw) -> ImageModelConfig:
    base = dict(backbone="resnet18", variant="cpgcn", image_size=64, batch_size=4, epochs=2,
                imagenet_weights=None, gcn_hidden=32, device="cpu", seed=3)
    base.update(kw)
    return ImageModelConfig(**base)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_dataset(root, n_images=12, size=64)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A finished 2-epoch cpgcn run (events kept)."""
    img_dir, csv = tiny
    run = tmp_path_factory.mktemp("run")
    # lr 1e-4: six Adam steps at the default 1e-3 from random weights on 9 images overshoot.
    events = list(train_image_model(img_dir, csv, run, tiny_config(augment=False, oaa_threshold=0.0, lr=1e-4)))
    yield run, events
    shutil.rmtree(run, ignore_errors=True)  # checkpoints: free the disk for later modules


# ----------------------------------------------------------------------------- config, loss, data

def test_config_json_round_trip(tmp_path):
    cfg = tiny_config(crop_scale=(0.5, 0.9), mean=(0.1, 0.2, 0.3, 0.4), std=(1, 1, 1, 1), focal_alpha=0.25)
    cfg.save(tmp_path / "c.json")
    back = ImageModelConfig.load(tmp_path / "c.json")
    assert back == cfg
    d = cfg.to_dict()
    d["from_the_future"] = 1
    assert ImageModelConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match="backbone"):
        cfg.replace(backbone="alexnet")
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0).validate()


def test_focal_loss_values():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").sum()
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), bce)
    # one element by hand: logit 0, target 1 -> 0.25 * ln 2
    v = focal_loss(torch.zeros(1, 1), torch.ones(1, 1), gamma=2.0)
    assert float(v) == pytest.approx(0.25 * np.log(2))
    assert float(focal_loss(logits, target, gamma=2.0)) < float(bce)


def test_split_by_id_is_stable():
    ids = [f"id{i}" for i in range(200)]
    train, val = split_ids(ids, 0.2)
    assert set(train) | set(val) == set(ids) and not set(train) & set(val)
    assert 20 < len(val) < 60
    more = ids + [f"new{i}" for i in range(50)]
    train2, val2 = split_ids(list(reversed(more)), 0.2)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    t, v = split_ids(["a", "b"], 0.01)
    assert len(t) == 1 and len(v) == 1
    assert split_ids(["a", "b"], 0.0) == (["a", "b"], [])


def test_dataset_items_and_augmentation_inversion(tiny, tmp_path):
    img_dir, csv = tiny
    table = read_labels_csv(csv)
    ds = HPAImageDataset(img_dir, table, image_size=64, augment=False, cache_dir=tmp_path / "cache")
    item = ds[0]
    assert item["image"].shape == (4, 64, 64) and item["image"].dtype == torch.float32
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    assert item["target"].shape == (N_CLASSES,)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    torch.testing.assert_close(ds[0]["image"], item["image"])  # from the cache
    # A smooth image: the augmented view mapped back must match the crop region of the original.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    smooth = torch.stack([yy, xx, (yy + xx) / 2, yy * xx])
    aug_ds = HPAImageDataset(img_dir, table, image_size=64, augment=True, crop_scale=(0.4, 0.8))
    torch.manual_seed(0)
    for _ in range(6):
        view, aug = aug_ds._augment(smooth.clone())
        back, (y0, x0, y1, x1) = invert_augmentation(view, aug, 64)
        ref = smooth[:, y0:y1, x0:x1]
        for c in range(2):  # the y and x ramps identify orientation unambiguously
            r = np.corrcoef(back[c].flatten().numpy(), ref[c].flatten().numpy())[0, 1]
            assert r > 0.97, (aug, c, r)


def test_missing_images_are_named(tiny, tmp_path):
    img_dir, csv = tiny
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Label\nnot_there,0\n")
    with pytest.raises(FileNotFoundError, match="not_there"):
        list(train_image_model(img_dir, bad, tmp_path / "r", tiny_config()))


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ----------------------------------------------------------------------------- training

def test_two_epoch_run_lowers_loss_and_writes_run(trained):
    run, events = trained
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.EPOCH_END) == 2 and kinds[-1] == EventKind.DONE
    assert EventKind.BATCH in kinds and all(e.stage == "image_model" for e in events)
    ends = [e for e in events if e.kind == EventKind.EPOCH_END]
    assert np.isfinite(ends[1].metrics["train_loss"])
    assert {"train_loss", "val_loss", "val_mAP", "lr", "seconds"} <= set(ends[0].metrics)
    for f in ("latest.pt", "best.pt", "history.csv", "config.json", "split.json"):
        assert (run / f).is_file(), f
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"]) and len(split["train"]) + len(split["val"]) == 12
    cfg = ImageModelConfig.load(run / "config.json")
    assert cfg.mean is not None and len(cfg.mean) == 4
    ck = load_checkpoint(run / "latest.pt")
    assert ck["epoch"] == 2 and ck["meta"]["classes"][0] == "nucleoplasm"
    assert {"optimizer", "scaler", "rng", "config", "history", "model"} <= set(ck)
    assert ck["meta"]["backbone"] == "resnet18" and len(ck["meta"]["mean"]) == 4
    assert "gcn.adjacency" in ck["model"]


def test_training_lowers_the_training_loss(trained, tiny):
    """The focal loss on the training images (batch statistics, no augmentation) of the initial
    model — rebuilt from the same seed — is higher than that of the trained model."""
    from napari_cpgcn.models import build_image_model
    from napari_cpgcn.training.engine import seed_everything
    from napari_cpgcn.training.image_trainer import init_class_bias

    run, _ = trained
    cfg = ImageModelConfig.load(run / "config.json")
    split = json.loads((run / "split.json").read_text())
    table = read_labels_csv(tiny[1]).subset(split["train"])
    seed_everything(cfg.seed)
    initial = build_image_model(cfg, label_matrix=table.labels)
    init_class_bias(initial, table.labels)
    trained_model, _ = load_image_model(run / "latest.pt", "cpu")
    ds = HPAImageDataset(tiny[0], table, image_size=64)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    y = torch.stack([ds[i]["target"] for i in range(len(ds))])
    losses = []
    for m in (initial, trained_model):
        m.train()
        with torch.no_grad():
            losses.append(float(focal_loss(m(x)[0], y)))
    assert losses[1] < 0.9 * losses[0], losses


def test_adjacency_from_training_labels_only(trained, tiny):
    from napari_cpgcn.models import label_adjacency

    run, _ = trained
    table = read_labels_csv(tiny[1])
    split = json.loads((run / "split.json").read_text())
    ck = load_checkpoint(run / "latest.pt")
    expected = label_adjacency(table.subset(split["train"]).labels, 0.3)
    np.testing.assert_allclose(ck["model"]["gcn.adjacency"].numpy(), expected, rtol=1e-6)


def test_oaa_written_and_readable(trained):
    run, _ = trained
    split = json.loads((run / "split.json").read_text())
    m = load_oaa(run, split["train"][0])
    assert m is not None and m.shape == (N_CLASSES, 32, 32) and m.dtype == np.float32
    assert 0 <= m.min() and m.max() <= 1 and m.max() > 0
    assert load_oaa(run, split["val"][0]) is None  # validation images are not accumulated
    # the pipeline-level run folder works too
    assert load_oaa(run.parent, "nope") is None


def test_stop_is_honoured_within_one_batch(tiny, tmp_path):
    img_dir, csv = tiny
    flag = threading.Event()
    seen = []
    for ev in train_image_model(img_dir, csv, tmp_path / "run", tiny_config(epochs=3), flag.is_set):
        seen.append(ev.kind)
        if ev.kind == EventKind.BATCH:
            flag.set()
    assert seen.count(EventKind.BATCH) == 1 and seen[-1] == EventKind.STOPPED
    assert not (tmp_path / "run" / "latest.pt").exists()


def test_interrupt_and_resume_equals_uninterrupted(tiny, tmp_path):
    img_dir, csv = tiny
    cfg = tiny_config(epochs=3, augment=True, oaa_threshold=0.0)
    full = list(train_image_model(img_dir, csv, tmp_path / "a", cfg))
    assert full[-1].kind == EventKind.DONE
    flag = threading.Event()
    for ev in train_image_model(img_dir, csv, tmp_path / "b", cfg, flag.is_set):
        if ev.kind == EventKind.BATCH and ev.epoch == 2 and ev.batch == 2:
            flag.set()
        last = ev
    assert last.kind == EventKind.STOPPED
    assert load_checkpoint(tmp_path / "b" / "latest.pt")["epoch"] == 1
    resumed = list(train_image_model(img_dir, csv, tmp_path / "b", cfg))
    assert any("resumed" in e.message for e in resumed if e.kind == EventKind.LOG)
    assert resumed[-1].kind == EventKind.DONE
    a = load_checkpoint(tmp_path / "a" / "latest.pt")
    b = load_checkpoint(tmp_path / "b" / "latest.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    # OAA maps are the same too (the element-wise max is idempotent over the redone batches)
    for f in sorted((tmp_path / "a" / "oaa").glob("*.npy")):
        np.testing.assert_array_equal(np.load(f), np.load(tmp_path / "b" / "oaa" / f.name))
    # a finished run is not trained again
    again = list(train_image_model(img_dir, csv, tmp_path / "b", cfg))
    assert [e.kind for e in again][-1] == EventKind.DONE and EventKind.BATCH not in [e.kind for e in again]


def test_resume_with_another_backbone_is_refused(trained, tiny, tmp_path):
    import shutil

    run, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    with pytest.raises(CheckpointError, match="backbone"):
        list(train_image_model(tiny[0], tiny[1], copy, tiny_config(backbone="mobilenet_v3_small", epochs=3)))


# ----------------------------------------------------------------------------- OAA store

def test_oaa_store_accumulates_max_above_threshold(tmp_path):
    store = OAAStore(tmp_path / "oaa", n_classes=3, size=4, threshold=0.5)
    cams = torch.zeros(1, 3, 4, 4)
    cams[0, 0, 0, 0] = 1.0
    cams[0, 1] = 0.5
    probs = torch.tensor([[0.9, 0.9, 0.9]])
    target = torch.tensor([[1.0, 1.0, 0.0]])  # class 2 negative: never accumulated
    assert store.update(["x"], cams, probs, target) == 2
    cams2 = torch.zeros(1, 3, 4, 4)
    cams2[0, 0, 3, 3] = 1.0
    cams2[0, 1] = 0.25
    store.update(["x"], cams2, probs, target)
    store.update(["x"], torch.ones(1, 3, 4, 4), torch.tensor([[0.1, 0.1, 0.9]]), target)  # below threshold
    m = load_oaa(tmp_path, "x")
    assert m[0, 0, 0] == 1.0 and m[0, 3, 3] == 1.0 and m[0, 1, 1] == 0.0
    np.testing.assert_allclose(m[1], 0.5, atol=1 / 255)
    assert m[2].max() == 0
    # a horizontally flipped view is flipped back
    cams3 = torch.zeros(1, 3, 4, 4)
    cams3[0, 2, 1, 0] = 1.0
    store.update(["y"], cams3, probs, torch.ones(1, 3), torch.tensor([[0, 0, 1, 1, 0, 1, 0.0]]))
    assert load_oaa(tmp_path, "y")[2, 1, 3] == 1.0


# ----------------------------------------------------------------------------- checkpoints & inference

def test_load_image_model_and_predict(trained, tiny):
    run, _ = trained
    model, cfg = load_image_model(run, "cpu")
    assert cfg.variant == "cpgcn" and model.image_size == 64
    from napari_cpgcn.io.hpa import image_index

    index = image_index(tiny[0])
    imgs = [index.read(i) for i in index.ids[:3]]
    probs, cams = predict_images(model, imgs, batch_size=2)
    assert probs.shape == (3, N_CLASSES) and cams.shape == (3, N_CLASSES, 64, 64)
    assert ((0 <= probs) & (probs <= 1)).all() and cams.max() <= 1.0 + 1e-6
    # the same image alone gives the same probabilities (batching does not change results)
    p1, _ = predict_images(model, imgs[1:2])
    np.testing.assert_allclose(p1[0], probs[1], rtol=1e-4, atol=1e-6)
    for method in ("score", "gradcam"):
        p, c = predict_images(model, imgs[:2], cam_method=method, cam_size=None)
        assert c.shape == (2, N_CLASSES, 2, 2) and np.isfinite(c).all()
    big = np.zeros((4, 96, 80), np.uint8)
    _, cl = predict_images(model, [imgs[0], big])
    assert isinstance(cl, list) and cl[1].shape == (N_CLASSES, 96, 80)


def test_tampered_and_foreign_checkpoints_are_refused(trained, tmp_path):
    import torchvision

    run, _ = trained
    ck = torch.load(run / "best.pt", weights_only=True)
    key = next(k for k in ck["model"] if k.endswith("weight"))
    ck["model"][key] = ck["model"][key] + 0.01
    torch.save(ck, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="integrity"):
        load_image_model(tmp_path / "tampered.pt", "cpu")
    ck = torch.load(run / "best.pt", weights_only=True)
    ck["meta"]["classes"] = ck["meta"]["classes"][:-1]  # meta edited without the digest
    torch.save(ck, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="integrity"):
        load_image_model(tmp_path / "meta.pt", "cpu")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "tv.pt")
    with pytest.raises(CheckpointError, match="not a napari-cpgcn checkpoint"):
        load_image_model(tmp_path / "tv.pt", "cpu")
    torch.save({"format": "napari-cpgcn-checkpoint", "evil": argparse.Namespace(x=1)}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_image_model(tmp_path / "code.pt", "cpu")

    class RunsCode:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format": "napari-cpgcn-checkpoint", "model": RunsCode()}, tmp_path / "reduce.pt")
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_image_model(tmp_path / "reduce.pt", "cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_image_model(tmp_path / "junk.pt", "cpu")
    with pytest.raises(CheckpointError, match="classes"):
        load_image_model(run / "best.pt", "cpu", classes=["a", "b"])
    with pytest.raises(CheckpointError, match="backbone"):
        load_image_model(run / "best.pt", "cpu", backbone="resnet50")
    with pytest.raises(FileNotFoundError):
        load_image_model(tmp_path / "none", "cpu")


def test_cli_train_image(tiny, tmp_path):
    from napari_cpgcn.cli import main

    img_dir, csv = tiny
    out = tmp_path / "cli_run"
    args = ["train-image", str(img_dir.parent), "--labels", str(csv), "--out", str(out), "--backbone",
            "mobilenet_v3_small", "--variant", "cnn+cpm", "--epochs", "1", "--batch-size", "6",
            "--image-size", "64", "--device", "cpu", "--imagenet-weights", "none", "-q"]
    assert main(args) == 0
    assert (out / "best.pt").is_file() and (out / "train-image.log").is_file()
    cfg = ImageModelConfig.load(out / "config.json")
    assert cfg.backbone == "mobilenet_v3_small" and cfg.variant == "cnn+cpm" and cfg.epochs == 1
    # rerun with more epochs resumes with the run's own settings
    assert main(["train-image", str(img_dir), "--labels", str(csv), "--out", str(out), "--epochs", "2", "-q"]) == 0
    assert load_checkpoint(out / "latest.pt")["epoch"] == 2
    assert main(["train-image", str(img_dir), "--labels", str(csv), "--out", str(out), "--backbone", "vgg", "-q"]) == 2


def test_init_from_an_earlier_run_starts_with_its_backbone(trained, tiny, tmp_path):
    from napari_cpgcn.models.backbone import Backbone
    from napari_cpgcn.training.checkpoint import load_backbone_weights

    run, _ = trained
    fresh = Backbone("resnet18", weights=None)
    before = fresh.state_dict()["trunk.0.weight"].clone()
    used = load_backbone_weights(fresh, run, "resnet18")  # a run folder: its own best/latest
    assert used.parent == run
    saved = torch.load(used, weights_only=True)["model"]
    for k, v in fresh.state_dict().items():
        if k not in ("mean", "std"):  # the new run keeps its own input normalisation
            assert torch.equal(v, saved[f"backbone.{k}"]), k
    assert not torch.equal(before, fresh.state_dict()["trunk.0.weight"])
    # another backbone, an empty folder: clear errors
    with pytest.raises(CheckpointError, match="resnet18 backbone but the image model here uses resnet34"):
        load_backbone_weights(Backbone("resnet34", weights=None), run / "latest.pt", "resnet34")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image model to start from"):
        load_backbone_weights(fresh, tmp_path / "empty", "resnet18")

    # through the trainer: the new run says where its backbone came from and trains from there
    img_dir, csv = tiny
    cfg = tiny_config(variant="cnn", epochs=1, oaa=False, init_from=str(run / "latest.pt"))
    events = list(train_image_model(img_dir, csv, tmp_path / "ft", cfg))
    assert any(e.kind == EventKind.LOG and str(run / "latest.pt") in (e.message or "") for e in events)
    assert ImageModelConfig.load(tmp_path / "ft" / "config.json").init_from == str(run / "latest.pt")

    # resuming continues latest.pt: init_from is not loaded again (the source may be gone by now)
    (tmp_path / "gone.pt").write_bytes((run / "latest.pt").read_bytes())
    cfg2 = cfg.replace(epochs=2, init_from=str(tmp_path / "gone.pt"))
    (tmp_path / "gone.pt").unlink()
    events = list(train_image_model(img_dir, csv, tmp_path / "ft", cfg2, resume=True))
    assert events[-1].kind == EventKind.DONE
    assert any("only starts a fresh run" in (e.message or "") for e in events if e.kind == EventKind.LOG)


def test_oaa_updates_from_several_writers_are_not_lost(tmp_path, monkeypatch):
    """DDP ranks share the OAA folder and may update the same (padded) image at once.

    Six concurrent ``update`` calls on one image, each for another class, with the
    read–write window widened: every class must be in the file (without the lock in
    ``update`` all but one are lost). Threads stand in for processes: ``flock`` also
    excludes two ``open()`` of the lock file within one process.
    """
    import threading
    import time

    store = OAAStore(tmp_path, N_CLASSES, size=4, threshold=0.0)
    real_read = OAAStore.read

    def slow_read(self, image_id):
        arr = real_read(self, image_id)
        time.sleep(0.1)
        return arr

    monkeypatch.setattr(OAAStore, "read", slow_read)

    def one(cls):
        t = torch.zeros(1, N_CLASSES)
        t[0, cls] = 1.0
        store.update(["x"], torch.ones(1, N_CLASSES, 4, 4), t, t)

    threads = [threading.Thread(target=one, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    arr = real_read(store, "x")
    assert [int(arr[c].max()) for c in range(6)] == [255] * 6  # every writer's update is there
    assert int(arr[6:].max()) == 0 and not list(tmp_path.glob("*.tmp"))
