"""cells.h5ad assembly: write time and peak memory for a large folder run.

What is timed: :func:`napari_cpgcn.profiles.embeddings.assemble_h5ad`, the step at the end of
``predict --embeddings``, on a folder of **synthesised** per-image parts (``parts/{ID}.cells.csv``
with the real per-cell columns and random probabilities, ``embeddings/{ID}.npy`` with random
float32 features of the resnet18 cell model's size, 512), so no model is run: the numbers are
the assembly's alone. Each measurement runs in a fresh Python process; its peak RSS
(``ru_maxrss``) is printed next to that of a process that only imports the same modules.

Run::

    nice .venv/bin/python benchmarks/bench_h5ad.py --images 500 --cells 40 --dim 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import anndata, numpy, pandas  # noqa: F401  (counted in the baseline too)
from napari_cpgcn.profiles.embeddings import assemble_h5ad
out, n, umap, base = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
ids = [f"img{i:05d}" for i in range(n)]
t = time.perf_counter()
res = {} if base else assemble_h5ad(out, ids, umap=umap, seed=0)
sec = time.perf_counter() - t
print(json.dumps({"seconds": sec, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "n_obs": res.get("n_obs", 0)}))
"""


def make_parts(out: Path, n_images: int, n_cells: int, dim: int, seed: int = 0) -> int:
    import numpy as np
    import pandas as pd

    from napari_cpgcn.batch.outputs import CELL_COLUMNS, image_paths
    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.io.atomic import atomic_save_npy

    rng = np.random.default_rng(seed)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n_images):
        iid = f"img{i:05d}"
        n = int(rng.integers(max(1, n_cells // 2), n_cells * 3 // 2 + 1))
        df = pd.DataFrame({c: rng.random(n) for c in CELL_COLUMNS})
        df["image_id"] = iid
        df["cell_id"] = np.arange(1, n + 1)
        df["area"] = rng.integers(500, 5000, n)
        df["top_class"] = [SHORT_NAMES[k] for k in rng.integers(0, len(SHORT_NAMES), n)]
        df["top_classes"] = df["top_class"]
        p = image_paths(out, iid)
        df.to_csv(p["cells"], index=False, float_format="%.6g")
        atomic_save_npy(p["embeddings"], rng.normal(size=(n, dim)).astype(np.float32))
        total += n
    return total


def measure(out: Path, n: int, umap: bool, base: bool) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(n), "1" if umap else "0", "1" if base else "0"],
                       check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--cells", type=int, default=40, help="mean cells per image (uniform 0.5x-1.5x)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--umap", action="store_true", help="also time the assembly with --umap")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t = time.perf_counter()
        n_cells = make_parts(out, args.images, args.cells, args.dim)
        print(f"synthesised {args.images} images' parts ({n_cells} cells x {args.dim} float32) in "
              f"{time.perf_counter() - t:.1f} s")
        base = measure(out, args.images, False, True)
        rows = []
        for label, umap in [("assemble_h5ad", False)] + ([("assemble_h5ad --umap", True)] if args.umap else []):
            for _ in range(args.repeats):
                m = measure(out, args.images, umap, False)
                rows.append((label, m))
        size = (out / "cells.h5ad").stat().st_size / 2**20
        print()
        print(f"| step ({args.images} images, {n_cells} cells, dim {args.dim}) | seconds | peak RSS MB | "
              f"peak RSS of the imports alone MB | cells.h5ad MB |")
        print("|---|---|---|---|---|")
        for label, m in rows:
            assert m["n_obs"] == n_cells
            print(f"| {label} | {m['seconds']:.2f} | {m['peak_rss_mb']:.0f} | {base['peak_rss_mb']:.0f} | {size:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
