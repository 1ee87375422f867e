"""Folder prediction engine: streaming, resume, atomic outputs, failures, assembly.

The engine's machinery is tested here with a small deterministic predictor defined in this
file (threshold + connected components, probabilities from channel means), so these tests
run in seconds; tests/test_cli.py runs the real trained pipeline through ``main([...])``.
"""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

# ---------------------------------------------------------------------------------------------
# A tiny deterministic predictor with the pipeline's predict() contract (test-only)
# ---------------------------------------------------------------------------------------------
from _fake_predictor import ThresholdPredictor  # noqa: E402
from _fake_predictor import write_image as _write_image  # noqa: E402

from napari_cpgcn.batch import (
    CELL_COLUMNS,
    IMAGE_COLUMNS,
    BatchConfigError,
    BatchOptions,
    ImageRecord,
    assemble_outputs,
    predict_folder,
    process_image,
    run_predict_folder,
)
from napari_cpgcn.batch import local as batch_local
from napari_cpgcn.batch import outputs as batch_outputs
from napari_cpgcn.classes import N_CLASSES, SHORT_NAMES
from napari_cpgcn.events import EventKind
from napari_cpgcn.io.masks import read_mask
from napari_cpgcn.io.rle import read_submission
from napari_cpgcn.pipeline import resolve_model_path


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    for i in range(7):
        _write_image(d, f"img{i:02d}", rng)
    return d


RUN_FILES = ("cells.csv", "images.csv", "failures.csv")


def _outputs(out: Path, names=RUN_FILES) -> dict[str, bytes]:
    files = {n: (out / n).read_bytes() for n in names}
    for f in sorted((out / "masks").glob("*.tif")):
        files[f"masks/{f.name}"] = tifffile.imread(f).tobytes()
    return files


def _no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------

def test_predict_folder_writes_every_output(folder, tmp_path):
    pred = ThresholdPredictor()
    out = tmp_path / "out"
    events = list(predict_folder(folder, pred, out, BatchOptions(batch_size=2, workers=2, save_cams=True)))
    kinds = [e.kind for e in events]
    assert kinds[0] == EventKind.STAGE_START and kinds[-1] == EventKind.DONE
    assert kinds.count(EventKind.ITEM) == 7
    summary = events[-1].result
    assert (summary.n_images, summary.n_done, summary.n_skipped, summary.n_failed) == (7, 7, 0, 0)
    assert set(summary.seconds_by_stage) >= {"read", "predict", "write"}

    cells = pd.read_csv(out / "cells.csv")
    assert list(cells.columns) == list(CELL_COLUMNS)
    images = pd.read_csv(out / "images.csv")
    assert list(images.columns) == list(IMAGE_COLUMNS)
    assert list(images.image_id) == [f"img{i:02d}" for i in range(7)]
    # one row per cell of each mask, ids matching the mask labels, image order then cell order
    for iid in images.image_id:
        assert tifffile.imread(out / "masks" / f"{iid}.tif").dtype == np.uint16  # ids fit: 16-bit on disk
        mask = read_mask(out / "masks" / f"{iid}.tif")
        assert mask.dtype == np.uint32 and mask.shape == (48, 48)
        ids = np.unique(mask)
        assert list(cells.loc[cells.image_id == iid, "cell_id"]) == list(ids[ids != 0])
        assert int(images.set_index("image_id").loc[iid, "n_cells"]) == len(ids) - 1
        cams = tifffile.imread(out / "cams" / f"{iid}.tif")
        assert cams.shape == (N_CLASSES, 48, 48) and cams.dtype == np.uint8
    assert summary.n_cells == len(cells) > 7
    # top_classes lists exactly the fused probabilities >= 0.5, best first
    fused = cells[[f"fused_{s}" for s in SHORT_NAMES]].to_numpy()
    for row, tc in zip(fused, cells.top_classes.fillna(""), strict=True):
        expect = [SHORT_NAMES[k] for k in np.argsort(-row, kind="stable") if row[k] >= 0.5]
        assert (tc.split("|") if tc else []) == expect
    assert (out / "failures.csv").read_text() == "image_id,stage,error\n"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["summary"]["n_done"] == 7
    assert _no_temp_files(out)


def test_rerun_skips_finished_images(folder, tmp_path):
    pred = ThresholdPredictor()
    out = tmp_path / "out"
    run_predict_folder(folder, pred, out)
    before = _outputs(out)
    assert pred.calls == 7
    summary = run_predict_folder(folder, pred, out)
    assert pred.calls == 7  # nothing predicted again
    assert (summary.n_done, summary.n_skipped) == (0, 7)
    assert _outputs(out) == before
    summary = run_predict_folder(folder, pred, out, BatchOptions(overwrite=True))
    assert pred.calls == 14 and summary.n_done == 7
    assert _outputs(out) == before


@pytest.mark.parametrize("crash_after", [0, 3])
def test_crash_then_resume_equals_uninterrupted_run(folder, tmp_path, monkeypatch, crash_after):
    ref = tmp_path / "ref"
    run_predict_folder(folder, ThresholdPredictor(), ref, BatchOptions(submission=True))

    # A run killed while writing image number crash_after + 1: after its mask, before its CSV part.
    out = tmp_path / "out"
    real = batch_outputs._write_csv
    n = {"cells": 0}

    def dying_write_csv(path, df):
        if path.name.endswith(".cells.csv"):
            if n["cells"] == crash_after:
                raise KeyboardInterrupt("simulated kill")
            n["cells"] += 1
        real(path, df)

    monkeypatch.setattr(batch_outputs, "_write_csv", dying_write_csv)
    with pytest.raises(KeyboardInterrupt):
        run_predict_folder(folder, ThresholdPredictor(), out, BatchOptions(submission=True, batch_size=1))
    monkeypatch.setattr(batch_outputs, "_write_csv", real)
    done = sorted(p.name for p in (out / "parts").glob("*.done.json"))
    assert len(done) == crash_after
    assert not (out / "cells.csv").exists()  # never a partial run-level CSV
    assert _no_temp_files(out)

    # what a SIGKILL mid-write leaves: a temporary file, never a file under its real name
    (out / "masks" / ".img06.tif.k1ll3d.tmp").write_bytes(b"half a tiff")
    pred = ThresholdPredictor()
    summary = run_predict_folder(folder, pred, out, BatchOptions(submission=True))
    assert _no_temp_files(out)
    assert summary.n_skipped == crash_after and summary.n_done == 7 - crash_after
    assert pred.calls == 7 - crash_after
    names = RUN_FILES + ("submission.csv",)
    assert _outputs(out, names) == _outputs(ref, names)


def test_corrupt_image_is_listed_and_run_goes_on(folder, tmp_path):
    (folder / "img03_green.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (folder / "img05_yellow.png").unlink()  # incomplete channel set
    out = tmp_path / "out"
    events = list(predict_folder(folder, ThresholdPredictor(), out))
    summary = events[-1].result
    assert (summary.n_done, summary.n_failed) == (5, 2)
    fails = pd.read_csv(out / "failures.csv")
    assert list(fails.image_id) == ["img03", "img05"]
    assert list(fails.stage) == ["read", "read"]
    assert "img03_green.png" in fails.error[0] and "yellow" in fails.error[1]
    assert sorted(pd.read_csv(out / "images.csv").image_id) == ["img00", "img01", "img02", "img04", "img06"]
    failed_items = [e for e in events if e.kind == EventKind.ITEM and e.result.status == "failed"]
    assert len(failed_items) == 2

    # Fixing the image and rerunning does only that image and clears the failure.
    _write_image(folder, "img03", np.random.default_rng(1))
    _write_image(folder, "img05", np.random.default_rng(2))
    pred = ThresholdPredictor()
    summary = run_predict_folder(folder, pred, out)
    assert pred.calls == 2 and summary.n_failed == 0 and summary.n_skipped == 5
    assert (out / "failures.csv").read_text() == "image_id,stage,error\n"
    assert len(pd.read_csv(out / "images.csv")) == 7


def test_predict_error_is_a_failure_not_a_crash(folder, tmp_path):
    class Flaky(ThresholdPredictor):
        def predict(self, image, **kw):
            if image.image_id == "img02":
                raise RuntimeError("out of memory (simulated)")
            return super().predict(image, **kw)

    summary = run_predict_folder(folder, Flaky(), tmp_path / "out")
    assert summary.n_failed == 1 and summary.failures[0].stage == "predict"
    assert "out of memory" in summary.failures[0].error


def test_memory_is_bounded_by_batch_size(tmp_path, monkeypatch):
    """Images in flight (read but not yet written) never exceed the read-ahead + write window."""
    rng = np.random.default_rng(3)
    d = tmp_path / "many"
    for i in range(30):
        _write_image(d, f"m{i:02d}", rng, size=24)
    live = {"n": 0, "max": 0}
    lock = threading.Lock()
    real_read, real_write = batch_local.read_input, batch_local.write_image_outputs

    def counting_read(input_dir, image_id):
        img = real_read(input_dir, image_id)
        with lock:
            live["n"] += 1
            live["max"] = max(live["max"], live["n"])
        return img

    def counting_write(*a, **k):
        rec = real_write(*a, **k)
        with lock:
            live["n"] -= 1
        return rec

    monkeypatch.setattr(batch_local, "read_input", counting_read)
    monkeypatch.setattr(batch_local, "write_image_outputs", counting_write)
    summary = run_predict_folder(d, ThresholdPredictor(), tmp_path / "out", BatchOptions(batch_size=2, workers=3))
    assert summary.n_done == 30
    # 2*batch_size read ahead + 1 being predicted + batch_size waiting for the writer (+1 writing)
    assert live["max"] <= 2 * 2 + 1 + 2 + 1


def test_stop_request_keeps_finished_images(folder, tmp_path):
    out = tmp_path / "out"
    seen = []

    def should_stop():
        return len(seen) >= 3

    events = []
    for ev in predict_folder(folder, ThresholdPredictor(), out, BatchOptions(batch_size=1), should_stop=should_stop):
        events.append(ev)
        if ev.kind == EventKind.ITEM:
            seen.append(ev)
    assert events[-1].kind == EventKind.STOPPED
    assert not (out / "cells.csv").exists()
    n_done = len(list((out / "parts").glob("*.done.json")))
    assert 3 <= n_done < 7
    summary = run_predict_folder(folder, ThresholdPredictor(), out, BatchOptions(batch_size=1))
    assert summary.n_skipped == n_done and summary.n_done == 7 - n_done


def test_other_settings_are_refused_on_resume(folder, tmp_path):
    out = tmp_path / "out"
    run_predict_folder(folder, ThresholdPredictor(), out)
    # the first run segmented the predictor's own way (None); classical is another setting
    with pytest.raises(BatchConfigError, match="--overwrite"):
        run_predict_folder(folder, ThresholdPredictor(), out, BatchOptions(segmentation="classical"))
    run_predict_folder(folder, ThresholdPredictor(), out, BatchOptions(segmentation="classical", overwrite=True))


def test_submission_decodes_to_the_masks(folder, tmp_path):
    out = tmp_path / "out"
    run_predict_folder(folder, ThresholdPredictor(), out)
    assert not (out / "submission.csv").exists()
    # asked for on the rerun: built from the finished images' masks and tables
    run_predict_folder(folder, ThresholdPredictor(), out, BatchOptions(submission=True))
    rows = read_submission(out / "submission.csv")
    cells = pd.read_csv(out / "cells.csv")
    assert [r.image_id for r in rows] == [f"img{i:02d}" for i in range(7)]
    for r in rows:
        mask = read_mask(out / "masks" / f"{r.image_id}.tif")
        assert (r.height, r.width) == mask.shape
        ids = [i for i in np.unique(mask) if i]
        assert len(r.predictions) == N_CLASSES * len(ids)
        rebuilt = np.zeros_like(mask)
        conf = {}
        for n, (k, c, m) in enumerate(r.masks()):
            cid = ids[n // N_CLASSES]
            assert np.array_equal(m, mask == cid)
            rebuilt[m] = cid
            conf[(cid, k)] = c
        assert np.array_equal(rebuilt, mask)
        tab = cells[cells.image_id == r.image_id].set_index("cell_id")
        for (cid, k), c in conf.items():
            assert c == pytest.approx(tab.loc[cid, f"fused_{SHORT_NAMES[k]}"], rel=1e-5, abs=1e-6)


def test_process_image_is_the_picklable_unit_of_work(folder, tmp_path):
    """What a Dask worker runs: same files as the streaming engine, records and options picklable."""
    opts = BatchOptions(submission=True)
    assert pickle.loads(pickle.dumps(opts)) == opts
    ref = tmp_path / "ref"
    run_predict_folder(folder, ThresholdPredictor(), ref, opts)
    out = tmp_path / "out"
    pred = ThresholdPredictor()
    ids = [f"img{i:02d}" for i in range(7)]
    recs = [process_image(folder, i, pred, out, opts) for i in reversed(ids)]  # any order
    assert all(isinstance(pickle.loads(pickle.dumps(r)), ImageRecord) for r in recs)
    assert {r.status for r in recs} == {"done"}
    assert process_image(folder, ids[0], pred, out, opts).status == "skipped"
    assemble_outputs(out, ids, opts)
    names = RUN_FILES + ("submission.csv",)
    assert _outputs(out, names) == _outputs(ref, names)


def test_empty_folder_and_bad_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no HPA images"):
        run_predict_folder(tmp_path / "empty", ThresholdPredictor(), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(tmp_path / "empty")
