"""Folder prediction in this process: streaming, resumable, atomic, fault tolerant.

:func:`predict_folder` runs a trained pipeline (a :class:`napari_cpgcn.pipeline.Predictor`) over
every image of a folder and writes the files described in :mod:`napari_cpgcn.batch.outputs`.

* **Per-image work is a pure function** of (input folder, image id, model, output folder,
  :class:`~napari_cpgcn.batch.outputs.BatchOptions`): :func:`process_image` reads, predicts and
  writes one image's outputs and returns a small picklable record, so a Dask worker can run it
  (the predictor is loaded once per process by :func:`napari_cpgcn.pipeline.load_predictor`).
* **Streaming**: the engine splits that work into read (a thread pool reading ahead), predict
  (the calling thread) and write (a writer thread), so reading and writing overlap with compute;
  at most ``2 * batch_size`` images are read ahead and ``batch_size`` wait for their writes,
  whatever the number of images.
* **Faults**: an image that cannot be read or predicted is logged, gets a ``failed`` marker and a
  row in ``failures.csv``, and the run goes on.

No Qt; torch is imported only when a predictor is loaded.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from napari_cpgcn.batch.outputs import (
    BatchOptions,
    BatchSummary,
    ImageRecord,
    _read_record,
    _record_failure,
    finish_run,
    image_paths,
    is_done,
    record_item,
    start_run,
    write_image_outputs,
)
from napari_cpgcn.events import Event, EventKind, ShouldStop
from napari_cpgcn.io.atomic import check_writable, remove_stale_temp_files
from napari_cpgcn.io.hpa import (
    HPAImage,
    folder_image_ids,
    read_image,
)
from napari_cpgcn.pipeline.predictor import load_predictor, model_fingerprint, segmentation_of

__all__ = [
    "read_input",
    "predict_image",
    "process_image",
    "predict_folder",
    "run_predict_folder",
]

log = logging.getLogger(__name__)

def _apply_threads(options: BatchOptions) -> None:
    if options.torch_threads > 0:
        import torch

        if torch.get_num_threads() != options.torch_threads:
            torch.set_num_threads(options.torch_threads)


def check_segmentation(model, options: BatchOptions) -> None:
    """The segmentation every image will get, checked once before the first image (a typo or a
    missing cellpose weight file is one clear error, not one failure per image)."""
    from napari_cpgcn.segmentation import check_method

    method, params = segmentation_of(model)
    if options.segmentation is not None:
        method, params = options.segmentation, (params if options.segmentation == method else {})
    if method is not None:  # None: a predictor that segments its own way
        check_method(method, **params)


def read_input(input_dir: str | Path, image_id: str) -> HPAImage:
    """Read one image of the input folder (any format :func:`napari_cpgcn.io.read_image` reads)."""
    return read_image(input_dir, image_id=image_id)


def predict_image(predictor: Any, image: HPAImage, options: BatchOptions) -> Any:
    """Run the predictor on one image: segmentation, image model, cell model, fusion.

    Returns the predictor's ``CellPrediction`` (``image_id``, ``image_probs`` (19,), ``cams``
    (19, Y, X) or None, ``cells`` (Y, X) uint32, ``table``).
    """
    extra = {"with_embeddings": True} if options.embeddings else {}  # predictors without it still work
    return predictor.predict(image, segmentation=options.segmentation, with_cams=options.save_cams, **extra)


def process_image(input_dir: str | Path, image_id: str, model: str | Path | Any,
                  out_dir: str | Path, options: BatchOptions | None = None) -> ImageRecord:
    """Read, predict and write one image: the unit of work of a batch (and of a Dask task).

    A pure function of its arguments: the predictor comes from the per-process cache
    (:func:`load_predictor`), every output is written atomically, the done marker last. An
    image finished by an earlier run is skipped (unless ``options.overwrite``). Errors of the
    image (unreadable file, failing prediction or write) are recorded and returned as a
    ``failed`` record, never raised; interrupts (KeyboardInterrupt, SystemExit) propagate.
    """
    options = options or BatchOptions()
    if not options.overwrite and is_done(out_dir, image_id, options):
        rec = _read_record(image_paths(out_dir, image_id)["done"]) or ImageRecord(image_id)
        rec.status = "skipped"
        return rec
    _apply_threads(options)
    predictor = load_predictor(model, options.device)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        image = read_input(input_dir, image_id)
    except Exception as e:
        return _record_failure(out_dir, image_id, "read", e)
    seconds["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        prediction = predict_image(predictor, image, options)
    except Exception as e:
        return _record_failure(out_dir, image_id, "predict", e, seconds)
    seconds["predict"] = time.perf_counter() - t0
    try:
        return write_image_outputs(out_dir, prediction, options, seconds,
                                   image=image if options.ome_zarr else None)
    except Exception as e:
        return _record_failure(out_dir, image_id, "write", e, seconds)


def predict_folder(input_dir: str | Path, model: str | Path | Any, out_dir: str | Path,
                   options: BatchOptions | None = None, should_stop: ShouldStop | None = None,
                   image_ids: Iterable[str] | None = None) -> Iterator[Event]:
    """Predict every image of a folder, streaming; yields progress :class:`Event` s.

    Parameters
    ----------
    input_dir
        Folder of HPA images (or a data set root with ``images/``).
    model
        A trained run folder, a checkpoint inside one, or a loaded predictor.
    out_dir
        Output folder (created); rerunning into it resumes.
    options
        :class:`BatchOptions`.
    should_stop
        Polled between images; when it returns True the images in flight are finished, a
        ``STOPPED`` event is yielded and the run-level CSVs are left as they were.
    image_ids
        Predict only these ids (default: every image of the folder).

    Yields
    ------
    Event
        ``STAGE_START`` (``metrics``: n_images, n_skipped, n_todo), one ``ITEM`` per image
        finished or failed (``result`` = :class:`ImageRecord`, ``batch`` = images handled so far
        including skipped ones, ``n_batches`` = all images), ``STAGE_END`` after assembly, then
        ``DONE`` with ``result`` = :class:`BatchSummary` (or ``STOPPED``).
    """
    t_start = time.perf_counter()
    options = options or BatchOptions()
    input_dir, ids = folder_image_ids(input_dir, image_ids)
    out = Path(out_dir)
    check_writable(out)
    remove_stale_temp_files(out, out / "parts", out / "masks", out / "cams", out / "embeddings")
    fingerprint = model_fingerprint(model)
    settings = {
        "input_dir": str(input_dir),
        "model": str(getattr(model, "run_dir", model)),
        "model_fingerprint": fingerprint,
        **asdict(options),
    }
    todo, summary, start = start_run(out, ids, options, settings)
    n_skipped = summary.n_skipped
    yield start

    if todo:
        _apply_threads(options)
    predictor = load_predictor(model, options.device) if todo else None
    if predictor is not None:
        check_segmentation(predictor, options)
    stage_sums: dict[str, float] = {}
    failures: list[ImageRecord] = []
    handled = n_skipped
    stopped = False
    reader = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="cpgcn-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpgcn-write")
    reads: deque[tuple[str, float, Future]] = deque()
    writes: deque[tuple[str, Future]] = deque()
    pending = iter(todo)
    read_ahead = 2 * options.batch_size

    def timed_read(image_id: str) -> tuple[HPAImage, float]:
        t0 = time.perf_counter()
        img = read_input(input_dir, image_id)
        return img, time.perf_counter() - t0

    def top_up_reads() -> None:
        while len(reads) < read_ahead:
            nxt = next(pending, None)
            if nxt is None:
                return
            reads.append((nxt, time.perf_counter(), reader.submit(timed_read, nxt)))

    def finish(rec: ImageRecord) -> Event:
        nonlocal handled
        handled += 1
        if rec.status == "failed":
            failures.append(rec)
        return record_item(summary, stage_sums, rec, handled, len(ids))

    def drain_writes(keep: int) -> Iterator[Event]:
        while len(writes) > keep:
            image_id, fut = writes.popleft()
            try:
                rec = fut.result()
            except Exception as e:
                rec = _record_failure(out, image_id, "write", e)
            yield finish(rec)

    try:
        top_up_reads()
        while reads:
            if should_stop is not None and should_stop():
                stopped = True
                break
            image_id, _, fut = reads.popleft()
            top_up_reads()
            try:
                image, t_read = fut.result()
            except Exception as e:
                yield finish(_record_failure(out, image_id, "read", e))
                continue
            t0 = time.perf_counter()
            pixels = image if options.ome_zarr else None  # the OME-Zarr holds the image too
            try:
                prediction = predict_image(predictor, image, options)
            except Exception as e:
                yield finish(_record_failure(out, image_id, "predict", e, {"read": t_read}))
                continue
            finally:
                del image
            secs = {"read": t_read, "predict": time.perf_counter() - t0}
            writes.append((image_id, writer.submit(write_image_outputs, out, prediction, options, secs, pixels)))
            del prediction, pixels
            yield from drain_writes(options.batch_size)
        yield from drain_writes(0)
    finally:
        # Interrupted or not: stop reading, let the writes in flight finish (each is atomic and
        # its done marker comes last, so a cut-off image is simply redone by the next run).
        for _, _, fut in reads:
            fut.cancel()
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)

    summary.failures = failures
    yield from finish_run(out, ids, options, settings, summary, stage_sums, handled, stopped, t_start)


def run_predict_folder(*args, **kwargs) -> BatchSummary:
    """:func:`predict_folder` without the events: runs it and returns the :class:`BatchSummary`."""
    summary = None
    for ev in predict_folder(*args, **kwargs):
        if ev.kind in (EventKind.DONE, EventKind.STOPPED):
            summary = ev.result
    assert summary is not None
    return summary
