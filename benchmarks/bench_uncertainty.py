"""Which per-(cell, class) uncertainty ranks the wrong decisions first?

Predicts held-out synthetic images (on their true cell masks, so every cell has truth) with a
tiny run and scores each candidate uncertainty by how well it separates the (cell, class)
decisions that are wrong at threshold 0.5 from the right ones (ROC AUC), and by its Spearman
correlation with the absolute error ``|p_fused − y|``:

* ``entropy``       binary entropy of the fused probability (no extra pass)
* ``disagreement``  ``|p_image − p_cell|`` (no extra pass)
* ``tta``           2 · std of the cell probability over 4 / 8 dihedral views of the crop
* ``combined4/8``   ``1 − (1 − entropy)(1 − tta)``  (``CPGCNPredictor(uncertainty="tta")``)
* ``ent+disagree``  ``1 − (1 − entropy)(1 − disagreement)``  (the default ``unc_S``)

Also the ECE of the fused probabilities. Run::

    nice -n 5 python benchmarks/bench_uncertainty.py --out /work/results/issue-16/bench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    from _review_common import add_arguments, prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)

    import numpy as np
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from napari_cpgcn.evaluation.calibration import expected_calibration_error
    from napari_cpgcn.io.celltable import cell_geometry
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.models.cell import crop_cells
    from napari_cpgcn.pipeline.predictor import CPGCNPredictor
    from napari_cpgcn.pipeline.uncertainty import (
        _ALL_VIEWS,
        TTA_VIEWS,
        binary_entropy,
        combine,
        disagreement,
        tta_cell_probs,
        tta_uncertainty,
    )

    data, _, pool_ids, test_ids, run, truth = prepare(args)
    pred = CPGCNPredictor.from_run(run, device="cpu")
    ids = pool_ids + test_ids
    rows: dict[str, list] = {k: [] for k in ("y", "fused", "entropy", "disagreement", "tta4", "tta8",
                                             "combined4", "combined8", "ent+disagree")}
    t_cost = {"plain": 0.0, "tta4": 0.0, "tta8": 0.0}
    c = pred.cell_config
    for iid in ids:
        img = read_image(data / "images", image_id=iid)
        tmask = truth.mask(iid)
        geo = cell_geometry(tmask, iid)
        out = pred.predict(img, cells=tmask, with_cams=False)
        crops = crop_cells(img.data, tmask, geo, size=c.crop_size, zero_background=c.zero_background,
                           pad=c.crop_pad)
        t0 = time.perf_counter()
        tta_cell_probs(pred.cell_model, crops, pred.device, views=("id",))
        t_cost["plain"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        v4 = tta_cell_probs(pred.cell_model, crops, pred.device, views=TTA_VIEWS)
        t_cost["tta4"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        v8 = tta_cell_probs(pred.cell_model, crops, pred.device, views=_ALL_VIEWS)
        t_cost["tta8"] += time.perf_counter() - t0
        fused = out.fused_probs
        y = truth.cell_labels(iid, geo["cell_id"].to_numpy())
        rows["y"].append(y)
        rows["fused"].append(fused)
        rows["entropy"].append(binary_entropy(fused))
        rows["disagreement"].append(disagreement(out.image_probs, out.cell_probs))
        s4, s8 = tta_uncertainty(v4), tta_uncertainty(v8)
        rows["tta4"].append(s4)
        rows["tta8"].append(s8)
        rows["combined4"].append(combine(fused, s4))
        rows["combined8"].append(combine(fused, s8))
        rows["ent+disagree"].append(combine(fused, disagreement(out.image_probs, out.cell_probs)))
    cells = {k: np.concatenate(v) for k, v in rows.items()}
    cat = {k: v.ravel() for k, v in cells.items()}
    cell_wrong = ((cells["fused"] >= 0.5) != (cells["y"] > 0)).any(1).astype(int)
    wrong = ((cat["fused"] >= 0.5) != (cat["y"] > 0)).astype(int)
    err = np.abs(cat["fused"] - cat["y"])
    results = {"n_decisions": int(len(wrong)), "n_wrong": int(wrong.sum()), "images": len(ids),
               "seconds_cell_model": t_cost, "measures": {}}
    print(f"{len(ids)} images, {len(wrong)} (cell, class) decisions, {wrong.sum()} wrong at 0.5")
    print(f"{len(cell_wrong)} cells, {cell_wrong.sum()} with a wrong decision")
    print(f"{'measure':14s} {'AUROC(wrong)':>13s} {'Spearman |err|':>15s} {'cell AUROC':>11s}")
    for k in ("entropy", "disagreement", "tta4", "tta8", "combined4", "combined8", "ent+disagree"):
        auc = float(roc_auc_score(wrong, cat[k])) if 0 < wrong.sum() < len(wrong) else float("nan")
        rho = float(spearmanr(cat[k], err).statistic)
        cauc = float(roc_auc_score(cell_wrong, cells[k].max(1))) if 0 < cell_wrong.sum() < len(cell_wrong) \
            else float("nan")
        results["measures"][k] = {"auroc_wrong": auc, "spearman_abs_err": rho, "cell_auroc_wrong": cauc}
        print(f"{k:14s} {auc:13.3f} {rho:15.3f} {cauc:11.3f}")
    ece = expected_calibration_error(cat["fused"], cat["y"])
    results["ece_fused"] = ece
    print(f"ECE fused (15 bins): {ece:.4f}")
    print("cell-model seconds over these images: " + ", ".join(f"{k} {v:.2f}" for k, v in t_cost.items()))
    Path(args.out, "uncertainty.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
