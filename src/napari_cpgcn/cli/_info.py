"""``napari-cpgcn info``: versions, compute devices and where model weights are looked for."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

log = logging.getLogger("napari_cpgcn.cli.info")

#: Packages whose versions are reported (read from the installed metadata, not imported).
PACKAGES = ("napari-cpgcn", "numpy", "scipy", "scikit-image", "scikit-learn", "pandas", "tifffile",
            "pillow", "pycocotools", "torch", "torchvision", "cellpose", "napari", "magicgui",
            "qtpy", "PyQt6", "dask", "distributed", "dask-jobqueue", "tqdm")

DESCRIPTION = """\
Print the versions of napari-cpgcn and its main dependencies, the compute devices torch sees
(and which one --device auto picks), and the folders where weights are looked for: ImageNet
backbone weights in the torch hub cache (TORCH_HOME), cellpose models in
CELLPOSE_LOCAL_MODELS_PATH or ~/.cellpose/models. Nothing is downloaded, ever: put weight files
there to use them. --json prints the same as JSON.
"""


def register(subparsers) -> None:
    from napari_cpgcn.cli import add_common_arguments

    p = subparsers.add_parser("info", help="versions, devices and where weights are looked for",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_common_arguments(p)
    p.set_defaults(func=run)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> dict:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        return {"error": f"torch not importable: {e}"}
    info: dict = {"cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                  "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if info["cuda"]:
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        from napari_cpgcn.training.engine import resolve_device

        info["auto"] = str(resolve_device("auto"))
    except ImportError:  # pragma: no cover
        info["auto"] = "cuda" if info["cuda"] else ("mps" if info["mps"] else "cpu")
    return info


def _imagenet_weights() -> dict:
    import torch

    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    out: dict = {"folder": str(ckpt_dir), "TORCH_HOME": os.environ.get("TORCH_HOME"), "found": {}}
    try:
        from napari_cpgcn.models.backbone import (
            BACKBONES,
            find_imagenet_weights,
            imagenet_weight_candidates,
        )
    except ImportError:  # pragma: no cover - models not installed
        return out
    for name in BACKBONES:
        try:
            found = find_imagenet_weights(name)
            out["found"][name] = str(found) if found else None
            if not found:
                out.setdefault("expected", {})[name] = imagenet_weight_candidates(name)[0]
        except Exception as e:  # a backbone unknown to this torchvision
            out["found"][name] = f"n/a ({type(e).__name__})"
    return out


def _cellpose_models() -> dict:
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    folder = Path(env) if env else Path.home() / ".cellpose" / "models"
    out: dict = {"folder": str(folder), "CELLPOSE_LOCAL_MODELS_PATH": env,
                 "cellpose": _version("cellpose")}
    if out["cellpose"] is None:
        out["note"] = "cellpose not installed: pip install 'napari-cpgcn[cellpose]'"
    out["files"] = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return out


def collect() -> dict:
    """Everything ``info`` reports, as a plain dict."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in PACKAGES},
        "devices": _devices(),
        "imagenet_weights": _imagenet_weights(),
        "cellpose_models": _cellpose_models(),
    }


def _format(info: dict) -> str:
    lines = [f"python        {info['python']} ({info['platform']})"]
    for k, v in info["versions"].items():
        lines.append(f"{k:<14}{v or '-'}")
    d = info["devices"]
    lines.append("")
    lines.append(f"device (auto) {d.get('auto')}   cuda: {d.get('cuda')}   mps: {d.get('mps')}   "
                 f"cpu threads: {d.get('cpu_threads')}")
    for i, name in enumerate(d.get("cuda_devices", [])):
        lines.append(f"  cuda:{i}      {name}")
    w = info["imagenet_weights"]
    lines.append("")
    lines.append(f"ImageNet weights are looked for in {w['folder']} (torch hub cache; TORCH_HOME moves it)")
    for name, path in w["found"].items():
        hint = w.get("expected", {}).get(name)
        lines.append(f"  {name:<19}{path or 'not found' + (f' (file: {hint})' if hint else '')}")
    c = info["cellpose_models"]
    lines.append("")
    lines.append(f"cellpose models are looked for in {c['folder']} (CELLPOSE_LOCAL_MODELS_PATH moves it)")
    lines.append(f"  files: {', '.join(c['files']) or 'none'}")
    if c.get("note"):
        lines.append(f"  {c['note']}")
    lines.append("")
    lines.append("Nothing is downloaded: without weights, backbones train from scratch and the "
                 "classical segmentation needs none.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from napari_cpgcn.cli import EXIT_OK

    info = collect()
    # Results go to stdout (this is a report command); logging stays for diagnostics.
    sys.stdout.write((json.dumps(info, indent=1) if args.json else _format(info)) + "\n")
    return EXIT_OK
