"""One writer per store: an advisory lock beside it (docs/decisions.md: the lock lives beside the store)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from fusionpipe.errors import FusionpipeError, redact
from fusionpipe.store import local_path


@contextmanager
def lock(url: str | Path, wait: bool = False):
    """Advisory lock of the store at `url` for one writer (extract, verify --repair).

    A local store's lock is ``<store>.lock`` beside it, held with flock: the kernel releases it when
    the holder exits however it exits, so a crashed holder never blocks a rerun. The file records
    the holder (pid, host, command, start) for the message a second writer gets. Object stores
    (s3://, ...) have no such lock: there, do not start two extractions of one store.
    """
    url = str(url)
    store = local_path(url)
    if store is None:
        yield
        return
    path = Path(f"{store}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            if not wait:
                raise FusionpipeError(
                    f"{redact(url)} is being written by another process ({holder}); wait for it to finish, or "
                    "pass --wait to start when it does"
                ) from None
            print(f"waiting for {redact(url)}: held by {holder}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "command": " ".join(sys.argv)[:300]}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
