"""The cell level of ``napari-cpgcn evaluate``: the Kaggle 2021 cell-level mAP (not a subcommand).

With ``--truth DIR`` (a folder holding ``cells.csv`` and ``{ID}_cells.png`` masks, as
``napari-cpgcn synth`` writes under ``truth/``) and a pipeline run, every evaluation image is
segmented and predicted, predicted cells are matched to true cells at IoU ≥ 0.6, and the
per-class AP and mAP are computed for the fused, the cell-model and the image-level scores.
Writes ``cell_ap.csv``, ``cell_predictions.csv`` and ``cell_reliability.png`` (reliability
diagram of the fused probabilities of the matched cells, with their expected calibration error).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("napari_cpgcn.cli.evaluate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--truth``, ``--segmentation``, ``--true-cells`` (used by the ``cell`` level)."""
    p.add_argument("--truth", default=None, metavar="DIR",
                   help="cell truth folder (cells.csv + {ID}_cells.png); enables the cell level (Kaggle mAP)")
    p.add_argument("--segmentation", default=None, choices=("classical", "cellpose"),
                   help="segmentation method for the cell level (default: the run's)")
    p.add_argument("--true-cells", action="store_true",
                   help="cell level on the true cell masks instead of a segmentation (classification only)")


def evaluate_cell(args: argparse.Namespace, out: Path) -> dict:
    """Cell-level Kaggle mAP of a pipeline run (fused, cell and image scores)."""
    import numpy as np
    import pandas as pd

    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.evaluation.cell import CellTruth, evaluate_predictor
    from napari_cpgcn.io.atomic import atomic_write_text
    from napari_cpgcn.io.hpa import list_image_ids
    from napari_cpgcn.io.tables import read_labels_csv
    from napari_cpgcn.pipeline import load_predictor, resolve_model_path

    if not getattr(args, "truth", None):
        log.info("cell level skipped: give --truth DIR (cells.csv + masks) for the Kaggle cell-level mAP")
        return {}
    run_dir = resolve_model_path(args.run)
    truth = CellTruth.load(args.truth)
    table = read_labels_csv(args.labels)
    present = set(list_image_ids(args.data))
    ids = [i for i in table.ids if i in truth.labels and i in present]
    if getattr(args, "split", "all") != "all":
        from napari_cpgcn.training.image_trainer import load_split

        split = load_split(run_dir / "image_model") or load_split(run_dir)
        if split is not None:
            wanted = set(split[args.split])
            ids = [i for i in ids if i in wanted]
    if not ids:
        from napari_cpgcn.cli import UsageError

        raise UsageError(f"no image of {args.labels} has cell truth in {args.truth} and images in {args.data}")
    predictor = load_predictor(args.run, device=args.device)
    bar = None
    if not args.quiet:
        from napari_cpgcn.cli import progress_bar

        bar = progress_bar(total=len(ids), desc="cell level", unit="img")
    tables: list = []
    masks: dict = {}
    try:
        res = evaluate_predictor(predictor, args.data, ids, truth, segmentation=args.segmentation,
                                 use_true_cells=args.true_cells, progress=bar, tables=tables, masks=masks)
    finally:
        if bar is not None:
            bar.close()
    rows = []
    for k, s in enumerate(SHORT_NAMES):
        rows.append({"class": s, "n_true_cells": int(res["fused"].n_true[k]),
                     **{f"ap_{name}": float(r.ap[k]) for name, r in res.items()}})
    rows.append({"class": "mAP", "n_true_cells": int(res["fused"].n_true.sum()),
                 **{f"ap_{name}": float(r.map) for name, r in res.items()}})
    df = pd.DataFrame(rows)
    atomic_write_text(out / "cell_ap.csv", df.to_csv(index=False, float_format="%.6f"))
    if tables:
        atomic_write_text(out / "cell_predictions.csv",
                          pd.concat(tables, ignore_index=True).to_csv(index=False, float_format="%.6g"))
    lines = [f"{r['class']:<24} {r['n_true_cells']:>6} {r['ap_fused']:.4f} {r['ap_cell']:.4f} {r['ap_image']:.4f}"
             for r in rows if r["n_true_cells"] > 0]
    log.info("cell-level AP at IoU >= 0.6 (%d images)\n%-24s %6s %-6s %-6s %-6s\n%s", len(ids), "class",
             "n_true", "fused", "cell", "image", "\n".join(lines))
    from napari_cpgcn.evaluation.calibration import (
        expected_calibration_error,
        matched_probabilities,
        reliability_diagram,
    )

    p, y = matched_probabilities(tables, masks, truth)
    ece = expected_calibration_error(p, y) if len(p) else float("nan")
    if len(p):
        reliability_diagram(out / "cell_reliability.png", {"fused": (p, y)})
    log.info("fused probabilities of %d matched cells: expected calibration error %.4f (%s)", len(p), ece,
             out / "cell_reliability.png")
    return {"cell_ece_fused": ece, "cell_mAP": res["fused"].map, "cell_mAP_cell_model": res["cell"].map,
            "cell_mAP_image_model": res["image"].map, "cell_n_images": len(ids),
            "cell_classes_present": int(np.sum(res["fused"].n_true > 0))}
