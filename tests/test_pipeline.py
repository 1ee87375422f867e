"""End-to-end pipeline on tiny synthetic data: stages, resume, prediction, refinement clustering."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch  # noqa: E402

from napari_cpgcn.classes import N_CLASSES  # noqa: E402
from napari_cpgcn.events import EventKind  # noqa
from napari_cpgcn.io.celltable import PREDICTION_COLUMNS  # noqa


@pytest.fixture(scope="module")
def synth_data(tiny_data):
    return tiny_data


@pytest.fixture(scope="module")
def trained_run(tiny_trained):
    return tiny_trained


def _tiny():
    from napari_cpgcn.pipeline import PipelineConfig

    return PipelineConfig.tiny(image_size=64, epochs=1, device="cpu")


def _drain(events):
    return list(events)





def test_train_pipeline_stages_and_outputs(trained_run):
    from napari_cpgcn.pipeline import STAGES, finished_stages

    STAGES = tuple(s for s in STAGES if s != "pretrain")  # noqa: N806 (the stages of a run without pretraining)

    run, events = trained_run
    assert events[-1].kind == EventKind.DONE
    starts = [e.stage for e in events if e.kind == EventKind.STAGE_START]
    ends = [e.stage for e in events if e.kind == EventKind.STAGE_END]
    assert starts == list(STAGES) and ends == list(STAGES)
    # every event in a stage carries its stage tag
    assert all(e.stage in STAGES for e in events[:-1])
    assert {e.stage for e in events if e.kind == EventKind.EPOCH_END} == {"image_model", "refine", "cell_model"}
    for p in ("config.json", "stages.json", "image_model/best.pt", "refine/best.pt", "pseudolabels.csv",
              "cell_model/best.pt", "cell_model/latest.pt"):
        assert (run / p).is_file(), p
    assert len(list((run / "segmentation").glob("*.tif"))) == 8
    assert finished_stages(run) == list(STAGES)


def test_rerun_skips_finished_stages(trained_run, synth_data):
    from napari_cpgcn.pipeline import train_pipeline

    run, _ = trained_run
    mtime = (run / "cell_model" / "best.pt").stat().st_mtime_ns
    events = _drain(train_pipeline(synth_data / "images", synth_data / "train.csv", run, _tiny()))
    ends = [e for e in events if e.kind == EventKind.STAGE_END]
    assert len(ends) == len(_tiny().active_stages()) == 6 and all("skipped" in e.message for e in ends)
    assert not any(e.kind in (EventKind.EPOCH_START, EventKind.BATCH, EventKind.ITEM) for e in events)
    assert (run / "cell_model" / "best.pt").stat().st_mtime_ns == mtime


def test_changed_stage_settings_redo_that_stage_and_later(trained_run, synth_data, tmp_path):
    import shutil

    from napari_cpgcn.pipeline import train_pipeline

    run0, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    cfg = _tiny()
    cfg.pseudo.threshold = 0.7
    # without overwrite the run is refused before anything is touched, naming what differs
    from napari_cpgcn.pipeline import RunSettingsChanged

    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunSettingsChanged, match=r"pseudolabels: pseudo.threshold: 0.5 -> 0.7.*--overwrite"):
        _drain(train_pipeline(synth_data / "images", synth_data / "train.csv", run, cfg))
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    events = _drain(train_pipeline(synth_data / "images", synth_data / "train.csv", run, cfg, overwrite=True))
    skipped = [e.stage for e in events if e.kind == EventKind.STAGE_END and "skipped" in e.message]
    redone = [e.stage for e in events if e.kind == EventKind.STAGE_END and "skipped" not in e.message]
    assert skipped == ["image_model", "refine", "segmentation"]
    assert redone == ["pseudolabels", "cell_model", "fusion"]
    # the cell model was trained again from scratch, not resumed from the old latest.pt
    assert any(e.kind == EventKind.EPOCH_START and e.stage == "cell_model" for e in events)


def test_stop_then_resume(synth_data, tmp_path):
    """A stop during the image model ends the run with STOPPED; the rerun finishes it and no stage runs twice."""
    from napari_cpgcn.pipeline import finished_stages, train_pipeline

    flag = threading.Event()
    run = tmp_path / "run"
    events = []
    for ev in train_pipeline(synth_data / "images", synth_data / "train.csv", run, _tiny(), flag.is_set):
        events.append(ev)
        if ev.kind == EventKind.STAGE_END and ev.stage == "refine":
            flag.set()
    assert events[-1].kind == EventKind.STOPPED
    assert finished_stages(run) == ["image_model", "refine"]
    flag.clear()
    events = _drain(train_pipeline(synth_data / "images", synth_data / "train.csv", run, None, flag.is_set))
    ran = [e.stage for e in events if e.kind == EventKind.STAGE_END and "skipped" not in e.message]
    assert ran == ["segmentation", "pseudolabels", "cell_model", "fusion"]
    assert events[-1].kind == EventKind.DONE


def test_predictor_returns_a_row_per_cell(trained_run, synth_data):
    from napari_cpgcn.io.hpa import list_image_ids, read_image
    from napari_cpgcn.pipeline import CellPrediction, Predictor, predict
    from napari_cpgcn.pipeline.predictor import CPGCNPredictor

    run, _ = trained_run
    pred = CPGCNPredictor.from_run(run, device="cpu")
    assert isinstance(pred, Predictor)
    iid = list_image_ids(synth_data / "images")[0]
    img = read_image(synth_data / "images", image_id=iid)
    out = pred.predict(img)
    assert isinstance(out, CellPrediction)
    assert out.image_id == iid
    assert out.image_probs.shape == (N_CLASSES,)
    assert out.cams.shape == (N_CLASSES, *img.shape)
    assert out.cells.dtype == np.uint32 and out.cells.shape == img.shape
    ids = np.unique(out.cells)
    ids = ids[ids > 0]
    assert len(out.table) == len(ids) > 0
    assert list(out.table["cell_id"]) == list(ids)
    assert list(out.table.columns) == list(PREDICTION_COLUMNS)
    # fusion: fused = image x cell, kept with both parts
    np.testing.assert_allclose(out.fused_probs, out.cell_probs * out.image_probs[None], rtol=1e-6)
    # given cells (the truth mask) and no CAMs
    from napari_cpgcn.evaluation.cell import CellTruth

    truth = CellTruth.load(synth_data)
    cells = truth.mask(iid)
    out2 = predict(img.data, run, device="cpu", cells=cells, with_cams=False, image_id="x")
    assert out2.cams is None and len(out2.table) == len(np.unique(cells)) - 1
    assert (out2.table["image_id"] == "x").all()


def test_cluster_subcategories():
    from napari_cpgcn.training.subcategory import _sub_targets, cluster_subcategories

    rng = np.random.default_rng(0)
    # class 0: two well separated groups; class 1: a single image; class 2: absent
    f = np.concatenate([rng.normal([5, 0, 0], 0.1, (6, 3)), rng.normal([0, 5, 0], 0.1, (6, 3))])
    labels = np.zeros((12, N_CLASSES), np.uint8)
    labels[:, 0] = 1
    labels[0, 1] = 1
    a = cluster_subcategories(f, labels, k=2)
    assert len(set(a[:6, 0])) == 1 and len(set(a[6:, 0])) == 1 and a[0, 0] != a[6, 0]
    assert a[0, 1] == 0 and (a[1:, 1] == -1).all() and (a[:, 2] == -1).all()
    t = _sub_targets(a, 2)
    assert t.shape == (12, N_CLASSES * 2) and t.sum() == 13
    # K = 1: no clustering
    assert (cluster_subcategories(f, labels, k=1)[:, 0] == 0).all()


def test_pipeline_config_round_trip(tmp_path):
    from napari_cpgcn.pipeline import PipelineConfig

    cfg = PipelineConfig.tiny()
    cfg.save(tmp_path / "c.json")
    back = PipelineConfig.load(tmp_path / "c.json")
    assert back.to_dict() == cfg.to_dict()
    paper = PipelineConfig.paper()
    assert paper.refine.k == 10 and paper.refine.rounds == 3 and paper.cell.backbone == "resnet50"
    assert json.loads((tmp_path / "c.json").read_text())["cell"]["crop_size"] == 32


def test_train_cli_then_rerun_skips(synth_data, tmp_path):
    from napari_cpgcn.cli import main

    run = tmp_path / "clirun"
    argv = ["train", str(synth_data / "images"), "--labels", str(synth_data / "train.csv"), "--out", str(run),
            "--preset", "tiny", "--image-size", "64", "--epochs", "1", "--k", "2", "--device", "cpu", "-q"]
    assert main(argv) == 0
    stages = json.loads((run / "stages.json").read_text())["finished"]
    assert list(stages) == ["image_model", "refine", "segmentation", "pseudolabels", "cell_model", "fusion"]
    assert json.loads((run / "config.json").read_text())["refine"]["k"] == 2
    before = (run / "stages.json").read_text()
    assert main(argv) == 0
    assert (run / "stages.json").read_text() == before
    assert main(["train", str(synth_data / "images"), "--labels", str(synth_data / "train.csv"), "--out",
                 str(run), "--k", "0", "-q"]) == 2  # bad usage


def test_refinement_interrupt_and_resume_is_identical(trained_run, synth_data, tmp_path):
    """Stop inside round 2, rerun: round 1 is skipped, round 2 resumes; the refined model equals an
    uninterrupted run's."""
    from napari_cpgcn.training.checkpoint import load_checkpoint
    from napari_cpgcn.training.subcategory import RefineConfig, train_subcategory

    run, _ = trained_run
    ckpt = run / "image_model" / "best.pt"
    cfg = RefineConfig(k=2, rounds=2, epochs=2, batch_size=4, device="cpu")
    args = (synth_data / "images", synth_data / "train.csv")

    full = list(train_subcategory(*args, tmp_path / "a", ckpt, cfg))
    assert full[-1].kind == EventKind.DONE

    flag = threading.Event()
    events = []
    for ev in train_subcategory(*args, tmp_path / "b", ckpt, cfg, flag.is_set):
        events.append(ev)
        if ev.kind == EventKind.CHECKPOINT and "round 2" in ev.message:
            flag.set()
    assert events[-1].kind == EventKind.STOPPED
    assert (tmp_path / "b" / "round1" / "done.json").is_file()
    flag.clear()
    events = list(train_subcategory(*args, tmp_path / "b", ckpt, cfg, flag.is_set))
    assert any("round 1/2 finished earlier" in e.message for e in events)
    assert events[-1].kind == EventKind.DONE
    a = load_checkpoint(tmp_path / "a" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "best.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_refinement_keeps_the_image_models_learning_rate_groups():
    """The sub-class wrapper passes the base model's Adam groups on (slow label GCN), plus its head."""
    from napari_cpgcn.models import build_image_model
    from napari_cpgcn.training.config import ImageModelConfig
    from napari_cpgcn.training.subcategory import SubcategoryModel

    cfg = ImageModelConfig(backbone="resnet18", variant="cpgcn", image_size=32, gcn_lr_scale=0.01)
    base = build_image_model(cfg, np.eye(N_CLASSES, dtype=np.uint8), weights=None)
    model = SubcategoryModel(base, n_sub=N_CLASSES * 2)
    groups = model.param_groups(1e-3)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-5])
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(p) in {id(q) for q in groups[0]["params"]} for p in model.sub_head.parameters())


def test_fine_tune_a_pipeline_from_an_earlier_run(trained_run, synth_data, tmp_path):
    """starting_from(run): both backbones start from the earlier run's image and cell models."""
    from napari_cpgcn.pipeline import train_pipeline

    run, _ = trained_run
    cfg = _tiny().starting_from(run)
    run = run.resolve()
    assert cfg.image.init_from == cfg.cell.init_from == str(run)
    events = _drain(train_pipeline(synth_data / "images", synth_data / "train.csv", tmp_path / "ft", cfg))
    assert events[-1].kind == EventKind.DONE
    logs = " ".join(e.message or "" for e in events if e.kind == EventKind.LOG)
    assert str(run / "refine" / "best.pt") in logs  # the refined image model the run predicts with
    assert f"cell backbone initialised from {run / 'cell_model' / 'best.pt'}" in logs
    assert _tiny().starting_from(None).image.init_from is None
    # starting a run from itself would delete the models it starts from: refused up front
    with pytest.raises(ValueError, match="lies inside the run folder"):
        _drain(train_pipeline(synth_data / "images", synth_data / "train.csv", tmp_path / "ft",
                              _tiny().starting_from(tmp_path / "ft")))
    assert (tmp_path / "ft" / "image_model" / "best.pt").is_file()


def test_stage_keys_of_older_runs_are_stable():
    """Adding a config field must not make finished stages of existing runs look unfinished."""
    from napari_cpgcn.pipeline import PipelineConfig
    from napari_cpgcn.pipeline.train import _stage_keys

    # the default config.json of a run trained before gcn_residual / gcn_learn_inputs existed
    # (and became the default): its image-model stage keeps its key
    saved = PipelineConfig().to_dict()
    del saved["image"]["gcn_residual"], saved["image"]["gcn_learn_inputs"]
    assert _stage_keys(PipelineConfig.from_dict(saved))["image_model"] == "da9d751c9ca7c96c"
    # today's default (the residual classifier) is another model: another key
    assert _stage_keys(PipelineConfig())["image_model"] != "da9d751c9ca7c96c"


def test_starting_from_is_checked_before_training(trained_run, tmp_path):
    """The Train widget's 'Start from' goes through the same check (build_config, no Qt needed)."""
    from napari_cpgcn.pipeline import PipelineConfig

    run, _ = trained_run
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _tiny().starting_from(tmp_path / "nope")
    with pytest.raises(ValueError, match="resnet18 backbone but the image model here uses resnet34"):
        PipelineConfig.tiny(backbone="resnet34").starting_from(run)
    img_only = tmp_path / "img_only"  # a folder with an image model but no cell model
    (img_only / "image_model").mkdir(parents=True)
    shutil.copy(run / "image_model" / "best.pt", img_only / "image_model" / "best.pt")
    with pytest.raises(FileNotFoundError, match="holds no cell model to start from"):
        _tiny().starting_from(img_only)
    from napari_cpgcn._napari.widgets.train import build_config

    cfg = build_config("resnet18", 64, 1, 4, 2, 1, "cpu", preset="tiny (a test)", start_from=str(run))
    assert cfg.image.init_from == cfg.cell.init_from == str(run.resolve())
    assert build_config("resnet18", 64, 1, 4, 2, 1, "cpu", preset="tiny (a test)").image.init_from is None
