"""Benchmark of scale-out: Dask-distributed prediction and torchrun (DDP) training.

Prints two tables.

1. ``predict`` over N synthetic images (default 40 at 2048²): in-process (serial) vs
   ``--cluster local:1`` vs ``--cluster local:2`` -- wall time, images/s, speedup over serial,
   peak RSS per process (the serial process; each Dask worker), and whether ``cells.csv``,
   ``images.csv`` and every mask are byte-identical to the serial run's. Targets (issue 9):
   ``local:2`` >= 1.4x serial; Dask's overhead (``local:1`` vs serial) < 10 %.
2. ``train-image`` for a few epochs on small synthetic data: one process with batch B vs
   ``torchrun --nproc-per-node 2`` with batch B/2 per process (the same global batch) --
   seconds per epoch and the final validation mAP of both.

Every configuration runs in a fresh process (its peak RSS is its own). The prediction model is
a pipeline run with a resnet18 image model (``bench_batch.build_run``: the tiny preset at the
paper's 512² model input); image folders are a few distinct synthetic images hard-linked under
N ids (``bench_batch.make_folder``), so generating them does not dominate the benchmark.

Usage::

    nice .venv/bin/python benchmarks/bench_distributed.py                  # 40 x 2048², 3 epochs
    nice .venv/bin/python benchmarks/bench_distributed.py --n-images 12 --size 1024 --epochs 2
    nice .venv/bin/python benchmarks/bench_distributed.py --skip-train     # prediction only
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

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("BENCH_DISTRIBUTED_DIR", "/tmp/bench_distributed"))
PY = sys.executable


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------------ child processes

def child_predict(args: argparse.Namespace) -> None:
    """One prediction configuration; prints a JSON line."""
    from napari_cpgcn.batch import BatchOptions, predict_folder
    from napari_cpgcn.events import EventKind

    opts = BatchOptions(device="cpu")
    t = time.perf_counter()
    worker_rss: list[float] = []
    worker_cpu: list[float] = []
    item_times: list[float] = []
    if args.mode == "serial":
        import torch

        torch.set_num_threads(args.threads)
        events = predict_folder(args.images, args.model, args.out, opts)
    else:
        from napari_cpgcn.batch.dask import predict_folder_distributed

        events = predict_folder_distributed(args.images, args.model, args.out, opts, cluster=args.mode,
                                            torch_threads=args.threads)
    summary = None
    for ev in events:
        if ev.kind == EventKind.ITEM:
            item_times.append(time.perf_counter() - t)
        elif ev.kind == EventKind.LOG and any(k.startswith("peak_rss_mb:") for k in ev.metrics):
            worker_rss = [v for k, v in ev.metrics.items() if k.startswith("peak_rss_mb:")]
            worker_cpu = [v for k, v in ev.metrics.items() if k.startswith("cpu_s:")]
        elif ev.kind == EventKind.DONE:
            summary = ev.result
    wall = time.perf_counter() - t
    print(json.dumps({"mode": args.mode, "threads": args.threads, "wall": wall, "n_done": summary.n_done,
                      "n_failed": summary.n_failed, "rss": _peak_rss_mb(), "worker_rss": worker_rss,
                      "cpu": _cpu_s() + sum(worker_cpu), "load": os.getloadavg()[0],
                      "first_item": item_times[0] if item_times else wall,
                      "last_item": item_times[-1] if item_times else wall}), flush=True)


def _run_child(argv: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([PY, __file__, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare_outputs(a: Path, b: Path) -> str:
    """``"identical"`` (CSV bytes and masks), else how the runs differ."""
    import numpy as np
    import pandas as pd
    import tifffile

    ma, mb = sorted((a / "masks").glob("*.tif")), sorted((b / "masks").glob("*.tif"))
    if [p.name for p in ma] != [p.name for p in mb]:
        return "NO: other images"
    if not all((tifffile.imread(x) == tifffile.imread(y)).all() for x, y in zip(ma, mb, strict=True)):
        return "NO: masks differ"
    if all((a / n).read_bytes() == (b / n).read_bytes() for n in ("cells.csv", "images.csv", "failures.csv")):
        return "identical"
    x, y = pd.read_csv(a / "cells.csv"), pd.read_csv(b / "cells.csv")
    if x.shape != y.shape or list(x.columns) != list(y.columns):
        return "NO: other cells"
    num = x.select_dtypes("number").columns
    other = x.drop(columns=num).fillna("").equals(y.drop(columns=num).fillna(""))
    d = float(np.abs(x[num].to_numpy(float) - y[num].to_numpy(float)).max()) if len(x) else 0.0
    return f"masks, ids, geometry identical; probabilities within {d:.0e}" + ("" if other else "; NO: text differs")


# ------------------------------------------------------------------------------ part 1: predict

def bench_predict(args: argparse.Namespace) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from bench_batch import build_run, make_folder  # the batch benchmark's model and folders

    WORK.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else WORK / "run_resnet18"
    if not (model / "cell_model" / "best.pt").is_file():
        model = build_run(WORK, "resnet18", args.cores)
    images = make_folder(WORK, args.n_images, args.size)
    print(f"# {args.n_images} images of {args.size}² in {images}; model {model}; {args.cores} cores", flush=True)
    rows: list[dict] = []
    if args.runs:
        runs = [(r.split("/")[0], int(r.split("/")[1])) for r in args.runs.split(",")]
    else:
        runs = [("serial", args.cores), ("local:1", args.cores), ("local:2", args.cores // 2 or 1), ("serial", 1)]
    for mode, threads in runs:
        out = WORK / f"out_{mode.replace(':', '')}_{threads}_{args.size}_{args.n_images}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        r = _run_child(["--child-predict", "--mode", mode, "--model", str(model), "--images", str(images),
                        "--out", str(out), "--threads", str(threads)], env)
        r["out"] = out
        rows.append(r)
        print(f"#   {mode} ({threads} threads): {r['wall']:.1f} s", flush=True)
    serial = rows[0]
    print()
    print(f"## predict: {args.n_images} synthetic {args.size}² images, resnet18 pipeline, CPU ({args.cores} cores)")
    print()
    print("| run | torch threads / process | wall (s) | images/s | speedup vs serial | images/s after the 1st image "
          "| CPU s / image (all processes) | load avg at end | peak RSS per process (MB) "
          "| outputs vs serial (same threads per process) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        ips = r["n_done"] / r["wall"]
        steady = (r["n_done"] - 1) / max(1e-9, r["last_item"] - r["first_item"]) if r["n_done"] > 1 else ips
        rss = (f"{r['rss']:.0f} (one process)" if r["mode"] == "serial" else
               f"workers {', '.join(f'{v:.0f}' for v in r['worker_rss'])}; client {r['rss']:.0f}")
        per_worker = r["threads"]
        ref = next((q for q in rows if q["mode"] == "serial" and q["threads"] == per_worker), None)
        same = "-" if r["mode"] == "serial" else (_compare_outputs(ref["out"], r["out"]) if ref else "?")
        if r["mode"] == "serial" and r["threads"] != serial["threads"]:
            same = f"vs {serial['threads']}-thread serial: {_compare_outputs(serial['out'], r['out'])}"
        print(f"| {r['mode']} | {per_worker} | {r['wall']:.1f} | {ips:.3f} | {serial['wall'] / r['wall']:.2f}x "
              f"| {steady:.3f} | {r['cpu'] / max(1, r['n_done']):.2f} | {r['load']:.1f} | {rss} | {same} |")
    print()
    for r in rows[1:]:
        if r["mode"] == "local:1" and r["threads"] == serial["threads"]:
            print(f"Dask overhead (local:1 vs serial, {serial['threads']} torch threads): "
                  f"{(r['wall'] / serial['wall'] - 1) * 100:+.1f} % (target < 10 %)")
        if r["mode"] == "local:2":
            print(f"local:2 speedup over serial: {serial['wall'] / r['wall']:.2f}x (target >= 1.4x)")
    return rows


# ------------------------------------------------------------------------------ part 2: torchrun

def bench_train(args: argparse.Namespace) -> None:
    import pandas as pd

    from napari_cpgcn.synth import generate_dataset

    data = WORK / f"train_{args.train_images}_{args.train_size}"
    if not (data / "train.csv").is_file():
        generate_dataset(data, args.train_images, size=args.train_size, seed=21)
    exe = str(Path(PY).with_name("napari-cpgcn"))
    base = ["train-image", str(data), "--labels", str(data / "train.csv"), "--backbone", "resnet18",
            "--epochs", str(args.epochs), "--image-size", str(args.train_size), "--device", "cpu",
            "--imagenet-weights", "none", "--no-resume", "-q"]
    results = {}
    for nproc in (1, 2):
        run = WORK / f"ddp_run_{nproc}"
        per_proc = args.global_batch // nproc
        threads = max(1, args.cores // nproc)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = ([exe] if nproc == 1 else
               [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "--no-python", exe])
        t = time.perf_counter()
        proc = subprocess.run([*cmd, *base, "--out", str(run), "--batch-size", str(per_proc)], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"training with {nproc} process(es) failed:\n{proc.stderr[-4000:]}")
        h = pd.read_csv(run / "history.csv")
        results[nproc] = (h, wall, per_proc, threads)
    print()
    print(f"## train-image: {args.train_images} synthetic {args.train_size}² images, resnet18 at {args.train_size}², "
          f"{args.epochs} epochs, global batch {args.global_batch}, CPU ({args.cores} cores)")
    print()
    print("| run | batch per process | torch threads per process | s / epoch (mean) | s / epoch (after the 1st) "
          "| wall (s) | final val mAP | final train loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for nproc, (h, wall, per_proc, threads) in results.items():
        name = "1 process" if nproc == 1 else f"torchrun --nproc-per-node {nproc}"
        later = h.seconds.iloc[1:].mean() if len(h) > 1 else h.seconds.mean()
        print(f"| {name} | {per_proc} | {threads} | {h.seconds.mean():.1f} | {later:.1f} | {wall:.0f} | "
              f"{h.val_mAP.iloc[-1]:.4f} | {h.train_loss.iloc[-1]:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=40)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--model", default=None, help="a trained run folder (default: train one with bench_batch)")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-images", type=int, default=40)
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--runs", default=None, metavar="MODE/THREADS,...",
                   help="prediction runs, the first is the reference, e.g. serial/1,local:1/1 "
                        "(default: serial/C,local:1/C,local:2/C//2,serial/1 for C cores)")
    p.add_argument("--skip-predict", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    # child mode (internal)
    p.add_argument("--child-predict", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_predict:
        child_predict(args)
        return
    print(f"# bench_distributed: {time.strftime('%Y-%m-%d %H:%M:%S')}, python {sys.version.split()[0]}, "
          f"{args.cores} cores (shared machine: other jobs may run)", flush=True)
    if not args.skip_predict:
        bench_predict(args)
    if not args.skip_train:
        bench_train(args)


if __name__ == "__main__":
    main()
