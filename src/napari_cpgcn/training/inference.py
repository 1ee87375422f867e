"""Load a trained image model and predict image-level probabilities and class maps.

``load_image_model`` reads a checkpoint safely (``torch.load(weights_only=True)``, integrity
digest) and refuses one made for another class set, backbone or model kind with a clear
message. ``predict_images`` runs batched on any device and returns probabilities (N, C) and
per-class maps upsampled to each image's size — the CPM maps (or classic CAMs for ``cnn`` /
``mlgcn``), the per-location class score, or Grad-CAM.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_cpgcn.classes import SHORT_NAMES
from napari_cpgcn.training.config import ImageModelConfig
from napari_cpgcn.training.datasets import resize_image
from napari_cpgcn.training.engine import CheckpointError, load_checkpoint, resolve_device

__all__ = ["load_image_model", "predict_images", "resolve_checkpoint", "CAM_METHODS"]

log = logging.getLogger(__name__)

CAM_METHODS = ("model", "score", "gradcam")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file or a run folder (``best.pt``, else ``latest.pt``; also
    ``image_model/`` inside a pipeline run)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for d in (p, p / "image_model"):
            for name in ("best.pt", "latest.pt"):
                if (d / name).is_file():
                    return d / name
        raise FileNotFoundError(f"{p} holds no best.pt or latest.pt (nor image_model/ with them); "
                                "train first with napari-cpgcn train-image or give a .pt file")
    raise FileNotFoundError(f"checkpoint {p} does not exist")


def load_image_model(path: str | Path, device: str | torch.device = "auto", *,
                     classes: Sequence[str] | None = tuple(SHORT_NAMES), backbone: str | None = None):
    """Load an image model checkpoint.

    Parameters
    ----------
    path
        ``.pt`` file or run folder.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` ...
    classes
        Class short names the caller needs (None: accept any).
    backbone
        Required backbone (None: accept any).

    Returns
    -------
    model, config
        The model in eval mode on ``device`` (with ``image_size`` and ``class_names``
        attributes) and its :class:`ImageModelConfig`.

    Raises
    ------
    CheckpointError
        Corrupt, modified or foreign file, or made for other classes / another backbone.
    """
    from napari_cpgcn.models import build_image_model

    path = resolve_checkpoint(path)
    expected = {"model": "cpgcn-image"}
    if classes is not None:
        expected["classes"] = list(classes)
    if backbone is not None:
        expected["backbone"] = backbone
    ckpt = load_checkpoint(path, map_location="cpu", expected_meta=expected)
    try:
        config = ImageModelConfig.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its configuration cannot be read ({e})") from e
    meta = ckpt["meta"]
    for key in ("backbone", "variant", "image_size"):
        if meta.get(key) != getattr(config, key):
            raise CheckpointError(f"{path}: metadata and configuration disagree on {key}; the file was modified")
    model = build_image_model(config, weights=None)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit a {config.variant}/{config.backbone} model "
                              f"({str(e).splitlines()[0]})") from e
    dev = resolve_device(device)
    model.to(dev).eval()
    model.image_size = config.image_size
    model.class_names = list(config.classes)
    return model, config


def _as_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img.float() if img.is_floating_point() else torch.from_numpy(
            img.numpy().astype(np.float32) / np.iinfo(img.numpy().dtype).max)
    if hasattr(img, "data") and not isinstance(img, np.ndarray):  # HPAImage
        img = img.data
    return img


def _gradcam(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        feats = model.forward_features(x)
    feats = feats.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits, _ = model.forward_head(feats)
        maps = []
        for c in range(logits.shape[1]):
            (g,) = torch.autograd.grad(logits[:, c].sum(), feats, retain_graph=c < logits.shape[1] - 1)
            w = g.mean(dim=(2, 3), keepdim=True)
            maps.append(F.relu((w * feats).sum(dim=1)))
    return logits.detach(), torch.stack(maps, dim=1).detach()


def _score_maps(model, feats: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        w = model.classifiers().to(feats.dtype)
        return torch.einsum("cd,bdhw->bchw", w, feats).clamp_min(0)


def predict_images(
    model,
    images: Iterable,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    image_size: int | None = None,
    cam_method: str = "model",
    cam_size: str | int | None = "image",
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray | list[np.ndarray]]:
    """Image-level probabilities and class maps for a sequence of images.

    Parameters
    ----------
    model
        From :func:`load_image_model` (or :func:`~napari_cpgcn.models.build_image_model`).
    images
        (4, Y, X) arrays (uint8/uint16 scaled by their range, floats taken as [0, 1]),
        :class:`~napari_cpgcn.io.hpa.HPAImage` objects, or a (N, 4, Y, X) array.
    batch_size
        Images per forward pass.
    device
        Default: the model's device.
    image_size
        Network input side; default ``model.image_size``.
    cam_method
        ``"model"`` (CPM maps, or CAMs for ``cnn``/``mlgcn``), ``"score"`` (per-location class
        score ⟨x_ij, w_c⟩, ReLU) or ``"gradcam"``.
    cam_size
        ``"image"``: upsample to each image's own size; an int: to that square size; None: keep
        the feature-map resolution.
    normalize
        Scale each (image, class) map to [0, 1] by its maximum.

    Returns
    -------
    probs : numpy.ndarray
        (N, C) float32.
    cams : numpy.ndarray or list of numpy.ndarray
        (N, C, Y, X) float32 when all images share a size, else a list of (C, Y, X).
    """
    from napari_cpgcn.models.cpgcn import normalize_cams

    if cam_method not in CAM_METHODS:
        raise ValueError(f"cam_method must be one of {CAM_METHODS}, got {cam_method!r}")
    size = int(image_size or getattr(model, "image_size", 0) or 512)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    imgs = [_as_tensor(im) for im in images]
    probs_all: list[np.ndarray] = []
    cams_all: list[np.ndarray] = []
    for start in range(0, len(imgs), batch_size):
        chunk = imgs[start:start + batch_size]
        shapes = [tuple(im.shape[-2:]) for im in chunk]
        x = torch.stack([resize_image(im, size) for im in chunk]).to(dev)
        if cam_method == "gradcam":
            logits, cams = _gradcam(model, x)
        else:
            with torch.no_grad():
                feats = model.forward_features(x)
                logits, cams = model.forward_head(feats)
                if cam_method == "score":
                    cams = _score_maps(model, feats)
        cams = normalize_cams(cams) if normalize else cams.float()
        probs_all.append(torch.sigmoid(logits.float()).cpu().numpy())
        for k, shp in enumerate(shapes):
            c = cams[k:k + 1]
            target = shp if cam_size == "image" else ((cam_size, cam_size) if cam_size else None)
            if target is not None and tuple(c.shape[-2:]) != tuple(target):
                c = F.interpolate(c, size=target, mode="bilinear", align_corners=False)
            cams_all.append(c[0].cpu().numpy().astype(np.float32))
    probs = np.concatenate(probs_all) if probs_all else np.zeros((0, getattr(model, "n_classes", 19)), np.float32)
    if cams_all and len({c.shape for c in cams_all}) == 1:
        return probs, np.stack(cams_all)
    return probs, cams_all
