"""Cell-level benchmark of the single-cell pipeline on one synthetic heterogeneous data set.

Checks the paper's claims under a small CPU budget:

* cell-level mAP (Kaggle 2021 metric, IoU >= 0.6, classical segmentation of the test images) of
  (a) the image-level prediction given to every cell, (b) a cell model trained on image labels
  copied to every cell (baseline), (c) a cell model trained on pseudo-labels, (d) fused (a x c);
* pseudo-label precision / recall / F1 against the cell truth for K = 1, 5, 10 sub-categories
  (plus no refinement and the image-labels-copied reference).

One image model is trained once and shared; each K gets its own refinement from it (same rounds and
epochs); the pseudo-label and baseline cell models share everything but their targets.

Run (about 10-15 minutes on 1 thread of a shared 2-core CPU)::

    nice .venv/bin/python benchmarks/bench_cell_pipeline.py --out /tmp/bench_cell

Prints a table; ``--out`` keeps the data, runs and a ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def localisation_auc(pl, masks_dir, truth) -> float:
    """Mean within-image ROC AUC of the cells' mean activation (``act_S``) for expressing vs other cells."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from napari_cpgcn.classes import NEGATIVE, SHORT_NAMES
    from napari_cpgcn.evaluation.matching import match_labels
    from napari_cpgcn.io.masks import read_mask

    aucs = []
    for iid, sub in pl.groupby("image_id"):
        pairs = dict(zip(*match_labels(read_mask(Path(masks_dir) / f"{iid}.tif"), truth.mask(iid))[:2], strict=True))
        rows = [(r, pairs[int(c)]) for r, c in enumerate(sub["cell_id"]) if int(c) in pairs]
        if len(rows) < 2:
            continue
        tl = truth.cell_labels(iid, np.array([t for _, t in rows]))
        for k in range(NEGATIVE):
            a = sub[f"act_{SHORT_NAMES[k]}"].to_numpy()[[r for r, _ in rows]]
            y = tl[:, k]
            if np.isfinite(a).all() and 0 < y.sum() < len(y):
                aucs.append(roc_auc_score(y, a))
    return float(np.mean(aucs)) if aucs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench_cell_pipeline")
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-test", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="synthetic image side")
    ap.add_argument("--heterogeneity", type=float, default=0.7)
    ap.add_argument("--cell-scale", type=float, default=0.6,
                    help="synthetic cell scale (0.6: about 11 cells per 256² image; default of synth: size/512)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--image-epochs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--refine-epochs", type=int, default=3)
    ap.add_argument("--cell-epochs", type=int, default=8)
    ap.add_argument("--crop-size", type=int, default=64)
    ap.add_argument("--ks", default="1,5,10")
    ap.add_argument("--output-stride", type=int, default=32, choices=[16, 32],
                    help="image-model backbone stride (16: dilated last ResNet stage, finer CAMs)")
    ap.add_argument("--init-from", default="",
                    help="checkpoint or run whose backbone starts the image and cell models (a pretrained "
                         "start, e.g. bench_image_model's --pretrain-n backbone); empty: from scratch")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the cell model on image labels (baseline) and its rows")
    ap.add_argument("--no-true-cells", action="store_true",
                    help="skip the evaluation on the true cell masks (its column is NaN)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from napari_cpgcn.evaluation.cell import CellTruth, evaluate_predictor, evaluate_pseudo_labels
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.io.tables import read_labels_csv, write_labels_csv
    from napari_cpgcn.pipeline import PipelineConfig, train_pipeline
    from napari_cpgcn.pipeline.predictor import CPGCNPredictor
    from napari_cpgcn.synth import generate_dataset
    from napari_cpgcn.training.pseudolabels import read_pseudolabels

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "train.csv").is_file():
        generate_dataset(data, args.n_train + args.n_test, size=args.size, seed=args.seed,
                         heterogeneity=args.heterogeneity, cell_scale=args.cell_scale)
    table = read_labels_csv(data / "train.csv")
    train_ids, test_ids = table.ids[:args.n_train], table.ids[args.n_train:]
    write_labels_csv(out / "train.csv", table.subset(train_ids))
    truth = CellTruth.load(data)
    ks = [int(k) for k in args.ks.split(",")]
    times: dict[str, float] = {}

    base = PipelineConfig.tiny(backbone=args.backbone, image_size=args.image_size, epochs=args.image_epochs,
                               seed=args.seed, device="cpu")
    init = str(Path(args.init_from).resolve()) if args.init_from else None
    base.image = base.image.replace(batch_size=8, gcn_hidden=256, oaa_size=32, output_stride=args.output_stride,
                                    init_from=init)
    base.cell = base.cell.replace(crop_size=args.crop_size, epochs=args.cell_epochs, batch_size=32, init_from=init)

    def cfg_for(k: int, rounds: int, mode: str = "pseudo") -> PipelineConfig:
        import dataclasses

        return dataclasses.replace(base, refine=base.refine.replace(k=k, rounds=rounds, epochs=args.refine_epochs,
                                                                    batch_size=8),
                                   cell=base.cell.replace(mode=mode))

    def drain(events, label):
        t = time.perf_counter()
        last = None
        for ev in events:
            if ev.kind == EventKind.EPOCH_END:
                m = ev.metrics
                print(f"  [{label}] {ev.stage} epoch {ev.epoch}/{ev.n_epochs} loss {m.get('train_loss', 0):.3f} "
                      f"val mAP {m.get('val_mAP', float('nan')):.3f}", flush=True)
            last = ev
        times[label] = times.get(label, 0.0) + time.perf_counter() - t
        assert last is not None and last.kind == EventKind.DONE, last

    # 1. one image model for everything
    run0 = out / "run_image"
    drain(train_pipeline(data / "images", out / "train.csv", run0, cfg_for(10, args.rounds),
                         stages=("image_model",)), "image_model")

    # 2. refinement + segmentation + pseudo-labels per K (and without refinement)
    f1_rows = []
    runs: dict[str, Path] = {}
    for name, k, rounds in [("no refinement", 1, 0)] + [(f"K = {k}", k, args.rounds) for k in ks]:
        run = out / f"run_{name.replace(' ', '').replace('=', '')}"
        if not run.exists():
            shutil.copytree(run0, run, ignore=shutil.ignore_patterns("cache"))
        drain(train_pipeline(data / "images", out / "train.csv", run, cfg_for(k, rounds),
                             stages=("image_model", "refine", "segmentation", "pseudolabels")), name)
        pl = read_pseudolabels(run / "pseudolabels.csv")
        s = evaluate_pseudo_labels(pl, run / "segmentation", truth)
        s.auc = localisation_auc(pl, run / "segmentation", truth)
        f1_rows.append((name, s))
        runs[name] = run
    # reference: image labels copied to every cell
    from napari_cpgcn.evaluation.cell import pseudo_label_scores  # noqa: F401
    ref = read_pseudolabels(runs[f"K = {ks[-1]}"] / "pseudolabels.csv").copy()
    lab = table.as_dict()
    ref["labels"] = ["|".join(str(c) for c in np.flatnonzero(lab[i])) for i in ref["image_id"]]
    s_ref = evaluate_pseudo_labels(ref, runs[f"K = {ks[-1]}"] / "segmentation", truth)
    s_ref.auc = float("nan")

    # 3. cell models (pseudo-labels from the largest K, and the image-label baseline)
    kname = f"K = {ks[-1]}"
    run_p = runs[kname]
    drain(train_pipeline(data / "images", out / "train.csv", run_p, cfg_for(ks[-1], args.rounds)), "cell (pseudo)")
    run_b = out / "run_baseline"
    if not args.no_baseline:
        if not run_b.exists():
            shutil.copytree(run_p, run_b, ignore=shutil.ignore_patterns("cache"))
        drain(train_pipeline(data / "images", out / "train.csv", run_b, cfg_for(ks[-1], args.rounds, "baseline")),
              "cell (baseline)")

    # 4. test-set cell-level mAP (classical segmentation of the test images)
    t = time.perf_counter()
    nan = {k: type("NaN", (), {"map": float("nan")})() for k in ("image", "cell", "fused")}

    def evaluate(run, true_cells):
        if (run is run_b and args.no_baseline) or (true_cells and args.no_true_cells):
            return nan
        return evaluate_predictor(CPGCNPredictor.from_run(run, device="cpu"), data / "images", test_ids, truth,
                                  use_true_cells=true_cells)

    res_p, res_b = evaluate(run_p, False), evaluate(run_b, False)
    res_pt, res_bt = evaluate(run_p, True), evaluate(run_b, True)
    times["evaluation"] = time.perf_counter() - t
    total = time.perf_counter() - t_start

    n_cells_test = int(sum(len(truth.labels[i][0]) for i in test_ids))
    print()
    print(f"Synthetic data: {args.n_train} train / {len(test_ids)} test images, {args.size}² px, heterogeneity "
          f"{args.heterogeneity}, {n_cells_test} test cells; {args.backbone}, image {args.image_size}² x "
          f"{args.image_epochs} epochs, refinement {args.rounds} rounds x {args.refine_epochs} epochs, cell crops "
          f"{args.crop_size}² x {args.cell_epochs} epochs; output stride {args.output_stride}; start "
          f"{args.init_from or 'random'}; {args.threads} CPU thread(s); total {total / 60:.1f} min "
          f"wall-clock, {(time.process_time() - cpu_start) / 60:.1f} min CPU")
    print()
    print("| cell-level mAP (Kaggle, IoU >= 0.6) on the test images | classical segmentation | true cells |")
    print("|---|---|---|")
    rows = [
        ("image-level prediction given to every cell", res_p["image"].map, res_pt["image"].map),
        ("cell model on image labels (baseline)", res_b["cell"].map, res_bt["cell"].map),
        (f"cell model on pseudo-labels ({kname})", res_p["cell"].map, res_pt["cell"].map),
        ("fused: image x pseudo-label cell model", res_p["fused"].map, res_pt["fused"].map),
        ("fused: image x baseline cell model", res_b["fused"].map, res_bt["fused"].map),
    ]
    if args.no_baseline:
        rows = [r for r in rows if "baseline" not in r[0]]
    for name, a, b in rows:
        print(f"| {name} | {a:.4f} | {b:.4f} |")
    print()
    print("| pseudo-labels (training images) | precision | recall | F1 | macro F1 | CAM AUC | cells compared |")
    print("|---|---|---|---|---|---|---|")
    for name, s in f1_rows + [("image labels copied to every cell (reference)", s_ref)]:
        print(f"| {name} | {s.precision:.4f} | {s.recall:.4f} | {s.f1:.4f} | {s.macro_f1:.4f} | {s.auc:.3f} | "
              f"{s.n_cells} |")
    print("CAM AUC: mean over (training image, positive class) of the ROC AUC with which the cells' mean CAM "
          "activation separates the cells that express the class from those that do not (0.5 = no localisation).")
    print()
    print("seconds:", {k: round(v, 1) for k, v in times.items()})
    result = {
        "args": vars(args),
        "total_seconds": total,
        "cpu_seconds": time.process_time() - cpu_start,
        "seconds": times,
        "cell_map": {name: {"segmented": a, "true_cells": b} for name, a, b in rows},
        "pseudo_label": {name: {**s.as_dict(), "cam_auc": s.auc} for name, s in f1_rows + [("reference", s_ref)]},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
