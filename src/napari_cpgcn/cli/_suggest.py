"""``napari-cpgcn suggest PRED_DIR --n N --strategy uncertainty|random|diverse --out FILE.csv``."""

from __future__ import annotations

import argparse
import logging

from napari_cpgcn.cli import EXIT_OK

log = logging.getLogger("napari_cpgcn.cli.suggest")


COMMAND = "suggest"
HELP = "list the cells most worth checking in a prediction folder"
DESCRIPTION = """\
Write image_id,cell_id,reason for the N cells of a `napari-cpgcn predict` folder most worth a
biologist's look (cells already in its corrections.csv are left out).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from napari_cpgcn.review.suggest import STRATEGIES

    p.add_argument("pred_dir", metavar="PRED_DIR", help="output folder of `napari-cpgcn predict`")
    p.add_argument("--n", type=int, default=50, help="number of cells (default 50)")
    p.add_argument("--strategy", choices=STRATEGIES, default="uncertainty",
                   help="uncertainty (default): most uncertain first; random: a seeded sample; "
                        "diverse: uncertain and unlike each other")
    p.add_argument("--seed", type=int, default=0, help="seed of --strategy random")
    p.add_argument("--include-corrected", action="store_true", help="also list cells already corrected")
    p.add_argument("--out", metavar="FILE.csv", default=None, help="default: PRED_DIR/suggestions.csv")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from napari_cpgcn.cli import UsageError
    from napari_cpgcn.review.suggest import suggest, write_suggestions

    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    df = suggest(args.pred_dir, args.n, args.strategy, seed=args.seed, skip_corrected=not args.include_corrected)
    out = Path(args.out) if args.out else Path(args.pred_dir) / "suggestions.csv"
    write_suggestions(out, df)
    log.info("%d cells (%s) written to %s", len(df), args.strategy, out)
    return EXIT_OK
