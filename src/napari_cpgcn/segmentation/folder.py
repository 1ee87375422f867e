"""Segment every image of a folder into ``OUT/{ID}.tif`` masks, as a generator of progress events.

The CLI (``napari-cpgcn segment``) drains it into a progress bar; the pipeline reuses it for
``RUN/segmentation/``. Masks are written atomically (temporary file + rename), so an
interrupted run leaves no half-written mask and a rerun skips the finished ones.

Beside the masks, ``OUT/qc.csv`` holds one row of quality-control numbers per image
(:func:`napari_cpgcn.segmentation.qc.mask_qc`: cells, share cut by the border, nuclei vs
cells and a ``check_masks`` flag). It is rewritten (atomically) after every image, keeps the
rows of images a rerun skips, and gets a mask-only row (no nucleus counts) for a skipped
image it has no row for.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_cpgcn.training.events import Event, EventKind, ShouldStop

__all__ = ["mask_path", "qc_path", "write_mask", "read_mask", "iter_segment_folder", "QC_CSV"]

#: File name of the per-image quality-control table in a mask folder.
QC_CSV = "qc.csv"

log = logging.getLogger(__name__)


def mask_path(out_dir: str | Path, image_id: str) -> Path:
    """Where the mask of ``image_id`` goes: ``OUT/{ID}.tif``."""
    return Path(out_dir) / f"{image_id}.tif"


def qc_path(out_dir: str | Path) -> Path:
    """Where the quality-control table of a mask folder goes: ``OUT/qc.csv``."""
    return Path(out_dir) / QC_CSV


def write_mask(path: str | Path, labels: np.ndarray) -> Path:
    """Write a label image as a zlib-compressed TIFF (uint16 when the ids fit, else uint32), atomically."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    dtype = np.uint16 if labels.size == 0 or int(labels.max()) <= np.iinfo(np.uint16).max else np.uint32
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tif.tmp", dir=path.parent)
    os.close(fd)
    try:
        tifffile.imwrite(tmp, labels.astype(dtype, copy=False), compression="zlib")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a mask is an ordinary output file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask written by :func:`write_mask` as uint32."""
    import tifffile

    return np.asarray(tifffile.imread(path)).astype(np.uint32, copy=False)


def iter_segment_folder(
    input_dir: str | Path,
    out_dir: str | Path,
    method: str = "classical",
    *,
    overwrite: bool = False,
    image_ids: list[str] | None = None,
    should_stop: ShouldStop | None = None,
    **params: Any,
) -> Iterator[Event]:
    """Segment the images of ``input_dir`` one by one, yielding an event per image.

    Parameters
    ----------
    input_dir
        Folder of HPA images (or a data set root with ``images/``).
    out_dir
        Output folder for ``{ID}.tif`` masks (created).
    method, **params
        As for :func:`napari_cpgcn.segmentation.segment_cells` (checked before the first image).
    overwrite
        Redo images whose mask exists (default: skip them, so reruns resume).
    image_ids
        Only these ids (default: every complete image in the folder).
    should_stop
        Checked between images; when it returns True a ``STOPPED`` event ends the run.

    Yields
    ------
    Event
        ``STAGE_START`` (message: how many to do), one ``ITEM`` per image (``path`` = the mask,
        ``metrics`` = ``{"n_cells", "seconds", "n_nuclei", "border_fraction", "check_masks"}``
        (the flag as 0/1), or ``message`` starting with ``"failed"`` and
        ``metrics["failed"] = 1``), then ``DONE`` with ``result`` = ``{"done": [...],
        "skipped": [...], "failed": {id: error}, "qc": path of qc.csv, "flagged": [ids]}``.
    """
    import time

    from napari_cpgcn.io.hpa import list_image_ids, read_image, resolve_images_dir
    from napari_cpgcn.segmentation import make_params, segment_cells_with_qc
    from napari_cpgcn.segmentation.qc import mask_qc, read_qc_csv, write_qc_csv

    p = make_params(method, **params)  # bad parameters fail before any work
    if method == "cellpose":  # a missing weight file would fail every image: fetch it (or say so) once, now
        from napari_cpgcn.segmentation import resolve_cellpose_weights

        resolve_cellpose_weights(p.model, p.models_dir, download=p.download, url_base=p.url_base)
    folder = resolve_images_dir(input_dir)
    ids = list(image_ids) if image_ids is not None else list_image_ids(folder)
    if not ids:
        raise FileNotFoundError(
            f"{input_dir} holds no HPA images: expected files named ID_red.png, ID_green.png, "
            "ID_blue.png, ID_yellow.png (or .jpg/.tif), or multi-channel TIFFs"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped = [i for i in ids if not overwrite and mask_path(out, i).exists()]
    todo = [i for i in ids if i not in set(skipped)]
    if skipped:
        log.info("%d of %d images already have a mask in %s; skipping them (overwrite to redo)",
                 len(skipped), len(ids), out)
    try:
        qc_rows = read_qc_csv(qc_path(out))
    except (OSError, ValueError) as e:  # a damaged table is rebuilt, never fatal
        log.warning("%s unreadable (%s): rebuilding it", qc_path(out), e)
        qc_rows = {}
    for image_id in skipped:
        if image_id not in qc_rows:
            try:
                qc_rows[image_id] = dict(mask_qc(read_mask(mask_path(out, image_id))), method="existing mask")
            except (OSError, ValueError) as e:
                log.warning("no QC row for the existing mask of %s: %s", image_id, e)
    if skipped:
        write_qc_csv(qc_path(out), qc_rows)
    yield Event(EventKind.STAGE_START, stage="segment", n_batches=len(todo),
                message=f"segmenting {len(todo)} images with {method}")
    done: list[str] = []
    failed: dict[str, str] = {}
    for k, image_id in enumerate(todo, 1):
        if should_stop is not None and should_stop():
            yield Event(EventKind.STOPPED, stage="segment", batch=k - 1, n_batches=len(todo),
                        message=f"stopped after {k - 1} images",
                        result={"done": done, "skipped": skipped, "failed": failed, "qc": str(qc_path(out)),
                                "flagged": sorted(i for i, r in qc_rows.items() if r.get("check_masks"))})
            return
        t0 = time.perf_counter()
        try:
            image = read_image(folder, image_id=image_id)
            res = segment_cells_with_qc(image, method=method, **params)
            labels = res.cells
            path = write_mask(mask_path(out, image_id), labels)
        except (OSError, ValueError, RuntimeError, MemoryError) as e:
            # One bad image must not stop a batch: log it, go on, report at the end.
            failed[image_id] = f"{type(e).__name__}: {e}"
            log.error("image %s failed: %s", image_id, failed[image_id])
            yield Event(EventKind.ITEM, stage="segment", batch=k, n_batches=len(todo),
                        message=f"failed {image_id}: {e}", metrics={"failed": 1.0})
            continue
        dt = time.perf_counter() - t0
        done.append(image_id)
        qc = res.qc
        qc_rows[image_id] = qc
        write_qc_csv(qc_path(out), qc_rows)
        n = int(qc["n_cells"])
        if qc["check_masks"]:
            log.warning("%s: check the mask — %s", image_id, qc["qc_note"])
        log.debug("%s: %d cells in %.2f s -> %s", image_id, n, dt, path)
        yield Event(EventKind.ITEM, stage="segment", batch=k, n_batches=len(todo), path=str(path),
                    message=f"{image_id}: {n} cells" + (f" (check: {qc['qc_note']})" if qc["check_masks"] else ""),
                    metrics={"n_cells": float(n), "seconds": dt, "n_nuclei": float(qc["n_nuclei"] or 0),
                             "border_fraction": float(qc["border_fraction"]),
                             "check_masks": float(bool(qc["check_masks"]))})
    flagged = sorted(i for i, r in qc_rows.items() if r.get("check_masks"))
    yield Event(EventKind.DONE, stage="segment", message=f"{len(done)} segmented, {len(skipped)} skipped, {len(failed)} failed",
                result={"done": done, "skipped": skipped, "failed": failed, "qc": str(qc_path(out)),
                        "flagged": flagged})
