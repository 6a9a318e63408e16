"""The Dask side of a view: one utterance as a lazy expression, and per-layer statistics streamed
over the whole view with bounded memory. Both give the numbers of the hot path (`FusedView.read_merged`)."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from fusionpipe.fuse.align import aligned_block
from fusionpipe.fuse import runs

_HIDDEN = weakref.WeakKeyDictionary()  # view -> its stores' `hidden` as Dask arrays, made once per view


def to_dask(view, i: int):
    """Utterance i as a lazy Dask expression equal to ``view[i]`` (a per-store list for merge=None)."""
    import dask.array as da

    if view not in _HIDDEN:
        _HIDDEN[view] = [da.from_zarr(s.hidden) for s in view.stores]
    T, L = int(view.lengths[i]), view.num_layers
    parts = []
    for k, (h, d) in enumerate(zip(_HIDDEN[view], view.dims)):
        o, n = int(view.store_offsets[k][i]), int(view.store_frames[k][i])
        x = h[o:o + n].rechunk({0: -1})  # (T_i, L_i, D): one block, so one alignment task
        parts.append(x.map_blocks(aligned_block, L, T, chunks=((L,), (T,), (d,)), dtype=np.float32,
                                  meta=np.empty((0, 0, 0), np.float32)))
    if view.merge == "add":
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out
    if view.merge == "concat":
        return da.concatenate(parts, axis=-1)
    return parts


def layer_stats(view, max_frames: int | None = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray] | list[tuple[np.ndarray, np.ndarray]]:
    """Per-layer mean and std (L, D_out), float32, of the merged features over every frame of the view.

    A Dask reduction over groups of neighbouring utterances (one task reads and aligns one group
    and returns its sums), so memory holds a few groups, never the corpus. merge=None: one
    (mean, std) per store. ``max_frames``: only groups drawn at random (``seed``) until about that
    many frames, so the cost stays flat in the corpus size.
    """
    import dask
    import dask.array as da

    L = view.num_layers
    dims = [view.out_dim] if view.merge is not None else view.dims
    width = sum(dims)

    def moments(group: np.ndarray) -> np.ndarray:  # -> (2, L, width) float64 sums of x and x^2
        # (B, L, T, width); the padding is zero: it adds nothing
        out = view.read_merged(group) if view.merge is not None else torch.cat(view.read_stacks(group), dim=-1)
        return torch.stack([out.sum(dim=(0, 2), dtype=torch.float64),
                            out.square().sum(dim=(0, 2), dtype=torch.float64)]).numpy()

    groups = view.groups(runs.GROUP_BYTES // (4 * L * width))
    if max_frames is not None and int(view.lengths.sum()) > max_frames:
        groups = _draw(groups, view.lengths, max_frames, seed)
    parts = [da.from_delayed(dask.delayed(moments)(g), shape=(2, L, width), dtype=np.float64) for g in groups]
    sums = da.stack(parts).sum(axis=0).compute() if parts else np.zeros((2, L, width))
    n = max(sum(int(view.lengths[g].sum()) for g in groups), 1)
    mean = sums[0] / n
    std = np.sqrt(np.maximum(sums[1] / n - mean ** 2, 0.0))
    edges = np.concatenate([[0], np.cumsum(dims)])
    stats = [(mean[:, a:b].astype(np.float32), std[:, a:b].astype(np.float32)) for a, b in zip(edges, edges[1:])]
    return stats[0] if view.merge is not None else stats


def _draw(groups: list[np.ndarray], lengths: np.ndarray, max_frames: int, seed: int) -> list[np.ndarray]:
    """Whole groups in a seeded random order until they hold ``max_frames`` frames."""
    drawn, frames = [], 0
    for g in np.random.default_rng(seed).permutation(len(groups)):
        drawn.append(groups[g])
        frames += int(lengths[groups[g]].sum())
        if frames >= max_frames:
            break
    return drawn
