"""Quality control of cell masks: mask_qc numbers, qc.csv in a segment folder, the CLI summary."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from napari_cpgcn.classes import CHANNELS
from napari_cpgcn.cli import main
from napari_cpgcn.segmentation import image_qc, mask_qc, segment_cells, segment_cells_with_qc
from napari_cpgcn.segmentation.folder import iter_segment_folder, qc_path
from napari_cpgcn.segmentation.qc import QC_CSV_COLUMNS, count_mismatch, read_qc_csv, write_qc_csv


def boxes(*bx, shape=(40, 40)):
    lab = np.zeros(shape, np.uint32)
    for i, (y0, x0, y1, x1) in enumerate(bx, 1):
        lab[y0:y1, x0:x1] = i
    return lab


def test_mask_qc_counts_border_cells_and_nuclei():
    cells = boxes((0, 0, 10, 10), (15, 15, 25, 25), (30, 30, 40, 40), (12, 0, 20, 6))
    nuclei = np.zeros_like(cells)
    nuclei[3:6, 3:6] = 1        # in cell 1
    nuclei[18:20, 18:20] = 2    # cell 2 holds two nuclei
    nuclei[21:23, 21:23] = 3
    nuclei[33:36, 33:36] = 4    # in cell 3; cell 4 has none
    nuclei[0:3, 30:33] = 5      # outside every cell
    qc = mask_qc(cells, nuclei)
    assert qc["n_cells"] == 4 and qc["n_border_cells"] == 3 and qc["border_fraction"] == 0.75
    assert qc["median_cell_area_px"] == 100.0 and qc["cell_coverage"] == pytest.approx(348 / 1600)
    assert (qc["n_nuclei"], qc["n_cells_without_nucleus"], qc["n_cells_multinucleate"],
            qc["n_nuclei_outside_cells"]) == (5, 1, 1, 1)
    assert qc["check_masks"] is False and qc["qc_note"] == ""  # 5 vs 4 is within max(2, 10 %)
    assert set(QC_CSV_COLUMNS[1:-2]) == set(qc)


def test_mask_qc_flags_counts_that_disagree():
    cells = boxes((0, 0, 20, 40))                   # one big cell ...
    nuclei = np.zeros_like(cells)
    for k, x in enumerate(range(2, 38, 7), 1):      # ... over six nuclei: cells were merged
        nuclei[8:12, x:x + 3] = k
    qc = mask_qc(cells, nuclei)
    assert qc["check_masks"] is True and "6 nuclei but 1 cells" in qc["qc_note"]
    assert mask_qc(cells)["check_masks"] is False and mask_qc(cells)["n_nuclei"] is None
    assert mask_qc(np.zeros((5, 5), np.uint16))["border_fraction"] == 0.0
    assert count_mismatch(10, 12) is False and count_mismatch(10, 14) is True
    assert count_mismatch(100, 111) is False and count_mismatch(100, 112) is True  # 10 % of the larger
    with pytest.raises(ValueError, match="2-D integer"):
        mask_qc(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="shape"):
        mask_qc(cells, nuclei[:5])


def test_mask_qc_handles_huge_label_ids():
    cells = np.zeros((8, 8), np.uint32)
    cells[2:5, 2:5] = 4_000_000_000
    nuclei = (cells > 0).astype(np.uint8)
    qc = mask_qc(cells, nuclei)
    assert qc["n_cells"] == 1 and qc["n_nuclei"] == 1 and qc["n_cells_without_nucleus"] == 0


def _synth(seed=301, size=256):
    synth = pytest.importorskip("napari_cpgcn.synth")
    return synth.generate_image(seed, size=size)


def test_segment_cells_with_qc_matches_segment_cells():
    s = _synth()
    res = segment_cells_with_qc(s.data)
    assert np.array_equal(res.cells, segment_cells(s.data))
    assert res.nuclei.shape == res.cells.shape and res.nuclei.dtype == np.uint32
    n = int(res.cells.max())
    # The nucleus of cell i is labelled i.
    for i in range(1, n + 1):
        assert (res.cells[res.nuclei == i] == i).mean() > 0.9
    assert res.qc["n_cells"] == n and res.qc["method"] == "classical" and res.qc["nucleus_diameter"] > 10
    # image_qc on a mask from elsewhere: here the same mask, so the same verdict.
    q = image_qc(s.data, res.cells)
    assert q["n_cells"] == n and q["check_masks"] == res.qc["check_masks"]
    # A mask that merged everything is flagged.
    merged = (res.cells > 0).astype(np.uint32)
    assert n > 5 and image_qc(s.data, merged)["check_masks"] is True


def test_qc_csv_round_trip(tmp_path):
    rows = {"b": mask_qc(boxes((0, 0, 3, 3)), boxes((1, 1, 2, 2))), "a": mask_qc(boxes((5, 5, 9, 9)))}
    rows["a"]["qc_note"] = "3 nuclei, 1 cell; odd"
    path = write_qc_csv(tmp_path / "qc.csv", rows)
    text = path.read_text().splitlines()
    assert text[0] == ",".join(QC_CSV_COLUMNS) and text[1].startswith("a,") and text[2].startswith("b,")
    back = read_qc_csv(path)
    assert back["b"]["n_cells"] == 1 and back["b"]["check_masks"] is False and back["a"]["n_nuclei"] is None
    assert back["a"]["qc_note"] == "3 nuclei, 1 cell; odd" and back["b"]["border_fraction"] == 1.0
    assert read_qc_csv(tmp_path / "missing.csv") == {}


def _write_channels(folder, image_id, data):
    folder.mkdir(parents=True, exist_ok=True)
    for c, plane in zip(CHANNELS, data, strict=True):
        Image.fromarray(plane).save(folder / f"{image_id}_{c}.png")


def test_segment_folder_writes_qc_csv_and_keeps_rows_on_rerun(tmp_path):
    s = _synth()
    folder = tmp_path / "images"
    _write_channels(folder, "one", s.data)
    _write_channels(folder, "blank", np.zeros((4, 64, 64), np.uint8))
    out = tmp_path / "masks"
    events = list(iter_segment_folder(folder, out))
    items = [e for e in events if e.kind.name == "ITEM"]
    assert {"n_cells", "n_nuclei", "border_fraction", "check_masks"} <= set(items[0].metrics)
    assert events[-1].result["qc"] == str(qc_path(out))
    rows = read_qc_csv(qc_path(out))
    assert set(rows) == {"one", "blank"} and rows["blank"]["n_cells"] == 0
    assert rows["one"]["n_cells"] == int(np.asarray(Image.open(out / "one.tif")).max())
    # A new image later: the rerun skips the two, keeps their rows and adds the third.
    _write_channels(folder, "two", s.data[:, :128, :128].copy())
    list(iter_segment_folder(folder, out))
    assert set(read_qc_csv(qc_path(out))) == {"one", "blank", "two"}
    # An old mask folder without qc.csv gets mask-only rows for the masks it skips.
    qc_path(out).unlink()
    list(iter_segment_folder(folder, out))
    rows = read_qc_csv(qc_path(out))
    assert rows["one"]["method"] == "existing mask" and rows["one"]["n_nuclei"] is None


def test_cli_summary_names_flagged_images(tmp_path, caplog):
    s = _synth()
    folder = tmp_path / "images"
    _write_channels(folder, "one", s.data)
    out = tmp_path / "masks"
    with caplog.at_level(logging.INFO):
        assert main(["segment", str(folder), "--out", str(out), "-q"]) == 0
    assert any("QC (" in r.getMessage() and "cut by the border" in r.getMessage() for r in caplog.records)
    # Make the table say the image is suspicious: the rerun's summary names it.
    rows = read_qc_csv(qc_path(out))
    rows["one"].update(check_masks=True, qc_note="9 nuclei but 2 cells")
    write_qc_csv(qc_path(out), rows)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["segment", str(folder), "--out", str(out), "-q"]) == 0
    assert any("check the mask of one: 9 nuclei but 2 cells" in r.getMessage() for r in caplog.records)
