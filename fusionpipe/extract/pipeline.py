"""STAGE 1 in several processes: the process that holds the upstream runs only its forward and the copy out.

    helpers  read   rows -> audio.load -> front end (normalisation, Whisper's log-mel) -> input slot
    main            input slot -> upstream.run -> device-to-host copy -> output slot
    helpers  write  output slot -> cast, finiteness check -> whole chunks -> store.write_chunk

Why processes. On a GPU the stages around the forward added up instead of overlapping: the main thread
was the bottleneck, and making its Python faster made the whole slower (GIL hand-offs between threads);
only more processes helped (docs/benchmarks.md). Here the main process does no decoding, no log-mel, no
cast, no check and no compression. The helper processes (`processes` of them) all take both kinds of
task, first come first served, so the split between reading and writing follows the costs by itself
(Whisper's log-mel costs about what compression does, an SSL front end far less).

Slots. Batches travel through shared memory, never through pipes: DEPTH input slots and DEPTH output
slots, each sized for the plan's largest batch and reused in turn (pinned on a GPU, so the copy out is
one DMA). Batch k + DEPTH is read into input slot k % DEPTH once batch k's forward has consumed it; an
output slot is refilled once its batch is written. Host memory is bounded by these 2 x DEPTH slots
(and the processes), whatever the corpus. A batch is read in `processes` tasks (its utterances dealt
out) and written in as many (its chunks cut in runs), so every helper can work on every batch.

Same store. The plan, the batches and each chunk's frames are run.run_batches': the same utterances go
through the same forward with the same padding (bad audio is left out of the forward, as there), the
helpers cast with the same rounding, so the store is byte-identical to the one-process path's on the
same kind of device (tests/test_extract_pipeline.py). Chunks inside one batch's frames are written
straight from its slot; a chunk under a batch edge is put together in the main process from its parts
(a few MB, as cluster.py does with the chunks under unit edges) and handed to a helper whole. No two
processes ever share a chunk, and a chunk on disk is still whole and still the done flag.

Failures. A helper's error (bad audio without --skip-bad, activations fp16 cannot hold)
comes back with the utterance ids; a process that dies (kill -9, out of memory) breaks its pool, and
the run stops with an error naming the batch instead of hanging. Rerunning resumes from the chunks on
disk, byte-identically, like after any crash.
"""

from __future__ import annotations

import ctypes
import errno
import math
import multiprocessing
import os
import shutil
import signal
import sys
import warnings
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fusionpipe import audio, cuda
from fusionpipe.device import usable_cores
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.upstreams import FrontEnd, Upstream
from fusionpipe.manifest import Manifest
from fusionpipe.chunks import ChunkAssembler, Edge, chunk_span
from fusionpipe.store import FeatureStore, list_ids

if TYPE_CHECKING:  # run imports this module
    from fusionpipe.extract.stage import Plan

DEPTH = 2  # batches in flight at each end: the one being read (written) and the next
MAX_PROCESSES = 16


def default_processes(device_type: str) -> int:
    """0 (the one-process path, threads) on a CPU, where the forward uses every core and extraction already
    equals the bare forward; on a GPU every usable core but the main process's, at least 1, at most
    MAX_PROCESSES."""
    if device_type == "cpu":
        return 0
    return max(1, min(MAX_PROCESSES, usable_cores() - 1))


# ---- the main process ------------------------------------------------------------------------------
def run_batches(manifest: Manifest, upstream: Upstream, store: FeatureStore, p: Plan, batches: list[list[int]],
                done: np.ndarray, skip_bad: bool, processes: int, on_batch=None) -> tuple[int, list[Edge]]:
    """run.run_batches with reading and writing in `processes` other processes; the same store bytes."""
    offsets, lengths, ids = p.layout.offsets, p.layout.lengths, p.layout.ids
    L, D, F, total = store.num_layers, store.hidden_size, store.chunk_frames, store.total_frames
    precision = getattr(torch, store.info.compute_dtype)
    out_dtype = np.dtype(store.info.compute_dtype)
    front: FrontEnd = upstream.front_end
    device = upstream.device
    layouts = [front.rows([audio.target_num_samples(manifest[p.rows[i]]) for i in b]) for b in batches]
    in_bytes, out_bytes = slot_bytes(layouts, [int(lengths[b].sum()) for b in batches], L * D * out_dtype.itemsize)
    skipped = 0
    with ExitStack() as stack:
        ins = stack.enter_context(_Slots(in_bytes, device))
        outs = stack.enter_context(_Slots(out_bytes, device))
        stack.enter_context(_one_thread_per_child())
        spawn = multiprocessing.get_context("spawn")  # fork would copy torch's threads and the model
        helpers = stack.enter_context(_pool(processes, spawn, _init, (
            os.getpid(), manifest, front, skip_bad, ins.names, outs.names, store.url, ids, lengths, store.info.dtype,
            upstream.name)))
        reads: dict[int, list[Future]] = {}  # per batch: its read tasks
        writes: list[list[Future]] = [[] for _ in range(DEPTH)]  # per output slot: the writes of its batch
        edge_writes: deque[tuple[int, Future]] = deque()
        edges = ChunkAssembler(total, F, skip=done)

        def batch_ids(k: int) -> str:
            return list_ids([ids[i] for i in batches[k]])

        def died(k: int) -> FusionpipeError:
            return FusionpipeError(
                f"{store}: a helper process died (killed, or out of memory?) with batch {max(k, 0)} "
                f"({batch_ids(max(k, 0))}) in flight; rerun the same command: it resumes from the chunks on disk. "
                "(Called from a script? Spawned processes import it again: its code must be under "
                "`if __name__ == '__main__':`.)")

        def result(future: Future, k: int):
            try:
                return future.result()
            except BrokenProcessPool:
                raise died(k) from None

        def submit(k: int, fn, *args) -> Future:
            try:
                return helpers.submit(fn, *args)
            except BrokenProcessPool:  # seen here first when the death came between two batches
                raise died(k) from None

        def read(k: int) -> None:
            rows = [p.rows[i] for i in batches[k]]
            groups = [list(range(r, len(rows), processes)) for r in range(processes)]
            reads[k] = [submit(k, _read, k % DEPTH, k, rows, g) for g in groups if g]

        # start every process now (the pool spawns them on demand: one would start, importing torch,
        # only once the first batch is done, and hold up the second)
        for future in [submit(0, _ready) for _ in range(processes)]:
            result(future, 0)
        for k in range(min(DEPTH, len(batches))):
            read(k)
        for k, batch in enumerate(batches):
            bad: dict[int, str] = {}
            for future in reads.pop(k):
                bad.update(result(future, k))
            inputs = layouts[k]
            inputs.values = ins.view(k % DEPTH, inputs.shape, np.float32)
            good = [j for j in range(len(batch)) if j not in bad]
            if bad:  # left out of the forward, as in the one-process path: the others' padding changes
                inputs = inputs.subset(good)
            feats = iter(upstream.run(inputs, precision) if good else [])
            # run has copied the inputs to the device (on a CPU: finished reading them): the slot is free
            layouts[k] = inputs = None
            if k + DEPTH < len(batches):
                read(k + DEPTH)

            slot = k % DEPTH
            for future in writes[slot]:  # the batch this slot held is written
                result(future, k - DEPTH)
            lo, hi = int(offsets[batch[0]]), int(offsets[batch[-1]] + lengths[batch[-1]])
            out = outs.view(slot, (hi - lo, L, D), out_dtype)
            parts = []
            for j, i in enumerate(batch):
                if j in bad:
                    skipped += 1
                    store.mark_skipped(ids[i], bad[j])
                    parts.append(torch.zeros(int(lengths[i]), L, D, dtype=precision, device=device))
                else:
                    parts.append(next(feats))
            if device.type == "cpu":
                torch.cat(parts, out=torch.from_numpy(out))
            else:  # one copy of the whole batch into the pinned slot
                torch.from_numpy(out).copy_(torch.cat(parts), non_blocking=True)
                cuda.synchronize(device)  # the helpers read the slot next: the copy must have landed
            del parts, feats

            whole = []
            for c in range(*chunk_span(lo, hi, F)):
                c0, c1 = c * F, min((c + 1) * F, total)
                if done[c]:
                    continue
                if lo <= c0 and c1 <= hi:
                    whole.append(c)
                else:  # under a batch edge: its part, copied out of the slot
                    a, b = max(lo, c0), min(hi, c1)
                    for c_, frames in edges.add(a, out[a - lo:b - lo]):
                        edge_writes.append((k, submit(k, _write_chunk, c_, frames)))
            writes[slot] = [submit(k, _write, slot, lo, hi - lo, out_dtype.str, [int(c) for c in group])
                            for group in np.array_split(whole, max(1, min(processes, len(whole)))) if len(group)]
            del out
            while edge_writes and edge_writes[0][1].done():
                result(edge_writes[0][1], edge_writes.popleft()[0])
            if on_batch is not None:
                on_batch(k)
        for slot, futures in enumerate(writes):
            for future in futures:
                result(future, len(batches) - 1)
        while edge_writes:
            result(edge_writes[0][1], edge_writes.popleft()[0])
        return skipped, edges.edges()


def slot_bytes(layouts: list, frames: list[int], frame_bytes: int) -> tuple[int, int]:
    """Bytes of one input slot and one output slot: the largest batch's inputs (float32) and features."""
    return (max((4 * math.prod(x.shape) for x in layouts), default=1),
            max((n * frame_bytes for n in frames), default=1))


class _Slots:
    """DEPTH shared-memory buffers of `nbytes` each; on a GPU registered as pinned memory for `device`'s copies."""

    def __init__(self, nbytes: int, device: torch.device):
        self.shm = []
        try:
            for _ in range(DEPTH):
                self.shm.append(SharedMemory(create=True, size=max(1, nbytes)))
                # reserve the pages now: a page of tmpfs first touched when /dev/shm is full (too small, or
                # filled by another process meanwhile) is a SIGBUS, no message; here it is ENOSPC
                os.posix_fallocate(self.shm[-1]._fd, 0, self.shm[-1].size)
        except OSError as e:
            for s in self.shm:
                s.close()
                s.unlink()
            if e.errno not in (errno.ENOSPC, errno.ENOMEM):
                raise
            free = shutil.disk_usage("/dev/shm").free / 2**20 if Path("/dev/shm").is_dir() else 0
            raise FusionpipeError(
                f"the pipeline needs {DEPTH * nbytes / 2**20:.0f} MB more of shared memory (/dev/shm), "
                f"{free:.0f} MB are free: give the container more (docker --shm-size), lower --max-seconds "
                "(smaller batches), or pass --processes 0 (no helper processes, no shared memory)") from None
        self.names = [s.name for s in self.shm]
        self.device, self.pinned = device, pin(self.shm, device)

    def view(self, i: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=self.shm[i].buf)

    def __enter__(self) -> _Slots:
        return self

    def __exit__(self, *exc) -> None:
        unpin(self.pinned, self.device)
        for s in self.shm:
            try:
                s.close()
            except BufferError:  # a view still alive (an error unwinding): the mapping goes with the process
                pass
            s.unlink()


def pin(buffers: list[SharedMemory], device: torch.device) -> list[int]:
    """Register `buffers` as pinned memory for copies to and from `device` (a GPU; nothing on a CPU): the
    addresses pinned. One that cannot be pinned is only slower (its copies go through CUDA's staging
    buffers): a warning, and the run goes on (`cuda.register_host` has taken CUDA's error)."""
    pinned = []
    if device.type != "cuda":
        return pinned
    for b in buffers:
        ptr = np.frombuffer(b.buf, np.uint8).ctypes.data
        why = cuda.register_host(ptr, b.size, device)
        if why is None:
            pinned.append(ptr)
        else:
            warnings.warn(f"extraction on {device}: a {b.size / 2**20:.0f} MB slot is not pinned ({why}); the "
                          "copies out of the GPU will be slower (a container's locked-memory limit? `ulimit -l`)",
                          stacklevel=2)
    return pinned


def unpin(pinned: list[int], device: torch.device) -> None:
    for ptr in pinned:
        why = cuda.unregister_host(ptr, device)
        if why is not None:  # the buffer is unmapped all the same; its pages go with the process
            warnings.warn(f"extraction on {device}: {why}", stacklevel=2)


@contextmanager
def _pool(n: int, context, initializer, initargs):
    pool = ProcessPoolExecutor(n, mp_context=context, initializer=initializer, initargs=initargs)
    try:
        yield pool
    except BaseException:  # the queued work is dropped; the tasks running finish before the store's lock goes
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=False)  # all done: the processes exit on their own (seconds of interpreter teardown)


@contextmanager
def _one_thread_per_child():
    """Children spawned meanwhile use one BLAS/OpenMP thread each: they are many, one per core."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- in the helper processes ------------------------------------------------------------
_state: dict = {}  # what the initializer gave this process


def die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent (pid `parent`) dies, however it dies (kill -9,
    SIGTERM, the OOM killer): an orphaned helper would hold its slots, keep the resource tracker (which
    unlinks the slots and semaphores once every process of the run is gone) alive, and keep a caller's
    stdout open. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op. The parent calls submit() from
    its main thread, so "the parent dies" is the thread that spawned us exiting, which is the process."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl: nothing would signal us
        os._exit(1)


def _ready() -> None:
    pass


def _init(parent: int, manifest: Manifest, front: FrontEnd, skip_bad: bool, ins: list[str], outs: list[str], url: str,
          ids: list[str], lengths: np.ndarray, dtype: str, model: str) -> None:
    die_with(parent)
    torch.set_num_threads(1)
    _state.update(manifest=manifest, front=front, skip_bad=skip_bad, ins=[SharedMemory(name=n) for n in ins],
                  outs=[SharedMemory(name=n) for n in outs], store=FeatureStore.open(url, mode="r+"), ids=ids,
                  offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), dtype=np.dtype(dtype),
                  model=model)


def _read(slot: int, k: int, rows: list[int], mine: list[int]) -> dict[int, str]:
    """Load the batch positions `mine` of batch `k` (manifest `rows`) into input slot `slot`; {position: why}
    for the bad ones (--skip-bad)."""
    m, front = _state["manifest"], _state["front"]
    try:
        inputs = front.rows([audio.target_num_samples(m[r]) for r in rows])
        values = np.ndarray(inputs.shape, np.float32, buffer=_state["ins"][slot].buf)
        bad = {}
        for j in mine:
            try:
                wave = audio.load(m, rows[j])
            except audio.BadAudio as e:
                if not _state["skip_bad"]:
                    raise FusionpipeError(f"{e} (or pass --skip-bad to record it and go on)") from None
                bad[j] = str(e)
                continue
            front.fill(inputs, j, wave, values)
        return bad
    except FusionpipeError:
        raise
    except Exception as e:
        raise FusionpipeError(f"reading batch {k} ({list_ids([m[rows[j]].id for j in mine])}): "
                              f"{type(e).__name__}: {e}") from None


def _write(slot: int, lo: int, n: int, dtype: str, chunks: list[int]) -> None:
    """Write `chunks`, whole inside output slot `slot`, which holds frames [lo, lo + n) in `dtype`."""
    store = _state["store"]
    frames = np.ndarray((n, store.num_layers, store.hidden_size), np.dtype(dtype), buffer=_state["outs"][slot].buf)
    F = store.chunk_frames
    for c in chunks:
        _write_chunk(c, frames[c * F - lo:min((c + 1) * F, store.total_frames) - lo])


def _write_chunk(c: int, x: np.ndarray) -> None:
    store = _state["store"]
    try:
        frames = _to_storage(x, _state["dtype"])
        if frames is None:
            raise _not_finite(c * store.chunk_frames, x)
        store.write_chunk(c, frames)
    except FusionpipeError:
        raise
    except Exception as e:
        start = c * store.chunk_frames
        raise FusionpipeError(f"writing chunk {c} ({list_ids(_utterances(start, start + len(x)))}): "
                              f"{type(e).__name__}: {e}") from None


def _to_storage(x: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """x cast to the storage dtype by torch (the rounding of run._to_storage), or None if it holds a NaN, an
    inf or a value the storage dtype cannot hold. One max over |x| decides (NaN propagates through max; float32
    rounds to float16's inf from 65520 up): a tenth of the cost of isfinite over the cast."""
    if x.dtype == np.float16:  # exponent bits all ones: inf or NaN
        return x if (x.view(np.uint16) & 0x7FFF).max(initial=0) < 0x7C00 else None
    limit = 65520.0 if dtype == np.float16 else np.inf
    if not np.abs(x).max(initial=0) < limit:
        return None
    return x if x.dtype == dtype else torch.from_numpy(x).to(getattr(torch, dtype.name)).numpy()


def _utterances(lo: int, hi: int) -> list[str]:
    offsets, ids = _state["offsets"], _state["ids"]
    first = int(np.searchsorted(offsets, lo, side="right")) - 1
    last = int(np.searchsorted(offsets, hi, side="left"))
    return ids[first:last]


def _not_finite(start: int, x: np.ndarray) -> FusionpipeError:
    """The error of run._to_storage, for the first utterance with a frame the storage dtype cannot hold."""
    finite = np.isfinite(x.astype(_state["dtype"])).reshape(len(x), -1).all(axis=1)
    f = int(np.flatnonzero(~finite)[0])
    utt = _utterances(start + f, start + f + 1)[0]
    offsets, i = _state["offsets"], _state["ids"].index(utt)
    mine = x[max(0, int(offsets[i]) - start):int(offsets[i + 1]) - start]
    model, dtype = _state["model"], _state["dtype"].name
    if np.isfinite(mine).all():
        return FusionpipeError(f"{model} on {utt}: activations exceed the {dtype} range (|x| max "
                               f"{np.abs(mine).max():.3g}); extract this model with --dtype float32")
    return FusionpipeError(f"{model} on {utt}: the upstream produced NaN/inf activations")
