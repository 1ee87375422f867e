"""Models: four-channel backbones, the class perception module, the label GCN and CP-GCN.

Importing this package imports torch.
"""

from __future__ import annotations

import numpy as np

from napari_cpgcn.models.backbone import (
    BACKBONES,
    DEFAULT_MEAN,
    DEFAULT_STD,
    Backbone,
    adapt_input_conv,
)
from napari_cpgcn.models.cpgcn import CPGCN, VARIANTS, normalize_cams
from napari_cpgcn.models.cpm import ClassPerceptionModule
from napari_cpgcn.models.gcn import GraphConvolution, LabelGCN, label_adjacency, load_label_vectors

__all__ = [
    "BACKBONES",
    "VARIANTS",
    "Backbone",
    "CPGCN",
    "ClassPerceptionModule",
    "GraphConvolution",
    "LabelGCN",
    "adapt_input_conv",
    "build_image_model",
    "label_adjacency",
    "load_label_vectors",
    "normalize_cams",
]


def build_image_model(config, label_matrix: np.ndarray | None = None, *, weights="config") -> CPGCN:
    """Build the image model described by an :class:`~napari_cpgcn.training.config.ImageModelConfig`.

    Parameters
    ----------
    config
        The model fields: ``backbone``, ``variant``, ``classes``, ``cpm_norm``, ``tau``,
        ``gcn_hidden``, ``gcn_activation``, ``gcn_normalize``, ``mean``, ``std``, ``imagenet_weights``.
    label_matrix
        (n_images, C) multi-hot *training* labels for the label graph; ``None`` leaves an
        identity graph (the right one is then loaded from a checkpoint).
    weights
        ``"config"`` uses ``config.imagenet_weights``; ``None`` forces random init (used when a
        checkpoint will overwrite the weights anyway).
    """
    n_classes = len(config.classes)
    mean = tuple(config.mean) if config.mean is not None else DEFAULT_MEAN
    std = tuple(config.std) if config.std is not None else DEFAULT_STD
    init = config.imagenet_weights if weights == "config" else weights
    backbone = Backbone(config.backbone, in_chans=4, weights=init, mean=mean, std=std,
                        output_stride=getattr(config, "output_stride", 32))
    word_vectors = adjacency = None
    if config.variant in ("cpgcn", "mlgcn"):
        word_vectors = load_label_vectors()
        if word_vectors.shape[0] != n_classes:
            raise ValueError(
                f"the shipped label vectors cover {word_vectors.shape[0]} classes, the config {n_classes}")
        if label_matrix is not None:
            lm = np.asarray(label_matrix)
            if lm.ndim != 2 or lm.shape[1] != n_classes:
                raise ValueError(f"label matrix must be (n_images, {n_classes}), got {lm.shape}")
            adjacency = label_adjacency(lm, tau=config.tau)
        else:
            adjacency = np.eye(n_classes, dtype=np.float32)
    return CPGCN(
        backbone,
        variant=config.variant,
        n_classes=n_classes,
        word_vectors=word_vectors,
        adjacency=adjacency,
        cpm_norm=config.cpm_norm,
        gcn_hidden=config.gcn_hidden,
        gcn_activation=config.gcn_activation,
        gcn_normalize=getattr(config, "gcn_normalize", True),
        gcn_lr_scale=getattr(config, "gcn_lr_scale", 1.0),
        gcn_center=getattr(config, "gcn_center", False),
        gcn_residual=getattr(config, "gcn_residual", False),
        gcn_residual_std=getattr(config, "gcn_residual_std", 0.0),
        gcn_learn_inputs=getattr(config, "gcn_learn_inputs", False),
    )
