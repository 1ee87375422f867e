"""``napari-cpgcn evaluate --run RUN_DIR --data DATA_DIR --labels CSV --out DIR``.

Each evaluation level is one function in :data:`EVALUATORS` taking the parsed arguments and the
output folder and returning a dict of summary numbers (merged into ``OUT/summary.json``). The
image level writes ``image_ap.csv`` (per-class AP + mAP), ``image_ap.png`` (bar chart),
``image_pr.png`` (PR curves) and ``image_predictions.csv``. Further levels (the cell-level
Kaggle metric) are added by appending to :data:`EVALUATORS` and, if they need options, to
:func:`add_level_arguments`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

from napari_cpgcn.cli import EXIT_FAILURE, EXIT_OK, UsageError
from napari_cpgcn.io.atomic import check_writable

log = logging.getLogger("napari_cpgcn.cli.evaluate")


COMMAND = "evaluate"
HELP = "evaluate a trained run: image-level AP/mAP (+ charts)"
DESCRIPTION = """\
Evaluate a trained run on labelled images. Image level: per-class average precision, mAP over
the classes present, a per-class AP bar chart and precision-recall curves.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="run folder (image-model run, pipeline run holding image_model/, or a .pt file)")
    p.add_argument("--data", required=True, metavar="DATA_DIR", help="folder of the evaluation images")
    p.add_argument("--labels", required=True, metavar="CSV", help="labels CSV (ID,Label) of those images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for tables and charts")
    p.add_argument("--split", choices=["all", "val", "train"], default="all",
                   help="which images of the CSV: all (default; for a held-out test set), or the run's "
                        "recorded validation/training split")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    add_level_arguments(p)


def add_level_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the evaluation levels (``--levels``; other levels add theirs here)."""
    p.add_argument("--levels", default="image,cell",
                   help="comma-separated levels to run (default: image,cell; cell needs --truth)")
    from napari_cpgcn.cli._cell_level import add_arguments as add_cell_arguments

    add_cell_arguments(p)


def _image_ids(args: argparse.Namespace, table, run_dir: Path) -> list[str]:
    if args.split == "all":
        return list(table.ids)
    from napari_cpgcn.training.image_trainer import load_split

    for d in (run_dir, run_dir / "image_model", run_dir.parent):
        split = load_split(d) if d.is_dir() else None
        if split is not None:
            wanted = set(split[args.split])
            return [i for i in table.ids if i in wanted]
    raise UsageError(f"--split {args.split}: no split.json found in {run_dir}; use --split all")


def evaluate_image(args: argparse.Namespace, out: Path) -> dict:
    """Image-level AP/mAP of the run's image model; writes the tables and charts."""
    import numpy as np
    import pandas as pd

    from napari_cpgcn.evaluation.image import ap_table, plot_ap_bars, plot_pr_curves
    from napari_cpgcn.io.atomic import atomic_write_text
    from napari_cpgcn.io.hpa import image_index
    from napari_cpgcn.io.tables import read_labels_csv
    from napari_cpgcn.pipeline.inference import predict_images
    from napari_cpgcn.training.checkpoint import load_image_model, resolve_checkpoint

    ckpt = resolve_checkpoint(args.run)
    model, config = load_image_model(ckpt, args.device)
    table = read_labels_csv(args.labels)
    index = image_index(args.data)
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    ids = [i for i in _image_ids(args, table, run_dir) if i in index]
    skipped = len(table.ids) - len(ids) if args.split == "all" else 0
    if not ids:
        raise UsageError(f"none of the images of {args.labels} is in {index.folder}")
    if skipped:
        log.warning("%d labelled images are not in %s and are skipped", skipped, index.folder)
    labels = table.subset(ids).labels
    probs = []
    bar = None
    if not args.quiet:
        from napari_cpgcn.cli import progress_bar

        bar = progress_bar(total=len(ids), desc="image model", unit="img")
    try:
        for start in range(0, len(ids), args.batch_size):
            chunk = ids[start:start + args.batch_size]
            p, _ = predict_images(model, [index.read(i).data for i in chunk], batch_size=args.batch_size, cam_size=None)
            probs.append(p)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    probs = np.concatenate(probs)
    names = list(config.classes)
    df = ap_table(labels, probs, names)
    atomic_write_text(out / "image_ap.csv", df.to_csv(index=False, float_format="%.6f"))
    ap = df["ap"].to_numpy()[:-1]
    try:
        plot_ap_bars(ap, out / "image_ap.png", names,
                     title=f"Image-level AP per class ({config.variant}, {config.backbone}, {len(ids)} images)")
        plot_pr_curves(labels, probs, out / "image_pr.png", names)
    except ImportError as e:  # the plots extra is not installed: the tables are the result
        log.warning("no plots: %s", e)
    pred = pd.DataFrame(probs, columns=[f"image_{s}" for s in names])
    pred.insert(0, "image_id", ids)
    # 9 significant digits round-trip float32 exactly: rankings (hence AP) survive the CSV.
    atomic_write_text(out / "image_predictions.csv", pred.to_csv(index=False, float_format="%.9g"))
    m_ap = float(df["ap"].iloc[-1])
    present = int(np.isfinite(ap).sum())
    lines = [f"{r['class']:<24} {int(r['n_positive']):>6} {r['ap']:.4f}" for _, r in df.iterrows()]
    log.info("image-level AP (%d images, %d classes present; checkpoint %s)\n%-24s %6s %s\n%s",
             len(ids), present, ckpt, "class", "n_pos", "AP", "\n".join(lines))
    return {"image_mAP": m_ap, "image_n_images": len(ids), "image_classes_present": present,
            "image_checkpoint": str(ckpt)}


#: Evaluation levels in run order: (name, function(args, out_dir) -> summary dict).
def _evaluate_cell(args: argparse.Namespace, out: Path) -> dict:
    from napari_cpgcn.cli._cell_level import evaluate_cell

    return evaluate_cell(args, out)


EVALUATORS: list[tuple[str, Callable[[argparse.Namespace, Path], dict]]] = [
    ("image", evaluate_image),
    ("cell", _evaluate_cell),
]


def run(args: argparse.Namespace) -> int:
    from napari_cpgcn.cli import setup_logging
    from napari_cpgcn.io.atomic import atomic_write_text
    from napari_cpgcn.training.checkpoint import CheckpointError

    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    out = Path(args.out)
    check_writable(out)
    setup_logging(args, logfile=str(out / "evaluate.log"))
    wanted = [s.strip() for s in args.levels.split(",") if s.strip()]
    known = [name for name, _ in EVALUATORS]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise UsageError(f"unknown evaluation level(s) {unknown}; known: {', '.join(known)}")
    summary: dict = {}
    try:
        for name, func in EVALUATORS:
            if name in wanted:
                summary.update(func(args, out))
    except CheckpointError as e:
        log.error("%s", e)
        return EXIT_FAILURE
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    for k, v in summary.items():
        if "mAP" in k:
            print(f"{k}: {v:.4f}")
    return EXIT_OK
