"""Nucleus and cell sizes: synthetic images vs the real HPA samples (all at 512² scale).

Nuclei: Otsu threshold of the blue channel, connected components > 150 px. Cells: the
HPA-Cell-Segmentation masks shipped with the real samples, the truth masks for synthetic ones.

Usage::

    python benchmarks/synth_morphology.py [--real ../shared/data/hpa-samples] [--n 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REAL = {"000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0": True, "b6a469d8-bbad-11e8-b2ba-ac1f6b6435d0": True,
        "837e738c-bba8-11e8-b2ba-ac1f6b6435d0": False}


def measure_image(blue: np.ndarray, cells: np.ndarray | None) -> dict[str, float]:
    from skimage import filters, measure

    lab = measure.label(blue > filters.threshold_otsu(blue))
    nuc = [r for r in measure.regionprops(lab) if r.area > 150]
    out = {"nuclei": len(nuc),
           "nuc_major": float(np.median([r.axis_major_length for r in nuc])),
           "nuc_minor": float(np.median([r.axis_minor_length for r in nuc]))}
    if cells is not None:
        cp = [r for r in measure.regionprops(cells.astype(np.int32)) if r.area > 300]
        out.update(cells=len(cp), cell_area=float(np.median([r.area for r in cp])),
                   cell_major=float(np.median([r.axis_major_length for r in cp])),
                   cell_minor=float(np.median([r.axis_minor_length for r in cp])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "hpa-samples")
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()

    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.synth import generate_image

    cols = ["nuclei", "nuc_major", "nuc_minor", "cells", "cell_area", "cell_major", "cell_minor"]
    print(f"{'image':<22}" + "".join(f"{c:>11}" for c in cols))

    def row(name: str, m: dict[str, float]) -> None:
        print(f"{name:<22}" + "".join(f"{m[c]:>11.0f}" if c in m else f"{'-':>11}" for c in cols))

    for iid, has_mask in REAL.items():
        data = read_image(args.real, iid).data
        side = data.shape[-1]
        blue = np.asarray(Image.fromarray(data[2]).resize((512, 512), Image.BILINEAR)) if side != 512 else data[2]
        cells = None
        if has_mask:
            cells = np.asarray(Image.open(args.real / f"{iid}_predictedmask.png").resize((512, 512), Image.NEAREST))
        row(f"real {iid[:8]}", measure_image(blue, cells))
    ms = [measure_image(im.data[2], im.cells)
          for im in (generate_image(s, size=512) for s in range(args.n))]
    row(f"synthetic (median {args.n})", {c: float(np.median([m[c] for m in ms])) for c in cols})
    lo = {c: float(np.percentile([m[c] for m in ms], 10)) for c in cols}
    hi = {c: float(np.percentile([m[c] for m in ms], 90)) for c in cols}
    row("synthetic 10th pct", lo)
    row("synthetic 90th pct", hi)


if __name__ == "__main__":
    main()
