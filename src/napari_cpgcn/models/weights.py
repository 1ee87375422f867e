"""ImageNet backbone weights on demand: the torch hub cache, else a verified download.

What ``Backbone(weights="imagenet")`` (or a mirror URL) does, in order:

1. **Cache**: a torchvision file of the backbone (``resnet18-f37072fd.pth`` ...) in the torch
   hub cache, ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``), is used.
2. **Reachability**: a ``HEAD`` request to the weight URL, in a thread bounded by the timeout
   (``NAPARI_CPGCN_WEIGHTS_TIMEOUT``, default 5 s), so that an offline machine, a hanging name
   lookup or a server that never answers costs seconds, not minutes. It goes through urllib,
   so ``HTTPS_PROXY`` / ``HTTP_PROXY`` are honoured as for the download itself.
3. **Download**: :func:`torch.hub.download_url_to_file` (torchvision's own downloader: its
   progress bar, a ``*.partial`` file in the cache folder moved into place only once complete,
   removed on any failure) with the SHA-256 prefix of the torch hub file name
   ``name-<sha256 prefix>.pth`` checked, and a socket timeout so a stalled server fails
   instead of hanging the run.

The URL is torchvision's own (the weight enums' ``DEFAULT.url``) unless a mirror is given:
``--imagenet-weights URL`` or the environment variable ``NAPARI_CPGCN_WEIGHTS_URL`` -- a base
URL (the torchvision file name is appended: ``<base>/resnet18-f37072fd.pth``) or a full URL
whose file name follows the hub naming. ``NAPARI_CPGCN_WEIGHTS_URL=none`` turns downloads off
(cache only; for compute nodes without network).

Network failures (offline, refused, timeout, a download broken off, a server error) are not
errors: :func:`fetch_imagenet_weights` returns a :class:`WeightsDecision` whose message says
that training starts from random weights and where to put the file instead. A refused file is
an error (:class:`WeightsDownloadError`): a hash that does not match, a file name that carries
no hash to check, a file the server does not have.

Nothing here runs at import time, and ``weights=None`` never reaches this module.
"""

from __future__ import annotations

import errno
import functools
import http.client
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse, urlunparse

__all__ = [
    "Probe",
    "WEIGHTS_TIMEOUT_ENV",
    "WEIGHTS_URL_ENV",
    "WeightsDecision",
    "WeightsDownloadError",
    "WeightsNotFoundError",
    "WeightsOfflineError",
    "check_weights_url",
    "download_weights",
    "fetch_imagenet_weights",
    "hub_checkpoint_dir",
    "imagenet_weights_url",
    "is_url",
    "plan_imagenet_weights",
    "probe_url",
    "weights_timeout",
]

log = logging.getLogger(__name__)

#: Mirror of the torchvision weights: a base URL, a full URL, or ``none`` (downloads off).
WEIGHTS_URL_ENV = "NAPARI_CPGCN_WEIGHTS_URL"
#: Seconds the reachability check and every socket read of a download may wait.
WEIGHTS_TIMEOUT_ENV = "NAPARI_CPGCN_WEIGHTS_TIMEOUT"
DEFAULT_TIMEOUT = 5.0

#: torch hub naming ``name-<sha256 prefix>.ext``, with the 8 or more hex digits the torch docs
#: ask for. ``torch.hub.HASH_REGEX`` also accepts an empty or short prefix (pytorch/pytorch
#: issue 191194), which would check nothing.
_HUB_NAME = re.compile(r"^(?P<stem>.+)-(?P<hash>[0-9a-f]{8,64})\.(?P<ext>pth|pt|pth\.tar|bin)$")
_WEIGHT_EXT = (".pth", ".pt", ".bin", ".tar", ".ckpt", ".safetensors")
_OFF = ("none", "off", "0", "false", "no")
_HTTP_ERRORS = (URLError, OSError, http.client.HTTPException)
_DOWNLOAD_LOCK = threading.Lock()
#: Local failures while writing the download (not the network's).
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.ENOTDIR)


class WeightsNotFoundError(FileNotFoundError):
    """An explicitly given weight file does not exist or does not fit the backbone."""


class WeightsDownloadError(WeightsNotFoundError):
    """A weight download was refused: its SHA-256 does not match the file name's prefix, its
    name carries no prefix to check, or the server does not have the file."""


class WeightsOfflineError(OSError):
    """The network did not deliver the file: unreachable, refused, timed out, broken off, or a
    server error. ``reason`` is a short phrase for the message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_url(text: object) -> bool:
    """True for an ``http://`` or ``https://`` address."""
    return isinstance(text, str) and text.lower().startswith(("http://", "https://"))


def weights_timeout() -> float:
    """The network timeout in seconds: ``NAPARI_CPGCN_WEIGHTS_TIMEOUT``, default 5."""
    text = os.environ.get(WEIGHTS_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{WEIGHTS_TIMEOUT_ENV}={text!r}: give a positive number of seconds (default 5)")
    return value


def hub_checkpoint_dir() -> Path:
    """The torch hub weight cache, ``torch.hub.get_dir()/checkpoints`` (TORCH_HOME moves it)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _url_file_name(url: str) -> str:
    return Path(urlparse(url).path).name


def _with_file_name(base: str, file_name: str) -> str:
    """``base`` (a folder URL) with ``file_name`` appended; a query string stays at the end."""
    parts = urlparse(base)
    return urlunparse(parts._replace(path=parts.path.rstrip("/") + "/" + file_name))


def imagenet_weights_url(name: str, source: str = "imagenet") -> str | None:
    """The URL the ImageNet weights of backbone ``name`` are downloaded from; None when off.

    Parameters
    ----------
    name
        A backbone of :data:`~napari_cpgcn.models.backbone.BACKBONES`.
    source
        ``"imagenet"``: ``NAPARI_CPGCN_WEIGHTS_URL`` when set (``none`` → None), else
        torchvision's own URL. A URL: a mirror -- a base URL gets the torchvision file name
        appended, a full URL whose file name follows the hub naming is used as it is.

    Raises
    ------
    WeightsDownloadError
        A full URL whose file name carries no SHA-256 prefix (nothing to verify it by).
    """
    from napari_cpgcn.models.backbone import imagenet_weight_candidates, torchvision_weights_url

    if str(source).lower() == "imagenet":
        env = os.environ.get(WEIGHTS_URL_ENV, "").strip()
        if env.lower() in _OFF:
            return None
        if not env:
            return torchvision_weights_url(name)
        source = env
    if check_weights_url(source):
        return source
    return _with_file_name(source, imagenet_weight_candidates(name)[0])


def check_weights_url(url: str) -> bool:
    """Whether ``url`` names a weight file (True) or a mirror folder (False); cheap, no network.

    Raises
    ------
    ValueError
        Not an http(s) URL.
    WeightsDownloadError
        A weight file whose name carries no SHA-256 prefix (``resnet18.pth``): nothing to verify
        it by.
    """
    if not is_url(url):
        raise ValueError(f"{url!r} is not an http(s) URL")
    file_name = _url_file_name(url)
    if _HUB_NAME.match(file_name):
        return True
    if file_name.lower().endswith(_WEIGHT_EXT):
        raise WeightsDownloadError(
            f"cannot verify {url}: its file name {file_name} does not follow the torch hub naming "
            "name-<first 8+ hex digits of its sha256>.pth (like torchvision's resnet18-f37072fd.pth). "
            f"Rename the file on the mirror after `sha256sum {file_name}`, give the mirror's folder URL, "
            "or download it yourself and pass --imagenet-weights PATH")
    return False


def _describe(exc: BaseException, host: str, timeout: float) -> str:
    """A short phrase for a network failure."""
    err = exc.reason if isinstance(exc, URLError) and not isinstance(exc, HTTPError) else exc
    if isinstance(err, TimeoutError) or "timed out" in str(err):
        return f"{host} did not answer within {timeout:g} s"
    if isinstance(err, ConnectionRefusedError):
        return f"connection to {host} refused"
    if isinstance(err, OSError) and getattr(err, "strerror", None):
        return f"cannot reach {host}: {err.strerror}"
    return f"cannot reach {host}: {err}"


@dataclass(frozen=True)
class Probe:
    """What a ``HEAD`` request to a weight URL found.

    ``reason`` is None when the server answered (``size`` is its Content-Length, if given).
    """

    url: str
    reason: str | None = None
    size: int | None = None


def probe_url(url: str, timeout: float | None = None) -> Probe:
    """Check within ``timeout`` seconds that ``url`` can be downloaded.

    A ``HEAD`` request in a daemon thread: the wait is bounded even when the name lookup hangs
    (``getaddrinfo`` has no timeout of its own).

    Raises
    ------
    WeightsDownloadError
        The server answers that it does not have the file (HTTP 404 / 410).
    """
    from urllib.request import Request, urlopen

    timeout = weights_timeout() if timeout is None else float(timeout)
    host = urlparse(url).netloc or url
    result: dict = {}

    def head() -> None:
        try:
            with urlopen(Request(url, method="HEAD", headers={"User-Agent": "torch.hub"}), timeout=timeout) as r:
                length = r.headers.get("Content-Length")
                result["size"] = int(length) if length and length.isdigit() else None
        except HTTPError as e:
            result["http"] = e
        except _HTTP_ERRORS as e:
            result["error"] = e

    thread = threading.Thread(target=head, name="napari-cpgcn-weights-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():  # left to finish on its own: a daemon thread never blocks the exit
        return Probe(url, reason=f"{host} did not answer within {timeout:g} s")
    if "error" in result:
        return Probe(url, reason=_describe(result["error"], host, timeout))
    if "http" in result:
        code = result["http"].code
        if code in (404, 410):
            raise WeightsDownloadError(f"{url} does not exist on the server (HTTP {code}); check the mirror "
                                       f"URL ({WEIGHTS_URL_ENV} or --imagenet-weights)")
        if code >= 500:
            return Probe(url, reason=f"{host} answers with a server error (HTTP {code})")
        # 403 / 405 ...: some mirrors refuse HEAD but serve GET; the download will tell.
        return Probe(url)
    return Probe(url, size=result.get("size"))


@contextmanager
def _urlopen_timeout(timeout: float):
    """Give the urlopen of :func:`torch.hub.download_url_to_file` a socket timeout.

    torch opens the URL without one (a silent server blocks forever). Patching the name
    ``torch.hub.urlopen`` for the length of one download (under a lock) touches torch hub
    downloads only -- unlike ``socket.setdefaulttimeout``, which would reach every new
    socket of the process, Dask's and napari's included.
    """
    import urllib.request

    import torch.hub

    original = torch.hub.urlopen
    torch.hub.urlopen = functools.partial(urllib.request.urlopen, timeout=timeout)
    try:
        yield
    finally:
        torch.hub.urlopen = original


def download_weights(url: str, *, model_dir: str | Path | None = None, timeout: float | None = None,
                     progress: bool | None = None) -> Path:
    """Download a hub-named weight file into the cache, verified; the cached file if present.

    Parameters
    ----------
    url
        An http(s) URL whose file name is ``name-<sha256 prefix>.pth`` (8+ hex digits).
    model_dir
        Cache folder; default :func:`hub_checkpoint_dir`.
    timeout
        Seconds any connect or read may wait; default :func:`weights_timeout`.
    progress
        torch's progress bar on stderr; default: when stderr is a terminal.

    Returns
    -------
    Path
        ``model_dir / <file name>``, complete and verified (it only appears there once both).

    Raises
    ------
    WeightsDownloadError
        The file's SHA-256 does not start with the prefix of its name (nothing is kept), the
        name has no prefix, or the server answers 4xx.
    WeightsOfflineError
        Unreachable, refused, timed out, broken off or a server error (nothing is kept).
    WeightsNotFoundError
        The cache folder cannot be written (read-only, full): the message says to set TORCH_HOME.
    """
    import torch.hub

    file_name = _url_file_name(url)
    m = _HUB_NAME.match(file_name)
    if m is None:
        raise WeightsDownloadError(
            f"cannot verify {url}: its file name does not follow the torch hub naming "
            "name-<first 8+ hex digits of its sha256>.pth; download it yourself and pass --imagenet-weights PATH")
    folder = Path(model_dir) if model_dir is not None else hub_checkpoint_dir()
    dst = folder / file_name
    if dst.is_file():
        return dst
    timeout = weights_timeout() if timeout is None else float(timeout)
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    host = urlparse(url).netloc or url
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(folder, e) from e
    if not os.access(folder, os.W_OK):
        raise _unwritable(folder, PermissionError(errno.EACCES, "Permission denied"))
    with _DOWNLOAD_LOCK:  # one download at a time in a process; the second finds the file
        if dst.is_file():
            return dst
        log.info("downloading %s to %s", url, dst)
        t0 = time.perf_counter()
        try:
            with _urlopen_timeout(timeout):
                torch.hub.download_url_to_file(url, str(dst), hash_prefix=m.group("hash"), progress=progress)
        except HTTPError as e:
            if e.code >= 500:
                raise WeightsOfflineError(f"{host} answers with a server error (HTTP {e.code})") from e
            raise WeightsDownloadError(f"{url}: the server refuses it (HTTP {e.code} {e.reason}); check the "
                                       f"mirror URL ({WEIGHTS_URL_ENV} or --imagenet-weights)") from e
        except RuntimeError as e:
            if "hash" not in str(e):
                raise
            raise WeightsDownloadError(
                f"refused the download of {url}: its SHA-256 does not start with {m.group('hash')} as its name "
                f"says ({e}); nothing was kept in {folder}. The server sends a broken or different file: "
                "try again, or fetch it yourself, check it (sha256sum) and pass --imagenet-weights PATH") from e
        except OSError as e:
            if e.errno in _DISK_ERRNOS:
                raise _unwritable(folder, e) from e
            raise WeightsOfflineError(f"download broken off: {_describe(e, host, timeout)}") from e
        except _HTTP_ERRORS as e:
            raise WeightsOfflineError(f"download broken off: {_describe(e, host, timeout)}") from e
        log.info("downloaded %s (%.1f MB) in %.1f s", dst.name, dst.stat().st_size / 1e6, time.perf_counter() - t0)
    return dst


def _unwritable(folder: Path, e: OSError) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"cannot write the torch hub cache {folder} ({e.strerror or e}): free some space or set TORCH_HOME "
        "to a writable folder, or pass --imagenet-weights PATH (or none)")


@dataclass(frozen=True)
class WeightsDecision:
    """Which start a backbone gets, and why.

    Attributes
    ----------
    backbone
        Backbone name.
    status
        ``"cached"`` (in the hub cache), ``"downloaded"``, ``"download"`` (would be downloaded:
        :func:`plan_imagenet_weights` only) or ``"offline"`` (none: random start).
    path
        The weight file; for ``"download"`` / ``"offline"`` where it would go in the cache.
    url
        Where it is (or would be) downloaded from; None when downloads are off.
    reason
        For ``"offline"``: why there are none; for an unchecked ``"download"``: that the
        server was not asked.
    size
        Bytes the server announced (``"download"`` only, when it did).
    """

    backbone: str
    status: str
    path: Path | None
    url: str | None = None
    reason: str = ""
    size: int | None = None

    @property
    def weights(self) -> Path | None:
        """The file to load, or None (random start)."""
        return self.path if self.status in ("cached", "downloaded") else None

    def message(self, fallback: str = "random init") -> str:
        """One line for the log and the training events; ``fallback`` names the start used
        without ImageNet weights."""
        if self.status == "cached":
            return f"ImageNet weights for {self.backbone} from {self.path}"
        if self.status == "downloaded":
            return f"ImageNet weights for {self.backbone} downloaded from {self.url} to {self.path}"
        if self.status == "download":
            size = f" ({self.size / 1e6:.1f} MB)" if self.size else ""
            note = f"; {self.reason}" if self.reason else ""
            return (f"ImageNet weights for {self.backbone} would be downloaded from {self.url}{size} to "
                    f"{self.path}{note}")
        where = f"put {self.path.name} into {self.path.parent}" if self.path is not None else "put the file into the cache"
        source = f" (from {self.url})" if self.url else ""
        return (f"offline: no ImageNet weights for {self.backbone} ({self.reason}); starting from {fallback}. "
                f"To use them, {where}{source} or pass --imagenet-weights PATH")


def _cache_candidates(name: str, url: str | None, source: str) -> list[str]:
    from napari_cpgcn.models.backbone import imagenet_weight_candidates

    names = []
    if url is not None:
        names.append(_url_file_name(url))
    full_url = is_url(source) and _HUB_NAME.match(_url_file_name(source))
    if not full_url:  # "imagenet" or a mirror folder: any torchvision file of the backbone will do
        names += [n for n in imagenet_weight_candidates(name) if n not in names]
    return names


def plan_imagenet_weights(name: str, source: str = "imagenet", *, network: bool = True,
                          timeout: float | None = None, probes: dict[str, Probe] | None = None) -> WeightsDecision:
    """What :func:`fetch_imagenet_weights` would do, without downloading (for ``info``).

    Parameters
    ----------
    name
        Backbone name.
    source
        ``"imagenet"`` or a mirror URL (see :func:`imagenet_weights_url`).
    network
        Check that the URL answers (``HEAD``, bounded by ``timeout``); False: a cache miss is
        reported as ``"download"`` unchecked.
    probes
        Shared between calls: once a host is unreachable it is not asked again (an offline
        ``info`` waits one timeout, not one per backbone).

    Raises
    ------
    WeightsDownloadError
        The URL cannot be verified, or the server does not have the file.
    """
    url = imagenet_weights_url(name, source)
    folder = hub_checkpoint_dir()
    candidates = _cache_candidates(name, url, source)
    for fn in candidates:
        if (folder / fn).is_file():
            return WeightsDecision(name, "cached", folder / fn, url)
    dst = folder / candidates[0]
    if url is None:
        return WeightsDecision(name, "offline", dst, None,
                               reason=f"not in the cache and downloads are off ({WEIGHTS_URL_ENV}=none)")
    if not network:
        return WeightsDecision(name, "download", dst, url, reason="server not asked")
    host = urlparse(url).netloc
    probes = {} if probes is None else probes
    earlier = probes.get(host)
    probe = earlier if earlier is not None and earlier.reason else probe_url(url, timeout)
    if probe.reason:
        probes[host] = probe
        return WeightsDecision(name, "offline", dst, url, reason=probe.reason)
    return WeightsDecision(name, "download", dst, url, size=probe.size)


def fetch_imagenet_weights(name: str, source: str = "imagenet", *, timeout: float | None = None,
                           progress: bool | None = None) -> WeightsDecision:
    """The ImageNet weights of backbone ``name``: cached, else downloaded, else offline.

    Parameters
    ----------
    name
        Backbone name.
    source
        ``"imagenet"`` (torchvision's URL, or ``NAPARI_CPGCN_WEIGHTS_URL``) or a mirror URL.
    timeout
        Seconds for the reachability check and for any read of the download; default
        :func:`weights_timeout`. Offline, the decision comes within about this time.
    progress
        The download's progress bar; default: when stderr is a terminal.

    Returns
    -------
    WeightsDecision
        ``"cached"`` or ``"downloaded"`` (``.weights`` is the file), or ``"offline"``
        (``.weights`` is None; ``.message()`` says why and where to put the file).

    Raises
    ------
    WeightsDownloadError
        A download was refused (hash mismatch, unverifiable name, missing on the server).
    WeightsNotFoundError
        The cache folder cannot be written.
    """
    timeout = weights_timeout() if timeout is None else float(timeout)
    plan = plan_imagenet_weights(name, source, timeout=timeout)
    if plan.status != "download":
        return plan
    try:
        path = download_weights(plan.url, model_dir=plan.path.parent, timeout=timeout, progress=progress)
    except WeightsOfflineError as e:
        return WeightsDecision(name, "offline", plan.path, plan.url, reason=e.reason)
    return WeightsDecision(name, "downloaded", path, plan.url)
