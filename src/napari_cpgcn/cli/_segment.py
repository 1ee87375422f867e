"""``napari-cpgcn segment INPUT_DIR --out OUT_DIR``: one cell mask per image."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("napari_cpgcn.cli.segment")

DESCRIPTION = """\
Segment every HPA image of INPUT_DIR into cells and write OUT_DIR/{ID}.tif: a cell instance
mask (uint16, or uint32 beyond 65535 cells; 0 = background) at the image's full size.

Methods: classical (default; nucleus-seeded, valley-following cell territories, needs no
weights) or cellpose (--model cyto3 | nuclei | cpsam | PATH; weights are looked up in
$CELLPOSE_LOCAL_MODELS_PATH or ~/.cellpose/models and, when missing, fetched there once by
cellpose's downloader; offline the run stops within seconds saying where to put the file;
NAPARI_CPGCN_CELLPOSE_DOWNLOAD=0 forbids downloads, NAPARI_CPGCN_CELLPOSE_URL sets a mirror).

OUT_DIR/qc.csv gets one row per image: cells, the share cut by the border, nuclei, and
check_masks=true where the nuclei and cell counts disagree; the summary lists those images.

Rerunning skips images that already have a mask (--overwrite redoes them). An image that
cannot be read or segmented is logged and skipped.

Exit codes: 0 all images done, 3 some images failed (the rest done), 1 failure (every image
failed, or the cellpose weights are missing), 2 bad usage, 130 interrupted.
"""


def _downscale(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--downscale must be >= 1 (1 = full resolution), got {text}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, got {text}")
    return value


COMMAND = "segment"
HELP = "segment a folder of HPA images into cell masks ({ID}.tif)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from napari_cpgcn.cli._folder import add_cluster_arguments, add_input_dir_argument
    add_input_dir_argument(p)
    p.add_argument("--out", "-o", required=True, metavar="OUT_DIR", help="output folder for the masks")
    p.add_argument("--method", choices=("classical", "cellpose"), default="classical",
                   help="segmentation method (default classical)")
    p.add_argument("--nucleus-diameter", type=_positive, default=None, metavar="PX",
                   help="nucleus diameter in pixels (default: measured on each image's blue channel)")
    p.add_argument("--downscale", type=_downscale, default="auto", metavar="F",
                   help="segment at 1/F resolution and upsample the labels; 'auto' (default) works "
                        "where a nucleus is ~32 px (cellpose: a cell ~60 px); 1 = full resolution")
    p.add_argument("--model", default="cyto3", metavar="NAME_OR_PATH",
                   help="cellpose model: cyto3 (default), nuclei, cpsam, or a model file")
    p.add_argument("--diameter", type=_positive, default=None, metavar="PX",
                   help="cellpose: expected cell diameter in pixels (default 2 x nucleus diameter)")
    p.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto",
                   help="cellpose: use the GPU (default: when available)")
    p.add_argument("--overwrite", action="store_true", help="redo images that already have a mask")
    add_cluster_arguments(p)


def run(args: argparse.Namespace) -> int:
    from napari_cpgcn.cli import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, UsageError
    from napari_cpgcn.cli._folder import checked_input_dir, folder_events
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.segmentation.folder import iter_segment_folder

    input_dir = checked_input_dir(args)
    params: dict = {"nucleus_diameter": args.nucleus_diameter, "downscale": args.downscale}
    if args.method == "cellpose":
        params.update(model=args.model, diameter=args.diameter,
                      gpu={"auto": None, "yes": True, "no": False}[args.gpu])
    elif args.diameter is not None or args.model != "cyto3" or args.gpu != "auto":
        raise UsageError("--model, --diameter and --gpu apply to --method cellpose only")

    # with --cluster one Dask task per image (napari_cpgcn.batch.dask)
    events = folder_events(args, iter_segment_folder, "segment_folder_distributed", input_dir, args.out, args.method,
                           overwrite=args.overwrite, **params)
    bar = None
    result: dict = {}
    try:
        for ev in events:
            if ev.kind == EventKind.STAGE_START:
                log.info("%s", ev.message)
                if not args.quiet:
                    from napari_cpgcn.cli import progress_bar

                    bar = progress_bar(total=ev.n_batches, desc="segment", unit="img")
            elif ev.kind == EventKind.ITEM:
                if bar is not None:
                    bar.update(1)
                    if "n_cells" in ev.metrics:
                        bar.set_postfix(cells=int(ev.metrics["n_cells"]))
            elif ev.kind in (EventKind.DONE, EventKind.STOPPED):
                result = ev.result or {}
    finally:
        if bar is not None:
            bar.close()
    done, failed = result.get("done", []), result.get("failed", {})
    skipped = result.get("skipped", [])
    log.info("%d images segmented, %d skipped (mask existed), %d failed; masks in %s",
             len(done), len(skipped), len(failed), args.out)
    _log_qc_summary(args.out)
    if failed:
        for image_id, err in failed.items():
            log.warning("failed: %s: %s", image_id, err)
        return EXIT_FAILURE if not done and not skipped else EXIT_PARTIAL
    return EXIT_OK


def _log_qc_summary(out_dir) -> None:
    """One QC line for the folder (from OUT_DIR/qc.csv), and the images to check."""
    from napari_cpgcn.segmentation.folder import qc_path
    from napari_cpgcn.segmentation.qc import qc_summary, read_qc_csv

    try:
        rows = read_qc_csv(qc_path(out_dir))
    except (OSError, ValueError) as e:
        log.warning("QC table unreadable: %s", e)
        return
    if not rows:
        return
    q = qc_summary(rows)
    log.info("QC (%s): %d images, %d cells (median %.0f per image), %.0f%% of cells cut by the border, "
             "%d images without cells, %d flagged", qc_path(out_dir), q["n_images"], q["n_cells"],
             q["median_cells"], 100 * q["border_fraction"], len(q["empty"]), len(q["flagged"]))
    for image_id in q["flagged"]:
        log.warning("check the mask of %s: %s", image_id, rows[image_id].get("qc_note") or "nuclei and cells disagree")
