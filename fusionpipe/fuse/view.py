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

Two read paths with identical numbers: the hot path (``view[i]``, ``aligned``, ``read_batch``)
reads one contiguous Zarr slice per store per run of neighbouring utterances and aligns with
torch on the CPU; ``to_dask`` builds the same result as a lazy Dask graph (``da.from_zarr`` +
slicing + one alignment task per store + merge), and ``layer_stats`` / ``write`` stream over
the dataset with bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse.align import ALIGN_LAYERS, ALIGN_TIME, align_into, aligned_block
from fusionpipe.chunks import ChunkAssembler
from fusionpipe.codecs import DEFAULT_CODEC, LOSSY
from fusionpipe.quantize import Codes
from fusionpipe.store import FeatureStore, Layout, list_ids, store_order

MERGES = ("add", "concat")
GROUP_BYTES = 64 * 2**20  # float32 output per task of layer_stats / write: bounded memory, few Dask tasks


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
        first = list_ids(list(missing))
        per_store = "; ".join(f"{s.url} lacks {sum(any(w == s.url for w, _ in v) for v in missing.values())}"
                              for s in opened)
        raise FusionpipeError(
            f"{len(missing)} utterance(s) are not usable in every store ({per_store}): {first}. "
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


class _BatchMemory:
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


_BATCHES = _BatchMemory()


@dataclass
class CompactStack:
    """One lossy store's stack of a batch, not yet expanded: the codes of each contiguous read
    (`quantize.Codes`, 1 byte a value) and where its utterances go. ``.to(device)`` moves the codes,
    expands, aligns and pads there, giving exactly `read_batch`'s (B, L, T, D) float32 tensor: a GPU
    trainer's loader sends these, a quarter of the float32 bytes over PCIe and no expansion on the host."""

    shape: tuple[int, int, int, int]
    lengths: list[int]  # aligned frames of each utterance
    reads: list[tuple[Codes, list[tuple[int, int, int]]]]  # codes, [(b, offset in them, frames)]

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        out = torch.zeros(self.shape, device=device)
        for codes, items in self.reads:
            block = codes.to(device, non_blocking=non_blocking).expand()  # (frames, L_k, D) storage dtype
            for b, o, n in items:
                align_into(block[o:o + n], out[b, :, :self.lengths[b]], accumulate=False)
        return out

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c, _ in self.reads)


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
        self._offsets = [s.offsets[p] for s, p in zip(stores, pos)]
        self._frames = np.stack([s.lengths[p] for s, p in zip(stores, pos)]).reshape(len(stores), len(self.ids))
        self.lengths: np.ndarray = (self._frames.max(0) if self.align_time == "max" else self._frames.min(0))
        self.num_layers = max(s.num_layers for s in stores)
        self.dims = [s.hidden_size for s in stores]
        self._dask_hidden = None

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
        rates = [s.frame_rate for s in self.stores]
        return max(rates) if self.align_time == "max" else min(rates)

    def store_order(self) -> np.ndarray:
        """View indices sorted by position in the first store: neighbours there are one contiguous read."""
        return np.argsort(self._offsets[0], kind="stable")

    # ---- the hot path: direct Zarr reads ---------------------------------------------------
    def read_batch(self, indices, merged: bool = False, compact: bool = False,
                   empty=None) -> list[torch.Tensor | CompactStack] | torch.Tensor:
        """Utterances `indices` aligned and zero-padded past their length: per store (B, L, T_max, D_i)
        float32 tensors, or with ``merged`` one (B, L, T_max, D_out) tensor (a list when merge=None).

        Each store is read with one Zarr slice per run of utterances that are neighbours in it, so a
        chunk shared by two utterances of the batch is decoded once. With ``compact`` (unmerged only),
        a lossy store's stack is a `CompactStack`: its codes, expanded and aligned by ``.to(device)``.
        ``empty(*shape)`` allocates the float32 outputs (default: buffers reused once a batch is gone;
        the loader's worker processes pass their shared-memory slot's).
        """
        empty = empty or _BATCHES.empty
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        B, L, T = len(indices), self.num_layers, int(lengths.max()) if len(indices) else 0
        merge = self.merge if merged else None
        if compact and merge is not None:
            raise ValueError("compact batches are per store: merged=False")
        lossy = [compact and s.info.codec in LOSSY for s in self.stores]
        reads = []  # (store, batch positions, first frame, end frame): one contiguous read each
        for k, store in enumerate(self.stores):
            offs, frames = self._offsets[k][indices], self._frames[k][indices]
            reads += [(k, run, int(offs[run].min()), int((offs[run] + frames[run]).max()))
                      for run in _runs(offs, frames, store.chunk_frames)]

        def items(k: int, run, lo: int) -> list[tuple[int, int, int]]:  # (b, offset in the read, frames)
            return [(b, int(self._offsets[k][indices[b]]) - lo, int(self._frames[k][indices[b]])) for b in run]

        stacks = [CompactStack((B, L, T, d), lengths.tolist(), []) if c else None for d, c in zip(self.dims, lossy)]
        for k, run, lo, hi in reads:
            if lossy[k]:
                stacks[k].reads.append((self.stores[k].read_codes(lo, hi), items(k, run, lo)))
        reads = [r for r in reads if not lossy[r[0]]]
        if merge is None:
            outs = [stacks[k] if c else empty(B, L, T, d) for k, (d, c) in enumerate(zip(self.dims, lossy))]
        else:
            outs = [empty(B, L, T, self.out_dim)]
        for out in outs:
            for b, n in enumerate(lengths if isinstance(out, torch.Tensor) else ()):
                out[b, :, n:] = 0  # only the padding: the alignment writes everything else
        edges = np.cumsum([0, *self.dims])

        def slot(k: int, b: int) -> torch.Tensor:  # where utterance b of store k goes: (L, T_b, D_k)
            n = int(lengths[b])
            if merge == "concat":
                return outs[0][b, :, :n, edges[k]:edges[k + 1]]
            return outs[0 if merge else k][b, :, :n]

        # one thread decodes the next reads while this one aligns (Zarr's decoding releases the GIL)
        with ThreadPoolExecutor(1, thread_name_prefix="fusionpipe-read") as pool:
            blocks = pool.map(lambda r: self.stores[r[0]].read_range(r[2], r[3]), reads)
            for (k, run, lo, _), block in zip(reads, blocks):  # block: (frames, L_k, D_k) storage dtype
                for b, o, n in items(k, run, lo):
                    align_into(block[o:o + n], slot(k, b), accumulate=merge == "add" and k > 0)
        return outs if merge is None else outs[0]

    def aligned(self, i: int) -> list[np.ndarray]:
        """Utterance i of every store, aligned: [(L, T, D_i) float32]."""
        return [s[0].numpy() for s in self.read_batch([i])]

    def __getitem__(self, i: int) -> np.ndarray | list[np.ndarray]:
        """Utterance i merged: (L, T, D) for add, (L, T, sum D_i) for concat, per-store list for None."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"utterance index {i} out of range for {len(self)} utterances")
        out = self.read_batch([i % len(self)], merged=True)
        return [s[0].numpy() for s in out] if self.merge is None else out[0].numpy()

    # ---- lazy: Dask ------------------------------------------------------------------------
    def to_dask(self, i: int):
        """Utterance i as a lazy Dask expression equal to ``view[i]`` (a per-store list for merge=None)."""
        import dask.array as da

        if self._dask_hidden is None:
            self._dask_hidden = [da.from_zarr(s.hidden) for s in self.stores]
        T, L = int(self.lengths[i]), self.num_layers
        parts = []
        for k, (h, d) in enumerate(zip(self._dask_hidden, self.dims)):
            o, n = int(self._offsets[k][i]), int(self._frames[k][i])
            x = h[o:o + n].rechunk({0: -1})  # (T_i, L_i, D): one block, so one alignment task
            parts.append(x.map_blocks(aligned_block, L, T, chunks=((L,), (T,), (d,)), dtype=np.float32,
                                      meta=np.empty((0, 0, 0), np.float32)))
        if self.merge == "add":
            out = parts[0]
            for p in parts[1:]:
                out = out + p
            return out
        if self.merge == "concat":
            return da.concatenate(parts, axis=-1)
        return parts

    def layer_stats(self, max_frames: int | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray] | list[tuple[np.ndarray, np.ndarray]]:
        """Per-layer mean and std (L, D_out), float32, of the merged features over every frame of the view.

        A Dask reduction over groups of neighbouring utterances (one task reads and aligns one group
        and returns its sums), so memory holds a few groups, never the corpus. merge=None: one
        (mean, std) per store. ``max_frames``: only groups drawn at random (``seed``) until about that
        many frames, so the cost stays flat in the corpus size.
        """
        import dask
        import dask.array as da

        L = self.num_layers
        dims = [self.out_dim] if self.merge is not None else self.dims
        width = sum(dims)

        def moments(group: np.ndarray) -> np.ndarray:  # -> (2, L, width) float64 sums of x and x^2
            out = self.read_batch(group, merged=True)
            out = torch.cat(out, dim=-1) if isinstance(out, list) else out  # padding is zero: adds nothing
            return torch.stack([out.sum(dim=(0, 2), dtype=torch.float64),
                                out.square().sum(dim=(0, 2), dtype=torch.float64)]).numpy()

        groups = self._groups(GROUP_BYTES // (4 * L * width))
        if max_frames is not None and int(self.lengths.sum()) > max_frames:
            drawn, frames = [], 0
            for g in np.random.default_rng(seed).permutation(len(groups)):
                drawn.append(groups[g])
                frames += int(self.lengths[groups[g]].sum())
                if frames >= max_frames:
                    break
            groups = drawn
        parts = [da.from_delayed(dask.delayed(moments)(g), shape=(2, L, width), dtype=np.float64) for g in groups]
        sums = da.stack(parts).sum(axis=0).compute() if parts else np.zeros((2, L, width))
        n = max(sum(int(self.lengths[g].sum()) for g in groups), 1)
        mean = sums[0] / n
        std = np.sqrt(np.maximum(sums[1] / n - mean ** 2, 0.0))
        edges = np.concatenate([[0], np.cumsum(dims)])
        stats = [(mean[:, a:b].astype(np.float32), std[:, a:b].astype(np.float32)) for a, b in zip(edges, edges[1:])]
        return stats[0] if self.merge is not None else stats

    def _groups(self, frames_per_group: int, order: np.ndarray | None = None) -> list[np.ndarray]:
        """Consecutive view indices (in `order`, default store order) of about frames_per_group frames each."""
        order = self.store_order() if order is None else order
        groups, start, total = [], 0, 0
        for j, i in enumerate(order):
            total += int(self.lengths[i])
            if total >= frames_per_group:
                groups.append(order[start:j + 1])
                start, total = j + 1, 0
        if start < len(order):
            groups.append(order[start:])
        return groups

    # ---- materialise -------------------------------------------------------------------------
    def write(self, url: str | Path, codec: str = DEFAULT_CODEC, dtype: str | None = None,
              overwrite: bool = False) -> FeatureStore:
        """Write the merged view as a stage-1 store (openable with FeatureStore.open, fusable again).

        Utterances are stored longest first like every store (so the loader's neighbouring reads
        apply to it too); whole chunks are written one at a time while the next group is read.
        ``dtype`` defaults to the sources' (float16 unless one is float32).
        """
        if self.merge is None:
            raise FusionpipeError("write() materialises a merged view: open it with merge='add' or 'concat' "
                                  "(--merge add|concat)")
        dtype = dtype or ("float16" if all(s.info.dtype == "float16" for s in self.stores) else "float32")
        order = store_order(self.ids, self.lengths)
        layout = Layout([self.ids[i] for i in order], self.lengths[order])
        store = FeatureStore.create(url, layout, num_layers=self.num_layers, hidden_size=self.out_dim, dtype=dtype,
                                    codec=codec, attrs=self._fingerprint(dtype, codec), overwrite=overwrite)
        chunks = ChunkAssembler(layout.total_frames, store.chunk_frames)
        offset = 0
        groups = self._groups(max(store.chunk_frames, GROUP_BYTES // (4 * self.num_layers * self.out_dim)), order)
        with ThreadPoolExecutor(1) as pool:  # read and align group g+1 while g is written
            pending = pool.submit(self.read_batch, groups[0], True) if groups else None
            for g, group in enumerate(groups):
                batch = pending.result()
                pending = pool.submit(self.read_batch, groups[g + 1], True) if g + 1 < len(groups) else None
                for b, i in enumerate(group):
                    n = int(self.lengths[i])
                    frames = batch[b, :, :n].permute(1, 0, 2).to(getattr(torch, dtype)).numpy()  # (L, T, D) -> (T, L, D)
                    for c, whole in chunks.add(offset, frames):
                        self._flush(store, c, whole, dtype, url)
                    offset += n
        return FeatureStore.open(url)

    def _flush(self, store: FeatureStore, c: int, chunk: np.ndarray, dtype: str, url) -> None:
        if not np.isfinite(chunk).all():
            raise FusionpipeError(f"the merged features overflow {dtype} in {url} chunk {c}; "
                                  "write with dtype='float32'")
        store.write_chunk(c, chunk)

    def _fingerprint(self, dtype: str, codec: str) -> dict:
        sources = [{"store": str(s), "upstream": s.info.upstream_fingerprint, "dtype": s.info.dtype,
                    "codec": s.info.codec, "total_frames": s.total_frames} for s in self.stores]
        fusion = {"merge": self.merge, "align_time": self.align_time, "align_layers": self.align_layers}
        names = "+".join(s.info.upstream or s.name for s in self.stores)
        digest = hashlib.sha256(json.dumps([sources, fusion, self.ids], sort_keys=True).encode()).hexdigest()
        first = self.stores[0].attrs
        return {
            "manifest": first.get("manifest"),  # the record itself, passed on
            "upstream": {"name": f"fused-{self.merge}({names})", "model_id": "fusionpipe/fuse", "revision": digest,
                         "family": "fused", "num_layers": self.num_layers, "hidden_size": self.out_dim,
                         "frame_rate": self.frame_rate, "fusion": fusion, "sources": sources},
            "dtype": dtype, "codec": codec, "sample_rate": first.get("sample_rate"),
            "skipped_before": self.dropped,
        }

    # ---- facts -----------------------------------------------------------------------------------
    def describe(self, batch_frames: int = 10_000) -> dict:
        """What `fusionpipe fuse --describe` prints, with the bytes one batch of `batch_frames` target frames reads."""
        total = max(int(self.lengths.sum()), 1)
        stores, read, on_disk = [], 0, 0
        for k, s in enumerate(self.stores):
            frames = int(self._frames[k].sum())
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


def _runs(offsets: np.ndarray, frames: np.ndarray, gap: int) -> list[np.ndarray]:
    """Batch positions grouped into runs that one slice reads: sorted by offset, split where the hole
    between two neighbours exceeds `gap` frames (reading through a smaller hole costs less than
    decoding a shared chunk twice)."""
    order = np.argsort(offsets, kind="stable")
    runs, start = [], 0
    end = offsets[order[0]] + frames[order[0]] if len(order) else 0
    for j in range(1, len(order)):
        o = offsets[order[j]]
        if o - end > gap:
            runs.append(order[start:j])
            start = j
        end = max(end, o + frames[order[j]])
    if len(order):
        runs.append(order[start:])
    return runs
