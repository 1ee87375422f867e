"""Does correcting a few cells and fine-tuning help, and which cells should a biologist correct?

Simulates a biologist with the synthetic per-cell truth:

1. a tiny run is trained on the train split (``_review_common.prepare``, reused when present);
2. a *pool* of images not used in training is predicted (the run's segmentation); predicted
   cells that match a true cell (IoU >= 0.6) can be "corrected" with that cell's true labels;
3. for each strategy (uncertainty / random / diverse; ``accept`` is a control: the uncertainty
   cells "corrected" to their own predicted labels, i.e. the same extra training without new
   information), N in 25/50/100 and seed: the N cells the
   strategy suggests are corrected, the cell model is fine-tuned (``review.finetune``), and the
   fused cell mAP (Kaggle 2021 metric) is measured on a separate *test* split, whose cells are
   segmented once with the run's segmentation and reused for every model;
4. calibration: ECE of the fused probabilities on the test cells before / after a temperature
   fitted on the pool cells (the validation side), with a reliability diagram PNG.

Run (about 12 minutes on 1 thread of a shared 2-core CPU)::

    nice -n 5 python benchmarks/bench_review.py --out /work/results/issue-16/bench

Prints tables and writes ``review.json`` and ``reliability.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    from _review_common import add_arguments, prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--ns", default="25,50,100")
    ap.add_argument("--strategies", default="uncertainty,random,diverse")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--weight", type=float, default=5.0)
    ap.add_argument("--tag", default="", help="results file review[_TAG].json")
    args = ap.parse_args(argv)

    import numpy as np
    import pandas as pd

    from napari_cpgcn.batch import BatchOptions, run_predict_folder
    from napari_cpgcn.classes import N_CLASSES
    from napari_cpgcn.evaluation.calibration import (
        apply_temperature,
        expected_calibration_error,
        fit_temperature,
        reliability_diagram,
    )
    from napari_cpgcn.evaluation.cell import cell_map
    from napari_cpgcn.evaluation.matching import match_labels
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.io.masks import read_mask
    from napari_cpgcn.pipeline.predictor import CPGCNPredictor
    from napari_cpgcn.review.corrections import CorrectionStore
    from napari_cpgcn.review.finetune import FinetuneOptions, run_finetune
    from napari_cpgcn.review.suggest import suggest_cells

    t_start = time.perf_counter()
    data, _, pool_ids, test_ids, run, truth = prepare(args)
    out = Path(args.out)
    opts = BatchOptions(batch_size=1, workers=1, device="cpu")
    pool_dir, test_dir = out / "pred_pool", out / "pred_test"
    run_predict_folder(data / "images", run, pool_dir, opts, image_ids=pool_ids)
    run_predict_folder(data / "images", run, test_dir, opts, image_ids=test_ids)
    pool = pd.read_csv(pool_dir / "cells.csv", dtype={"image_id": str})
    fused_cols = [c for c in pool.columns if c.startswith("fused_")]
    pool_fused = {(i, int(c)): f for i, c, f in zip(pool.image_id, pool.cell_id, pool[fused_cols].to_numpy(), strict=True)}

    # the biologist's answer for every pool cell that is a real cell
    answer: dict[tuple[str, int], list[int]] = {}
    for iid in pool_ids:
        pm = read_mask(pool_dir / "masks" / f"{iid}.tif")
        pids, tids, _ = match_labels(pm, truth.mask(iid))
        lab = truth.cell_labels(iid, tids)
        for p, y in zip(pids, lab, strict=True):
            answer[(iid, int(p))] = [int(k) for k in np.flatnonzero(y)] or [N_CLASSES - 1]
    checkable = pool[[(i, int(c)) in answer for i, c in zip(pool.image_id, pool.cell_id, strict=True)]]
    print(f"pool: {len(pool_ids)} images, {len(pool)} predicted cells, {len(checkable)} match a true cell; "
          f"test: {len(test_ids)} images", flush=True)

    test_masks = {i: read_mask(test_dir / "masks" / f"{i}.tif") for i in test_ids}
    true_masks = {i: truth.mask(i) for i in test_ids}
    true_labels = {i: truth.labels[i] for i in test_ids}
    images = {i: read_image(data / "images", image_id=i) for i in test_ids}

    def evaluate(run_dir) -> tuple[float, pd.DataFrame]:
        p = CPGCNPredictor.from_run(run_dir, device="cpu")
        table = pd.concat([p.predict(images[i], cells=test_masks[i], with_cams=False).table for i in test_ids])
        return float(cell_map(test_masks, table, true_masks, true_labels, image_ids=test_ids).map), table

    base_map, base_table = evaluate(run)
    print(f"before: fused cell mAP {base_map:.4f}", flush=True)

    # calibration: temperature fitted on the pool cells, ECE measured on the test cells
    def matched(table, masks_dir_or_dict, ids):
        ps, ys = [], []
        for iid in ids:
            pm = masks_dir_or_dict[iid] if isinstance(masks_dir_or_dict, dict) else read_mask(
                Path(masks_dir_or_dict) / f"{iid}.tif")
            pids, tids, _ = match_labels(pm, truth.mask(iid))
            rows = table[table.image_id == iid].set_index("cell_id")
            ps.append(rows.loc[pids, [c for c in rows.columns if c.startswith("fused_")]].to_numpy(np.float64))
            ys.append(truth.cell_labels(iid, tids))
        return np.concatenate(ps), np.concatenate(ys)

    pv, yv = matched(pool, pool_dir / "masks", pool_ids)
    pt, yt = matched(base_table, test_masks, test_ids)
    temp = fit_temperature(pv, yv)
    ece_before = expected_calibration_error(pt, yt)
    ece_after = expected_calibration_error(apply_temperature(pt, temp), yt)
    reliability_diagram(out / "reliability.png", {"fused": (pt, yt), f"fused / T={temp:.2f}": (apply_temperature(pt, temp), yt)})
    print(f"calibration (test cells): ECE {ece_before:.4f} -> {ece_after:.4f} with T = {temp:.3f} fitted on the pool",
          flush=True)

    ns = [int(n) for n in args.ns.split(",")]
    strategies = args.strategies.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        for strategy in strategies:
            for n in ns:
                t = time.perf_counter()
                work = out / "work" / f"{strategy}_{n}_{seed}"
                shutil.rmtree(work, ignore_errors=True)
                pdir = work / "pred"
                (pdir).mkdir(parents=True)
                (pdir / "masks").symlink_to((pool_dir / "masks").resolve())
                shutil.copy(pool_dir / "run.json", pdir / "run.json")
                # "accept": a control — the cells uncertainty picks, "corrected" to what the model
                # already predicts (the same fine-tuning, no new information)
                picked = suggest_cells(checkable, n, "uncertainty" if strategy == "accept" else strategy, seed=seed)
                store = CorrectionStore(pdir, who="simulated")
                n_changed = 0
                for iid, cid in zip(picked.image_id, picked.cell_id, strict=True):
                    fused = pool_fused[(iid, int(cid))]
                    pred_set = {int(k) for k in np.flatnonzero(fused >= 0.5)} or {int(fused.argmax())}
                    labels = sorted(pred_set) if strategy == "accept" else answer[(iid, int(cid))]
                    store.add(iid, int(cid), labels)
                    n_changed += int(set(labels) != pred_set)
                run2 = work / "run2"
                run_finetune(run, pdir, run2, FinetuneOptions(epochs=args.ft_epochs, weight=args.weight, device="cpu",
                                                              seed=seed))
                m, _ = evaluate(run2)
                rows.append({"strategy": strategy, "n": n, "seed": seed, "n_corrected": len(picked), "n_label_changed": n_changed,
                             "mAP_before": base_map, "mAP_after": m, "delta": m - base_map,
                             "mean_uncertainty": float(picked.uncertainty.mean()),
                             "seconds": time.perf_counter() - t})
                print(f"  {strategy:11s} n={n:3d} seed={seed}: mAP {base_map:.4f} -> {m:.4f} ({m - base_map:+.4f}), {n_changed} labels changed "
                      f"[{time.perf_counter() - t:.0f} s]", flush=True)
                shutil.rmtree(run2 / "cell_model" / "corrections_crops", ignore_errors=True)
    df = pd.DataFrame(rows)
    summary = df.groupby(["strategy", "n"]).agg(mAP_after=("mAP_after", "mean"), delta=("delta", "mean"),
                                                delta_sd=("delta", "std"), seeds=("seed", "count")).reset_index()
    print(f"\nfused cell mAP on the test split, mean over seeds (before: {base_map:.4f})")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    best_unc = summary[(summary.strategy == "uncertainty") & (summary.n == max(ns))]
    rand = summary[(summary.strategy == "random") & (summary.n == max(ns))]
    if len(best_unc) and len(rand):
        d_u, d_r = float(best_unc.delta.iloc[0]), float(rand.delta.iloc[0])
        print(f"\ntarget +0.05 with {max(ns)} uncertainty-chosen cells: {'MET' if d_u >= 0.05 else 'NOT met'} "
              f"({d_u:+.4f}); uncertainty ahead of random: {'YES' if d_u > d_r else 'NO'} ({d_u:+.4f} vs {d_r:+.4f})")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    (out / (f"review_{args.tag}.json" if args.tag else "review.json")).write_text(json.dumps({
        "mAP_before": base_map, "runs": rows, "temperature": temp, "ece_test_before": ece_before,
        "ece_test_after": ece_after, "n_pool_cells": int(len(pool)), "n_checkable": int(len(checkable)),
        "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
