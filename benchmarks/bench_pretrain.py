"""What a pretrained start does for the weakly supervised pipeline: random init vs self-supervised
pretraining on the training images vs the supervised stand-in.

For every data seed the same synthetic data set (``bench_cell_pipeline``'s: 48 training / 16
test 256² images, heterogeneity 0.7) is trained with the same pipeline and budget
(``bench_cell_pipeline.py --ks 10 --output-stride 16 --no-baseline --no-true-cells``) from three
starts:

``random``      random initialisation;
``ssl``         ``napari-cpgcn pretrain`` on the seed's *training* images (no labels; the test
                images are never seen), :mod:`napari_cpgcn.training.pretrain`;
``supervised``  the stand-in for ImageNet of ``bench_image_model.py --pretrain-n``: a ``cnn``
                image model trained on N other labelled synthetic images (trained once, shared).

Columns: CAM localisation AUC of the image model (and after the K = 10 refinement), pseudo-label
P / R / F1 (K = 10) and the F1 of copying the image labels to every cell, test cell mAP (Kaggle,
classical segmentation) of the image model alone, the cell model alone, the paper's product and
the fusion chosen by :func:`napari_cpgcn.pipeline.fusion.select_fusion` on the run's validation images
(pseudo-labels as targets, grouped cross-validation), and the pretraining seconds (wall / CPU).

The SSL settings were chosen on data seed 100 (``--seeds 100``); the documented table reports
other seeds. Each job is a subprocess with ``--threads`` torch threads; ``--jobs`` run at once.

Usage::

    nice -n 5 python benchmarks/bench_pretrain.py --work /tmp/bench_pretrain --seeds 1,2,3 --jobs 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = ("random", "ssl", "supervised")


def _bench_module(name: str):
    """Import a sibling benchmark script (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- jobs (subprocesses)

def job_data(args) -> None:
    """Generate one seed's data set (bench_cell_pipeline's settings) into --out/data."""
    from napari_cpgcn.synth import generate_dataset

    data = Path(args.out) / "data"
    if not (data / "train.csv").is_file():
        generate_dataset(data, args.n_train + args.n_test, size=args.size, seed=args.seed,
                         heterogeneity=args.heterogeneity, cell_scale=args.cell_scale)


def job_ssl(args) -> None:
    """Self-supervised pretraining on the training images of one seed; prints a RESULT line."""
    import torch

    torch.set_num_threads(args.threads)
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.io.tables import read_labels_csv
    from napari_cpgcn.training.pretrain import PretrainConfig, pretrain_backbone

    done = Path(args.out, "bench.json")
    if done.is_file() and Path(json.loads(done.read_text())["path"]).is_file():  # an earlier call's: its seconds
        print("RESULT " + done.read_text().replace("\n", " "), flush=True)
        return
    data = Path(args.data)
    train_ids = read_labels_csv(data / "train.csv").ids[:args.n_train]
    cfg = PretrainConfig(backbone=args.backbone, method=args.ssl_method, views=args.ssl_views,
                         image_size=args.image_size, crop_size=args.ssl_crop_size, epochs=args.ssl_epochs,
                         batch_size=args.ssl_batch_size, lr=args.ssl_lr, tiles_per_image=args.ssl_tiles_per_image,
                         crop_scale=(args.ssl_crop_min, args.ssl_crop_max), temperature=args.ssl_temperature,
                         reference_dropout=args.ssl_reference_dropout,
                         hidden_dim=512, projection_dim=128, seed=args.seed, device="cpu")
    t0, c0 = time.perf_counter(), time.process_time()
    last = None
    for ev in pretrain_backbone(data / "images", args.out, cfg, image_ids=train_ids):
        if ev.kind == EventKind.EPOCH_END:
            print(f"# ssl seed {args.seed} epoch {ev.epoch}/{ev.n_epochs}: loss {ev.loss:.4f}", flush=True)
        last = ev
    assert last is not None and last.kind == EventKind.DONE, last
    out = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "path": last.result.backbone_path,
           "first_loss": last.result.first_loss, "final_loss": last.result.final_loss, "config": cfg.to_dict()}
    Path(args.out, "bench.json").write_text(json.dumps(out, indent=1))
    print("RESULT " + json.dumps(out), flush=True)


def job_supervised(args) -> None:
    """The supervised stand-in of bench_image_model.py (cached there); prints a RESULT line."""
    bim = _bench_module("bench_image_model")
    ns = argparse.Namespace(pretrain_n=args.pretrain_n, pretrain_epochs=args.pretrain_epochs, size=128,
                            cell_scale=0.5, heterogeneity=0.7, output_stride=args.output_stride,
                            backbone=args.backbone, image_size=128, batch_size=8, lr=1e-3, jobs=1,
                            threads=args.threads)
    work = Path(args.out)
    t0, c0 = time.perf_counter(), time.process_time()
    ckpt = bim.pretrain(work, ns)
    stamp = ckpt.parent / "bench_seconds.json"
    if stamp.is_file():  # trained by an earlier call: its own seconds
        secs = json.loads(stamp.read_text())
    else:
        secs = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
        stamp.write_text(json.dumps(secs))
    print("RESULT " + json.dumps({**secs, "path": str(ckpt)}), flush=True)


def job_pipeline(args) -> None:
    """bench_cell_pipeline for one (seed, start), then the fusion options; prints a RESULT line."""
    out = Path(args.out)
    argv = ["--out", str(out), "--seed", str(args.seed), "--ks", "10", "--output-stride", str(args.output_stride),
            "--n-train", str(args.n_train), "--n-test", str(args.n_test), "--size", str(args.size),
            "--heterogeneity", str(args.heterogeneity), "--cell-scale", str(args.cell_scale),
            "--backbone", args.backbone, "--image-size", str(args.image_size),
            "--image-epochs", str(args.image_epochs), "--rounds", str(args.rounds),
            "--refine-epochs", str(args.refine_epochs), "--cell-epochs", str(args.cell_epochs),
            "--crop-size", str(args.crop_size), "--threads", str(args.threads), "--no-baseline", "--no-true-cells"]
    if args.init_from:
        argv += ["--init-from", args.init_from]
    if not (out / "results.json").is_file():
        (out / "data").parent.mkdir(parents=True, exist_ok=True)
        if not (out / "data").exists():
            os.symlink(Path(args.data).resolve(), out / "data")
        bcp = _bench_module("bench_cell_pipeline")
        assert bcp.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    c0 = time.process_time()
    fusion = fusion_options(out / "run_K10", Path(args.data), args.n_train, args.threads)
    res["fusion"] = fusion
    res["fusion_cpu_seconds"] = time.process_time() - c0
    (out / "results.json").write_text(json.dumps(res, indent=2, default=float))
    print("RESULT " + json.dumps({"out": str(out)}), flush=True)


def fusion_options(run: Path, data: Path, n_train: int, threads: int) -> dict:
    """Test cell mAP of every fusion option; the learned ones and the choice are fitted on the
    run's validation images (held out from the image model), with their pseudo-labels as targets."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.evaluation.cell import CellAPAccumulator, CellTruth
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.io.tables import read_labels_csv
    from napari_cpgcn.pipeline.fusion import (
        FUSION_METHODS,
        fit_fusion,
        fuse,
        select_fusion,
        validation_cells,
    )
    from napari_cpgcn.pipeline.predictor import CPGCNPredictor

    cols_i = [f"image_{s}" for s in SHORT_NAMES]
    cols_c = [f"cell_{s}" for s in SHORT_NAMES]
    predictor = CPGCNPredictor.from_run(run, device="cpu")
    ip, cp, y, groups = validation_cells(predictor, run, data / "images")
    chosen = select_fusion(ip, cp, y, groups)
    fitted = {m: fit_fusion(ip, cp, y, m) for m in FUSION_METHODS}
    chosen.save(run / "fusion.json")

    truth = CellTruth.load(data)
    test_ids = read_labels_csv(data / "train.csv").ids[n_train:]
    accs = {m: CellAPAccumulator() for m in (*FUSION_METHODS, "chosen")}
    for iid in test_ids:
        out = predictor.predict(read_image(data / "images", image_id=iid), with_cams=False)
        ti, tc = out.table[cols_i].to_numpy(np.float32), out.table[cols_c].to_numpy(np.float32)
        tids, tlab = truth.labels[iid]
        pids = out.table["cell_id"].to_numpy(np.int64)
        for m, acc in accs.items():
            params = chosen if m == "chosen" else fitted[m]
            acc.add(out.cells, pids, fuse(ti, tc, params=params), truth.mask(iid), tids, tlab)
    return {"test_cell_mAP": {m: float(a.result().map) for m, a in accs.items()},
            "chosen": chosen.method, "cv_mAP": chosen.info.get("cv_mAP", {}), "fit_images": len(set(groups)),
            "fit_cells": int(len(y))}


# ----------------------------------------------------------------------------- driver

def _run(cmd: list[str], label: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"{label} failed")
    print(f"# {label}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(line[7:])


def _fmt(vals: list[float], digits: int = 3) -> str:
    vals = [v for v in vals if v == v]
    if not vals:
        return "—"
    m = statistics.mean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench_pretrain")
    ap.add_argument("--seeds", default="1,2,3", help="data (and training) seeds reported")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--jobs", type=int, default=2, help="subprocesses at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    # the pipeline (bench_cell_pipeline's defaults)
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-test", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--heterogeneity", type=float, default=0.7)
    ap.add_argument("--cell-scale", type=float, default=0.6)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--image-epochs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--refine-epochs", type=int, default=3)
    ap.add_argument("--cell-epochs", type=int, default=8)
    ap.add_argument("--crop-size", type=int, default=64)
    ap.add_argument("--output-stride", type=int, default=16)
    # self-supervised pretraining
    ap.add_argument("--ssl-method", default="simclr")
    ap.add_argument("--ssl-views", default="tiles")
    ap.add_argument("--ssl-epochs", type=int, default=20)
    ap.add_argument("--ssl-batch-size", type=int, default=32)
    ap.add_argument("--ssl-crop-size", type=int, default=64)
    ap.add_argument("--ssl-crop-min", type=float, default=0.08)
    ap.add_argument("--ssl-crop-max", type=float, default=0.5)
    ap.add_argument("--ssl-tiles-per-image", type=int, default=4)
    ap.add_argument("--ssl-lr", type=float, default=1e-3)
    ap.add_argument("--ssl-temperature", type=float, default=0.2)
    ap.add_argument("--ssl-reference-dropout", type=float, default=0.0)
    ap.add_argument("--ssl-tag", default="", help="name of the SSL setting (its own folders)")
    # the supervised stand-in (bench_image_model's)
    ap.add_argument("--pretrain-n", type=int, default=480)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    # internal
    ap.add_argument("--job", choices=["data", "ssl", "supervised", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--init-from", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        {"data": job_data, "ssl": job_ssl, "supervised": job_supervised, "pipeline": job_pipeline}[args.job](args)
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = [r for r in args.rows.split(",") if r]
    t_start, c_start = time.perf_counter(), time.process_time()
    passthrough = []
    for k in ("threads", "n_train", "n_test", "size", "heterogeneity", "cell_scale", "backbone", "image_size",
              "image_epochs", "rounds", "refine_epochs", "cell_epochs", "crop_size", "output_stride",
              "ssl_method", "ssl_views", "ssl_epochs", "ssl_batch_size", "ssl_crop_size", "ssl_crop_min",
              "ssl_crop_max", "ssl_tiles_per_image", "ssl_lr", "ssl_temperature", "ssl_reference_dropout",
              "pretrain_n", "pretrain_epochs"):
        passthrough += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    me = [sys.executable, __file__, *passthrough]
    ssl_tag = args.ssl_tag or (f"{args.ssl_method}_{args.ssl_views}_e{args.ssl_epochs}_b{args.ssl_batch_size}_"
                               f"c{args.ssl_crop_size}"
                               + (f"_rd{args.ssl_reference_dropout:g}" if args.ssl_reference_dropout else ""))
    data = {s: work / f"seed{s}" / "data" for s in seeds}

    # phase 1: data sets, pretrainings
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda s: subprocess.run([*me, "--job", "data", "--out", str(work / f"seed{s}"),
                                                "--seed", str(s)], check=True), seeds))
        futures = {}
        if "supervised" in rows:
            futures["supervised"] = pool.submit(_run, [*me, "--job", "supervised", "--out", str(work / "standin")],
                                                "supervised stand-in")
        if "ssl" in rows:
            for s in seeds:
                futures[("ssl", s)] = pool.submit(
                    _run, [*me, "--job", "ssl", "--out", str(work / f"seed{s}" / f"ssl_{ssl_tag}"),
                           "--data", str(data[s]), "--seed", str(s)], f"ssl seed {s}")
        pre = {k: f.result() for k, f in futures.items()}

        # phase 2: the pipeline from each start
        jobs = []
        for s in seeds:
            for r in rows:
                init = "" if r == "random" else pre[("ssl", s) if r == "ssl" else "supervised"]["path"]
                name = r if r != "ssl" else f"ssl_{ssl_tag}"
                jobs.append((s, r, [*me, "--job", "pipeline", "--out", str(work / f"seed{s}" / f"run_{name}"),
                                    "--data", str(data[s]), "--seed", str(s), "--init-from", init]))
        outs = list(pool.map(lambda j: _run(j[2], f"pipeline seed {j[0]} {j[1]}"), jobs))

    results: dict[str, list[dict]] = {r: [] for r in rows}
    for (s, r, _), o in zip(jobs, outs, strict=True):
        res = json.loads(Path(o["out"], "results.json").read_text())
        res["seed"] = s
        res["pretrain"] = pre.get(("ssl", s) if r == "ssl" else r, {})
        results[r].append(res)
    (work / f"results_{ssl_tag}.json").write_text(json.dumps(results, indent=1, default=float))

    def col(r, f):
        return [f(x) for x in results[r]]

    kname = "cell model on pseudo-labels (K = 10)"
    print()
    print(f"Synthetic data seeds {args.seeds}: {args.n_train} train / {args.n_test} test {args.size}² images, "
          f"heterogeneity {args.heterogeneity}; {args.backbone}, image model {args.image_size}² x {args.image_epochs} "
          f"epochs (output stride {args.output_stride}), refinement K = 10, {args.rounds} x {args.refine_epochs} "
          f"epochs, cell model {args.crop_size}² x {args.cell_epochs} epochs. SSL: {args.ssl_method} on "
          f"{args.ssl_views}, {args.ssl_epochs} epochs, batch {args.ssl_batch_size}, {args.ssl_crop_size}px views. "
          f"Supervised stand-in: cnn on {args.pretrain_n} other labelled images x {args.pretrain_epochs} epochs. "
          f"Mean ± sd over seeds.")
    print()
    print("| start | CAM AUC (image model / refined) | pseudo-labels P / R / F1 (K = 10) | F1 of copied image labels "
          "| cell mAP image-only | cell-only | fused (product) | fused (chosen) | pretraining s (wall / CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def pl(name, key, r=r):
            return col(r, lambda res: res["pseudo_label"][name][key])

        def cm(name, r=r):
            return col(r, lambda res: res["cell_map"][name]["segmented"])

        def fu(m, r=r):
            return col(r, lambda res: res["fusion"]["test_cell_mAP"][m])

        pre_w = col(r, lambda x: x["pretrain"].get("wall", 0.0))
        pre_c = col(r, lambda x: x["pretrain"].get("cpu", 0.0))
        chosen = "/".join(x["fusion"]["chosen"] for x in results[r])
        print(f"| {r} | {_fmt(pl('no refinement', 'cam_auc'))} / {_fmt(pl('K = 10', 'cam_auc'))} | "
              f"{_fmt(pl('K = 10', 'precision'))} / {_fmt(pl('K = 10', 'recall'))} / {_fmt(pl('K = 10', 'f1'))} | "
              f"{_fmt(pl('reference', 'f1'))} | {_fmt(cm('image-level prediction given to every cell'))} | "
              f"{_fmt(cm(kname))} | {_fmt(cm('fused: image x pseudo-label cell model'))} | "
              f"{_fmt(fu('chosen'))} ({chosen}) | {statistics.mean(pre_w):.0f} / {statistics.mean(pre_c):.0f} |")
    print()
    print("Per seed (image-only / cell-only / product / chosen; F1 pseudo vs copy; CAM AUC):")
    for r in rows:
        for x in results[r]:
            f = x["fusion"]["test_cell_mAP"]
            print(f"  {r:10s} seed {x['seed']}: {f['image']:.3f} / {f['cell']:.3f} / {f['product']:.3f} / "
                  f"{f['chosen']:.3f} ({x['fusion']['chosen']}); F1 {x['pseudo_label']['K = 10']['f1']:.3f} vs "
                  f"{x['pseudo_label']['reference']['f1']:.3f}; AUC {x['pseudo_label']['no refinement']['cam_auc']:.3f}"
                  f"; all fusions {json.dumps({k: round(v, 3) for k, v in f.items()})}")
    cpu = sum(x.get("cpu_seconds", 0) + x.get("fusion_cpu_seconds", 0) for r in rows for x in results[r])
    cpu += sum(v.get("cpu", 0) for k, v in pre.items())
    print(f"\n# total {time.perf_counter() - t_start:.0f} s wall; {cpu:.0f} s CPU in the jobs "
          f"(+{time.process_time() - c_start:.0f} s here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
