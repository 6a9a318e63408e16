"""Frames -> chunks of a store's `hidden` array: which chunks a run of frames touches, and whole chunks from parts.

A chunk holds every layer of a run of frames and is encoded, written, read and decoded whole, so
everything that writes a store (extraction, cluster units, `fuse --write`) puts chunks together
here and hands `FeatureStore.write_chunk` whole ones only (docs/decisions.md: a chunk on disk is
its own done flag).
"""

from __future__ import annotations

import numpy as np

CHUNK_BYTES = 4 * 2**20  # chosen with bench/extract.py: larger chunks buy no speed and cost resume granularity
# A chunk is encoded, written, read and decoded whole, in memory (and numcodecs' codecs stop at 2 GB).
MAX_CHUNK_BYTES = 2**30


def starts(lengths) -> np.ndarray:
    """(N,) first frame of each of N consecutive utterances of `lengths` frames (an index's offsets)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else np.zeros(0, np.int64)


def chunk_span(start, stop, chunk_frames: int):
    """Chunks [lo, hi) that frames [start, stop) touch (ints or numpy arrays)."""
    return start // chunk_frames, -(-stop // chunk_frames)


def default_chunk_frames(num_layers: int, hidden_size: int, dtype: str) -> int:
    return max(1, CHUNK_BYTES // (num_layers * hidden_size * np.dtype(dtype).itemsize))


# Frames of one chunk that arrived without the rest of it: (chunk, first frame, end frame, frames).
Edge = tuple[int, int, int, np.ndarray]


class ChunkAssembler:
    """Frames arriving at any offsets of `hidden` -> whole chunks, each returned once, when complete.

    The one place chunks are put together: extraction's writer, the cluster client's edge chunks
    and `fuse --write` all feed it. Only chunks with frames pending are buffered, so memory is
    bounded by what is in flight, not by the store. ``skip``: chunks not to assemble (on disk).
    """

    def __init__(self, total_frames: int, chunk_frames: int, skip: np.ndarray | None = None):
        self.total, self.F, self.skip = total_frames, chunk_frames, skip
        self.pending: dict[int, tuple[np.ndarray, int, int, int]] = {}  # chunk -> (frames, lo, hi, filled)

    def add(self, offset: int, frames: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Frames [offset, offset + len(frames)), (T, L, D); returns the chunks they complete: [(c, frames)]."""
        F, end, done = self.F, offset + len(frames), []
        for c in range(*chunk_span(offset, end, F)):
            if self.skip is not None and self.skip[c]:
                continue
            c0, c1 = c * F, min((c + 1) * F, self.total)
            lo, hi = max(offset, c0), min(end, c1)
            buf, first, last, filled = self.pending.get(c) or (np.empty((c1 - c0, *frames.shape[1:]), frames.dtype),
                                                               lo, hi, 0)
            buf[lo - c0:hi - c0] = frames[lo - offset:hi - offset]
            filled += hi - lo
            if filled == c1 - c0:
                self.pending.pop(c, None)
                done.append((c, buf))
            else:
                self.pending[c] = (buf, min(first, lo), max(last, hi), filled)
        return done

    def edges(self) -> list[Edge]:
        """The chunks left part-filled, each with its frames (which arrived as one contiguous run)."""
        out = []
        for c, (buf, lo, hi, filled) in sorted(self.pending.items()):
            assert hi - lo == filled, f"chunk {c}: frames arrived with a gap"
            out.append((c, lo, hi, buf[lo - c * self.F:hi - c * self.F]))
        return out
