"""Multi-process training under ``torchrun`` (PyTorch DistributedDataParallel).

Launch any trainer command under torchrun and the training engine
(:func:`napari_cpgcn.training.engine.fit`) turns data-parallel by itself::

    torchrun --nproc-per-node 4 --no-python napari-cpgcn train-image DATA --labels L.csv --out RUN
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --no-python napari-cpgcn train-image ...

What happens (everything keyed on torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``):

* :func:`init_distributed` starts the process group: ``nccl`` with one GPU per local rank on
  CUDA, ``gloo`` on CPU.
* :func:`wrap_model` wraps the model in ``DistributedDataParallel`` (gradients averaged over
  the ranks: one step is one step of the *global* batch ``batch_size x WORLD_SIZE``);
  BatchNorm becomes SyncBatchNorm on CUDA when the per-process batch is small (SyncBatchNorm
  has no CPU kernel; on CPU each rank normalises over its own batch and DDP keeps the running
  statistics equal by broadcasting rank 0's buffers).
* :func:`shard_loader` rebuilds the training DataLoader around a ``DistributedSampler`` (every
  rank the same number of batches, a new shuffle each epoch through :func:`set_epoch`);
  :func:`shard_eval_loader` gives each rank a disjoint slice of the validation set and
  :func:`gather_eval` reassembles the predictions in the original order, so validation loss and
  mAP are those of the whole validation set, the same on every rank.
* :func:`all_reduce_sum` sums the training loss over the ranks.
* Only rank 0 writes checkpoints, ``history.csv``, logs and progress bars
  (:func:`is_main_process`). In ``napari-cpgcn train`` the segmentation stage is split over the
  ranks (:func:`shard_ids`), the pseudo-label stage runs on rank 0 while the others wait, and
  ranks meet at a :func:`barrier` between stages (timeout ``NAPARI_CPGCN_DDP_TIMEOUT_MIN``,
  default 180 minutes). OAA maps are written by the rank that saw the image (disjoint
  files; an image padded onto two ranks in one epoch may lose one of its two updates).

Without torchrun (``WORLD_SIZE`` unset or 1) every function is a no-op, so the serial path
(and the GUI, which always trains in one process) is unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DistEnv",
    "dist_env",
    "is_distributed",
    "is_main_process",
    "init_distributed",
    "wrap_model",
    "unwrap_model",
    "shard_loader",
    "shard_eval_loader",
    "set_epoch",
    "shard_ids",
    "all_reduce_sum",
    "gather_eval",
    "sync_buffers",
    "barrier",
    "cleanup",
]

log = logging.getLogger(__name__)

#: Per-process batches up to this size get SyncBatchNorm on CUDA.
SYNC_BN_MAX_BATCH = 32


@dataclass(frozen=True)
class DistEnv:
    """torchrun's view of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` from the environment (set by torchrun)."""
    def geti(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return DistEnv(geti("RANK", 0), geti("WORLD_SIZE", 1), geti("LOCAL_RANK", 0))


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    """Whether this process runs under torchrun with more than one process."""
    d = _dist()
    return d.get_world_size() > 1 if d is not None else dist_env().distributed


def is_main_process() -> bool:
    """Rank 0 (or no torchrun at all): the process that writes files and reports progress."""
    d = _dist()
    return d.get_rank() == 0 if d is not None else dist_env().main


def init_distributed(device: torch.device) -> torch.device:
    """Start the process group when launched by torchrun; returns this rank's device.

    On CUDA each local rank gets its own GPU (``cuda:LOCAL_RANK``) and the ``nccl`` backend; on
    any other device the ``gloo`` backend. Idempotent; a no-op without torchrun.
    """
    env = dist_env()
    if not env.distributed:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        n = torch.cuda.device_count()
        if env.local_rank >= n:
            raise RuntimeError(f"local rank {env.local_rank} has no GPU (this node has {n}); start torchrun "
                               f"with --nproc-per-node {n} or fewer")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise RuntimeError("torchrun training on Apple MPS is not supported; use --device cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Long: ranks may wait at a barrier while rank 0 alone does a non-parallel pipeline stage.
        minutes = float(os.environ.get("NAPARI_CPGCN_DDP_TIMEOUT_MIN", "180"))
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(minutes=minutes))
        atexit.register(cleanup)
        log.info("process group: rank %d of %d (local rank %d), backend %s, device %s",
                 env.rank, env.world_size, env.local_rank, backend, device)
    return device


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def wrap_model(model: nn.Module, device: torch.device, batch_size: int | None = None) -> nn.Module:
    """``DistributedDataParallel(model)`` under torchrun, else ``model`` itself.

    ``static_graph=True``: the same parameters take part in every step, and parameters unused by
    a model variant (e.g. the GCN branch of the plain CNN) need no ``find_unused_parameters``.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda" and _has_batchnorm(model) and (batch_size or 0) <= SYNC_BN_MAX_BATCH:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("BatchNorm synchronised across ranks (per-process batch %s)", batch_size)
    kwargs: dict[str, Any] = {"static_graph": True}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
        kwargs["output_device"] = device.index
    return DDP(model, **kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (checkpoints hold its state, without ``module.``)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def _rebuild(loader, sampler, drop_last: bool):
    from torch.utils.data import DataLoader

    kwargs: dict[str, Any] = dict(
        batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
    )
    if loader.num_workers > 0:
        kwargs.update(multiprocessing_context=loader.multiprocessing_context,
                      persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
    return DataLoader(loader.dataset, **kwargs)


def shard_loader(loader, seed: int = 0):
    """The training loader with a ``DistributedSampler`` (same batch size, workers, collate).

    Each rank gets ``ceil(N / WORLD_SIZE)`` samples per epoch (the sampler pads with repeats so
    that every rank runs the same number of steps). Loaders that are not plain ``DataLoader`` s
    with a random or sequential sampler are refused: DDP needs the ranks in lock step.
    """
    if not is_distributed() or loader is None:
        return loader
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise TypeError("distributed training needs a torch DataLoader with a batch_size")
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        raise TypeError(f"distributed training cannot shard a DataLoader with a {type(loader.sampler).__name__}; "
                        "use shuffle=True/False")
    shuffle = isinstance(loader.sampler, RandomSampler)
    d = _dist()
    sampler = DistributedSampler(loader.dataset, num_replicas=d.get_world_size(), rank=d.get_rank(),
                                 shuffle=shuffle, seed=int(seed), drop_last=False)
    per_rank = sampler.num_samples
    bs = int(loader.batch_size)
    # as the serial trainers do: never leave a last batch of one sample (BatchNorm cannot train on it)
    drop_last = bool(loader.drop_last) or (per_rank % bs == 1 and per_rank > bs)
    return _rebuild(loader, sampler, drop_last)


class _ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + W, rank + 2W, ...``: disjoint slices without padding."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_eval_loader(loader):
    """The validation loader restricted to this rank's disjoint slice (see :func:`gather_eval`)."""
    if not is_distributed() or loader is None:
        return loader
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise TypeError("distributed validation needs a torch DataLoader with a batch_size")
    d = _dist()
    return _rebuild(loader, _ShardSampler(len(loader.dataset), d.get_rank(), d.get_world_size()), False)


def shard_ids(ids: Sequence[str]) -> list[str]:
    """This rank's slice ``ids[rank::WORLD_SIZE]`` of a list of image ids (all of them without torchrun)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return list(ids)
    return list(ids)[d.get_rank()::d.get_world_size()]


def set_epoch(loader, epoch: int) -> None:
    """Tell the loader's ``DistributedSampler`` the epoch (a new, seeded shuffle per epoch)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(int(epoch))


def all_reduce_sum(*values: float, device: torch.device | None = None) -> tuple[float, ...]:
    """Sum scalars over the ranks (identity without torchrun)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return tuple(float(v) for v in values)
    dev = device if (device is not None and d.get_backend() == "nccl") else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    d.all_reduce(t, op=d.ReduceOp.SUM)
    return tuple(float(v) for v in t.cpu())


def gather_eval(ev: dict[str, Any] | None, loader) -> dict[str, Any] | None:
    """Merge every rank's :func:`~napari_cpgcn.training.engine.evaluate_loader` result.

    Probabilities and targets come back in the dataset's order and the loss is the mean over
    all samples, so metrics equal those of a single process evaluating everything.
    """
    d = _dist()
    if d is None or d.get_world_size() == 1 or ev is None:
        return ev
    indices = list(getattr(loader.sampler, "indices", range(len(ev["probs"]))))
    n = len(ev["probs"])
    mine = {"idx": indices[:n], "loss": float(ev["loss"]) * n if n else 0.0, "n": n,
            "probs": np.asarray(ev["probs"]), "targets": np.asarray(ev["targets"])}
    parts: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(parts, mine)
    parts = [p for p in parts if p["n"]]
    total = sum(p["n"] for p in parts)
    if total == 0:
        return ev
    idx = np.concatenate([np.asarray(p["idx"]) for p in parts])
    order = np.argsort(idx, kind="stable")
    return {"loss": sum(p["loss"] for p in parts) / total,
            "probs": np.concatenate([p["probs"] for p in parts])[order],
            "targets": np.concatenate([p["targets"] for p in parts])[order]}


def sync_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks.

    DDP gives every rank rank 0's buffers at the start of each forward pass, but the last steps
    of an epoch leave each rank with its own statistics. Averaging them after the epoch makes
    validation and the checkpoint use the same model on every rank, with statistics of all the
    data. Integer buffers (batch counters) are taken from rank 0.
    """
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return
    world = d.get_world_size()
    with torch.no_grad():
        for buf in unwrap_model(model).buffers():
            if buf.is_floating_point():
                d.all_reduce(buf, op=d.ReduceOp.SUM)
                buf.div_(world)
            else:
                d.broadcast(buf, src=0)


def barrier() -> None:
    """Wait for every rank (no-op without torchrun)."""
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()


@contextlib.contextmanager
def main_process_first():
    """Run the block on rank 0 first, then on the other ranks (no-op without torchrun).

    For work with a shared side effect, such as downloading ImageNet weights into the cache:
    rank 0 fetches them once, the others then find them there.
    """
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def cleanup() -> None:
    """Tear the process group down (at the end of a torchrun job)."""
    d = _dist()
    if d is not None:
        d.destroy_process_group()
