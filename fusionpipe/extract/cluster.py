"""STAGE 1 on a Dask cluster: the same store as `fusionpipe extract`, filled by many workers.

    client  plan (header checks, layout, batches) -> create the store -> cut work units
    worker  load the upstream once per process -> run a unit's batches -> write the chunks it owns
    client  aggregate progress; write the chunks two units share, from the edges the units return

Work units are runs of consecutive batches of the single-process plan, so every utterance is
computed in the same batch as `extract` computes it, and the store is the same bytes (on the same
kind of device with the same torch thread count: CPU kernels sum in a thread-count dependent order).

Chunk ownership. A chunk inside one unit's frames is written by that unit's worker. Unit edges
are utterance edges, which rarely fall on chunk edges, so the chunk under an edge is shared: each
of the two units returns its part (a few MB at most) and the client writes the chunk once both
are in. No two writers ever share a chunk, and a chunk on disk is still whole and still the
done flag.

Failures. A unit that raises is retried (`retries`); the units of a lost worker (killed, out of
memory, preempted) are rescheduled by the Dask scheduler, up to its
`distributed.scheduler.allowed-failures`. A retried unit rewrites the same bytes into any chunk
it had already written. If the client itself dies, rerunning the command resumes from the chunks
on disk, as `extract` does.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from distributed import Client, LocalCluster, as_completed, get_worker

from fusionpipe import cuda
from fusionpipe.chunks import ChunkAssembler, chunk_span
from fusionpipe.codecs import DEFAULT_CODEC
from fusionpipe.device import usable_cores
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.defaults import DTYPE, MAX_SECONDS
from fusionpipe.extract.batching import ExtractionPlan
from fusionpipe.extract.stage import (Result, check_settings, extract_batches, needed, open_store, progress_bar,
                                     store_url)
from fusionpipe.extract.upstreams import Upstream, load_upstream
from fusionpipe.manifest import Manifest
from fusionpipe.store import FeatureStore
from fusionpipe.store_lock import lock

UNIT_SECONDS = 1800.0  # audio per work unit: ~3 s of an H100, ~15 min of a CPU core on a base model


@dataclass
class Unit:
    """A run of consecutive batches of a plan: one Dask task."""

    batches: list[list[int]]  # positions in store order, only the batches still needed
    seconds: float            # their audio
    chunks: tuple[int, int]   # [lo, hi): the chunks its utterances touch (the first and last may be shared)


def work_units(manifest: Manifest, p: ExtractionPlan, done: np.ndarray, chunk_frames: int,
               unit_seconds: float = UNIT_SECONDS) -> list[Unit]:
    """Cut the plan's batches into units of about `unit_seconds` of audio; leave out the batches done already."""
    units, current, seconds = [], [], 0.0

    def close():
        first, last = current[0][0], current[-1][-1]
        span = chunk_span(p.layout.offsets[first], p.layout.offsets[last] + p.layout.lengths[last], chunk_frames)
        units.append(Unit(list(current), seconds, (int(span[0]), int(span[1]))))

    for batch in p.batches:
        if not needed(batch, p.layout, done, chunk_frames):
            continue
        current.append(batch)
        seconds += sum(manifest[p.rows[i]].duration for i in batch)
        if seconds >= unit_seconds:
            close()
            current, seconds = [], 0.0
    if current:
        close()
    return units


def extract_on_cluster(manifest: Manifest, model: str, client, cache: str = "cache", *, url: str | None = None,
                       device: str = "auto", dtype: str = DTYPE, codec: str = DEFAULT_CODEC,
                       max_seconds: float = MAX_SECONDS, skip_bad: bool = False, overwrite: bool = False,
                       chunk_frames: int | None = None, unit_seconds: float = UNIT_SECONDS,
                       threads: int | None = None, progress: bool = True, wait: bool = False) -> Result:
    """`extract` with the upstream run by the workers of a dask.distributed `client`.

    `model` is a name the workers can load (alias, HF id, or a directory they can all read); the
    manifest's audio and the cache must be reachable from every worker (a shared filesystem or an
    object store). `threads`: torch CPU threads per worker (None: leave the worker's setting).
    """
    check_settings(dtype=dtype, codec=codec, max_seconds=max_seconds)
    # planning needs the frame arithmetic and the fingerprint, not the accelerator
    upstream = load_upstream(model, device="cpu")
    url = url or store_url(cache, manifest.name, upstream.name)
    if url.startswith("memory://"):
        raise FusionpipeError(f"{url}: a memory:// store lives in one process, the workers cannot reach it; "
                              "give --cache a directory they share or an object store URL")
    # the workers' GPUs decide, not the client's: a laptop may drive a GPU cluster through --scheduler
    workers = _worker_info(client)
    kind = cluster_device(device, {a: w.gpus for a, w in workers.items()})
    with lock(url, wait):  # the client holds it for its workers
        opened = open_store(manifest, upstream, url, device_type=torch.device(kind).type, dtype=dtype,
                            codec=codec, max_seconds=max_seconds, skip_bad=skip_bad, overwrite=overwrite,
                            chunk_frames=chunk_frames)
        if isinstance(opened, Result):
            return opened
        store, p = opened
        name = upstream.name
        del upstream, opened  # the workers load their own
        return _run_units(manifest, model, client, store, p, name, devices=assign_devices(kind, workers), kind=kind,
                          skip_bad=skip_bad, unit_seconds=unit_seconds, threads=threads, progress=progress)


# ---- which device each worker uses: pure functions of what the workers see ------------------------
@dataclass(frozen=True)
class Worker:
    """What the client knows of a worker: its Dask name (LocalCluster: 0..n-1; `dask worker`: its address or
    --name), its host and the GPUs it sees."""

    name: object
    host: str
    gpus: int


def cluster_device(device: str, gpus: dict[str, int]) -> str:
    """The device every worker runs on, from --device and the GPUs each worker (by address) sees: "cpu",
    "cuda" (each worker one of its host's GPUs, `assign_devices`) or "cuda:N" (that GPU on every worker).

    One store holds features of one kind of device (the store records it and a resume checks it), so
    under "auto" either every worker has a GPU or none is used.
    """
    try:
        asked = torch.device(device) if device != "auto" else None
    except RuntimeError:
        raise FusionpipeError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    without = sorted(a for a, n in gpus.items() if n == 0)
    if asked is not None and asked.type == "cpu":
        return "cpu"
    if asked is None:
        if len(without) == len(gpus):
            return "cpu"
        if without:
            raise FusionpipeError(f"--device auto: workers {', '.join(without)} see no GPU and the others do; one "
                                  "store is computed on one kind of device: give --device cpu, or run the "
                                  "workers without a GPU elsewhere")
        return "cuda"
    if asked.type != "cuda":
        raise FusionpipeError(f"--device {device}: the cluster path runs on cpu or cuda; use auto, cpu, cuda or "
                              "cuda:N")
    if without:
        raise FusionpipeError(f"--device {device}: workers {', '.join(without)} see no GPU (CUDA_VISIBLE_DEVICES, "
                              "or no driver where they run); give --device cpu or start them on GPU machines")
    if asked.index is not None:
        short = sorted(a for a, n in gpus.items() if n <= asked.index)
        if short:
            raise FusionpipeError(f"--device {device}: workers {', '.join(short)} see fewer than "
                                  f"{asked.index + 1} GPUs; give --device cuda to spread the workers over theirs")
    return str(asked)


def assign_devices(kind: str, workers: dict[str, Worker]) -> dict[str, str]:
    """Worker address -> its device. "cuda": round robin over each worker's GPUs, worker i of a LocalCluster
    (named 0..n-1) on GPU i % gpus, and the workers named otherwise (`dask worker`) by their place among the
    addresses of such workers on the same host; "cpu" and "cuda:N" are the same for all."""
    if kind != "cuda":
        return {a: kind for a in workers}
    named = {}  # host -> addresses of its workers without a number for a name, in order
    for a in sorted(workers):
        if not isinstance(workers[a].name, int):
            named.setdefault(workers[a].host, []).append(a)
    devices = {}
    for a, w in workers.items():
        if not w.gpus:  # cluster_device refuses these up front; this is a worker that joined later
            raise FusionpipeError(f"worker {a} sees no GPU and the run computes on cuda; start it on a GPU "
                                  "machine, or rerun with --device cpu")
        i = w.name if isinstance(w.name, int) else named[w.host].index(a)
        devices[a] = f"cuda:{i % w.gpus}"
    return devices


def _worker_info(client) -> dict[str, Worker]:
    gpus = client.run(_visible_gpus)  # address -> GPUs that worker process sees
    info = client.scheduler_info(n_workers=-1)["workers"]
    return {a: Worker(w.get("name"), w.get("host", a), gpus.get(a, 0)) for a, w in info.items() if a in gpus}


def _run_units(manifest: Manifest, model: str, client, store: FeatureStore, p: ExtractionPlan, name: str, *,
               devices: dict[str, str], kind: str, skip_bad: bool, unit_seconds: float, threads: int | None,
               progress: bool) -> Result:
    url = store.url
    t0 = time.perf_counter()
    done = store.done_chunks()
    units = work_units(manifest, p, done, store.chunk_frames, unit_seconds)
    shared = ChunkAssembler(store.total_frames, store.chunk_frames)  # the chunks under unit edges
    bar = progress_bar(sum(u.seconds for u in units), f"extract {name} on {_workers(client)} worker(s)", progress)
    skipped = 0
    manifest_f, plan_f, done_f = client.scatter([manifest, p, done], broadcast=True)  # sent once per worker
    futures = {client.submit(_run_unit, manifest_f, plan_f, done_f, u.batches, url, model, devices, kind, threads,
                             skip_bad, retries=2, pure=False): u for u in units}
    try:
        for future in as_completed(futures):
            n_skipped, edges = future.result()  # a unit's own error is raised here, after its retries
            skipped += n_skipped
            for _, lo, _, frames in edges:
                for c, whole in shared.add(lo, frames):
                    store.write_chunk(c, whole)
            bar.update(futures[future].seconds)
    except BaseException:
        client.cancel(list(futures))
        raise
    finally:
        bar.close()
    if shared.pending:
        raise FusionpipeError(f"{url}: chunks {sorted(shared.pending)} were never completed; rerun to resume")
    store.remove_stray()  # .partial files of workers killed mid-write (their units were rerun)
    return Result(url, sum(u.seconds for u in units), time.perf_counter() - t0, len(store), skipped + len(p.skipped))


def _workers(client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


# ---- on the workers --------------------------------------------------------------------------------
def _visible_gpus() -> int:
    return cuda.device_count()  # looked up in the worker's own fusionpipe.cuda (client.run pickles by name)


_loaded: dict[tuple[str, str], Upstream] = {}  # the one upstream this worker process holds
_loading = threading.Lock()


def _run_unit(manifest: Manifest, p: ExtractionPlan, done: np.ndarray, batches: list[list[int]], url: str, model: str,
              devices: dict[str, str], kind: str, threads: int | None, skip_bad: bool):
    if threads:
        torch.set_num_threads(threads)
    worker = get_worker()
    device = devices.get(worker.address)
    if device is None:  # joined (or was restarted under a new address) after the client assigned the devices
        device = assign_devices(kind, {worker.address: Worker(worker.name, "", cuda.device_count())})[worker.address]
    upstream = _upstream(model, device)
    store = FeatureStore.open(url, mode="r+")  # per unit: a long-lived worker must not keep a stale index
    # a copy: the writer marks chunks done as it goes, and a retry on this worker must not trust those marks
    return extract_batches(manifest, upstream, store, p, batches, done.copy(), skip_bad)


def _upstream(model: str, device: str) -> Upstream:
    """Load the upstream once per worker process, on `device`."""
    key = (model, device)
    with _loading:
        if key not in _loaded:
            _loaded.clear()  # one model per process: drop the previous one (and its GPU memory) first
            if torch.device(device).type == "cuda":
                cuda.empty_cache()
            _loaded[key] = load_upstream(model, device=device)
        return _loaded[key]


# ---- the cluster -----------------------------------------------------------------------------------
def check_scheduler(address: str) -> None:
    """Refuse a --scheduler that is not a Dask address (protocol://host:port) before trying to reach it."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        _, location = parse_address(address)
        parse_host_port(location)
    except ValueError as e:
        raise FusionpipeError(f"--scheduler {address!r} is not a Dask scheduler address ({e}); give "
                              "tcp://HOST:PORT, as `dask scheduler` prints it") from None


@contextmanager
def connect(cluster: str | None = None, workers: int | None = None, scheduler: str | None = None):
    """A dask.distributed Client: on a LocalCluster of `workers` processes, or on the scheduler at `scheduler`.

    Yields (client, threads): torch CPU threads per worker for a local CPU cluster (the cores shared
    out), else None. LocalCluster's one GPU per worker comes from `assign_devices`.
    """
    if (cluster is None) == (scheduler is None):
        raise FusionpipeError("give exactly one of --cluster local (with --workers N) or --scheduler tcp://HOST:PORT")
    if scheduler is not None:
        check_scheduler(scheduler)
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as e:
            raise FusionpipeError(f"cannot reach the Dask scheduler at {scheduler} ({e}); start one with "
                                  "`dask scheduler` and workers with `dask worker ADDRESS`") from None
        with client:
            yield client, None
        return
    if cluster != "local":
        raise FusionpipeError(f"--cluster {cluster!r}: only 'local' is built in; for other clusters start a Dask "
                              "scheduler and workers and pass --scheduler")
    if workers is not None and workers < 1:
        raise FusionpipeError(f"--workers {workers}: give at least 1 worker process, or leave it out for one per GPU "
                              "(or 1 on a CPU)")
    gpus = cuda.device_count()
    workers = workers or gpus or 1
    # CPU: the cores shared out, one unit at a time. GPU: two units in flight per worker, so one
    # unit's decoding and writing overlap the other's forward passes (Upstream.forward is serialised)
    threads = None if gpus else max(1, usable_cores() // workers)
    with LocalCluster(n_workers=workers, threads_per_worker=2 if gpus else 1, processes=True,
                      dashboard_address=None, silence_logs=logging.ERROR) as lc, Client(lc) as client:
        yield client, threads
