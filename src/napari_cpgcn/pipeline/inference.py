"""Load a trained image model and predict image-level probabilities and class maps.

``load_image_model`` reads a checkpoint safely (``torch.load(weights_only=True)``, integrity
digest) and refuses one made for another class set, backbone or model kind with a clear
message. ``predict_images`` runs batched on any device and returns probabilities (N, C) and
per-class maps upsampled to each image's size — the CPM maps (or classic CAMs for ``cnn`` /
``mlgcn``), the per-location class score, or Grad-CAM.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from napari_cpgcn.training.datasets import resize_image
from napari_cpgcn.training.engine import resolve_device

__all__ = ["predict_images", "predict_crops", "CAM_METHODS"]

log = logging.getLogger(__name__)

CAM_METHODS = ("model", "score", "gradcam")


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
    from napari_cpgcn.models.cpgcn import normalize_cams, resize_cams

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
            if target is not None:
                c = resize_cams(c, target)
            cams_all.append(c[0].cpu().numpy().astype(np.float32))
    probs = np.concatenate(probs_all) if probs_all else np.zeros((0, getattr(model, "n_classes", 19)), np.float32)
    if cams_all and len({c.shape for c in cams_all}) == 1:
        return probs, np.stack(cams_all)
    return probs, cams_all


def predict_crops(model, crops: np.ndarray, device, batch_size: int = 64) -> np.ndarray:
    """Sigmoid probabilities (n, C) of float crops (n, 4, S, S) in [0, 1]."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[i:i + batch_size], dtype=np.float32)).to(device)
            out.append(torch.sigmoid(model(x).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.n_classes), np.float32)


