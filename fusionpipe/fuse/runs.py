"""Which utterances one contiguous read serves: the grouping every reader of stores shares.

A store keeps each utterance's frames at one offset, longest first, so utterances that are
neighbours there are one Zarr slice, and a chunk two of them share is decoded once. The batch
read path (`FusedView.read_stacks`), the streaming passes (`fuse.lazy.layer_stats`,
`fuse.write.write_view`) and the CKA sample (`analyze.cka`) all cut their utterances into such runs.
"""

from __future__ import annotations

import numpy as np

GROUP_BYTES = 64 * 2**20  # float32 output per group of the streaming passes: bounded memory, few Dask tasks


def neighbour_runs(offsets: np.ndarray, frames: np.ndarray, *, gap: int | None = None,
                   sizes: np.ndarray | None = None, budget: int | None = None,
                   order: np.ndarray | None = None) -> list[np.ndarray]:
    """Positions into ``offsets`` / ``frames`` cut into runs, each a slice of ``order`` (default: by offset).

    A run ends where the hole before the next utterance exceeds ``gap`` frames (reading through a
    smaller hole costs less than decoding a shared chunk twice), and once its ``sizes`` add up to
    ``budget`` (what one task may hold in memory). None: no such cut.
    """
    order = np.argsort(offsets, kind="stable") if order is None else np.asarray(order)
    runs, start, end, total = [], 0, 0, 0
    for j, i in enumerate(order):
        o, n = int(offsets[i]), int(frames[i])
        if j > start and gap is not None and o - end > gap:
            runs.append(order[start:j])
            start, total = j, 0
        end = o + n if j == start else max(end, o + n)
        total += int(sizes[i]) if sizes is not None else 0
        if budget is not None and total >= budget:
            runs.append(order[start:j + 1])
            start, total = j + 1, 0
    if start < len(order):
        runs.append(order[start:])
    return runs
