"""/dev/shm, where shared memory lives on Linux: how much is free, and what a user can do when it is too little.

Both rooms that cross batches through shared memory read it here: extraction's helper processes
(extract/pipeline.py) and the training loader's workers (fuse/loader.py). A tmpfs page first touched
when /dev/shm is full is a SIGBUS without a message, so each checks the room (or reserves its pages)
before it uses them.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

SHM = Path("/dev/shm")
MORE = "give the container more shared memory (docker --shm-size)"


def free_bytes() -> float:
    """Bytes free in /dev/shm; inf where there is none (not Linux: shared memory is not a sized tmpfs there)."""
    return shutil.disk_usage(SHM).free if SHM.is_dir() else math.inf
