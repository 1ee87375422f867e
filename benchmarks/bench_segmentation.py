"""Benchmark cell segmentation: accuracy against reference masks, seconds per image, peak memory.

Rows, for the current code ("after") and, with ``--code both`` (default), for the classical
backend as it was before issue 15 ("before": the package tree of ``--before-ref``, extracted
with ``git archive`` into a temporary folder and put first on the child's ``PYTHONPATH``):

* every real image in ../shared/data/hpa-samples with an HPA reference mask
  (``*_predictedmask.png``, made by the HPA-Cell-Segmentation U-Nets): F1 / precision /
  recall at IoU >= 0.6, mean matched IoU, cells predicted / reference, default settings;
* synthetic truth from :mod:`napari_cpgcn.synth` on seeds that were **not** looked at while
  the parameters were chosen (default 100-119; the choice used 0-9), at the generator's
  default density (sparse, ~40 % of the field covered) and at ``--confluent-density``
  (default 3: ~90 % covered, touching nuclei);
* scale rows: a real 2048² image resized to 512² and 3072² (the HPA size range; peak RSS);
* cellpose (cyto3 architecture) with RANDOM weights: timing only, its masks mean nothing.

Each real/scale measurement runs in a fresh Python process, so "peak RSS" is the peak of
that one job (imports + reading the image + segmenting). Synthetic images run in one process
per (code, density) set. "seconds" is the best of ``--repeat`` calls of ``segment_cells``
(image reading excluded), "CPU s" the process CPU time of that call.

Usage (from the repository root, with this checkout's package first on the path)::

    PYTHONPATH=src nice python benchmarks/bench_segmentation.py [--code both|after|before] [--before-ref REV]
        [--seeds 100-119] [--synth-size 512] [--confluent-density 3] [--repeat 3] [--no-cellpose]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("NAPARI_CPGCN_SHARED_DATA", REPO.parent / "shared" / "data")) / "hpa-samples"
#: The last main commit with the pre-issue-15 classical backend (compactness watershed).
BEFORE_REF = "ef47e3a"


# --------------------------------------------------------------------------- jobs (child process)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(data, method: str, params: dict, repeat: int):
    from napari_cpgcn.segmentation import segment_cells

    times, cpu = [], []
    labels = None
    for _ in range(max(1, repeat)):
        t0, c0 = time.perf_counter(), time.process_time()
        labels = segment_cells(data, method=method, **params)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return labels, times, cpu


def _row(spec: dict, data, labels, ref, times, cpu, rss_before) -> dict:
    import numpy as np

    import napari_cpgcn
    from napari_cpgcn.evaluation.matching import match_summary

    row = {
        "module": str(Path(napari_cpgcn.__file__).parent),
        "name": spec["name"],
        "code": spec.get("code", "after"),
        "method": spec["method"] + (" (random weights)" if spec["method"] == "cellpose" else ""),
        "size": f"{data.shape[2]}x{data.shape[1]}",
        "seconds": min(times),
        "seconds_median": float(np.median(times)),
        "seconds_first": times[0],
        "cpu_seconds": min(cpu),
        "n_pred": int(len(np.unique(labels)) - (1 if (labels == 0).any() else 0)),
        "rss_before_mb": rss_before,
        "peak_rss_mb": _rss_mb(),
    }
    if ref is not None and spec["method"] != "cellpose":
        row.update(match_summary(labels, ref, threshold=0.6).as_dict())
    return row


def job(spec: dict) -> list[dict]:
    """Run one measurement described by ``spec``; returns result rows."""
    import numpy as np

    kind = spec["kind"]
    if kind == "synth":
        from napari_cpgcn.synth import generate_image

        rows = []
        for seed in spec["seeds"]:
            s = generate_image(seed, size=spec["size"], density=spec["density"])
            rss = _rss_mb()
            labels, times, cpu = _timed(s.data, spec["method"], spec.get("params", {}), spec.get("repeat", 1))
            rows.append(_row(dict(spec, name=f"synth d={spec['density']:g} seed {seed}"), s.data, labels,
                             s.cells, times, cpu, rss))
        return rows
    if kind != "real":
        raise ValueError(kind)
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
    params = dict(spec.get("params", {}))
    tmpdir = None
    if spec["method"] == "cellpose":
        # Random-weight cyto3-architecture model saved as a local model file: timing only.
        import torch
        from cellpose import models

        torch.set_num_threads(1)
        tmpdir = tempfile.mkdtemp()
        net = models.CellposeModel(gpu=False, pretrained_model=False)
        params["model"] = os.path.join(tmpdir, "random_weights_cp3")
        net.net.save_model(params["model"])
        params.setdefault("gpu", False)
    rss = _rss_mb()
    labels, times, cpu = _timed(data, spec["method"], params, spec.get("repeat", 1))
    row = _row(spec, data, labels, ref, times, cpu, rss)
    if tmpdir:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
    return [row]


def run_in_child(spec: dict, src: Path | None) -> list[dict]:
    env = dict(os.environ)
    if src is not None:  # the "before" code: its package tree first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"job {spec['name']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def extract_before(ref: str, dest: Path) -> Path:
    """The ``src`` tree of git revision ``ref`` (the package as it was), extracted under ``dest``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


# --------------------------------------------------------------------------- table


def fmt_row(r: dict) -> str:
    f1 = f"{r['f1']:.3f}" if "f1" in r else "—"
    p = f"{r['precision']:.2f}" if "precision" in r else "—"
    rc = f"{r['recall']:.2f}" if "recall" in r else "—"
    miou = f"{r['mean_iou']:.3f}" if "mean_iou" in r else "—"
    ntrue = str(r["n_true"]) if "n_true" in r else "—"
    return (f"| {r['name']} | {r['code']} | {r['method']} | {r['size']} | {f1} | {p} | {rc} | {miou} | "
            f"{r['n_pred']} / {ntrue} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_rss_mb']:.0f} |")


HEADER = ("| image | code | method | size | F1@0.6 | precision | recall | mean IoU | cells pred / ref | "
          "seconds | CPU s | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def summarise(rows: list[dict]) -> list[str]:
    lines = []
    for code in ("before", "after"):
        mods = sorted({r["module"] for r in rows if r["code"] == code})
        if mods:
            lines.append(f"{code}: code from {', '.join(mods)}")
        mine = [r for r in rows if r["code"] == code and "f1" in r]
        real = [r for r in mine if not r["name"].startswith("synth") and "resized" not in r["name"]]
        if real:
            lines.append(f"{code}: real images (default settings): mean F1 {sum(r['f1'] for r in real) / len(real):.3f}, "
                         f"mean IoU {sum(r['mean_iou'] for r in real) / len(real):.3f}, "
                         f"cells {sum(r['n_pred'] for r in real)} / {sum(r['n_true'] for r in real)}, "
                         f"{sum(r['seconds'] for r in real) / len(real):.2f} s/image "
                         f"({sum(r['cpu_seconds'] for r in real) / len(real):.2f} CPU s)")
        dens = sorted({r["name"].split()[1] for r in mine if r["name"].startswith("synth")})
        for d in dens:
            syn = [r for r in mine if r["name"].startswith(f"synth {d} ")]
            tp = sum(r["tp"] for r in syn)
            npred, ntrue = sum(r["n_pred"] for r in syn), sum(r["n_true"] for r in syn)
            lines.append(f"{code}: synthetic {d} ({len(syn)} images): mean F1 {sum(r['f1'] for r in syn) / len(syn):.3f} "
                         f"(min {min(r['f1'] for r in syn):.3f}), pooled F1 {2 * tp / max(npred + ntrue, 1):.3f}, "
                         f"mean IoU {sum(r['mean_iou'] for r in syn) / len(syn):.3f}, cells {npred} / {ntrue}, "
                         f"{sum(r['cpu_seconds'] for r in syn) / len(syn):.2f} CPU s/image")
    return lines


def write_figures(folder: Path, side: int = 768) -> list[Path]:
    """Overlays of the current classical masks (magenta) on the HPA reference masks (cyan),
    one PNG per reference image, ``side`` pixels wide."""
    import numpy as np
    from PIL import Image
    from skimage.morphology import dilation, disk
    from skimage.segmentation import find_boundaries

    from napari_cpgcn.evaluation.matching import match_summary
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.segmentation import segment_cells

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for m in sorted(SAMPLES.glob("*_predictedmask.png")):
        iid = m.name.replace("_predictedmask.png", "")
        image = read_image(SAMPLES / f"{iid}_blue.png")
        ref = np.array(Image.open(m))
        ours = segment_cells(image)
        d = image.data.astype(np.float32)

        def scaled(p):
            return np.clip(p / max(float(np.percentile(p, 99.7)), 1e-6), 0, 1)

        rgb = (np.stack([scaled(d[0]), scaled(d[1]), scaled(d[2])], -1) * 255).astype(np.uint8)
        width = max(1, round(rgb.shape[1] / side))  # lines stay ~1-2 px wide after shrinking
        rgb[dilation(find_boundaries(ref, mode="inner"), disk(width))] = (0, 255, 255)
        rgb[dilation(find_boundaries(ours, mode="inner"), disk(width))] = (255, 0, 255)
        out = Image.fromarray(rgb).resize((side, round(side * rgb.shape[0] / rgb.shape[1])), Image.LANCZOS)
        s = match_summary(ours, ref)
        path = folder / f"segmentation_real_{iid[:8]}.png"
        out.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)  # ~1/3 the bytes
        print(f"{path}: F1 {s.f1:.3f}, mean IoU {s.mean_iou:.3f}, {s.n_pred} / {s.n_true} cells")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--code", choices=("both", "after", "before"), default="both",
                    help="which classical backend to measure (default both)")
    ap.add_argument("--before-ref", default=BEFORE_REF,
                    help=f"git revision holding the 'before' code (default {BEFORE_REF})")
    ap.add_argument("--seeds", default="100-119", help="synthetic seeds (default 100-119; 0-9 were used to choose)")
    ap.add_argument("--synth-size", type=int, default=512, help="synthetic image side (default 512)")
    ap.add_argument("--confluent-density", type=float, default=3.0,
                    help="density of the confluent synthetic set (default 3; 0 = none)")
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats per real image, best kept (default 3)")
    ap.add_argument("--no-cellpose", action="store_true", help="skip the random-weight cellpose timing rows")
    ap.add_argument("--no-synth", action="store_true", help="skip the synthetic rows")
    ap.add_argument("--json", help="also write all rows to this JSON file")
    ap.add_argument("--figures", metavar="DIR",
                    help="only write overlay PNGs (ours magenta, HPA reference cyan) of the reference images to DIR")
    args = ap.parse_args(argv)
    if args.job:
        print(json.dumps(job(json.loads(args.job))))
        return 0
    if args.figures:
        write_figures(Path(args.figures))
        return 0

    refs = sorted(SAMPLES.glob("*_predictedmask.png"))
    if not refs:
        print(f"no reference masks in {SAMPLES}; real-image rows skipped", file=sys.stderr)
    codes = ["before", "after"] if args.code == "both" else [args.code]
    densities = [1.0] + ([args.confluent_density] if args.confluent_density else [])
    specs: list[dict] = []
    for code in codes:
        for m in refs:
            iid = m.name.replace("_predictedmask.png", "")
            specs.append(dict(kind="real", image_id=iid, name=iid[:8], method="classical", repeat=args.repeat, code=code))
        if refs:
            iid = refs[0].name.replace("_predictedmask.png", "")
            for size in (512, 3072):
                specs.append(dict(kind="real", image_id=iid, name=f"{iid[:8]} resized", method="classical",
                                  resize=size, repeat=args.repeat, code=code))
        if not args.no_synth:
            for d in densities:
                specs.append(dict(kind="synth", seeds=_seeds(args.seeds), size=args.synth_size, density=d,
                                  name=f"synth d={d:g}", method="classical", code=code))
    if not args.no_cellpose and refs and "after" in codes:
        iid = refs[0].name.replace("_predictedmask.png", "")
        specs.append(dict(kind="real", image_id=iid, name=iid[:8], method="cellpose", repeat=2, code="after"))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before_src = extract_before(args.before_ref, Path(tmp)) if "before" in codes else None
        print(HEADER, flush=True)
        for spec in specs:
            for r in run_in_child(spec, before_src if spec["code"] == "before" else None):
                rows.append(r)
                print(fmt_row(r), flush=True)
    print()
    for line in summarise(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
