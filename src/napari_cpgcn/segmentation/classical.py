"""Classical cell segmentation that needs no weights: nuclei, then geodesic cell territories.

1. **Scale.** The nucleus diameter *d* is measured on each image (unless given): the blue
   channel is thresholded on a ~512 px copy and *d* is the equivalent diameter of the median
   single nucleus (convex objects; debris and clusters left out). Every length below is a
   fraction of *d*, and the work happens at a resolution where a nucleus is
   :data:`WORKING_NUCLEUS_DIAMETER` pixels wide, so the same settings hold for a 512² Kaggle
   2018 image and a 3072² Kaggle 2021 one, and for magnifications the image size does not tell.
2. **Nuclei** (blue): Otsu threshold in log intensity (a bright mitotic nucleus does not hide
   dim ones), a contrast check (pure noise gives no nuclei), holes filled, touching nuclei
   split by a watershed on the distance transform seeded by its h-maxima (a real waist, not a
   bump, splits). Fragments under ``min_nucleus_fraction`` of a typical nucleus are debris. A
   dividing cell's two chromatin masses (a close pair of small nuclei) seed **one** cell, and a
   small fragment stuck to a nucleus (a bleb, or an over-split piece) joins that nucleus.
3. **Cell extent** (red + yellow, each scaled to its 99.5th percentile): a pixel belongs to a
   cell where the lightly smoothed cytoplasm signal rises above the background by
   ``cell_extent`` (15 %) of the typical cytoplasm level next to the nuclei. This is the HPA
   masks' convention — the dim cell periphery up to the neighbours is part of the cell — and it
   adapts to dim and bright, 8- and 16-bit images alike (measured in docs/segmentation.md).
4. **Cell boundaries**: every foreground pixel goes to the nucleus it can reach at the least
   *geodesic* cost, where crossing a pixel costs ``1 + valley_weight * (1 - I / I_max)²`` per
   pixel of path (``I`` = cytoplasm signal, ``I_max`` = its maximum within one nucleus
   diameter). Inside a cell the cost is ~1 (distance from the nucleus, so a cell's own dim
   patches do not cut it off); a dark valley between two cells costs many pixels' worth, so
   the line between touching cells runs along the valley instead of the straight, Voronoi-like
   cut halfway between the nuclei. (Dijkstra on the pixel grid: ``skimage.graph.MCP_Geometric``.)
5. Cells smaller than ``min_cell_fraction`` (20 %) of a nucleus are dropped; cells cut by the image
   border are kept (the HPA masks keep them), cells whose nucleus is outside the field are not
   found (nor are they in the HPA masks).

The labels are upsampled (nearest neighbour) to the input size.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "ClassicalParams",
    "segment_classical",
    "segment_classical_full",
    "segment_nuclei_image",
    "estimate_nucleus_diameter",
    "default_nucleus_diameter",
    "working_factor",
    "NUCLEUS_DIAMETER_FRACTION",
    "WORKING_NUCLEUS_DIAMETER",
]

log = logging.getLogger(__name__)

#: Fallback nucleus diameter as a fraction of sqrt(Y * X), used only when the blue channel
#: holds too few nuclei to measure (HPA fields: 0.08-0.12 of the side).
NUCLEUS_DIAMETER_FRACTION = 0.085
#: Nucleus diameter (pixels) at the internal working resolution when ``downscale="auto"``.
WORKING_NUCLEUS_DIAMETER = 32.0
#: The nucleus scale is measured on a copy of about this many pixels a side.
SCALE_PROBE_SIDE = 512


@dataclass
class ClassicalParams:
    """Parameters of the classical backend (lengths in full-resolution pixels).

    Attributes
    ----------
    nucleus_diameter : float or None
        Nucleus diameter in pixels; None = measured on each image
        (:func:`estimate_nucleus_diameter`).
    downscale : float or "auto"
        Integer-rounded factor by which to shrink the image before segmenting (1 = full
        resolution); "auto" works where a nucleus is ~32 px wide.
    nucleus_threshold_scale : float
        Multiplies the (log-intensity) Otsu threshold of the blue channel (< 1 finds dimmer
        nuclei).
    min_contrast : float
        Nuclei must be on average this many background standard deviations (and 1.5x)
        brighter than the background, else the image counts as empty (Otsu splits noise too).
    min_nucleus_fraction : float
        Blue objects smaller than this fraction of a typical nucleus are debris.
    split_nuclei : bool
        Split touching nuclei with a distance-transform watershed.
    split_depth : float
        How deep the waist (fraction of *d*, on the distance transform) or the seam (on the
        blue signal, relative to the bright nuclei: 0.05 d of waist counts like a 10 % dimmer
        seam) between two touching nuclei must be for them to be split (h of the h-maxima).
    merge_mitotic : bool
        Two small nuclei (each < 40 % of a typical one) within one nucleus diameter of each
        other are a dividing cell's chromatin and seed one cell; a small fragment touching a
        nucleus joins it.
    cell_extent : float
        Where a cell ends: the fraction of the typical cytoplasm level (above background) at
        which the smoothed red + yellow signal counts as cell. Smaller = larger cells.
    valley_weight : float
        Cost of crossing a pixel as dark as the background between two bright cells, in
        pixels of path inside a cell. 0 = each pixel goes to the nearest nucleus
        (a Voronoi split of the foreground).
    boundary_smoothing : float
        Gaussian sigma (fraction of *d*) of the signal the boundary cost is computed on.
    min_cell_fraction : float
        Cells smaller than this fraction of a nucleus area are dropped (0.2: the HPA
        pipeline's own cut, 5,500 px cells for 2,500 px minimal nuclei, keeps border slivers
        of about this size).
    """

    nucleus_diameter: float | None = None
    downscale: float | str = "auto"
    nucleus_threshold_scale: float = 1.0
    min_contrast: float = 10.0
    min_nucleus_fraction: float = 0.1
    split_nuclei: bool = True
    split_depth: float = 0.05
    merge_mitotic: bool = True
    cell_extent: float = 0.15
    valley_weight: float = 40.0
    boundary_smoothing: float = 0.05
    min_cell_fraction: float = 0.2

    def as_dict(self) -> dict:
        return asdict(self)


def default_nucleus_diameter(shape: tuple[int, int]) -> float:
    """The fallback nucleus diameter (pixels) for an image of ``shape`` (Y, X).

    Only a prior: the classical backend measures the diameter on each image
    (:func:`estimate_nucleus_diameter`) and falls back to this when it cannot.
    """
    return float(NUCLEUS_DIAMETER_FRACTION * np.sqrt(float(shape[0]) * float(shape[1])))


def working_factor(nucleus_diameter: float, downscale: float | str = "auto") -> int:
    """The integer block size by which the image is shrunk before segmentation."""
    if downscale == "auto":
        # floor: the nucleus stays at least WORKING_NUCLEUS_DIAMETER px wide (32-64 px)
        return max(1, int(nucleus_diameter / WORKING_NUCLEUS_DIAMETER))
    else:
        try:
            f = float(downscale)
        except (TypeError, ValueError):
            raise ValueError(f"downscale must be a number >= 1 or 'auto', got {downscale!r}") from None
        if f < 1:
            raise ValueError(f"downscale must be >= 1 (1 = full resolution), got {downscale}")
    return max(1, int(round(f)))


# --------------------------------------------------------------------------- small helpers


def _remove_small(mask_or_labels: np.ndarray, min_size: float) -> np.ndarray:
    """``skimage.morphology.remove_small_objects`` across its 0.26 signature change."""
    from skimage.morphology import remove_small_objects

    min_size = max(int(np.ceil(min_size)), 1)
    if mask_or_labels.dtype != bool and mask_or_labels.max() <= 1:
        # A single label: skimage would warn and treat it as a boolean mask anyway.
        keep = _remove_small(mask_or_labels > 0, min_size)
        return np.where(keep, mask_or_labels, 0).astype(mask_or_labels.dtype)
    if "max_size" in inspect.signature(remove_small_objects).parameters:
        return remove_small_objects(mask_or_labels, max_size=min_size - 1)
    return remove_small_objects(mask_or_labels, min_size=min_size)


def _shrink(plane: np.ndarray, f: int) -> np.ndarray:
    """Block-mean downscaling by an integer factor, as float32 (edge blocks are cropped)."""
    plane = np.asarray(plane)
    if f == 1:
        return plane.astype(np.float32)
    y, x = plane.shape
    # Only the blocks that fit; the remainder (< f px) is filled by edge replication later.
    core = plane[: (y // f) * f, : (x // f) * f] if y >= f and x >= f else plane
    if core.shape[0] % f or core.shape[1] % f:
        from skimage.transform import downscale_local_mean

        return downscale_local_mean(core, (f, f)).astype(np.float32)
    # Sum in float32 block by block: a 3072² uint16 plane never becomes a float64 copy.
    blocks = core.reshape(core.shape[0] // f, f, core.shape[1] // f, f)
    return blocks.sum(axis=(1, 3), dtype=np.float32) / np.float32(f * f)


def _expand(labels: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling by ``f`` back to ``shape`` (edge rows/columns replicated)."""
    if f == 1:
        return labels
    big = np.repeat(np.repeat(labels, f, axis=0), f, axis=1)
    py, px = shape[0] - big.shape[0], shape[1] - big.shape[1]
    if py > 0 or px > 0:
        big = np.pad(big, ((0, max(py, 0)), (0, max(px, 0))), mode="edge")
    return big[: shape[0], : shape[1]]


def _normalise(plane: np.ndarray) -> np.ndarray:
    """Scale a channel so that its 1st percentile is 0 and its 99.5th is 1.

    When objects cover < 0.5 % of the image on a flat background the percentile is the
    background: the maximum is used instead.
    """
    lo, hi = (float(v) for v in np.percentile(plane, [1.0, 99.5]))
    if hi <= lo:
        hi = float(plane.max())
    if hi <= lo:
        return np.zeros_like(plane, dtype=np.float32)
    return ((plane - lo) / (hi - lo)).astype(np.float32)


def _otsu(values: np.ndarray) -> float | None:
    """Otsu threshold, or None for a flat image."""
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.max()) - float(values.min()) < 1e-6:
        return None
    return float(threshold_otsu(values))


def _gaussian(a: np.ndarray, sigma: float) -> np.ndarray:
    return ndi.gaussian_filter(a.astype(np.float32, copy=False), max(float(sigma), 0.5), truncate=3.0)


def _has_contrast(raw: np.ndarray, mask: np.ndarray, min_contrast: float) -> bool:
    """Whether the pixels in ``mask`` stand out from the rest like nuclei, not like noise.

    Otsu always splits an image in two, even pure noise. On the HPA samples the nuclei are
    65-100 background standard deviations and 30-500x brighter than the background; split
    noise gives ~5 standard deviations and < 2x. Require ``min_contrast`` standard deviations
    and 1.5x.
    """
    if not mask.any() or mask.all():
        return False
    fg, bg = raw[mask], raw[~mask]
    fg_mean, bg_mean = float(fg.mean()), float(bg.mean())
    separation = (fg_mean - bg_mean) / max(float(bg.std()), 1e-6 * max(fg_mean, 1e-6))
    return fg_mean >= 1.5 * max(bg_mean, 0.0) and separation >= min_contrast


def _nucleus_mask(raw: np.ndarray, params: ClassicalParams) -> np.ndarray | None:
    """Foreground of a smoothed blue plane, or None when nothing stands out (blank, noise)."""
    smooth = _normalise(raw)
    # Threshold in log space: bright (mitotic) nuclei would otherwise push Otsu above dim ones.
    logb = np.log1p(np.clip(smooth, 0, None) * 100.0)
    t = _otsu(logb)
    if t is None:
        return None
    mask = logb > t * params.nucleus_threshold_scale
    # On a near-zero background log-Otsu can fall to the level of single hot pixels; real
    # thresholds sit at 2-8 % of the brightest nucleus (HPA samples), so floor it at 2 %.
    mask &= raw > 0.02 * float(raw.max())
    if not _has_contrast(raw, mask, params.min_contrast):
        # Otsu fails when nuclei cover a tiny fraction of the field (its threshold lands in
        # the noise): try a robust "background + k sigma" threshold before giving up.
        med = float(np.median(raw))
        sigma = 1.4826 * float(np.median(np.abs(raw - med)))
        mask = raw > med + params.min_contrast / 2.0 * max(sigma, 1e-6 * max(float(raw.max()), 1e-6))
        if not _has_contrast(raw, mask, params.min_contrast):
            return None
    return ndi.binary_fill_holes(mask)


# --------------------------------------------------------------------------- scale


def estimate_nucleus_diameter(blue: np.ndarray, params: ClassicalParams | None = None) -> float | None:
    """The typical nucleus diameter (pixels) of one image, measured on its blue channel.

    The blue plane is shrunk to ~512 px a side, thresholded like the nuclei themselves, and
    the diameter is that of a disc with the median area of the *single* nuclei: objects under
    a quarter of the median are debris; of the rest, convex ones (solidity >= 0.9) are single
    nuclei — clusters of touching nuclei are concave. Objects touching the border (cut) are
    left out when others exist. If the nuclei turn out tiny at that scale (< 16 px) the
    measurement is repeated at a finer one.

    Parameters
    ----------
    blue
        (Y, X) blue channel, any numeric dtype, full resolution.
    params
        Threshold settings (``nucleus_threshold_scale``, ``min_contrast``).

    Returns
    -------
    float or None
        Diameter in full-resolution pixels, or None when the channel holds no nuclei.
    """
    from skimage.measure import regionprops_table

    params = params or ClassicalParams()
    shape = blue.shape
    f0 = max(1, int(np.sqrt(float(shape[0]) * float(shape[1])) // SCALE_PROBE_SIDE))
    d = None
    for _ in range(2):
        small = _shrink(blue, f0)
        mask = _nucleus_mask(_gaussian(small, 1.0), params)
        if mask is None:
            return None
        lab, n = ndi.label(mask)
        if n == 0:
            return None
        props = regionprops_table(lab, properties=("area", "solidity", "bbox"))
        area = np.asarray(props["area"], float)
        solidity = np.asarray(props["solidity"], float)
        y0, x0, y1, x1 = (np.asarray(props[f"bbox-{i}"]) for i in range(4))
        inner = (y0 > 0) & (x0 > 0) & (y1 < small.shape[0]) & (x1 < small.shape[1])
        ok = area >= 9
        if (ok & inner).any():
            ok &= inner
        if not ok.any():
            return None
        med = float(np.median(area[ok]))
        ok &= area >= 0.25 * med
        single = ok & (solidity >= 0.9)
        med = float(np.median(area[single] if single.sum() >= 3 else area[ok]))
        d = 2.0 * np.sqrt(med / np.pi) * f0
        if d / f0 >= 16 or f0 == 1:
            break
        f0 = max(1, int(d / 24))  # nuclei tiny at this scale: measure again, finer
    log.debug("nucleus diameter measured: %.1f px (%s image)", d, shape)
    return float(d)


# --------------------------------------------------------------------------- nuclei


def segment_nuclei(blue: np.ndarray, diameter: float, params: ClassicalParams) -> np.ndarray:
    """Nucleus instance labels from a (working-resolution) blue plane.

    Parameters
    ----------
    blue
        Blue channel (raw intensities, float32).
    diameter
        Nucleus diameter at this resolution (pixels).
    params
        Thresholds and switches.

    Returns
    -------
    numpy.ndarray
        (Y, X) int32 labels, one per nucleus object (debris removed; mitotic pairs still two).
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    raw = _gaussian(blue, diameter / 16.0)
    mask = _nucleus_mask(raw, params)
    if mask is None:
        log.info("no nuclei: nothing in the blue channel stands out %.0f standard deviations "
                 "above the background", params.min_contrast)
        return np.zeros(blue.shape, np.int32)
    nucleus_area = np.pi * (diameter / 2.0) ** 2
    mask = _remove_small(mask, params.min_nucleus_fraction * nucleus_area)
    if not mask.any():
        return np.zeros(blue.shape, np.int32)
    if not params.split_nuclei:
        return ndi.label(mask)[0].astype(np.int32)
    # The nuclear "core": pixels above half the brightest blue within d/2, holes filled. A dim
    # seam between two touching nuclei falls out of it (half-maximum of both neighbours) and
    # leaves a waist; a dark nucleolus is a hole and is filled back; a dim nucleus next to a
    # bright one keeps its own core (the window is only half a nucleus wide).
    core = mask & (raw > 0.5 * ndi.maximum_filter(raw, size=max(3, int(round(diameter / 2.0)))))
    core = ndi.binary_fill_holes(core)
    dist = ndi.distance_transform_edt(core).astype(np.float32)
    dist = _gaussian(dist, diameter / 16.0)
    # The splitting landscape: distance to the core's edge in nucleus radii (shape: a waist
    # between two nuclei) plus the blue signal smoothed over 0.15 d relative to the bright
    # nuclei (a dim seam, or a bright chromatin clump next to an interphase nucleus).
    glow = _gaussian(blue, 0.15 * diameter)
    ref = float(np.percentile(glow[mask], 95))
    land = dist / np.float32(diameter / 2.0) + glow / np.float32(max(ref, 1e-6))
    comp, _ = ndi.label(mask)
    # A maximum of the landscape seeds a nucleus only if it rises by h above the saddle to
    # any higher one: a waist or a seam, not a bump or a nucleolus, splits.
    seeds = h_maxima(land.astype(np.float32), 2.0 * params.split_depth) & mask
    markers, n = ndi.label(seeds)
    markers = markers.astype(np.int32)
    # Components too thin to hold a peak still count as one nucleus each.
    missing = np.setdiff1d(np.unique(comp[mask]), np.unique(comp[markers > 0]))
    if len(missing):
        extra = np.isin(comp, missing)
        markers[extra] = comp[extra] + n
    nuclei = watershed(-land, markers, mask=mask)
    nuclei = _remove_small(nuclei, params.min_nucleus_fraction * nucleus_area)
    return nuclei.astype(np.int32)


def nucleus_seeds(nuclei: np.ndarray, diameter: float, params: ClassicalParams,
                  blue: np.ndarray | None = None) -> np.ndarray:
    """Map nucleus objects to cell seeds: label ``i`` of ``nuclei`` seeds cell ``seeds[i]``.

    Each nucleus seeds its own cell, except (``merge_mitotic``) a dividing cell's two
    chromatin masses — mutually nearest small objects (each < 40 % of a nucleus of diameter d,
    sizes within 2.5x, and, when ``blue`` is given, peaking at >= 90 % of the median nucleus'
    peak: condensed chromatin) whose centres are less than one nucleus diameter
    apart — which seed one cell together, and a small object (< 35 %) touching a larger
    nucleus, which joins it. Objects touching the image border are small because they are
    cut, so they take part in neither rule.

    Returns
    -------
    numpy.ndarray
        (max label + 1,) int array; entry 0 is 0.
    """
    n = int(nuclei.max())
    seed_of = np.arange(n + 1)
    if n < 2 or not params.merge_mitotic:
        return seed_of
    ids = np.arange(1, n + 1)
    area = ndi.sum_labels(np.ones(nuclei.shape, np.float32), nuclei, ids)
    present = area > 0
    # The typical nucleus is the one of diameter d (measured on the image as the median
    # single nucleus): a field with several dividing cells must not lower the yardstick.
    typical = np.pi * (diameter / 2.0) ** 2
    cy, cx = (np.asarray(c) for c in zip(*ndi.center_of_mass(np.ones(nuclei.shape), nuclei, ids), strict=True))
    border = np.zeros(n + 1, bool)
    for edge in (nuclei[0], nuclei[-1], nuclei[:, 0], nuclei[:, -1]):
        border[edge] = True
    inner = present & ~border[1:]
    small = inner & (area < 0.4 * typical)
    if blue is not None:
        # Condensed chromatin is bright: its peak is at least 90 % of the median nucleus peak
        # (peaks, not means: a mask that is a little too wide dilutes a small object's mean).
        peak = ndi.maximum(_gaussian(blue, diameter / 16.0), nuclei, ids)
        small &= peak >= 0.9 * float(np.median(peak[present]))
    merged = np.zeros(n + 1, bool)
    idx = np.flatnonzero(small)
    if len(idx) >= 2:
        dy = cy[idx, None] - cy[None, idx]
        dx = cx[idx, None] - cx[None, idx]
        dd = np.hypot(dy, dx)
        np.fill_diagonal(dd, np.inf)
        nearest = dd.argmin(1)
        for a, b in enumerate(nearest):
            if nearest[b] == a and a < b and dd[a, b] < diameter:
                ra = area[idx[a]] / max(area[idx[b]], 1.0)
                if 1 / 2.5 <= ra <= 2.5:
                    seed_of[idx[b] + 1] = idx[a] + 1
                    merged[[idx[a] + 1, idx[b] + 1]] = True
    # Small leftovers touching a bigger nucleus (a bleb, or a piece the split cut off) join it.
    blebs = [i + 1 for i in np.flatnonzero(inner & (area < 0.35 * typical)) if not merged[i + 1]]
    if blebs:
        boxes = ndi.find_objects(nuclei)
        for i in blebs:
            box = boxes[i - 1]
            if box is None:
                continue
            box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
            sub = nuclei[box]
            ring = ndi.binary_dilation(sub == i) & (sub != i) & (sub > 0)
            touching = np.unique(sub[ring])
            if len(touching):
                big = int(touching[np.argmax(area[touching - 1])])
                if area[big - 1] > area[i - 1]:
                    seed_of[i] = seed_of[big]
    return seed_of


# --------------------------------------------------------------------------- cells


def cell_foreground(cyto: np.ndarray, nuclei: np.ndarray, diameter: float, params: ClassicalParams) -> np.ndarray:
    """Pixels that belong to some cell: cytoplasm signal above the HPA-convention extent threshold.

    The threshold is ``background + cell_extent * (level - background)`` on the cytoplasm
    signal smoothed with sigma = d/10, where ``level`` is the upper quartile of the signal in
    a ring of d/6 around the nuclei (the cytoplasm every cell has, even one whose nucleus
    fills it) and ``background`` the median signal farther than d from every nucleus (the
    2nd percentile of the field when cells cover nearly all of it). Nuclei are always inside;
    holes are filled.
    """
    smooth = _gaussian(cyto, diameter / 10.0)
    dist = ndi.distance_transform_edt(nuclei == 0)
    near = (dist > 0) & (dist <= max(1.0, diameter / 6.0))
    if not near.any():
        return ndi.binary_fill_holes(nuclei > 0)
    level = float(np.percentile(smooth[near], 75))
    far = dist > diameter
    if far.mean() > 0.05:
        background = float(np.median(smooth[far]))
    else:  # confluent: hardly any pixel is far from a nucleus
        background = float(np.percentile(smooth, 2.0))
    if level <= background:
        # No cytoplasm signal (e.g. red and yellow empty): cells are their nuclei.
        return ndi.binary_fill_holes(nuclei > 0)
    t = background + params.cell_extent * (level - background)
    return ndi.binary_fill_holes((smooth > t) | (nuclei > 0))


def boundary_cost(cyto: np.ndarray, diameter: float, params: ClassicalParams) -> np.ndarray:
    """Cost per pixel of path: 1 inside bright cytoplasm, up to ``1 + valley_weight`` in dark valleys.

    ``1 + valley_weight * (1 - I / I_max)**2`` with ``I`` the cytoplasm signal smoothed by
    ``boundary_smoothing * d`` and ``I_max`` its maximum within one nucleus diameter: the
    darkness of a pixel relative to its surroundings, so a dim cell's valleys count as much
    as a bright one's.
    """
    sig = _gaussian(np.clip(cyto, 0, None), params.boundary_smoothing * diameter)
    local_max = ndi.maximum_filter(sig, size=max(3, int(round(diameter))))
    dark = 1.0 - sig / np.maximum(local_max, 1e-6)
    return (1.0 + params.valley_weight * np.clip(dark, 0.0, 1.0) ** 2).astype(np.float64)


def geodesic_assign(cost: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give each ``mask`` pixel the label of the seed with the cheapest path to it.

    ``cost`` is the cost per unit length of path (diagonal steps count sqrt 2); paths stay
    inside ``mask``. Pixels the seeds cannot reach stay 0. Dijkstra from all seed pixels at
    once (``skimage.graph.MCP_Geometric``); each pixel's label is found by following the
    shortest-path tree back to its seed (pointer jumping, a few vectorised passes).
    """
    from skimage.graph import MCP_Geometric
    from skimage.segmentation import find_boundaries

    seeds = np.asarray(seeds)
    # Paths start on the seeds' outlines: a seed's interior is nearer its own outline than any
    # other seed, and MCP's cost grows with the number of start points.
    starts = np.argwhere(find_boundaries(seeds, mode="inner") & (seeds > 0))
    if len(starts) == 0:
        return np.zeros(seeds.shape, np.int32)
    c = np.where(mask | (seeds > 0), cost, np.inf)
    mcp = MCP_Geometric(c, fully_connected=True)
    cumulative, traceback = mcp.find_costs(starts)
    h, w = seeds.shape
    offsets = np.asarray(mcp.offsets)
    tb = traceback.ravel()
    pred = np.arange(h * w)
    reached = tb >= 0
    rows, cols = np.divmod(np.flatnonzero(reached), w)
    step = offsets[tb[reached]]
    # traceback holds the offset from the predecessor to the pixel.
    pred[reached] = (rows - step[:, 0]) * w + (cols - step[:, 1])
    flat_seeds = seeds.ravel()
    is_seed = flat_seeds > 0
    pred[is_seed] = np.flatnonzero(is_seed)  # seed pixels are their own roots
    for _ in range(64):  # path lengths double each pass: 64 passes cover any image
        nxt = pred[pred]
        if np.array_equal(nxt, pred):
            break
        pred = nxt
    labels = flat_seeds[pred].reshape(h, w).astype(np.int32)
    labels[~np.isfinite(cumulative)] = 0
    labels[~(mask | (seeds > 0))] = 0
    return labels


def segment_cells_from_nuclei(
    cyto: np.ndarray, seeds: np.ndarray, diameter: float, params: ClassicalParams
) -> np.ndarray:
    """Grow seed labels (nuclei) into cell territories (working resolution)."""
    if not seeds.any():
        return np.zeros(cyto.shape, np.int32)
    fg = cell_foreground(cyto, seeds, diameter, params)
    cells = geodesic_assign(boundary_cost(cyto, diameter, params), seeds, fg)
    nucleus_area = np.pi * (diameter / 2.0) ** 2
    return _remove_small(cells, params.min_cell_fraction * nucleus_area).astype(np.int32)


# --------------------------------------------------------------------------- whole images


def _resolve_scale(data: np.ndarray, params: ClassicalParams) -> tuple[float | None, int]:
    shape = tuple(int(s) for s in data.shape[1:])
    working_factor(WORKING_NUCLEUS_DIAMETER, params.downscale)  # a bad downscale fails even on a blank image
    if not 0 < params.cell_extent < 1:
        raise ValueError(f"cell_extent must be between 0 and 1, got {params.cell_extent}")
    if params.valley_weight < 0:
        raise ValueError(f"valley_weight must be >= 0, got {params.valley_weight}")
    if params.nucleus_diameter is not None:
        diameter = float(params.nucleus_diameter)
        if diameter <= 0:
            raise ValueError(f"nucleus_diameter must be > 0 pixels, got {diameter}")
        if diameter > min(shape) / 2:
            log.warning("nucleus_diameter %.0f px is more than half the image side (%s): expect no cells",
                        diameter, shape)
    else:
        diameter = estimate_nucleus_diameter(data[2], params)
        if diameter is None:
            return None, 1
    f = working_factor(diameter, params.downscale)
    f = min(f, max(1, min(shape) // 16))  # never shrink below 16 px a side
    return diameter, f


def segment_classical_full(
    data: np.ndarray, params: ClassicalParams | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cells, nuclei and what was measured, for a (4, Y, X) HPA image.

    Returns
    -------
    cells : numpy.ndarray
        (Y, X) uint32 cell labels 1..n, 0 = background.
    nuclei : numpy.ndarray
        (Y, X) uint32 nucleus labels: the nucleus of cell ``i`` is labelled ``i`` (a dividing
        cell's two chromatin masses share it); nuclei whose cell was dropped (too small)
        follow as ``n + 1, ...``.
    info : dict
        ``nucleus_diameter`` (px, full resolution; None for an image without nuclei),
        ``working_factor``, ``n_nucleus_objects`` (before mitotic pairs were joined).
    """
    from skimage.segmentation import relabel_sequential

    params = params or ClassicalParams()
    shape = tuple(int(s) for s in data.shape[1:])
    diameter, f = _resolve_scale(data, params)
    info = {"nucleus_diameter": diameter, "working_factor": f, "n_nucleus_objects": 0}
    if diameter is None:
        log.info("no nuclei: nothing in the blue channel stands out %.0f standard deviations "
                 "above the background", params.min_contrast)
        empty = np.zeros(shape, np.uint32)
        return empty, empty.copy(), info
    d_work = diameter / f
    log.debug("classical segmentation: %s, nucleus %.0f px, working factor %d", shape, diameter, f)
    blue = _shrink(data[2], f)
    nuclei = segment_nuclei(blue, d_work, params)
    info["n_nucleus_objects"] = int(len(np.unique(nuclei)) - 1)
    seed_of = nucleus_seeds(nuclei, d_work, params, blue)
    seeds = seed_of[nuclei].astype(np.int32)
    cyto = _normalise(_shrink(data[0], f)) + _normalise(_shrink(data[3], f))
    cells = segment_cells_from_nuclei(cyto, seeds, d_work, params)
    cells, fw, _ = relabel_sequential(cells)
    n_cells = int(cells.max())
    # Nuclei carry their cell's id; seeds whose cell was dropped get ids after the cells.
    seed_ids = np.unique(seeds[seeds > 0])
    new_id = np.zeros(int(seeds.max()) + 1, np.int64)
    kept = fw[seed_ids] if len(seed_ids) else np.array([], int)
    new_id[seed_ids] = kept
    lost = seed_ids[kept == 0]
    new_id[lost] = n_cells + 1 + np.arange(len(lost))
    nuclei_out = new_id[seeds]
    return (_expand(cells.astype(np.uint32), f, shape), _expand(nuclei_out.astype(np.uint32), f, shape), info)


def segment_classical(data: np.ndarray, params: ClassicalParams | None = None) -> np.ndarray:
    """Segment a (4, Y, X) HPA image (red, green, blue, yellow) into cells.

    Parameters
    ----------
    data
        The four channels, any numeric dtype.
    params
        :class:`ClassicalParams`; defaults when None.

    Returns
    -------
    numpy.ndarray
        (Y, X) uint32 labels, 0 = background, cells numbered 1..n.
    """
    return segment_classical_full(data, params)[0]


def segment_nuclei_image(data: np.ndarray, params: ClassicalParams | None = None) -> np.ndarray:
    """Nuclei of a (4, Y, X) image at full resolution (the classical nucleus step alone).

    Labels 1..m, one per cell seed (a dividing cell's two chromatin masses share one label).
    """
    params = params or ClassicalParams()
    shape = tuple(int(s) for s in data.shape[1:])
    diameter, f = _resolve_scale(data, params)
    if diameter is None:
        return np.zeros(shape, np.uint32)
    d_work = diameter / f
    blue = _shrink(data[2], f)
    nuclei = segment_nuclei(blue, d_work, params)
    seeds = nucleus_seeds(nuclei, d_work, params, blue)[nuclei]
    from skimage.segmentation import relabel_sequential

    return _expand(relabel_sequential(seeds.astype(np.int32))[0].astype(np.uint32), f, shape)
