"""What a folder prediction writes, and how: per-image parts, markers, run-level assembly.

Under ``OUT_DIR``::

    masks/{ID}.tif              cell instance mask (uint32, 0 = background, ids = cell_id)
    cams/{ID}.tif               optional: (19, Y, X) uint8 CAMs (probability x 255)
    zarr/{ID}.ome.zarr          optional: OME-Zarr (NGFF 0.4) image + labels/cells + per-cell table
    parts/{ID}.cells.csv        the image's per-cell rows
    parts/{ID}.image.csv        the image's image-level row
    parts/{ID}.submission.csv   optional: the image's Kaggle submission row
    embeddings/{ID}.npy         optional: (n_cells, D) float32 cell-model features (--embeddings)
    parts/{ID}.variation.csv    the image's single-cell variation rows (napari_cpgcn.profiles.variation)
    parts/{ID}.done.json        written last: the image is finished (resume skips it)
    parts/{ID}.failed.json      the image failed (stage, error); removed once it succeeds
    cells.csv                   every cell of every finished image (assembled at the end)
    images.csv                  one row per finished image (assembled at the end)
    submission.csv              optional, Kaggle 2021 format (assembled at the end)
    failures.csv                image_id, stage, error of every image that failed
    variation.csv               single-cell variation per image and predicted class (assembled)
    cells.h5ad                  optional: AnnData of every cell with its embeddings (--embeddings)
    run.json                    the settings and the summary of the last run

Every file is written atomically (temporary file in the same folder, then ``os.replace``), the
done marker last; the run-level CSVs are streamed from the parts into a temporary file and
renamed, so a crash never leaves a truncated ``cells.csv``. Shared by the in-process engine
(:mod:`napari_cpgcn.batch.local`) and the Dask one (:mod:`napari_cpgcn.batch.dask`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_cpgcn.classes import CLASS_NAMES, N_CLASSES, SHORT_NAMES
from napari_cpgcn.events import Event, EventKind
from napari_cpgcn.io.atomic import atomic_write, atomic_write_text
from napari_cpgcn.io.celltable import PREDICTION_COLUMNS
from napari_cpgcn.io.hpa import HPAImage
from napari_cpgcn.io.masks import read_mask, write_mask
from napari_cpgcn.profiles.embeddings import embeddings_path
from napari_cpgcn.segmentation.qc import mask_qc

__all__ = [
    "CELL_COLUMNS",
    "IMAGE_COLUMNS",
    "FAILURE_COLUMNS",
    "SUBMISSION_COLUMNS",
    "STAGES",
    "BatchConfigError",
    "BatchOptions",
    "ImageRecord",
    "BatchSummary",
    "image_paths",
    "is_done",
    "top_classes",
    "write_image_outputs",
    "assemble_outputs",
    "start_run",
    "record_item",
    "finish_run",
]

log = logging.getLogger(__name__)

#: Per-cell CSV columns (the package-wide per-cell table, plus ``top_classes``).
CELL_COLUMNS: tuple[str, ...] = (*PREDICTION_COLUMNS, "top_classes")


#: Quality control of each image's cells (:func:`napari_cpgcn.segmentation.qc.mask_qc`): cells cut
#: by the border, nuclei found (when the predictor segmented), and ``check_masks`` when the nucleus
#: and cell counts disagree.
IMAGE_QC_COLUMNS: tuple[str, ...] = ("n_border_cells", "border_fraction", "n_nuclei", "check_masks", "qc_note")
#: Image-level CSV columns.
IMAGE_COLUMNS: tuple[str, ...] = (
    "image_id", "height", "width", "n_cells", "top_classes", *(f"image_{s}" for s in SHORT_NAMES),
    *IMAGE_QC_COLUMNS,
)


FAILURE_COLUMNS: tuple[str, ...] = ("image_id", "stage", "error")


SUBMISSION_COLUMNS: tuple[str, ...] = ("ID", "ImageWidth", "ImageHeight", "PredictionString")


#: Stages timed per image (``predict`` holds segmentation + image model + cell model, which the
#: predictor may report separately as ``segment``, ``image_model``, ``cell_model``).
STAGES: tuple[str, ...] = ("read", "predict", "write")


_FLOAT_FORMAT = "%.6g"


_RUN_JSON = "run.json"


class BatchConfigError(ValueError):
    """The output folder holds a run made with other settings; the message says what to do."""


@dataclass(frozen=True)
class BatchOptions:
    """Settings of a folder prediction (picklable; the same on every worker).

    Attributes
    ----------
    segmentation : str or None
        Cell segmentation method passed to the predictor (``"classical"``, ``"cellpose"``);
        None: the method the run was trained with (and its parameters).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    batch_size : int
        Images in flight per stage: up to ``2 * batch_size`` are read ahead and up to
        ``batch_size`` wait for their writes. Memory grows with it, not with the folder size.
    workers : int
        Reader threads (decoding PNG/JPEG releases the GIL, so 2-4 overlap well with compute).
    save_cams : bool
        Also write ``cams/{ID}.tif`` (19, Y, X) uint8, probability x 255.
    submission : bool
        Also write ``submission.csv`` (Kaggle 2021: every cell x every class, fused confidence).
    ome_zarr : bool
        Also write ``zarr/{ID}.ome.zarr``: image pyramid, ``labels/cells`` and the per-cell
        table (:mod:`napari_cpgcn.io.omezarr`; needs the ``ome-zarr`` extra).
    overwrite : bool
        Redo every image even when a finished one is in the output folder.
    top_threshold : float
        A class is listed in ``top_classes`` when its (fused / image) probability reaches this.
    embeddings : bool
        Also write ``embeddings/{ID}.npy`` (the cell model's pooled features) and, at the end,
        ``cells.h5ad`` (:mod:`napari_cpgcn.profiles.embeddings`; needs anndata).
    umap : bool
        With ``embeddings``: also put a 2-D UMAP into ``cells.h5ad`` (needs umap-learn).
    umap_seed : int
        Seed of the UMAP (the same seed gives the same layout).
    torch_threads : int
        Set torch's intra-op threads (process-wide) before predicting; 0 leaves torch's default.
        On a busy shared CPU 1 can be several times faster than oversubscribed threads; on a
        cluster, workers x threads should not exceed the cores.
    """

    segmentation: str | None = None
    device: str = "auto"
    batch_size: int = 4
    workers: int = 2
    save_cams: bool = False
    submission: bool = False
    ome_zarr: bool = False
    overwrite: bool = False
    top_threshold: float = 0.5
    torch_threads: int = 0
    embeddings: bool = False
    umap: bool = False
    umap_seed: int = 0

    def __post_init__(self) -> None:
        from napari_cpgcn.segmentation import METHODS

        if self.segmentation is not None and self.segmentation not in METHODS:
            raise ValueError(f"unknown segmentation method {self.segmentation!r}; choose one of "
                             f"{', '.join(METHODS)} (or leave it unset: as the run was trained)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.umap and not self.embeddings:
            raise ValueError("umap needs embeddings (a UMAP is made of the embeddings): set embeddings too")


@dataclass
class ImageRecord:
    """What happened to one image (picklable; the done / failed marker holds it as JSON).

    Attributes
    ----------
    image_id : str
    status : str
        ``"done"`` (predicted now), ``"skipped"`` (finished by an earlier run) or ``"failed"``.
    height, width, n_cells : int
    seconds : dict[str, float]
        Wall time per stage (``read``, ``predict``, ``write`` and any stage the predictor reports).
    stage, error : str
        For failures: the stage that failed and the error message.
    cams, submission, ome_zarr : bool
        Whether the CAM TIFF / submission part / OME-Zarr was written.
    """

    image_id: str
    status: str = "done"
    height: int = 0
    width: int = 0
    n_cells: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    stage: str = ""
    error: str = ""
    cams: bool = False
    submission: bool = False
    ome_zarr: bool = False
    embeddings: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageRecord:
        d = json.loads(text)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class BatchSummary:
    """The outcome of :func:`predict_folder` (the ``result`` of its DONE event).

    Attributes
    ----------
    n_images : int
        Images in the input folder.
    n_done, n_skipped, n_failed : int
        Predicted in this run / finished by an earlier run / failed.
    failures : list[ImageRecord]
        The failed images (also in ``failures.csv``).
    seconds : float
        Wall time of the whole run.
    seconds_by_stage : dict[str, float]
        Mean seconds per predicted image for each stage.
    paths : dict[str, str]
        ``cells``, ``images``, ``failures``, ``submission`` (when written), ``out_dir``.
    n_cells : int
        Rows of ``cells.csv``.
    stopped : bool
        True when a stop request ended the run early (run-level CSVs not assembled).
    """

    n_images: int = 0
    n_done: int = 0
    n_skipped: int = 0
    n_failed: int = 0
    failures: list[ImageRecord] = field(default_factory=list)
    seconds: float = 0.0
    seconds_by_stage: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    n_cells: int = 0
    stopped: bool = False

    @property
    def images_per_second(self) -> float:
        return self.n_done / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [{"image_id": f.image_id, "stage": f.stage, "error": f.error} for f in self.failures]
        d["images_per_second"] = self.images_per_second
        return d


def image_paths(out_dir: str | Path, image_id: str) -> dict[str, Path]:
    """Where one image's outputs go."""
    out = Path(out_dir)
    parts = out / "parts"
    return {
        "mask": out / "masks" / f"{image_id}.tif",
        "cams": out / "cams" / f"{image_id}.tif",
        "zarr": out / "zarr" / f"{image_id}.ome.zarr",
        "cells": parts / f"{image_id}.cells.csv",
        "image": parts / f"{image_id}.image.csv",
        "submission": parts / f"{image_id}.submission.csv",
        "done": parts / f"{image_id}.done.json",
        "failed": parts / f"{image_id}.failed.json",
        "variation": parts / f"{image_id}.variation.csv",
        "embeddings": embeddings_path(out, image_id),
    }


def _read_record(path: Path) -> ImageRecord | None:
    try:
        return ImageRecord.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None


def is_done(out_dir: str | Path, image_id: str, options: BatchOptions | None = None) -> bool:
    """Whether ``image_id`` was finished by an earlier run (with CAMs, when ``options`` asks for them)."""
    p = image_paths(out_dir, image_id)
    if not (p["done"].is_file() and p["cells"].is_file() and p["image"].is_file() and p["mask"].is_file()):
        return False
    if options is not None and options.save_cams:
        rec = _read_record(p["done"])
        if rec is None or not rec.cams or not p["cams"].is_file():
            return False
    if options is not None and options.ome_zarr:
        rec = _read_record(p["done"])
        if rec is None or not rec.ome_zarr or not p["zarr"].is_dir():
            return False
    if options is not None and options.embeddings:
        rec = _read_record(p["done"])
        if rec is None or not rec.embeddings or not p["embeddings"].is_file():
            return False
    return True


def top_classes(probs: np.ndarray, threshold: float) -> str:
    """Short names of the classes with probability ≥ ``threshold``, best first, ``|``-joined."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, kind="stable")
    return "|".join(SHORT_NAMES[k] for k in order if probs[k] >= threshold)


def _cell_part(image_id: str, table, threshold: float):
    import pandas as pd

    df = pd.DataFrame(table).copy()
    df["image_id"] = image_id
    if len(df):
        df = df.sort_values("cell_id", kind="stable").reset_index(drop=True)
        fused = df[[f"fused_{s}" for s in SHORT_NAMES]].to_numpy(dtype=np.float64)
        df["top_classes"] = [top_classes(row, threshold) for row in fused]
    else:
        df["top_classes"] = pd.Series(dtype=str)
    missing = [c for c in CELL_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"the predictor's per-cell table lacks the columns {missing[:4]}")
    extra = [c for c in df.columns if c not in CELL_COLUMNS]
    return df[list(CELL_COLUMNS) + extra]


def _image_part(image_id: str, probs: np.ndarray, height: int, width: int, n_cells: int,
                threshold: float, qc: dict[str, Any]):
    import pandas as pd

    row = {"image_id": image_id, "height": height, "width": width, "n_cells": n_cells,
           "top_classes": top_classes(probs, threshold)}
    row.update({f"image_{s}": float(p) for s, p in zip(SHORT_NAMES, probs, strict=True)})
    row.update({k: qc.get(k) for k in IMAGE_QC_COLUMNS})
    return pd.DataFrame([row], columns=list(IMAGE_COLUMNS))


def _submission_line(image_id: str, cells: np.ndarray, cell_table) -> str:
    """One Kaggle 2021 submission row: every cell x every class with its fused confidence."""
    from napari_cpgcn.io.rle import encode_label_image, format_prediction_string

    masks = encode_label_image(cells)
    triples: list[tuple[int, float, str]] = []
    fused_cols = [f"fused_{s}" for s in SHORT_NAMES]
    for cid, row in zip(cell_table["cell_id"].to_numpy(), cell_table[fused_cols].to_numpy(np.float64), strict=True):
        enc = masks.get(int(cid))
        if enc is None:  # a table row without pixels in the mask cannot be submitted
            continue
        triples.extend((k, float(row[k]), enc) for k in range(N_CLASSES))
    h, w = cells.shape
    return f"{image_id},{w},{h},{format_prediction_string(triples)}\n"


def _write_csv(path: Path, df) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format=_FLOAT_FORMAT, lineterminator="\n"))


def _write_cams(path: Path, cams: np.ndarray) -> None:
    import tifffile

    q = np.clip(np.rint(np.asarray(cams, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    desc = json.dumps({"axes": "CYX", "classes": list(CLASS_NAMES), "scale": 1 / 255})
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, q, compression="zlib", description=desc,
                                               metadata=None))


def write_image_outputs(out_dir: str | Path, prediction: Any, options: BatchOptions,
                        seconds: dict[str, float] | None = None, image: HPAImage | None = None) -> ImageRecord:
    """Write one image's outputs atomically, the done marker last; returns its record.

    Parameters
    ----------
    out_dir
        The run's output folder.
    prediction
        A ``CellPrediction`` (``image_id``, ``image_probs``, ``cams``, ``cells``, ``table``).
    options
        Which optional outputs to write.
    seconds
        Timings measured so far (read, predict); ``write`` is added.
    image
        The image itself; needed (only) for ``options.ome_zarr``.
    """
    t0 = time.perf_counter()
    image_id = str(prediction.image_id)
    p = image_paths(out_dir, image_id)
    cells = np.asarray(prediction.cells)
    height, width = cells.shape
    cell_df = _cell_part(image_id, prediction.table, options.top_threshold)
    write_mask(p["mask"], cells)
    wrote_cams = False
    if options.save_cams:
        if prediction.cams is None:
            raise ValueError(f"{image_id}: the predictor returned no CAMs although save_cams is set")
        _write_cams(p["cams"], prediction.cams)
        wrote_cams = True
    if options.submission:
        atomic_write_text(p["submission"], _submission_line(image_id, cells, cell_df))
    if options.ome_zarr:
        if image is None:
            raise ValueError(f"{image_id}: OME-Zarr output needs the image (write_image_outputs(image=...))")
        from napari_cpgcn.io.omezarr import write_ome_zarr

        # atomic itself (temporary folder, then rename), before the done marker like the other files
        write_ome_zarr(p["zarr"], image, cells, cell_df, image_probs=prediction.image_probs, overwrite=True)
    wrote_embeddings = False
    if options.embeddings:
        emb = getattr(prediction, "embeddings", None)
        if emb is None:
            raise ValueError(f"{image_id}: the predictor returned no embeddings although embeddings is set")
        from napari_cpgcn.profiles.embeddings import write_embeddings

        # the rows of cells.csv are sorted by cell id: the embeddings follow the same order
        order = np.argsort(np.asarray(prediction.table["cell_id"]), kind="stable") if len(cell_df) else []
        write_embeddings(p["embeddings"], np.asarray(emb)[order], len(cell_df), image_id)
        wrote_embeddings = True
    from napari_cpgcn.profiles.variation import VariationParams, variation_of_prediction

    _write_csv(p["variation"], variation_of_prediction(prediction, VariationParams(options.top_threshold)))
    _write_csv(p["cells"], cell_df)
    qc = getattr(prediction, "qc", None) or mask_qc(cells)  # the segmentation's, else the mask's own
    _write_csv(p["image"], _image_part(image_id, np.asarray(prediction.image_probs), height, width,
                                       len(cell_df), options.top_threshold, qc))
    secs = dict(seconds or {})
    extra = getattr(prediction, "timings", None) or getattr(prediction, "seconds", None)
    if isinstance(extra, dict):
        for k, v in extra.items():
            secs.setdefault(str(k), float(v))
    secs["write"] = time.perf_counter() - t0
    rec = ImageRecord(image_id, "done", int(height), int(width), int(len(cell_df)), secs,
                      cams=wrote_cams, submission=options.submission, ome_zarr=options.ome_zarr,
                      embeddings=wrote_embeddings)
    atomic_write_text(p["done"], rec.to_json())  # last: the image is finished
    p["failed"].unlink(missing_ok=True)
    return rec


def _error_text(exc: BaseException) -> str:
    msg = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _record_failure(out_dir: str | Path, image_id: str, stage: str, exc: BaseException,
                    seconds: dict[str, float] | None = None) -> ImageRecord:
    """Log a failed image and leave its ``failed`` marker (stage and error)."""
    rec = ImageRecord(image_id, "failed", seconds=dict(seconds or {}), stage=stage, error=_error_text(exc))
    log.error("image %s failed while %s: %s", image_id, "reading" if stage == "read" else
              f"in the {stage} step", rec.error)
    log.debug("traceback of %s:\n%s", image_id, "".join(traceback.format_exception(exc)))
    try:
        atomic_write_text(image_paths(out_dir, image_id)["failed"], rec.to_json())
    except OSError as e:  # the failure itself is already logged and returned
        log.error("cannot write the failure marker of %s: %s", image_id, e)
    return rec


def _concat_parts(parts: Iterable[Path], dest: Path, header: str) -> int:
    """Stream CSV parts (each with ``header``) into ``dest`` atomically; returns the data rows."""
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            out.write(header)
            for part in parts:
                with open(part, encoding="utf-8", newline="") as fh:
                    first = fh.readline()
                    if first != header:
                        raise BatchConfigError(
                            f"{part} has other columns than the run's {dest.name}; it was written by "
                            "another version or with other settings. Rerun with --overwrite or use a "
                            "new output folder."
                        )
                    for line in fh:
                        out.write(line)
                        n += 1

    atomic_write(dest, write)
    return n


def assemble_outputs(out_dir: str | Path, image_ids: Iterable[str],
                     options: BatchOptions = BatchOptions(),
                     failures: Iterable[ImageRecord] | None = None) -> dict[str, Any]:
    """Build ``cells.csv``, ``images.csv``, ``failures.csv`` (and ``submission.csv``) from the parts.

    Only the images of ``image_ids`` that are finished are included, in the given order
    (sorted ids for :func:`predict_folder`), each image's cells sorted by cell id, so the
    files are the same however the images were processed (one process, threads, Dask).
    Memory does not grow with the number of images: the parts are streamed.

    Parameters
    ----------
    failures
        Failed images; by default read from the ``failed`` markers of unfinished images.

    Returns
    -------
    dict
        ``paths`` (name → file), ``n_cells``, ``n_images``, ``failures`` (list of records).
    """
    out = Path(out_dir)
    ids = list(image_ids)
    done = [i for i in ids if is_done(out, i)]
    done_set = set(done)
    header_cells = ",".join(CELL_COLUMNS) + "\n"
    header_images = ",".join(IMAGE_COLUMNS) + "\n"
    paths: dict[str, str] = {}
    n_cells = _concat_parts((image_paths(out, i)["cells"] for i in done), out / "cells.csv", header_cells)
    paths["cells"] = str(out / "cells.csv")
    _concat_parts((image_paths(out, i)["image"] for i in done), out / "images.csv", header_images)
    paths["images"] = str(out / "images.csv")
    if options.submission:
        _assemble_submission(out, done, out / "submission.csv")
        paths["submission"] = str(out / "submission.csv")
    _assemble_variation(out, done, out / "variation.csv", options)
    paths["variation"] = str(out / "variation.csv")
    if options.embeddings:
        from napari_cpgcn.profiles.embeddings import assemble_h5ad

        with_emb = [i for i in done if image_paths(out, i)["embeddings"].is_file()]
        if len(with_emb) < len(done):  # finished earlier without embeddings and not redone (it failed now)
            missing = [i for i in done if i not in set(with_emb)]
            log.warning("%d finished images have no embeddings and are left out of cells.h5ad (%s%s); "
                        "rerun with --overwrite to include them", len(missing), ", ".join(missing[:3]),
                        ", ..." if len(missing) > 3 else "")
        h5 = assemble_h5ad(out, with_emb, umap=options.umap, seed=options.umap_seed,
                           cells_part=lambda i: image_paths(out, i)["cells"])
        paths["h5ad"] = h5["path"]
    if failures is None:
        recs = []
        for i in ids:
            if i in done_set:
                continue
            r = _read_record(image_paths(out, i)["failed"])
            if r is not None:
                recs.append(r)
    else:
        recs = [r for r in failures if r.image_id not in done_set]
    _write_failures(out / "failures.csv", recs)
    paths["failures"] = str(out / "failures.csv")
    return {"paths": paths, "n_cells": n_cells, "n_images": len(done), "failures": recs}


def _assemble_variation(out: Path, done: list[str], dest: Path, options: BatchOptions) -> None:
    """``variation.csv`` from the parts; an image finished by an older version without a variation
    part gets one from its cells part (without intensities there: ``intensity_cv`` is NaN)."""
    from napari_cpgcn.profiles.variation import VARIATION_COLUMNS, VariationParams, image_variation

    for i in done:
        p = image_paths(out, i)
        if not p["variation"].is_file():
            import pandas as pd

            cells = pd.read_csv(p["cells"])
            image = pd.read_csv(p["image"])
            fused = cells[[f"fused_{s}" for s in SHORT_NAMES]].to_numpy(np.float64)
            probs = image[[f"image_{s}" for s in SHORT_NAMES]].to_numpy(np.float64)[0]
            _write_csv(p["variation"], image_variation(i, fused, probs, None, VariationParams(options.top_threshold)))
    _concat_parts((image_paths(out, i)["variation"] for i in done), dest, ",".join(VARIATION_COLUMNS) + "\n")


def _assemble_submission(out: Path, done: list[str], dest: Path) -> None:
    def lines() -> Iterator[str]:
        for i in done:
            p = image_paths(out, i)
            if not p["submission"].is_file():  # finished before --submission was asked for
                import pandas as pd

                cells = read_mask(p["mask"])
                table = pd.read_csv(p["cells"])
                atomic_write_text(p["submission"], _submission_line(i, cells, table))
            yield p["submission"].read_text(encoding="utf-8")

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(",".join(SUBMISSION_COLUMNS) + "\n")
            for line in lines():
                fh.write(line)

    atomic_write(dest, write)


def _write_failures(path: Path, records: Iterable[ImageRecord]) -> None:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FAILURE_COLUMNS)
    for r in records:
        w.writerow([r.image_id, r.stage, r.error])
    atomic_write_text(path, buf.getvalue())


def _check_run_settings(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume into a folder made with another model or segmentation."""
    f = out / _RUN_JSON
    if overwrite or not f.is_file():
        return
    try:
        old = json.loads(f.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError):
        return
    # Nothing finished there (e.g. every image failed on a mistyped setting): nothing to mix.
    if not any((out / "parts").glob("*.done.json")):
        return
    for key in ("model_fingerprint", "segmentation"):
        if key in old and old[key] != settings[key]:
            raise BatchConfigError(
                f"{out} holds predictions made with another {key.replace('_', ' ')} "
                f"({old.get('model', '?')}, segmentation {old.get('segmentation', '?')}); resuming would "
                "mix them. Use a new --out folder, or --overwrite to redo every image."
            )


def start_run(out: Path, ids: list[str], options, settings: dict) -> tuple[list[str], BatchSummary, Event]:
    """Begin a folder run, in-process or on a cluster: check the settings against an earlier run
    in ``out`` (refusing another model unless overwriting), mark the run as running, and find
    the images left to do.

    Returns
    -------
    todo, summary, event
        The ids still to predict, the run's summary so far, and its STAGE_START event.
    """
    _check_run_settings(out, settings, options.overwrite)
    if options.overwrite:
        for i in ids:
            image_paths(out, i)["done"].unlink(missing_ok=True)
    atomic_write_text(out / _RUN_JSON, json.dumps({"settings": settings, "status": "running"}, indent=1))
    todo = [i for i in ids if not is_done(out, i, options)]
    n_skipped = len(ids) - len(todo)
    summary = BatchSummary(n_images=len(ids), n_skipped=n_skipped)
    event = Event(EventKind.STAGE_START, stage="predict", n_batches=len(ids), batch=n_skipped,
                  message=f"{len(ids)} images, {n_skipped} already done, {len(todo)} to predict",
                  metrics={"n_images": len(ids), "n_skipped": n_skipped, "n_todo": len(todo)})
    return todo, summary, event


def record_item(summary: BatchSummary, stage_sums: dict[str, float], rec: ImageRecord,
                handled: int, n_images: int) -> Event:
    """Count one finished or failed image into the run's summary and stage times; its ITEM event.

    Shared by the in-process and the cluster folder runs.
    """
    if rec.status == "failed":
        summary.n_failed += 1
    else:
        summary.n_done += 1
        for k, v in rec.seconds.items():
            stage_sums[k] = stage_sums.get(k, 0.0) + v
    return Event(EventKind.ITEM, stage="predict", batch=handled, n_batches=n_images,
                 message=rec.image_id if rec.status != "failed" else f"{rec.image_id} FAILED: {rec.error}",
                 metrics={"n_cells": float(rec.n_cells), **{f"seconds_{k}": v for k, v in rec.seconds.items()}},
                 result=rec)


def finish_run(out: Path, ids: list[str], options, settings: dict, summary: BatchSummary,
               stage_sums: dict[str, float], handled: int, stopped: bool,
               t_start: float) -> Iterator[Event]:
    """End a folder run, in-process or on a cluster: timing, then STOPPED, or the run-level CSVs + DONE.

    The run-level files are assembled from the per-image parts only when every image was
    handled, so a stopped run never leaves a partial ``cells.csv``.
    """
    summary.seconds = time.perf_counter() - t_start
    summary.seconds_by_stage = {k: v / summary.n_done for k, v in stage_sums.items()} if summary.n_done else {}
    if stopped:
        summary.stopped = True
        log.warning("stopped after %d of %d images; rerun to resume", handled, len(ids))
        yield Event(EventKind.STOPPED, stage="predict", batch=handled, n_batches=len(ids),
                    message="stopped; finished images are kept, rerun to resume", result=summary)
        return
    assembled = assemble_outputs(out, ids, options, failures=None)
    summary.paths = {"out_dir": str(out), **assembled["paths"]}
    summary.n_cells = assembled["n_cells"]
    summary.failures = assembled["failures"]
    summary.n_failed = len(summary.failures)
    atomic_write_text(out / _RUN_JSON, json.dumps(
        {"settings": settings, "status": "finished", "summary": summary.as_dict()}, indent=1))
    yield Event(EventKind.STAGE_END, stage="predict", batch=handled, n_batches=len(ids),
                message=f"{summary.n_done} predicted, {summary.n_skipped} skipped, {summary.n_failed} failed; "
                        f"{summary.n_cells} cells in {out / 'cells.csv'}")
    yield Event(EventKind.DONE, stage="predict", result=summary, path=str(out))
