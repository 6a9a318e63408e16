"""Stage 1 benchmark: does writing overlap compute, and what does each codec cost?

    python bench/extract.py                       # base-size random-weight WavLM, ~3 min of the demo corpus, CPU
    python bench/extract.py --kind whisper --device cuda --seconds 600
    python bench/extract.py --model /path/to/real_whisper_base   # real activations (shared/tools/real_whisper_base.py)

Prints, measured side by side in one run:
  extract / bare   wall time of `extract()` over the batches of its plan divided by the bare
                   upstream forward (+ device->host copy) over the same batches, audio preloaded
  stages alone     decode, forward + copy, compress + write, each timed alone over the whole
                   manifest: the slowest bounds extract, which overlaps them
  codecs           bytes per audio-second and write MB/s for each codec on the same features
  checksum         what the crc32c every chunk carries costs: per core (zstd alone vs zstd + crc32c
                   on the same chunks) and in whole-store writes and reads with and without it
  peak RSS         of this process
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionpipe import audio  # noqa: E402
from fusionpipe.extract.run import IO_THREADS, WRITE_THREADS, extract, plan  # noqa: E402
from fusionpipe.manifest import Manifest, bundled_manifests  # noqa: E402
from fusionpipe.store import CHECKSUM, CODECS, FeatureStore  # noqa: E402
from fusionpipe.extract.upstreams import load_upstream, make_local_model  # noqa: E402


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
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-seconds", type=float, default=160.0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    model = args.model or str(make_local_model(args.kind, tmp / f"{args.kind}-{args.size}", size=args.size))
    upstream = load_upstream(model, device=args.device)
    m = corpus(args.seconds)
    print(f"upstream {upstream.name} L={upstream.num_layers} D={upstream.hidden_size} on {upstream.device}; "
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

    def full(codec: str) -> tuple[float, str]:
        t0 = time.perf_counter()
        r = extract(m, upstream, url=str(tmp / f"store-{codec}-{time.time_ns()}.zarr"), codec=codec,
                    max_seconds=args.max_seconds, progress=False)
        return time.perf_counter() - t0, r.url

    # alternate the two measurements so drift on a noisy machine hits both alike
    t_bare1, (t_full1, url) = bare(), full("zstd")
    t_bare2, (t_full2, _) = bare(), full("zstd")
    t_bare, t_full = min(t_bare1, t_bare2), min(t_full1, t_full2)
    print(f"\nbare forward {t_bare:.2f} s ({m.duration / t_bare:.0f}x real time), "
          f"extract {t_full:.2f} s ({m.duration / t_full:.0f}x real time)")
    print(f"extract / bare = {t_full / t_bare:.3f}   (goal <= 1.1; includes audio decode and header checks)")

    # the pipeline's stages alone, each over the whole manifest: extract can be no faster than the slowest
    t0 = time.perf_counter()
    with ThreadPoolExecutor(IO_THREADS) as io:
        list(io.map(lambda r: audio.load(m, r), p.rows))
    t_decode = time.perf_counter() - t0
    store = FeatureStore.open(url)
    feats_all = store.hidden[:]
    dst = FeatureStore.create(tmp / "write-only.zarr", _layout(store), num_layers=store.num_layers,
                              hidden_size=store.hidden_size, attrs={"upstream": store.attrs["upstream"]})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        F = dst.chunk_frames
        list(pool.map(lambda c: dst.write_chunk(c, feats_all[c * F:(c + 1) * F]), range(dst.num_chunks)))
    t_write = time.perf_counter() - t0
    feats_all = None  # free it before the codec table loads the features again
    print(f"stages alone: decode {t_decode:.2f} s ({IO_THREADS} threads), forward + copy {t_bare:.2f} s, "
          f"compress + write {t_write:.2f} s ({WRITE_THREADS} threads, zstd)")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS after extraction {peak:.0f} MB (model, preloaded audio, batch buffers)")

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
    pipelines = {"zstd": lambda: [ZstdCodec(level=3)], "zstd+crc32c": lambda: [ZstdCodec(level=3), CHECKSUM()]}
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
