"""Label tables: the Kaggle ``ID,Label`` CSV (labels joined by ``|``) as a multi-hot matrix."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cpgcn.classes import N_CLASSES, class_by_name
from napari_cpgcn.io.atomic import atomic_write_text

__all__ = ["LabelTable", "read_labels_csv", "write_labels_csv", "parse_label_string",
           "format_label_string"]


class LabelsCSVError(ValueError):
    """A labels CSV that cannot be used; the message names the file, the line and the fix."""


@dataclass
class LabelTable:
    """Image-level labels.

    Attributes
    ----------
    ids : list[str]
        Image ids in file order.
    labels : numpy.ndarray
        (n_images, 19) uint8 multi-hot matrix.
    """

    ids: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, image_id: str) -> np.ndarray:
        """The multi-hot vector of one image."""
        return self.labels[self.ids.index(image_id)]

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{image id: multi-hot vector}``."""
        return dict(zip(self.ids, self.labels, strict=True))

    def subset(self, ids: Iterable[str]) -> LabelTable:
        """The rows of the given ids, in that order."""
        index = {i: k for k, i in enumerate(self.ids)}
        ids = list(ids)
        return LabelTable(ids, self.labels[[index[i] for i in ids]])


def parse_label_string(s: str, *, where: str = "") -> list[int]:
    """``"8|5|0"`` → ``[8, 5, 0]``.

    Labels are joined by ``|``; each is a class id (0..18) or a class name (``Golgi apparatus``,
    case-insensitive, spaces included) or short name (``golgi``). A ``|``-free field of
    space-separated ids (``"8 5 0"``) is accepted too.
    """
    s = s.strip()
    if "|" not in s and " " in s and all(t.lstrip("-").isdigit() for t in s.split()):
        tokens = s.split()
    else:
        tokens = s.split("|")
    out: list[int] = []
    for tok in tokens:
        tok = " ".join(tok.split())  # "Golgi  apparatus " -> "Golgi apparatus"
        if not tok:
            continue
        if tok.lstrip("-").isdigit():
            k = int(tok)
            if not 0 <= k < N_CLASSES:
                raise LabelsCSVError(
                    f"{where}unknown class id {k}: the Kaggle 2021 classes are 0..{N_CLASSES - 1}. "
                    "A Kaggle 2018 file (28 classes, 'Id,Target') must be mapped to the 19 classes first."
                )
            out.append(k)
        else:
            try:
                out.append(class_by_name(tok).index)
            except KeyError:
                raise LabelsCSVError(f"{where}unknown class {tok!r}; use ids 0..{N_CLASSES - 1} or class names "
                                     "joined by '|' (e.g. 'Golgi apparatus|Nucleoplasm')") from None
    return out


def format_label_string(vec: Sequence[int] | np.ndarray) -> str:
    """Multi-hot vector → ``"0|5|8"``."""
    return "|".join(str(k) for k in np.flatnonzero(np.asarray(vec)))


def read_labels_csv(path: str | Path) -> LabelTable:
    """Read a Kaggle-format labels CSV (``ID,Label``, ``|``-joined class ids).

    Raises
    ------
    LabelsCSVError
        For missing columns, unknown class ids, duplicate ids or an empty file, naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise LabelsCSVError(f"{path} is empty; expected a header 'ID,Label' and one row per image")
        cols = [h.strip().lower() for h in header]
        if "id" not in cols or "label" not in cols:
            hint = (" This is the Kaggle 2018 format ('Id,Target', 28 classes), which uses other classes."
                    if "target" in cols else "")
            raise LabelsCSVError(f"{path}: header {header} lacks the columns 'ID' and 'Label'.{hint}")
        ci, cl = cols.index("id"), cols.index("label")
        ids: list[str] = []
        rows: list[list[int]] = []
        seen: dict[str, int] = {}
        for lineno, rec in enumerate(reader, start=2):
            if not rec or all(not x.strip() for x in rec):
                continue
            if len(rec) <= max(ci, cl):
                raise LabelsCSVError(f"{path}:{lineno}: expected 'ID,Label', got {rec}")
            iid = rec[ci].strip()
            if iid in seen:
                raise LabelsCSVError(f"{path}:{lineno}: image id {iid!r} listed twice (first on line {seen[iid]})")
            seen[iid] = lineno
            ids.append(iid)
            rows.append(parse_label_string(rec[cl], where=f"{path}:{lineno}: "))
    labels = np.zeros((len(ids), N_CLASSES), dtype=np.uint8)
    for r, ks in enumerate(rows):
        labels[r, ks] = 1
    return LabelTable(ids, labels)


def write_labels_csv(path: str | Path, table: LabelTable) -> None:
    """Write a Kaggle-format labels CSV atomically."""
    lines = ["ID,Label"] + [f"{i},{format_label_string(v)}" for i, v in zip(table.ids, table.labels, strict=True)]
    atomic_write_text(path, "\n".join(lines) + "\n")
