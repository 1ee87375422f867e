"""Precompute the label statistics of the real Kaggle 2021 train.csv for the synthetic generator.

Writes ``src/napari_cpgcn/data/label_stats.json``: the distinct image-level label sets with
their counts (the generator samples label sets from this empirical distribution), the class
counts and the class co-occurrence matrix. The package reads only that JSON at run time.

Usage::

    python scripts/make_label_stats.py [../shared/data/kaggle2021-train-labels.csv]
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO.parent / "shared" / "data" / "kaggle2021-train-labels.csv"
OUT = REPO / "src" / "napari_cpgcn" / "data" / "label_stats.json"


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else DEFAULT_CSV
    sys.path.insert(0, str(REPO / "src"))
    from napari_cpgcn.io.tables import read_labels_csv

    table = read_labels_csv(src)
    y = table.labels.astype(np.int64)
    sets = collections.Counter(tuple(np.flatnonzero(row).tolist()) for row in y)
    items = sorted(sets.items(), key=lambda kv: (-kv[1], kv[0]))
    stats = {
        "source": src.name,
        "n_images": int(len(y)),
        "label_sets": [list(k) for k, _ in items],
        "counts": [int(c) for _, c in items],
        "class_counts": y.sum(0).tolist(),
        "cooccurrence": (y.T @ y).tolist(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(stats, separators=(",", ":")) + "\n")
    print(f"{len(y)} images, {len(items)} distinct label sets -> {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
