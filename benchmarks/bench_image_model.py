"""Benchmark the image-level model: the paper's ablation (cnn, cnn+cpm, cpgcn) plus ML-GCN.

Every variant is trained on the same synthetic heterogeneous data set (``napari_cpgcn.synth``)
under the same small CPU budget (same backbone, image size, epochs, batch size, seeds) and
evaluated on a separate synthetic test set. Prints one table: image-level test mAP per variant
(mean ± sd over seeds), seconds per training epoch, inference images/s, peak RSS of the
training process. Also times one training step of ResNet50 CP-GCN at 512², batch 8.

Each (variant, seed) runs in its own subprocess so that its peak memory is its own.

``--pretrain-n N`` adds the paper's starting point, a pretrained backbone: a ``cnn`` model is first
trained on N *other* synthetic images (a stand-in for ImageNet weights, which cannot be
downloaded here), and every variant then starts from its backbone (``init_from``) with fresh
heads.

Usage::

    nice python benchmarks/bench_image_model.py                      # the documented run
    nice python benchmarks/bench_image_model.py --n-train 64 --epochs 2 --seeds 0   # quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS = ("cnn", "cnn+cpm", "cpgcn", "mlgcn")


def make_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from napari_cpgcn.synth import generate_dataset

    sets = {}
    for name, n, seed in (("train", args.n_train, 1000), ("test", args.n_test, 2000)):
        d = work / f"{name}_n{n}_s{args.size}_c{args.cell_scale}_h{args.heterogeneity}_seed{seed}"
        if not (d / "train.csv").is_file():
            t0 = time.perf_counter()
            generate_dataset(d, n, size=args.size, seed=seed, heterogeneity=args.heterogeneity,
                             cell_scale=args.cell_scale)
            print(f"# generated {name} set: {n} images of {args.size}² in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        sets[name] = d
    return sets["train"], sets["test"]


def pretrain(work: Path, args: argparse.Namespace) -> Path:
    """Train (once, cached) the ``cnn`` model whose backbone every variant starts from."""
    import torch

    from napari_cpgcn.events import EventKind
    from napari_cpgcn.synth import generate_dataset
    from napari_cpgcn.training.config import ImageModelConfig
    from napari_cpgcn.training.image_trainer import train_image_model

    d = work / f"pretrain_n{args.pretrain_n}_s{args.size}_c{args.cell_scale}_h{args.heterogeneity}_seed3000"
    if not (d / "train.csv").is_file():
        generate_dataset(d, args.pretrain_n, size=args.size, seed=3000, heterogeneity=args.heterogeneity,
                         cell_scale=args.cell_scale)
    # every setting that shapes the pretrained backbone is in the name, so a cached one is reused only
    # for the same settings
    run = work / "runs" / (f"pretrain_cnn_n{args.pretrain_n}_e{args.pretrain_epochs}_os{args.output_stride}_"
                           f"{args.backbone}_i{args.image_size}_b{args.batch_size}_lr{args.lr:g}_"
                           f"s{args.size}_c{args.cell_scale}_h{args.heterogeneity}")
    ckpt = run / "latest.pt"
    if (run / "done").is_file():
        return ckpt
    torch.set_num_threads(max(1, min(args.jobs * args.threads, os.cpu_count() or 1)))
    cfg = ImageModelConfig(
        backbone=args.backbone, variant="cnn", image_size=args.image_size, batch_size=args.batch_size,
        epochs=args.pretrain_epochs, lr=args.lr, seed=0, device="cpu", imagenet_weights=None,
        val_fraction=0.0, oaa=False, output_stride=args.output_stride,
        cache_dir=str(work / "cache" / f"{d.name}_{args.image_size}"))
    t0 = time.perf_counter()
    for ev in train_image_model(d, d / "train.csv", run, cfg, resume=True):
        if ev.kind == EventKind.EPOCH_END:
            print(f"# pretrain epoch {ev.epoch}: loss {ev.loss:.4f}", flush=True)
    (run / "done").write_text("")
    print(f"# pretrained cnn backbone on {args.pretrain_n} images, {args.pretrain_epochs} epochs "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    return ckpt


def worker(args: argparse.Namespace) -> None:
    """Train one variant with one seed, evaluate on the test set, print a JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from napari_cpgcn.evaluation.image import mean_average_precision, per_class_ap
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.io.hpa import image_index
    from napari_cpgcn.io.tables import read_labels_csv
    from napari_cpgcn.pipeline.inference import predict_images
    from napari_cpgcn.training.checkpoint import load_image_model
    from napari_cpgcn.training.config import ImageModelConfig
    from napari_cpgcn.training.image_trainer import train_image_model

    train_dir, test_dir = Path(args.train_dir), Path(args.test_dir)
    tag = "" if (args.cpm_norm, args.gcn_lr_scale, args.gcn_center) == ("sigmoid", 0.01, 0) \
        else f"_{args.cpm_norm}_g{args.gcn_lr_scale}_c{args.gcn_center}"
    tag += (f"_res{args.gcn_residual_std:g}" if args.gcn_residual_std else "_res") if args.gcn_residual else ""
    tag += "_learnv" if args.gcn_learn_inputs else ""
    tag += f"_os{args.output_stride}" if args.output_stride != 32 else ""
    if args.init_from:  # the stand-in's image count, or a short hash of another start (e.g. a pretrain folder)
        parent = Path(args.init_from).parent.name
        tag += (f"_pt{parent.split('_n')[1].split('_')[0]}" if parent.startswith("pretrain_cnn_n")
                else "_init" + hashlib.sha1(str(Path(args.init_from).resolve()).encode()).hexdigest()[:8])
    tag += f"_e{args.epochs}_n{train_dir.name.split('_')[1][1:]}"
    run = Path(args.work) / "runs" / f"{args.variant.replace('+', '_')}_seed{args.seed}{tag}"
    cfg = ImageModelConfig(
        backbone=args.backbone, variant=args.variant, image_size=args.image_size, batch_size=args.batch_size,
        epochs=args.epochs, lr=args.lr, seed=args.seed, device="cpu", imagenet_weights=None,
        val_fraction=0.0, gcn_hidden=args.gcn_hidden, oaa=False, lr_schedule=args.lr_schedule,
        cpm_norm=args.cpm_norm, gcn_lr_scale=args.gcn_lr_scale, gcn_center=bool(args.gcn_center),
        gcn_residual=bool(args.gcn_residual), gcn_residual_std=args.gcn_residual_std,
        gcn_learn_inputs=bool(args.gcn_learn_inputs), output_stride=args.output_stride,
        init_from=args.init_from or None,
        cache_dir=str(Path(args.work) / "cache" / f"{train_dir.name}_{args.image_size}"),
    )
    secs = []
    history = run / "history.csv"
    if (run / "latest.pt").is_file() and history.is_file() and \
            len(history.read_text().splitlines()) == args.epochs + 1:  # trained by an earlier call
        secs = [float(line.split(",")[-1]) for line in history.read_text().splitlines()[1:]]
    else:
        for ev in train_image_model(train_dir, train_dir / "train.csv", run, cfg, resume=False):
            if ev.kind == EventKind.EPOCH_END:
                secs.append(ev.metrics["seconds"])
    model, _ = load_image_model(run / "latest.pt", "cpu")
    table = read_labels_csv(test_dir / "train.csv")
    index = image_index(test_dir)
    images = [index.read(i) for i in table.ids]
    t0 = time.perf_counter()
    probs, _ = predict_images(model, images, batch_size=args.batch_size, cam_size=None)
    infer = len(images) / (time.perf_counter() - t0)
    ap = per_class_ap(table.labels, probs)
    out = {
        "variant": args.variant, "seed": args.seed,
        "mAP": mean_average_precision(table.labels, probs),
        "ap": [None if not np.isfinite(a) else float(a) for a in ap],
        "s_per_epoch": statistics.mean(secs[1:] if len(secs) > 1 else secs),
        "infer_img_s": infer,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(out), flush=True)


def resnet50_step(threads: int, repeats: int = 2) -> dict:
    """Seconds per training step of resnet50 CP-GCN at 512², batch 8 (random data, CPU)."""
    import numpy as np
    import torch

    from napari_cpgcn.models import build_image_model
    from napari_cpgcn.training.config import ImageModelConfig
    from napari_cpgcn.training.losses import focal_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ImageModelConfig(backbone="resnet50", variant="cpgcn", imagenet_weights=None)
    model = build_image_model(cfg, label_matrix=np.eye(19)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(8, 4, 512, 512)
    y = (torch.rand(8, 19) < 0.2).float()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        logits, _ = model(x)
        focal_loss(logits, y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"s_per_step": statistics.mean(times[1:]), "threads": threads,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/napari-cpgcn-bench-image", help="data, cache and runs folder")
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--n-test", type=int, default=160)
    ap.add_argument("--size", type=int, default=128, help="synthetic image side")
    ap.add_argument("--heterogeneity", type=float, default=0.7)
    ap.add_argument("--cell-scale", type=float, default=0.5,
                    help="synthetic cell size factor (0.5: cells as in a 256² view of a Kaggle field)")
    ap.add_argument("--image-size", type=int, default=128, help="network input side")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-schedule", default="constant")
    ap.add_argument("--gcn-hidden", type=int, default=256)
    ap.add_argument("--cpm-norm", default="sigmoid", choices=["sigmoid", "softmax"])
    ap.add_argument("--gcn-lr-scale", type=float, default=0.01, help="learning-rate factor of the label GCN")
    ap.add_argument("--gcn-center", type=int, default=0, help="1: subtract the class mean from the GCN outputs")
    ap.add_argument("--gcn-residual", type=int, default=0,
                    help="1: classifier = GCN output + a free per-class vector (starts at zero)")
    ap.add_argument("--gcn-residual-std", type=float, default=0.0,
                    help="initial std of the residual vectors in units of 1/sqrt(D) (0: zero)")
    ap.add_argument("--gcn-learn-inputs", type=int, default=0,
                    help="1: train the GCN node inputs (initialised from the word vectors)")
    ap.add_argument("--output-stride", type=int, default=32, choices=[16, 32],
                    help="backbone output stride (16: last ResNet stage dilated, 4x more CAM cells)")
    ap.add_argument("--pretrain-n", type=int, default=0,
                    help="images of a separate synthetic set to pretrain the backbone on (0: from scratch)")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--jobs", type=int, default=1, help="(variant, seed) trainings run at once")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    ap.add_argument("--skip-resnet50", action="store_true")
    ap.add_argument("--resnet50-only", action="store_true")
    # internal: one (variant, seed) in a subprocess
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--train-dir", help=argparse.SUPPRESS)
    ap.add_argument("--test-dir", help=argparse.SUPPRESS)
    ap.add_argument("--init-from", default="",
                    help="start every variant's backbone from this checkpoint or folder (e.g. a `napari-cpgcn "
                         "pretrain` folder) instead of --pretrain-n")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if not args.resnet50_only:
        train_dir, test_dir = make_data(work, args)
        init_from = (str(Path(args.init_from).resolve()) if args.init_from
                     else str(pretrain(work, args)) if args.pretrain_n > 0 else "")
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        variants = [v for v in args.variants.split(",") if v]
        results: dict[str, list[dict]] = {v: [] for v in variants}

        def run_one(v: str, seed: int) -> dict:
            cmd = [sys.executable, __file__, "--worker", "--variant", v, "--seed", str(seed),
                   "--train-dir", str(train_dir), "--test-dir", str(test_dir), "--init-from", init_from]
            for k in ("work", "image_size", "backbone", "epochs", "batch_size", "lr", "lr_schedule",
                      "gcn_hidden", "threads", "cpm_norm", "gcn_lr_scale", "gcn_center",
                      "gcn_residual", "gcn_residual_std", "gcn_learn_inputs", "output_stride"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"worker {v} seed {seed} failed")
            r = json.loads(line[7:])
            print(f"# {v:8s} seed {seed}: test mAP {r['mAP']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            return r

        jobs = [(v, seed) for seed in seeds for v in variants]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for (v, _), r in zip(jobs, pool.map(lambda job: run_one(*job), jobs), strict=True):
                results[v].append(r)
        print()
        start = (f"backbone from {args.init_from}" if args.init_from else
                 f"backbone pretrained as cnn on {args.pretrain_n} other synthetic images for "
                 f"{args.pretrain_epochs} epochs" if args.pretrain_n else "from scratch")
        print(f"Image-level ablation: {args.backbone} {start}, {args.image_size}² input, "
              f"output stride {args.output_stride}, {args.epochs} epochs, batch {args.batch_size}, Adam {args.lr}, focal loss, CPM {args.cpm_norm}, GCN lr x{args.gcn_lr_scale}, GCN centred {bool(args.gcn_center)}, "
              f"GCN residual {bool(args.gcn_residual)} (init std {args.gcn_residual_std:g}/sqrt(D)), learnable GCN inputs {bool(args.gcn_learn_inputs)}; "
              f"train {args.n_train} / test {args.n_test} synthetic images ({args.size}², heterogeneity "
              f"{args.heterogeneity}); seeds {args.seeds}; {args.threads} torch thread(s)")
        print()
        print("| variant | test mAP (mean ± sd) | per seed | s/epoch | inference img/s | peak RSS MB |")
        print("|---|---|---|---|---|---|")
        for v in variants:
            rs = results[v]
            maps = [r["mAP"] for r in rs]
            sd = statistics.stdev(maps) if len(maps) > 1 else 0.0
            print(f"| {v} | {statistics.mean(maps):.4f} ± {sd:.4f} | {' / '.join(f'{m:.4f}' for m in maps)} | "
                  f"{statistics.mean(r['s_per_epoch'] for r in rs):.1f} | "
                  f"{statistics.mean(r['infer_img_s'] for r in rs):.1f} | "
                  f"{max(r['peak_rss_mb'] for r in rs):.0f} |")
        (work / "results.json").write_text(json.dumps(results, indent=1))
    if not args.skip_resnet50:
        r50 = resnet50_step(threads=max(1, min(2, os.cpu_count() or 1)))
        print()
        print(f"ResNet50 CP-GCN training step at 512², batch 8 (CPU, {r50['threads']} threads): "
              f"{r50['s_per_step']:.1f} s/step, peak RSS {r50['peak_rss_mb']:.0f} MB")
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
