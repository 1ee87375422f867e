"""Tiny random HPA-like data for the image-model tests (4 PNGs per image + a labels CSV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_tiny_dataset(root: Path, n_images: int = 12, size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/images/{ID}_{color}.png`` and ``root/train.csv``; class k (0..3) is a bright
    green band in the k-th quarter of the image, so the labels are learnable."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = ["ID,Label"]
    for i in range(n_images):
        iid = f"tiny{i:03d}"
        labels = sorted({int(rng.integers(0, 3))} | ({3} if rng.random() < 0.4 else set()))
        for color in ("red", "green", "blue", "yellow"):
            a = (rng.random((size, size)) * 60).astype(np.uint8)
            if color == "green":
                for k in labels:
                    a[k * size // 4:(k + 1) * size // 4, :] += 150
            Image.fromarray(a).save(img_dir / f"{iid}_{color}.png")
        rows.append(f"{iid},{'|'.join(map(str, labels))}")
    csv = root / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return img_dir, csv
