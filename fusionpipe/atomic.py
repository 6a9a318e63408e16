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
import json
import os
import secrets
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str: UTF-8) to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
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
    fsync_dir(path.parent)
    return path


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
