"""Folder prediction on a Dask cluster: a workstation, a running scheduler, SLURM / LSF / PBS.

:func:`predict_folder_distributed` is :func:`napari_cpgcn.batch.predict_folder` with the images
spread over Dask workers. It yields the same :class:`~napari_cpgcn.events.Event` s and
leaves the same files: the run-level CSVs are identical to a serial run's.

Cluster specs (``--cluster``)
-----------------------------
``local:N``
    A :class:`dask.distributed.LocalCluster` of N worker processes with one thread each; torch
    in each worker uses ``cores // N`` threads, so N workers do not oversubscribe the machine.
``tcp://HOST:PORT``
    A running scheduler (``dask scheduler`` + ``dask worker``, Kubernetes, Coiled, ...); its
    workers must see the input and output folders at the same paths.
``slurm``, ``lsf``, ``pbs``
    A dask-jobqueue cluster built from ``--cluster-config FILE.yaml`` (cores, memory, walltime,
    queue, account, gpus, job_extra_directives, job_script_prologue, ...), scaled adaptively from
    0 up to ``--max-workers`` worker processes.

Design
------
* **One task per image**, running :func:`napari_cpgcn.batch.process_image` -- the function the
  serial path is built from -- with the model given as its run folder (a short string). Each
  worker process loads the predictor once (:func:`napari_cpgcn.batch.load_predictor` caches it
  per process, keyed by the checkpoints' fingerprint); a predictor object (API use, tests) is
  shipped once per worker by a :class:`WorkerPlugin` and tasks carry only its key. No weights
  and no image bytes travel through the scheduler: workers read the images from the shared path
  and write their per-image outputs there, each file atomically, the done marker last.
* **The client assembles** ``cells.csv``, ``images.csv``, ``failures.csv`` (and
  ``submission.csv``) with :func:`napari_cpgcn.batch.assemble_outputs`, the serial path's own
  code, so the files are byte-identical to a serial run's.
* **Faults**: a worker that dies mid-task (out of memory, a crash in native code, a pre-empted
  node) has its task rerun on another worker by the scheduler; an image that has been on
  ``max_tries`` dying workers ends as ``KilledWorker`` in ``failures.csv`` (stage ``worker``).
  Only one task runs per worker at a time (``worker-saturation`` 1.0), so an innocent image is
  never blamed for its neighbour's crash. A model that cannot be loaded stops the run with the
  workers' error after three failed tasks. Ctrl-C cancels the tasks and leaves only complete
  files; rerunning resumes (finished images are skipped before any task is submitted).
* Tasks are submitted through a bounded window, so the client's memory and the scheduler's
  queue stay small for 100,000 images.

Dask and dask-jobqueue are an optional extra: ``pip install "napari-cpgcn[distributed]"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from napari_cpgcn.batch.local import check_segmentation, process_image
from napari_cpgcn.batch.outputs import (
    BatchOptions,
    ImageRecord,
    _record_failure,
    finish_run,
    record_item,
    start_run,
)
from napari_cpgcn.events import Event, EventKind, ShouldStop
from napari_cpgcn.io.atomic import check_writable
from napari_cpgcn.io.hpa import folder_image_ids
from napari_cpgcn.pipeline.predictor import model_fingerprint, resolve_model_path

__all__ = [
    "INSTALL_HINT",
    "JOBQUEUE_KINDS",
    "ClusterError",
    "DaskMissingError",
    "ClusterSpec",
    "WorkerModel",
    "require_dask",
    "default_torch_threads",
    "load_cluster_config",
    "make_jobqueue_cluster",
    "open_client",
    "predict_folder_distributed",
    "segment_folder_distributed",
]

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "napari-cpgcn[distributed]"'
JOBQUEUE_KINDS: tuple[str, ...] = ("slurm", "lsf", "pbs")
#: A worker-process crash blamed on the same task this many times ends it as a failure.
DEFAULT_MAX_TRIES = 3
#: Tasks that raise (rather than fail an image) before the run is stopped when none succeeded.
_MAX_SYSTEMIC_ERRORS = 3


class ClusterError(ValueError):
    """A bad ``--cluster`` spec or cluster config; the message says what is accepted."""


class DaskMissingError(ImportError):
    """Dask (or dask-jobqueue) is not installed; the message gives the install command."""


def require_dask(jobqueue: bool = False) -> None:
    """Raise :class:`DaskMissingError` with the install command when Dask is absent."""
    try:
        import dask.distributed  # noqa: F401
    except ImportError as e:
        raise DaskMissingError(
            f"running on a cluster needs Dask distributed, which is not installed ({e}). "
            f"Install it with: {INSTALL_HINT}") from e
    if jobqueue:
        try:
            import dask_jobqueue  # noqa: F401
        except ImportError as e:
            raise DaskMissingError(
                f"SLURM / LSF / PBS clusters need dask-jobqueue, which is not installed ({e}). "
                f"Install it with: {INSTALL_HINT}") from e


# --------------------------------------------------------------------------------------------
# Cluster specs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value.

    Attributes
    ----------
    kind : str
        ``"local"``, ``"tcp"`` (an existing scheduler), ``"slurm"``, ``"lsf"`` or ``"pbs"``.
    n_workers : int
        Worker processes of a local cluster.
    address : str
        Scheduler address of an existing cluster.
    """

    kind: str
    n_workers: int = 0
    address: str = ""

    @classmethod
    def parse(cls, spec: str) -> ClusterSpec:
        """Parse ``local:N``, ``tcp://HOST:PORT``, ``slurm``, ``lsf`` or ``pbs``."""
        s = (spec or "").strip()
        low = s.lower()
        if low == "local" or low.startswith("local:"):
            n = low.partition(":")[2] or str(max(1, _usable_cores()))
            try:
                n_workers = int(n)
            except ValueError:
                n_workers = 0
            if n_workers < 1:
                raise ClusterError(f"--cluster {spec!r}: local:N needs a number of workers >= 1, e.g. local:4")
            return cls("local", n_workers=n_workers)
        if "://" in s:
            proto, _, rest = s.partition("://")
            if proto.lower() not in ("tcp", "tls", "ucx", "ws", "wss") or ":" not in rest:
                raise ClusterError(f"--cluster {spec!r}: a scheduler address looks like tcp://HOST:PORT "
                                   "(e.g. tcp://10.0.0.5:8786)")
            return cls("tcp", address=s)
        if low in JOBQUEUE_KINDS:
            return cls(low)
        raise ClusterError(
            f"--cluster {spec!r} is not understood; use local:N (N worker processes on this machine), "
            "tcp://HOST:PORT (a running Dask scheduler), or slurm / lsf / pbs with --cluster-config FILE.yaml")

    def __str__(self) -> str:
        if self.kind == "local":
            return f"local:{self.n_workers}"
        return self.address if self.kind == "tcp" else self.kind


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_torch_threads(n_workers: int, cores: int | None = None) -> int:
    """Torch threads per worker so that ``n_workers`` processes share ``cores`` without oversubscription."""
    cores = cores or _usable_cores()
    return max(1, cores // max(1, n_workers))


# --------------------------------------------------------------------------------------------
# dask-jobqueue
# --------------------------------------------------------------------------------------------

#: Dask settings of the workers napari-cpgcn starts: they may start processes of their own
#: (DataLoader workers, cellpose), and the statistical profiler (a stack sample every 10 ms)
#: costs CPU time that long numeric tasks do not need.
_WORKER_CONFIG: dict[str, Any] = {
    "distributed.worker.daemon": False,
    "distributed.worker.profile.enabled": False,
}

#: Keys of --cluster-config that napari-cpgcn reads itself (the rest go to the jobqueue class).
_OWN_KEYS = ("gpus", "torch_threads")


def load_cluster_config(path: str | Path | None) -> dict[str, Any]:
    """Read a ``--cluster-config`` YAML file into a dict (``{}`` for None)."""
    if path is None:
        return {}
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ClusterError(f"--cluster-config {p} does not exist; write a YAML file with cores, memory, "
                           "walltime, queue, ... (see docs/scaling.md)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ClusterError(f"--cluster-config {p} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ClusterError(f"--cluster-config {p} must hold a mapping (key: value lines), not {type(data).__name__}")
    return dict(data)


def _gpu_directives(kind: str, gpus: int) -> list[str]:
    if gpus <= 0:
        return []
    if kind == "slurm":
        return [f"--gres=gpu:{gpus}"]
    if kind == "lsf":
        return [f'-gpu "num={gpus}"']
    return []  # PBS: GPUs go into the select statement (see jobqueue_kwargs)


def _jobqueue_class(kind: str):
    require_dask(jobqueue=True)
    import dask_jobqueue

    return {"slurm": dask_jobqueue.SLURMCluster, "lsf": dask_jobqueue.LSFCluster,
            "pbs": dask_jobqueue.PBSCluster}[kind]


def jobqueue_kwargs(kind: str, config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The keyword arguments of the dask-jobqueue cluster for ``config`` and torch threads per worker.

    Adds the GPU directive for ``gpus``, a ``cpgcn_predict=1`` worker resource (one prediction at
    a time per worker process, whatever its thread count), thread-count environment variables in
    the job script, and quiet defaults.
    """
    if kind not in JOBQUEUE_KINDS:
        raise ClusterError(f"cluster kind {kind!r} is not one of {', '.join(JOBQUEUE_KINDS)}")
    cfg = dict(config)
    for required in ("cores", "memory"):
        if required not in cfg:
            raise ClusterError(f"--cluster-config needs '{required}' (per job) for {kind}; see docs/scaling.md")
    gpus = int(cfg.pop("gpus", 0) or 0)
    processes = int(cfg.get("processes", 1) or 1)
    cfg["processes"] = processes
    torch_threads = int(cfg.pop("torch_threads", 0) or 0) or max(1, int(cfg["cores"]) // processes)
    cfg["job_extra_directives"] = list(cfg.get("job_extra_directives", [])) + _gpu_directives(kind, gpus)
    if kind == "pbs" and gpus and "resource_spec" not in cfg:
        # PBS Pro asks for GPUs in the chunk: select=1:ncpus=C:ngpus=G:mem=M (Torque sites give
        # their own resource_spec, e.g. nodes=1:ppn=8:gpus=1)
        cfg["resource_spec"] = f"select=1:ncpus={int(cfg['cores'])}:ngpus={gpus}:mem={cfg['memory']}"
    cfg["worker_extra_args"] = list(cfg.get("worker_extra_args", [])) + ["--resources", "cpgcn_predict=1"]
    threads_env = [f"export {v}={torch_threads}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                           "OPENBLAS_NUM_THREADS")]
    worker_env = [f"export DASK_{k.upper().replace('.', '__').replace('-', '_')}={v}"
                  for k, v in _WORKER_CONFIG.items()]
    cfg["job_script_prologue"] = list(cfg.get("job_script_prologue", [])) + threads_env + worker_env
    cfg.setdefault("job_name", "napari-cpgcn")
    cls = _jobqueue_class(kind)
    import inspect

    accepted: set[str] = set()
    for c in cls.__mro__:
        if "__init__" in vars(c):
            accepted |= set(inspect.signature(c.__init__).parameters)
    job_cls = getattr(cls, "job_cls", None)
    for c in getattr(job_cls, "__mro__", ()):
        if "__init__" in vars(c):
            accepted |= set(inspect.signature(c.__init__).parameters)
    unknown = sorted(k for k in cfg if k not in accepted)
    if unknown:
        raise ClusterError(f"--cluster-config: {', '.join(unknown)} not understood by {cls.__name__}; "
                           f"known keys include cores, memory, processes, walltime, queue, account, "
                           f"gpus, job_extra_directives, job_script_prologue, local_directory, log_directory, python")
    return cfg, torch_threads


def make_jobqueue_cluster(kind: str, config: dict[str, Any]):
    """Build (but do not scale) a dask-jobqueue cluster; ``cluster.job_script()`` shows its job."""
    kwargs, _ = jobqueue_kwargs(kind, config)
    try:
        return _jobqueue_class(kind)(**kwargs)
    except (TypeError, ValueError) as e:
        raise ClusterError(f"--cluster-config for {kind}: {e}") from e


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------

_WORKER_MODELS: dict[str, Any] = {}
_WORKER_LOCK = threading.Lock()


@dataclass(frozen=True)
class WorkerModel:
    """A picklable handle to a predictor installed on every worker by :class:`_WorkerSetup`.

    Tasks carry this (a key), not the predictor; ``predict`` forwards to the worker's copy.
    """

    key: str
    #: :class:`~napari_cpgcn.pipeline.Predictor` attribute: a shipped object has no run folder here.
    run_dir: ClassVar[None] = None

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with _WORKER_LOCK:
            predictor = _WORKER_MODELS.get(self.key)
        if predictor is None:
            raise RuntimeError(f"predictor {self.key} is not installed on this worker (the worker "
                               "plugin did not run); use a model path instead of an object")
        return predictor.predict(*args, **kwargs)


try:  # the base class only matters when Dask is installed (every use checks require_dask first)
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover
    _WorkerPluginBase = object


def _tune_malloc() -> bool:
    """Undo Dask's ``MALLOC_TRIM_THRESHOLD_=65536`` in this worker process (glibc only).

    Dask's nanny starts workers with that variable to hand freed memory back to the OS quickly;
    setting it also freezes glibc's adaptive mmap threshold, so every array above 128 kB is a
    fresh ``mmap`` whose pages fault in again. Per 2048² image that made prediction ~20 % slower
    than in a plain process (measured). ``mallopt`` puts back the values glibc adapts to on its
    own for large arrays (mmap threshold 32 MB, trim threshold 64 MB).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1
        return bool(libc.mallopt(m_trim_threshold, 64 * 2**20) == 1 and ok)
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


class _WorkerSetup(_WorkerPluginBase):
    """Per worker process: torch / BLAS threads, glibc malloc tuning, a shipped predictor.

    Defined at module level so that workers unpickle it by reference and share this module's
    predictor registry with :class:`WorkerModel`.
    """

    name = "napari-cpgcn-setup"

    def __init__(self, torch_threads: int = 0, key: str = "", predictor: Any = None,
                 tune_malloc: bool = False) -> None:
        self.torch_threads = int(torch_threads)
        self.key = key
        self.predictor = predictor
        self.tune_malloc = tune_malloc

    def setup(self, worker) -> None:
        if self.tune_malloc:
            _tune_malloc()
        if self.torch_threads > 0:
            for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[v] = str(self.torch_threads)
            import torch

            torch.set_num_threads(self.torch_threads)
        if self.predictor is not None:
            with _WORKER_LOCK:
                _WORKER_MODELS[self.key] = self.predictor

    def teardown(self, worker) -> None:
        with _WORKER_LOCK:
            _WORKER_MODELS.pop(self.key, None)


# --------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------

@dataclass
class ClusterInfo:
    """What :func:`open_client` started or connected to."""

    spec: str
    dashboard: str = ""
    n_workers: int = 0          # worker processes now (or the adaptive maximum)
    torch_threads: int = 0      # per worker (0: left to the cluster)
    resources: dict[str, float] = field(default_factory=dict)  # per-task worker resources
    job_script: str = ""


def _process_usage() -> tuple[float, float]:
    """Peak resident memory (MB) and CPU seconds (user + system) of this process."""
    import resource
    import sys

    ru = resource.getrusage(resource.RUSAGE_SELF)
    peak = ru.ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru.ru_maxrss / 1024  # B / kB
    return float(peak), float(ru.ru_utime + ru.ru_stime)


def _worker_usage(client) -> dict[str, tuple[float, float]]:
    """Peak RSS (MB) and CPU seconds of each worker process (what a job must ask for)."""
    try:
        return {str(k): (float(v[0]), float(v[1])) for k, v in sorted(client.run(_process_usage).items())}
    except Exception:  # noqa: BLE001 - purely informative (resource is POSIX-only)
        return {}


def _dashboard_link(client) -> str:
    try:
        info = client.scheduler_info()
        if "dashboard" not in info.get("services", {}):
            return ""
        return str(client.dashboard_link)
    except Exception:  # noqa: BLE001 - purely informative
        return ""


@contextlib.contextmanager
def open_client(cluster: str, cluster_config: str | Path | dict | None = None, max_workers: int | None = None,
                *, max_tries: int = DEFAULT_MAX_TRIES, torch_threads: int | None = None,
                dashboard_address: str = ":0") -> Iterator[tuple[Any, ClusterInfo]]:
    """Start or connect to the cluster of ``cluster`` and yield ``(client, info)``; closes it on exit.

    Parameters
    ----------
    cluster
        ``local:N``, ``tcp://HOST:PORT``, ``slurm``, ``lsf`` or ``pbs``.
    cluster_config
        YAML file (or dict) for the jobqueue kinds.
    max_workers
        Adaptive maximum of worker processes (jobqueue kinds; default 4).
    max_tries
        How many dying workers a task may be on before it fails (clusters started here).
    torch_threads
        Torch threads per worker (default: cores // N for ``local:N``; cores // processes per job).
    dashboard_address
        Where a cluster started here serves its dashboard (``":0"``: a free port).
    """
    spec = ClusterSpec.parse(cluster)
    require_dask(jobqueue=spec.kind in JOBQUEUE_KINDS)
    import dask
    from distributed import Client, LocalCluster

    if max_tries < 1:
        raise ClusterError(f"max_tries must be >= 1, got {max_tries}")
    # Read by the scheduler when it starts (clusters started here run their scheduler in this
    # process): bounded retries of tasks whose worker died, and at most one task in flight per
    # worker thread so that a crash is blamed only on the task that caused it.
    sched_cfg = {"distributed.scheduler.allowed-failures": max_tries - 1,
                 "distributed.scheduler.worker-saturation": 1.0}
    info = ClusterInfo(spec=str(spec))
    cl = None
    if spec.kind == "local":
        threads = torch_threads or default_torch_threads(spec.n_workers)
        env = {v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        with dask.config.set(sched_cfg):
            cl = LocalCluster(n_workers=spec.n_workers, threads_per_worker=1, processes=True,
                              dashboard_address=dashboard_address, env=env, silence_logs=logging.ERROR,
                              config=_WORKER_CONFIG)
        info.n_workers, info.torch_threads = spec.n_workers, threads
    elif spec.kind in JOBQUEUE_KINDS:
        cfg = cluster_config if isinstance(cluster_config, dict) else load_cluster_config(cluster_config)
        if not cfg:
            raise ClusterError(f"--cluster {spec.kind} needs --cluster-config FILE.yaml (cores, memory, "
                               "walltime, queue, ...); see docs/scaling.md")
        if torch_threads:
            cfg = {**cfg, "torch_threads": torch_threads}
        kwargs, threads = jobqueue_kwargs(spec.kind, cfg)
        kwargs.setdefault("scheduler_options", {}).setdefault("dashboard_address", dashboard_address)
        with dask.config.set(sched_cfg):
            try:
                cl = _jobqueue_class(spec.kind)(**kwargs)
            except (TypeError, ValueError) as e:
                raise ClusterError(f"--cluster-config for {spec.kind}: {e}") from e
        maximum = int(max_workers or 4)
        cl.adapt(minimum=0, maximum=maximum)
        info.n_workers, info.torch_threads = maximum, threads
        info.resources = {"cpgcn_predict": 1}
        info.job_script = cl.job_script()
        log.info("%s job script:\n%s", spec.kind, info.job_script)
    client = None
    try:
        client = Client(cl if cl is not None else spec.address, timeout="60s")
        if spec.kind == "tcp":
            info.n_workers = len(client.scheduler_info().get("workers", {}))
            info.torch_threads = torch_threads or 0
            if info.n_workers == 0:
                log.warning("the scheduler at %s has no workers yet; tasks wait until workers join", spec.address)
        info.dashboard = _dashboard_link(client)
        if cl is not None:  # workers started here: threads and malloc, on every (re)started worker
            client.register_plugin(_WorkerSetup(torch_threads=info.torch_threads, tune_malloc=True),
                                   name="napari-cpgcn-setup")
        yield client, info
    finally:
        if client is not None:
            client.close()
        if cl is not None:
            cl.close()


class WorkerKilled(RuntimeError):
    """An image whose worker process died every time it processed it (``failures.csv`` stage ``worker``)."""


def _error_record(out: Path, image_id: str, exc: BaseException, n_tries: int) -> ImageRecord:
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        exc = WorkerKilled(f"the worker process died each of the {n_tries} times it processed this image "
                           "(out of memory, or a crash in native code?)")
    return _record_failure(out, image_id, "worker", exc)


def predict_folder_distributed(
    input_dir: str | Path,
    model: str | Path | Any,
    out_dir: str | Path,
    options: BatchOptions | None = None,
    *,
    cluster: str = "local:2",
    cluster_config: str | Path | dict | None = None,
    max_workers: int | None = None,
    max_tries: int = DEFAULT_MAX_TRIES,
    torch_threads: int | None = None,
    client: Any = None,
    should_stop: ShouldStop | None = None,
    image_ids: Iterable[str] | None = None,
) -> Iterator[Event]:
    """Predict every image of a folder on a Dask cluster; yields the events of ``predict_folder``.

    Parameters
    ----------
    input_dir, model, out_dir, options, should_stop, image_ids
        As :func:`napari_cpgcn.batch.predict_folder`. ``model`` is best a run folder (each
        worker loads it once); a predictor object is shipped once to every worker.
    cluster, cluster_config, max_workers, max_tries, torch_threads
        As :func:`open_client`.
    client
        An already connected ``dask.distributed.Client`` to use instead of ``cluster``.

    Yields
    ------
    Event
        ``LOG`` (cluster, dashboard), ``STAGE_START``, one ``ITEM`` per image, ``STAGE_END``,
        ``DONE`` (``result``: :class:`~napari_cpgcn.batch.BatchSummary`) or ``STOPPED``.
    """
    t_start = time.perf_counter()
    options = options or BatchOptions()
    input_dir, ids = folder_image_ids(input_dir, image_ids)
    out = Path(out_dir)
    if client is None:
        ClusterSpec.parse(cluster)  # bad specs fail before anything is written
    is_path = isinstance(model, (str, Path))
    if is_path:
        model = resolve_model_path(model)
    elif not hasattr(model, "predict"):
        raise TypeError(f"model must be a run folder or a predictor, got {type(model).__name__}")
    check_writable(out)
    settings = {
        "input_dir": str(input_dir),
        "model": str(getattr(model, "run_dir", model)),
        "model_fingerprint": model_fingerprint(model),
        **asdict(options),
        "cluster": "client" if client is not None else cluster,
    }
    check_segmentation(model, options)
    todo, summary, start = start_run(out, ids, options, settings)
    n_skipped = summary.n_skipped
    yield start
    # A task redoes an image whatever its markers say: resume was decided here, once.
    task_options = BatchOptions(**{**asdict(options), "overwrite": True})
    stage_sums: dict[str, float] = {}
    handled = n_skipped
    stopped = False

    def finish(rec: ImageRecord) -> Event:
        nonlocal handled
        handled += 1
        return record_item(summary, stage_sums, rec, handled, len(ids))

    if todo:
        ctx = contextlib.nullcontext((client, ClusterInfo(spec="client"))) if client is not None else \
            open_client(cluster, cluster_config, max_workers, max_tries=max_tries, torch_threads=torch_threads)
        with ctx as (cli, info):
            if client is not None:
                info.n_workers = len(cli.scheduler_info().get("workers", {}))
                info.dashboard = _dashboard_link(cli)
            msg = (f"Dask cluster {info.spec}: {info.n_workers} worker{'s' if info.n_workers != 1 else ''}"
                   + (f", {info.torch_threads} torch thread(s) each" if info.torch_threads else "")
                   + (f"; dashboard {info.dashboard}" if info.dashboard else
                      "; no dashboard (pip install bokeh to get one)"))
            log.info("%s", msg)
            yield Event(EventKind.LOG, stage="predict", message=msg, path=info.dashboard)
            task_model: Any = str(model) if is_path else None
            key = ""
            if not is_path:
                key = f"predictor-{uuid.uuid4().hex[:12]}"
                task_model = WorkerModel(key)
            plugin = _WorkerSetup(key=key, predictor=None if is_path else model)
            plugin_name = f"napari-cpgcn-predictor-{key}"
            if plugin.predictor is not None:
                cli.register_plugin(plugin, name=plugin_name)
            try:
                yield from _run_tasks(cli, info, todo, input_dir, task_model, out, task_options, max_tries,
                                      should_stop, finish)
            except _Stopped:
                stopped = True
            finally:
                if plugin.predictor is not None:  # a cluster that outlives this run must not keep it
                    with contextlib.suppress(Exception):
                        cli.unregister_worker_plugin(plugin_name)
            usage = _worker_usage(cli)
            if usage:
                msg = "peak RSS per worker: " + ", ".join(f"{v[0]:.0f} MB" for v in usage.values())
                log.info("%s", msg)
                yield Event(EventKind.LOG, stage="predict", message=msg,
                            metrics={**{f"peak_rss_mb:{k}": v[0] for k, v in usage.items()},
                                     **{f"cpu_s:{k}": v[1] for k, v in usage.items()}})

    yield from finish_run(out, ids, options, settings, summary, stage_sums, handled, stopped, t_start)


class _Stopped(Exception):
    pass


def _map_images(client, info: ClusterInfo, todo: list[str], fn, args_of, prefix: str,
                should_stop: ShouldStop | None) -> Iterator[tuple[str, Any, BaseException | None]]:
    """Run ``fn(*args_of(image_id))`` as one task per image through a bounded window.

    Yields ``(image_id, result, None)`` or ``(image_id, None, exception)`` as tasks finish;
    raises :class:`_Stopped` when ``should_stop`` asks, and ``RuntimeError`` when the first
    tasks all raise (a model or environment problem, not an image's). Pending tasks are
    cancelled on the way out (including Ctrl-C).
    """
    from distributed import KilledWorker, as_completed

    window = max(64, 8 * max(1, info.n_workers))
    token = uuid.uuid4().hex[:8]
    pending = iter(todo)
    futures: dict[Any, str] = {}
    submit_kw: dict[str, Any] = {"pure": False, "retries": 0}
    if info.resources:
        submit_kw["resources"] = info.resources
    ac = as_completed()

    def submit_next() -> None:
        image_id = next(pending, None)
        if image_id is None:
            return
        fut = client.submit(fn, *args_of(image_id), key=f"{prefix}-{image_id}-{token}", **submit_kw)
        futures[fut] = image_id
        ac.add(fut)

    for _ in range(window):
        submit_next()
    n_ok, n_errors = 0, 0
    try:
        for fut in ac:
            image_id = futures.pop(fut)
            result, error = None, None
            try:
                result = fut.result()
                n_ok += 1
            except Exception as e:  # noqa: BLE001 - every way a task can end is reported
                error = e
                if not isinstance(e, KilledWorker):
                    n_errors += 1
                    log.error("task for %s raised %s: %s", image_id, type(e).__name__, e)
                    if n_ok == 0 and n_errors >= _MAX_SYSTEMIC_ERRORS:
                        raise RuntimeError(
                            f"the first {n_errors} tasks failed on the workers and none succeeded; the last "
                            f"error ({image_id}): {type(e).__name__}: {e}. Check that the workers can import "
                            "napari-cpgcn, read the model and see the input and output folders.") from e
            finally:
                fut.release()
            submit_next()
            yield image_id, result, error
            if should_stop is not None and should_stop():
                raise _Stopped
    finally:
        if futures:
            client.cancel(list(futures))


def _run_tasks(client, info: ClusterInfo, todo: list[str], input_dir: Path, task_model: Any, out: Path,
               options: BatchOptions, max_tries: int, should_stop: ShouldStop | None, finish) -> Iterator[Event]:
    """One :func:`~napari_cpgcn.batch.process_image` task per image; yields its ITEM events."""
    args = (str(input_dir), task_model, str(out), options)
    for image_id, rec, error in _map_images(
            client, info, todo, process_image, lambda i: (args[0], i, *args[1:]), "cpgcn-predict", should_stop):
        if error is not None:
            rec = _error_record(out, image_id, error, max_tries)
        yield finish(rec)


# --------------------------------------------------------------------------------------------
# Segmentation (``napari-cpgcn segment --cluster``)
# --------------------------------------------------------------------------------------------

def segment_folder_distributed(
    input_dir: str | Path,
    out_dir: str | Path,
    method: str = "classical",
    *,
    overwrite: bool = False,
    image_ids: list[str] | None = None,
    should_stop: ShouldStop | None = None,
    cluster: str = "local:2",
    cluster_config: str | Path | dict | None = None,
    max_workers: int | None = None,
    max_tries: int = DEFAULT_MAX_TRIES,
    torch_threads: int | None = None,
    client: Any = None,
    **params: Any,
) -> Iterator[Event]:
    """:func:`~napari_cpgcn.segmentation.folder.iter_segment_folder` on a Dask cluster.

    Same arguments (plus the cluster's, as :func:`predict_folder_distributed`), same events, the
    same ``qc.csv`` and the same ``DONE`` result: one
    :func:`~napari_cpgcn.segmentation.folder.segment_image` task per image, the bookkeeping of
    :class:`~napari_cpgcn.segmentation.folder.SegmentRun` on the client. An image whose worker
    process died ``max_tries`` times is a failed image.
    """
    from napari_cpgcn.segmentation.folder import SegmentRun, segment_image

    if client is None:
        ClusterSpec.parse(cluster)
    run = SegmentRun(input_dir, out_dir, method, params, overwrite=overwrite, image_ids=image_ids)
    yield run.start()
    k = 0
    if run.todo:
        ctx = contextlib.nullcontext((client, ClusterInfo(spec="client"))) if client is not None else \
            open_client(cluster, cluster_config, max_workers, max_tries=max_tries, torch_threads=torch_threads)
        with ctx as (cli, info):
            msg = f"Dask cluster {info.spec}: {info.n_workers} workers" + (
                f"; dashboard {info.dashboard}" if info.dashboard else "")
            log.info("%s", msg)
            yield Event(EventKind.LOG, stage="segment", message=msg, path=info.dashboard)
            args = (str(run.folder), str(run.out), method, dict(params))
            try:
                for image_id, res, error in _map_images(
                        cli, info, run.todo, segment_image, lambda i: (args[0], i, *args[1:]), "cpgcn-segment",
                        should_stop):
                    k += 1
                    if error is not None:
                        res = {"image_id": image_id, "error": (
                            f"WorkerKilled: the worker process died each of the {max_tries} times it segmented "
                            "this image" if type(error).__name__ == "KilledWorker" else f"{type(error).__name__}: {error}")}
                    yield run.record(res, k)
            except _Stopped:
                yield run.stopped(k)
                return
    yield run.finished()
