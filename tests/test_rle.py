"""Kaggle 2021 mask encoding and submission files."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cpgcn.io.rle import (
    SubmissionRow,
    decode_binary_mask,
    encode_binary_mask,
    encode_label_image,
    read_submission,
    write_submission,
)


def _random_mask(rng, h, w):
    m = np.zeros((h, w), bool)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    m[y0:y0 + rng.integers(1, h // 2), x0:x0 + rng.integers(1, w // 2)] = True
    m &= rng.random((h, w)) > 0.2
    return m


@pytest.mark.parametrize("shape", [(64, 64), (37, 91), (1, 1)])
def test_round_trip_random(shape):
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = _random_mask(rng, *shape) if min(shape) > 1 else np.ones(shape, bool)
        enc = encode_binary_mask(m)
        assert isinstance(enc, str)
        back = decode_binary_mask(enc, *shape)
        assert back.shape == shape and back.dtype == bool
        np.testing.assert_array_equal(back, m)


def test_sample_submission_strings_decode_and_reencode(shared_data):
    """The competition's own strings decode (empty masks) and our encoder reproduces them byte for byte."""
    rows = read_submission(shared_data / "kaggle2021-sample-submission.csv")
    assert len(rows) > 500
    sizes = {}
    for r in rows:
        assert len(r.predictions) >= 1
        for k, _conf, enc in r.predictions:
            sizes[(r.height, r.width)] = enc
            assert 0 <= k < 19
    for (h, w), enc in sizes.items():
        m = decode_binary_mask(enc, h, w)
        assert m.shape == (h, w) and not m.any()
        assert encode_binary_mask(np.zeros((h, w), bool)) == enc  # same zlib level, same RLE


def test_non_square_orientation():
    """Column-major RLE: a mask in one corner decodes into the same corner (not transposed)."""
    m = np.zeros((20, 50), bool)
    m[2:5, 40:48] = True
    np.testing.assert_array_equal(decode_binary_mask(encode_binary_mask(m), 20, 50), m)


def test_encode_label_image():
    lab = np.zeros((30, 40), np.uint32)
    lab[2:10, 3:12] = 1
    lab[15:25, 20:35] = 3  # id 2 absent
    enc = encode_label_image(lab)
    assert sorted(enc) == [1, 3]
    for k, s in enc.items():
        np.testing.assert_array_equal(decode_binary_mask(s, 30, 40), lab == k)


def test_write_read_submission(tmp_path):
    lab = np.zeros((16, 24), np.uint32)
    lab[1:5, 1:6] = 1
    lab[8:14, 10:20] = 2
    enc = encode_label_image(lab)
    rows = [
        SubmissionRow("img_a", 24, 16, [(0, 0.91, enc[1]), (16, 0.25, enc[1]), (5, 0.5, enc[2])]),
        SubmissionRow("img_b", 24, 16, []),
    ]
    p = tmp_path / "submission.csv"
    write_submission(p, rows)
    assert p.read_text().splitlines()[0] == "ID,ImageWidth,ImageHeight,PredictionString"
    back = read_submission(p)
    assert [r.image_id for r in back] == ["img_a", "img_b"]
    assert back[0].predictions[0][:2] == (0, 0.91)
    masks = list(back[0].masks())
    np.testing.assert_array_equal(masks[2][2], lab == 2)
    assert back[1].predictions == []


def test_bad_strings_raise():
    from napari_cpgcn.io.rle import SubmissionError, parse_prediction_string

    with pytest.raises(SubmissionError):
        decode_binary_mask("not base64!!", 10, 10)
    with pytest.raises(SubmissionError):
        parse_prediction_string("0 0.5")


def test_export_kaggle_cli_round_trip(tmp_path):
    """`napari-cpgcn export-kaggle` on a prediction folder: the submission decodes back to the masks."""
    import pandas as pd
    import tifffile

    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.cli import main

    pred = tmp_path / "pred"
    (pred / "masks").mkdir(parents=True)
    masks = {}
    rows = []
    for n, iid in enumerate(["img_a", "img_b"]):
        lab = np.zeros((20, 30), np.uint32)
        lab[2:8, 3:10] = 1
        lab[10:18, 12:28] = 2 + n
        masks[iid] = lab
        tifffile.imwrite(pred / "masks" / f"{iid}.tif", lab)
        for cid in np.unique(lab)[1:]:
            row = {"image_id": iid, "cell_id": int(cid)}
            row.update({f"fused_{s}": (0.9 if k == cid else 0.01) for k, s in enumerate(SHORT_NAMES)})
            rows.append(row)
    pd.DataFrame(rows).to_csv(pred / "cells.csv", index=False)
    out = tmp_path / "submission.csv"
    assert main(["export-kaggle", str(pred), "--out", str(out), "--min-score", "0.5", "-q"]) == 0
    back = {r.image_id: r for r in read_submission(out)}
    assert set(back) == {"img_a", "img_b"}
    for iid, r in back.items():
        assert (r.width, r.height) == (30, 20)
        got = list(r.masks())
        assert len(got) == 2  # one class above 0.5 per cell
        for k, conf, m in got:
            assert conf == pytest.approx(0.9)
            np.testing.assert_array_equal(m, masks[iid] == k)
    # a missing mask -> partial exit code, the rest written
    (pred / "masks" / "img_b.tif").unlink()
    assert main(["export-kaggle", str(pred), "--out", str(out), "-q"]) == 3
    assert [r.image_id for r in read_submission(out)] == ["img_a"]
