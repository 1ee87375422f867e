"""How close are the synthetic image labels to the real Kaggle 2021 label statistics?

Generates N small synthetic images (labels do not depend on the image size) and compares the
class frequencies and the class co-occurrence with the real ``train.csv`` statistics stored in
``napari_cpgcn/data/label_stats.json``.

Usage::

    python benchmarks/synth_label_stats.py [--n 2000] [--heterogeneity 0.5]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--heterogeneity", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.synth import generate_image, load_label_stats

    stats = load_label_stats()
    real_f = np.asarray(stats["class_counts"], float) / stats["n_images"]
    real_c = np.asarray(stats["cooccurrence"], float) / stats["n_images"]

    seqs = np.random.SeedSequence(args.seed).spawn(args.n)
    y = np.stack([generate_image(s, size=64, heterogeneity=args.heterogeneity).image_labels
                  for s in seqs]).astype(float)
    syn_f = y.mean(0)
    syn_c = y.T @ y / len(y)

    iu = np.triu_indices(len(real_f), 1)
    r_f = np.corrcoef(real_f, syn_f)[0, 1]
    r_c = np.corrcoef(real_c[iu], syn_c[iu])[0, 1]
    # Conditional co-occurrence P(j | i), where both are estimated from enough images.
    cond_r = real_c / np.maximum(np.diag(real_c)[:, None], 1e-9)
    cond_s = syn_c / np.maximum(np.diag(syn_c)[:, None], 1e-9)
    ok = np.diag(syn_c) * len(y) >= 20
    mask = ok[:, None] & ~np.eye(len(real_f), dtype=bool)
    mae_cond = np.abs(cond_r - cond_s)[mask].mean()
    print(f"{args.n} synthetic images (H={args.heterogeneity}) vs {stats['n_images']} real")
    print(f"{'class':<24} {'real freq':>9} {'synth freq':>10}")
    for k, name in enumerate(SHORT_NAMES):
        print(f"{k:>2} {name:<21} {real_f[k]:>9.3f} {syn_f[k]:>10.3f}")
    print(f"Pearson r, class frequencies:             {r_f:.4f}")
    print(f"Pearson r, pairwise co-occurrence (i<j):  {r_c:.4f}")
    print(f"mean |P(j|i) real - synth| (classes >=20 images): {mae_cond:.4f}")
    print(f"labels per image: real {np.asarray(stats['class_counts']).sum() / stats['n_images']:.2f}, "
          f"synth {y.sum(1).mean():.2f}")

    # Weak supervision: how many cells express each image class, by heterogeneity.
    print(f"\n{'H':>5} {'expressing fraction':>20} {'negative cells':>15}   (40 images at 128²)")
    for h in (0.0, 0.25, 0.5, 0.75, 1.0):
        expressing = pairs = neg = cells = 0
        for seed in range(40):
            im = generate_image(seed, size=128, heterogeneity=h)
            classes = np.flatnonzero(im.image_labels[:18])
            if len(classes):
                expressing += int(im.cell_labels[:, classes].sum())
                pairs += len(classes) * im.n_cells
                neg += int(im.cell_labels[:, 18].sum())
                cells += im.n_cells
        print(f"{h:>5.2f} {expressing / pairs:>20.3f} {neg / cells:>15.3f}")


if __name__ == "__main__":
    main()
