"""The float32 buffers batches are read into, reused once the batch handed out of them is gone."""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np
import torch


class BatchMemory:
    """float32 batch buffers, reused once the batch handed out of them is gone.

    A fresh 320 MB batch costs ~170 ms of page faults on a 2-core box, as much as decoding it.
    Every tensor (and numpy array) of a batch keeps alive the numpy view it was made from, so a
    weak reference to that view says when its buffer is free again.
    """

    def __init__(self):
        self.lock, self.buffers = threading.Lock(), []  # [buffer, weak reference to the view handed out]

    def empty(self, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        with self.lock:
            for entry in self.buffers:
                if entry[1]() is None and entry[0].size >= n:
                    break
            else:
                self.buffers = [e for e in self.buffers if e[1]() is not None]  # free but too small: let go
                entry = [np.empty(n, np.float32), None]
                self.buffers.append(entry)
            view = entry[0][:n]
            entry[1] = weakref.ref(view)
        return torch.from_numpy(view).view(shape)


BATCHES = BatchMemory()  # the process's pool, shared by every view
