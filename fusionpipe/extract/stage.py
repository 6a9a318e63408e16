"""STAGE 1: run one frozen upstream once over a manifest and cache ALL its hidden layers.

    manifest -> header check -> frame counts -> layout (store order) -> batch plan
             -> [audio thread] load -> [main] upstream.forward -> [writer thread] whole chunks

That is the one-process path, the default on a CPU (the forward takes every core). On a GPU the
reading and writing run in other processes instead (`processes`; pipeline.py): same batches and bytes.

The batch plan is a pure function of the manifest and the budget, so a rerun after a crash
forms exactly the same batches and writes byte-identical chunks; it only recomputes the
batches that touch a chunk not yet on disk. cluster.py runs the same plan on Dask workers.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fusionpipe import audio
from fusionpipe.chunks import ChunkAssembler, Edge, chunk_span
from fusionpipe.codecs import DEFAULT_CODEC, expected_bytes
from fusionpipe.errors import FusionpipeError, redact
from fusionpipe.manifest import Manifest
from fusionpipe.store import FINGERPRINT, FeatureStore, Layout, StoreInfo, check_format, local_path
from fusionpipe.store_lock import lock
from fusionpipe.extract import pipeline
from fusionpipe.extract.cast import cast, unstorable
from fusionpipe.extract.batching import ExtractionPlan, plan
from fusionpipe.extract.defaults import DTYPE, IO_THREADS, MAX_SECONDS
from fusionpipe.extract.pipeline import default_processes
from fusionpipe.extract.upstreams import Upstream, load_upstream

WRITE_THREADS = min(4, max(1, (os.cpu_count() or 2) // 2))  # chunk compression + writes
PREFETCH = 2  # batches decoded ahead of the upstream


def store_url(cache: str | Path, manifest_name: str, model: str) -> str:
    """cache/<manifest>/<upstream>.zarr; HF ids and directories become a single path component."""
    p = Path(model)
    leaf = p.name if p.is_dir() else model.replace("/", "--")
    return f"{str(cache).rstrip('/')}/{manifest_name}/{leaf}.zarr"


def compute_dtype(dtype: str, device_type: str) -> str:
    """The precision the upstream runs in: float16 autocast on a GPU for float16 stores, else float32.

    A float32 store is computed in float32 on every device (else it would hold fp16-rounded values
    at twice the bytes); CPUs run float32 (fp16 matmuls there are slow, and not what users expect).
    """
    return "float16" if dtype == "float16" and device_type == "cuda" else "float32"


def fingerprint(manifest: Manifest, upstream: Upstream, dtype: str, codec: str, device_type: str) -> dict:
    return {
        "upstream": upstream.fingerprint(),
        # how the numbers were computed: a resume on another kind of device or precision would mix two
        "compute": {"dtype": compute_dtype(dtype, device_type), "device": device_type},
        # path: where stage 2/3 find the labels again; not compared (a corpus may move)
        "manifest": {"name": manifest.name, "sha256": manifest.content_hash(), "utterances": len(manifest),
                     "path": str(Path(manifest.source).resolve()) if manifest.source else None},
        "dtype": dtype,
        "codec": codec,
    }


def _same_fingerprint(store: FeatureStore, fp: dict) -> list[str]:
    """What differs between the extraction a store holds and the one `fp` describes, in words."""
    was, now = store.info, StoreInfo.from_attrs(fp)
    diffs = [f"upstream {key}: cached {was.upstream_fingerprint.get(key)!r}, now {now.upstream_fingerprint.get(key)!r}"
             for key in FINGERPRINT
             if was.upstream_fingerprint.get(key) != now.upstream_fingerprint.get(key)]
    if was.manifest_sha256 != now.manifest_sha256:
        diffs.append(f"manifest {now.manifest} content changed")
    diffs += [f"{key}: cached {getattr(was, key)!r}, now {getattr(now, key)!r}" for key in ("dtype", "codec")
              if getattr(was, key) != getattr(now, key)]
    diffs += [f"{what}: cached on {getattr(was, key)!r}, now {getattr(now, key)!r} (the features would mix two "
              f"numerics; resume on the same kind of device, e.g. --device {was.device or 'cpu'})"
              for key, what in (("device", "device kind"), ("compute_dtype", "compute dtype"))
              if getattr(was, key) != getattr(now, key)]
    return diffs


@dataclass
class Result:
    url: str
    seconds_audio: float
    seconds_wall: float
    utterances: int
    skipped: int
    already_complete: bool = False

    def summary(self) -> str:
        if self.already_complete:
            return f"{redact(self.url)}: already complete, nothing to do"
        speed = self.seconds_audio / self.seconds_wall if self.seconds_wall else float("inf")
        audio_s = f"{self.seconds_audio / 3600:.2f} h" if self.seconds_audio >= 3600 else f"{self.seconds_audio:.0f} s"
        return (f"{redact(self.url)}: {self.utterances} utterances, {audio_s} audio in "
                f"{self.seconds_wall:.1f} s ({speed:.0f}x real time), {self.skipped} skipped")


def extract(manifest: Manifest, model: str | Upstream, cache: str | Path = "cache", *, url: str | None = None,
            device: str = "auto", dtype: str = DTYPE, codec: str = DEFAULT_CODEC,
            max_seconds: float = MAX_SECONDS, skip_bad: bool = False, overwrite: bool = False,
            chunk_frames: int | None = None, progress: bool = True, wait: bool = False,
            processes: int | None = None) -> Result:
    """Extract every hidden layer of `model` over `manifest` into a store; resume if one is there.

    One extraction per store at a time: a second one is refused naming the holder (``wait``: waits).
    ``processes``: helper processes that decode and write beside this one (pipeline.py); 0 does it in
    threads of this process; None: pipeline.default_processes (0 on a CPU). A memory:// store lives in
    this process only, so it always takes the one-process path.
    """
    check_settings(dtype=dtype, codec=codec, max_seconds=max_seconds, processes=processes)
    upstream = model if isinstance(model, Upstream) else load_upstream(model, device=device)
    url = url or store_url(cache, manifest.name, upstream.name)
    if processes is None or url.startswith("memory://"):
        processes = 0 if url.startswith("memory://") else default_processes(upstream.device.type)
    with lock(url, wait):
        return _extract(manifest, upstream, url, progress, processes, dtype=dtype, codec=codec,
                        max_seconds=max_seconds, skip_bad=skip_bad, overwrite=overwrite, chunk_frames=chunk_frames)


def check_settings(*, dtype: str = DTYPE, codec: str = DEFAULT_CODEC, max_seconds: float = MAX_SECONDS,
                   processes: int | None = None) -> None:
    """Refuse extraction settings that cannot work, naming the flag, before an upstream loads (minutes for
    a large checkpoint) or a cluster starts."""
    check_format(dtype, codec)
    if not (isinstance(max_seconds, (int, float)) and math.isfinite(max_seconds) and max_seconds > 0):
        raise FusionpipeError(f"--max-seconds {max_seconds}: give the padded audio seconds per batch, a positive "
                              f"number (default {MAX_SECONDS:g})")
    if processes is not None and processes < 0:
        raise FusionpipeError(f"--processes {processes}: give 0 (decode and write in threads of this process) or "
                              "a number of helper processes")


def _extract(manifest: Manifest, upstream: Upstream, url: str, progress: bool, processes: int,
             **options) -> Result:
    opened = open_store(manifest, upstream, url, device_type=upstream.device.type, **options)
    if isinstance(opened, Result):
        return opened
    store, p = opened
    skip_bad = options["skip_bad"]
    t0 = time.perf_counter()
    done = store.done_chunks()
    todo = [b for b in p.batches if needed(b, p.layout, done, store.chunk_frames)]
    # per-batch sums, added up in the bar's own order, so the bar ends exactly at its total
    batch_seconds = [sum(manifest[p.rows[i]].duration for i in b) for b in todo]
    bar = progress_bar(sum(batch_seconds), f"extract {upstream.name}", progress)
    try:
        on_batch = lambda k: bar.update(batch_seconds[k])  # noqa: E731
        if processes:
            helpers = pipeline.ProcessPipeline(manifest, upstream, store, p, done, skip_bad, processes)
            skipped, edges = helpers.run(todo, on_batch=on_batch)
        else:
            skipped, edges = extract_batches(manifest, upstream, store, p, todo, done, skip_bad, on_batch=on_batch)
    finally:
        bar.close()
    assert not edges, "every chunk a batch touches is filled when all its batches run"
    return Result(url, sum(batch_seconds), time.perf_counter() - t0, len(store), skipped + len(p.skipped))


def check_disk(url: str, need: float, codec: str) -> None:
    """Refuse, before the model runs, a local store whose chunks still to write (about ``need`` bytes, from
    the codec's measured ratio, `expected_bytes`) cannot fit on its filesystem. Object stores: not checked."""
    path = local_path(url)
    if path is None:
        return
    path = path.absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise FusionpipeError(
            f"{url}: the store needs about {need / 2**30:.2f} GiB more ({codec}), and {existing} has "
            f"{free / 2**30:.2f} GiB free; free some space, choose another --cache, or a smaller --codec "
            "(int8-std08 takes about a third of float16)")


def open_store(manifest: Manifest, upstream: Upstream, url: str, *, device_type: str, dtype: str, codec: str,
               max_seconds: float, skip_bad: bool, overwrite: bool,
               chunk_frames: int | None) -> tuple[FeatureStore, ExtractionPlan] | Result:
    """The store at `url` and the plan to fill it: created, or reopened to resume (the same extraction only).

    A Result instead when the store is already complete. The caller holds the store's `lock`.
    """
    fp = fingerprint(manifest, upstream, dtype, codec, device_type)
    store = None
    if FeatureStore.exists(url) and not overwrite:
        store = FeatureStore.open(url, mode="r+")
        diffs = _same_fingerprint(store, fp)
        if diffs:
            raise FusionpipeError(
                f"{url} holds a different extraction ({'; '.join(diffs)}); pass --overwrite to replace it "
                "or choose another --cache"
            )
        store.remove_stray()  # .partial files of writes killed before their rename: never chunks
        if store.is_complete():
            return Result(url, 0.0, 0.0, len(store), len(store.skipped()), already_complete=True)
    p = plan(manifest, upstream, max_seconds, skip_bad)
    left = 1.0 if store is None else float((~store.done_chunks()).mean())
    check_disk(url, expected_bytes(codec, p.layout.total_frames * left, upstream.num_layers, upstream.hidden_size, dtype),
               codec)
    if store is None:
        store = FeatureStore.create(url, p.layout, num_layers=upstream.num_layers, hidden_size=upstream.hidden_size,
                                    dtype=dtype, codec=codec, chunk_frames=chunk_frames, overwrite=overwrite,
                                    attrs={**fp, "sample_rate": audio.SAMPLE_RATE, "skipped_before": p.skipped})
    elif store.ids != p.layout.ids:
        raise FusionpipeError(f"{url}: its layout differs from this manifest's plan; pass --overwrite to rebuild it")
    return store, p


def needed(batch: list[int], layout: Layout, done: np.ndarray, chunk_frames: int) -> bool:
    """Does the batch (positions in store order) touch a chunk not yet on disk?"""
    lo, hi = chunk_span(layout.offsets[batch[0]], layout.offsets[batch[-1]] + layout.lengths[batch[-1]], chunk_frames)
    return not done[lo:hi].all()


def progress_bar(total_seconds: float, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total_seconds, disable=not enabled, desc=desc, dynamic_ncols=True, unit="audio-s",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, "
                           "{rate_fmt}]")


def extract_batches(manifest: Manifest, upstream: Upstream, store: FeatureStore, p: ExtractionPlan,
                    batches: list[list[int]], done: np.ndarray, skip_bad: bool, on_batch=None) -> tuple[int, list[Edge]]:
    """Run `batches` (runs of p.batches, in order) and write every chunk they fill that is not `done`.

    Returns the number of utterances skipped and the edges: frames of the chunks these batches
    only partly cover, for whoever owns those chunks to complete (cluster.py).
    """
    offsets, lengths = p.layout.offsets, p.layout.lengths
    if upstream.device.type != store.info.device:
        raise FusionpipeError(f"{store} is computed on {store.info.device}, this process runs {upstream.name} on "
                              f"{upstream.device.type}: use the same kind of device for every part of a store")
    precision = getattr(torch, store.info.compute_dtype)
    writer = _ChunkWriter(store, done)
    writer.start()
    skipped = 0
    try:
        with ThreadPoolExecutor(IO_THREADS) as io:
            for k, (batch, loaded) in enumerate(zip(batches, _decoded(io, manifest, p, batches, skip_bad))):
                ok = [i for i, (w, _) in zip(batch, loaded) if w is not None]
                feats = upstream.forward([w for w, _ in loaded if w is not None], precision) if ok else []
                for i, f in zip(ok, feats):
                    writer.put(int(offsets[i]), _to_storage(f, store.info.dtype, upstream.name, p.layout.ids[i]))
                for i, (w, reason) in zip(batch, loaded):
                    if w is None:
                        skipped += 1
                        store.mark_skipped(p.layout.ids[i], reason)
                        writer.put(int(offsets[i]), np.zeros((int(lengths[i]), store.num_layers,
                                                                 store.hidden_size), store.info.dtype))
                if on_batch is not None:
                    on_batch(k)
    finally:
        edges = writer.close()
    return skipped, edges


def _decoded(io: ThreadPoolExecutor, manifest: Manifest, p: ExtractionPlan, batches: list[list[int]],
             skip_bad: bool):
    """Each batch's [(wave, None) or (None, why it is bad)], decoded PREFETCH batches ahead on `io`: decoding
    FLAC is the bottleneck on a GPU, so one task per utterance."""
    def submit(batch: list[int]) -> list:
        return [io.submit(_load_or_skip, manifest, p.rows[i], skip_bad) for i in batch]

    ahead = deque(submit(b) for b in batches[:PREFETCH])
    for k in range(len(batches)):
        loaded = [f.result() for f in ahead.popleft()]
        if k + PREFETCH < len(batches):
            ahead.append(submit(batches[k + PREFETCH]))
        yield loaded


def _load_or_skip(manifest: Manifest, row: int, skip_bad: bool) -> tuple[np.ndarray | None, str | None]:
    try:
        return audio.load(manifest, row), None
    except audio.BadAudio as e:
        if not skip_bad:
            raise FusionpipeError(f"{e} (or pass --skip-bad to record it and go on)") from None
        return None, str(e)


def _to_storage(f: torch.Tensor, dtype: str, model: str, utt_id: str) -> np.ndarray:
    """Cast on the device (half the bytes to move) and refuse what the storage dtype cannot hold."""
    out = cast(f, dtype)
    if not torch.isfinite(out).all():
        raise unstorable(model, utt_id, dtype, f)
    return out.cpu().numpy()


class _ChunkWriter(threading.Thread):
    """Assembles utterances into whole chunks and writes each missing chunk once, off the main thread.

    Utterances arrive in store order per batch, so only the chunks under the current batch are
    ever buffered: memory is flat in dataset size. Finished chunks are compressed and written by
    a few threads at once (the codecs release the GIL): one thread of zstd keeps up with a CPU
    upstream, not with a GPU one.
    """

    def __init__(self, store: FeatureStore, done: np.ndarray):
        super().__init__(daemon=True)
        self.store, self.done = store, done
        self.chunks = ChunkAssembler(store.total_frames, store.chunk_frames, skip=done)
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.pool = ThreadPoolExecutor(WRITE_THREADS)
        self.writing: deque = deque()  # futures of chunks being written, at most 2 x WRITE_THREADS

    def put(self, offset: int, frames: np.ndarray) -> None:
        if self.error:
            raise self.error
        self.q.put((offset, frames))

    def close(self) -> list[Edge]:
        """Wait for every write; return the chunks left part-filled (only runs over part of a plan,
        cluster work units, leave them)."""
        self.q.put(None)
        self.join()
        if self.error:
            raise self.error
        return self.chunks.edges()

    def run(self) -> None:
        try:
            while (item := self.q.get()) is not None:
                for c, frames in self.chunks.add(*item):
                    self.writing.append(self.pool.submit(self.store.write_chunk, c, frames))
                    if len(self.writing) > 2 * WRITE_THREADS:
                        self.writing.popleft().result()
                    self.done[c] = True
            while self.writing:
                self.writing.popleft().result()
        except BaseException as e:  # surfaced to the main thread by put()/close()
            self.error = e
            while self.q.get() is not None:  # drain so the producer never blocks
                pass
        finally:
            self.pool.shutdown(wait=True)
