"""Synthetic HPA-like images with per-cell ground truth (numpy / scipy only).

Each image is a field of cells in the four HPA channels (red microtubules, green protein of
interest, blue nucleus, yellow ER) with a cell instance mask and the classes each cell expresses,
so weakly supervised methods can be scored per cell.

How an image is made
--------------------
1. *Labels.* An image-level label set is drawn from the empirical distribution of label sets of
   the real Kaggle 2021 ``train.csv`` (``data/label_stats.json``, made by
   ``scripts/make_label_stats.py``), so class frequencies and co-occurrences match the real data.
2. *Layout.* Nucleus centres are thrown as darts with a minimum distance (some outside the image,
   so cells get cut by the border). Each cell has an elliptic nucleus and a star-shaped outline
   ``R(phi)`` (a few low harmonics). A pixel belongs to the cell minimising ``r / R(phi)`` (a
   multiplicatively weighted Voronoi), if that ratio is < 1: cells touch along curved borders
   and are separated by background where they are small.
3. *Weak supervision.* Each image-level class is expressed by a random subset of the cells: the
   expressing fraction is ``U(1 - H, 1)`` for heterogeneity ``H`` (at least one cell). Cells that
   express nothing are labelled Negative (18); Negative appears at image level only when every
   cell is negative. Mitotic-spindle cells (11) are dividing cells: round, with a metaphase plate
   instead of a nucleus.
4. *Channels.* Vectorised pattern generators over per-pixel cell coordinates (normalised nuclear
   radius, cytoplasm depth, distance to the cell edge); then blur, background and noise; 8-bit output.

Everything is deterministic given the seed: the same seed gives identical bytes.
"""

from __future__ import annotations

import functools
import json
import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from napari_cpgcn.classes import CHANNELS, N_CLASSES, NEGATIVE
from napari_cpgcn.events import Event, EventKind, ShouldStop
from napari_cpgcn.io.atomic import check_writable

__all__ = [
    "SynthImage",
    "generate_image",
    "generate_dataset",
    "iter_generate_dataset",
    "synth_sample",
    "composite",
    "sample_label_set",
    "load_label_stats",
    "PATTERNS",
]

log = logging.getLogger(__name__)

#: Version of the generator; written to ``synth.json`` (changes when the images change).
SYNTH_VERSION = "1"

NUCLEAR = (0, 1, 2, 3, 4, 5)


# ============================================================================ results


@dataclass
class SynthImage:
    """One synthetic image and its ground truth.

    Attributes
    ----------
    data : numpy.ndarray
        (4, Y, X) uint8 in the channel order red, green, blue, yellow.
    cells : numpy.ndarray
        (Y, X) uint32 cell instance mask, 0 = background, ids 1..n_cells.
    nuclei : numpy.ndarray
        (Y, X) uint32 nucleus mask with the id of the cell it belongs to.
    cell_labels : numpy.ndarray
        (n_cells, 19) uint8 multi-hot per-cell labels; row ``i`` is cell id ``i + 1``.
        A cell expressing nothing has only Negative (18) set.
    image_labels : numpy.ndarray
        (19,) uint8 multi-hot image labels: the union of the cell labels, with Negative only
        when every cell is negative.
    image_id : str
    mitotic : numpy.ndarray
        (n_cells,) bool, dividing cells.
    """

    data: np.ndarray
    cells: np.ndarray
    nuclei: np.ndarray
    cell_labels: np.ndarray
    image_labels: np.ndarray
    image_id: str
    mitotic: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def n_cells(self) -> int:
        return int(self.cell_labels.shape[0])

    def cell_label_sets(self) -> dict[int, set[int]]:
        """``{cell id: set of class ids}``."""
        return {i + 1: set(np.flatnonzero(row).tolist()) for i, row in enumerate(self.cell_labels)}

    def composite(self) -> np.ndarray:
        """(Y, X, 3) uint8 RGB composite as HPA shows it (see :func:`composite`)."""
        return composite(self.data)


def composite(data: np.ndarray) -> np.ndarray:
    """(Y, X, 3) uint8 RGB composite of a (4, Y, X) HPA image; yellow adds to red and green."""
    d = data.astype(np.float32)
    if data.dtype == np.uint16:
        d /= 257.0
    r, g, b, y = d
    rgb = np.stack([r + y, g + y, b], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


# ============================================================================ label statistics


@functools.lru_cache(maxsize=1)
def load_label_stats() -> dict[str, Any]:
    """The label statistics of the real Kaggle 2021 ``train.csv`` (package data).

    Keys: ``n_images``, ``label_sets`` (list of sorted class-id lists), ``counts`` (how many
    images have each set), ``class_counts`` (19), ``cooccurrence`` (19 x 19 image counts).
    """
    text = resources.files("napari_cpgcn").joinpath("data/label_stats.json").read_text()
    return json.loads(text)


def sample_label_set(rng: np.random.Generator) -> list[int]:
    """Draw one image-level label set from the empirical distribution of the real labels."""
    stats = load_label_stats()
    p = _label_set_probs()
    k = int(rng.choice(len(p), p=p))
    return list(stats["label_sets"][k])


@functools.lru_cache(maxsize=1)
def _label_set_probs() -> np.ndarray:
    counts = np.asarray(load_label_stats()["counts"], dtype=np.float64)
    return counts / counts.sum()


# ============================================================================ random fields


def _child_rng(seq: np.random.SeedSequence, name: str) -> np.random.Generator:
    """An independent generator for one named part of an image (stable across code changes)."""
    return np.random.default_rng([*seq.generate_state(2).tolist(), zlib.crc32(name.encode())])


def _normalise(a: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    s = a.std()
    return a / s if s > 0 else a


@functools.lru_cache(maxsize=32)
def _interp_weights(n_out: int, n_in: int, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights for linear upsampling by ``f`` (the small field has a 1-px margin)."""
    pos = (np.arange(n_out) + 0.5) / f - 0.5 + 1.0
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, n_in - 2)
    w = (pos - i0).clip(0, 1).astype(np.float32)
    return i0, w


def _upsample(a: np.ndarray, shape: tuple[int, int], f: int) -> np.ndarray:
    """Separable bilinear upsampling with gathers (no BLAS: its threads spin on busy machines)."""
    i0, w = _interp_weights(shape[0], a.shape[0], f)
    a = a[i0] * (1 - w)[:, None] + a[i0 + 1] * w[:, None]
    j0, v = _interp_weights(shape[1], a.shape[1], f)
    return a[:, j0] * (1 - v) + a[:, j0 + 1] * v


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma`` pixels.

    Large sigmas are made at low resolution and upsampled bilinearly, far cheaper than a wide
    filter at full resolution.
    """
    f = max(1, int(sigma // 2))
    small = (shape[0] // f + 3, shape[1] // f + 3)
    n = rng.standard_normal(small, dtype=np.float32)
    n = ndi.gaussian_filter(n, sigma / f, mode="wrap", truncate=3.0)
    if f > 1:
        n = _upsample(n, shape, f)
    return _normalise(n[: shape[0], : shape[1]]).astype(np.float32)


def _bandpass_noise(rng: np.random.Generator, shape: tuple[int, int], s1: float, s2: float) -> np.ndarray:
    """Difference-of-Gaussians filtered white noise, unit std (zero crossings form a net)."""
    n = rng.standard_normal(shape, dtype=np.float32)
    a = ndi.gaussian_filter(n, s1, truncate=3.0)
    b = ndi.gaussian_filter(a, np.sqrt(max(s2**2 - s1**2, 1e-6)), truncate=3.0)
    return _normalise(a - b)


def _render_dots(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, amps: np.ndarray,
                 sigma: float) -> np.ndarray:
    """Sum of Gaussian dots (peak ~ amp) via impulses + one Gaussian filter."""
    out = np.zeros(shape, np.float32)
    if len(ys):
        yi = np.clip(np.round(ys).astype(np.intp), 0, shape[0] - 1)
        xi = np.clip(np.round(xs).astype(np.intp), 0, shape[1] - 1)
        np.add.at(out, (yi, xi), amps.astype(np.float32))
        out = ndi.gaussian_filter(out, sigma, truncate=3.0) * np.float32(2 * np.pi * sigma**2)
    return out


def _render_blobs(shape: tuple[int, int], ys: Sequence[float], xs: Sequence[float],
                  radii: Sequence[float], amps: Sequence[float], soft: float = 1.0) -> np.ndarray:
    """Flat-topped round blobs with a soft edge (``soft`` pixels), drawn in their bounding boxes."""
    out = np.zeros(shape, np.float32)
    for y, x, r, a in zip(ys, xs, radii, amps, strict=True):
        m = r + 3 * soft + 1
        y0, y1 = max(int(y - m), 0), min(int(y + m) + 1, shape[0])
        x0, x1 = max(int(x - m), 0), min(int(x + m) + 1, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        d = np.sqrt((yy - y) ** 2 + (xx - x) ** 2, dtype=np.float32)
        blob = 1.0 / (1.0 + np.exp((d - r) / soft))
        np.maximum(out[y0:y1, x0:x1], a * blob, out=out[y0:y1, x0:x1])
    return out


# ============================================================================ layout


@dataclass
class _Layout:
    """Cell geometry: per-cell tables (index 0 = background) and per-pixel coordinates."""

    shape: tuple[int, int]
    scale: float
    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray          # nucleus semi-axes (px)
    b: np.ndarray
    theta: np.ndarray      # nucleus orientation
    R0: np.ndarray         # cell mean radius (px)
    harm: np.ndarray       # (n+1, 3, 2) harmonic coefficients (cos, sin) of R(phi)
    mitotic: np.ndarray
    lab: np.ndarray        # (Y, X) int32 cell ids
    nuc: np.ndarray        # (Y, X) bool nucleus
    rn: np.ndarray         # normalised nucleus radius (1 = nuclear edge)
    rho: np.ndarray        # r / R(phi) (1 = nominal cell edge)
    t: np.ndarray          # cytoplasm depth 0 (nuclear edge) .. 1 (cell edge)
    u: np.ndarray          # coordinates along / across the nucleus axis (px)
    v: np.ndarray
    r: np.ndarray          # distance from the nucleus centre (px)

    @property
    def n(self) -> int:
        return len(self.cy) - 1

    @functools.cached_property
    def cyto(self) -> np.ndarray:
        """Cytoplasm pixels (in a cell, outside its nucleus)."""
        return (self.lab > 0) & ~self.nuc


def _throw_seeds(rng: np.random.Generator, shape: tuple[int, int], scale: float,
                 n_target: int, min_dist: float) -> np.ndarray:
    """Dart throwing: up to ``n_target`` centres at least ``min_dist`` apart (some off-image)."""
    margin = 25 * scale
    lo = np.array([-margin, -margin])
    hi = np.array([shape[0] + margin, shape[1] + margin])
    cand = rng.uniform(lo, hi, size=(n_target * 30, 2))
    # The first centre lies well inside, so every image has at least one whole-ish cell.
    cand[0] = rng.uniform([0.2 * shape[0], 0.2 * shape[1]], [0.8 * shape[0], 0.8 * shape[1]])
    pts: list[np.ndarray] = []
    md2 = min_dist**2
    for p in cand:
        if pts:
            d2 = ((np.asarray(pts) - p) ** 2).sum(1)
            # Pairs a bit closer than min_dist are allowed sometimes: touching clumps.
            if d2.min() < md2 * (0.55 if rng.random() < 0.25 else 1.0):
                continue
        pts.append(p)
        if len(pts) >= n_target:
            break
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def _make_layout(rng: np.random.Generator, shape: tuple[int, int], scale: float,
                 n_mitotic: int, density: float) -> _Layout:
    H, W = shape
    area_ref = (H / scale) * (W / scale) / 512**2
    # Per-image "cell line": cell size and how much cytoplasm surrounds the nucleus.
    line_size = rng.uniform(0.75, 1.15)
    cyto_lo = rng.uniform(1.25, 1.7)
    n_target = max(1, int(round(rng.uniform(8, 30) * density * area_ref / line_size**2)))
    pts = _throw_seeds(rng, shape, scale, n_target, min_dist=58 * scale * line_size)
    # Mitotic cells must be inside the image: pick the seeds nearest the middle region.
    n = len(pts)
    inside = np.flatnonzero((pts[:, 0] > 40 * scale) & (pts[:, 0] < H - 40 * scale)
                            & (pts[:, 1] > 40 * scale) & (pts[:, 1] < W - 40 * scale))
    if n_mitotic and len(inside) < n_mitotic:
        extra = rng.uniform([0.3 * H, 0.3 * W], [0.7 * H, 0.7 * W], size=(n_mitotic, 2))
        pts = np.vstack([pts, extra])
        inside = np.concatenate([inside, np.arange(n, n + n_mitotic)])
        n = len(pts)
    mit = np.zeros(n + 1, bool)
    if n_mitotic:
        mit[1 + rng.choice(inside, n_mitotic, replace=False)] = True

    def col(v: np.ndarray) -> np.ndarray:  # prepend the background entry
        return np.concatenate([[0.0], v]).astype(np.float64)

    cy, cx = col(pts[:, 0]), col(pts[:, 1])
    a = col(rng.uniform(25, 36, n) * scale * line_size)
    b = a * col(rng.uniform(0.5, 0.8, n))
    theta = col(rng.uniform(0, np.pi, n))
    R0 = np.maximum(a * col(rng.uniform(cyto_lo, cyto_lo + 0.6, n)), 1.3 * a)
    harm = np.zeros((n + 1, 3, 2))
    amp = rng.uniform(0, 1, (n, 3)) ** 0.7 * np.array([0.3, 0.6, 0.15])
    ph = rng.uniform(0, 2 * np.pi, (n, 3))
    # The elongation (2nd harmonic) follows the nucleus axis, as in real cells.
    ph[:, 1] = theta[1:] * 2 + rng.normal(0, 0.3, n)
    harm[1:, :, 0] = amp * np.cos(ph)
    harm[1:, :, 1] = amp * np.sin(ph)
    # Dividing cells: round, smaller, with a compact chromosome plate.
    a[mit] *= 0.9
    b[mit] = a[mit] * 0.32
    R0[mit] = a[mit] * 1.7
    harm[mit] *= 0.15

    lab = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)
    for i in range(1, n + 1):
        hmax = np.abs(harm[i, :, 0]) + np.abs(harm[i, :, 1])
        m = R0[i] * (1 + hmax.sum()) / (0.8 if mit[i] else 1.0) + 2
        y0, y1 = max(int(cy[i] - m), 0), min(int(cy[i] + m) + 1, H)
        x0, x1 = max(int(cx[i] - m), 0), min(int(cx[i] + m) + 1, W)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy[i]))[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx[i]))[None, :]
        rr = np.sqrt(dy * dy + dx * dx) + np.float32(1e-3)
        rho = rr / _radius(dy / rr, dx / rr, R0[i], harm[i])
        if mit[i]:
            rho = rho * np.float32(0.8)  # dividing cells keep their round outline
        sub = best[y0:y1, x0:x1]
        win = rho < sub
        sub[win] = rho[win]
        lab[y0:y1, x0:x1][win] = i

    wob = 0.5 * _smooth_noise(rng, shape, 8 * scale) + _smooth_noise(rng, shape, 22 * scale)
    rho_eff = best * (1 + np.float32(0.07) * wob)
    lab[rho_eff >= 1] = 0

    # Coordinates relative to each pixel's own cell.
    Y, X = np.ogrid[:H, :W]
    dy = Y.astype(np.float32) - cy.astype(np.float32)[lab]
    dx = X.astype(np.float32) - cx.astype(np.float32)[lab]
    ct, st = np.cos(theta).astype(np.float32)[lab], np.sin(theta).astype(np.float32)[lab]
    u = dx * ct + dy * st
    v = -dx * st + dy * ct
    rn = np.sqrt((u / a.astype(np.float32).clip(1)[lab]) ** 2 + (v / b.astype(np.float32).clip(1)[lab]) ** 2)
    nwob = _smooth_noise(rng, shape, 4 * scale)
    rn = rn * (1 + np.float32(0.045) * nwob)
    r = np.sqrt(dx * dx + dy * dy) + np.float32(1e-3)
    nuc = (rn < 1) & (lab > 0)
    rho = rho_eff
    r_edge_nuc = r / np.maximum(rn, 1e-3)      # nuclear edge radius along this ray
    r_edge_cell = r / np.maximum(rho, 1e-3)    # cell edge radius along this ray
    t = np.clip((r - r_edge_nuc) / np.maximum(r_edge_cell - r_edge_nuc, 1.0), 0, 1)
    t[lab == 0] = 1
    t[nuc] = 0

    # Drop slivers (cells mostly outside the image or eaten by neighbours), relabel 1..n.
    area = np.bincount(lab.ravel(), minlength=n + 1)
    keep = area >= max(12.0, 380 * scale**2)
    keep[0] = True
    keep[mit] = True
    new_id = np.zeros(n + 1, np.int32)
    new_id[keep] = np.arange(keep.sum())
    lab = new_id[lab]
    nuc &= lab > 0
    sel = np.flatnonzero(keep)
    return _Layout(shape, scale, cy[sel], cx[sel], a[sel], b[sel], theta[sel], R0[sel],
                   harm[sel], mit[sel], lab, nuc, rn.astype(np.float32, copy=False),
                   rho.astype(np.float32, copy=False), t.astype(np.float32, copy=False), u, v, r)


def _radius(s: np.ndarray, c: np.ndarray, R0: float, h: np.ndarray) -> np.ndarray:
    """Cell outline radius ``R(phi)`` from sin/cos of the angle and 3 harmonics."""
    c2, s2 = c * c - s * s, 2 * s * c
    c3, s3 = c * c2 - s * s2, s * c2 + c * s2
    f = (1 + h[0, 0] * c + h[0, 1] * s + h[1, 0] * c2 + h[1, 1] * s2
         + h[2, 0] * c3 + h[2, 1] * s3)
    return np.float32(R0) * np.maximum(f, 0.45).astype(np.float32)


# ============================================================================ shared structures


class _Ctx:
    """Everything the pattern generators share for one image (lazily computed, cached)."""

    def __init__(self, seq: np.random.SeedSequence, L: _Layout):
        self.seq = seq
        self.L = L
        self.shape = L.shape
        self.s = L.scale
        self._cache: dict[str, Any] = {}

    def rng(self, name: str) -> np.random.Generator:
        return _child_rng(self.seq, name)

    def cached(self, name: str, fn: Callable[[], Any]) -> Any:
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    # -- per-cell random points -----------------------------------------------------------
    def points_in(self, name: str, mask: np.ndarray, per_cell_density: float,
                  cells: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Uniform random points (``density`` per pixel) landing in ``mask``; returns y, x, cell id."""
        rng = self.rng(name)
        H, W = self.shape
        n = rng.poisson(per_cell_density * H * W)
        ys = rng.uniform(0, H - 1, n)
        xs = rng.uniform(0, W - 1, n)
        yi, xi = ys.astype(np.intp), xs.astype(np.intp)
        ok = mask[yi, xi]
        if cells is not None:
            ok &= cells[self.L.lab[yi, xi]]
        return ys[ok], xs[ok], self.L.lab[yi[ok], xi[ok]]

    # -- nucleoli (blue holes, green class 2) ---------------------------------------------------
    @property
    def nucleoli(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        def make() -> tuple[np.ndarray, ...]:
            L, rng = self.L, self.rng("nucleoli")
            ys, xs, rs = [], [], []
            for i in range(1, L.n + 1):
                if L.mitotic[i]:
                    continue
                k = rng.integers(1, 5)
                ang = rng.uniform(0, 2 * np.pi, k)
                rad = np.sqrt(rng.uniform(0, 1, k)) * 0.55
                uu = rad * np.cos(ang) * L.a[i]
                vv = rad * np.sin(ang) * L.b[i]
                ct, st = np.cos(L.theta[i]), np.sin(L.theta[i])
                ys += list(L.cy[i] + uu * st + vv * ct)
                xs += list(L.cx[i] + uu * ct - vv * st)
                rs += list(rng.uniform(0.15, 0.28, k) * L.b[i] + 1.0 * self.s)
            return np.array(ys), np.array(xs), np.array(rs), np.ones(len(ys))
        return self.cached("nucleoli", make)

    def nucleoli_map(self) -> np.ndarray:
        def make() -> np.ndarray:
            ys, xs, rs, amps = self.nucleoli
            m = _render_blobs(self.shape, ys, xs, rs, amps, soft=max(0.6, 0.8 * self.s))
            tex = _smooth_noise(self.rng("nucleoli_tex"), self.shape, 1.2 * self.s)
            return m * (0.8 + 0.2 * np.tanh(tex)) * self.L.nuc
        return self.cached("nucleoli_map", make)

    def edge_fade(self) -> np.ndarray:
        """Cytoplasm thins out toward the free cell edge: 1 inside, falling to ~0.3 at the edge."""
        def make() -> np.ndarray:
            return (0.3 + 0.7 * np.clip((1.0 - self.L.rho) / 0.25, 0, 1)).astype(np.float32)
        return self.cached("edge_fade", make)

    def cell_edges(self) -> np.ndarray:
        """1 on cell outlines (also borders between touching cells), blurred."""
        def make() -> np.ndarray:
            lab = self.L.lab
            e = np.zeros(self.shape, bool)
            e[:-1] |= lab[:-1] != lab[1:]
            e[1:] |= lab[:-1] != lab[1:]
            e[:, :-1] |= lab[:, :-1] != lab[:, 1:]
            e[:, 1:] |= lab[:, :-1] != lab[:, 1:]
            e &= lab > 0
            return ndi.gaussian_filter(e.astype(np.float32), 0.8 * self.s + 0.3, truncate=3.0) * 2.2
        return self.cached("edges", make)

    def er_net(self) -> np.ndarray:
        """Reticular network: thin lines along zero crossings of band-pass noise."""
        def make() -> np.ndarray:
            bp = _bandpass_noise(self.rng("er"), self.shape, 0.9 * self.s + 0.3, 2.6 * self.s + 0.5)
            return np.exp(-((bp / 0.35) ** 2))
        return self.cached("er", make)

    def er_envelope(self) -> np.ndarray:
        """ER density: high next to the nucleus (nuclear envelope), falling to the cell edge."""
        def make() -> np.ndarray:
            L = self.L
            env = (0.08 + 0.92 * np.exp(-L.t / 0.3)) * L.cyto * self.edge_fade()
            ring = np.exp(-(((L.rn - 1.0) / 0.08) ** 2)) * (L.lab > 0)
            return np.maximum(env, 0.6 * ring).astype(np.float32)
        return self.cached("er_env", make)

    def microtubules(self) -> np.ndarray:
        """Microtubules: long, slightly wavy filaments radiating from near the nucleus."""
        def make() -> np.ndarray:
            pts = _walk_filaments(self, "mt", 0.008, (12, 45), "radial", turn=0.25, pull=0.05)
            fil = ndi.gaussian_filter(pts, 0.45 * self.s + 0.3, truncate=3.0) * 2.2
            return np.minimum(fil, 1.6)
        return self.cached("mt", make)


def _walk_filaments(
    C: _Ctx, name: str, density: float, n_steps: tuple[int, int], mode: str,
    turn: float, pull: float, start_mask: np.ndarray | None = None,
    cell_angle: np.ndarray | None = None, step: float = 1.2,
) -> np.ndarray:
    """Filaments as persistent random walks, drawn as chains of points (vectorised over walks).

    Parameters
    ----------
    density
        Walk starts per cytoplasm pixel.
    n_steps
        Range of walk lengths (steps of ``step * scale`` pixels).
    mode
        Preferred direction: ``"radial"`` (away from the nucleus centre), ``"tangential"``
        (around it) or ``"axis"`` (along ``cell_angle`` of the cell, either way).
    turn
        Std of the random turn per step (radians): the waviness.
    pull
        How strongly the direction relaxes toward the preferred one per step (0..1).

    Walks stop when they leave their cell or enter the nucleus; returns the point density
    (before blur; the caller blurs it).
    """
    L, rng = C.L, C.rng(name)
    H, W = C.shape
    mask = L.cyto if start_mask is None else start_mask
    ys, xs, cid = C.points_in(name + "_starts", mask, density / max(C.s, 0.1) ** 2)
    n = len(ys)
    if n == 0:
        return np.zeros((H, W), np.float32)
    cy, cx = L.cy[cid], L.cx[cid]

    def preferred(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        if mode == "axis":
            return cell_angle[cid]
        radial = np.arctan2(y - cy, x - cx)
        return radial + (np.pi / 2 if mode == "tangential" else 0.0)

    ang = preferred(ys, xs) + rng.normal(0, 0.3, n)
    if mode != "radial":  # either way along the preferred line
        ang = ang + np.pi * (rng.uniform(size=n) < 0.5)
    length = rng.integers(n_steps[0], n_steps[1] + 1, n)
    amp = rng.uniform(0.5, 1.0, n).astype(np.float32)
    alive = np.ones(n, bool)
    d = step * C.s + 0.2
    y, x = ys.copy(), xs.copy()
    lab = L.lab.ravel()
    nuc = L.nuc.ravel()
    flats: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for j in range(int(length.max())):
        yi = np.clip(y.astype(np.intp), 0, H - 1)
        xi = np.clip(x.astype(np.intp), 0, W - 1)
        flat = yi * W + xi
        alive &= (j < length) & (lab[flat] == cid) & ~nuc[flat] & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        if not alive.any():
            break
        flats.append(flat[alive])
        weights.append(amp[alive])
        target = preferred(y, x)
        diff = np.angle(np.exp(1j * (target - ang)))
        if mode != "radial":  # a line has no direction: relax to the nearer of the two
            diff = np.where(np.abs(diff) > np.pi / 2, diff - np.sign(diff) * np.pi, diff)
        ang = ang + pull * diff + rng.normal(0, turn, n)
        y = y + d * np.sin(ang)
        x = x + d * np.cos(ang)
    if not flats:
        return np.zeros((H, W), np.float32)
    out = np.bincount(np.concatenate(flats), weights=np.concatenate(weights), minlength=H * W)
    return out.astype(np.float32).reshape(H, W)


# ============================================================================ green patterns
# Each pattern returns a float32 image ~ [0, 1] over the whole field; it is multiplied by the
# per-cell expression amplitude (0 outside expressing cells) when the green channel is composed.


def _p_nucleoplasm(C: _Ctx) -> np.ndarray:
    tex = _smooth_noise(C.rng("np_tex"), C.shape, 1.5 * C.s)
    return (0.75 + 0.2 * tex) * C.L.nuc * (1 - 0.85 * C.nucleoli_map())


def _p_nuclear_membrane(C: _Ctx) -> np.ndarray:
    L = C.L
    w = 0.06 + 0.6 / np.maximum(L.b[L.lab], 1)
    ring = np.exp(-(((L.rn - 0.97) / w) ** 2)) * (L.lab > 0)
    tex = _smooth_noise(C.rng("nm_tex"), C.shape, 1.5 * C.s)
    return ring * (0.85 + 0.15 * tex) + 0.05 * L.nuc


def _p_nucleoli(C: _Ctx) -> np.ndarray:
    return 1.8 * C.nucleoli_map() + 0.05 * C.L.nuc


def _p_nucleoli_fc(C: _Ctx) -> np.ndarray:
    ys, xs, rs, _ = C.nucleoli
    rng = C.rng("fc")
    k = rng.integers(2, 6, len(ys))
    idx = np.repeat(np.arange(len(ys)), k)
    ang = rng.uniform(0, 2 * np.pi, len(idx))
    rad = np.sqrt(rng.uniform(0, 1, len(idx))) * rs[idx] * 0.75
    dy, dx = ys[idx] + rad * np.sin(ang), xs[idx] + rad * np.cos(ang)
    dots = _render_dots(C.shape, dy, dx, rng.uniform(0.6, 1.0, len(idx)), 0.55 * C.s + 0.35)
    return np.minimum(dots * 2.5, 2.5) * C.L.nuc


def _p_nuclear_speckles(C: _Ctx) -> np.ndarray:
    bp = _bandpass_noise(C.rng("speckles"), C.shape, 1.1 * C.s + 0.3, 3.5 * C.s + 0.5)
    sp = np.clip(bp - 0.7, 0, None) * 1.3
    return (np.minimum(sp, 1) + 0.12) * C.L.nuc * (1 - 0.9 * C.nucleoli_map())


def _nuclear_points(C: _Ctx, name: str, k_range: tuple[int, int], rmax: float) -> tuple[np.ndarray, np.ndarray]:
    """``k_range`` random points per interphase nucleus, within ``rmax`` of its normalised radius."""
    L, rng = C.L, C.rng(name)
    cells = np.flatnonzero(~L.mitotic[1:]) + 1
    k = rng.integers(k_range[0], k_range[1] + 1, len(cells))
    idx = np.repeat(cells, k)
    ang = rng.uniform(0, 2 * np.pi, len(idx))
    rad = np.sqrt(rng.uniform(0, 1, len(idx))) * rmax
    uu, vv = rad * np.cos(ang) * L.a[idx], rad * np.sin(ang) * L.b[idx]
    ct, st = np.cos(L.theta[idx]), np.sin(L.theta[idx])
    return L.cy[idx] + uu * st + vv * ct, L.cx[idx] + uu * ct - vv * st


def _p_nuclear_bodies(C: _Ctx) -> np.ndarray:
    L, rng = C.L, C.rng("nb")
    ys, xs = _nuclear_points(C, "nb_pts", (3, 10), 0.85)
    dots = _render_dots(C.shape, ys, xs, rng.uniform(0.6, 1.0, len(ys)), 0.9 * C.s + 0.3)
    # Bodies in nucleoli are hidden (nuclear bodies sit in the nucleoplasm).
    return np.minimum(dots * 2.2, 2.2) * L.nuc * (1 - C.nucleoli_map()) + 0.05 * L.nuc


def _p_er(C: _Ctx) -> np.ndarray:
    return C.er_net() * C.er_envelope()


def _p_golgi(C: _Ctx) -> np.ndarray:
    L, rng = C.L, C.rng("golgi")
    ys, xs, rs, amps = [], [], [], []
    for i in range(1, L.n + 1):
        if L.mitotic[i]:
            continue
        ang0 = rng.uniform(0, 2 * np.pi)
        k = rng.integers(6, 13)
        ang = ang0 + rng.normal(0, 0.35, k)
        # Just outside the nuclear edge along that direction.
        ca, sa = np.cos(ang - L.theta[i]), np.sin(ang - L.theta[i])
        redge = 1.0 / np.sqrt((ca / L.a[i]) ** 2 + (sa / L.b[i]) ** 2)
        rad = redge + rng.uniform(1.5, 6.0, k) * C.s
        ys += list(L.cy[i] + rad * np.sin(ang))
        xs += list(L.cx[i] + rad * np.cos(ang))
        rs += list(rng.uniform(1.2, 2.8, k) * C.s)
        amps += list(rng.uniform(0.6, 1.0, k))
    g = _render_blobs(C.shape, ys, xs, rs, amps, soft=0.7 * C.s + 0.2)
    return 1.8 * g * (L.lab > 0) * ~L.nuc


def _p_intermediate_filaments(C: _Ctx) -> np.ndarray:
    """Long wavy filaments wrapping around the nucleus (a perinuclear cage)."""
    L = C.L
    pts = _walk_filaments(C, "if", 0.006, (30, 70), "tangential", turn=0.2, pull=0.08)
    fil = np.minimum(ndi.gaussian_filter(pts, 0.55 * C.s + 0.3, truncate=3.0) * 3.0, 1.5)
    env = 0.4 + 0.6 * np.exp(-L.t / 0.5)
    return (fil * env + 0.06) * L.cyto


def _p_actin(C: _Ctx) -> np.ndarray:
    """Straight stress fibres along the cell's long axis plus a bright cortex."""
    L, rng = C.L, C.rng("actin")
    psi = L.theta + rng.normal(0, 0.25, L.n + 1)
    pts = _walk_filaments(C, "actin", 0.0025, (25, 80), "axis", turn=0.015, pull=0.05,
                          start_mask=L.lab > 0, cell_angle=psi, step=1.5)
    # Stress fibres run under the nucleus too: the walk skips it, so fill it in faintly.
    fib = np.minimum(ndi.gaussian_filter(pts, 0.5 * C.s + 0.3, truncate=3.0) * 2.5, 1.3)
    cortex = np.clip(C.cell_edges() * 1.2, 0, 1) + np.clip((L.rho - 0.8) / 0.2, 0, 1) * 0.5
    return (fib + cortex * 0.8 + 0.06) * (L.lab > 0) * (1 - 0.6 * L.nuc)


def _p_microtubules(C: _Ctx) -> np.ndarray:
    L = C.L
    return np.minimum(C.microtubules(), 1.3) * (0.5 + 0.5 * np.exp(-L.t / 0.5)) * (1 - 0.6 * L.nuc)


def _spindle(C: _Ctx) -> np.ndarray:
    """Bipolar spindle of dividing cells: fibres converging on two poles (0 elsewhere)."""
    L, rng = C.L, C.rng("spindle")
    lab = L.lab
    a = L.a.astype(np.float32)[lab].clip(1)
    # Spindle axis is perpendicular to the chromosome plate (u = along the plate).
    x = L.v / (1.1 * a)       # along the spindle axis, poles at +-1
    y = L.u / (0.85 * a)      # across
    # Soft lemon-shaped body between the poles.
    half_width = np.clip(1 - x * x, 0, 1) ** 1.3 + 0.05
    inside = np.clip((half_width - np.abs(y)) / 0.2, 0, 1) * np.clip((1 - np.abs(x)) / 0.15, 0, 1)
    # Fibres: lines through the poles -> angle seen from the nearer pole.
    px = np.sign(x)
    ang = np.arctan2(y, (px - x) + 1e-3)
    K = 64
    tab = np.clip(rng.standard_normal((L.n + 1, K)).astype(np.float32) - 0.2, 0, None)
    k = ((ang + np.pi / 2) / np.pi * K).astype(np.intp).clip(0, K - 1)
    fib = 0.2 + 0.8 * np.minimum(tab[lab, k], 1.5)
    poles = np.exp(-((np.abs(x) - 1) ** 2 + y**2) / 0.012)
    m = L.mitotic[lab]
    return ((fib * inside) * 0.9 + poles) * m


def _p_mitotic_spindle(C: _Ctx) -> np.ndarray:
    return _spindle(C) + 0.1 * C.L.mitotic[C.L.lab] * (C.L.lab > 0)


def _p_centrosome(C: _Ctx) -> np.ndarray:
    L, rng = C.L, C.rng("centro")
    n = L.n
    ang = rng.uniform(0, 2 * np.pi, n)
    ca, sa = np.cos(ang - L.theta[1:]), np.sin(ang - L.theta[1:])
    redge = 1.0 / np.sqrt((ca / L.a[1:].clip(1)) ** 2 + (sa / L.b[1:].clip(1)) ** 2)
    rad = redge + rng.uniform(2.5, 6, n) * C.s
    ys = L.cy[1:] + rad * np.sin(ang)
    xs = L.cx[1:] + rad * np.cos(ang)
    two = rng.uniform(size=n) < 0.6
    off = rng.uniform(0, 2 * np.pi, n)
    d = 2.0 * C.s + 0.6
    ys = np.concatenate([ys, (ys + d * np.sin(off))[two]])
    xs = np.concatenate([xs, (xs + d * np.cos(off))[two]])
    amps = np.ones(len(ys))
    dots = _render_dots(C.shape, ys, xs, amps, 0.9 * C.s + 0.35)
    return np.minimum(dots * 3.0, 3.0) * (L.lab > 0) + 0.04 * L.cyto


def _p_plasma_membrane(C: _Ctx) -> np.ndarray:
    L = C.L
    edge = np.minimum(C.cell_edges(), 1.0)
    rim = np.clip((L.rho - 0.85) / 0.15, 0, 1) * 0.5
    tex = _smooth_noise(C.rng("pm_tex"), C.shape, 2 * C.s)
    return np.maximum(edge, rim) * (0.8 + 0.2 * tex) * (L.lab > 0) + 0.04 * L.cyto


def _p_mitochondria(C: _Ctx) -> np.ndarray:
    """Short worms: random chains of dots with a persistent direction."""
    L, rng = C.L, C.rng("mito")
    dens = 0.014 / max(C.s, 0.1) ** 2
    ys, xs, cid = C.points_in("mito_pts", L.cyto, dens)
    keep = rng.uniform(size=len(ys)) < np.exp(-L.t[ys.astype(np.intp), xs.astype(np.intp)] / 0.6)
    ys, xs = ys[keep], xs[keep]
    n = len(ys)
    steps = 6
    ang = rng.uniform(0, 2 * np.pi, n)
    turn = rng.normal(0, 0.35, (n, steps))
    step = 1.4 * C.s + 0.25
    length = rng.integers(2, steps + 1, n)
    allys, allxs = [ys], [xs]
    cy_, cx_ = ys.copy(), xs.copy()
    for j in range(1, steps):
        ang = ang + turn[:, j]
        cy_ = cy_ + step * np.sin(ang)
        cx_ = cx_ + step * np.cos(ang)
        on = j < length
        allys.append(cy_[on])
        allxs.append(cx_[on])
    Y, X = np.concatenate(allys), np.concatenate(allxs)
    dots = _render_dots(C.shape, Y, X, rng.uniform(0.5, 0.9, len(Y)), 0.75 * C.s + 0.3)
    return np.minimum(dots, 1.4) * L.cyto


def _p_aggresome(C: _Ctx) -> np.ndarray:
    L, rng = C.L, C.rng("aggr")
    n = L.n
    ang = rng.uniform(0, 2 * np.pi, n)
    ca, sa = np.cos(ang - L.theta[1:]), np.sin(ang - L.theta[1:])
    redge = 1.0 / np.sqrt((ca / L.a[1:].clip(1)) ** 2 + (sa / L.b[1:].clip(1)) ** 2)
    size = rng.uniform(4, 8, n) * C.s + 0.8
    rad = redge + size * 0.7
    ys = L.cy[1:] + rad * np.sin(ang)
    xs = L.cx[1:] + rad * np.cos(ang)
    blob = _render_blobs(C.shape, ys, xs, size, np.ones(n), soft=1.0 * C.s + 0.3)
    tex = _smooth_noise(rng, C.shape, 1.5 * C.s)
    return blob * (0.9 + 0.1 * tex) * (L.lab > 0) + 0.12 * L.cyto


def _p_cytosol(C: _Ctx) -> np.ndarray:
    L = C.L
    tex = _smooth_noise(C.rng("cyto_tex"), C.shape, 3 * C.s)
    fine = _smooth_noise(C.rng("cyto_fine"), C.shape, 1.0 * C.s)
    return (0.6 + 0.12 * tex + 0.1 * fine) * (0.6 + 0.4 * np.exp(-L.t / 0.5)) * C.edge_fade() * L.cyto + 0.08 * L.nuc


def _p_vesicles(C: _Ctx) -> np.ndarray:
    L, rng = C.L, C.rng("ves")
    ys, xs, _ = C.points_in("ves_pts", L.cyto, 0.008 / max(C.s, 0.1) ** 2)
    dots = _render_dots(C.shape, ys, xs, rng.uniform(0.4, 1.0, len(ys)), 0.8 * C.s + 0.3)
    return np.minimum(dots, 1.2) * L.cyto + 0.04 * L.cyto


def _p_negative(C: _Ctx) -> np.ndarray:
    return np.zeros(C.shape, np.float32)


#: One green pattern generator per class id.
PATTERNS: dict[int, Callable[[_Ctx], np.ndarray]] = {
    0: _p_nucleoplasm,
    1: _p_nuclear_membrane,
    2: _p_nucleoli,
    3: _p_nucleoli_fc,
    4: _p_nuclear_speckles,
    5: _p_nuclear_bodies,
    6: _p_er,
    7: _p_golgi,
    8: _p_intermediate_filaments,
    9: _p_actin,
    10: _p_microtubules,
    11: _p_mitotic_spindle,
    12: _p_centrosome,
    13: _p_plasma_membrane,
    14: _p_mitochondria,
    15: _p_aggresome,
    16: _p_cytosol,
    17: _p_vesicles,
    18: _p_negative,
}


# ============================================================================ the image


def _as_seedseq(rng_or_seed: int | np.random.SeedSequence | np.random.Generator | None) -> np.random.SeedSequence:
    if isinstance(rng_or_seed, np.random.SeedSequence):
        return rng_or_seed
    if isinstance(rng_or_seed, np.random.Generator):
        return np.random.SeedSequence(rng_or_seed.integers(0, 2**63 - 1, 2).tolist())
    return np.random.SeedSequence(rng_or_seed)


def _assign_expression(rng: np.random.Generator, labels: list[int], n: int, mitotic: np.ndarray,
                       heterogeneity: float, n_spindle: int) -> np.ndarray:
    """(n_cells + 1, 19) bool: which cells express which class (row 0 = background)."""
    expr = np.zeros((n + 1, N_CLASSES), bool)
    ids = np.arange(1, n + 1)
    interphase = ids[~mitotic[1:]]
    for k in labels:
        if k == NEGATIVE:
            continue
        if k == 11:
            dividing = ids[mitotic[1:]]
            expr[rng.choice(dividing, min(n_spindle, len(dividing)), replace=False), k] = True
            continue
        frac = rng.uniform(1 - heterogeneity, 1)
        pool = interphase if (k in NUCLEAR or k in (7, 12, 15)) and len(interphase) else ids
        m = max(1, int(round(frac * len(pool))))
        expr[rng.choice(pool, m, replace=False), k] = True
    return expr


def generate_image(
    rng_or_seed: int | np.random.SeedSequence | np.random.Generator | None = 0,
    size: int | tuple[int, int] = 512,
    labels: Sequence[int] | None = None,
    heterogeneity: float = 0.5,
    *,
    cell_scale: float | None = None,
    density: float = 1.0,
    mitosis_rate: float = 0.15,
    image_id: str | None = None,
) -> SynthImage:
    """Generate one synthetic HPA-like image with per-cell truth.

    Parameters
    ----------
    rng_or_seed
        Seed (int), ``SeedSequence`` or ``Generator``; the same seed gives the same image.
    size
        Image side (or ``(Y, X)``) in pixels.
    labels
        Image-level class ids the image should have; ``None`` draws a label set from the real
        Kaggle 2021 label distribution. ``[18]`` (or ``[]``) makes an all-negative image.
    heterogeneity
        0: every cell expresses every image class; 1: as few as one cell does. The expressing
        fraction of each class is drawn from ``U(1 - H, 1)``.
    cell_scale
        Pixels per unit of a 512² downscaled Kaggle image; ``None`` (default) keeps the real
        cell size relative to the field, i.e. ``min(Y, X) / 512``.
    density
        Multiplies the number of cells.
    mitosis_rate
        Probability that the image holds one dividing cell whose spindle is *not* stained
        (visible in red, not labelled 11), besides the spindle-stained ones of class 11.
    image_id
        Id to record; default ``synth_<hash of the seed>``.

    Returns
    -------
    SynthImage
    """
    if not 0 <= heterogeneity <= 1:
        raise ValueError(f"heterogeneity must be in [0, 1], got {heterogeneity}")
    shape = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if min(shape) < 16:
        raise ValueError(f"size {shape} is too small; use at least 16 pixels")
    seq = _as_seedseq(rng_or_seed)
    scale = float(cell_scale) if cell_scale else min(shape) / 512.0
    rng = _child_rng(seq, "labels")
    if labels is None:
        lab_list = sample_label_set(rng)
    else:
        lab_list = sorted({int(k) for k in labels})
        bad = [k for k in lab_list if not 0 <= k < N_CLASSES]
        if bad:
            raise ValueError(f"unknown class id(s) {bad}; classes are 0..{N_CLASSES - 1}")
    if NEGATIVE in lab_list and len(lab_list) > 1:
        lab_list = [k for k in lab_list if k != NEGATIVE]
    n_spindle = int(rng.integers(1, 3 if heterogeneity > 0.3 else 4)) if 11 in lab_list else 0
    # Dividing cells also occur where the protein does not stain the spindle: the red channel
    # shows their spindle, the green does not, and they are not labelled 11.
    n_unstained = int(rng.uniform() < mitosis_rate)
    L = _make_layout(_child_rng(seq, "layout"), shape, scale, n_spindle + n_unstained, density)
    C = _Ctx(seq, L)
    expr = _assign_expression(_child_rng(seq, "expression"), lab_list, L.n, L.mitotic, heterogeneity,
                              n_spindle)

    data = _render_channels(C, expr)

    cell_labels = expr[1:].astype(np.uint8)
    neg = cell_labels.sum(1) == 0
    cell_labels[neg, NEGATIVE] = 1
    image_labels = np.zeros(N_CLASSES, np.uint8)
    if L.n:
        image_labels[:] = cell_labels.max(0)
        if not neg.all():
            image_labels[NEGATIVE] = 0
    else:
        image_labels[NEGATIVE] = 1
    if image_id is None:
        image_id = "synth_" + format(int(seq.generate_state(1, np.uint64)[0]) & 0xFFFFFFFFFFFF, "012x")
    return SynthImage(
        data=data,
        cells=L.lab.astype(np.uint32),
        nuclei=np.where(L.nuc, L.lab, 0).astype(np.uint32),
        cell_labels=cell_labels,
        image_labels=image_labels,
        image_id=image_id,
        mitotic=L.mitotic[1:].copy(),
    )


def _render_channels(C: _Ctx, expr: np.ndarray) -> np.ndarray:
    """The four 8-bit channels."""
    L, s, shape = C.L, C.s, C.shape
    rng = C.rng("render")
    lab, nuc, cyto = L.lab, L.nuc, L.cyto
    inside = lab > 0
    n = L.n
    any_mit = bool(L.mitotic.any())
    mit_px = L.mitotic[lab] & inside if any_mit else None

    # ---- blue: nuclei with texture, darker nucleoli, bright condensed chromosomes in mitosis
    nb = rng.uniform(0.55, 1.0, n + 1).astype(np.float32)
    tex = _smooth_noise(C.rng("blue_tex"), shape, 1.6 * s)
    tex2 = _smooth_noise(C.rng("blue_tex2"), shape, 5 * s)
    edge_soft = np.clip((1.0 - L.rn) / 0.12, 0, 1)
    blue = nb[lab] * edge_soft * (0.78 + 0.1 * tex + 0.1 * tex2) * (1 - 0.45 * C.nucleoli_map())
    if any_mit:  # condensed chromosomes: a bright plate
        clumps = np.clip(0.55 + 0.5 * _smooth_noise(C.rng("chromosomes"), shape, 1.8 * s), 0, 1)
        plate = np.clip((1.0 - L.rn) / 0.35, 0, 1) * (0.5 + 0.9 * clumps) * nb[lab]
        blue = np.where(mit_px, plate, blue)

    # ---- red: microtubules radiating from the nucleus, cortex; spindle in dividing cells
    rb = rng.uniform(0.5, 1.0, n + 1).astype(np.float32)
    mt = C.microtubules()
    rdiff = 0.1 + 0.15 * np.exp(-L.t / 0.3)
    red = (1.2 * np.minimum(mt, 1.3) + rdiff) * cyto + 0.06 * nuc
    red = red * (0.6 + 0.4 * np.exp(-L.t / 0.4)) * C.edge_fade() + 0.05 * np.minimum(C.cell_edges(), 1) * inside
    red = red * rb[lab]
    if any_mit:  # tubulin forms the spindle in dividing cells
        red = np.where(mit_px, (0.08 + 0.25 * mt) * C.edge_fade() + 0.9 * _spindle(C), red)

    # ---- yellow: ER network, dense around the nucleus
    yb = rng.uniform(0.5, 1.0, n + 1).astype(np.float32)
    er = C.er_net()
    yellow = (1.5 * er + 0.4) * C.er_envelope() * yb[lab] + 0.06 * nuc
    if any_mit:  # the ER disperses in mitosis
        yellow = np.where(mit_px, 0.2 * (0.3 + 0.9 * er) * C.edge_fade(), yellow)

    # ---- green: the classes each cell expresses
    green = np.zeros(shape, np.float32)
    level = rng.uniform(0.3, 1.0)        # image-level staining strength (antibody / exposure)
    for k in np.flatnonzero(expr.any(0)):
        cells_k = expr[:, k]
        amp = np.where(cells_k, rng.uniform(0.55, 1.0, n + 1), 0).astype(np.float32)
        pat = PATTERNS[int(k)](C).astype(np.float32)
        green = np.maximum(green, pat * amp[lab] * level) if k in (0, 16) else green + pat * amp[lab] * level
    green += 0.02 * cyto * level   # faint autofluorescence

    # ---- optics and camera: blur, background, noise, gain
    out = np.empty((4,) + shape, np.uint8)
    gains = {"red": rng.uniform(80, 150), "green": rng.uniform(110, 210),
             "blue": rng.uniform(120, 200), "yellow": rng.uniform(130, 210)}
    noise_rng = C.rng("noise")
    bg_field = _smooth_noise(C.rng("bg"), shape, 60 * s)
    for ci, (name, ch) in enumerate(zip(CHANNELS, (red, green, blue, yellow), strict=True)):
        x = ndi.gaussian_filter(ch.astype(np.float32), 0.55 * s + 0.25, truncate=3.0)
        x = x * np.float32(gains[name])
        bg = rng.uniform(0.3, 2.5) * (1 + 0.25 * bg_field)
        # Uniform noise scaled to unit variance: indistinguishable here, 3x cheaper than normal.
        shot = (noise_rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(3.4641)
        x = x + bg + shot * np.sqrt(x * 0.3 + 0.8)
        out[ci] = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    return out


# ============================================================================ data set


def synth_sample(seed: int = 0, size: int = 512, heterogeneity: float = 0.5,
                 labels: Sequence[int] | None = None) -> SynthImage:
    """One synthetic image for demos and napari's sample data (same seed, same image)."""
    return generate_image(seed, size=size, labels=labels, heterogeneity=heterogeneity,
                          image_id=f"synth_sample_{seed}")


def image_id_for(seed: int, index: int) -> str:
    """Id of image ``index`` of the data set made with ``seed`` (Kaggle-like, no underscores)."""
    h = zlib.crc32(f"{seed}:{index}".encode())
    return f"synth-{seed}-{index:05d}-{h:08x}"


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, compress_level=1)  # fast; noisy images barely compress more


def iter_generate_dataset(
    out_dir: str | Path,
    n_images: int,
    size: int = 512,
    seed: int = 0,
    heterogeneity: float = 0.5,
    *,
    cell_scale: float | None = None,
    should_stop: ShouldStop | None = None,
) -> Iterator[Event]:
    """Write a synthetic data set in the Kaggle layout, yielding progress events.

    Layout::

        OUT/images/{ID}_{red,green,blue,yellow}.png   8-bit channels
        OUT/train.csv                                  ID,Label (image-level, '|'-joined)
        OUT/truth/{ID}_cells.png                       uint16 cell instance mask (0 = background)
        OUT/truth/cells.csv                            image_id,cell_id,labels ('|'-joined)
        OUT/synth.json                                 the parameters

    Image ``i`` depends only on ``(seed, i)``: a larger data set starts with the same images.
    Yields one ``ITEM`` event per image and a final ``DONE`` (``result`` = the folder), or
    ``STOPPED`` when ``should_stop()`` turns true (the CSVs then list the images written).
    """
    from napari_cpgcn.io.atomic import atomic_write_text
    from napari_cpgcn.io.tables import format_label_string

    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    out = Path(out_dir)
    check_writable(out / "images")
    (out / "truth").mkdir(parents=True, exist_ok=True)
    children = np.random.SeedSequence(seed).spawn(n_images)
    train_rows = ["ID,Label"]
    cell_rows = ["image_id,cell_id,labels"]
    class_counts = np.zeros(N_CLASSES, int)
    n_cells_total = 0
    stopped = False
    for i, child in enumerate(children):
        if should_stop is not None and should_stop():
            stopped = True
            break
        iid = image_id_for(seed, i)
        im = generate_image(child, size=size, heterogeneity=heterogeneity, cell_scale=cell_scale,
                            image_id=iid)
        for ci, color in enumerate(CHANNELS):
            _write_png(out / "images" / f"{iid}_{color}.png", im.data[ci])
        if im.cells.max() > 65535:
            raise ValueError(f"{iid}: more than 65535 cells do not fit a uint16 mask")
        _write_png(out / "truth" / f"{iid}_cells.png", im.cells.astype(np.uint16))
        train_rows.append(f"{iid},{format_label_string(im.image_labels)}")
        for c, row in enumerate(im.cell_labels, start=1):
            cell_rows.append(f"{iid},{c},{format_label_string(row)}")
        class_counts += im.image_labels
        n_cells_total += im.n_cells
        yield Event(EventKind.ITEM, stage="synth", batch=i + 1, n_batches=n_images,
                    message=iid, path=str(out / "images" / f"{iid}_green.png"))
    atomic_write_text(out / "train.csv", "\n".join(train_rows) + "\n")
    atomic_write_text(out / "truth" / "cells.csv", "\n".join(cell_rows) + "\n")
    params = {
        "generator": "napari_cpgcn.synth",
        "version": SYNTH_VERSION,
        "n_images": len(train_rows) - 1,
        "size": size,
        "seed": seed,
        "heterogeneity": heterogeneity,
        "cell_scale": cell_scale,
        "n_cells": n_cells_total,
        "class_counts": class_counts.tolist(),
        "layout": {
            "images": "images/{ID}_{red,green,blue,yellow}.png",
            "labels": "train.csv",
            "cells": "truth/{ID}_cells.png",
            "cell_labels": "truth/cells.csv",
        },
    }
    atomic_write_text(out / "synth.json", json.dumps(params, indent=2) + "\n")
    if stopped:
        yield Event(EventKind.STOPPED, stage="synth", message=f"stopped after {len(train_rows) - 1} images",
                    path=str(out), result=out)
    else:
        yield Event(EventKind.DONE, stage="synth", message=f"{n_images} images in {out}",
                    path=str(out), result=out)


def generate_dataset(
    out_dir: str | Path,
    n_images: int,
    size: int = 512,
    seed: int = 0,
    heterogeneity: float = 0.5,
    progress: Any = None,
    *,
    cell_scale: float | None = None,
    should_stop: ShouldStop | None = None,
) -> Path:
    """Write a synthetic data set (see :func:`iter_generate_dataset`); returns the folder.

    ``progress`` is any tqdm-like object (``update(n)``), or None.
    """
    result = Path(out_dir)
    for ev in iter_generate_dataset(out_dir, n_images, size, seed, heterogeneity,
                                    cell_scale=cell_scale, should_stop=should_stop):
        if ev.kind == EventKind.ITEM and progress is not None:
            progress.update(1)
        if ev.result is not None:
            result = Path(ev.result)
    return result
