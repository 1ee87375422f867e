"""Are the 19 synthetic green patterns distinguishable per cell?

Makes single-class images (heterogeneity 0, every cell expresses the class; Negative cells of
class-18 images), computes a dozen hand-made per-cell features of the green channel (intensity
in nucleus / cytoplasm / cell edge, spottiness, ridge strength, ...) and trains a random forest
on some images, testing on others. High accuracy = the classes are separable from the pixels
of one cell; the confusion pairs show which patterns look alike.

Usage::

    python benchmarks/synth_separability.py [--per-class 6] [--size 256]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage as ndi


def cell_features(green: np.ndarray, cells: np.ndarray, nuclei: np.ndarray, scale: float) -> np.ndarray:
    """(n_cells, n_features) for cell ids 1..max; intensities relative to the cell's mean.

    ``scale`` = image side / 512, so filter sizes follow the cell size.
    """
    g = green.astype(np.float32)
    n = int(cells.max())
    idx = np.arange(1, n + 1)
    inside = cells > 0
    inner = ndi.binary_erosion(inside, iterations=max(1, round(4 * scale)))
    edge = inside & ~inner
    nuc = nuclei > 0
    cyto = inside & ~nuc

    def mean(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
        lab = np.where(mask, cells, 0)
        return ndi.sum_labels(img, lab, idx) / np.maximum(ndi.sum_labels(np.ones_like(img), lab, idx), 1)

    m_all = mean(g, inside)
    norm = np.concatenate([[1.0], np.maximum(m_all, 1.0)]).astype(np.float32)[cells]
    gn = g / norm  # each cell's green relative to its own mean
    s = max(scale, 0.25)
    dots = np.maximum(-ndi.gaussian_laplace(gn, 1.5 * s), 0)
    blobs = np.maximum(-ndi.gaussian_laplace(gn, 5 * s), 0)
    hyy = ndi.gaussian_filter(gn, 2 * s, order=(2, 0))
    hxx = ndi.gaussian_filter(gn, 2 * s, order=(0, 2))
    hxy = ndi.gaussian_filter(gn, 2 * s, order=(1, 1))
    ridge = np.sqrt(((hxx - hyy) ** 2) / 4 + hxy**2)  # anisotropic curvature: lines
    smooth = ndi.gaussian_filter(gn, 1.0 * s)
    feats = [
        np.log1p(m_all),
        mean(gn, nuc), mean(gn, cyto), mean(gn, edge), mean(gn, inner & cyto),
        np.sqrt(np.maximum(mean(gn * gn, inside) - 1, 0)),
        mean(dots, nuc), mean(dots, cyto), mean(blobs, nuc), mean(blobs, cyto),
        mean(ridge, cyto), mean(ridge, nuc),
        mean((smooth > 2).astype(np.float32), inside), mean((smooth > 4).astype(np.float32), inside),
        np.log1p(ndi.maximum(gn, cells, idx)),
    ]
    return np.stack(feats, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-class", type=int, default=6, help="images per class (half train, half test)")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()

    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import confusion_matrix

    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.synth import generate_image

    X = {"train": [], "test": []}
    y = {"train": [], "test": []}
    for k in range(19):
        for j in range(args.per_class):
            im = generate_image(1000 * k + j, size=args.size, labels=[k], heterogeneity=0.0,
                                mitosis_rate=0.0)
            f = cell_features(im.data[1], im.cells, im.nuclei, args.size / 512)
            keep = im.cell_labels[:, k].astype(bool)
            split = "train" if j < args.per_class // 2 else "test"
            X[split].append(f[keep])
            y[split].append(np.full(int(keep.sum()), k))
    Xtr, ytr = np.concatenate(X["train"]), np.concatenate(y["train"])
    Xte, yte = np.concatenate(X["test"]), np.concatenate(y["test"])
    clf = RandomForestClassifier(n_estimators=200, random_state=0, n_jobs=1).fit(Xtr, ytr)
    pred = clf.predict(Xte)
    acc = (pred == yte).mean()
    per_class = [(pred[yte == k] == k).mean() for k in range(19)]
    print(f"{len(ytr)} train cells, {len(yte)} test cells (different images), {Xtr.shape[1]} features")
    print(f"per-cell accuracy over 19 classes: {acc:.3f} (chance {1 / 19:.3f})")
    for k in range(19):
        print(f"{k:>2} {SHORT_NAMES[k]:<24} {per_class[k]:.2f}  (n={int((yte == k).sum())})")
    cm = confusion_matrix(yte, pred, labels=range(19))
    np.fill_diagonal(cm, 0)
    worst = np.dstack(np.unravel_index(np.argsort(cm.ravel())[::-1][:5], cm.shape))[0]
    print("most confused (true -> predicted, cells):",
          ", ".join(f"{SHORT_NAMES[a]}->{SHORT_NAMES[b]} {cm[a, b]}" for a, b in worst if cm[a, b]))


if __name__ == "__main__":
    main()
