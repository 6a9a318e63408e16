"""Stage 1 benchmark: the pipeline's own ceiling, does writing overlap compute, what does each codec cost?

    python bench/extract.py                       # base-size random-weight WavLM, ~3 min of the demo corpus, CPU
    python bench/extract.py --kind whisper --device cuda --seconds 600
    python bench/extract.py --model /path/to/real_whisper_base   # real activations (shared/tools/real_whisper_base.py)
    python bench/extract.py --only-null --null-seconds 3600       # (a)-(c) only

Prints, measured side by side in one run:
  (a) stage costs  per audio-second on one core, for a null upstream of a real shape (NullUpstream: features
                   at memory speed): decode, front end (Whisper's log-mel), the main process's copy, cast +
                   finiteness check, compress (codec + crc32c), write
  (b) ideal        the throughput those costs allow on this machine's cores, all busy
  (c) reached      what extraction reaches with the null upstream: the pipeline (--processes, default the
                   GPU default for this machine) and the one-process path; reached / ideal (goal >= 0.8),
                   after start-up (spawning and importing) and with it, and peak host memory (PSS of this
                   process and its children, sampled) beside the pipeline's shared-memory slots
  (d) extract / bare  wall time of `extract()` over the batches of its plan divided by the bare
                   upstream forward (+ device->host copy) over the same batches, audio preloaded;
                   one-process path and pipeline
  codecs           bytes per audio-second and write MB/s for each codec on the same features
  checksum         what the crc32c every chunk carries costs: per core (zstd alone vs zstd + crc32c
                   on the same chunks) and in whole-store writes and reads with and without it
  peak RSS         of this process
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import threadpoolctl  # with scikit-learn

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionpipe import audio  # noqa: E402
from fusionpipe.extract import pipeline  # noqa: E402
from fusionpipe.extract.batching import plan  # noqa: E402
from fusionpipe.extract.stage import compute_dtype, extract, extract_batches, open_store  # noqa: E402
from fusionpipe.manifest import Manifest, bundled_manifests  # noqa: E402
from fusionpipe.codecs import CODECS, checksum  # noqa: E402
from fusionpipe.store import FeatureStore  # noqa: E402
from fusionpipe.store_lock import lock  # noqa: E402
from fusionpipe.extract.null_upstream import NullUpstream  # noqa: E402
from fusionpipe.extract.toys import make_local_model  # noqa: E402
from fusionpipe.extract.upstreams import load_upstream  # noqa: E402


def corpus(seconds: float) -> Manifest:
    """`seconds` of the bundled corpus, cycled through again (with new ids) when it has less."""
    pool = [u for m in bundled_manifests() for u in m]
    rows, total = [], 0.0
    while total < seconds:
        u = pool[len(rows) % len(pool)]
        rows.append(dataclasses.replace(u, id=f"{u.id}-{len(rows) // len(pool)}"))
        total += u.duration
    return Manifest(f"bench-{int(seconds)}s", bundled_manifests()[0].root, rows)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="wavlm", help="family of the random-weight model (make_local_model)")
    ap.add_argument("--size", default="base")
    ap.add_argument("--model", help="use this alias/directory instead of a random-weight model")
    ap.add_argument("--seconds", type=float, default=180.0, help="audio for the real upstream (d)")
    ap.add_argument("--null-seconds", type=float, default=1800.0, help="audio for the null upstream (a)-(c)")
    ap.add_argument("--like", default=None, help="null upstream shape: base or whisper-base (default: from --kind)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-seconds", type=float, default=160.0)
    ap.add_argument("--processes", type=int, default=None, help="pipeline processes (default: the GPU default here)")
    ap.add_argument("--only-null", action="store_true", help="(a)-(c) only")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    threads = torch.get_num_threads()
    try:
        processes = args.processes or pipeline.default_processes("cuda")  # the GPU default, on any machine
        like = args.like or ("whisper-base" if args.kind == "whisper" else "base")
        null_bench(corpus(args.null_seconds), NullUpstream(like, args.device), processes, args.max_seconds, tmp)
        assert torch.get_num_threads() == threads, "the stage costs must leave torch's threads as they were"
        if not args.only_null:
            real_bench(args, processes, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def null_bench(m: Manifest, up: NullUpstream, processes: int, max_seconds: float, tmp: Path) -> None:
    """(a)-(c): the pipeline's own costs and ceiling, with features at memory speed."""
    cores = os.cpu_count() or 1
    print(f"null upstream {up.name} (L={up.num_layers} D={up.hidden_size}) on {up.device}; {len(m)} utterances, "
          f"{m.duration:.0f} s audio; {cores} cores, load average {os.getloadavg()[0]:.1f} (other jobs take cores "
          "from the ideal)")
    costs = stage_costs(m, up, max_seconds, tmp)
    total = sum(costs.values())
    print("\n(a) one core, ms per audio-second: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in costs.items())
          + f"; sum {total * 1e3:.3f}")
    ideal = cores / total
    print(f"(b) ideal on {cores} cores: {ideal:.0f} audio-s/s ({ideal:.0f}x real time)")
    print("(c) reached with the null upstream (audio-s/s; steady: after the first batch, i.e. without start-up):")
    for name, n in (("one-process path", 0), *((f"pipeline, {n} helper processes", n)
                                                  for n in sorted({processes, cores}))):
        r = null_run(m, up, n, max_seconds, tmp)
        print(f"    {name:<32} steady {r['steady']:>7.0f} ({r['steady'] / ideal:.2f} of ideal)   with start-up "
              f"{r['whole']:>7.0f} ({r['whole'] / ideal:.2f})   peak PSS {r['peak_mb']:.0f} MB" +
              (f" (slots {r['slots_mb']:.0f} MB)" if n else ""))


def stage_costs(m: Manifest, up: NullUpstream, max_seconds: float, tmp: Path) -> dict[str, float]:
    """Seconds per audio-second of each stage, one core, over the whole manifest."""
    threads = torch.get_num_threads()
    # numpy's BLAS too (the log-mel's filter bank is a matmul): one core, as in each helper process
    limit = threadpoolctl.threadpool_limits(1, user_api="blas")
    torch.set_num_threads(1)
    p = plan(m, up, max_seconds)
    dtype = compute_dtype("float16", up.device.type)
    t = {}
    t0 = time.perf_counter()
    waves = [audio.load(m, r) for r in p.rows]
    t["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared = [up.front_end.prepare([waves[i] for i in b]) for b in p.batches]
    t["front end"] = time.perf_counter() - t0
    del waves
    store = FeatureStore.create(tmp / "stages.zarr", p.layout, num_layers=up.num_layers, hidden_size=up.hidden_size,
                                attrs={"upstream": up.fingerprint()})
    F, L, D = store.chunk_frames, up.num_layers, up.hidden_size
    slot = torch.empty(max(int(p.layout.lengths[b].sum()) for b in p.batches), L, D, dtype=getattr(torch, dtype))
    t["copy (main)"] = 0.0
    chunks = []
    for b, inputs in zip(p.batches, prepared):  # the null forward and the copy into the slot, as the main does
        t0 = time.perf_counter()
        feats = up.run(inputs, getattr(torch, dtype))
        n = sum(len(f) for f in feats)
        torch.cat(feats, out=slot[:n])
        if up.device.type == "cuda":
            torch.cuda.synchronize()
        t["copy (main)"] += time.perf_counter() - t0
        chunks += [slot[i:i + F].numpy().copy() for i in range(0, n, F)][:max(1, 64 // len(p.batches))]
    # cast + check, compress, write: on the chunks kept, scaled to the whole store by frames
    scale = store.total_frames / sum(len(c) for c in chunks)  # the last chunk of a batch may be short
    t0 = time.perf_counter()
    cast = []
    for c in chunks:  # as the helpers do
        cast.append(pipeline._to_storage(c, np.dtype(np.float16)))
    t["cast + check"] = (time.perf_counter() - t0) * scale
    import google_crc32c
    import numcodecs

    zstd = numcodecs.Zstd(level=3)  # the default codec, then the checksum every chunk ends in
    t0 = time.perf_counter()
    for c in cast:
        google_crc32c.value(zstd.encode(c))
    t["compress"] = (time.perf_counter() - t0) * scale
    t0 = time.perf_counter()
    for k, c in enumerate(cast):
        store.write_chunk(k, c)
    t["write"] = max(0.0, (time.perf_counter() - t0) * scale - t["compress"])
    limit.restore_original_limits()
    torch.set_num_threads(threads)
    return {k: v / m.duration for k, v in t.items()}


def null_run(m: Manifest, up: NullUpstream, processes: int, max_seconds: float, tmp: Path) -> dict:
    """One extraction of the null upstream into a fresh store: throughput with and without start-up, peak RSS."""
    url = str(tmp / f"null-{processes}-{time.time_ns()}.zarr")
    with lock(url):
        store, p = open_store(m, up, url, device_type=up.device.type, dtype="float16", codec="zstd",
                              max_seconds=max_seconds, skip_bad=False, overwrite=False, chunk_frames=None)
        seconds = [sum(m[p.rows[i]].duration for i in b) for b in p.batches]
        stamps = []
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            if processes:
                pipeline.ProcessPipeline(m, up, store, p, store.done_chunks(), False, processes).run(
                    p.batches, on_batch=lambda k: stamps.append(time.perf_counter()))
            else:
                extract_batches(m, up, store, p, p.batches, store.done_chunks(), False,
                                on_batch=lambda k: stamps.append(time.perf_counter()))
            t1 = time.perf_counter()
    assert store.is_complete()
    frame_bytes = up.num_layers * up.hidden_size * np.dtype(compute_dtype("float16", up.device.type)).itemsize
    layouts = [up.front_end.rows([audio.target_num_samples(m[p.rows[i]]) for i in b]) for b in p.batches]
    slots = sum(pipeline.slot_bytes(layouts, [int(p.layout.lengths[b].sum()) for b in p.batches], frame_bytes))
    shutil.rmtree(url, ignore_errors=True)
    return {"whole": sum(seconds) / (t1 - t0), "steady": sum(seconds[1:]) / (t1 - stamps[0]),
            "peak_mb": peak.mb, "slots_mb": pipeline.DEPTH * slots / 2**20}


class PeakRSS:
    """Peak of the summed PSS of this process and its children, sampled every 0.5 s (PSS, not RSS: the
    shared-memory slots are mapped by every process and would be counted once per process)."""

    def __enter__(self):
        self.mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        me = psutil.Process()
        while not self._stop.wait(0.5):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    pass
            self.mb = max(self.mb, total / 2**20)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def real_bench(args, processes: int, tmp: Path) -> None:
    """(d) and the codec tables: a real base-size upstream, extract / bare forward."""
    model = args.model or str(make_local_model(args.kind, tmp / f"{args.kind}-{args.size}", size=args.size))
    upstream = load_upstream(model, device=args.device)
    m = corpus(args.seconds)
    print(f"\nupstream {upstream.name} L={upstream.num_layers} D={upstream.hidden_size} on {upstream.device}; "
          f"{len(m)} utterances, {m.duration:.0f} s audio; torch threads {torch.get_num_threads()}")

    p = plan(m, upstream, args.max_seconds)
    waves = {i: audio.load(m, r) for i, r in enumerate(p.rows)}
    upstream.forward([waves[0]])  # warm-up (kernels, allocator)
    sync(upstream.device)

    def bare() -> float:
        t0 = time.perf_counter()
        for b in p.batches:
            for f in upstream.forward([waves[i] for i in b]):
                f.to(torch.float16).cpu()
        sync(upstream.device)
        return time.perf_counter() - t0

    def full(n: int) -> tuple[float, str]:
        t0 = time.perf_counter()
        r = extract(m, upstream, url=str(tmp / f"store-{n}-{time.time_ns()}.zarr"), max_seconds=args.max_seconds,
                    progress=False, processes=n)
        return time.perf_counter() - t0, r.url

    # alternate the measurements so drift on a noisy machine hits all alike
    t_bare, t_one, t_many = [], [], []
    for _ in range(2):
        t_bare.append(bare())
        t, url = full(0)
        t_one.append(t)
        t_many.append(full(processes)[0])
    t_bare, t_one, t_many = min(t_bare), min(t_one), min(t_many)
    print(f"bare forward {t_bare:.2f} s ({m.duration / t_bare:.0f}x real time), extract: one-process path "
          f"{t_one:.2f} s, pipeline ({processes} processes) {t_many:.2f} s")
    print(f"(d) extract / bare = {t_one / t_bare:.3f} one-process path, {t_many / t_bare:.3f} pipeline   (goal <= 1.1; "
          "includes audio decode, header checks and, for the pipeline, spawning its processes)")
    waves.clear()

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process after extraction {peak:.0f} MB (model, preloaded audio, batch buffers)")

    feats = FeatureStore.open(url).hidden[:]
    raw = feats.nbytes
    print(f"\n{'codec':<24} {'bytes/audio-s':>14} {'ratio':>6} {'write MB/s':>11} {'read MB/s':>10}")
    for codec in CODECS:
        store = FeatureStore.open(url)
        dst = FeatureStore.create(tmp / f"codec-{codec}.zarr",
                                  _layout(store), num_layers=store.num_layers, hidden_size=store.hidden_size,
                                  codec=codec, attrs={"upstream": store.attrs["upstream"]})
        t0 = time.perf_counter()
        dst.hidden[:] = feats
        t_w = time.perf_counter() - t0
        t0 = time.perf_counter()
        dst.hidden[:]
        t_r = time.perf_counter() - t0
        size = dst.size_on_disk()
        print(f"{codec:<24} {size / m.duration:>14,.0f} {raw / size:>6.2f} {raw / t_w / 1e6:>11.0f} "
              f"{raw / t_r / 1e6:>10.0f}")
    checksum_cost(feats, FeatureStore.open(url).chunk_frames)


def checksum_cost(feats: np.ndarray, chunk_frames: int, repeats: int = 3) -> None:
    """crc32c's cost beside zstd-3: per core on the same chunks, then whole-array writes and reads."""
    import google_crc32c
    import numcodecs
    import zarr
    from zarr.codecs import ZstdCodec
    from zarr.storage import MemoryStore

    chunks = [np.ascontiguousarray(feats[i:i + chunk_frames]) for i in range(0, len(feats), chunk_frames)]
    raw = sum(c.nbytes for c in chunks)
    zstd = numcodecs.Zstd(level=3)
    packed = [zstd.encode(c) for c in chunks]
    steps = {"zstd encode": lambda: [zstd.encode(c) for c in chunks],
             "zstd decode": lambda: [zstd.decode(b) for b in packed],
             "crc32c": lambda: [google_crc32c.value(b) for b in packed]}
    best = {k: float("inf") for k in steps}
    for _ in range(repeats):  # best of, interleaved, so drift on a noisy machine hits all alike
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    mbs = {k: raw / t / 1e6 for k, t in best.items()}
    print(f"\nchecksum, one core, {len(chunks)} chunks of {chunks[0].nbytes / 2**20:.1f} MB (MB/s of raw fp16): "
          f"zstd-3 encode {mbs['zstd encode']:.0f}, decode {mbs['zstd decode']:.0f}, crc32c of the compressed "
          f"bytes {mbs['crc32c']:.0f}: +{best['crc32c'] / best['zstd encode']:.1%} on encode, "
          f"+{best['crc32c'] / best['zstd decode']:.1%} on decode")
    pipelines = {"zstd": lambda: [ZstdCodec(level=3)], "zstd+crc32c": lambda: [ZstdCodec(level=3), checksum()]}
    write = {k: float("inf") for k in pipelines}
    read = dict(write)
    for _ in range(repeats):
        for k, codecs in pipelines.items():
            a = zarr.create_array(MemoryStore(), shape=feats.shape, chunks=(chunk_frames, *feats.shape[1:]),
                                  dtype=feats.dtype, compressors=codecs())
            t0 = time.perf_counter()
            a[:] = feats
            write[k] = min(write[k], time.perf_counter() - t0)
            t0 = time.perf_counter()
            a[:]
            read[k] = min(read[k], time.perf_counter() - t0)
    print(f"zarr array in memory: write zstd {raw / write['zstd'] / 1e6:.0f} MB/s, with crc32c "
          f"{raw / write['zstd+crc32c'] / 1e6:.0f} MB/s (time ratio {write['zstd+crc32c'] / write['zstd']:.3f}); "
          f"read {raw / read['zstd'] / 1e6:.0f} vs {raw / read['zstd+crc32c'] / 1e6:.0f} MB/s "
          f"(time ratio {read['zstd+crc32c'] / read['zstd']:.3f})")


def _layout(store: FeatureStore):
    from fusionpipe.store import Layout

    return Layout(store.ids, store.lengths)


if __name__ == "__main__":
    main()
