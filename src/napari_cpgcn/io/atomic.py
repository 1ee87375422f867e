"""One way to write a file so that nobody ever sees half of it.

Every output of napari-cpgcn (CSV tables, masks, CAMs, checkpoints, JSON records, caches) is
written by :func:`atomic_write`: the content goes to a temporary file in the same folder
(``.{name}.{random}.tmp``), which is then renamed onto the real name with :func:`os.replace`.
A crash, a kill or a full disk leaves the old file (or none) and at most a temporary file that
:func:`remove_stale_temp_files` clears; a reader never sees a truncated file.

The temporary file is created private (``mkstemp``: mode 0600); before the rename it gets the
mode an ordinary ``open(path, "w")`` would give under the process's umask (0644 under the usual
umask 022), so collaborators on a shared machine can read the outputs.

No Qt, no torch.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_save_npy", "remove_stale_temp_files",
           "TEMP_SUFFIX", "file_mode", "describe_os_error", "check_writable", "OutputFolderError"]

#: Suffix of the temporary files (their names start with a dot: hidden, never an input).
TEMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    # /proc gives it without changing it (os.umask() sets it, racing other threads' file creations)
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("Umask:"):
                        return int(line.split()[1], 8)
        except (OSError, ValueError):
            pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open(..., "w")`` under the current umask (e.g. 0o644)."""
    return 0o666 & ~_current_umask()


def describe_os_error(e: OSError, path: str | os.PathLike) -> str:
    """A one-line explanation of a failed write with the fix (read-only folder, full disk, ...)."""
    where = Path(path)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {where}: permission denied ({e.strerror}); choose an output folder you can "
                "write to")
    if e.errno == errno.ENOSPC:
        return f"cannot write {where}: the disk is full; free some space or choose another output folder"
    if e.errno == errno.EDQUOT:
        return f"cannot write {where}: disk quota exceeded; free some space or choose another output folder"
    if e.errno == errno.ENOTDIR:
        return f"cannot write {where}: a part of the path is a file, not a folder; choose another output folder"
    if e.errno == errno.EEXIST:
        return f"cannot create the folder {where}: a file of that name exists; give another output folder"
    if e.errno == errno.EISDIR:
        return f"cannot write {where}: it is a folder; give a file name"
    return f"cannot write {where}: {e.strerror or e}"


class OutputFolderError(ValueError):
    """An output folder that cannot be created or written; the message names it and the fix."""


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) and make sure files can be written in it, before any work.

    Raises
    ------
    OutputFolderError
        Naming the folder, why (read-only, a file in the way, full disk) and the fix.
    """
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if folder.is_file():
            raise OutputFolderError(f"{folder} is a file, not a folder; give a folder as the output") from e
        raise OutputFolderError(describe_os_error(e, folder)) from e
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it onto ``path``.

    Parameters
    ----------
    path
        The final file (its folder is created).
    write
        Writes the whole content to the path it is given (any library's ``save(path)``).
    fsync
        Flush the file to disk before the rename (checkpoints: survive a power loss, not only
        a crash).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically (``\\n`` line endings as given)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write a binary file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_save_npy(path: str | os.PathLike, arr) -> Path:
    """Write a ``.npy`` array atomically (no pickles)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a path
            np.save(fh, arr, allow_pickle=False)

    return atomic_write(path, write)


def remove_stale_temp_files(*folders: str | os.PathLike) -> int:
    """Delete the temporary files that a killed writer (SIGKILL, power loss) left in ``folders``.

    They are never complete outputs (only the rename makes a file visible under its real
    name). Returns how many were removed.
    """
    n = 0
    for folder in folders:
        folder = Path(folder)
        if folder.is_dir():
            for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
                n += 1
    return n
