"""I/O costs: reading one image out of a large folder, and how often training decodes each image.

1. ``read_image(folder, image_id)`` in folders of 10 / 2,000 / 20,000 images (four channel PNGs
   each, hard links to one small image so the folder is cheap to build): median seconds per
   call over randomly chosen ids, after a warm-up call. A reader that lists the folder per call
   grows with the folder; the index (listed once, cached while the folder is unchanged) does not.
2. Full-resolution decodes per image in each stage of a tiny training run (synthetic data): every
   call of the channel-file decoder is counted, attributed to the stage running at that time.

Run it against any source tree (to compare with an older commit, check that commit out
elsewhere and pass its ``src`` folder)::

    python benchmarks/bench_io.py                      # this checkout
    python benchmarks/bench_io.py --src /tmp/old/src   # another checkout's sources

It prints two tables (markdown).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build_folder(root: Path, n: int, template: dict[str, Path]) -> Path:
    folder = root / f"n{n}"
    folder.mkdir()
    for i in range(n):
        for color, src in template.items():
            os.link(src, folder / f"img{i:06d}_{color}.png")
    return folder


def time_reads(folder: Path, n: int, calls: int, seed: int = 0) -> float:
    from napari_cpgcn.io.hpa import read_image

    rng = random.Random(seed)
    read_image(folder, image_id="img000000")  # warm-up (lists the folder once when it caches)
    times = []
    for _ in range(calls):
        iid = f"img{rng.randrange(n):06d}"
        t0 = time.perf_counter()
        read_image(folder, image_id=iid)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_counts(root: Path, n_images: int) -> dict[str, float]:
    """Full-resolution channel-file decodes per image per training stage (tiny pipeline)."""
    import torch

    import napari_cpgcn.io.hpa as hpa
    from napari_cpgcn.pipeline import PipelineConfig, train_pipeline

    try:
        from napari_cpgcn.events import EventKind
    except ImportError:  # sources from before the re-layout
        from napari_cpgcn.training.events import EventKind
    from napari_cpgcn.synth import generate_dataset

    torch.set_num_threads(1)
    data = generate_dataset(root / "synth", n_images, size=96, seed=1)
    counts: dict[str, int] = {}
    stage = {"now": "start"}
    real = hpa._read_plane

    def counting(path, color):
        counts[stage["now"]] = counts.get(stage["now"], 0) + 1
        return real(path, color)

    hpa._read_plane = counting
    try:
        cfg = PipelineConfig.tiny(image_size=64, epochs=1, device="cpu")
        for ev in train_pipeline(data / "images", data / "train.csv", root / "run", cfg):
            if ev.kind == EventKind.STAGE_START:
                stage["now"] = ev.stage
    finally:
        hpa._read_plane = real
    # four channel files make one image decode
    return {k: v / 4 / n_images for k, v in counts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=None, help="the napari_cpgcn sources to measure (default: this checkout)")
    ap.add_argument("--sizes", default="10,2000,20000", help="folder sizes in images")
    ap.add_argument("--calls", type=int, default=200, help="timed read_image calls per folder")
    ap.add_argument("--decode-images", type=int, default=8, help="images of the decode-count run (0: skip)")
    args = ap.parse_args(argv)
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    import numpy as np
    from PIL import Image

    import napari_cpgcn

    print(f"napari_cpgcn from {Path(napari_cpgcn.__file__).parent}")
    with tempfile.TemporaryDirectory(prefix="bench-io-") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        template = {}
        for color in ("red", "green", "blue", "yellow"):
            template[color] = root / f"template_{color}.png"
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(template[color])
        sizes = [int(s) for s in args.sizes.split(",")]
        rows = []
        for n in sizes:
            folder = build_folder(root, n, template)
            rows.append((n, time_reads(folder, n, args.calls)))
        base = rows[0][1]
        print("\n| images in the folder | read_image per call (ms, median) | vs the smallest folder |")
        print("|---:|---:|---:|")
        for n, t in rows:
            print(f"| {n:,} | {1000 * t:.2f} | {t / base:.2f}x |")
        if args.decode_images:
            counts = decode_counts(root, args.decode_images)
            print(f"\n| stage | full-resolution decodes per image ({args.decode_images} images, tiny run) |")
            print("|---|---:|")
            for k, v in counts.items():
                print(f"| {k} | {v:.2f} |")
            print(f"| **total** | **{sum(counts.values()):.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
