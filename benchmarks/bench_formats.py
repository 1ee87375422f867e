"""Write time of one prediction as OME-Zarr versus as TIFF (+ CSV), for a large HPA field of view.

What each method writes, for one synthetic SIZE² 4-channel uint8 image with its cell mask and a
per-cell table (the canonical columns: geometry, top class, 3 x 19 probabilities):

* ``tiff+csv (batch)``: what ``predict`` writes per image without --ome-zarr: the cell mask as
  a zlib TIFF and the per-cell CSV part (napari_cpgcn.batch's own writers);
* ``tiff+csv+image``: the same plus the 4-channel image as a zlib TIFF — the same content as the
  OME-Zarr, but flat (no pyramid);
* ``ome-zarr``: :func:`napari_cpgcn.io.omezarr.write_ome_zarr` — image pyramid, labels/cells
  pyramid, AnnData table, atomic (temporary folder + rename).

The methods run interleaved (rotating order) ``--repeats`` times; medians of wall and CPU time
(all threads of the process) are printed, with the size on disk. The machine is shared: CPU
time is the steadier figure.

Usage::

    python benchmarks/bench_formats.py --size 3072 --repeats 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _table(cells: np.ndarray, image_id: str, rng: np.random.Generator):
    from napari_cpgcn.batch import CELL_COLUMNS
    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.io.celltable import cell_geometry

    t = cell_geometry(cells, image_id)
    image_p = rng.random(len(SHORT_NAMES))
    cell_p = rng.random((len(t), len(SHORT_NAMES)))
    fused = image_p[None] * cell_p
    t["top_class"] = [SHORT_NAMES[k] for k in fused.argmax(1)]
    for prefix, arr in (("image", np.repeat(image_p[None], len(t), 0)), ("cell", cell_p), ("fused", fused)):
        for k, s in enumerate(SHORT_NAMES):
            t[f"{prefix}_{s}"] = arr[:, k]
    t["top_classes"] = t["top_class"]
    return t[list(CELL_COLUMNS)], image_p


def _size_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 1e6
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=3072, help="image side in pixels (default 3072)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--tmp", default=None, help="folder for the outputs (default: a temporary one)")
    args = ap.parse_args(argv)

    import tifffile

    from napari_cpgcn.batch.outputs import _write_csv
    from napari_cpgcn.io.masks import write_mask
    from napari_cpgcn.io.omezarr import pyramid_factors, read_ome_zarr, write_ome_zarr
    from napari_cpgcn.synth import generate_image

    t0 = time.perf_counter()
    img = generate_image(args.seed, size=args.size, image_id=f"bench_{args.size}")
    table, image_p = _table(img.cells, img.image_id, np.random.default_rng(args.seed))
    print(f"# synthetic {args.size}² image, {len(table)} cells (made in {time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench-formats-"))
    tmp.mkdir(parents=True, exist_ok=True)

    def tiff_csv(d: Path) -> Path:
        write_mask(d / "mask.tif", img.cells)
        _write_csv(d / "cells.csv", table)
        return d

    def tiff_csv_image(d: Path) -> Path:
        tiff_csv(d)
        tifffile.imwrite(d / "image.tif", img.data, compression="zlib", metadata={"axes": "CYX"})
        return d

    def ome_zarr(d: Path) -> Path:
        return write_ome_zarr(d / "img.ome.zarr", img, img.cells, table, image_probs=image_p, overwrite=True)

    methods = {"tiff+csv (batch)": tiff_csv, "tiff+csv+image": tiff_csv_image, "ome-zarr": ome_zarr}
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    size: dict[str, float] = {}
    ome_zarr(tmp / "warmup")  # imports (dask, zarr, anndata) are not part of a write
    tiff_csv_image(tmp / "warmup")
    names = list(methods)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            d = tmp / f"{name.split()[0]}-{r}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            c0, w0 = time.process_time(), time.perf_counter()
            out = methods[name](d)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
            size[name] = _size_mb(out)
            if r:  # keep the disk small
                shutil.rmtree(d, ignore_errors=True)

    z = read_ome_zarr(tmp / "ome-zarr-0" / "img.ome.zarr")
    levels = [f"{args.size // f}²" for f in (1, *pyramid_factors((args.size, args.size)))]
    print(f"\n{args.size}² x 4 channels uint8, {len(table)} cells, {args.repeats} interleaved rounds "
          f"(medians; min-max in brackets)\n")
    print("| output | wall s | CPU s | size MB |")
    print("|---|---|---|---|")
    for name in methods:
        w, c = wall[name], cpu[name]
        print(f"| {name} | {statistics.median(w):.2f} ({min(w):.2f}-{max(w):.2f}) | "
              f"{statistics.median(c):.2f} ({min(c):.2f}-{max(c):.2f}) | {size[name]:.1f} |")
    base = "tiff+csv+image"
    for b in ("tiff+csv (batch)", base):
        print(f"\nome-zarr / {b}: wall {statistics.median(wall['ome-zarr']) / statistics.median(wall[b]):.2f}x, "
              f"CPU {statistics.median(cpu['ome-zarr']) / statistics.median(cpu[b]):.2f}x", end="")
    print(f"\n\nOME-Zarr pyramid: {z.n_levels} levels ({', '.join(levels)}), labels/cells and the table "
          f"({len(z.table)} rows) read back")
    if not args.tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
