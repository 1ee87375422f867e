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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from napari_cpgcn.events import Event, EventKind, ShouldStop
from napari_cpgcn.io.atomic import check_writable
from napari_cpgcn.io.masks import read_mask, write_mask

__all__ = ["mask_path", "qc_path", "iter_segment_folder", "segment_image", "SegmentRun", "refuse_input_as_output",
           "QC_CSV"]

#: File name of the per-image quality-control table in a mask folder.
QC_CSV = "qc.csv"

log = logging.getLogger(__name__)


def mask_path(out_dir: str | Path, image_id: str) -> Path:
    """Where the mask of ``image_id`` goes: ``OUT/{ID}.tif``."""
    return Path(out_dir) / f"{image_id}.tif"


def qc_path(out_dir: str | Path) -> Path:
    """Where the quality-control table of a mask folder goes: ``OUT/qc.csv``."""
    return Path(out_dir) / QC_CSV


def refuse_input_as_output(images_dir: str | Path, out_dir: str | Path) -> None:
    """Masks never go into the images folder (``{ID}.tif`` beside the channel files would be
    taken for images by other tools).

    Raises
    ------
    ValueError
        When ``out_dir`` is the images folder, naming a folder to use instead.
    """
    images_dir, out = Path(images_dir).resolve(), Path(out_dir).resolve()
    if out == images_dir:
        raise ValueError(f"the output folder {out_dir} is the images folder: the masks would sit among the "
                         f"images. Give another --out, e.g. {images_dir.parent / (images_dir.name + '_masks')}")


def segment_image(folder: str | Path, image_id: str, out_dir: str | Path, method: str,
                  params: dict[str, Any]) -> dict[str, Any]:
    """Read, segment and write one image (``OUT/{ID}.tif``, atomic): the unit of work of a folder
    run, in this process or as a Dask task.

    Returns ``{"image_id", "path", "seconds", "qc"}``, or ``{"image_id", "error"}`` for an image
    that cannot be read or segmented (never raised: one bad image does not stop a folder).
    """
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.segmentation import segment_cells_with_qc

    t0 = time.perf_counter()
    try:
        image = read_image(folder, image_id=image_id)
        res = segment_cells_with_qc(image, method=method, **params)
        path = write_mask(mask_path(out_dir, image_id), res.cells)
    except (OSError, ValueError, RuntimeError, MemoryError) as e:
        return {"image_id": image_id, "error": f"{type(e).__name__}: {e}"}
    return {"image_id": image_id, "path": str(path), "seconds": time.perf_counter() - t0, "qc": res.qc}


class SegmentRun:
    """The bookkeeping of one folder run, shared by :func:`iter_segment_folder` and the Dask
    path: the check before any image, what is left to do, ``qc.csv``, and the events.

    Parameters are those of :func:`iter_segment_folder`.
    """

    def __init__(self, input_dir: str | Path, out_dir: str | Path, method: str, params: dict[str, Any], *,
                 overwrite: bool = False, image_ids: list[str] | None = None) -> None:
        from napari_cpgcn.io.hpa import folder_image_ids
        from napari_cpgcn.segmentation import check_method
        from napari_cpgcn.segmentation.qc import read_qc_csv

        check_method(method, **params)  # a typo or missing weights (fetched if absent): one error now
        self.method, self.params = method, dict(params)
        self.folder, self.ids = folder_image_ids(input_dir, image_ids)
        self.out = Path(out_dir)
        refuse_input_as_output(self.folder, self.out)
        check_writable(self.out)
        self.skipped = [i for i in self.ids if not overwrite and mask_path(self.out, i).exists()]
        skip = set(self.skipped)
        self.todo = [i for i in self.ids if i not in skip]
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        if self.skipped:
            log.info("%d of %d images already have a mask in %s; skipping them (overwrite to redo)",
                     len(self.skipped), len(self.ids), self.out)
        try:
            self.qc_rows = read_qc_csv(qc_path(self.out))
        except (OSError, ValueError) as e:  # a damaged table is rebuilt, never fatal
            log.warning("%s unreadable (%s): rebuilding it", qc_path(self.out), e)
            self.qc_rows = {}
        self._qc_for_skipped()

    def _qc_for_skipped(self) -> None:
        from napari_cpgcn.segmentation.qc import mask_qc, write_qc_csv

        for image_id in self.skipped:
            if image_id not in self.qc_rows:
                try:
                    self.qc_rows[image_id] = dict(mask_qc(read_mask(mask_path(self.out, image_id))),
                                                  method="existing mask")
                except (OSError, ValueError) as e:
                    log.warning("no QC row for the existing mask of %s: %s", image_id, e)
        if self.skipped:
            write_qc_csv(qc_path(self.out), self.qc_rows)

    def start(self) -> Event:
        return Event(EventKind.STAGE_START, stage="segment", n_batches=len(self.todo),
                     message=f"segmenting {len(self.todo)} images with {self.method}")

    def record(self, res: dict[str, Any], k: int) -> Event:
        """Count one image's result (of :func:`segment_image`), update ``qc.csv``; its ITEM event."""
        from napari_cpgcn.segmentation.qc import write_qc_csv

        image_id, n = res["image_id"], len(self.todo)
        if "error" in res:
            # One bad image must not stop a batch: log it, go on, report at the end.
            self.failed[image_id] = res["error"]
            log.error("image %s failed: %s", image_id, res["error"])
            return Event(EventKind.ITEM, stage="segment", batch=k, n_batches=n,
                         message=f"failed {image_id}: {res['error']}", metrics={"failed": 1.0})
        self.done.append(image_id)
        qc = res["qc"]
        self.qc_rows[image_id] = qc
        write_qc_csv(qc_path(self.out), self.qc_rows)
        cells = int(qc["n_cells"])
        if qc["check_masks"]:
            log.warning("%s: check the mask — %s", image_id, qc["qc_note"])
        log.debug("%s: %d cells in %.2f s -> %s", image_id, cells, res["seconds"], res["path"])
        return Event(EventKind.ITEM, stage="segment", batch=k, n_batches=n, path=res["path"],
                     message=f"{image_id}: {cells} cells" + (f" (check: {qc['qc_note']})" if qc["check_masks"] else ""),
                     metrics={"n_cells": float(cells), "seconds": res["seconds"],
                              "n_nuclei": float(qc["n_nuclei"] or 0),
                              "border_fraction": float(qc["border_fraction"]),
                              "check_masks": float(bool(qc["check_masks"]))})

    def result(self) -> dict[str, Any]:
        done = set(self.done)
        return {"done": [i for i in self.ids if i in done],  # folder order, however the images were run
                "skipped": self.skipped, "failed": self.failed, "qc": str(qc_path(self.out)),
                "flagged": sorted(i for i, r in self.qc_rows.items() if r.get("check_masks"))}

    def stopped(self, k: int) -> Event:
        return Event(EventKind.STOPPED, stage="segment", batch=k, n_batches=len(self.todo),
                     message=f"stopped after {k} images", result=self.result())

    def finished(self) -> Event:
        return Event(EventKind.DONE, stage="segment",
                     message=f"{len(self.done)} segmented, {len(self.skipped)} skipped, {len(self.failed)} failed",
                     result=self.result())


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
        Output folder for ``{ID}.tif`` masks (created; never the images folder itself).
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
    run = SegmentRun(input_dir, out_dir, method, params, overwrite=overwrite, image_ids=image_ids)
    yield run.start()
    for k, image_id in enumerate(run.todo, 1):
        if should_stop is not None and should_stop():
            yield run.stopped(k - 1)
            return
        yield run.record(segment_image(run.folder, image_id, run.out, method, params), k)
    yield run.finished()
