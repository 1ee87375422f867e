"""Speed of the synthetic HPA generator: images per second (generation only, and written to disk).

Usage::

    python benchmarks/bench_synth.py [--sizes 256 512] [--n 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--n", type=int, default=20, help="images per measurement")
    ap.add_argument("--heterogeneity", type=float, default=0.5)
    args = ap.parse_args()

    from napari_cpgcn.synth import generate_dataset, generate_image

    generate_image(0, size=128)  # warm-up (label statistics, imports)
    print(f"CPU cores visible: {os.cpu_count()}, images per row: {args.n}")
    print("wall = elapsed time (shared machine: depends on load); cpu = process CPU time per image")
    print(f"{'size':>6} {'generate img/s':>15} {'wall ms/img':>12} {'cpu ms/img':>11} "
          f"{'+ write PNGs img/s':>19} {'cells/img':>10}")
    for size in args.sizes:
        t0, c0 = time.perf_counter(), time.process_time()
        cells = []
        for seed in range(args.n):
            cells.append(generate_image(seed, size=size, heterogeneity=args.heterogeneity).n_cells)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        with tempfile.TemporaryDirectory() as tmp:
            t1 = time.perf_counter()
            generate_dataset(tmp, args.n, size=size, seed=0, heterogeneity=args.heterogeneity)
            dw = time.perf_counter() - t1
        print(f"{size:>6} {args.n / dt:>15.1f} {1000 * dt / args.n:>12.0f} {1000 * dc / args.n:>11.0f} "
              f"{args.n / dw:>19.1f} "
              f"{np.mean(cells):>10.1f}")


if __name__ == "__main__":
    main()
