"""``napari-cpgcn`` command line: ``main(argv) -> exit code``.

Each subcommand lives in its own module ``napari_cpgcn.cli._<name>`` declaring ``COMMAND``
(its name), ``HELP`` (one line for ``napari-cpgcn --help``), ``DESCRIPTION`` (its ``--help``
text, pre-wrapped), ``add_arguments(parser)`` and ``run(args) -> int`` (an exit code);
:func:`build_parser` adds ``--quiet`` / ``--verbose`` to every one. Heavy imports happen
inside ``run`` so that ``napari-cpgcn --help`` is fast.

Exit codes that scripts can trust:
0 success, 1 failure (a bad input or an output that cannot be written: the message names the
file and the fix), 2 bad usage, 3 partial (some images failed, the rest done), 130 interrupted
(rerun to resume).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from napari_cpgcn import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
#: Interrupted (Ctrl-C or a stop request); finished outputs are kept, rerun to resume.
EXIT_INTERRUPTED = 130

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS: list[str] = [
    "_synth",
    "_segment",
    "_pretrain",
    "_train_image",
    "_train",
    "_predict",
    "_evaluate",
    "_suggest",
    "_finetune",
    "_export_kaggle",
    "_export_bioimageio",
    "_demo",
    "_info",
]

log = logging.getLogger("napari_cpgcn")


class UsageError(Exception):
    """Bad arguments or inputs detected before work starts (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="napari-cpgcn",
        description="Single-cell protein localisation in Human Protein Atlas images (CP-GCN).",
    )
    parser.add_argument("--version", action="version", version=f"napari-cpgcn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        mod = importlib.import_module(f"napari_cpgcn.cli.{name}")
        p = sub.add_parser(mod.COMMAND, help=mod.HELP, description=mod.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        add_common_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--verbose``, shared by every subcommand."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def setup_logging(args: argparse.Namespace, logfile: str | None = None) -> None:
    """Console logging by verbosity, plus a log file (e.g. in the output folder)."""
    level = logging.DEBUG if getattr(args, "verbose", False) else (
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    root = logging.getLogger("napari_cpgcn")
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(console)
    if logfile:
        try:
            fh = _LogFile(logfile)
        except OSError as e:  # a read-only or missing output folder: the command itself says so
            log.debug("no log file: %s", e)
            return
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


class _LogFile(logging.FileHandler):
    """A log file that goes quiet after its first failed write (a full disk) instead of printing
    logging's "--- Logging error ---" traceback for every record; the console keeps logging."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        exc = sys.exc_info()[1]
        logging.getLogger("napari_cpgcn").removeHandler(self)
        sys.stderr.write(f"WARNING: log file {self.baseFilename} is no longer written: {exc}\n")


def progress_bar(**kwargs):
    """A tqdm bar; where stderr is not a terminal (a SLURM job log, CI, a pipe) it redraws at
    most every 30 s instead of filling the log with one line per update.

    Its ``set_postfix*`` / ``set_description*`` do not redraw by themselves (tqdm's default
    redraws on every call, whatever ``mininterval`` says): the next paced redraw shows them.
    """
    from tqdm import tqdm

    class Bar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
            super().set_postfix(ordered_dict, refresh, **kwargs)

        def set_postfix_str(self, s="", refresh=False):
            super().set_postfix_str(s, refresh)

        def set_description(self, desc=None, refresh=False):
            super().set_description(desc, refresh)

        def set_description_str(self, desc=None, refresh=False):
            super().set_description_str(desc, refresh)

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return Bar(**kwargs)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by the console script)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    setup_logging(args)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        log.error("%s", e)
        return EXIT_USAGE
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        # Input problems found by the core: the message names the file and the fix.
        log.error("%s", e)
        return EXIT_FAILURE
    except OSError as e:  # a read-only output folder, an --out that is a file, a full disk, ...
        from napari_cpgcn.io.atomic import describe_os_error

        log.debug("", exc_info=True)
        log.error("%s", describe_os_error(e, e.filename or getattr(args, "out", None) or "the output"))
        return EXIT_FAILURE
    except MemoryError:
        log.error("out of memory; use smaller batches (--batch-size) or images, or a machine with more memory")
        return EXIT_FAILURE
    except RuntimeError as e:  # torch's errors (CUDA out of memory, a device that went away, ...)
        log.debug("", exc_info=True)
        hint = " (--batch-size smaller, or --device cpu)" if "out of memory" in str(e).lower() else ""
        log.error("%s%s; rerun with --verbose for the traceback", str(e).strip().splitlines()[0], hint)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        log.error("interrupted; finished outputs are kept, rerun to resume")
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
