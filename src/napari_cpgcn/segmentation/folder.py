"""Segment every image of a folder into ``OUT/{ID}.tif`` masks, as a generator of progress events.

The CLI (``napari-cpgcn segment``) drains it into a progress bar; the pipeline reuses it for
``RUN/segmentation/``. Masks are written atomically (temporary file + rename), so an
interrupted run leaves no half-written mask and a rerun skips the finished ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from napari_cpgcn.events import Event, EventKind, ShouldStop
from napari_cpgcn.io.atomic import check_writable
from napari_cpgcn.io.masks import write_mask

__all__ = ["mask_path", "iter_segment_folder", "refuse_input_as_output"]

log = logging.getLogger(__name__)


def mask_path(out_dir: str | Path, image_id: str) -> Path:
    """Where the mask of ``image_id`` goes: ``OUT/{ID}.tif``."""
    return Path(out_dir) / f"{image_id}.tif"


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
        ``metrics`` = ``{"n_cells": n, "seconds": s}``, or ``message`` starting with
        ``"failed"`` and ``metrics["failed"] = 1``), then ``DONE`` with ``result`` =
        ``{"done": [...], "skipped": [...], "failed": {id: error}}``.
    """
    import time

    from napari_cpgcn.io.hpa import list_image_ids, read_image, resolve_images_dir
    from napari_cpgcn.segmentation import check_method, segment_cells

    check_method(method, **params)  # a typo or missing weights: one error now, not one per image
    folder = resolve_images_dir(input_dir)
    ids = list(image_ids) if image_ids is not None else list_image_ids(folder)
    if not ids:
        raise FileNotFoundError(
            f"{input_dir} holds no HPA images: expected files named ID_red.png, ID_green.png, "
            "ID_blue.png, ID_yellow.png (or .jpg/.tif), or multi-channel TIFFs"
        )
    out = Path(out_dir)
    refuse_input_as_output(folder, out)
    check_writable(out)
    skipped = [i for i in ids if not overwrite and mask_path(out, i).exists()]
    todo = [i for i in ids if i not in set(skipped)]
    if skipped:
        log.info("%d of %d images already have a mask in %s; skipping them (overwrite to redo)",
                 len(skipped), len(ids), out)
    yield Event(EventKind.STAGE_START, stage="segment", n_batches=len(todo),
                message=f"segmenting {len(todo)} images with {method}")
    done: list[str] = []
    failed: dict[str, str] = {}
    for k, image_id in enumerate(todo, 1):
        if should_stop is not None and should_stop():
            yield Event(EventKind.STOPPED, stage="segment", batch=k - 1, n_batches=len(todo),
                        message=f"stopped after {k - 1} images", result={"done": done, "skipped": skipped, "failed": failed})
            return
        t0 = time.perf_counter()
        try:
            image = read_image(folder, image_id=image_id)
            labels = segment_cells(image, method=method, **params)
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
        n = int(labels.max())
        log.debug("%s: %d cells in %.2f s -> %s", image_id, n, dt, path)
        yield Event(EventKind.ITEM, stage="segment", batch=k, n_batches=len(todo), path=str(path),
                    message=f"{image_id}: {n} cells", metrics={"n_cells": float(n), "seconds": dt})
    yield Event(EventKind.DONE, stage="segment", message=f"{len(done)} segmented, {len(skipped)} skipped, {len(failed)} failed",
                result={"done": done, "skipped": skipped, "failed": failed})
