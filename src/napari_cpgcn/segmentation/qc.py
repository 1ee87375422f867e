"""Quality control of a cell mask: counts that tell a user which fields to look at.

:func:`mask_qc` summarises one cell label image (and, when given, the nuclei found in the
blue channel) in a flat ``dict`` of numbers — one row of ``qc.csv`` in a ``segment`` output
folder, or extra columns of a per-image table:

* ``n_cells``; ``n_border_cells`` and ``border_fraction``: cells touching the image edge
  (kept, as the HPA masks keep them, but they are partial cells: a field where most cells are
  cut has little whole-cell signal);
* ``n_nuclei`` and the overlaps: cells holding no nucleus, cells holding several, nuclei
  outside every cell;
* ``check_masks``: True when the nuclei count and the cell count disagree by more than
  ``max(2, 10 %)`` — a hint that cells were merged, lost or invented (``qc_note`` says how).

:func:`image_qc` does the same for a mask that came from elsewhere (a cellpose run, a mask
folder): it finds the nuclei in the image's blue channel first.

numpy only; no Qt, napari or torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QC_FIELDS", "QC_CSV_COLUMNS", "mask_qc", "image_qc", "count_mismatch", "read_qc_csv",
           "write_qc_csv", "qc_summary"]

log = logging.getLogger(__name__)

#: The keys of :func:`mask_qc`'s result, in the order of a ``qc.csv`` row.
QC_FIELDS: tuple[str, ...] = (
    "n_cells", "n_border_cells", "border_fraction", "median_cell_area_px", "cell_coverage",
    "n_nuclei", "n_cells_without_nucleus", "n_cells_multinucleate", "n_nuclei_outside_cells",
    "check_masks", "qc_note",
)

#: Columns of ``qc.csv``: the image id, :data:`QC_FIELDS`, then how the mask was made.
QC_CSV_COLUMNS: tuple[str, ...] = ("image_id",) + QC_FIELDS + ("method", "nucleus_diameter")

#: A count difference up to this many cells is never flagged (mitotic pairs, border slivers).
MISMATCH_ABS = 2
#: ... nor up to this fraction of the larger count.
MISMATCH_REL = 0.10


def count_mismatch(n_cells: int, n_nuclei: int) -> bool:
    """Whether the cell and nucleus counts disagree enough to flag the field.

    A few cells of difference are normal (a dividing cell's two chromatin masses are one
    cell; a nucleus cut by the border may have no cell big enough to keep), so the tolerance
    is ``max(MISMATCH_ABS, MISMATCH_REL * max(n_cells, n_nuclei))``.
    """
    return abs(int(n_cells) - int(n_nuclei)) > max(MISMATCH_ABS, MISMATCH_REL * max(n_cells, n_nuclei))


def _ids(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    return ids[ids > 0]


def mask_qc(cells: np.ndarray, nuclei: np.ndarray | None = None) -> dict[str, Any]:
    """Quality-control numbers of one cell mask.

    Parameters
    ----------
    cells
        (Y, X) integer cell labels, 0 = background.
    nuclei
        Optional (Y, X) integer nucleus labels of the same image (any numbering: each label
        is one nucleus). Without it the nucleus fields are None and nothing is flagged.

    Returns
    -------
    dict
        The keys of :data:`QC_FIELDS`: ``n_cells``, ``n_border_cells``, ``border_fraction``
        (0 when there are no cells), ``median_cell_area_px``, ``cell_coverage`` (fraction of
        the image inside cells), ``n_nuclei``, ``n_cells_without_nucleus``,
        ``n_cells_multinucleate``, ``n_nuclei_outside_cells`` (a nucleus belongs to the cell
        holding most of its pixels), ``check_masks`` (bool) and ``qc_note`` (text, "" when
        all is well).

    Raises
    ------
    ValueError
        Masks that are not 2-D integer images, or of different shapes.
    """
    cells = np.asarray(cells)
    if cells.ndim != 2 or not np.issubdtype(cells.dtype, np.integer):
        raise ValueError(f"mask_qc needs a 2-D integer label image, got {cells.dtype} of shape {cells.shape}")
    ids = _ids(cells)
    n_cells = len(ids)
    edge = np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]])
    n_border = len(_ids(edge))
    if n_cells:
        # bincount over the compacted ids: memory ~ n_cells, not max(label).
        compact = np.searchsorted(ids, cells[cells > 0])
        areas = np.bincount(compact, minlength=n_cells)
        median_area = float(np.median(areas))
    else:
        median_area = 0.0
    qc: dict[str, Any] = {
        "n_cells": n_cells,
        "n_border_cells": n_border,
        "border_fraction": n_border / n_cells if n_cells else 0.0,
        "median_cell_area_px": median_area,
        "cell_coverage": float(np.count_nonzero(cells)) / cells.size,
        "n_nuclei": None,
        "n_cells_without_nucleus": None,
        "n_cells_multinucleate": None,
        "n_nuclei_outside_cells": None,
        "check_masks": False,
        "qc_note": "",
    }
    if nuclei is None:
        return qc
    nuclei = np.asarray(nuclei)
    if nuclei.shape != cells.shape or not np.issubdtype(nuclei.dtype, np.integer):
        raise ValueError(f"nuclei ({nuclei.dtype}, {nuclei.shape}) must be an integer label image "
                         f"of the cells' shape {cells.shape}")
    nid = _ids(nuclei)
    n_nuclei = len(nid)
    outside = without = multi = 0
    if n_nuclei:
        # Each nucleus goes to the label (a cell, or 0 = none) under most of its pixels.
        sel = nuclei > 0
        nuc_c = np.searchsorted(nid, nuclei[sel]).astype(np.int64)
        under = cells[sel]
        # compact cell index + 1 (0 = no cell), so the pair key fits an int64 for any labels
        cell_c = np.where(under > 0, np.searchsorted(ids, under) + 1, 0).astype(np.int64)
        keys, counts = np.unique(nuc_c * (n_cells + 1) + cell_c, return_counts=True)
        knuc, kcell = np.divmod(keys, n_cells + 1)
        order = np.lexsort((-counts, knuc))  # per nucleus, the largest overlap first
        first = np.ones(len(order), bool)
        first[1:] = knuc[order][1:] != knuc[order][:-1]
        owner = kcell[order][first]  # compact cell index + 1 per nucleus (0 = outside)
        outside = int(np.count_nonzero(owner == 0))
        per_cell = np.unique(owner[owner > 0], return_counts=True)[1]
        multi = int(np.count_nonzero(per_cell > 1))
        without = n_cells - len(per_cell)
    else:
        without = n_cells
    flag = count_mismatch(n_cells, n_nuclei)
    notes = []
    if flag:
        notes.append(f"{n_nuclei} nuclei but {n_cells} cells")
    if n_cells and without > max(MISMATCH_ABS, MISMATCH_REL * n_cells):
        notes.append(f"{without} cells without a nucleus")
    if n_cells and multi > max(MISMATCH_ABS, MISMATCH_REL * n_cells):
        notes.append(f"{multi} cells with several nuclei")
    qc.update(n_nuclei=n_nuclei, n_cells_without_nucleus=int(without), n_cells_multinucleate=multi,
              n_nuclei_outside_cells=outside, check_masks=bool(flag or notes), qc_note="; ".join(notes))
    return qc


def image_qc(image: Any, cells: np.ndarray, *, nucleus_diameter: float | None = None) -> dict[str, Any]:
    """:func:`mask_qc` of a cell mask from anywhere, with the nuclei found in the image's blue channel.

    Meant for per-image tables (e.g. a prediction run's ``images.csv``) where the mask came
    from a file or from cellpose: the nuclei are segmented by the classical backend's nucleus
    step (a fraction of a second for a 2048² image).

    Parameters
    ----------
    image
        :class:`~napari_cpgcn.io.hpa.HPAImage` or (4, Y, X) array (red, green, blue, yellow).
    cells
        (Y, X) integer cell labels of that image.
    nucleus_diameter
        As for the classical backend (None = estimated from the blue channel).
    """
    from napari_cpgcn.segmentation.classical import ClassicalParams, segment_nuclei_image

    data = np.asarray(getattr(image, "data", image))
    if data.ndim != 3 or data.shape[0] != 4 or data.shape[1:] != np.shape(cells):
        raise ValueError(f"image_qc needs a (4, Y, X) image matching the mask {np.shape(cells)}, "
                         f"got shape {data.shape}")
    nuclei = segment_nuclei_image(data, ClassicalParams(nucleus_diameter=nucleus_diameter))
    return mask_qc(np.asarray(cells), nuclei)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_qc_csv(path: str | Path, rows: dict[str, dict[str, Any]]) -> Path:
    """Write per-image QC rows (``{image_id: mask_qc(...)}``) as a CSV, atomically, sorted by id.

    Columns: :data:`QC_CSV_COLUMNS`; missing values are empty cells, booleans ``true``/``false``.
    """
    import csv
    import io

    from napari_cpgcn.io.atomic import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(QC_CSV_COLUMNS)
    for image_id in sorted(rows):
        row = rows[image_id]
        w.writerow([image_id] + [_cell(row.get(k)) for k in QC_CSV_COLUMNS[1:]])
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def _parse(value: str) -> Any:
    if value == "":
        return None
    if value in ("true", "false"):
        return value == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def read_qc_csv(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a ``qc.csv`` written by :func:`write_qc_csv` (``{}`` when the file does not exist)."""
    import csv

    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "image_id" not in reader.fieldnames:
            raise ValueError(f"{path} is not a QC table (no image_id column); delete it to rebuild it")
        rows = {}
        for rec in reader:
            rid = rec.pop("image_id")
            row = {k: _parse(v) for k, v in rec.items()}
            row["qc_note"] = rec.get("qc_note") or ""  # free text: never parsed as a number
            rows[rid] = row
    return rows


def qc_summary(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Folder-level numbers from per-image QC rows: images, cells, border share, flagged ids.

    Returns
    -------
    dict
        ``n_images``, ``n_cells`` (total), ``median_cells`` (per image), ``border_fraction``
        (of all cells), ``flagged`` (sorted image ids with ``check_masks``), ``empty``
        (image ids without cells).
    """
    counts = [int(r.get("n_cells") or 0) for r in rows.values()]
    border = sum(int(r.get("n_border_cells") or 0) for r in rows.values())
    total = sum(counts)
    return {
        "n_images": len(rows),
        "n_cells": total,
        "median_cells": float(np.median(counts)) if counts else 0.0,
        "border_fraction": border / total if total else 0.0,
        "flagged": sorted(i for i, r in rows.items() if r.get("check_masks")),
        "empty": sorted(i for i, r in rows.items() if not r.get("n_cells")),
    }
