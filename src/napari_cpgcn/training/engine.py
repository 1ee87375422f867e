"""A generic, resumable training loop that yields typed progress events.

:func:`fit` trains any ``nn.Module`` on batches that are dicts holding at least ``"image"``
and ``"target"`` tensors, and yields :class:`~napari_cpgcn.training.events.Event` objects
(EPOCH_START, BATCH, EPOCH_END, CHECKPOINT, STOPPED, DONE). The image trainer, the sub-category
refinement and the cell classifier all use it; the CLI drains the events into progress bars and
the GUI wraps the generator in a worker.

Reproducibility and resume
--------------------------
At the start of every epoch all random generators (python, numpy, torch, CUDA and the
DataLoader's own generator when it has one) are re-seeded from ``(config.seed, epoch)``. An
epoch is therefore a pure function of the seed, the epoch number and the state saved at the
end of the previous epoch (weights, optimizer, AMP scaler, scheduler), and resuming from
``latest.pt`` gives the same weights as an uninterrupted run (bit-identical on CPU; on CUDA
as deterministic as the kernels are). A stop request inside an epoch leaves ``latest.pt`` at the
last finished epoch; resuming redoes the interrupted epoch.

Checkpoints
-----------
``run_dir/latest.pt`` after every epoch and ``run_dir/best.pt`` whenever the validation mAP
improves, written atomically (temporary file + rename). They hold only tensors and plain
Python values and are read with ``torch.load(weights_only=True)``; a SHA-256 digest over the
weights and metadata detects modified or truncated files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_cpgcn.training import ddp
from napari_cpgcn.training.events import Event, EventKind, ShouldStop
from napari_cpgcn.training.losses import focal_loss

__all__ = [
    "CheckpointError",
    "FitResult",
    "fit",
    "resolve_device",
    "seed_everything",
    "epoch_seed",
    "save_checkpoint",
    "load_checkpoint",
    "load_backbone_weights",
    "resolve_init_checkpoint",
    "check_init_checkpoint",
    "state_digest",
    "default_logits",
    "evaluate_loader",
    "CHECKPOINT_FORMAT",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "napari-cpgcn-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, modified, foreign, or for another model)."""


@dataclass
class FitResult:
    """What :func:`fit` reports in its DONE / STOPPED event's ``result``."""

    run_dir: str
    epochs_done: int
    best_metric: float
    best_epoch: int
    latest_path: str
    best_path: str
    stopped: bool = False
    history: list | None = None


# ----------------------------------------------------------------------------- devices & seeds

def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → cuda, else mps, else cpu; explicit names are checked for availability."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but Apple MPS is not available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; use auto, cuda, cuda:N, mps or cpu") from e


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch (a stable function of the run seed and the epoch)."""
    h = hashlib.sha256(f"{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and all CUDA devices."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _reseed_loader(loader, seed: int) -> None:
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
    sampler = getattr(loader, "sampler", None)
    sgen = getattr(sampler, "generator", None)
    if isinstance(sgen, torch.Generator) and sgen is not gen:
        sgen.manual_seed(seed + 1)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    try:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # older / foreign checkpoints
        log.warning("could not restore the random state from the checkpoint (%s); it is re-seeded", e)


# ----------------------------------------------------------------------------- checkpoints

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            buf = io.BytesIO()
            torch.save(obj, buf)
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        if "Unsupported global" in text or "safe_globals" in text:
            glob = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), "")
            raise CheckpointError(
                f"{path} contains Python objects other than tensors and plain values and was refused "
                f"(loading it could run code). Only napari-cpgcn checkpoints can be used. {glob}".rstrip()
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
INIT_CANDIDATES = {
    "image_model": ("refine/best.pt", "refine/latest.pt", "image_model/best.pt", "image_model/latest.pt",
                    "best.pt", "latest.pt"),
    "cell_model": ("cell_model/best.pt", "cell_model/latest.pt"),
}


def resolve_init_checkpoint(source: str | Path, stage: str = "image_model") -> Path:
    """The checkpoint a model of ``stage`` starts from: ``source`` itself (a ``.pt``) or, for a
    run folder, the first of :data:`INIT_CANDIDATES` that exists.

    Raises
    ------
    FileNotFoundError
        Nothing there, naming what was looked for.
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: give a finished run folder or a .pt checkpoint")
    if src.is_file():
        return src
    cands = INIT_CANDIDATES.get(stage, (f"{stage}/best.pt", f"{stage}/latest.pt"))
    for cand in cands:
        if (src / cand).is_file():
            return src / cand
    raise FileNotFoundError(
        f"{src} holds no {stage.replace('_', ' ')} to start from (looked for {', '.join(cands)}); "
        "give a finished run folder or a .pt file")


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
    if have != name:
        raise CheckpointError(
            f"{src} holds a {have} backbone but the {stage.replace('_', ' ')} here uses {name}: choose the "
            f"backbone {have} or start from a checkpoint with a {name} backbone")
    return src, ckpt


def load_backbone_weights(backbone: nn.Module, source: str | Path, name: str, stage: str = "image_model") -> Path:
    """Start ``backbone`` from the backbone of an earlier napari-cpgcn model (fine-tuning).

    ``source`` is an image- or cell-model checkpoint or a run folder (see
    :func:`resolve_init_checkpoint`: a pipeline run's refined image model / cell model, or a
    ``train-image`` folder's ``best.pt``). Only backbone tensors are taken; the input
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


# ----------------------------------------------------------------------------- batches

def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def default_logits(output: Any) -> torch.Tensor:
    """Logits of a model output: the tensor itself, the first item of a tuple, or ``["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output["logits"]
    return output[0]


def _default_forward(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    return model(batch["image"])


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, device: torch.device, *, forward_fn=None, logits_fn=None,
                    loss_fn=None, should_stop: ShouldStop | None = None, amp: bool = False,
                    ) -> dict[str, Any] | None:
    """Run a model over a loader: ``{"loss", "probs" (N, C), "targets" (N, C)}`` or None if stopped."""
    from napari_cpgcn.evaluation.image import mean_average_precision  # noqa: F401 (fail early)

    forward_fn = forward_fn or _default_forward
    logits_fn = logits_fn or default_logits
    model.eval()
    probs, targets, losses, n = [], [], 0.0, 0
    for batch in loader:
        batch = _to_device(batch, device)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            out = forward_fn(model, batch)
        logits = logits_fn(out).float()
        if loss_fn is not None:
            losses += float(loss_fn(out, batch)) * logits.shape[0]
        n += logits.shape[0]
        probs.append(torch.sigmoid(logits).cpu())
        targets.append(batch["target"].float().cpu())
        if should_stop is not None and should_stop():
            return None
    if n == 0:
        return {"loss": float("nan"), "probs": np.zeros((0, 0)), "targets": np.zeros((0, 0))}
    return {"loss": losses / n, "probs": torch.cat(probs).numpy(), "targets": torch.cat(targets).numpy()}


# ----------------------------------------------------------------------------- fit

def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    from napari_cpgcn.io.tables import atomic_write_text

    if not history:
        return
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    config,
    run_dir: str | Path,
    should_stop: ShouldStop | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    loss_fn: Callable[[Any, Mapping[str, Any]], torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Mapping[str, Any]], Any] | None = None,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    batch_hook: Callable[[Any, Mapping[str, Any], int], None] | None = None,
    epoch_hook: Callable[[int, dict[str, float]], None] | None = None,
    resume: bool = True,
    stage: str = "train",
    device: torch.device | str | None = None,
) -> Iterator[Event]:
    """Train ``model``; a generator of progress events.

    Parameters
    ----------
    model
        Any module; by default called as ``model(batch["image"])``. If it has a method
        ``param_groups(lr)`` returning Adam parameter groups, those are used (per-group lr).
    train_loader, val_loader
        Iterables of dict batches with ``"image"`` and ``"target"`` (``val_loader`` may be None:
        then ``best.pt`` follows the lowest training loss).
    config
        A :class:`~napari_cpgcn.training.config.TrainConfig` (or subclass): epochs, lr,
        weight_decay, lr_schedule, focal_gamma, focal_alpha, seed, device, amp, grad_clip.
    run_dir
        Folder for ``latest.pt``, ``best.pt`` and ``history.csv``.
    should_stop
        Polled after every batch; when it returns True the generator yields STOPPED and ends.
    meta
        JSON-like facts stored in every checkpoint and checked on resume (class list, backbone,
        normalisation, ...).
    loss_fn
        ``(output, batch) -> loss``; default: focal loss of the logits against ``batch["target"]``.
    forward_fn, logits_fn
        How to call the model and where its logits are in the output.
    batch_hook
        Called as ``batch_hook(output, batch, epoch)`` after every training step (e.g. OAA).
    epoch_hook
        Called as ``epoch_hook(epoch, metrics)`` after each epoch (before its checkpoint).
    resume
        Continue from ``run_dir/latest.pt`` when it exists.
    stage
        Tag put on every event.
    device
        Overrides ``config.device``.

    Yields
    ------
    Event
        EPOCH_START, BATCH (loss), EPOCH_END (metrics: train_loss, val_loss, val_mAP, lr,
        seconds), CHECKPOINT (path), LOG, then DONE or STOPPED with a :class:`FitResult`.
    """
    should_stop = should_stop or (lambda: False)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    latest_path, best_path = run_dir / "latest.pt", run_dir / "best.pt"
    meta = dict(meta or {})
    dev = resolve_device(device if device is not None else getattr(config, "device", "auto"))
    # Under torchrun: start the process group, one GPU per local rank (a no-op otherwise).
    dev = ddp.init_distributed(dev)
    main_process = ddp.is_main_process()
    use_amp = bool(getattr(config, "amp", True)) and dev.type == "cuda"
    forward_fn = forward_fn or _default_forward
    logits_fn = logits_fn or default_logits
    gamma = float(getattr(config, "focal_gamma", 2.0))
    alpha = getattr(config, "focal_alpha", None)
    if loss_fn is None:
        def loss_fn(output, batch):  # noqa: E306 - default loss closes over the config
            return focal_loss(logits_fn(output), batch["target"], gamma=gamma, alpha=alpha)
    n_epochs = int(config.epochs)
    seed = int(getattr(config, "seed", 0))

    seed_everything(seed)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    # A model may ask for per-group learning rates (``param_groups(lr) -> [{"params", "lr"}]``).
    groups = model.param_groups(float(config.lr)) if callable(getattr(model, "param_groups", None)) else params
    optimizer = torch.optim.Adam(groups, lr=float(config.lr), weight_decay=float(getattr(config, "weight_decay", 0.0)))
    schedule = getattr(config, "lr_schedule", "constant")

    def lr_factor(e: int) -> float:
        if schedule == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * e / max(1, n_epochs)))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best_metric, best_epoch = 0, -math.inf, 0
    history: list[dict[str, Any]] = []
    if resume and latest_path.is_file():
        ckpt = load_checkpoint(latest_path, map_location="cpu", expected_meta=meta)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{latest_path} does not fit this model ({str(e).splitlines()[0]}); "
                                  "use another run folder or the same model settings") from e
        model.to(dev)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        if use_amp and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        best_metric = float(ckpt.get("best_metric", -math.inf))
        best_epoch = int(ckpt.get("best_epoch", 0))
        history = list(ckpt.get("history", []))
        if "rng" in ckpt:
            _set_rng_state(ckpt["rng"])
        msg = f"resumed from {latest_path} after epoch {start_epoch}"
        log.info(msg)
        yield Event(EventKind.LOG, stage=stage, epoch=start_epoch, n_epochs=n_epochs, message=msg)
    elif not resume and latest_path.exists():
        log.info("not resuming: %s will be overwritten", latest_path)

    def result(stopped: bool, done: int) -> FitResult:
        return FitResult(str(run_dir), done, best_metric, best_epoch, str(latest_path),
                         str(best_path) if best_path.exists() else "", stopped, history)

    if start_epoch >= n_epochs:
        msg = f"{run_dir} already holds {start_epoch} finished epochs (of {n_epochs}); nothing to do"
        log.info(msg)
        yield Event(EventKind.LOG, stage=stage, epoch=start_epoch, n_epochs=n_epochs, message=msg)
        yield Event(EventKind.DONE, stage=stage, epoch=start_epoch, n_epochs=n_epochs, message=msg,
                    result=result(False, start_epoch))
        return

    # Under torchrun: DDP wrapper for the training steps, sharded loaders (no-ops otherwise).
    train_model = ddp.wrap_model(model, dev, getattr(config, "batch_size", None))
    train_loader = ddp.shard_loader(train_loader, seed)
    val_loader = ddp.shard_eval_loader(val_loader)
    try:
        n_batches = len(train_loader)
    except TypeError:
        n_batches = 0

    for epoch in range(start_epoch, n_epochs):
        es = epoch_seed(seed, epoch)
        seed_everything(es)
        _reseed_loader(train_loader, es)
        ddp.set_epoch(train_loader, epoch)
        yield Event(EventKind.EPOCH_START, stage=stage, epoch=epoch + 1, n_epochs=n_epochs, n_batches=n_batches)
        if should_stop():
            yield _stopped(stage, epoch, n_epochs, latest_path, result(True, epoch))
            return
        t0 = time.perf_counter()
        train_model.train()
        total, count = 0.0, 0
        for b, batch in enumerate(train_loader):
            batch = _to_device(batch, dev)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, enabled=use_amp):
                output = forward_fn(train_model, batch)
                loss = loss_fn(output, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {float(loss)} at epoch {epoch + 1}, batch {b + 1}; lower the "
                    "learning rate (--lr) or check the input images")
            scaler.scale(loss).backward()
            if getattr(config, "grad_clip", 0.0):
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, float(config.grad_clip))
            scaler.step(optimizer)
            scaler.update()
            if batch_hook is not None:
                with torch.no_grad():
                    batch_hook(output, batch, epoch)
            bs = int(batch["target"].shape[0])
            total += float(loss.detach()) * bs
            count += bs
            yield Event(EventKind.BATCH, stage=stage, epoch=epoch + 1, n_epochs=n_epochs, batch=b + 1,
                        n_batches=n_batches, loss=float(loss.detach()))
            if should_stop():
                yield _stopped(stage, epoch, n_epochs, latest_path, result(True, epoch))
                return
        total, count = ddp.all_reduce_sum(total, count, device=dev)
        ddp.sync_buffers(model)  # the same BatchNorm statistics on every rank for validation
        train_loss = total / max(count, 1)
        metrics: dict[str, float] = {"train_loss": train_loss, "lr": float(optimizer.param_groups[0]["lr"])}
        scheduler.step()
        if val_loader is not None:
            ev = evaluate_loader(model, val_loader, dev, forward_fn=forward_fn, logits_fn=logits_fn,
                                 loss_fn=loss_fn, should_stop=should_stop, amp=use_amp)
            ev = ddp.gather_eval(ev, val_loader)  # every rank's slice: metrics of the whole set
            if ev is None:
                yield _stopped(stage, epoch, n_epochs, latest_path, result(True, epoch))
                return
            from napari_cpgcn.evaluation.image import mean_average_precision

            metrics["val_loss"] = ev["loss"]
            metrics["val_mAP"] = (mean_average_precision(ev["targets"], ev["probs"])
                                  if len(ev["probs"]) else float("nan"))
            score = metrics["val_mAP"]
        else:
            score = -train_loss
        metrics["seconds"] = time.perf_counter() - t0
        if epoch_hook is not None:
            epoch_hook(epoch, metrics)
        improved = bool(np.isfinite(score) and score > best_metric) or (best_epoch == 0 and not np.isfinite(best_metric))
        if improved:
            best_metric, best_epoch = (float(score) if np.isfinite(score) else best_metric), epoch + 1
        history.append({"epoch": epoch + 1, **metrics})
        payload = dict(
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if use_amp else {},
            epoch=epoch + 1,
            best_metric=best_metric,
            best_epoch=best_epoch,
            config=config.to_dict() if hasattr(config, "to_dict") else dict(vars(config)),
            history=history,
            rng=_rng_state(),
            stage=stage,
        )
        model_state = model.state_dict()
        if main_process:  # under torchrun only rank 0 writes (the ranks' weights are identical)
            save_checkpoint(latest_path, model_state, meta, **payload)
            yield Event(EventKind.CHECKPOINT, stage=stage, epoch=epoch + 1, n_epochs=n_epochs, path=str(latest_path))
        if improved and main_process:
            # best.pt is a model for inference: weights, meta and config, without optimizer state.
            save_checkpoint(best_path, model_state, meta, epoch=epoch + 1, best_metric=best_metric,
                            best_epoch=best_epoch, config=payload["config"], history=history, stage=stage)
            yield Event(EventKind.CHECKPOINT, stage=stage, epoch=epoch + 1, n_epochs=n_epochs, path=str(best_path),
                        message="best")
        if main_process:
            _write_history(run_dir / "history.csv", history)
        ddp.barrier()  # the other ranks go on once rank 0's files are complete
        yield Event(EventKind.EPOCH_END, stage=stage, epoch=epoch + 1, n_epochs=n_epochs, loss=train_loss,
                    metrics=dict(metrics))
    yield Event(EventKind.DONE, stage=stage, epoch=n_epochs, n_epochs=n_epochs,
                message=f"trained {n_epochs} epochs; best epoch {best_epoch}", result=result(False, n_epochs))


def _stopped(stage: str, epoch: int, n_epochs: int, latest: Path, res: FitResult) -> Event:
    msg = (f"stopped during epoch {epoch + 1}; {latest} keeps epoch {epoch}" if latest.exists()
           else f"stopped during epoch {epoch + 1} before any checkpoint was written")
    log.info(msg)
    return Event(EventKind.STOPPED, stage=stage, epoch=epoch, n_epochs=n_epochs, message=msg,
                 path=str(latest) if latest.exists() else "", result=res)
