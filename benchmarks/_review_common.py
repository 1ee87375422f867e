"""Shared set-up of bench_uncertainty.py and bench_review.py: one synthetic data set split into
train / pool / test images, and one tiny trained run on the train split (reused when present)."""

from __future__ import annotations

import time
from pathlib import Path


def add_arguments(ap) -> None:
    ap.add_argument("--out", default="/tmp/bench_review")
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-pool", type=int, default=12)
    ap.add_argument("--n-test", type=int, default=12)
    ap.add_argument("--size", type=int, default=256, help="synthetic image side")
    ap.add_argument("--cell-scale", type=float, default=0.6)
    ap.add_argument("--heterogeneity", type=float, default=0.7)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-seed", type=int, default=0)


def prepare(args):
    """``(data_dir, train_ids, pool_ids, test_ids, run_dir, truth)``; trains the run when absent."""
    import torch

    from napari_cpgcn.evaluation.cell import CellTruth
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.io.tables import read_labels_csv, write_labels_csv
    from napari_cpgcn.pipeline import PipelineConfig, train_pipeline
    from napari_cpgcn.synth import generate_dataset

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    n = args.n_train + args.n_pool + args.n_test
    if not (data / "train.csv").is_file():
        generate_dataset(data, n, size=args.size, seed=args.data_seed, heterogeneity=args.heterogeneity,
                         cell_scale=args.cell_scale)
    table = read_labels_csv(data / "train.csv")
    ids = list(table.ids)
    train_ids = ids[:args.n_train]
    pool_ids = ids[args.n_train:args.n_train + args.n_pool]
    test_ids = ids[args.n_train + args.n_pool:n]
    write_labels_csv(out / "train.csv", table.subset(train_ids))
    run = out / "run"
    if not (run / "cell_model").is_dir():
        t = time.perf_counter()
        cfg = PipelineConfig.tiny(image_size=args.image_size, epochs=args.epochs, device="cpu")
        cfg.cell = cfg.cell.replace(crop_size=48, batch_size=32)
        last = None
        for ev in train_pipeline(data / "images", out / "train.csv", run, cfg):
            last = ev
        assert last is not None and last.kind == EventKind.DONE, last
        print(f"trained {run} in {time.perf_counter() - t:.0f} s", flush=True)
    return data, train_ids, pool_ids, test_ids, run, CellTruth.load(data)
