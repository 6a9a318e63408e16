"""A merged view materialised as a stage-1 store (openable with FeatureStore.open, fusable again)."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse import runs
from fusionpipe.names import upstream_set_name
from fusionpipe.chunks import ChunkAssembler
from fusionpipe.codecs import DEFAULT_CODEC
from fusionpipe.store import FeatureStore, Layout, local_path, store_order


def write_view(view, url: str | Path, codec: str = DEFAULT_CODEC, dtype: str | None = None,
               overwrite: bool = False) -> FeatureStore:
    """Write the merged view as a stage-1 store.

    Utterances are stored longest first like every store (so the loader's neighbouring reads
    apply to it too); whole chunks are written one at a time while the next group is read.
    ``dtype`` defaults to the sources' (float16 unless one is float32).
    """
    if view.merge is None:
        raise FusionpipeError("write() materialises a merged view: open it with merge='add' or 'concat' "
                              "(--merge add|concat)")
    _refuse_own_sources(view, url)
    dtype = dtype or ("float16" if all(s.info.dtype == "float16" for s in view.stores) else "float32")
    order = store_order(view.ids, view.lengths)
    layout = Layout([view.ids[i] for i in order], view.lengths[order])
    store = FeatureStore.create(url, layout, num_layers=view.num_layers, hidden_size=view.out_dim, dtype=dtype,
                                codec=codec, attrs=fingerprint(view, dtype, codec), overwrite=overwrite)
    chunks = ChunkAssembler(layout.total_frames, store.chunk_frames)
    offset = 0
    groups = view.groups(max(store.chunk_frames, runs.GROUP_BYTES // (4 * view.num_layers * view.out_dim)), order)
    with ThreadPoolExecutor(1) as pool:  # read and align group g+1 while g is written
        pending = pool.submit(view.read_merged, groups[0]) if groups else None
        for g, group in enumerate(groups):
            batch = pending.result()
            pending = pool.submit(view.read_merged, groups[g + 1]) if g + 1 < len(groups) else None
            for b, i in enumerate(group):
                n = int(view.lengths[i])
                frames = batch[b, :, :n].permute(1, 0, 2).to(getattr(torch, dtype)).numpy()  # (L, T, D) -> (T, L, D)
                for c, whole in chunks.add(offset, frames):
                    _flush(store, c, whole, dtype, url)
                offset += n
    return FeatureStore.open(url)


def _refuse_own_sources(view, url: str | Path) -> None:
    """Writing onto a store the view reads (or into it, or onto a folder that holds it) would destroy the
    sources before they are read, with --overwrite: refused before anything is created."""
    target = _place(url)
    for s in view.stores:
        source = _place(s.url)
        if target == source or source.startswith(target + "/") or target.startswith(source + "/"):
            raise FusionpipeError(f"--write {url}: that is one of the --stores the view reads ({s}) or holds one "
                                  "of them; write the merged store to a new path")


def _place(url: str | Path) -> str:
    """A store's location, comparable: a local path made absolute with its links and '..' resolved."""
    path = local_path(url)
    return str(url).rstrip("/") if path is None else os.path.realpath(path)


def _flush(store: FeatureStore, c: int, chunk: np.ndarray, dtype: str, url) -> None:
    if not np.isfinite(chunk).all():
        raise FusionpipeError(f"the merged features overflow {dtype} in {url} chunk {c}; "
                              "write with dtype='float32'")
    store.write_chunk(c, chunk)


def fingerprint(view, dtype: str, codec: str) -> dict:
    """The written store's attrs: its sources and the fusion, so that the store says what it holds."""
    sources = [{"store": str(s), "upstream": s.info.upstream_fingerprint, "dtype": s.info.dtype,
                "codec": s.info.codec, "total_frames": s.total_frames} for s in view.stores]
    fusion = {"merge": view.merge, "align_time": view.align_time, "align_layers": view.align_layers}
    names = upstream_set_name(s.upstream_name for s in view.stores)
    digest = hashlib.sha256(json.dumps([sources, fusion, view.ids], sort_keys=True).encode()).hexdigest()
    first = view.stores[0].attrs
    return {
        "manifest": first.get("manifest"),  # the record itself, passed on
        "upstream": {"name": f"fused-{view.merge}({names})", "model_id": "fusionpipe/fuse", "revision": digest,
                     "family": "fused", "num_layers": view.num_layers, "hidden_size": view.out_dim,
                     "frame_rate": view.frame_rate, "fusion": fusion, "sources": sources},
        "dtype": dtype, "codec": codec, "sample_rate": first.get("sample_rate"),
        "skipped_before": view.dropped,
    }
