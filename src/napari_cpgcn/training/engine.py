"""A generic, resumable training loop that yields typed progress events.

:func:`fit` trains any ``nn.Module`` on batches that are dicts holding at least ``"image"``
and ``"target"`` tensors, and yields :class:`~napari_cpgcn.events.Event` objects
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

``run_dir/latest.pt`` is written after every epoch and ``run_dir/best.pt`` whenever the validation
mAP improves, in the format of :mod:`napari_cpgcn.training.checkpoint`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_cpgcn.events import Event, EventKind, ShouldStop
from napari_cpgcn.training import ddp
from napari_cpgcn.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from napari_cpgcn.training.losses import focal_loss

__all__ = [
    "FitResult",
    "resolve_device",
    "epoch_seed",
    "seed_everything",
    "default_logits",
    "evaluate_loader",
    "fit",
]

log = logging.getLogger(__name__)

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


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    from napari_cpgcn.io.atomic import atomic_write_text

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
