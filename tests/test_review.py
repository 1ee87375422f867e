"""suggest (which cells to check next) and corrections.csv (the biologist's labels)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from napari_cpgcn.classes import N_CLASSES, NEGATIVE, SHORT_NAMES
from napari_cpgcn.cli import main
from napari_cpgcn.io.masks import write_mask
from napari_cpgcn.pipeline.predictor import CellPrediction
from napari_cpgcn.review.corrections import CorrectionError, CorrectionStore, read_corrections
from napari_cpgcn.review.suggest import read_suggestions, suggest_cells


def _grid(n: int) -> np.ndarray:
    """n square cells side by side (ids 1..n) in a 16 x 16n image."""
    m = np.zeros((16, 16 * n), np.uint32)
    for i in range(n):
        m[2:14, 16 * i + 2:16 * i + 14] = i + 1
    return m


@pytest.fixture
def pred_dir(tmp_path):
    """A prediction folder (cells.csv + masks/) of two images, made by the real table builder:
    every cell is confident except cell 3 of ``img_b``, whose cell model says 0.5 for golgi
    while the image model is sure (a deliberately ambiguous cell)."""
    out = tmp_path / "pred"
    tables = []
    for iid, n in (("img_a", 5), ("img_b", 4)):
        cells = _grid(n)
        write_mask(out / "masks" / f"{iid}.tif", cells)
        image_p = np.full(N_CLASSES, 0.01, np.float32)
        image_p[[0, 7]] = 0.99
        cell_p = np.full((n, N_CLASSES), 0.01, np.float32)
        cell_p[:, 0] = 0.99
        cell_p[:, 7] = 0.98
        if iid == "img_b":
            cell_p[2, 7] = 0.5
        tables.append(CellPrediction.from_parts(iid, cells, image_p, cell_p).table)
    pd.concat(tables).to_csv(out / "cells.csv", index=False)
    return out


def test_suggest_ranks_the_ambiguous_cell_first(pred_dir, tmp_path):
    out = tmp_path / "s.csv"
    assert main(["suggest", str(pred_dir), "--n", "3", "--strategy", "uncertainty", "--out", str(out)]) == 0
    s = read_suggestions(out)
    assert list(s.columns[:3]) == ["image_id", "cell_id", "reason"]
    assert len(s) == 3
    assert (s.image_id[0], int(s.cell_id[0])) == ("img_b", 3)
    assert "golgi" in s.reason[0].lower() or "gol" in s.reason[0].lower()
    assert s.uncertainty.is_monotonic_decreasing


@pytest.mark.parametrize("strategy", ["random", "diverse"])
def test_other_strategies_list_distinct_cells(pred_dir, strategy, tmp_path):
    out = tmp_path / "s.csv"
    assert main(["suggest", str(pred_dir), "--n", "20", "--strategy", strategy, "--out", str(out)]) == 0
    s = read_suggestions(out)
    assert len(s) == 9  # all the cells there are, each once
    assert not s.duplicated(["image_id", "cell_id"]).any()
    if strategy == "diverse":
        assert (s.image_id[0], int(s.cell_id[0])) == ("img_b", 3)


def test_random_is_seeded_and_differs_between_seeds(pred_dir):
    t = pd.read_csv(pred_dir / "cells.csv")
    a = suggest_cells(t, 4, "random", seed=1)
    b = suggest_cells(t, 4, "random", seed=1)
    c = suggest_cells(t, 4, "random", seed=2)
    assert a[["image_id", "cell_id"]].equals(b[["image_id", "cell_id"]])
    assert not a[["image_id", "cell_id"]].equals(c[["image_id", "cell_id"]])
    with pytest.raises(ValueError, match="unknown strategy"):
        suggest_cells(t, 4, "greedy")


def test_suggest_skips_corrected_cells_and_missing_folder(pred_dir, tmp_path):
    CorrectionStore(pred_dir).add("img_b", 3, [7])
    out = tmp_path / "s.csv"
    assert main(["suggest", str(pred_dir), "--n", "1", "--out", str(out)]) == 0
    assert (read_suggestions(out).image_id[0], int(read_suggestions(out).cell_id[0])) != ("img_b", 3)
    assert main(["suggest", str(tmp_path / "nope"), "--n", "1", "--out", str(out)]) == 1


def test_corrections_round_trip_undo_and_redo(pred_dir):
    store = CorrectionStore(pred_dir, who="tester")
    store.add("img_a", 1, [0, 7])
    store.add("img_a", 2, "18")
    store.add("img_a", 1, [2])            # a re-correction: the last row wins
    assert store.current()[("img_a", 1)].labels == (2,)
    rows = list(csv.DictReader(open(pred_dir / "corrections.csv")))
    assert [r["labels"] for r in rows] == ["0|7", "18", "2"]
    assert rows[0]["who"] == "tester" and rows[0]["when"].endswith("Z")
    again = CorrectionStore(pred_dir)     # reopened: the same corrections
    assert again.current() == store.current()
    assert store.undo().labels == (2,)
    assert store.current()[("img_a", 1)].labels == (0, 7)   # the earlier correction is back
    assert [c.labels for c in read_corrections(pred_dir)] == [(0, 7), (NEGATIVE,)]
    store.undo()
    store.undo()
    assert store.undo() is None
    assert read_corrections(pred_dir) == []
    assert not list(pred_dir.glob(".corrections.csv.*"))  # no temporary files left


@pytest.mark.parametrize(("row", "match"), [
    ("img_a,1,19", r"row 3: unknown class id 19"),
    ("img_a,1,0|18", r"row 3: Negative \(18\) excludes"),
    ("img_a,9,0", r"row 3: cell 9 is not in the mask of img_a"),
    ("img_z,1,0", r"row 3: image 'img_z' has no mask"),
    ("img_a,x,0", r"row 3: cell_id 'x' is not an integer"),
    ("img_a,1,", r"row 3: no labels"),
])
def test_bad_corrections_name_the_file_and_row(pred_dir, row, match):
    f = pred_dir / "corrections.csv"
    f.write_text(f"image_id,cell_id,labels,who,when\nimg_a,2,7,,\n{row}\n")
    with pytest.raises(CorrectionError, match=match) as e:
        read_corrections(pred_dir)
    assert str(f) in str(e.value)


def test_bad_new_correction_and_missing_pred_dir(pred_dir, tmp_path):
    store = CorrectionStore(pred_dir)
    with pytest.raises(CorrectionError, match="unknown class id 42"):
        store.add("img_a", 1, [42])
    with pytest.raises(CorrectionError, match="cell 77 is not in the mask"):
        store.add("img_a", 77, [1])
    assert not (pred_dir / "corrections.csv").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CorrectionStore(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no masks/"):
        CorrectionStore(tmp_path / "empty")


def test_a_killed_process_keeps_every_confirmed_correction(pred_dir):
    """A process killed (SIGKILL) right after confirming corrections: every one is on disk."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        from napari_cpgcn.review.corrections import CorrectionStore
        s = CorrectionStore({str(pred_dir)!r})
        for cid in (1, 2, 3, 4):
            s.add("img_a", cid, [cid])
        print("confirmed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == -9 and "confirmed" in p.stdout
    assert [(c.cell_id, c.labels) for c in read_corrections(pred_dir)] == [(k, (k,)) for k in (1, 2, 3, 4)]
    assert SHORT_NAMES[NEGATIVE]  # the class table the ids refer to
