"""The checkpoint format: atomic writes, safe reads, integrity digests, and starting from earlier runs.

Checkpoints hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)`` (a checkpoint cannot run code); a SHA-256 digest over the
weights and metadata detects modified or truncated files. Also here: loading the two model kinds
of a run (image model, cell model) from their checkpoints, and finding the checkpoint a new model
starts from (``init_from``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_cpgcn.classes import SHORT_NAMES
from napari_cpgcn.io.atomic import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "state_digest",
    "save_checkpoint",
    "load_checkpoint",
    "INIT_CANDIDATES",
    "resolve_init_checkpoint",
    "check_init_checkpoint",
    "load_backbone_weights",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "napari-cpgcn-checkpoint"


CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, modified, foreign, or for another model)."""


def state_digest(state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> str:
    """SHA-256 over the tensors (names, dtypes, shapes, bytes) and the JSON of ``meta``."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k]
        if not isinstance(t, torch.Tensor):
            h.update(f"{k}={t!r};".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(meta or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    # fsync: a checkpoint must survive a power loss, not only a crash
    atomic_write(path, lambda tmp: torch.save(obj, tmp), fsync=True)


def save_checkpoint(path: str | Path, model_state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    **extra: Any) -> Path:
    """Write a checkpoint atomically: ``{format, version, model, meta, digest, **extra}``.

    ``model_state`` is moved to the CPU; ``meta`` must be JSON-like (class list, backbone,
    normalisation, ...). ``extra`` holds optimizer/scaler states, epoch, config, history, RNG.
    """
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model_state.items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": state,
        "meta": dict(meta),
        "digest": state_digest(state, meta),
        **extra,
    }
    _atomic_torch_save(payload, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    expected_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and check it.

    Parameters
    ----------
    path
        The ``.pt`` file.
    map_location
        Where tensors are loaded.
    expected_meta
        Keys that must equal the checkpoint's ``meta`` (e.g. ``classes``, ``backbone``).

    Raises
    ------
    FileNotFoundError
        No such file.
    CheckpointError
        Not a napari-cpgcn checkpoint, corrupt or modified (digest mismatch), holding code
        (refused by the safe loader), or made for another class set / backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (bad zip), EOFError, ...
        text = str(e)
        if "GLOBAL" in text or "Unsupported global" in text:  # a class or function the safe loader refuses
            glob = next((ln.strip() for ln in text.splitlines() if "global" in ln.lower() and "GLOBAL" in ln), "")
            raise CheckpointError(
                f"{path} was refused for safety: it holds Python objects other than tensors and plain "
                f"values, and loading it could run code. Only napari-cpgcn checkpoints (and safe "
                f"torchvision weight files) can be used. {glob}".rstrip()
            ) from e
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({type(e).__name__}); "
                              "use the run's latest.pt/best.pt or retrain") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CheckpointError(
            f"{path} is not a napari-cpgcn checkpoint (no '{CHECKPOINT_FORMAT}' header); plain "
            "torchvision weights go to --imagenet-weights instead")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} was written by a newer napari-cpgcn (format "
                              f"{ckpt.get('format_version')}); upgrade napari-cpgcn")
    digest = state_digest(ckpt["model"], ckpt.get("meta", {}))
    if digest != ckpt.get("digest"):
        raise CheckpointError(
            f"{path} failed its integrity check: the weights or metadata were modified or the file is "
            "damaged. Use an unmodified checkpoint (e.g. copy it again) or retrain.")
    meta = ckpt.get("meta", {})
    for key, want in (expected_meta or {}).items():
        have = meta.get(key)
        if isinstance(want, tuple):
            want = list(want)
        if isinstance(have, tuple):
            have = list(have)
        if have != want:
            raise CheckpointError(
                f"{path} was made for {key} = {_short(have)}, but {_short(want)} is needed here. "
                f"Use a checkpoint trained with this {key}, or change the setting to match it.")
    return ckpt


#: Where a run folder keeps the checkpoint each model starts from (first found wins): the
#: refined image model a pipeline run predicts with, then the plain image model, then a
#: ``train-image`` folder's own files.
RUN_MODEL_FILES: dict[str, tuple[str, ...]] = {
    "image_model": ("refine/best.pt", "image_model/best.pt", "image_model/latest.pt"),
    "cell_model": ("cell_model/best.pt", "cell_model/latest.pt"),
}
INIT_CANDIDATES = {
    "image_model": (*RUN_MODEL_FILES["image_model"], "best.pt", "latest.pt"),
    "cell_model": RUN_MODEL_FILES["cell_model"],
}


def resolve_init_checkpoint(source: str | Path, stage: str = "image_model") -> Path:
    """The checkpoint a model of ``stage`` starts from: ``source`` itself (a ``.pt``); for a
    ``napari-cpgcn pretrain`` folder its ``backbone.pt`` (whatever the stage); for a run
    folder, the first of :data:`INIT_CANDIDATES` that exists.

    Raises
    ------
    FileNotFoundError
        Nothing there, naming what was looked for (an unfinished pretraining: how to resume it).
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: give a finished run or pretraining folder or a .pt "
                                "checkpoint")
    if src.is_file():
        return src
    from napari_cpgcn.training.pretrain import is_pretrain_dir, pretrained_backbone_path

    if is_pretrain_dir(src):  # a self-supervised backbone starts the image and the cell model alike
        return pretrained_backbone_path(src)
    cands = INIT_CANDIDATES.get(stage, (f"{stage}/best.pt", f"{stage}/latest.pt"))
    for cand in cands:
        if (src / cand).is_file():
            return src / cand
    raise FileNotFoundError(
        f"{src} holds no {stage.replace('_', ' ')} to start from (looked for {', '.join(cands)}); "
        "give a finished run folder or a .pt file")


#: ``meta["kind"]`` of :mod:`napari_cpgcn.training.pretrain`'s checkpoints (the finished backbone
#: and the training state), whose ``backbone.*`` tensors start a model like any other's.
_PRETRAIN_KINDS = ("pretrained_backbone", "self_supervised_pretraining")


def check_init_checkpoint(source: str | Path, name: str, stage: str = "image_model") -> tuple[Path, dict]:
    """Resolve and read the checkpoint a ``name`` backbone starts from; refuse another backbone.

    Returns ``(path, checkpoint)``. Cheap enough to call before any training starts.
    ``source`` may also be a bioimage.io package written by ``napari-cpgcn export-bioimageio``.
    """
    if str(source).lower().endswith(".zip"):  # a bioimage.io package: its reader checks classes + backbone
        from napari_cpgcn.export.bioimageio import read_package_checkpoint

        return Path(source).expanduser(), read_package_checkpoint(source, backbone=name)
    src = resolve_init_checkpoint(source, stage)
    ckpt = load_checkpoint(src, "cpu")
    have = ckpt.get("meta", {}).get("backbone")
    if have != name and ckpt.get("meta", {}).get("kind") in _PRETRAIN_KINDS:
        raise CheckpointError(
            f"{src} is a self-supervised pretraining of a {have} backbone, but the {stage.replace('_', ' ')} "
            f"here uses {name}: pretrain again with `napari-cpgcn pretrain DATA_DIR --backbone {name}`, or "
            f"train with --backbone {have}")
    if have != name:
        raise CheckpointError(
            f"{src} holds a {have} backbone but the {stage.replace('_', ' ')} here uses {name}: choose the "
            f"backbone {have} or start from a checkpoint with a {name} backbone")
    return src, ckpt


def load_backbone_weights(backbone: nn.Module, source: str | Path, name: str, stage: str = "image_model") -> Path:
    """Start ``backbone`` from the backbone of an earlier napari-cpgcn model (fine-tuning).

    ``source`` is an image- or cell-model checkpoint, a self-supervised backbone
    (``napari-cpgcn pretrain``), a bioimage.io package, or a run or pretraining folder (see
    :func:`resolve_init_checkpoint`). Only backbone tensors are taken; the input
    normalisation (``mean``/``std``) stays the new run's. Returns the checkpoint used.

    Raises
    ------
    FileNotFoundError, CheckpointError
        No checkpoint there; not a napari-cpgcn checkpoint; another backbone.
    """
    src, ckpt = check_init_checkpoint(source, name, stage)
    state = {k[len("backbone."):]: v for k, v in ckpt["model"].items()
             if k.startswith("backbone.") and k not in ("backbone.mean", "backbone.std")}
    if not state:
        raise CheckpointError(f"{src} holds no backbone weights")
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("mean", "std")]
    if missing or unexpected:
        raise CheckpointError(f"{src}: backbone tensors do not fit {name} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("backbone initialised from %s", src)
    return src


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) < 120 else s[:117] + "..."


def resolve_checkpoint(path: str | Path, kind: str = "image_model") -> Path:
    """A model checkpoint from a ``.pt`` file or a folder.

    For ``kind="image_model"`` a folder may be a ``train-image`` folder (``best.pt``, else
    ``latest.pt``) or a pipeline run (its refined model first, then ``image_model/``); for
    ``kind="cell_model"`` a pipeline run or its ``cell_model/`` folder.

    Raises
    ------
    FileNotFoundError
        Nothing there, naming what was looked for.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    names = RUN_MODEL_FILES[kind] + ("best.pt", "latest.pt")
    for name in names:
        if (p / name).is_file():
            return p / name
    what = "image model" if kind == "image_model" else "cell model"
    raise FileNotFoundError(f"{p} holds no trained {what} (looked for {', '.join(names)}); train it first "
                            f"(napari-cpgcn train / train-image) or give the .pt file")


def _checked_model_checkpoint(path: Path, kind_key: str, kind: str, what: str,
                              classes: Sequence[str] | None, backbone: str | None) -> dict[str, Any]:
    """Read a model checkpoint and check its kind, class set and backbone, each refusal saying
    what the file holds and what is needed (the same treatment for image and cell models)."""
    ckpt = load_checkpoint(path, map_location="cpu")
    meta = ckpt.get("meta", {})
    if meta.get(kind_key) != kind:
        holds = ("an image model" if meta.get("model") == "cpgcn-image" else
                 "a cell model" if meta.get("kind") == "cell_classifier" else "neither model")
        raise CheckpointError(f"{path} is not {what} checkpoint (it holds {holds}); give the run folder or "
                              f"its {what.split(' ', 1)[1]} checkpoint")
    if classes is not None and list(meta.get("classes", ())) != list(classes):
        have = list(meta.get("classes", ()))
        raise CheckpointError(
            f"{path} was trained on {len(have)} classes ({_short(have)}), but {len(classes)} are needed here "
            f"({_short(list(classes))}). Use a run trained on the 19 Kaggle 2021 classes, or retrain.")
    if backbone is not None and meta.get("backbone") != backbone:
        raise CheckpointError(f"{path} holds a {meta.get('backbone')} backbone, but {backbone} is needed here")
    return ckpt


def _load_state(model: nn.Module, ckpt: dict[str, Any], path: Path, what: str) -> None:
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit {what} ({str(e).splitlines()[0]}); the file was "
                              "modified or made by another version") from e


def load_image_model(path: str | Path, device: str | torch.device = "auto", *,
                     classes: Sequence[str] | None = tuple(SHORT_NAMES), backbone: str | None = None):
    """Load an image model checkpoint.

    Parameters
    ----------
    path
        ``.pt`` file, ``train-image`` folder or pipeline run folder (:func:`resolve_checkpoint`).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` ...
    classes
        Class short names the caller needs (None: accept any).
    backbone
        Required backbone (None: accept any).

    Returns
    -------
    model, config
        The model in eval mode on ``device`` (with ``image_size`` and ``class_names``
        attributes) and its :class:`~napari_cpgcn.training.config.ImageModelConfig`.

    Raises
    ------
    CheckpointError
        Corrupt, modified or foreign file, or made for other classes / another backbone.
    """
    from napari_cpgcn.models import build_image_model
    from napari_cpgcn.training.config import ImageModelConfig
    from napari_cpgcn.training.engine import resolve_device

    path = resolve_checkpoint(path, "image_model")
    ckpt = _checked_model_checkpoint(path, "model", "cpgcn-image", "an image model", classes, backbone)
    try:
        config = ImageModelConfig.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its configuration cannot be read ({e})") from e
    meta = ckpt["meta"]
    for key in ("backbone", "variant", "image_size"):
        if meta.get(key) != getattr(config, key):
            raise CheckpointError(f"{path}: metadata and configuration disagree on {key}; the file was modified")
    model = build_image_model(config, weights=None)
    _load_state(model, ckpt, path, f"a {config.variant}/{config.backbone} image model")
    model.to(resolve_device(device)).eval()
    model.image_size = config.image_size
    model.class_names = list(config.classes)
    return model, config


def load_cell_model(path: str | Path, device: str | torch.device = "auto", *,
                    classes: Sequence[str] | None = tuple(SHORT_NAMES)):
    """Load a cell classifier checkpoint (a ``.pt``, a ``cell_model/`` folder or a pipeline run).

    Returns
    -------
    (model, config, device)
        The model in eval mode on ``device``, its
        :class:`~napari_cpgcn.training.cell_trainer.CellModelConfig` and the torch device.

    Raises
    ------
    CheckpointError
        Corrupt, modified or foreign file, or made for other classes.
    """
    from napari_cpgcn.models.cell import build_cell_model
    from napari_cpgcn.training.cell_trainer import CELL_MODEL_KIND, CellModelConfig
    from napari_cpgcn.training.engine import resolve_device

    path = resolve_checkpoint(path, "cell_model")
    ckpt = _checked_model_checkpoint(path, "kind", CELL_MODEL_KIND, "a cell model", classes, None)
    try:
        config = CellModelConfig.from_dict(dict(ckpt.get("config", {})))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its configuration cannot be read ({e})") from e
    model = build_cell_model(config, weights=None)
    _load_state(model, ckpt, path, f"a {config.backbone} cell model")
    dev = resolve_device(device)
    model.to(dev).eval()
    return model, config, dev
