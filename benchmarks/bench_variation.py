"""Single-cell variation benchmark: predicted vs true share of expressing cells on synthetic data.

One tiny pipeline is trained once on a synthetic training set; test sets generated with other
seeds at heterogeneity 0, 0.5, 0.7 and 1 (``synth``: each image class is expressed by a random
``U(1 - H, 1)`` share of the cells; the generator writes which cells express which class, so the
true share is known) are predicted **on their true cell masks** (the score is about the cell
model, not segmentation), and for every (test image, true class) the predicted
``share_expressing`` (:func:`napari_cpgcn.profiles.variation.image_variation`, fused score >= 0.5)
is compared with the true share by Spearman's rho. Target: rho >= 0.5 at heterogeneity 0.7.

The class threshold defaults to 0.5 (the package's default). With ``--thresholds`` one global
threshold is also chosen on a separate validation set (``--val-seed``, at the training
heterogeneity) by the best rho there, and the test sets are scored with it too: the test sets
never take part in the choice.

At heterogeneity 0 every cell expresses every image class (true share 1 everywhere): rho is
undefined there (printed as nan); the mean predicted share is the number to read.

Run (about 10 minutes on 1 thread of a shared 2-core CPU)::

    nice .venv/bin/python benchmarks/bench_variation.py --out /tmp/bench_variation

Prints a table; ``--out`` keeps the data, the run and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def predict_set(predictor, data: Path) -> list:
    """``(prediction, true classes, true per-cell labels)`` of every image of a synthetic set (true cells)."""
    import numpy as np

    from napari_cpgcn.classes import N_CLASSES, NEGATIVE
    from napari_cpgcn.evaluation.cell import CellTruth
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.io.tables import read_labels_csv

    truth = CellTruth.load(data)
    table = read_labels_csv(data / "train.csv").as_dict()
    out = []
    for iid in sorted(table):
        classes = [int(k) for k in np.flatnonzero(table[iid][:N_CLASSES]) if k != NEGATIVE]
        if not classes:
            continue
        pred = predictor.predict(read_image(data / "images", image_id=iid), cells=truth.mask(iid), with_cams=False)
        out.append((pred, classes, truth.cell_labels(iid, pred.table["cell_id"].to_numpy())))
    return out


def score_level(predicted: list, params) -> dict:
    """Predicted and true shares of every (image, true class) of one predicted synthetic set."""
    import numpy as np
    from scipy.stats import spearmanr

    from napari_cpgcn.profiles.variation import variation_of_prediction

    pred_share, true_share = [], []
    for pred, classes, tl in predicted:
        v = variation_of_prediction(pred, params, classes=classes)
        for k, share in zip(classes, v["share_expressing"], strict=True):
            pred_share.append(float(share))
            true_share.append(float(tl[:, k].mean()))
    p, t = np.array(pred_share), np.array(true_share)
    rho = float(spearmanr(p, t).statistic) if len(p) > 2 and np.ptp(t) > 0 and np.ptp(p) > 0 else float("nan")
    return {"n_pairs": len(p), "rho": rho, "mean_true": float(t.mean()), "mean_pred": float(p.mean()),
            "mae": float(np.abs(p - t).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench_variation")
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=16, help="test images per heterogeneity level and seed")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--cell-scale", type=float, default=0.6)
    ap.add_argument("--train-heterogeneity", type=float, default=0.7)
    ap.add_argument("--levels", default="0,0.5,0.7,1")
    ap.add_argument("--test-seeds", default="101,202", help="one test set per seed and level")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--crop-size", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--thresholds", default="",
                    help="comma-separated candidate thresholds chosen from on the validation set (empty: none)")
    ap.add_argument("--score", default="fused", choices=("fused", "cell"),
                    help="per-cell score deciding expression (fused: image x cell, the default; cell: cell model)")
    ap.add_argument("--val-seed", type=int, default=303)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.pipeline import PipelineConfig, train_pipeline
    from napari_cpgcn.pipeline.predictor import CPGCNPredictor
    from napari_cpgcn.profiles.variation import VariationParams
    from napari_cpgcn.synth import generate_dataset

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = out / "train"
    if not (train / "train.csv").is_file():
        generate_dataset(train, args.n_train, size=args.size, seed=args.seed,
                         heterogeneity=args.train_heterogeneity, cell_scale=args.cell_scale)
    cfg = PipelineConfig.tiny(image_size=args.image_size, epochs=args.epochs, seed=args.seed, device=args.device)
    cfg.cell = cfg.cell.replace(crop_size=args.crop_size)
    run = out / "run"
    t_train = time.perf_counter()
    last = None
    for ev in train_pipeline(train / "images", train / "train.csv", run, cfg):
        if ev.kind == EventKind.EPOCH_END:
            print(f"  {ev.stage} epoch {ev.epoch}/{ev.n_epochs} loss {ev.metrics.get('train_loss', 0):.3f}",
                  flush=True)
        last = ev
    assert last is not None and last.kind == EventKind.DONE, last
    t_train = time.perf_counter() - t_train
    predictor = CPGCNPredictor.from_run(run, device=args.device)
    chosen, val_scores = None, {}
    if args.thresholds:
        val = out / f"val_h{args.train_heterogeneity:g}_s{args.val_seed}"
        if not (val / "train.csv").is_file():
            generate_dataset(val, args.n_val, size=args.size, seed=args.val_seed,
                             heterogeneity=args.train_heterogeneity, cell_scale=args.cell_scale)
        val_pred = predict_set(predictor, val)
        for th in [float(x) for x in args.thresholds.split(",")]:
            val_scores[th] = score_level(val_pred, VariationParams(threshold=th, score=args.score))["rho"]
        finite = {k: v for k, v in val_scores.items() if np.isfinite(v)}
        chosen = max(finite, key=finite.get) if finite else None
        print("validation rho per threshold:", {k: round(v, 3) for k, v in val_scores.items()},
              "-> chosen", chosen, flush=True)
    thresholds = [args.threshold] + ([chosen] if chosen is not None and chosen != args.threshold else [])
    levels = [float(x) for x in args.levels.split(",")]
    seeds = [int(s) for s in args.test_seeds.split(",")]
    rows = []
    for h in levels:
        per_seed = {th: [] for th in thresholds}
        for s in seeds:
            data = out / f"test_h{h:g}_s{s}"
            if not (data / "train.csv").is_file():
                generate_dataset(data, args.n_test, size=args.size, seed=s, heterogeneity=h,
                                 cell_scale=args.cell_scale)
            predicted = predict_set(predictor, data)
            for th in thresholds:
                per_seed[th].append(score_level(predicted, VariationParams(threshold=th, score=args.score)))
        for th in thresholds:
            rows.append((h, th, per_seed[th]))
    total = time.perf_counter() - t0
    print()
    print(f"Train: {args.n_train} synthetic {args.size}² images (heterogeneity {args.train_heterogeneity}, seed "
          f"{args.seed}); tiny resnet18 pipeline, image {args.image_size}², {args.epochs} epochs, crops "
          f"{args.crop_size}²; test: {args.n_test} images per level and seed (seeds {args.test_seeds}), true "
          f"cell masks; score {args.score}; train {t_train / 60:.1f} min, total {total / 60:.1f} min")
    print()
    print("| heterogeneity | threshold | (image, class) pairs | Spearman rho per seed | mean rho | mean true share | "
          "mean predicted share | MAE |")
    print("|---|---|---|---|---|---|---|---|")
    for h, th, per in rows:
        rhos = [r["rho"] for r in per]
        tag = f"{th:g}" + (" (validation)" if th == chosen and th != args.threshold else "")
        print(f"| {h:g} | {tag} | {sum(r['n_pairs'] for r in per)} | {', '.join(f'{x:.3f}' for x in rhos)} | "
              f"{np.nanmean(rhos) if np.isfinite(rhos).any() else float('nan'):.3f} | "
              f"{np.mean([r['mean_true'] for r in per]):.3f} | {np.mean([r['mean_pred'] for r in per]):.3f} | "
              f"{np.mean([r['mae'] for r in per]):.3f} |")
    print()
    for th in thresholds:
        at07 = [r["rho"] for h, t, per in rows if abs(h - 0.7) < 1e-9 and t == th for r in per]
        if at07:
            m = float(np.nanmean(at07)) if np.isfinite(at07).any() else float("nan")
            print(f"target rho >= 0.5 at heterogeneity 0.7, threshold {th:g}: {'MET' if m >= 0.5 else 'NOT MET'} "
                  f"(mean rho {m:.3f})")
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "validation_rho": {str(k): v for k, v in val_scores.items()}, "chosen": chosen,
         "levels": [{"heterogeneity": h, "threshold": th, "seeds": per} for h, th, per in rows],
         "train_seconds": t_train, "total_seconds": total}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
