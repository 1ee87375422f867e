"""What the folder subcommands ``predict`` and ``segment`` share (not a subcommand).

INPUT_DIR (:func:`add_input_dir_argument`, :func:`checked_input_dir`), the Dask cluster options
(:func:`add_cluster_arguments`, :func:`cluster_arguments`; see docs/scaling.md) and the choice
between the in-process run and the run as Dask tasks (:func:`folder_events`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path


def add_input_dir_argument(p: argparse.ArgumentParser) -> None:
    """The INPUT_DIR positional argument."""
    p.add_argument("input_dir", metavar="INPUT_DIR", help="folder of HPA images (or a data set root with images/)")


def checked_input_dir(args: argparse.Namespace) -> Path:
    """INPUT_DIR, checked to be a folder (a usage error otherwise)."""
    from napari_cpgcn.cli import UsageError

    path = Path(args.input_dir)
    if not path.is_dir():
        raise UsageError(f"INPUT_DIR {path} is not a folder; give the folder that holds the images")
    return path


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """``--cluster``, ``--cluster-config``, ``--max-workers``, ``--max-tries`` (see docs/scaling.md)."""
    g = p.add_argument_group("cluster (Dask; pip install \"napari-cpgcn[distributed]\")")
    g.add_argument("--cluster", default=None, metavar="SPEC",
                   help="run the images as Dask tasks: local:N (N worker processes here), tcp://HOST:PORT "
                        "(a running scheduler), slurm, lsf or pbs (with --cluster-config); default: in-process")
    g.add_argument("--cluster-config", default=None, metavar="FILE.yaml",
                   help="slurm/lsf/pbs job settings: cores, memory, walltime, queue, account, gpus, ...")
    g.add_argument("--max-workers", type=int, default=None, metavar="N",
                   help="slurm/lsf/pbs: scale adaptively up to N worker processes (default 4)")
    g.add_argument("--max-tries", type=int, default=3, metavar="N",
                   help="an image whose worker process died N times is listed in failures.csv (default 3)")


def cluster_arguments(args: argparse.Namespace) -> dict:
    """Checked ``cluster``, ``cluster_config``, ``max_workers``, ``max_tries`` keyword arguments.

    Bad specs, a missing or bad config and a missing Dask install are usage errors (exit 2),
    found before any work starts.
    """
    from napari_cpgcn.cli import UsageError

    try:
        from napari_cpgcn.batch.dask import (
            JOBQUEUE_KINDS,
            ClusterError,
            ClusterSpec,
            DaskMissingError,
            jobqueue_kwargs,
            load_cluster_config,
            require_dask,
        )
    except ImportError as e:  # pragma: no cover - distributed.py imports Dask only if installed
        raise UsageError(f"cannot use --cluster: {e}") from None
    if args.max_tries < 1 or (args.max_workers is not None and args.max_workers < 1):
        raise UsageError("--max-tries and --max-workers must be at least 1")
    try:
        spec = ClusterSpec.parse(args.cluster)
        require_dask(jobqueue=spec.kind in JOBQUEUE_KINDS)
        config = load_cluster_config(args.cluster_config)
        if spec.kind in JOBQUEUE_KINDS:
            if not config:
                raise ClusterError(f"--cluster {spec.kind} needs --cluster-config FILE.yaml with the job settings "
                                   "(cores, memory, walltime, queue, ...); see docs/scaling.md")
            jobqueue_kwargs(spec.kind, config)  # unknown keys / missing cores or memory: fail now
    except (ClusterError, DaskMissingError) as e:
        raise UsageError(str(e)) from None
    return {"cluster": args.cluster, "cluster_config": config or None, "max_workers": args.max_workers,
            "max_tries": args.max_tries}


def folder_events(args: argparse.Namespace, local: Callable[..., Iterator], distributed: str,
                  *fargs, **kwargs) -> Iterator:
    """The events of ``local(*fargs, **kwargs)``, or with ``--cluster`` those of
    ``napari_cpgcn.batch.dask.<distributed>(*fargs, **kwargs)`` plus the checked cluster options
    (:func:`cluster_arguments`: a bad ``--cluster`` setup is a usage error before any work starts)."""
    if not args.cluster:
        return local(*fargs, **kwargs)
    cluster = cluster_arguments(args)
    from napari_cpgcn.batch import dask as dist

    return getattr(dist, distributed)(*fargs, **cluster, **kwargs)
