"""Benchmark of folder prediction (``napari-cpgcn predict``): throughput, time per stage, peak RSS.

Prints
1. seconds per image by stage (read, segment, image model, cell model, write) and images/s
   for large (default 2048²) synthetic images;
2. images/s and peak RSS of whole ``predict`` runs over folders of 10, 100 and 500 synthetic
   images (each run in a fresh process, so its peak RSS is its own), and the RSS change from
   the smallest-but-one to the largest count (target: flat within 10 %).

The model is a pipeline run trained for the benchmark with the ``tiny`` preset but a
**resnet18** image model (throughput does not depend on how well it is trained), unless
``--model`` gives one. Folders of N images are made of a few distinct synthetic images
hard-linked under N ids (reading and predicting costs the same; generating 500 2048² images
would take longer than the benchmark itself).

Usage::

    nice .venv/bin/python benchmarks/bench_batch.py                       # defaults below
    nice .venv/bin/python benchmarks/bench_batch.py --counts 10 100 500 --size 512 \\
        --big-size 2048 --n-big 4 --threads 2

Keep it small on a shared CPU: the defaults take ~10-15 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(os.environ.get("BENCH_BATCH_DIR", "/tmp/bench_batch"))


# ----------------------------------------------------------------------------------- helpers

def build_run(work: Path, backbone: str, threads: int) -> Path:
    """A pipeline run with ``backbone`` image and cell models, trained briefly on tiny synthetic data."""
    import torch

    from napari_cpgcn.pipeline import PipelineConfig, train_pipeline
    from napari_cpgcn.synth import generate_dataset

    torch.set_num_threads(threads)
    run = work / f"run_{backbone}"
    data = work / "train_data"
    if not (data / "train.csv").is_file():
        generate_dataset(data, 8, size=128, seed=11)
    # The paper's image size (512) sets the image model's input; tiny training otherwise.
    config = PipelineConfig.tiny(backbone=backbone, image_size=512, epochs=1)
    t = time.perf_counter()
    for _ in train_pipeline(data, data / "train.csv", run, config):
        pass
    print(f"# model: {run} ({backbone} image model, tiny preset; {time.perf_counter() - t:.0f} s to train)",
          flush=True)
    return run


def make_folder(work: Path, n: int, size: int, n_unique: int = 4) -> Path:
    """``n`` images at ``size``² made of ``n_unique`` distinct synthetic images (hard links)."""
    from napari_cpgcn.synth import generate_dataset

    src = work / f"unique_{size}"
    if not (src / "train.csv").is_file():
        generate_dataset(src, n_unique, size=size, seed=3)
    files = sorted((src / "images").glob("*.png"))
    ids = sorted({f.name.rsplit("_", 1)[0] for f in files})
    folder = work / f"images_{size}_{n}"
    if folder.is_dir() and len(list(folder.glob("*_green.png"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = ids[i % len(ids)]
        for color in ("red", "green", "blue", "yellow"):
            dst = folder / f"img{i:05d}_{color}.png"
            if not dst.exists():
                os.link(src / "images" / f"{base}_{color}.png", dst)
    return folder


# ------------------------------------------------------------------ child: one predict run

#: stage -> attribute of napari_cpgcn.pipeline that Predictor.predict calls for it.
STAGE_HOOKS = {
    "segment": "segment",                        # module function: segmentation of the image
    "image_model": "Predictor.predict_image",    # image model: probabilities (+ CAMs)
    "cell_model": "Predictor.predict_cells",     # crops + cell model
}


def instrument() -> dict[str, float]:
    """Wrap the predictor's stage functions with timers; returns the running totals (seconds)."""
    import napari_cpgcn.pipeline as pipeline

    totals: dict[str, float] = {}
    for stage, name in STAGE_HOOKS.items():
        owner = pipeline
        *path, attr = name.split(".")
        for p in path:
            owner = getattr(owner, p)
        fn = getattr(owner, attr)

        def timed(*a, __fn=fn, __stage=stage, **k):
            t = time.perf_counter()
            try:
                return __fn(*a, **k)
            finally:
                totals[__stage] = totals.get(__stage, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)
    return totals


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries that over ``exec`` from
    the parent at ``fork``, so a child of a big parent would report the parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover (not Linux)


def child(args: argparse.Namespace) -> None:
    import torch

    from napari_cpgcn.batch import BatchOptions, run_predict_folder
    from napari_cpgcn.pipeline.predictor import load_predictor

    torch.set_num_threads(args.threads)
    totals = instrument() if args.stages else {}
    t = time.perf_counter()
    load_predictor(args.model)  # cached: the run below reuses it; timed apart (a one-off cost)
    load_s = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    s = run_predict_folder(args.child, args.model, args.out,
                           BatchOptions(batch_size=args.batch_size, workers=args.workers, overwrite=True))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(json.dumps({"n": s.n_done, "failed": s.n_failed, "wall": wall, "cpu": cpu, "load_s": load_s, "rss_mb": peak_rss_mb(),
                      "stages": s.seconds_by_stage, "inner": {k: v / max(s.n_done, 1) for k, v in totals.items()},
                      "cells": s.n_cells}))


def run_child(folder: Path, model: Path, out: Path, a: argparse.Namespace, stages: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--model", str(model), "--out", str(out),
           "--threads", str(a.threads), "--batch-size", str(a.batch_size), "--workers", str(a.workers)]
    if stages:
        cmd.append("--stages")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"child failed: {' '.join(cmd)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="*", default=[10, 100, 500],
                    help="folder sizes of the sweep (none: skip the sweep)")
    ap.add_argument("--size", type=int, default=512, help="image side for the count sweep")
    ap.add_argument("--big-size", type=int, default=2048, help="image side for the per-stage timing")
    ap.add_argument("--n-big", type=int, default=4, help="images for the per-stage timing")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--model", type=Path, default=None, help="a trained run (default: train a tiny one)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a)
        return

    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = a.model or build_run(a.work, a.backbone, a.threads)
    print(f"# cpu cores: {os.cpu_count()}, torch threads: {a.threads}, batch size {a.batch_size}, "
          f"reader threads {a.workers}", flush=True)

    # 1. per-stage time on large images
    big = make_folder(a.work, a.n_big, a.big_size)
    r = run_child(big, model, a.work / "out_big", a, stages=True)
    st = {**r["stages"], **r["inner"]}
    cols = ["read", "segment", "image_model", "cell_model", "write"]
    print(f"\n## seconds per {a.big_size}² image by stage ({r['n']} images, {r['cells'] / r['n']:.0f} cells/image)\n")
    print("| " + " | ".join(cols + ["predict (= segment + models + table)", "wall / image", "images/s",
                                   "peak RSS MB"]) + " |")
    print("|" + "---|" * (len(cols) + 4))
    vals = [f"{st[c]:.2f}" if c in st else "n/a" for c in cols]
    print("| " + " | ".join(vals + [f"{st.get('predict', float('nan')):.2f}", f"{r['wall'] / r['n']:.2f}",
                                   f"{r['n'] / r['wall']:.2f}", f"{r['rss_mb']:.0f}"]) + " |")
    print(f"\nCPU seconds per image (all threads): {r['cpu'] / r['n']:.2f}; 1-min load average at the end: "
          f"{os.getloadavg()[0]:.1f}")
    print(f"\n(model loading, once per run: {r['load_s']:.1f} s, not included; read and write overlap "
          "with the model stages in other threads, so wall / image < the sum of the stages)", flush=True)

    # 2. count sweep: throughput and peak RSS
    if not a.counts:
        return
    print(f"\n## predict over N {a.size}² images (fresh process each)\n")
    print("| images | wall s (without model loading) | images/s | CPU s / image | peak RSS MB | cells |")
    print("|---|---|---|---|---|---|")
    rows = []
    for n in a.counts:
        folder = make_folder(a.work, n, a.size)
        r = run_child(folder, model, a.work / f"out_{a.size}_{n}", a)
        rows.append(r)
        print(f"| {n} | {r['wall']:.1f} | {r['n'] / r['wall']:.2f} | {r['cpu'] / r['n']:.2f} | {r['rss_mb']:.0f} "
              f"| {r['cells']} |", flush=True)
    if len(rows) >= 2:
        ref = rows[-2] if len(rows) > 2 else rows[0]
        growth = (rows[-1]["rss_mb"] - ref["rss_mb"]) / ref["rss_mb"] * 100
        print(f"\npeak RSS change from {ref['n']} to {rows[-1]['n']} images: {growth:+.1f} % (target within ±10 %)")
    print(f"\n# total benchmark time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
