"""Cellpose backend: cytoplasm from red + yellow, nucleus from blue.

Weights are never downloaded. A built-in model name (``cyto3``, ``nuclei``, ``cpsam``, ...)
is looked up where cellpose keeps its models — ``$CELLPOSE_LOCAL_MODELS_PATH`` or
``~/.cellpose/models`` — or in an explicit ``models_dir``; a path to a model file is used as
is. When the file is missing a :class:`FileNotFoundError` names the folder and the file name
to put there, *before* cellpose (and torch) are imported, so an offline machine gets the
answer in milliseconds instead of a network timeout or silently random weights.

Model objects are cached (:func:`functools.lru_cache`) per (weights file, device), so a batch
or a widget pays the loading cost once. The GPU is used when torch sees one.

cellpose 3 (``cyto3``, ``nuclei``, ``cyto2``, ``cyto``, custom CP3 models) takes a two-channel
image ``[cytoplasm, nucleus]``; cellpose 4 (``cpsam``) takes up to three channels and has no
``channels`` argument. Both are supported; the installed major version decides.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CellposeParams",
    "BUILTIN_MODEL_FILES",
    "cellpose_models_dir",
    "cellpose_major_version",
    "resolve_cellpose_weights",
    "load_cellpose_model",
    "segment_cellpose",
]

log = logging.getLogger(__name__)

#: Built-in cellpose model names and the file each one is stored as in the models folder.
BUILTIN_MODEL_FILES: dict[str, str] = {
    "cyto3": "cyto3",
    "nuclei": "nucleitorch_0",
    "cyto2": "cyto2torch_0",
    "cyto": "cytotorch_0",
    "cpsam": "cpsam",
}
#: Models that need cellpose >= 4 (the SAM-based architecture).
CELLPOSE4_MODELS = ("cpsam",)
_URL = "https://www.cellpose.org/models"  # where the files come from (for the error message)
_CPSAM_URL = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/cpsam"

#: Cell diameter relative to the classical backend's nucleus diameter (HPA cells ~ 2x nuclei).
CELL_TO_NUCLEUS = 2.0
#: Cell diameter (pixels) at the working resolution when ``downscale="auto"``.
WORKING_CELL_DIAMETER = 60.0


@dataclass
class CellposeParams:
    """Parameters of the cellpose backend (lengths in full-resolution pixels).

    Attributes
    ----------
    model : str
        ``cyto3`` (default), ``nuclei``, ``cpsam``, ``cyto2``, ``cyto``, or a path to a
        model file.
    models_dir : str or None
        Folder holding built-in model files; None = ``$CELLPOSE_LOCAL_MODELS_PATH`` or
        ``~/.cellpose/models``.
    diameter : float or None
        Expected cell diameter in pixels; None = 2 x the default nucleus diameter of the
        image size (the ``nuclei`` model uses the nucleus diameter).
    nucleus_diameter : float or None
        Expected nucleus diameter; used to derive ``diameter`` when that is None.
    downscale : float or "auto"
        Shrink the image by this integer-rounded factor first ("auto": cells ~ 60 px wide);
        labels are upsampled (nearest) to the full size.
    gpu : bool or None
        None = use a GPU when torch sees one.
    flow_threshold, cellprob_threshold : float
        cellpose's own thresholds.
    """

    model: str = "cyto3"
    models_dir: str | None = None
    diameter: float | None = None
    nucleus_diameter: float | None = None
    downscale: float | str = "auto"
    gpu: bool | None = None
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def cellpose_models_dir(models_dir: str | os.PathLike | None = None) -> Path:
    """The folder where built-in cellpose weights are looked up (the same rule as cellpose's)."""
    if models_dir:
        return Path(models_dir).expanduser()
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env).expanduser() if env else Path.home() / ".cellpose" / "models"


def cellpose_major_version() -> int | None:
    """The installed cellpose major version (from package metadata, without importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("cellpose").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return None


def resolve_cellpose_weights(model: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> Path:
    """The weight file of ``model`` on this machine, or a :class:`FileNotFoundError` saying where to put it.

    Parameters
    ----------
    model
        A built-in name (see :data:`BUILTIN_MODEL_FILES`), the name of a user model file in
        the models folder, or a path to a model file.
    models_dir
        Overrides the models folder.
    """
    model_str = os.fspath(model)
    folder = cellpose_models_dir(models_dir)
    path = Path(model_str).expanduser()
    if path.is_file():
        return path
    if model_str in BUILTIN_MODEL_FILES:
        fname = BUILTIN_MODEL_FILES[model_str]
        candidate = folder / fname
        if candidate.is_file():
            return candidate
        url = _CPSAM_URL if model_str == "cpsam" else f"{_URL}/{fname}"
        raise FileNotFoundError(
            f"cellpose model {model_str!r}: weight file {fname!r} not found in {folder}. "
            f"Weights are never downloaded at run time: on a machine with internet, download "
            f"{url} and place it as {candidate} (or set CELLPOSE_LOCAL_MODELS_PATH to the folder "
            f"holding it, or pass the file's path as the model). The classical method needs no weights."
        )
    if path.is_dir():
        raise FileNotFoundError(f"cellpose model {model_str!r} is a folder; give the model file inside it")
    candidate = folder / model_str
    if os.sep not in model_str and candidate.is_file():  # a user-trained model saved in the folder
        return candidate
    raise FileNotFoundError(
        f"cellpose model {model_str!r}: no such file (also looked for {candidate}). Give a path to a "
        f"model file or one of the built-in names {', '.join(BUILTIN_MODEL_FILES)} with its weight "
        f"file placed in {folder}."
    )


def _want_gpu(gpu: bool | None) -> bool:
    if gpu is not None:
        return bool(gpu)
    import torch

    return bool(torch.cuda.is_available())


@functools.lru_cache(maxsize=4)
def load_cellpose_model(weights: str, gpu: bool = False, is_nuclei: bool = False):
    """A cellpose ``CellposeModel`` for a weight file (cached per file and device).

    Parameters
    ----------
    weights
        Path to the weight file (see :func:`resolve_cellpose_weights`).
    gpu
        Put the model on the GPU.
    is_nuclei
        The file is cellpose's built-in ``nuclei`` model (its mean diameter is 17 px).
    """
    from cellpose import models

    log.info("loading cellpose model %s (gpu=%s)", weights, gpu)
    model = models.CellposeModel(gpu=gpu, pretrained_model=weights)
    if is_nuclei and cellpose_major_version() == 3:
        # cellpose 3 recognises the built-in nuclei model by its file name only.
        model.diam_mean = 17.0
    return model


def _resolve_diameter(params: CellposeParams, shape: tuple[int, int]) -> float:
    from napari_cpgcn.segmentation.classical import default_nucleus_diameter

    if params.diameter:
        return float(params.diameter)
    nucleus = params.nucleus_diameter or default_nucleus_diameter(shape)
    return float(nucleus if params.model == "nuclei" else CELL_TO_NUCLEUS * nucleus)


def segment_cellpose(data: np.ndarray, params: CellposeParams | None = None) -> np.ndarray:
    """Segment a (4, Y, X) HPA image with cellpose.

    Parameters
    ----------
    data
        Channels red, green, blue, yellow.
    params
        :class:`CellposeParams`.

    Returns
    -------
    numpy.ndarray
        (Y, X) uint32 labels, 0 = background.

    Raises
    ------
    FileNotFoundError
        The weight file is not on this machine (raised before cellpose is imported).
    """
    from napari_cpgcn.segmentation.classical import _expand, _normalise, _shrink, working_factor

    params = params or CellposeParams()
    major = cellpose_major_version()
    if major is None:
        raise ModuleNotFoundError(
            "the cellpose method needs the cellpose package: pip install 'napari-cpgcn[cellpose]' "
            "(or use method='classical', which needs no weights)"
        )
    weights = resolve_cellpose_weights(params.model, params.models_dir)
    if params.model in CELLPOSE4_MODELS and major < 4:
        raise ValueError(f"model {params.model!r} needs cellpose >= 4; cellpose {major} is installed. "
                         "Use cyto3 or upgrade: pip install 'cellpose>=4'")
    if params.model in BUILTIN_MODEL_FILES and params.model not in CELLPOSE4_MODELS and major >= 4:
        raise ValueError(f"model {params.model!r} is a cellpose 3 model; cellpose {major} runs only "
                         "cpsam. Use model='cpsam' or pip install 'cellpose<4'")
    shape = tuple(int(s) for s in data.shape[1:])
    diameter = _resolve_diameter(params, shape)
    if params.downscale == "auto":
        f = max(1, int(round(diameter / WORKING_CELL_DIAMETER)))
    else:
        f = working_factor(diameter, params.downscale)
    f = min(f, max(1, min(shape) // 16))  # never shrink below 16 px a side
    red, blue, yellow = (_normalise(_shrink(data[i], f)) for i in (0, 2, 3))
    cyto = np.clip((red + yellow) / 2.0, 0, None)
    model = load_cellpose_model(os.fspath(weights), _want_gpu(params.gpu),
                                is_nuclei=params.model == "nuclei")
    kwargs = dict(diameter=diameter / f, flow_threshold=params.flow_threshold,
                  cellprob_threshold=params.cellprob_threshold)
    if major >= 4:
        img = np.stack([cyto, blue, np.zeros_like(blue)], axis=-1)
        masks = model.eval(img, channel_axis=-1, **kwargs)[0]
    elif params.model == "nuclei":
        masks = model.eval(blue, channels=[0, 0], **kwargs)[0]
    else:
        img = np.stack([cyto, blue], axis=0)
        masks = model.eval(img, channels=[1, 2], channel_axis=0, **kwargs)[0]
    masks = np.asarray(masks).astype(np.uint32, copy=False)
    return _expand(masks, f, shape)
