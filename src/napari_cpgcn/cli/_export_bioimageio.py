"""``napari-cpgcn export-bioimageio RUN --out MODEL.zip [--which image|cell]``: a bioimage.io model package.

The package (spec 0.5) runs in bioimageio.core, ilastik, deepImageJ and Fiji without
napari-cpgcn; by default it is tested with bioimageio.core right after writing (the same test
as ``bioimageio test MODEL.zip``). See :mod:`napari_cpgcn.export.bioimageio`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from napari_cpgcn.cli import EXIT_FAILURE, EXIT_OK, UsageError

log = logging.getLogger("napari_cpgcn.cli.export_bioimageio")


COMMAND = "export-bioimageio"
HELP = "write a bioimage.io model package (.zip) of a trained run's image or cell model"
DESCRIPTION = """\
Package a trained model for the bioimage.io ecosystem (bioimageio.core, ilastik, deepImageJ,
Fiji): TorchScript + PyTorch state-dict weights, input axes and the run's normalisation as
preprocessing, test tensors, a cover image, the 19 class names, licence BSD-3-Clause and the CP-
GCN citation. The package is then tested with bioimageio.core (as `bioimageio test` does). A
package can start a later training: `napari-cpgcn train ... --init-from MODEL.zip`.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="trained run folder (train or train-image) or a checkpoint in it")
    p.add_argument("--out", required=True, metavar="MODEL.zip", help="package to write")
    p.add_argument("--which", choices=["image", "cell"], default="image",
                   help="image: a field of view -> 19 probabilities + class maps (default); "
                        "cell: one cell crop -> 19 probabilities")
    p.add_argument("--no-cams", action="store_true", help="image model: leave out the class-map output")
    p.add_argument("--name", default=None, help="model name in the package (default: CP-GCN <which> model (<backbone>))")
    p.add_argument("--author", action="append", default=[], metavar="NAME",
                   help="who trained the model (repeatable; default: your login name)")
    p.add_argument("--no-test", action="store_true", help="skip the bioimageio.core test after writing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing MODEL.zip")


def run(args: argparse.Namespace) -> int:
    if not Path(args.run).exists():
        raise UsageError(f"RUN {args.run} does not exist; give a run folder made by `napari-cpgcn train`")
    try:
        from napari_cpgcn.export.bioimageio import export_bioimageio, test_package

        result = export_bioimageio(args.run, args.out, args.which, with_cams=not args.no_cams,
                                   name=args.name, authors=args.author, overwrite=args.overwrite)
    except ImportError as e:
        raise UsageError(str(e)) from e
    log.info("wrote %s (%s model from %s; weights %s; outputs %s)", result.path, result.which,
             result.checkpoint, ", ".join(result.weight_formats), ", ".join(result.outputs))
    if args.no_test:
        return EXIT_OK
    summary = test_package(result.path)
    if summary.status != "passed":
        log.error("the package does not pass bioimageio.core's test:\n%s", summary.format())
        return EXIT_FAILURE
    log.info("bioimageio.core test passed: both weight formats reproduce the test outputs")
    return EXIT_OK
