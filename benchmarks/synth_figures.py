"""Figures for docs/synthetic.md: a synthetic image beside a real one, and the 19 green patterns.

Usage::

    python benchmarks/synth_figures.py [--real ../shared/data/hpa-samples] [--out docs/images]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
REAL_ID = "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0"


def _resize(plane: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(plane).resize((side, side), Image.BILINEAR))


def _label(img: Image.Image, text: str) -> Image.Image:
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, 7 * len(text) + 6, 14], fill=(0, 0, 0))
    d.text((3, 2), text, fill=(255, 255, 255))
    return img


def _save_small(img: Image.Image, path: Path) -> None:
    """PNG with a 128-colour palette: docs images must stay < 300 KB."""
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "hpa-samples")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--side", type=int, default=384)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.synth import composite, generate_image

    side = args.side
    real = read_image(args.real, REAL_ID)
    real_small = np.stack([_resize(c, side) for c in real.data])
    syn = generate_image(3, size=512, labels=[0, 1, 2, 7])
    syn_small = np.stack([_resize(c, side) for c in syn.data])
    gap = np.full((side, 6, 3), 255, np.uint8)
    pair = np.concatenate([composite(real_small), gap, composite(syn_small)], axis=1)
    img = Image.fromarray(pair)
    _label(img, "real 000a6c98 (2048 px, 0|1|2|7)")
    ImageDraw.Draw(img)
    img2 = Image.fromarray(np.asarray(img).copy())
    _label_at = ImageDraw.Draw(img2)
    text = "synthetic seed 3 (512 px, 0|1|2|7)"
    _label_at.rectangle([side + 6, 0, side + 12 + 7 * len(text), 14], fill=(0, 0, 0))
    _label_at.text((side + 9, 2), text, fill=(255, 255, 255))
    _save_small(img2, args.out / "synth_vs_real.png")

    # One tile per class: the green channel around an expressing cell, plus the composite.
    tile = 120
    tiles = []
    for k in range(len(SHORT_NAMES)):
        im = generate_image(100 + k, size=512, labels=[k], heterogeneity=0.0)
        cells = im.cells
        expressing = 1 + np.flatnonzero(im.cell_labels[:, k]) if k != 18 else np.arange(1, im.n_cells + 1)
        areas = np.bincount(cells.ravel(), minlength=im.n_cells + 1)
        c = expressing[np.argmax(areas[expressing])]
        ys, xs = np.nonzero(cells == c)
        cy = int(np.clip(ys.mean() - tile // 2, 0, 512 - tile))
        cx = int(np.clip(xs.mean() - tile // 2, 0, 512 - tile))
        g = im.data[1, cy:cy + tile, cx:cx + tile].astype(np.float32)
        g = np.clip(g * 255.0 / max(np.percentile(g, 99.7), 30), 0, 255).astype(np.uint8)
        comp = composite(im.data[:, cy:cy + tile, cx:cx + tile])
        t = np.concatenate([np.repeat(g[..., None], 3, -1), comp], axis=0)
        tiles.append(np.asarray(_label(Image.fromarray(t), f"{k} {SHORT_NAMES[k]}")))
    tiles.append(np.zeros_like(tiles[0]))
    cols = 5
    rows = [np.concatenate(tiles[i:i + cols], axis=1) for i in range(0, 20, cols)]
    _save_small(Image.fromarray(np.concatenate(rows, axis=0)), args.out / "synth_classes.png")
    for p in ("synth_vs_real.png", "synth_classes.png"):
        print(f"{args.out / p}: {(args.out / p).stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
