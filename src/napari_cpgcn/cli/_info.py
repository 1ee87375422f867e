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
(and which one --device auto picks), and which ImageNet backbone weights training would use:
a file in the torch hub cache (TORCH_HOME moves it), else a download from torchvision's URL
(or the mirror in NAPARI_CPGCN_WEIGHTS_URL / --imagenet-weights URL) when the server answers,
else none (offline: random init). The server is only asked (HEAD, within
NAPARI_CPGCN_WEIGHTS_TIMEOUT seconds, default 5); info downloads nothing. Cellpose models are
looked for in CELLPOSE_LOCAL_MODELS_PATH or ~/.cellpose/models. --json prints the same as JSON.
"""


COMMAND = "info"
HELP = "versions, devices and which weights would be used"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--imagenet-weights", default="imagenet", metavar="imagenet|URL",
                   help="the weight source to check: 'imagenet' (default; torchvision's URL or "
                        "NAPARI_CPGCN_WEIGHTS_URL) or a mirror URL")
    p.add_argument("--no-network", dest="network", action="store_false",
                   help="report cache misses as downloads without asking the server")


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


def _imagenet_weights(source: str = "imagenet", network: bool = True) -> dict:
    import torch

    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    out: dict = {"folder": str(ckpt_dir), "TORCH_HOME": os.environ.get("TORCH_HOME"), "source": source,
                 "NAPARI_CPGCN_WEIGHTS_URL": os.environ.get("NAPARI_CPGCN_WEIGHTS_URL"),
                 "found": {}, "plan": {}}
    try:
        from napari_cpgcn.models.backbone import (
            BACKBONES,
            find_imagenet_weights,
            imagenet_weight_candidates,
        )
        from napari_cpgcn.models.weights import WeightsDownloadError, plan_imagenet_weights
    except ImportError:  # pragma: no cover - models not installed
        return out
    probes: dict = {}  # an unreachable host is asked once, not once per backbone
    for name in BACKBONES:
        try:
            found = find_imagenet_weights(name) if source == "imagenet" else None
            out["found"][name] = str(found) if found else None
            if not found:
                out.setdefault("expected", {})[name] = imagenet_weight_candidates(name)[0]
        except Exception as e:  # a backbone unknown to this torchvision
            out["found"][name] = f"n/a ({type(e).__name__})"
            continue
        try:
            d = plan_imagenet_weights(name, source, network=network, probes=probes)
        except (WeightsDownloadError, ValueError) as e:  # a mirror without the file, an unverifiable URL
            out["plan"][name] = {"status": "refused", "path": None, "url": None, "reason": str(e),
                                 "size": None, "message": f"{name}: refused: {e}"}
            continue
        out["plan"][name] = {"status": d.status, "path": str(d.path) if d.path else None, "url": d.url,
                             "reason": d.reason or None, "size": d.size, "message": d.message()}
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


def collect(imagenet_source: str = "imagenet", network: bool = True) -> dict:
    """Everything ``info`` reports, as a plain dict (``imagenet_source``, ``network``: see
    :func:`napari_cpgcn.models.weights.plan_imagenet_weights`)."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in PACKAGES},
        "devices": _devices(),
        "imagenet_weights": _imagenet_weights(imagenet_source, network),
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
    mirror = (f"--imagenet-weights {w['source']}" if w["source"] != "imagenet" else
              f"NAPARI_CPGCN_WEIGHTS_URL={w['NAPARI_CPGCN_WEIGHTS_URL']}" if w.get("NAPARI_CPGCN_WEIGHTS_URL")
              else "torchvision's URLs; NAPARI_CPGCN_WEIGHTS_URL sets a mirror")
    lines.append(f"ImageNet weights: the torch hub cache {w['folder']} (TORCH_HOME moves it), else a "
                 f"download ({mirror})")
    for plan in w["plan"].values():
        lines.append(f"  {plan['message']}")
    for name, found in w["found"].items():
        if name not in w["plan"]:
            lines.append(f"  {name}: {found}")
    c = info["cellpose_models"]
    lines.append("")
    lines.append(f"cellpose models are looked for in {c['folder']} (CELLPOSE_LOCAL_MODELS_PATH moves it)")
    lines.append(f"  files: {', '.join(c['files']) or 'none'}")
    if c.get("note"):
        lines.append(f"  {c['note']}")
    lines.append("")
    lines.append("info downloads nothing; training fetches the ImageNet weights it needs (offline: it "
                 "starts from random weights and says so). The classical segmentation needs no weights.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from napari_cpgcn.cli import EXIT_OK

    info = collect(args.imagenet_weights, args.network)
    # Results go to stdout (this is a report command); logging stays for diagnostics.
    sys.stdout.write((json.dumps(info, indent=1) if args.json else _format(info)) + "\n")
    return EXIT_OK
