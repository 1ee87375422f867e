"""Kaggle HPA 2021 mask encoding and the submission file.

A cell mask in a Kaggle 2021 submission is the COCO *compressed* RLE ``counts`` string of
the binary mask (column-major, as ``pycocotools.mask.encode`` makes it), compressed with
``zlib`` at the best level and base64-encoded — exactly the competition's
``encode_binary_mask``. A submission row is ``ID,ImageWidth,ImageHeight,PredictionString``,
where PredictionString is space-separated triples ``class confidence rle``.

No Qt, no torch.
"""

from __future__ import annotations

import base64
import csv
import io as _io
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_cpgcn.io.atomic import atomic_write_text

__all__ = [
    "encode_binary_mask",
    "decode_binary_mask",
    "encode_label_image",
    "SubmissionRow",
    "format_prediction_string",
    "parse_prediction_string",
    "write_submission",
    "read_submission",
    "SUBMISSION_HEADER",
]

SUBMISSION_HEADER = ("ID", "ImageWidth", "ImageHeight", "PredictionString")


class SubmissionError(ValueError):
    """A submission file or mask string that cannot be decoded; the message names where."""


def encode_binary_mask(mask: np.ndarray) -> str:
    """Encode one (Y, X) binary mask as base64(zlib(COCO compressed RLE)).

    Parameters
    ----------
    mask
        2-D array; nonzero pixels belong to the mask.

    Returns
    -------
    str
        ASCII string as written in a Kaggle 2021 submission.
    """
    from pycocotools import mask as coco_mask

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D (Y, X) mask, got shape {mask.shape}")
    fortran = np.asfortranarray(mask.astype(bool)[:, :, None].astype(np.uint8))
    counts = coco_mask.encode(fortran)[0]["counts"]
    return base64.b64encode(zlib.compress(counts, zlib.Z_BEST_COMPRESSION)).decode("ascii")


def decode_binary_mask(encoded: str | bytes, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`encode_binary_mask`: the (height, width) bool mask.

    Raises
    ------
    SubmissionError
        When the string is not base64 / zlib data or its RLE does not fit the size.
    """
    from pycocotools import mask as coco_mask

    try:
        counts = zlib.decompress(base64.b64decode(encoded, validate=True))
    except Exception as e:  # binascii.Error, zlib.error
        raise SubmissionError(f"mask string {str(encoded)[:40]!r} is not base64(zlib(RLE)): {e}") from None
    try:
        m = coco_mask.decode({"size": [int(height), int(width)], "counts": counts})
    except Exception as e:
        raise SubmissionError(f"mask RLE does not decode at size {height}x{width}: {e}") from None
    return m.astype(bool)


def encode_label_image(labels: np.ndarray) -> dict[int, str]:
    """Encode every cell of a label image: ``{cell id: mask string}`` (background 0 skipped).

    Works on the cell bounding box plus a Fortran-order full-size buffer per cell, so the
    cost is one full-image RLE per cell (what the format requires) but no full-image
    boolean copies beyond that.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    out: dict[int, str] = {}
    slices = ndi.find_objects(labels)
    buf = np.zeros(labels.shape, dtype=bool)
    for idx, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        buf[sl] = labels[sl] == idx
        out[idx] = encode_binary_mask(buf)
        buf[sl] = False
    return out


@dataclass
class SubmissionRow:
    """One image of a submission.

    Attributes
    ----------
    image_id, width, height
        The image id and its size in pixels.
    predictions : list of (class id, confidence, mask string)
        One triple per (cell, class) prediction.
    """

    image_id: str
    width: int
    height: int
    predictions: list[tuple[int, float, str]] = field(default_factory=list)

    def masks(self) -> Iterator[tuple[int, float, np.ndarray]]:
        """Decode the predictions: (class id, confidence, bool mask)."""
        for k, conf, enc in self.predictions:
            yield k, conf, decode_binary_mask(enc, self.height, self.width)


def format_prediction_string(predictions: Iterable[tuple[int, float, str]]) -> str:
    """Triples → ``"class conf rle class conf rle ..."`` (confidence with 6 significant digits)."""
    return " ".join(f"{int(k)} {float(c):.6g} {enc}" for k, c, enc in predictions)


def parse_prediction_string(s: str, *, where: str = "") -> list[tuple[int, float, str]]:
    """``"class conf rle ..."`` → list of triples.

    Raises
    ------
    SubmissionError
        When the token count is not a multiple of three or a class / confidence is not a number.
    """
    toks = s.split()
    if len(toks) % 3:
        raise SubmissionError(f"{where}PredictionString has {len(toks)} tokens; expected triples 'class confidence rle'")
    out = []
    for i in range(0, len(toks), 3):
        try:
            out.append((int(toks[i]), float(toks[i + 1]), toks[i + 2]))
        except ValueError:
            raise SubmissionError(f"{where}bad triple {toks[i:i + 3]}: class must be an int, confidence a float") from None
    return out


def write_submission(path: str | Path, rows: Iterable[SubmissionRow]) -> None:
    """Write a Kaggle 2021 submission CSV atomically."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUBMISSION_HEADER)
    for r in rows:
        w.writerow([r.image_id, int(r.width), int(r.height), format_prediction_string(r.predictions)])
    atomic_write_text(path, buf.getvalue())


def read_submission(path: str | Path) -> list[SubmissionRow]:
    """Read a Kaggle 2021 submission CSV (masks left encoded; use :meth:`SubmissionRow.masks`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission file {path} does not exist")
    rows: list[SubmissionRow] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != list(SUBMISSION_HEADER):
            raise SubmissionError(f"{path}: header {header} is not {','.join(SUBMISSION_HEADER)}")
        for lineno, rec in enumerate(reader, start=2):
            if not rec:
                continue
            if len(rec) != 4:
                raise SubmissionError(f"{path}:{lineno}: expected 4 fields, got {len(rec)}")
            try:
                width, height = int(rec[1]), int(rec[2])
            except ValueError:
                raise SubmissionError(f"{path}:{lineno}: ImageWidth/ImageHeight must be integers") from None
            rows.append(SubmissionRow(rec[0], width, height,
                                      parse_prediction_string(rec[3], where=f"{path}:{lineno}: ")))
    return rows
