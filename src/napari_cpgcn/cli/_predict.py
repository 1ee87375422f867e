"""``napari-cpgcn predict``: per-cell predictions for a folder of HPA images (resumable)."""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

log = logging.getLogger("napari_cpgcn.cli.predict")

DESCRIPTION = """\
Predict per-cell protein localisations for every image of INPUT_DIR with a trained run.

Writes to OUT_DIR: masks/{ID}.tif (cell masks), cells.csv (one row per cell: image id, cell
id, centroid, area, bbox, image/cell/fused probability per class, top classes), images.csv
(one row per image), failures.csv, run.json, predict.log, and optionally cams/{ID}.tif
(--save-cams), submission.csv (--submission, Kaggle 2021 format) and zarr/{ID}.ome.zarr
(--ome-zarr: OME-Zarr with the image pyramid, labels/cells and the per-cell table, for
napari-ome-zarr, Fiji/MoBIE, QuPath and spatialdata), variation.csv (single-cell variation
per image and predicted class), and with --embeddings embeddings/{ID}.npy plus cells.h5ad
(AnnData: obs = per-cell table, obsm["X_cpgcn"] = cell-model features, obsm["X_umap"] with
--umap) for scanpy.

Rerunning into the same OUT_DIR skips finished images; every file is written atomically, so
an interrupted run leaves no truncated file. An unreadable image is listed in failures.csv and
the run goes on.

Exit codes: 0 all images done, 3 some images failed (the rest done), 1 failure (every image
failed, or the model cannot be loaded), 2 bad usage, 130 interrupted (rerun to resume).
"""


COMMAND = "predict"
HELP = "predict per-cell localisations for a folder (resumable, streaming)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from napari_cpgcn.cli._folder import add_cluster_arguments, add_input_dir_argument
    add_input_dir_argument(p)
    p.add_argument("--model", "-m", required=True, metavar="RUN_OR_CKPT",
                   help="trained run folder (from `napari-cpgcn train` or `demo`) or a checkpoint inside one")
    p.add_argument("--out", "-o", required=True, metavar="OUT_DIR", help="output folder (rerun to resume)")
    p.add_argument("--segmentation", default=None, metavar="METHOD", choices=("classical", "cellpose"),
                   help="cell segmentation: classical (no weights) or cellpose; default: the method "
                        "the run was trained with")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--batch-size", type=int, default=4,
                   help="images in flight per stage (read-ahead is twice this); memory grows with it (default 4)")
    p.add_argument("--workers", type=int, default=2, help="image reader threads (default 2)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: torch's choice; 1 is often faster on a busy shared CPU)")
    p.add_argument("--save-cams", action="store_true", help="also write cams/{ID}.tif: (19, Y, X) uint8 CAMs")
    p.add_argument("--submission", action="store_true", help="also write submission.csv (Kaggle 2021 format)")
    p.add_argument("--ome-zarr", action="store_true",
                   help="also write zarr/{ID}.ome.zarr (NGFF 0.4: image pyramid, labels/cells, per-cell "
                        "AnnData table); needs `pip install napari-cpgcn[ome-zarr]`")
    p.add_argument("--embeddings", action="store_true",
                   help="also write the cell model's per-cell features: embeddings/{ID}.npy and cells.h5ad "
                        "(AnnData, needs anndata)")
    p.add_argument("--umap", action="store_true",
                   help="with --embeddings: add a 2-D UMAP (obsm['X_umap']) to cells.h5ad (needs umap-learn)")
    p.add_argument("--umap-seed", type=int, default=0, help="seed of the UMAP (default 0; same seed, same layout)")
    p.add_argument("--overwrite", action="store_true", help="redo every image instead of resuming")
    add_cluster_arguments(p)


def run(args: argparse.Namespace) -> int:
    from napari_cpgcn.cli import UsageError, setup_logging
    from napari_cpgcn.cli._folder import checked_input_dir

    input_dir = checked_input_dir(args)
    if not Path(args.model).exists():
        raise UsageError(f"--model {args.model} does not exist; give a trained run folder "
                         "(`napari-cpgcn train` or `napari-cpgcn demo` writes one)")
    if args.batch_size < 1 or args.workers < 1 or args.threads < 0:
        raise UsageError("--batch-size and --workers must be at least 1, --threads at least 0")
    if args.ome_zarr:  # missing extras: say so once, not once per image
        try:
            from napari_cpgcn.io.omezarr import require_ome_zarr

            require_ome_zarr()
        except ImportError as e:
            raise UsageError(str(e)) from None
    if args.umap and not args.embeddings:
        raise UsageError("--umap needs --embeddings (the UMAP is made of the embeddings)")
    if args.embeddings:  # missing extras: say so before the first image
        try:
            import anndata  # noqa: F401
        except ImportError as e:
            raise UsageError(f"--embeddings needs anndata ({e}); install it with `pip install anndata`") from None
    if args.umap:
        try:
            from napari_cpgcn.profiles.embeddings import require_umap

            require_umap()
        except ImportError as e:
            raise UsageError(str(e)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    from napari_cpgcn.io.atomic import check_writable

    check_writable(out)
    setup_logging(args, logfile=str(out / "predict.log"))
    try:
        return _run(args, input_dir, out)
    finally:
        close_log_file(out / "predict.log")


@contextlib.contextmanager
def progress_logging():
    """Route console log lines through ``tqdm.write`` so they do not break progress bars.

    tqdm's ``logging_redirect_tqdm`` swaps the console handler for one without its level
    (so debug lines meant for the log file would reach the console); the level is put back.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger = logging.getLogger("napari_cpgcn")
    before = list(logger.handlers)
    console = [h.level for h in before if not isinstance(h, logging.FileHandler)]
    with logging_redirect_tqdm(loggers=[logger]):
        for h in logger.handlers:
            if h not in before and console:
                h.setLevel(console[0])
        yield


def close_log_file(path: Path) -> None:
    """Detach and close the file handler :func:`setup_logging` opened on ``path``."""
    root = logging.getLogger("napari_cpgcn")
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == Path(path).resolve():
            root.removeHandler(h)
            h.close()


def _run(args: argparse.Namespace, input_dir: Path, out: Path) -> int:
    from napari_cpgcn.batch import BatchConfigError, BatchOptions, predict_folder
    from napari_cpgcn.cli import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, UsageError
    from napari_cpgcn.cli._folder import folder_events
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.pipeline.predictor import resolve_model_path

    try:
        model = resolve_model_path(args.model)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    options = BatchOptions(
        segmentation=args.segmentation, device=args.device, batch_size=args.batch_size,
        workers=args.workers, save_cams=args.save_cams, submission=args.submission,
        ome_zarr=args.ome_zarr, overwrite=args.overwrite, torch_threads=args.threads,
        embeddings=args.embeddings, umap=args.umap, umap_seed=args.umap_seed,
    )
    log.info("predict %s with %s -> %s", input_dir, model, out)
    summary = None
    bar = None
    from napari_cpgcn.cli import progress_bar

    events = folder_events(args, predict_folder, "predict_folder_distributed", input_dir, model, out, options)
    with progress_logging():
        try:
            for ev in events:
                if ev.kind == EventKind.STAGE_START:
                    log.info("%s", ev.message)
                    bar = progress_bar(total=ev.n_batches, initial=ev.batch, unit="img", desc="predict",
                               disable=args.quiet, dynamic_ncols=True)
                elif ev.kind == EventKind.ITEM and bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{int(ev.metrics.get('n_cells', 0))} cells", refresh=False)
                elif ev.kind == EventKind.STAGE_END:
                    log.info("%s", ev.message)
                elif ev.kind in (EventKind.DONE, EventKind.STOPPED):
                    summary = ev.result
        except BatchConfigError as e:  # OUT_DIR made with other settings: the user picks what to do
            raise UsageError(str(e)) from None
        finally:
            if bar is not None:
                bar.close()
    assert summary is not None
    for f in summary.failures:
        log.warning("failed: %s (%s): %s", f.image_id, f.stage, f.error)
    rate = f", {summary.images_per_second:.2f} images/s" if summary.n_done else ""
    log.info("done: %d predicted, %d already done, %d failed, %d cells%s; outputs in %s",
             summary.n_done, summary.n_skipped, summary.n_failed, summary.n_cells, rate, out)
    if summary.n_failed:
        if summary.n_failed >= summary.n_images:
            log.error("every image failed; see %s", out / "failures.csv")
            return EXIT_FAILURE
        log.warning("%d of %d images failed; they are listed in %s (rerun to retry them)",
                    summary.n_failed, summary.n_images, out / "failures.csv")
        return EXIT_PARTIAL
    return EXIT_OK
