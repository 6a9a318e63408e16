"""Files that are whole or absent: a kill at any moment leaves the old version or the new one.

    >>> from fusionpipe.atomic import atomic_write
    >>> atomic_write("runs/x/config.json", '{"steps": 10}')   # doctest: +SKIP

The bytes go to a hidden temporary file in the same directory (``.<name>.<pid>.<random>.tmp``),
are flushed and fsynced, and the temporary file is renamed over the target with os.replace
(atomic on POSIX and Windows within one filesystem); the directory is fsynced so the rename
itself survives a power cut. A kill before the rename leaves only the temporary file, which
`remove_leftovers` deletes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path

from fusionpipe.errors import FusionpipeError

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str: UTF-8) to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FusionpipeError(f"{path}: the disk is full ({e.strerror}); the file is as it was. Free some space "
                                  "and rerun the same command (a training run: with --resume, from its last "
                                  "checkpoint)") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise FusionpipeError(f"{path}: cannot write here ({e.strerror}); choose a writable place (--out)") from None
        raise
    fsync_dir(path.parent)
    return path


def check_writable(directory: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, a directory that cannot be made or written: its nearest existing ancestor
    must be a writable directory. ``flag`` names where it came from (--out)."""
    directory = Path(directory).absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise FusionpipeError(f"{flag} {directory}: cannot be written ({existing} is not a writable directory); "
                              "choose another place")


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """`atomic_write` of ``obj`` as JSON."""
    return atomic_write(path, json.dumps(obj, indent=indent))


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed `atomic_write` left in ``directory`` (not below it)."""
    found = [p for p in Path(directory).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in found:
        with contextlib.suppress(OSError):
            p.unlink()
    return found
