"""What ``train`` and ``train-image`` share (not a subcommand).

The options both take (:func:`add_training_arguments`), the config they start from
(:func:`base_config`), the run folder and logging set up before training
(:func:`start_training_run`) and the loop that turns the training events into an exit code
(:func:`run_training`, showing them with a :class:`TrainingBars`). Heavy imports stay inside
the functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from napari_cpgcn.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, UsageError
from napari_cpgcn.io.atomic import check_writable

log = logging.getLogger("napari_cpgcn.cli.training")


def add_training_arguments(
    p: argparse.ArgumentParser, *, out: str, config: str, backbone: str, image_size: str, epochs: str,
    batch_size: str, imagenet_weights: tuple[str, str], seed: str, workers: str,
) -> None:
    """DATA_DIR, ``--labels``, ``--out``, ``--config``, ``--backbone``, ``--image-size``,
    ``--epochs``, ``--batch-size``, ``--imagenet-weights``, ``--init-from``, ``--device``, ``--seed``,
    ``--workers``.

    Every option defaults to None: not given, the config keeps its value. The keyword arguments
    are the help texts (``imagenet_weights`` is ``(metavar, help)``); they differ between the
    subcommands because the options reach different configs and defaults.
    """
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder of images (ID_red.png ...; images/ inside accepted)")
    p.add_argument("--labels", required=True, metavar="CSV", help="labels CSV (ID,Label with |-joined class ids)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help=out)
    p.add_argument("--config", metavar="JSON", help=config)
    p.add_argument("--backbone", default=None, help=backbone)
    p.add_argument("--image-size", type=int, default=None, help=image_size)
    p.add_argument("--epochs", type=int, default=None, help=epochs)
    p.add_argument("--batch-size", type=int, default=None, help=batch_size)
    metavar, weights_help = imagenet_weights
    p.add_argument("--imagenet-weights", default=None, metavar=metavar, help=weights_help)
    p.add_argument("--init-from", default=None, metavar="RUN_OR_CKPT",
                   help="fine-tune: start the backbone(s) from an earlier napari-cpgcn run folder, a "
                        "`napari-cpgcn pretrain` folder, a checkpoint or a bioimage.io package "
                        "(export-bioimageio) with the same backbone (heads start fresh); 'none' clears it")
    p.add_argument("--device", default=None, help="auto (cuda, mps, cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--seed", type=int, default=None, help=seed)
    p.add_argument("--workers", type=int, default=None, help=workers)


def imagenet_weights(text: str) -> str | None:
    """The value of ``--imagenet-weights``: None (random init) for 'none', 'random' or ''; a
    URL whose file name cannot be verified is refused here, before any training starts."""
    if text.lower() in ("none", "random", ""):
        return None
    from napari_cpgcn.models.weights import WeightsDownloadError, check_weights_url, is_url

    if is_url(text):
        try:
            check_weights_url(text)
        except WeightsDownloadError as e:
            raise UsageError(f"--imagenet-weights: {e}") from e
    return text


def init_from(text: str) -> str | None:
    """The value of ``--init-from``: None for 'none' or ''; an existing path otherwise."""
    if text.lower() in ("none", ""):
        return None
    path = Path(text).expanduser()
    if not path.exists():
        raise UsageError(f"--init-from {text} does not exist: give a finished run or pretraining folder, a .pt "
                         "checkpoint or a bioimage.io .zip package")
    return str(path.resolve())  # stored in config.json: resumable from any working directory


def base_config(args: argparse.Namespace, load: Callable[[Any], Any], default: Callable[[], Any], *,
                resume: bool) -> Any:
    """The config the options are applied to: ``--config``, else (when ``resume`` and the run
    folder has one) ``RUN_DIR/config.json``, else ``default()``."""
    previous = Path(args.out) / "config.json"
    if args.config:
        return load(args.config)
    if resume and previous.is_file():
        config = load(previous)
        log.info("resuming with the settings of %s (options given on the command line win)", previous)
        return config
    return default()


def start_training_run(args: argparse.Namespace, build_config: Callable[[argparse.Namespace], Any],
                       logfile: str) -> tuple[Path, Path, Path, Any]:
    """Check DATA_DIR and ``--labels``, build the config, create RUN_DIR and log to RUN_DIR/logfile.

    Under torchrun only rank 0 logs to the file and shows progress (the others turn quiet).
    Returns ``(data_dir, labels, out, config)``.
    """
    from napari_cpgcn.cli import setup_logging

    data_dir, labels, out = Path(args.data_dir), Path(args.labels), Path(args.out)
    if not data_dir.is_dir():
        raise UsageError(f"DATA_DIR {data_dir} is not a folder")
    if not labels.is_file():
        raise UsageError(f"labels CSV {labels} does not exist")
    config = build_config(args)
    check_writable(out)
    from napari_cpgcn.training.ddp import is_main_process

    main_process = is_main_process()
    if not main_process:
        args.quiet = True
    setup_logging(args, logfile=str(out / logfile) if main_process else None)
    return data_dir, labels, out, config


class TrainingBars:
    """tqdm bars driven by training events: the handler of :func:`run_training`.

    Subclasses implement :meth:`handle`; ``out`` is the run folder (for the closing message).
    """

    def __init__(self, quiet: bool, out: Path) -> None:
        self.quiet = quiet
        self.out = out
        self.bar = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def open(self, total: int | None, desc: str, unit: str) -> None:
        """Close the open bar and (unless quiet) open a new one."""
        from napari_cpgcn.cli import progress_bar

        self.close()
        if not self.quiet:
            self.bar = progress_bar(total=total or None, desc=desc, unit=unit, leave=True, dynamic_ncols=True)

    def handle(self, ev) -> int | None:
        """Show one training event; an exit code ends the run."""
        raise NotImplementedError


def run_training(events: Iterable, bars: TrainingBars, *, logger: logging.Logger, interrupted: str) -> int:
    """Feed the training events to ``bars``; the exit code of the run.

    The first exit code ``bars.handle`` returns ends the run; a honoured stop request (a
    ``STOPPED`` event) logs its message and exits 130, as Ctrl-C does (which logs
    ``interrupted``, how to resume); a checkpoint that cannot be used is a failure (exit 1). The
    bars are closed in every case.
    """
    from napari_cpgcn.events import EventKind
    from napari_cpgcn.training.checkpoint import CheckpointError

    try:
        for ev in events:
            if ev.kind == EventKind.STOPPED:
                bars.close()
                logger.warning("%s", ev.message)
                return EXIT_INTERRUPTED
            code = bars.handle(ev)
            if code is not None:
                return code
    except CheckpointError as e:
        logger.error("%s", e)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        logger.error("%s", interrupted)
        return EXIT_INTERRUPTED
    finally:
        bars.close()
    return EXIT_OK
