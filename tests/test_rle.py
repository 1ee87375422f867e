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
        for k, conf, enc in r.predictions:
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
