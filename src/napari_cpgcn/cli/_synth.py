"""``napari-cpgcn synth OUT``: write a synthetic HPA-like data set with per-cell truth."""

from __future__ import annotations

import argparse
import logging

from napari_cpgcn.cli import EXIT_OK, EXIT_PARTIAL, UsageError

log = logging.getLogger("napari_cpgcn.cli.synth")


COMMAND = "synth"
HELP = "write a synthetic HPA-like data set (Kaggle layout + per-cell truth)"
DESCRIPTION = """\
Write OUT/images/{ID}_{red,green,blue,yellow}.png, OUT/train.csv (image labels),
OUT/truth/{ID}_cells.png (uint16 cell masks), OUT/truth/cells.csv (per-cell labels) and
OUT/synth.json. The same seed gives identical files.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="output folder (created if missing)")
    p.add_argument("--n-images", "-n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--heterogeneity", type=float, default=0.5,
                   help="0: every cell expresses the image's classes; 1: as few as one cell (default 0.5)")
    p.add_argument("--cell-scale", type=float, default=None,
                   help="cell size factor in pixels per 512-px unit (default: size/512, the real "
                        "cell size relative to a Kaggle field)")


def run(args: argparse.Namespace) -> int:
    if args.n_images < 1:
        raise UsageError(f"--n-images must be >= 1, got {args.n_images}")
    if args.size < 32:
        raise UsageError(f"--size must be >= 32 pixels, got {args.size}")
    if not 0 <= args.heterogeneity <= 1:
        raise UsageError(f"--heterogeneity must be in [0, 1], got {args.heterogeneity}")
    if args.cell_scale is not None and args.cell_scale <= 0:
        raise UsageError(f"--cell-scale must be > 0, got {args.cell_scale}")

    from napari_cpgcn.synth import generate_dataset

    bar = None
    if not args.quiet:
        from napari_cpgcn.cli import progress_bar

        bar = progress_bar(total=args.n_images, desc="synth", unit="img")
    try:
        out = generate_dataset(args.out, args.n_images, size=args.size, seed=args.seed,
                               heterogeneity=args.heterogeneity, progress=bar,
                               cell_scale=args.cell_scale)
    finally:
        if bar is not None:
            bar.close()
    log.info("wrote %d images to %s", args.n_images, out)
    return EXIT_OK if out.is_dir() else EXIT_PARTIAL
