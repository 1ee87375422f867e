"""Cellpose backend: cytoplasm from red + yellow, nucleus from blue.

Weights: a built-in model name (``cyto3``, ``nuclei``, ``cpsam``, ...) is looked up where
cellpose keeps its models — ``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models`` — or in
an explicit ``models_dir``; a path to a model file is used as is. When a built-in model's file
is missing it is **fetched on demand** (never at import) by cellpose's own downloader
(``cellpose.utils.download_url_to_file``: tqdm progress on stderr, temporary file moved into
place) into that same folder, so cellpose and this plugin share one cache. The URL base is
cellpose's (``cellpose.models._MODEL_URL``) unless ``url_base=`` or
``$NAPARI_CPGCN_CELLPOSE_URL`` overrides it (a mirror, or a test server on 127.0.0.1).

Offline, the host is looked up and connected to under a timeout (default 5 s, in a
background thread so that a hanging DNS resolver cannot stall the caller), and a
:class:`FileNotFoundError` names the file, the URL and the folder to put the file in —
within seconds instead of a hang or silently random weights. ``download=False`` (or
``$NAPARI_CPGCN_CELLPOSE_DOWNLOAD=0``) never touches the network.

Model objects are cached (:func:`functools.lru_cache`) per (weights file, device), so a batch
or a widget pays the loading cost once. The GPU is used when torch sees one.

cellpose 3 (``cyto3``, ``nuclei``, ``cyto2``, ``cyto``, custom CP3 models) takes a two-channel
image ``[cytoplasm, nucleus]``; cellpose 4 (``cpsam``) takes up to three channels and has no
``channels`` argument. Both are supported; the installed major version decides.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

__all__ = [
    "CellposeParams",
    "BUILTIN_MODEL_FILES",
    "cellpose_models_dir",
    "cellpose_major_version",
    "resolve_cellpose_weights",
    "fetch_cellpose_weights",
    "cellpose_url_base",
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
#: cellpose 3's download location (``cellpose.models._MODEL_URL``), used when cellpose is absent.
_URL = "https://www.cellpose.org/models"
_CPSAM_URL = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/cpsam"
#: Environment variable overriding the URL base of built-in models (file name appended).
URL_ENV = "NAPARI_CPGCN_CELLPOSE_URL"
#: Environment variable: ``0`` / ``no`` / ``false`` forbids downloads.
DOWNLOAD_ENV = "NAPARI_CPGCN_CELLPOSE_DOWNLOAD"
#: Seconds allowed to look up and connect to the weight server (and per read while downloading).
CONNECT_TIMEOUT = 5.0

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
        Expected cell diameter in pixels; None = 2 x the nucleus diameter measured on the
        image's blue channel (the ``nuclei`` model uses the nucleus diameter itself).
    nucleus_diameter : float or None
        Nucleus diameter; used to derive ``diameter`` when that is None (None = measured).
    downscale : float or "auto"
        Shrink the image by this integer-rounded factor first ("auto": cells ~ 60 px wide);
        labels are upsampled (nearest) to the full size.
    gpu : bool or None
        None = use a GPU when torch sees one.
    flow_threshold, cellprob_threshold : float
        cellpose's own thresholds.
    download : bool or None
        Fetch a missing built-in model file (None = unless ``$NAPARI_CPGCN_CELLPOSE_DOWNLOAD=0``).
    url_base : str or None
        Where built-in model files are fetched from (None = ``$NAPARI_CPGCN_CELLPOSE_URL`` or
        cellpose's own URL).
    """

    model: str = "cyto3"
    models_dir: str | None = None
    diameter: float | None = None
    nucleus_diameter: float | None = None
    downscale: float | str = "auto"
    gpu: bool | None = None
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    download: bool | None = None
    url_base: str | None = None

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


def cellpose_url_base(url_base: str | None = None) -> str:
    """Where built-in cellpose 3 model files are fetched from (the file name is appended).

    ``url_base`` if given, else ``$NAPARI_CPGCN_CELLPOSE_URL``, else cellpose's own
    ``cellpose.models._MODEL_URL`` (read from the source file, without importing cellpose and
    torch), else https://www.cellpose.org/models.
    """
    if url_base:
        return str(url_base).rstrip("/")
    env = os.environ.get(URL_ENV)
    if env:
        return env.rstrip("/")
    return _cellpose_model_url().rstrip("/")


@functools.lru_cache(maxsize=1)
def _cellpose_model_url() -> str:
    import importlib.util
    import re

    spec = importlib.util.find_spec("cellpose")
    if spec is not None and spec.submodule_search_locations:
        src = Path(next(iter(spec.submodule_search_locations))) / "models.py"
        with contextlib.suppress(OSError):
            m = re.search(r'^_MODEL_URL\s*=\s*["\']([^"\']+)["\']', src.read_text(), re.MULTILINE)
            if m:
                return m.group(1)
    return _URL


def _download_allowed(download: bool | None) -> bool:
    if download is not None:
        return bool(download)
    return os.environ.get(DOWNLOAD_ENV, "1").strip().lower() not in ("0", "no", "false", "off")


def _model_url(model: str, fname: str, url_base: str | None) -> str:
    if model == "cpsam" and not url_base and not os.environ.get(URL_ENV):
        return _CPSAM_URL
    return f"{cellpose_url_base(url_base)}/{fname}"


def resolve_cellpose_weights(
    model: str | os.PathLike,
    models_dir: str | os.PathLike | None = None,
    *,
    download: bool | None = None,
    url_base: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> Path:
    """The weight file of ``model`` on this machine, fetched on demand for built-in models.

    Parameters
    ----------
    model
        A built-in name (see :data:`BUILTIN_MODEL_FILES`), the name of a user model file in
        the models folder, or a path to a model file.
    models_dir
        Overrides the models folder (default: cellpose's, see :func:`cellpose_models_dir`).
    download
        Fetch a missing built-in model file (:func:`fetch_cellpose_weights`); None = yes
        unless ``$NAPARI_CPGCN_CELLPOSE_DOWNLOAD=0``.
    url_base, timeout
        As for :func:`fetch_cellpose_weights`.

    Raises
    ------
    FileNotFoundError
        The file is missing and could not be fetched (offline, server error, or
        ``download=False``); the message names the file, the URL and the folder to put it in.
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
        url = _model_url(model_str, fname, url_base)
        if not _download_allowed(download):
            raise FileNotFoundError(
                f"cellpose model {model_str!r}: weight file {fname!r} not found in {folder}, and "
                f"downloads are off ({DOWNLOAD_ENV}=0 or download=False). Download {url} and place it "
                f"as {candidate} (or set CELLPOSE_LOCAL_MODELS_PATH to the folder holding it, or pass "
                "the file's path as the model). The classical method needs no weights."
            )
        return fetch_cellpose_weights(model_str, models_dir, url_base=url_base, timeout=timeout)
    if path.is_dir():
        raise FileNotFoundError(f"cellpose model {model_str!r} is a folder; give the model file inside it")
    candidate = folder / model_str
    if os.sep not in model_str and candidate.is_file():  # a user-trained model saved in the folder
        return candidate
    raise FileNotFoundError(
        f"cellpose model {model_str!r}: no such file (also looked for {candidate}). Give a path to a "
        f"model file or one of the built-in names {', '.join(BUILTIN_MODEL_FILES)} (fetched into "
        f"{folder} on first use)."
    )


def _check_reachable(url: str, timeout: float) -> None:
    """Resolve and connect to ``url``'s host within ``timeout`` seconds, or raise ``OSError``.

    Runs in a daemon thread: ``getaddrinfo`` has no timeout of its own, and an offline machine
    whose resolver waits for an absent DNS server would otherwise stall for a minute or more.
    """
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OSError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                pass
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = e

    t = threading.Thread(target=probe, name="cellpose-weights-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if "error" not in outcome:
        raise TimeoutError(f"no answer from {parts.hostname}:{port} within {timeout:g} s")
    if outcome["error"] is not None:
        err = outcome["error"]
        raise OSError(f"cannot reach {parts.hostname}:{port}: {err}") from err


_DEFAULT_TIMEOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """A default socket timeout while cellpose's downloader runs (it passes none to urlopen)."""
    with _DEFAULT_TIMEOUT_LOCK:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(seconds)
        try:
            yield
        finally:
            socket.setdefaulttimeout(old)


def _looks_like_torch_file(path: Path) -> bool:
    """A torch checkpoint starts as a zip archive (``PK``) or, in the legacy format, a pickle."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def fetch_cellpose_weights(
    model: str,
    models_dir: str | os.PathLike | None = None,
    *,
    url_base: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> Path:
    """Fetch the weight file of a built-in cellpose model into the models folder.

    The download itself is cellpose's (``cellpose.utils.download_url_to_file``: a tqdm
    progress bar on stderr, a temporary file in the target folder moved into place at the
    end, so an interrupted download leaves no partial model). Before it, the server is
    looked up and connected to within ``timeout`` seconds; while it runs, each network
    operation has a ``6 * timeout`` limit (cellpose passes none), so a dead link fails instead of
    hanging.

    Parameters
    ----------
    model
        A built-in name (:data:`BUILTIN_MODEL_FILES`).
    models_dir
        Target folder (default: cellpose's, :func:`cellpose_models_dir`).
    url_base
        URL of the folder holding the files (default :func:`cellpose_url_base`).
    timeout
        Seconds for the lookup + connection.

    Returns
    -------
    pathlib.Path
        The model file (already there, or fetched).

    Raises
    ------
    FileNotFoundError
        The server cannot be reached or does not have the file (the message names the URL and
        where to put the file by hand); or the answer is not a torch model file (e.g. an HTML
        page from a proxy: it is deleted).
    ModuleNotFoundError
        cellpose is not installed.
    """
    if model not in BUILTIN_MODEL_FILES:
        raise ValueError(f"{model!r} is not a built-in cellpose model ({', '.join(BUILTIN_MODEL_FILES)})")
    fname = BUILTIN_MODEL_FILES[model]
    folder = cellpose_models_dir(models_dir)
    target = folder / fname
    if target.is_file():
        return target
    if cellpose_major_version() is None:
        raise ModuleNotFoundError("fetching cellpose weights needs the cellpose package: "
                                  "pip install 'napari-cpgcn[cellpose]'")
    url = _model_url(model, fname, url_base)
    by_hand = (f"On a machine with internet, download {url} and place it as {target} (or set "
               f"CELLPOSE_LOCAL_MODELS_PATH to the folder holding it, or pass the file's path as the "
               f"model; {URL_ENV} points to a mirror). The classical method needs no weights.")
    t0 = time.perf_counter()
    try:
        _check_reachable(url, timeout)
    except OSError as e:
        raise FileNotFoundError(f"cellpose model {model!r}: weight file {fname!r} not found in {folder} "
                                f"and it cannot be fetched ({e}; offline?). {by_hand}") from e
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading cellpose model %r from %s to %s", model, url, target)
    import ssl
    import urllib.error

    from cellpose import utils as cp_utils

    https_context = ssl._create_default_https_context  # cellpose switches verification off globally
    try:
        with _socket_timeout(6 * timeout):
            cp_utils.download_url_to_file(url, os.fspath(target), progress=True)
    except urllib.error.HTTPError as e:
        raise FileNotFoundError(f"cellpose model {model!r}: {url} answered {e.code} {e.reason}. {by_hand}") from e
    except (OSError, urllib.error.URLError) as e:
        raise FileNotFoundError(f"cellpose model {model!r}: downloading {url} failed ({e}). {by_hand}") from e
    finally:
        ssl._create_default_https_context = https_context
    if not _looks_like_torch_file(target):
        target.unlink(missing_ok=True)
        raise FileNotFoundError(f"cellpose model {model!r}: {url} did not return a model file "
                                f"(a proxy or error page?); nothing kept. {by_hand}")
    log.info("cellpose model %r saved as %s (%.1f MB, %.1f s)", model, target,
             target.stat().st_size / 1e6, time.perf_counter() - t0)
    return target


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


def _resolve_diameter(params: CellposeParams, data: np.ndarray) -> float:
    """Cell diameter for cellpose: given, else 2x the nucleus diameter measured on the blue channel."""
    from napari_cpgcn.segmentation.classical import (
        default_nucleus_diameter,
        estimate_nucleus_diameter,
    )

    if params.diameter:
        return float(params.diameter)
    nucleus = params.nucleus_diameter or estimate_nucleus_diameter(data[2])
    if not nucleus:  # no nuclei to measure: the image-size prior
        nucleus = default_nucleus_diameter(tuple(int(s) for s in data.shape[1:]))
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
        The weight file is not on this machine and cannot be fetched (raised before cellpose
        and torch are imported when downloads are off).
    """
    from napari_cpgcn.segmentation.classical import _expand, _normalise, _shrink, working_factor

    params = params or CellposeParams()
    major = cellpose_major_version()
    if major is None:
        raise ModuleNotFoundError(
            "the cellpose method needs the cellpose package: pip install 'napari-cpgcn[cellpose]' "
            "(or use method='classical', which needs no weights)"
        )
    if params.model in CELLPOSE4_MODELS and major < 4:
        raise ValueError(f"model {params.model!r} needs cellpose >= 4; cellpose {major} is installed. "
                         "Use cyto3 or upgrade: pip install 'cellpose>=4'")
    if params.model in BUILTIN_MODEL_FILES and params.model not in CELLPOSE4_MODELS and major >= 4:
        raise ValueError(f"model {params.model!r} is a cellpose 3 model; cellpose {major} runs only "
                         "cpsam. Use model='cpsam' or pip install 'cellpose<4'")
    weights = resolve_cellpose_weights(params.model, params.models_dir, download=params.download,
                                       url_base=params.url_base)
    shape = tuple(int(s) for s in data.shape[1:])
    diameter = _resolve_diameter(params, data)
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
