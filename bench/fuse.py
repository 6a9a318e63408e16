"""Stage 2 benchmark: what do alignment, merging and Dask cost on top of reading the cache?

    python bench/fuse.py                    # 3 min of base-size stores (random fp16 activations), CPU
    python bench/fuse.py --seconds 600 --repeat 5

Builds three stores of one synthetic manifest (utterances 1-8 s), fp16, default codec and chunk:
  A  13 x 768, 49 frames/s      (an SSL base model: wavlm-base-plus)
  B  13 x 768, one frame more   (whisper-small: the off-by-one T)
  C   7 x 512, one frame more   (whisper-base: other L and D, layer interpolation)
and prints, measured side by side in one run (best of --repeat, interleaved):
  raw           sequential whole-chunk Zarr reads of the stores (the ceiling)
  (a) loader    one epoch of make_loader(shuffle=True): aligned, unmerged float32 stacks / raw,
                with its thread prefetch (default), without, and with worker processes
  (b) merge     read_merged / read_stacks on the loader's batches
  (c) dask      view.to_dask(i).compute() per utterance / view[i] per utterance
  naive         per-utterance reads in random order (what a shuffled map-style dataset does) / raw
  feeding a GPU the loader's CPU cost per GB of float32 batches delivered (worker processes' CPU
                included) and the cores it implies to feed a consumer of --feed GB/s (a BiLSTM-CTC step
                on base features ate 2.1 GB/s on an H100), and peak resident memory of the loader's
                processes against the in-flight bound (batches queued + held)
Frames are target frames (common T); MB are decoded fp16 source bytes. On a busy machine compare
the CPU column too: wall-clock ratios there depend on what else runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionpipe.fuse.loader import make_loader  # noqa: E402
from fusionpipe.fuse.view import open_fused  # noqa: E402
from fusionpipe.manifest import Manifest, Utterance, write_manifest  # noqa: E402
from fusionpipe.store import FeatureStore, Layout  # noqa: E402

SHAPES = {"A": (13, 768, 0), "B": (13, 768, 1), "C": (7, 512, 1)}  # L, D, extra frames


def build(root: Path, seconds: float, seed: int = 0) -> tuple[Manifest, dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows, total = [], 0.0
    while total < seconds:
        n = int(rng.uniform(1.0, 8.0) * 16000)
        rows.append(Utterance(f"utt{len(rows):05d}", f"utt{len(rows):05d}.wav", n, 16000, text="A B", label="x"))
        total += n / 16000
    m = Manifest("bench", root, rows, source=root / "bench.tsv")
    write_manifest(m, m.source)
    urls = {}
    for name, (L, D, extra) in SHAPES.items():
        frames = {u.id: (u.num_samples - 400) // 320 + 1 + extra for u in rows}  # conv arithmetic, +1 for Whisper
        ids = sorted(frames, key=lambda u: (-frames[u], u))
        layout = Layout(ids, np.array([frames[u] for u in ids]))
        attrs = {"manifest": {"name": m.name, "sha256": m.content_hash(), "utterances": len(m),
                              "path": str(m.source)},
                 "upstream": {"name": name, "num_layers": L, "hidden_size": D, "frame_rate": 50.0}}
        store = FeatureStore.create(root / f"{name}.zarr", layout, num_layers=L, hidden_size=D, attrs=attrs)
        scale = np.exp(rng.normal(0, 1, (L, D))).astype(np.float32)  # activation-like: channels of unequal size
        F = store.chunk_frames
        for c in range(store.num_chunks):
            n = min(F, layout.total_frames - c * F)
            store.write_chunk(c, (rng.standard_normal((n, L, D), dtype=np.float32) * scale).astype(np.float16))
        urls[name] = store.url
    return m, urls


def raw_read(urls: list[str]) -> None:
    for u in urls:
        s = FeatureStore.open(u)
        for c in range(s.num_chunks):
            s.hidden[c * s.chunk_frames:(c + 1) * s.chunk_frames]


def timed(fn, pids=()) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(); CPU counts this process's threads and those of processes `pids`
    (the loader's workers: their CPU column is the whole cost)."""
    t, c = time.perf_counter(), time.process_time() + sum(map(cpu_seconds, pids))
    fn()
    return time.perf_counter() - t, time.process_time() + sum(map(cpu_seconds, pids)) - c


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int | str = "self") -> int:
    """Peak resident bytes of a process (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def drain(it) -> None:
    for _ in it:  # drop each result: recycled buffers, as in training
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-frames", type=int, default=8000)
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the multi-process loader row")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of this process (DataLoader workers always run 1)")
    ap.add_argument("--dir", help="build the stores here (default: a temporary directory)")
    ap.add_argument("--feed", type=float, default=2.1, help="GB/s of float32 batches a GPU step consumes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.perf_counter()
        m, urls = build(Path(tmp), args.seconds)
        print(f"built {len(m)} utterances, {m.duration:.0f} s of audio, stores {', '.join(SHAPES)} "
              f"in {time.perf_counter() - t:.0f} s; torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        rows = []
        for name, stores in {"A+B": [urls["A"], urls["B"]], "A+C": [urls["A"], urls["C"]]}.items():
            rows += bench_pair(name, stores, args)
        print("\nratios: throughput against the row named (speed, higher is better), but for (b): time against "
              "unmerged (cost, lower is better); by wall time and by this process's CPU time")
        print(f"{'pair':<5} {'measure':<40} {'wall s':>7} {'cpu s':>6} {'frames/s':>9} {'MB/s':>6} "
              f"{'r.wall':>6} {'r.cpu':>6}  goal")
        for r in rows:
            print(f"{r[0]:<5} {r[1]:<40} {r[2]:>7.3f} {r[3]:>6} {r[4]:>9.0f} {r[5]:>6.0f} {r[6]:>6} {r[7]:>6}  {r[8]}")


def bench_pair(name: str, stores: list[str], args) -> list[tuple]:
    view = open_fused(stores, merge="concat")
    add = open_fused(stores, merge="add") if name == "A+B" else None
    frames = int(view.lengths.sum())
    mb = sum(s.total_frames * s.num_layers * s.hidden_size * 2 for s in map(FeatureStore.open, stores)) / 1e6
    loaders = {
        "thread": make_loader(stores, max_frames=args.max_frames, shuffle=True),
        "plain": make_loader(stores, max_frames=args.max_frames, shuffle=True, prefetch=0),
        "workers": make_loader(stores, max_frames=args.max_frames, shuffle=True, num_workers=args.workers),
    }
    for loader in loaders.values():  # start the workers, warm the page cache and the buffers
        drain(loader)
    batches = loaders["plain"].batch_sampler.batches()
    order = np.random.default_rng(0).permutation(len(view))
    best: dict[str, tuple[float, float]] = {}

    pids = [w.pid for w in loaders["workers"]._iterator._workers]

    def measure(key, fn):
        w, c = timed(fn, pids if key == "loader-workers" else ())
        best[key] = min(best.get(key, (w, c)), (w, c))

    def epoch(loader):
        def run():
            loader.batch_sampler.set_epoch(loader.batch_sampler.epoch + 1)
            drain(loader)
        return run

    tasks = {
        "raw": lambda: raw_read(stores),
        **{f"loader-{k}": epoch(v) for k, v in loaders.items()},
        "unmerged": lambda: drain(view.read_stacks(b) for b in batches),
        "concat": lambda: drain(view.read_merged(b) for b in batches),
        **({"add": lambda: drain(add.read_merged(b) for b in batches)} if add else {}),
        "direct": lambda: drain(view[i] for i in range(len(view))),
        "dask": lambda: drain(view.to_dask(i).compute() for i in range(len(view))),
        "naive": lambda: drain(view.aligned(int(i)) for i in order),
    }
    for _ in range(args.repeat):
        for key, fn in tasks.items():
            measure(key, fn)
    gb = sum(int(np.prod(s.shape)) * 4 for b in batches for s in view.read_stacks(b)) / 1e9  # float32 delivered
    rss = {"main": peak_rss(), **{f"worker {i}": peak_rss(p) for i, p in enumerate(pids)}}
    slots = loaders["workers"].dataset.slots
    for loader in loaders.values():
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()

    def row(what, key, base=None, goal="", cost=False):
        (w, c), ratios = best[key], ["", ""]
        if base is not None:
            ratios = [f"{a / b:.2f}" if cost else f"{b / a:.2f}" for a, b in ((w, best[base][0]), (c, best[base][1]))]
        return name, what, w, f"{c:.2f}", frames / w, mb / w, *ratios, goal

    out = [row("raw sequential chunk reads", "raw"),
           row("(a) loader, thread prefetch / raw", "loader-thread", "raw", ">= 0.8"),
           row("(a) loader, in the loop / raw", "loader-plain", "raw", ">= 0.8"),
           row(f"(a) loader, {args.workers} worker processes / raw", "loader-workers", "raw", ">= 0.8"),
           row("read_stacks / raw", "unmerged", "raw"),
           row("(b) read_merged concat / read_stacks", "concat", "unmerged", "<= 1.10", cost=True)]
    if add:
        out.append(row("(b) read_merged add / read_stacks", "add", "unmerged", "<= 1.10", cost=True))
    out += [row("view[i] per utterance / raw", "direct", "raw"),
            row("(c) to_dask(i).compute() / view[i]", "dask", "direct"),
            row("naive: per-utterance, shuffled / raw", "naive", "raw")]
    print(f"\n{name}: feeding a GPU {args.feed} GB/s of float32 batches ({gb:.2f} GB per epoch here)")
    for key, what in (("raw", "raw chunk reads (fp16 decoded, no align)"), ("loader-plain", "loader, in the loop"),
                      ("loader-thread", "loader, thread prefetch"),
                      ("loader-workers", f"loader, {args.workers} worker processes (their CPU counted)")):
        w, c = best[key]
        print(f"  {what:<55} {gb / c:5.2f} GB/s per CPU core -> {args.feed / (gb / c):4.1f} cores; "
              f"{gb / w:5.2f} GB/s wall")
    print(f"  peak resident: {', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in rss.items())}; shared slots "
          f"{len(slots.memory)} x {slots.nbytes / 2**30:.2f} GiB (the in-flight bound, touched only as filled)")
    return out


if __name__ == "__main__":
    main()
