"""STAGE 2: align several feature stores of one manifest to a common (L, T) and merge them, lazily.

    >>> view = open_fused(["cache/demo-train/toy-wavlm.zarr", "cache/demo-train/toy-whisper.zarr"],
    ...                   merge="concat")                                       # doctest: +SKIP
    >>> view.num_layers, view.dims, view.out_dim                                # doctest: +SKIP
    (4, [32, 40], 72)
    >>> view[0].shape            # (L, T, sum D_i) float32, read straight from Zarr  # doctest: +SKIP
    (4, 112, 72)
    >>> view.to_dask(0)          # the same as a lazy Dask expression               # doctest: +SKIP

Alignment: every store to T = max T_i frames and L = max L_i layers by end-exact linear
interpolation (the rule and its reasons: `fusionpipe.fuse.align`).

Merge. ``"add"``: element-wise sum (equal D required: unequal hidden sizes need the learned
per-model projection of stage 3), ``"concat"``: side by side on the feature axis (L, T, sum D_i),
``None``: no merge, every merged output becomes a per-store list of aligned stacks (what stage 3
reads, since it merges with learned projections).

Two read paths with identical numbers: the hot path here (``view[i]``, ``aligned``, and per kind
of result ``read_stacks``, ``read_merged``, ``read_compact``) reads one contiguous Zarr slice per
store per run of neighbouring utterances (`fuse.runs`) and aligns with torch on the CPU;
``to_dask`` builds the same result as a lazy Dask graph, and ``layer_stats`` / ``write`` stream
over the dataset with bounded memory (`fuse.lazy`, `fuse.write`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse import lazy
from fusionpipe.fuse.align import ALIGN_LAYERS, ALIGN_TIME, align_into, common_frame_rate, common_frames
from fusionpipe.fuse.compact import CompactStack
from fusionpipe.fuse.memory import BATCHES
from fusionpipe.fuse.runs import neighbour_runs
from fusionpipe.fuse.write import write_view
from fusionpipe.codecs import DEFAULT_CODEC, LOSSY
from fusionpipe.store import FeatureStore, list_ids

MERGES = ("add", "concat")


@dataclass(frozen=True)
class ViewSpec:
    """Everything a FusedView is made of, and all it pickles: store URLs, options, the resolved ids."""

    stores: tuple[str, ...]
    merge: str | None
    align_time: str
    align_layers: str
    ids: tuple[str, ...]


def open_fused(stores: list[str | Path | FeatureStore], merge: str | None = None, align_time: str = "max",
               align_layers: str = "interpolate", *, skip_missing: bool = False,
               ids: list[str] | None = None) -> FusedView:
    """Open the stores of one manifest as one aligned (and merged) view, matched by utterance id.

    ``ids`` restricts the view to those utterances, in that order (default: every utterance of the
    manifest, in manifest order). An utterance missing, skipped or unfinished in any store is an
    error, unless ``skip_missing`` leaves it out (``view.dropped`` says which and why).
    """
    _check_option("merge", merge, (*MERGES, None))
    _check_option("align_time", align_time, ALIGN_TIME)
    _check_option("align_layers", align_layers, ALIGN_LAYERS)
    opened = [s if isinstance(s, FeatureStore) else FeatureStore.open(s) for s in stores]
    if not opened:
        raise FusionpipeError("fuse needs at least one store (--stores A.zarr --stores B.zarr)")
    _check_same_manifest(opened)
    _check_shapes(opened, merge, align_layers)
    order = list(ids) if ids is not None else _manifest_ids(opened)
    missing = _missing(opened, order)
    if missing and not skip_missing:
        per_store = "; ".join(f"{s.url} lacks {sum(any(w == s.url for w, _ in v) for v in missing.values())}"
                              for s in opened)
        raise FusionpipeError(
            f"{len(missing)} utterance(s) are not usable in every store ({per_store}): {list_ids(list(missing))}. "
            "Finish `fusionpipe extract` for those stores (`fusionpipe inspect STORE` lists what it skipped and "
            "why), or leave them out: --skip-missing (fuse, train, evaluate), skip_missing=True in Python"
        )
    dropped = {u: "; ".join(f"{url}: {why}" for url, why in v) for u, v in missing.items()}
    kept = [u for u in order if u not in missing]
    spec = ViewSpec(tuple(s.url for s in opened), merge, align_time, align_layers, tuple(kept))
    return FusedView(opened, spec, dropped)


def _check_option(name: str, value, allowed) -> None:
    if value not in allowed:
        raise FusionpipeError(f"{name}={value!r} is not known; choose one of {', '.join(map(str, allowed))}")


def _check_same_manifest(stores: list[FeatureStore]) -> None:
    if len({s.info.manifest_sha256 for s in stores}) > 1:
        listing = "; ".join(f"{s}: manifest {s.info.manifest} (sha256 {str(s.info.manifest_sha256)[:12]})"
                            for s in stores)
        raise FusionpipeError(
            f"these stores were extracted from different manifests and cannot be fused utterance by utterance "
            f"({listing}); extract every upstream over the same manifest"
        )


def _check_shapes(stores: list[FeatureStore], merge: str | None, align_layers: str) -> None:
    shapes = ", ".join(f"{s.url}: L={s.num_layers} D={s.hidden_size}" for s in stores)
    if align_layers == "none" and len({s.num_layers for s in stores}) > 1:
        raise FusionpipeError(
            f"align_layers='none' needs equal layer counts, got {shapes}; use align_layers='interpolate' "
            "(--align-layers interpolate) to interpolate to the largest L"
        )
    if merge == "add" and len({s.hidden_size for s in stores}) > 1:
        raise FusionpipeError(
            f"merge='add' needs equal hidden sizes, got {shapes}. Stage 3 adds a learned per-model projection "
            "to a common D: use `fusionpipe train --merge add` on these stores, or merge='concat' here"
        )


def _manifest_ids(stores: list[FeatureStore]) -> list[str]:
    """Manifest order, from the TSV the stores recorded; the first store's order when it is gone or changed."""
    m = stores[0].recorded_manifest()
    if m is not None:
        return [u.id for u in m]
    seen, out = set(), []
    for s in stores:
        for u in [*s.ids, *s.info.skipped_before]:
            if u not in seen:
                seen.add(u)
                out.append(u)
    return out


def _missing(stores: list[FeatureStore], ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """id -> [(store url, why)] for every id not usable in some store."""
    out: dict[str, list[tuple[str, str]]] = {}
    for s in stores:
        done = s.done_utterances()
        skipped = s.skipped()
        for u in ids:
            p = s.position.get(u)
            if u in skipped:
                why = f"skipped ({skipped[u]})"
            elif p is None:
                why = "not in the store"
            elif not done[p]:
                why = "not extracted yet"
            else:
                continue
            out.setdefault(u, []).append((s.url, why))
    return out



@dataclass(frozen=True)
class Read:
    """One contiguous Zarr slice of store ``store``: frames [lo, hi), and the batch's utterances in it."""

    store: int
    lo: int
    hi: int
    items: list[tuple[int, int, int]]  # (b, offset in the slice, frames)


class FusedView:
    """N stores of one manifest, aligned to a common (L, T) and merged; reads nothing until asked.

    Index i is the i-th utterance of ``ids`` (manifest order). Open with `open_fused`.
    """

    def __init__(self, stores: list[FeatureStore], spec: ViewSpec, dropped: dict[str, str] | None = None):
        self.stores = stores
        self.spec = spec
        self.merge, self.align_time, self.align_layers = spec.merge, spec.align_time, spec.align_layers
        self.ids = list(spec.ids)
        self.dropped = dropped or {}
        # per store, in view order: offset and length of each utterance in its `hidden`
        try:
            pos = [np.array([s.position[u] for u in self.ids], dtype=np.int64) for s in stores]
        except KeyError as e:
            raise FusionpipeError(f"utterance {e.args[0]!r} is not in every store of {list(spec.stores)}") from None
        self.store_offsets = [s.offsets[p] for s, p in zip(stores, pos)]
        self.store_frames = np.stack([s.lengths[p] for s, p in zip(stores, pos)]).reshape(len(stores), len(self.ids))
        self.lengths: np.ndarray = common_frames(self.store_frames, self.align_time)
        self.num_layers = max(s.num_layers for s in stores)
        self.dims = [s.hidden_size for s in stores]

    @classmethod
    def from_spec(cls, spec: ViewSpec) -> FusedView:
        """Reopen a view in another process: no manifest read, no completeness scan (the opener did both)."""
        return cls([FeatureStore.open(u) for u in spec.stores], spec)

    def __reduce__(self):
        return FusedView.from_spec, (self.spec,)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"FusedView({len(self)} utterances, {len(self.stores)} stores, merge={self.merge}, "
                f"L={self.num_layers}, dims={self.dims})")

    @property
    def out_dim(self) -> int | None:
        """Feature size of the merged output; None when merge=None (see `dims`)."""
        return {"add": self.dims[0], "concat": sum(self.dims), None: None}[self.merge]

    @property
    def frame_rate(self) -> float:
        return common_frame_rate([s.frame_rate for s in self.stores], self.align_time)

    def reading_order(self) -> np.ndarray:
        """View indices sorted by position in the first store: neighbours there are one contiguous read."""
        return np.argsort(self.store_offsets[0], kind="stable")

    def groups(self, frames_per_group: int, order: np.ndarray | None = None) -> list[np.ndarray]:
        """Consecutive view indices (in `order`, default store order) of about frames_per_group frames each."""
        return neighbour_runs(self.store_offsets[0], self.store_frames[0], sizes=self.lengths,
                              budget=frames_per_group, order=self.reading_order() if order is None else order)

    # ---- the hot path: direct Zarr reads, one method per kind of result ----------------------------
    # Each returns utterances `indices` aligned and zero-padded past their length, as (B, L, T_max, D)
    # float32. ``empty(*shape)`` allocates them (default: buffers reused once a batch is gone; the
    # loader's worker processes pass their shared-memory slot's).
    def read_stacks(self, indices, empty: Callable[..., torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per store, its (B, L, T_max, D_i) stack (what stage 3 reads: it merges with learned projections)."""
        indices = np.asarray(indices, dtype=np.int64)
        outs = [self._padded(indices, d, empty) for d in self.dims]
        self._align(self._reads(indices, range(len(self.stores))), indices,
                    lambda k, b, n: outs[k][b, :, :n])
        return outs

    def read_merged(self, indices, empty: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """One (B, L, T_max, D_out) tensor: the stores added, or side by side on the feature axis."""
        if self.merge is None:
            raise ValueError("a view opened with merge=None has no merged output; read_stacks gives its stacks")
        indices = np.asarray(indices, dtype=np.int64)
        out = self._padded(indices, self.out_dim, empty)
        edges = np.cumsum([0, *self.dims]) if self.merge == "concat" else None

        def slot(k: int, b: int, n: int) -> torch.Tensor:  # where utterance b of store k goes: (L, T_b, D_k)
            return out[b, :, :n, edges[k]:edges[k + 1]] if edges is not None else out[b, :, :n]

        self._align(self._reads(indices, range(len(self.stores))), indices, slot, add=self.merge == "add")
        return out

    def read_compact(self, indices, empty: Callable[..., torch.Tensor] | None = None,
                     ) -> list[torch.Tensor | CompactStack]:
        """`read_stacks`, but a lossy store's stack is a `CompactStack`: its codes, expanded and aligned by
        ``.to(device)`` (a GPU trainer's loader sends a quarter of the bytes)."""
        indices = np.asarray(indices, dtype=np.int64)
        lossy = [k for k, s in enumerate(self.stores) if s.info.codec in LOSSY]
        exact = [k for k in range(len(self.stores)) if k not in lossy]
        lengths = self.lengths[indices].tolist()
        outs = [self._padded(indices, d, empty) if k in exact else
                CompactStack((len(indices), self.num_layers, max(lengths, default=0), d), lengths,
                             [(self.stores[k].read_codes(r.lo, r.hi), r.items) for r in self._reads(indices, [k])])
                for k, d in enumerate(self.dims)]
        self._align(self._reads(indices, exact), indices, lambda k, b, n: outs[k][b, :, :n])
        return outs

    def _reads(self, indices: np.ndarray, stores) -> list[Read]:
        """One read per run of utterances that are neighbours in a store: a chunk two of them share is
        decoded once."""
        reads = []
        for k in stores:
            offsets, frames = self.store_offsets[k][indices], self.store_frames[k][indices]
            for run in neighbour_runs(offsets, frames, gap=self.stores[k].chunk_frames):
                lo, hi = int(offsets[run].min()), int((offsets[run] + frames[run]).max())
                reads.append(Read(k, lo, hi, [(int(b), int(offsets[b]) - lo, int(frames[b])) for b in run]))
        return reads

    def _padded(self, indices: np.ndarray, width: int, empty) -> torch.Tensor:
        """A (B, L, T_max, width) output, zero past each utterance's length (the alignment writes the rest)."""
        lengths = self.lengths[indices]
        out = (empty or BATCHES.empty)(len(indices), self.num_layers, int(lengths.max()) if len(indices) else 0,
                                       width)
        for b, n in enumerate(lengths):
            out[b, :, n:] = 0
        return out

    def _align(self, reads: list[Read], indices: np.ndarray, slot, add: bool = False) -> None:
        """Decode each read and align its utterances into ``slot(store, b, frames)``; with ``add``, the
        stores after the first are added to it (the reads come store by store)."""
        lengths = self.lengths[indices]
        # one thread decodes the next reads while this one aligns (Zarr's decoding releases the GIL)
        with ThreadPoolExecutor(1, thread_name_prefix="fusionpipe-read") as pool:
            blocks = pool.map(lambda r: self.stores[r.store].read_range(r.lo, r.hi), reads)
            for r, block in zip(reads, blocks):  # block: (frames, L_k, D_k) storage dtype
                for b, o, n in r.items:
                    align_into(block[o:o + n], slot(r.store, b, int(lengths[b])), accumulate=add and r.store > 0)

    def aligned(self, i: int) -> list[np.ndarray]:
        """Utterance i of every store, aligned: [(L, T, D_i) float32]."""
        return [s[0].numpy() for s in self.read_stacks([i])]

    def __getitem__(self, i: int) -> np.ndarray | list[np.ndarray]:
        """Utterance i merged: (L, T, D) for add, (L, T, sum D_i) for concat, per-store list for None."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"utterance index {i} out of range for {len(self)} utterances")
        if self.merge is None:
            return self.aligned(i % len(self))
        return self.read_merged([i % len(self)])[0].numpy()

    # ---- streaming and lazy: fuse.lazy, fuse.write --------------------------------------------------
    def to_dask(self, i: int):
        """Utterance i as a lazy Dask expression equal to ``view[i]`` (`fuse.lazy.to_dask`)."""
        return lazy.to_dask(self, i)

    def layer_stats(self, max_frames: int | None = None, seed: int = 0):
        """Per-layer mean and std of the merged features (`fuse.lazy.layer_stats`)."""
        return lazy.layer_stats(self, max_frames, seed)

    def write(self, url: str | Path, codec: str = DEFAULT_CODEC, dtype: str | None = None,
              overwrite: bool = False) -> FeatureStore:
        """The merged view as a stage-1 store (`fuse.write.write_view`)."""
        return write_view(self, url, codec, dtype, overwrite)

    # ---- facts -----------------------------------------------------------------------------------
    def describe(self, batch_frames: int = 10_000) -> dict:
        """What `fusionpipe fuse --describe` prints, with the bytes one batch of `batch_frames` target frames reads."""
        total = max(int(self.lengths.sum()), 1)
        stores, read, on_disk = [], 0, 0
        for k, s in enumerate(self.stores):
            frames = int(self.store_frames[k].sum())
            itemsize = np.dtype(s.info.dtype).itemsize
            raw = batch_frames * frames / total * s.num_layers * s.hidden_size * itemsize
            ratio = s.size_on_disk() / max(s.total_frames * s.num_layers * s.hidden_size * itemsize, 1)
            read, on_disk = read + raw, on_disk + raw * ratio
            stores.append({"store": str(s), "upstream": s.info.upstream,
                           "num_layers": s.num_layers, "frame_rate": s.frame_rate, "hidden_size": s.hidden_size,
                           "dtype": s.info.dtype, "frames": frames})
        rule = "max T_i per utterance (upsampling)" if self.align_time == "max" else "min T_i per utterance"
        return {
            "manifest": self.stores[0].info.manifest,
            "stores": stores,
            "utterances": len(self),
            "dropped": len(self.dropped),
            "frames": int(self.lengths.sum()),
            "num_layers": self.num_layers,
            "align_layers": f"{self.align_layers}: L = {self.num_layers} (" + (
                "max L_i, linear along layers, first and last exact)" if self.align_layers == "interpolate"
                else "all equal)"),
            "align_time": f"{self.align_time}: T = {rule}, linear, first and last frames exact",
            "frame_rate": self.frame_rate,
            "merge": self.merge,
            "dims": self.dims,
            "out_dim": self.out_dim,
            "per_batch": {"frames": batch_frames, "bytes_decoded": round(read), "bytes_from_disk": round(on_disk),
                          "bytes_out_float32": batch_frames * self.num_layers * (self.out_dim or sum(self.dims)) * 4},
        }
