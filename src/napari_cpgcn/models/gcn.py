"""Label graph convolution (after ML-GCN): word-vector nodes, co-occurrence adjacency, two GCN layers.

Adjacency (METHOD.md step 1): from the training label matrix, B_ij = number of images with both
labels i and j (i ≠ j), N_i = number of images with label i, P_ij = B_ij / N_i, Z_ij = 1 if
P_ij > τ else 0 (τ = 0.3), Â = D^{-1/2} (Z + I) D^{-1/2} with D the row sums of Z + I.
"""

from __future__ import annotations

import logging
import math
from importlib import resources

import numpy as np
import torch
from torch import nn

from napari_cpgcn.classes import N_CLASSES

__all__ = [
    "GraphConvolution",
    "LabelGCN",
    "cooccurrence_adjacency",
    "normalize_adjacency",
    "label_adjacency",
    "load_label_vectors",
]

log = logging.getLogger(__name__)


def cooccurrence_adjacency(labels: np.ndarray, tau: float = 0.3) -> np.ndarray:
    """Binary label graph Z (C, C) from a multi-hot label matrix (n, C); no self-loops.

    Classes that never occur have no edges.
    """
    y = (np.asarray(labels) > 0).astype(np.float64)
    if y.ndim != 2:
        raise ValueError(f"labels must be (n_images, n_classes), got shape {y.shape}")
    b = y.T @ y
    n = np.diag(b).copy()
    np.fill_diagonal(b, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n[:, None] > 0, b / np.maximum(n[:, None], 1.0), 0.0)
    return (p > tau).astype(np.float32)


def normalize_adjacency(z: np.ndarray) -> np.ndarray:
    """Â = D^{-1/2} (Z + I) D^{-1/2}, D = row sums of Z + I."""
    a = np.asarray(z, dtype=np.float64) + np.eye(z.shape[0])
    d = 1.0 / np.sqrt(a.sum(axis=1))
    return (d[:, None] * a * d[None, :]).astype(np.float32)


def label_adjacency(labels: np.ndarray, tau: float = 0.3) -> np.ndarray:
    """Normalised adjacency Â (C, C) of the label graph built from training labels."""
    return normalize_adjacency(cooccurrence_adjacency(labels, tau))


def load_label_vectors() -> np.ndarray:
    """The (19, 50) GloVe word vectors of the class names shipped as package data.

    Made by ``scripts/make_label_vectors.py`` (see docs/image_model.md for the
    out-of-vocabulary choices).
    """
    ref = resources.files("napari_cpgcn") / "data" / "label_vectors.npy"
    with resources.as_file(ref) as p:
        if not p.is_file():
            raise FileNotFoundError(
                f"label word vectors {p} are missing from the installation; regenerate them with "
                "scripts/make_label_vectors.py or reinstall napari-cpgcn"
            )
        v = np.load(p)
    if v.shape[0] != N_CLASSES:
        raise ValueError(f"{p}: expected {N_CLASSES} label vectors, got shape {v.shape}")
    return v.astype(np.float32)


class GraphConvolution(nn.Module):
    """One graph convolution: ``adj @ (x @ W) (+ b)``, as in Kipf & Welling / ML-GCN."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        stdv = 1.0 / math.sqrt(out_features)
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -stdv, stdv)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        out = adj @ (x @ self.weight)
        return out + self.bias if self.bias is not None else out


class LabelGCN(nn.Module):
    """Two-layer GCN over the label graph: node word vectors V (C, E) → classifiers L (C, D).

    The word vectors and the adjacency are buffers (the word vectors a parameter with
    ``learn_inputs``), so they travel inside checkpoints.

    Parameters
    ----------
    word_vectors
        (C, E) node inputs.
    adjacency
        (C, C) normalised adjacency Â.
    out_features
        D, the feature channels of the backbone.
    hidden
        Width of the hidden layer (ML-GCN: 1024).
    activation
        ``"leaky_relu"`` (ML-GCN, slope 0.2) or ``"relu"`` (the paper's text).
    learn_inputs
        Make the node inputs a trainable parameter initialised from ``word_vectors`` (default:
        fixed buffer, as in ML-GCN). Either way the state-dict key is ``word_vectors``.
    """

    def __init__(self, word_vectors: np.ndarray | torch.Tensor, adjacency: np.ndarray | torch.Tensor,
                 out_features: int, hidden: int = 1024, activation: str = "leaky_relu",
                 learn_inputs: bool = False) -> None:
        super().__init__()
        v = torch.as_tensor(np.asarray(word_vectors), dtype=torch.float32)
        a = torch.as_tensor(np.asarray(adjacency), dtype=torch.float32)
        if a.shape != (v.shape[0], v.shape[0]):
            raise ValueError(f"adjacency {tuple(a.shape)} does not fit {v.shape[0]} label vectors")
        self.learn_inputs = bool(learn_inputs)
        if self.learn_inputs:
            self.word_vectors = nn.Parameter(v.clone())
        else:
            self.register_buffer("word_vectors", v)
        self.register_buffer("adjacency", a)
        self.gc1 = GraphConvolution(v.shape[1], hidden)
        self.gc2 = GraphConvolution(hidden, out_features)
        if activation == "leaky_relu":
            self.act: nn.Module = nn.LeakyReLU(0.2)
        elif activation == "relu":
            self.act = nn.ReLU()
        else:
            raise ValueError(f"unknown GCN activation {activation!r}; use 'leaky_relu' or 'relu'")

    def set_adjacency(self, adjacency: np.ndarray | torch.Tensor) -> None:
        """Replace Â (e.g. after building it from the training labels)."""
        a = torch.as_tensor(np.asarray(adjacency), dtype=torch.float32)
        if a.shape != self.adjacency.shape:
            raise ValueError(f"adjacency must be {tuple(self.adjacency.shape)}, got {tuple(a.shape)}")
        self.adjacency.copy_(a)

    def forward(self) -> torch.Tensor:
        h = self.act(self.gc1(self.word_vectors, self.adjacency))
        return self.gc2(h, self.adjacency)
