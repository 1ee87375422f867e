"""Benchmark cell segmentation: accuracy against reference masks, seconds per image, peak memory.

Rows:
* every real image in ../shared/data/hpa-samples with an HPA reference mask
  (``*_predictedmask.png``, made by the HPA-Cell-Segmentation U-Nets): F1 / precision /
  recall at IoU >= 0.6 and mean matched IoU, for the classical backend (default settings and
  full resolution);
* a synthetic set from :mod:`napari_cpgcn.synth` (its true cell masks as reference);
* scale rows: a real 2048² image resized to 512² and 3072² (the HPA size range);
* cellpose (cyto3 architecture) with RANDOM weights: timing only, its masks mean nothing.

Each measurement runs in a fresh Python process so that "peak RSS" is the peak of that one
job (imports + reading the image + segmenting), not of the whole benchmark.

Usage::

    nice python benchmarks/bench_segmentation.py [--n-synth 8] [--synth-size 512] [--no-cellpose]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("NAPARI_CPGCN_SHARED_DATA", REPO.parent / "shared" / "data")) / "hpa-samples"


# --------------------------------------------------------------------------- one job (child process)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def job(spec: dict) -> dict:
    """Run one measurement described by ``spec``; returns a result row."""
    import numpy as np

    from napari_cpgcn.evaluation.matching import match_summary
    from napari_cpgcn.segmentation import segment_cells

    kind = spec["kind"]
    ref = None
    if kind == "real":
        from PIL import Image

        from napari_cpgcn.io.hpa import read_image

        data = read_image(SAMPLES / f"{spec['image_id']}_blue.png").data
        mask = SAMPLES / f"{spec['image_id']}_predictedmask.png"
        ref = np.array(Image.open(mask)) if mask.exists() else None
        size = spec.get("resize")
        if size:
            from skimage.transform import resize

            data = np.stack([resize(c, (size, size), order=1, preserve_range=True, anti_aliasing=True)
                             .astype(data.dtype) for c in data])
            if ref is not None:
                ref = resize(ref, (size, size), order=0, preserve_range=True, anti_aliasing=False).astype(ref.dtype)
    elif kind == "synth":
        from napari_cpgcn.synth import generate_image

        s = generate_image(spec["seed"], size=spec["size"])
        data, ref = s.data, s.cells
    else:
        raise ValueError(kind)
    params = dict(spec.get("params", {}))
    tmpdir = None
    if spec["method"] == "cellpose":
        # Random-weight cyto3-architecture model saved as a local model file: timing only.
        import tempfile

        import torch
        from cellpose import models

        torch.set_num_threads(1)

        tmpdir = tempfile.mkdtemp()
        net = models.CellposeModel(gpu=False, pretrained_model=False)
        params["model"] = os.path.join(tmpdir, "random_weights_cp3")
        net.net.save_model(params["model"])
        params.setdefault("gpu", False)
    rss_before = _rss_mb()
    times, cpu = [], []
    for _ in range(spec.get("repeat", 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        labels = segment_cells(data, method=spec["method"], **params)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    row = {
        "name": spec["name"],
        "method": spec["method"] + (" (random weights)" if spec["method"] == "cellpose" else ""),
        "size": f"{data.shape[2]}x{data.shape[1]}",
        "seconds": min(times),
        "seconds_first": times[0],
        "cpu_seconds": min(cpu),
        "n_pred": int(len(np.unique(labels)) - (1 if (labels == 0).any() else 0)),
        "rss_before_mb": rss_before,
        "peak_rss_mb": _rss_mb(),
    }
    if ref is not None and spec["method"] != "cellpose":
        row.update(match_summary(labels, ref, threshold=0.6).as_dict())
    if tmpdir:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
    return row


def run_in_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"job {spec['name']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- table


def fmt_row(r: dict) -> str:
    f1 = f"{r['f1']:.3f}" if "f1" in r else "—"
    p = f"{r['precision']:.2f}" if "precision" in r else "—"
    rc = f"{r['recall']:.2f}" if "recall" in r else "—"
    miou = f"{r['mean_iou']:.3f}" if "mean_iou" in r else "—"
    ntrue = str(r["n_true"]) if "n_true" in r else "—"
    return (f"| {r['name']} | {r['method']} | {r['size']} | {f1} | {p} | {rc} | {miou} | "
            f"{r['n_pred']} / {ntrue} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_rss_mb']:.0f} |")


HEADER = ("| image | method | size | F1@0.6 | precision | recall | mean IoU | cells pred / true | "
          "seconds | CPU s | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--n-synth", type=int, default=8, help="synthetic images (default 8)")
    ap.add_argument("--synth-size", type=int, default=512, help="synthetic image side (default 512)")
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats per image, best kept (default 3)")
    ap.add_argument("--no-cellpose", action="store_true", help="skip the random-weight cellpose timing rows")
    ap.add_argument("--full-3072", action="store_true",
                    help="also segment the 3072² image at full resolution (downscale=1; minutes)")
    ap.add_argument("--json", help="also write all rows to this JSON file")
    args = ap.parse_args(argv)
    if args.job:
        print(json.dumps(job(json.loads(args.job))))
        return 0

    specs: list[dict] = []
    refs = sorted(SAMPLES.glob("*_predictedmask.png"))
    if not refs:
        print(f"no reference masks in {SAMPLES}; real-image rows skipped", file=sys.stderr)
    for m in refs:
        iid = m.name.replace("_predictedmask.png", "")
        short = iid[:8]
        specs.append(dict(kind="real", image_id=iid, name=short, method="classical", repeat=args.repeat))
        specs.append(dict(kind="real", image_id=iid, name=f"{short} (downscale=1)", method="classical",
                          params={"downscale": 1}))
    if refs:
        iid = refs[0].name.replace("_predictedmask.png", "")
        for size in (512, 3072):
            specs.append(dict(kind="real", image_id=iid, name=f"{iid[:8]} resized", method="classical",
                              resize=size, repeat=args.repeat))
        if args.full_3072:
            specs.append(dict(kind="real", image_id=iid, name=f"{iid[:8]} resized (downscale=1)",
                              method="classical", resize=3072, params={"downscale": 1}))
    for seed in range(args.n_synth):
        specs.append(dict(kind="synth", seed=seed, size=args.synth_size, name=f"synth seed {seed}",
                          method="classical", repeat=1))
    if not args.no_cellpose and refs:
        iid = refs[0].name.replace("_predictedmask.png", "")
        specs.append(dict(kind="real", image_id=iid, name=iid[:8], method="cellpose", repeat=2))
        specs.append(dict(kind="synth", seed=0, size=args.synth_size, name="synth seed 0", method="cellpose", repeat=2))

    rows = []
    print(HEADER, flush=True)
    for spec in specs:
        r = run_in_child(spec)
        rows.append(r)
        print(fmt_row(r), flush=True)

    synth = [r for r in rows if r["name"].startswith("synth") and "f1" in r]
    real = [r for r in rows if not r["name"].startswith("synth") and "f1" in r
            and r["name"].find("(") < 0 and "resized" not in r["name"]]
    print()
    if real:
        print(f"real images (classical, default): mean F1 {sum(r['f1'] for r in real) / len(real):.3f}, "
              f"mean IoU {sum(r['mean_iou'] for r in real) / len(real):.3f}, "
              f"mean {sum(r['seconds'] for r in real) / len(real):.2f} s/image "
              f"({sum(r['cpu_seconds'] for r in real) / len(real):.2f} CPU s)")
    if synth:
        tp = sum(r["tp"] for r in synth)
        npred = sum(r["n_pred"] for r in synth)
        ntrue = sum(r["n_true"] for r in synth)
        print(f"synthetic ({len(synth)} x {args.synth_size}²): mean F1 {sum(r['f1'] for r in synth) / len(synth):.3f}, "
              f"pooled F1 {2 * tp / max(npred + ntrue, 1):.3f}, "
              f"mean IoU {sum(r['mean_iou'] for r in synth) / len(synth):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
