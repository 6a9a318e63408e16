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

Same store. The plan, the batches and each chunk's frames are stage.extract_batches': the same utterances go
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
import signal
import sys
import warnings
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch

from fusionpipe import audio, cuda, shm
from fusionpipe.chunks import ChunkAssembler, Edge, chunk_span, starts
from fusionpipe.device import usable_cores
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.batching import ExtractionPlan
from fusionpipe.extract.cast import cast, unstorable
from fusionpipe.extract.front_end import FrontEnd
from fusionpipe.extract.upstreams import Upstream
from fusionpipe.manifest import Manifest
from fusionpipe.store import FeatureStore, list_ids

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
class ProcessPipeline:
    """stage.extract_batches with the reading and writing in `processes` helper processes; the same store bytes.

    `run` reads top to bottom: start the helpers, have the first DEPTH batches read, then per batch:
    wait for its reads, run the forward, have the batch DEPTH on read into the freed input slot, copy the
    features out into an output slot, hand its chunks to the helpers. A helper that dies breaks the pool;
    `_result` and `_submit` turn that into an error naming the batch in flight.
    """

    def __init__(self, manifest: Manifest, upstream: Upstream, store: FeatureStore, p: ExtractionPlan,
                 done: np.ndarray, skip_bad: bool, processes: int):
        self.manifest, self.upstream, self.store, self.p = manifest, upstream, store, p
        self.done, self.skip_bad, self.processes = done, skip_bad, processes
        self.precision = getattr(torch, store.info.compute_dtype)
        self.out_dtype = np.dtype(store.info.compute_dtype)
        self.edges = ChunkAssembler(store.total_frames, store.chunk_frames, skip=done)
        self.skipped = 0

    def run(self, batches: list[list[int]], on_batch=None) -> tuple[int, list[Edge]]:
        """Run `batches` (runs of p.batches, in order); (utterances skipped, the edges left part-filled)."""
        self.batches = batches
        front: FrontEnd = self.upstream.front_end
        self.inputs = [front.rows([audio.target_num_samples(self.manifest[self.p.rows[i]]) for i in b])
                       for b in batches]
        frames = [int(self.p.layout.lengths[b].sum()) for b in batches]
        frame_bytes = self.store.num_layers * self.store.hidden_size * self.out_dtype.itemsize
        in_bytes, out_bytes = slot_bytes(self.inputs, frames, frame_bytes)
        self.reads: dict[int, list[Future]] = {}  # per batch: its read tasks
        self.writes: list[list[Future]] = [[] for _ in range(DEPTH)]  # per output slot: its batch's writes
        self.edge_writes: deque[tuple[int, Future]] = deque()
        with ExitStack() as stack:
            self.ins = stack.enter_context(_Slots(in_bytes, self.upstream.device))
            self.outs = stack.enter_context(_Slots(out_bytes, self.upstream.device))
            stack.enter_context(self._start_helpers())
            for k in range(min(DEPTH, len(batches))):
                self._read(k)
            for k in range(len(batches)):
                bad = self._wait_for_reads(k)
                feats = self._forward(k, bad)
                if k + DEPTH < len(batches):
                    self._read(k + DEPTH)
                self._write(k, self._copy_out(k, bad, feats))
                if on_batch is not None:
                    on_batch(k)
            self._wait_for_writes()
        return self.skipped, self.edges.edges()

    @contextmanager
    def _start_helpers(self):
        """The pool, every process started now (the pool spawns them on demand: one would start, importing
        torch, only once the first batch is done, and hold up the second): `self.helpers` while it runs."""
        spawn = multiprocessing.get_context("spawn")  # fork would copy torch's threads and the model
        with _one_thread_per_child(), _pool(self.processes, spawn, _init, (
                os.getpid(), self.manifest, self.upstream.front_end, self.skip_bad, self.ins.names, self.outs.names,
                self.store.url, self.p.layout.ids, self.p.layout.lengths, self.store.info.dtype,
                self.upstream.name)) as helpers:
            self.helpers = helpers
            for future in [self._submit(0, _ready) for _ in range(self.processes)]:
                self._result(future, 0)
            yield

    def _read(self, k: int) -> None:
        """Batch k's utterances dealt out to the helpers, read into input slot k % DEPTH."""
        rows = [self.p.rows[i] for i in self.batches[k]]
        groups = [list(range(r, len(rows), self.processes)) for r in range(self.processes)]
        self.reads[k] = [self._submit(k, _read, k % DEPTH, k, rows, g) for g in groups if g]

    def _wait_for_reads(self, k: int) -> dict[int, str]:
        """{position in batch k: why} of its bad audio (--skip-bad), once all of it is read."""
        bad: dict[int, str] = {}
        for future in self.reads.pop(k):
            bad.update(self._result(future, k))
        return bad

    def _forward(self, k: int, bad: dict[int, str]):
        """The features of batch k's good utterances, in order. Bad audio is left out of the forward, as in the
        one-process path (the others' padding changes)."""
        inputs = self.inputs[k]
        inputs.values = self.ins.view(k % DEPTH, inputs.shape, np.float32)
        good = [j for j in range(len(self.batches[k])) if j not in bad]
        if bad:
            inputs = inputs.subset(good)
        feats = iter(self.upstream.run(inputs, self.precision) if good else [])
        self.inputs[k] = None  # run has copied the inputs to the device (a CPU has read them): the slot is free
        return feats

    def _copy_out(self, k: int, bad: dict[int, str], feats) -> tuple[int, int]:
        """Batch k's features (zeros for bad audio, recorded as skipped) into output slot k % DEPTH, once the
        batch that slot held is written; the frames [lo, hi) it now holds."""
        batch, layout, slot = self.batches[k], self.p.layout, k % DEPTH
        for future in self.writes[slot]:
            self._result(future, k - DEPTH)
        lo, hi = int(layout.offsets[batch[0]]), int(layout.offsets[batch[-1]] + layout.lengths[batch[-1]])
        out = torch.from_numpy(self._slot(slot, lo, hi))
        L, D, device = self.store.num_layers, self.store.hidden_size, self.upstream.device
        parts = []
        for j, i in enumerate(batch):
            if j in bad:
                self.skipped += 1
                self.store.mark_skipped(layout.ids[i], bad[j])
                parts.append(torch.zeros(int(layout.lengths[i]), L, D, dtype=self.precision, device=device))
            else:
                parts.append(next(feats))
        if device.type == "cpu":
            torch.cat(parts, out=out)
        else:  # one copy of the whole batch into the pinned slot
            out.copy_(torch.cat(parts), non_blocking=True)
            cuda.synchronize(device)  # the helpers read the slot next: the copy must have landed
        return lo, hi

    def _write(self, k: int, frames: tuple[int, int]) -> None:
        """Batch k's chunks not on disk: those inside its frames written by the helpers straight from its
        slot, those under its edges put together here from their parts (a few MB) and handed over whole."""
        lo, hi = frames
        F, total, slot = self.store.chunk_frames, self.store.total_frames, k % DEPTH
        whole = []
        for c in range(*chunk_span(lo, hi, F)):
            c0, c1 = c * F, min((c + 1) * F, total)
            if self.done[c]:
                continue
            if lo <= c0 and c1 <= hi:
                whole.append(c)
            else:
                a, b = max(lo, c0), min(hi, c1)
                for c_, part in self.edges.add(a, self._slot(slot, lo, hi)[a - lo:b - lo]):
                    self.edge_writes.append((k, self._submit(k, _write_chunk, c_, part)))
        self.writes[slot] = [self._submit(k, _write, slot, lo, hi - lo, self.out_dtype.str, [int(c) for c in group])
                             for group in np.array_split(whole, max(1, min(self.processes, len(whole))))
                             if len(group)]
        while self.edge_writes and self.edge_writes[0][1].done():
            self._result(self.edge_writes[0][1], self.edge_writes.popleft()[0])

    def _wait_for_writes(self) -> None:
        for futures in self.writes:
            for future in futures:
                self._result(future, len(self.batches) - 1)
        while self.edge_writes:
            self._result(self.edge_writes[0][1], self.edge_writes.popleft()[0])

    def _slot(self, slot: int, lo: int, hi: int) -> np.ndarray:
        """Output slot `slot` as frames [lo, hi): (hi - lo, L, D) in the compute dtype."""
        return self.outs.view(slot, (hi - lo, self.store.num_layers, self.store.hidden_size), self.out_dtype)

    def _submit(self, k: int, fn, *args) -> Future:
        try:
            return self.helpers.submit(fn, *args)
        except BrokenProcessPool:  # seen here first when the death came between two batches
            raise self._died(k) from None

    def _result(self, future: Future, k: int):
        try:
            return future.result()
        except BrokenProcessPool:
            raise self._died(k) from None

    def _died(self, k: int) -> FusionpipeError:
        k = max(k, 0)
        return FusionpipeError(
            f"{self.store}: a helper process died (killed, or out of memory?) with batch {k} "
            f"({list_ids([self.p.layout.ids[i] for i in self.batches[k]])}) in flight; rerun the same command: it "
            "resumes from the chunks on disk. (Called from a script? Spawned processes import it again: its code "
            "must be under `if __name__ == '__main__':`.)")


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
            raise FusionpipeError(
                f"the pipeline needs {DEPTH * nbytes / 2**20:.0f} MB more of shared memory (/dev/shm), "
                f"{shm.free_bytes() / 2**20:.0f} MB are free: {shm.MORE}, lower --max-seconds "
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
                  offsets=np.append(starts(lengths), np.sum(lengths)), dtype=np.dtype(dtype),
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
    """x cast to the storage dtype (`cast.cast`, the one-process path's rounding), or None if it holds a NaN, an
    inf or a value the storage dtype cannot hold. One max over |x| decides (NaN propagates through max; float32
    rounds to float16's inf from 65520 up): a tenth of the cost of isfinite over the cast."""
    if x.dtype == np.float16:  # exponent bits all ones: inf or NaN
        return x if (x.view(np.uint16) & 0x7FFF).max(initial=0) < 0x7C00 else None
    limit = 65520.0 if dtype == np.float16 else np.inf
    if not np.abs(x).max(initial=0) < limit:
        return None
    return x if x.dtype == dtype else cast(torch.from_numpy(x), dtype.name).numpy()


def _utterances(lo: int, hi: int) -> list[str]:
    offsets, ids = _state["offsets"], _state["ids"]
    first = int(np.searchsorted(offsets, lo, side="right")) - 1
    last = int(np.searchsorted(offsets, hi, side="left"))
    return ids[first:last]


def _not_finite(start: int, x: np.ndarray) -> FusionpipeError:
    """`cast.unstorable` for the first utterance with a frame the storage dtype cannot hold."""
    finite = np.isfinite(x.astype(_state["dtype"])).reshape(len(x), -1).all(axis=1)
    f = int(np.flatnonzero(~finite)[0])
    utt = _utterances(start + f, start + f + 1)[0]
    offsets, i = _state["offsets"], _state["ids"].index(utt)
    mine = x[max(0, int(offsets[i]) - start):int(offsets[i + 1]) - start]
    return unstorable(_state["model"], utt, _state["dtype"].name, mine)
