"""The image-level model: backbone + class perception module + label GCN (CP-GCN) and its ablations.

Variants (``variant=``):

``cnn``
    Global average pooling + linear classifier; CAMs are the classic class activation maps
    (the classifier applied at every location).
``cnn+cpm``
    CPM class representations t_c scored by learned per-class vectors w_c: s_c = ⟨t_c, w_c⟩ + b_c.
``cpgcn``
    The full model: s_c = ⟨t_c, l_c⟩ + b_c with l_c the label-GCN classifier of class c.
``mlgcn``
    ML-GCN (Chen et al. 2019): s_c = ⟨gap(X), l_c⟩ + b_c; CAMs are ⟨x_ij, l_c⟩.

``forward(x)`` returns ``(logits, cams)``: logits (B, C) and non-negative class maps
(B, C, h, w) at feature-map resolution; the CPM variants return the CPM maps M_c (each sums
to 1 over space), the others ReLU of the per-location class score. Divide each map by its
maximum (:func:`normalize_cams`) to compare or accumulate them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_cpgcn.models.backbone import Backbone
from napari_cpgcn.models.cpm import ClassPerceptionModule
from napari_cpgcn.models.gcn import LabelGCN

__all__ = ["VARIANTS", "CPGCN", "normalize_cams"]

VARIANTS: tuple[str, ...] = ("cnn", "cnn+cpm", "cpgcn", "mlgcn")


def normalize_cams(cams: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each (image, class) map to [0, 1] by its maximum (negative values clipped to 0)."""
    c = cams.float().clamp_min(0)
    mx = c.flatten(2).amax(dim=-1)[..., None, None]
    return c / (mx + eps)


def resize_cams(cams, size: tuple[int, int]):
    """The one CAM resizer: bilinear, pixel-centre aligned (``align_corners=False``), no
    antialiasing (maps are only ever enlarged to image size).

    ``cams`` is a torch tensor (..., h, w) or a numpy array (h, w) / (C, h, w); the result has the
    same type, float32, last two axes ``size``.
    """
    import numpy as np
    import torch.nn.functional as F

    size = (int(size[0]), int(size[1]))
    is_numpy = isinstance(cams, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(cams, dtype=np.float32)) if is_numpy else cams.float()
    if tuple(t.shape[-2:]) != size:
        lead = t.shape[:-2]
        t = F.interpolate(t.reshape(-1, 1, *t.shape[-2:]), size=size, mode="bilinear",
                          align_corners=False).reshape(*lead, *size)
    return t.numpy() if is_numpy else t


class CPGCN(nn.Module):
    """Image-level multi-label classifier with class activation maps.

    Parameters
    ----------
    backbone
        A :class:`~napari_cpgcn.models.backbone.Backbone`.
    variant
        One of :data:`VARIANTS`.
    n_classes
        Number of classes C.
    word_vectors, adjacency
        Label-GCN inputs (needed by ``cpgcn`` and ``mlgcn``).
    cpm_norm
        CPM spatial normalisation (``"sigmoid"`` or ``"softmax"``).
    gcn_hidden, gcn_activation
        Label-GCN hidden width and activation.
    gcn_normalize
        Use l_c / ‖l_c‖ times one learned scale (log-parametrised, starts at 1) instead of the
        raw GCN output. The raw bilinear score ⟨t_c, l_c⟩ under Adam moves the logits by tens per
        step early in training (every GCN weight moves by ~lr at once); the normalised form keeps
        the paper's score up to a shared magnitude and trains stably.
    gcn_lr_scale
        Learning-rate factor of the label-GCN weights (see :meth:`param_groups`).
    gcn_center
        Subtract the mean over classes from the GCN outputs (removes the component all l_c
        share; an experiment, off by default).
    gcn_residual
        Classifier l_c + r_c: the GCN output plus a free per-class vector r_c that starts at
        zero (the GCN then acts as a co-occurrence-aware initial classifier that the data can
        correct per class; an experiment, off by default).
    gcn_residual_std
        Initial standard deviation of r_c in units of 1/√D (0: r_c starts at zero; 1: r_c starts
        like the cnn+cpm classifier w_c).
    gcn_learn_inputs
        Train the GCN node inputs, initialised from the word vectors (lets classes with
        identical graph neighbourhoods become distinct; trained at the full ``lr``, off by
        default).
    """

    def __init__(
        self,
        backbone: Backbone,
        variant: str = "cpgcn",
        n_classes: int = 19,
        word_vectors=None,
        adjacency=None,
        cpm_norm: str = "sigmoid",
        gcn_hidden: int = 1024,
        gcn_activation: str = "leaky_relu",
        gcn_normalize: bool = True,
        gcn_lr_scale: float = 1.0,
        gcn_center: bool = False,
        gcn_residual: bool = False,
        gcn_residual_std: float = 0.0,
        gcn_learn_inputs: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown model variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.n_classes = n_classes
        self.gcn_lr_scale = float(gcn_lr_scale)
        self.gcn_center = bool(gcn_center)
        self.backbone = backbone
        d = backbone.out_channels
        self.cpm: ClassPerceptionModule | None = None
        self.gcn: LabelGCN | None = None
        if variant in ("cnn+cpm", "cpgcn"):
            self.cpm = ClassPerceptionModule(d, n_classes, norm=cpm_norm)
        if variant in ("cpgcn", "mlgcn"):
            if word_vectors is None or adjacency is None:
                raise ValueError(f"variant {variant!r} needs label word vectors and an adjacency")
            self.gcn = LabelGCN(word_vectors, adjacency, d, hidden=gcn_hidden, activation=gcn_activation,
                                learn_inputs=gcn_learn_inputs)
            self.gcn_normalize = bool(gcn_normalize)
            if self.gcn_normalize:
                self.gcn_log_scale = nn.Parameter(torch.zeros(()))
            self.gcn_residual = bool(gcn_residual)
            if self.gcn_residual:
                self.class_residual = nn.Parameter(torch.zeros(n_classes, d))
                if gcn_residual_std > 0:
                    nn.init.normal_(self.class_residual, std=float(gcn_residual_std) / d ** 0.5)
        if variant == "cnn":
            self.fc = nn.Linear(d, n_classes)
        elif variant == "cnn+cpm":
            self.class_weight = nn.Parameter(torch.empty(n_classes, d))
            nn.init.normal_(self.class_weight, std=1.0 / d ** 0.5)
        if variant != "cnn":
            # A per-class bias lets rare classes start at a low prior (the paper's s_c has none;
            # it changes no ranking within a class).
            self.class_bias = nn.Parameter(torch.zeros(n_classes))

    def classifiers(self) -> torch.Tensor:
        """(C, D) class vectors: fc weights, w_c or the GCN output l_c."""
        if self.variant == "cnn":
            return self.fc.weight
        if self.variant == "cnn+cpm":
            return self.class_weight
        assert self.gcn is not None
        w = self.gcn()
        if self.gcn_center:
            w = w - w.mean(dim=0, keepdim=True)
        if self.gcn_normalize:
            w = F.normalize(w, dim=1) * self.gcn_log_scale.exp()
        if self.gcn_residual:
            w = w + self.class_residual
        return w

    def param_groups(self, lr: float) -> list[dict]:
        """Adam groups: the label-GCN weights at ``lr * gcn_lr_scale``, the rest at ``lr``.

        Trainable GCN node inputs (``gcn_learn_inputs``) belong to the rest: each row is one
        class's input, like a row of a linear classifier.

        Every GCN weight feeds every class vector l_c, so one Adam step (each weight moves by
        about ``lr``) turns the class vectors by tens of percent at lr 1e-3 while a linear
        classifier's rows move by about 2 %; the smaller rate puts both on the same footing.
        """
        def slow(name: str) -> bool:
            return name.startswith("gcn.") and name != "gcn.word_vectors"

        gcn = [p for n, p in self.named_parameters() if slow(n) and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if not slow(n) and p.requires_grad]
        groups = [{"params": rest, "lr": lr}]
        if gcn:
            groups.append({"params": gcn, "lr": lr * self.gcn_lr_scale})
        return groups

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 4, Y, X) in [0, 1] → feature map (B, D, h, w)."""
        return self.backbone.forward_features(x)

    def forward_head(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map → (logits (B, C), cams (B, C, h, w))."""
        w = self.classifiers().to(feats.dtype)
        if self.variant == "cnn":
            logits = self.fc(F.adaptive_avg_pool2d(feats, 1).flatten(1))
            cams = torch.einsum("cd,bdhw->bchw", w, feats).clamp_min(0)
            return logits, cams
        if self.variant == "mlgcn":
            g = F.adaptive_avg_pool2d(feats, 1).flatten(1)
            logits = g @ w.t() + self.class_bias
            cams = torch.einsum("cd,bdhw->bchw", w, feats).clamp_min(0)
            return logits, cams
        assert self.cpm is not None
        t, m = self.cpm(feats)
        logits = (t * w.unsqueeze(0)).sum(-1) + self.class_bias
        return logits, m

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))
