"""``napari-cpgcn export-kaggle PREDICTIONS_DIR --out submission.csv``: a Kaggle 2021 submission.

Reads what ``napari-cpgcn predict`` wrote — cell masks ``masks/{ID}.tif`` and the per-cell
table ``cells.csv`` — and writes ``ID,ImageWidth,ImageHeight,PredictionString`` with one
``class confidence mask`` triple per (cell, class), the mask as base64(zlib(COCO RLE)).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from napari_cpgcn.cli import EXIT_OK, EXIT_PARTIAL, UsageError

log = logging.getLogger("napari_cpgcn.cli.export_kaggle")


COMMAND = "export-kaggle"
HELP = "write a Kaggle 2021 submission.csv from saved predictions (masks + per-cell CSV)"
DESCRIPTION = """\
Build a Kaggle HPA 2021 submission from a prediction folder (masks/{ID}.tif and cells.csv, as
`napari-cpgcn predict` writes them): every cell x every class with its confidence, the cell mask
encoded as base64(zlib(COCO compressed RLE)).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions_dir", metavar="PREDICTIONS_DIR", help="folder holding masks/ and cells.csv")
    p.add_argument("--out", required=True, metavar="CSV", help="submission file to write")
    p.add_argument("--score", choices=["fused", "cell", "image"], default="fused",
                   help="which confidence to submit (default fused = image x cell)")
    p.add_argument("--min-score", type=float, default=0.0,
                   help="leave out (cell, class) pairs below this confidence (default 0: keep all)")
    p.add_argument("--cells-csv", default=None, metavar="CSV", help="per-cell table (default PREDICTIONS_DIR/cells.csv)")
    p.add_argument("--masks", default=None, metavar="DIR", help="mask folder (default PREDICTIONS_DIR/masks)")


def _read_mask(folder: Path, image_id: str):
    from napari_cpgcn.io.masks import find_mask, read_mask

    found = find_mask(folder, image_id)
    if found is None:
        raise FileNotFoundError(f"no mask {image_id}.tif in {folder}")
    return read_mask(found)


def export_submission(cells_csv: str | Path, masks_dir: str | Path, out: str | Path, score: str = "fused",
                      min_score: float = 0.0, progress=None) -> tuple[int, list[str]]:
    """Write the submission; returns (number of images written, ids that failed)."""
    import numpy as np
    import pandas as pd

    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.io.rle import SubmissionRow, encode_label_image, write_submission

    table = pd.read_csv(cells_csv, dtype={"image_id": str})
    cols = [f"{score}_{s}" for s in SHORT_NAMES]
    missing = [c for c in ["image_id", "cell_id", *cols] if c not in table.columns]
    if missing:
        raise ValueError(f"{cells_csv} lacks the columns {missing[:3]}; it must be a per-cell prediction table")
    masks_dir = Path(masks_dir)
    ids = sorted(set(table["image_id"]) | {p.stem for p in masks_dir.glob("*.tif")})
    rows, failed = [], []
    groups = dict(tuple(table.groupby("image_id", sort=False)))
    for iid in ids:
        try:
            mask = _read_mask(masks_dir, iid)
        except (FileNotFoundError, OSError, ValueError) as e:
            log.error("%s: %s", iid, e)
            failed.append(iid)
            continue
        h, w = mask.shape
        enc = encode_label_image(mask)
        preds = []
        sub = groups.get(iid)
        if sub is not None:
            scores = sub[cols].to_numpy(np.float64)
            for cid, sc in zip(sub["cell_id"].to_numpy(), scores, strict=True):
                s = enc.get(int(cid))
                if s is None:
                    log.warning("%s: cell %d is in the table but not in the mask; left out", iid, cid)
                    continue
                preds += [(k, float(v), s) for k, v in enumerate(sc) if v >= min_score]
        rows.append(SubmissionRow(iid, int(w), int(h), preds))
        if progress is not None:
            progress.update(1)
    write_submission(out, rows)
    return len(rows), failed


def run(args: argparse.Namespace) -> int:
    pred = Path(args.predictions_dir)
    if not pred.is_dir():
        raise UsageError(f"PREDICTIONS_DIR {pred} is not a folder")
    cells_csv = Path(args.cells_csv) if args.cells_csv else pred / "cells.csv"
    masks = Path(args.masks) if args.masks else pred / "masks"
    if not cells_csv.is_file():
        raise UsageError(f"per-cell table {cells_csv} not found; run `napari-cpgcn predict` first or give --cells-csv")
    if not masks.is_dir():
        raise UsageError(f"mask folder {masks} not found; give --masks")
    bar = None
    if not args.quiet:
        from napari_cpgcn.cli import progress_bar

        bar = progress_bar(desc="export-kaggle", unit="img")
    try:
        n, failed = export_submission(cells_csv, masks, args.out, args.score, args.min_score, bar)
    finally:
        if bar is not None:
            bar.close()
    log.info("wrote %s: %d images", args.out, n)
    if failed:
        log.error("%d images could not be exported (no readable mask): %s", len(failed), ", ".join(failed[:5]))
        return EXIT_PARTIAL
    return EXIT_OK
