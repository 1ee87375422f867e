"""``PRED_DIR/corrections.csv``: the per-cell labels a biologist confirmed or corrected.

Columns ``image_id,cell_id,labels,who,when``: ``labels`` are ``|``-joined class ids
(:data:`napari_cpgcn.classes.CLASS_NAMES` order; 18 = Negative, which excludes every other
class), ``who`` / ``when`` are optional (empty allowed; ``when`` is ISO-8601 UTC).

The file is a log: every confirmation appends a row, the last row of a cell is its current
labels, and :meth:`CorrectionStore.undo` removes the last row (so a re-correction undone brings
the earlier one back). Every change rewrites the whole file through
:func:`napari_cpgcn.io.atomic.atomic_write` with ``fsync``, so a crash or a killed viewer leaves
either the old or the new file, never half a row, and a confirmed correction is on disk when
:meth:`~CorrectionStore.add` returns.

No Qt, no torch.
"""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from napari_cpgcn.classes import N_CLASSES, NEGATIVE, SHORT_NAMES

__all__ = ["CORRECTIONS_FILE", "COLUMNS", "CorrectionError", "Correction", "parse_labels", "format_labels",
           "check_pred_dir", "read_corrections", "CorrectionStore"]

CORRECTIONS_FILE = "corrections.csv"
COLUMNS: tuple[str, ...] = ("image_id", "cell_id", "labels", "who", "when")


class CorrectionError(ValueError):
    """A corrections file (or a new correction) that cannot be used; the message names the file,
    the row and the fix."""


@dataclass(frozen=True)
class Correction:
    """One confirmed cell: its image, label id in the image's mask, and class ids."""

    image_id: str
    cell_id: int
    labels: tuple[int, ...]
    who: str = ""
    when: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.image_id, int(self.cell_id))

    def multi_hot(self) -> np.ndarray:
        y = np.zeros(N_CLASSES, np.float32)
        y[list(self.labels)] = 1.0
        return y

    @property
    def short_names(self) -> str:
        return "|".join(SHORT_NAMES[k] for k in self.labels)


def format_labels(labels: Iterable[int]) -> str:
    return "|".join(str(int(k)) for k in sorted(set(int(k) for k in labels)))


def parse_labels(text: str | Iterable[int], where: str = "labels") -> tuple[int, ...]:
    """Class ids from ``"0|7"`` (or an iterable of ints), checked: known ids, at least one, and
    Negative (18) alone. ``where`` names the file and row in the error."""
    if isinstance(text, str):
        parts = [t.strip() for t in text.split("|") if t.strip()]
        try:
            ids = [int(t) for t in parts]
        except ValueError:
            raise CorrectionError(f"{where}: labels {text!r} are not '|'-joined class ids (e.g. 0|7, or 18 for "
                                  "Negative)") from None
    else:
        ids = [int(k) for k in text]
    if not ids:
        raise CorrectionError(f"{where}: no labels; give at least one class id, or 18 (Negative)")
    bad = [k for k in ids if not 0 <= k < N_CLASSES]
    if bad:
        raise CorrectionError(f"{where}: unknown class id {bad[0]}; class ids are 0-{N_CLASSES - 1} "
                              f"({NEGATIVE} = Negative), see `napari-cpgcn info --classes`")
    ids = sorted(set(ids))
    if NEGATIVE in ids and len(ids) > 1:
        raise CorrectionError(f"{where}: Negative ({NEGATIVE}) excludes every other class, got {format_labels(ids)}; "
                              "keep either Negative or the other classes")
    return tuple(ids)


def check_pred_dir(pred_dir: str | Path) -> Path:
    """The prediction folder, checked to be one (``masks/`` written by ``napari-cpgcn predict``)."""
    p = Path(pred_dir).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"prediction folder {p} does not exist; give the --out folder of "
                                "`napari-cpgcn predict`")
    if not (p / "masks").is_dir():
        raise FileNotFoundError(f"{p} is not a prediction folder: it has no masks/ (written by "
                                "`napari-cpgcn predict IMAGES --model RUN --out PRED_DIR`)")
    return p


class _MaskIds:
    """Cell ids of each image's predicted mask, read once."""

    def __init__(self, pred_dir: Path) -> None:
        self.pred_dir = pred_dir
        self._ids: dict[str, set[int]] = {}

    def __call__(self, image_id: str) -> set[int] | None:
        if image_id not in self._ids:
            from napari_cpgcn.io.masks import read_mask

            f = self.pred_dir / "masks" / f"{image_id}.tif"
            if not f.is_file():
                return None
            m = read_mask(f)
            self._ids[image_id] = set(np.unique(m).astype(int).tolist()) - {0}
        return self._ids[image_id]


def _check_cell(mask_ids: _MaskIds, image_id: str, cell_id: int, where: str) -> None:
    ids = mask_ids(image_id)
    if ids is None:
        raise CorrectionError(f"{where}: image {image_id!r} has no mask in {mask_ids.pred_dir / 'masks'}; "
                              "correct only images predicted into this folder")
    if int(cell_id) not in ids:
        raise CorrectionError(f"{where}: cell {cell_id} is not in the mask of {image_id} "
                              f"({mask_ids.pred_dir / 'masks' / (image_id + '.tif')}, cell ids "
                              f"{min(ids) if ids else '-'}-{max(ids) if ids else '-'}); remove the row or fix its cell_id")


def read_corrections(pred_dir: str | Path, *, validate: bool = True) -> list[Correction]:
    """Every row of ``PRED_DIR/corrections.csv`` in file order (empty when there is none).

    Raises
    ------
    FileNotFoundError
        ``pred_dir`` is not a prediction folder.
    CorrectionError
        A row with missing columns, an unknown class id, Negative with other classes, or (with
        ``validate``) a cell id not in the image's mask; the message names the file and row.
    """
    pred = check_pred_dir(pred_dir)
    path = pred / CORRECTIONS_FILE
    if not path.is_file():
        return []
    mask_ids = _MaskIds(pred)
    out: list[Correction] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("image_id", "cell_id", "labels") if c not in (reader.fieldnames or [])]
        if missing:
            raise CorrectionError(f"{path}: header lacks {missing}; expected {','.join(COLUMNS)}")
        for line, rec in enumerate(reader, start=2):
            where = f"{path} row {line}"
            iid = (rec.get("image_id") or "").strip()
            if not iid:
                raise CorrectionError(f"{where}: empty image_id")
            try:
                cid = int(str(rec.get("cell_id", "")).strip())
            except ValueError:
                raise CorrectionError(f"{where}: cell_id {rec.get('cell_id')!r} is not an integer label id") from None
            labels = parse_labels(str(rec.get("labels") or ""), where)
            if validate:
                _check_cell(mask_ids, iid, cid, where)
            out.append(Correction(iid, cid, labels, (rec.get("who") or "").strip(), (rec.get("when") or "").strip()))
    return out


def _render(rows: list[Correction]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for c in rows:
        w.writerow([c.image_id, int(c.cell_id), format_labels(c.labels), c.who, c.when])
    return buf.getvalue()


class CorrectionStore:
    """The corrections of one prediction folder, kept in memory and on disk after every change.

    Parameters
    ----------
    pred_dir
        A ``napari-cpgcn predict`` output folder (with ``masks/``).
    who
        Written into the ``who`` column of new rows (e.g. the user name).
    """

    def __init__(self, pred_dir: str | Path, who: str = "") -> None:
        self.pred_dir = check_pred_dir(pred_dir)
        self.path = self.pred_dir / CORRECTIONS_FILE
        self.who = who
        self._lock = threading.Lock()
        self._mask_ids = _MaskIds(self.pred_dir)
        self.rows: list[Correction] = read_corrections(self.pred_dir)

    def reload(self) -> None:
        with self._lock:
            self.rows = read_corrections(self.pred_dir)

    def _save(self, rows: list[Correction]) -> None:
        from napari_cpgcn.io.atomic import atomic_write

        text = _render(rows)

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                fh.write(text)

        atomic_write(self.path, write, fsync=True)

    def add(self, image_id: str, cell_id: int, labels: str | Iterable[int], who: str | None = None) -> Correction:
        """Record (and save at once) the labels of one cell; returns the new row."""
        labels_t = parse_labels(labels, f"correction of {image_id} cell {cell_id}")
        _check_cell(self._mask_ids, image_id, int(cell_id), f"correction for {self.path}")
        c = Correction(str(image_id), int(cell_id), labels_t, self.who if who is None else who,
                       datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        with self._lock:
            rows = [*self.rows, c]
            self._save(rows)
            self.rows = rows
        return c

    def undo(self) -> Correction | None:
        """Remove the last row (saved at once); returns it, or None when there is nothing to undo."""
        with self._lock:
            if not self.rows:
                return None
            rows = self.rows[:-1]
            self._save(rows)
            last, self.rows = self.rows[-1], rows
            return last

    def current(self) -> dict[tuple[str, int], Correction]:
        """The current labels of every corrected cell (its last row)."""
        return {c.key: c for c in self.rows}

    def for_image(self, image_id: str) -> dict[int, Correction]:
        return {cid: c for (iid, cid), c in self.current().items() if iid == image_id}

    def __len__(self) -> int:
        return len(self.current())
