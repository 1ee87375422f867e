"""Cell segmentation of HPA images: one function, two backends.

>>> labels = segment_cells(image)                                # classical, no weights
>>> labels = segment_cells(image, method="cellpose", model="cyto3")
>>> result = segment_cells_with_qc(image)                       # + nuclei + quality control
>>> result.cells, result.nuclei, result.qc["check_masks"]

``segment_cells`` takes an :class:`~napari_cpgcn.io.hpa.HPAImage` or a (4, Y, X) array in
the channel order red, green, blue, yellow and returns a (Y, X) ``uint32`` label image
(0 = background, cells 1..n) at the input's full resolution. Keyword parameters are those
of :class:`~napari_cpgcn.segmentation.classical.ClassicalParams` or
:class:`~napari_cpgcn.segmentation.cellpose_backend.CellposeParams`.

:func:`segment_cells_with_qc` returns the cells together with the nuclei and the
:func:`~napari_cpgcn.segmentation.qc.mask_qc` numbers (cell count, share cut by the border,
a flag when nuclei and cells disagree).

No Qt, napari or torch at import; cellpose (and torch) load only when that backend runs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_cpgcn.segmentation.cellpose_backend import CellposeParams, resolve_cellpose_weights
from napari_cpgcn.segmentation.classical import (
    ClassicalParams,
    default_nucleus_diameter,
    estimate_nucleus_diameter,
)
from napari_cpgcn.segmentation.qc import QC_FIELDS, image_qc, mask_qc

__all__ = [
    "METHODS",
    "segment_cells",
    "segment_cells_with_qc",
    "SegmentationResult",
    "make_params",
    "check_method",
    "mask_qc",
    "image_qc",
    "QC_FIELDS",
    "estimate_nucleus_diameter",
    "ClassicalParams",
    "CellposeParams",
    "default_nucleus_diameter",
    "resolve_cellpose_weights",
]

log = logging.getLogger(__name__)

#: Available methods and their parameter dataclasses.
METHODS: dict[str, type] = {"classical": ClassicalParams, "cellpose": CellposeParams}


def make_params(method: str = "classical", **params: Any):
    """The parameter dataclass of ``method`` filled from keyword arguments.

    Raises
    ------
    ValueError
        Unknown method, or a parameter the method does not have (the message lists the valid ones).
    """
    if method not in METHODS:
        raise ValueError(f"unknown segmentation method {method!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[method]
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in params if k not in names]
    if unknown:
        raise ValueError(
            f"segmentation method {method!r} has no parameter(s) {', '.join(unknown)}; "
            f"valid: {', '.join(names)}"
        )
    # None means "the default" for every parameter.
    return cls(**{k: v for k, v in params.items() if v is not None})


def check_method(method: str = "classical", **params: Any):
    """Check a segmentation request before any image is touched: the method, its parameters
    and, for cellpose, that its weights are there. Returns the parameter dataclass.

    A folder run calls this once, so a typo or a missing weight file is one clear error, not
    one failure per image.
    """
    p = make_params(method, **params)
    if method == "cellpose":  # fetched now when absent and allowed (cellpose's own downloader)
        resolve_cellpose_weights(p.model, p.models_dir, download=p.download, url_base=p.url_base)
    return p


def _as_array(image: Any) -> np.ndarray:
    data = getattr(image, "data", image)
    data = np.asarray(data)
    if data.ndim != 3 or data.shape[0] != 4:
        raise ValueError(
            f"segment_cells needs a (4, Y, X) image (red, green, blue, yellow), got shape {data.shape}; "
            "read images with napari_cpgcn.io.read_image"
        )
    if min(data.shape[1:]) < 8:
        raise ValueError(f"image of size {data.shape[1:]} is too small to segment (need >= 8 px)")
    return data


def segment_cells(image: Any, method: str = "classical", **params: Any) -> np.ndarray:
    """Segment an HPA image into cells.

    Parameters
    ----------
    image
        :class:`~napari_cpgcn.io.hpa.HPAImage` or (4, Y, X) array (red, green, blue, yellow).
    method
        ``"classical"`` (nucleus-seeded watershed, no weights; default) or ``"cellpose"``.
    **params
        Fields of :class:`ClassicalParams` / :class:`CellposeParams`, e.g.
        ``nucleus_diameter=180``, ``downscale=1``, ``model="cyto3"``.

    Returns
    -------
    numpy.ndarray
        (Y, X) uint32 labels at full resolution; 0 = background. A blank image gives all zeros.

    See Also
    --------
    segment_cells_with_qc : the same, with the nuclei and quality-control numbers.
    """
    p = make_params(method, **params)
    data = _as_array(image)
    if method == "cellpose":
        from napari_cpgcn.segmentation.cellpose_backend import segment_cellpose

        labels = segment_cellpose(data, p)
    else:
        from napari_cpgcn.segmentation.classical import segment_classical

        labels = segment_classical(data, p)
    log.debug("segmented %s with %s: %d cells", data.shape[1:], method, int(labels.max()))
    return labels


@dataclass
class SegmentationResult:
    """Cells, nuclei and quality control of one image (:func:`segment_cells_with_qc`).

    Attributes
    ----------
    cells : numpy.ndarray
        (Y, X) uint32 cell labels, 0 = background (what :func:`segment_cells` returns).
    nuclei : numpy.ndarray
        (Y, X) uint32 nucleus labels. Classical method: the nucleus of cell ``i`` is labelled
        ``i`` (a dividing cell's two chromatin masses share it), nuclei whose cell was too
        small to keep follow after the cells. Cellpose: the classical nucleus step's nuclei,
        numbered on their own.
    qc : dict
        :func:`~napari_cpgcn.segmentation.qc.mask_qc` of ``cells`` and ``nuclei`` plus
        ``method`` and ``nucleus_diameter`` (the measured or given diameter, px).
    """

    cells: np.ndarray
    nuclei: np.ndarray
    qc: dict[str, Any] = field(default_factory=dict)


def segment_cells_with_qc(image: Any, method: str = "classical", **params: Any) -> SegmentationResult:
    """:func:`segment_cells`, also returning the nuclei and quality-control numbers.

    Parameters
    ----------
    image, method, **params
        As for :func:`segment_cells`.

    Returns
    -------
    SegmentationResult
        ``cells`` (identical to :func:`segment_cells`' result), ``nuclei`` and ``qc``.
    """
    p = make_params(method, **params)
    data = _as_array(image)
    if method == "cellpose":
        from napari_cpgcn.segmentation.cellpose_backend import segment_cellpose
        from napari_cpgcn.segmentation.classical import segment_nuclei_image

        cells = segment_cellpose(data, p)
        diameter = p.nucleus_diameter or estimate_nucleus_diameter(data[2])
        nuclei = segment_nuclei_image(data, ClassicalParams(nucleus_diameter=diameter))
    else:
        from napari_cpgcn.segmentation.classical import segment_classical_full

        cells, nuclei, info = segment_classical_full(data, p)
        diameter = info["nucleus_diameter"]
    qc = mask_qc(cells, nuclei)
    qc.update(method=method, nucleus_diameter=None if diameter is None else round(float(diameter), 1))
    log.debug("segmented %s with %s: %d cells, qc %s", data.shape[1:], method, qc["n_cells"], qc)
    return SegmentationResult(cells=cells, nuclei=nuclei, qc=qc)
