"""Stage 1 scale-out benchmark: extraction throughput in one process vs on a LocalCluster of 1, 2 ... workers.

    python bench/scale.py                          # base-size random-weight WavLM, 2 min of the demo corpus, CPU
    python bench/scale.py --device cuda --workers 1 --seconds 1800     # one worker per GPU

Prints, measured side by side in one run over the same manifest (each into a fresh store):
  audio-s/s    audio seconds extracted per wall second, the whole call: planning (the client loads
               the model on CPU for the frame arithmetic), extraction and the client's edge chunks
  start-up s   the LocalCluster, then each worker's imports and model load (a first tiny manifest)
  vs 1 proc    throughput relative to `extract` in one process (all cores / the GPU)
  vs 1 worker  throughput relative to the cluster with one worker
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extract import corpus  # noqa: E402
from fusionpipe.extract.cluster import connect, extract_on_cluster  # noqa: E402
from fusionpipe.extract.stage import extract  # noqa: E402
from fusionpipe.extract.toys import make_local_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="wavlm", help="family of the random-weight model (make_local_model)")
    ap.add_argument("--size", default="base")
    ap.add_argument("--seconds", type=float, default=120.0, help="audio in the manifest")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", default="1,2", help="LocalCluster sizes to measure, comma list")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="padded audio per batch")
    args = ap.parse_args()
    sizes = [int(n) for n in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="fusionpipe-scale-"))
    model = str(make_local_model(args.kind, tmp / "model", size=args.size))
    m = corpus(args.seconds)
    audio = sum(u.duration for u in m)
    unit_seconds = audio / (4 * max(sizes))  # enough units to balance the largest cluster
    print(f"{args.kind}-{args.size}, {len(m)} utterances, {audio:.0f} s audio, units of {unit_seconds:.0f} s, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")

    extract(corpus(10), model, tmp / "warmup", device=args.device, progress=False)  # imports, kernels, caches
    t0 = time.perf_counter()
    extract(m, model, tmp / "single", device=args.device, max_seconds=args.max_seconds, progress=False)
    single = audio / (time.perf_counter() - t0)
    rows = [("extract, 1 process", single, None)]
    for n in sizes:
        t0 = time.perf_counter()
        with connect("local", workers=n) as (client, threads):
            # start-up: the cluster, then every worker's imports and model load (units of 1 s reach them all)
            extract_on_cluster(corpus(4 * n), model, client, tmp / f"warmup{n}", device=args.device, threads=threads,
                               unit_seconds=1.0, progress=False)
            startup = time.perf_counter() - t0
            t0 = time.perf_counter()
            extract_on_cluster(m, model, client, tmp / f"cluster{n}", device=args.device, threads=threads,
                               max_seconds=args.max_seconds, unit_seconds=unit_seconds, progress=False)
            rows.append((f"cluster, {n} worker(s) x {threads or 'GPU'} thread(s)", audio / (time.perf_counter() - t0),
                         startup))

    one_worker = next((r[1] for r in rows if r[0].startswith("cluster, 1 ")), None)
    print(f"{'':38} {'audio-s/s':>10} {'vs 1 proc':>10} {'vs 1 worker':>12} {'start-up s':>11}")
    for name, speed, startup in rows:
        vs_worker = f"{speed / one_worker:.2f}" if one_worker and startup is not None else ""
        print(f"{name:38} {speed:10.1f} {speed / single:10.2f} {vs_worker:>12} "
              f"{'' if startup is None else f'{startup:.1f}':>11}")


if __name__ == "__main__":
    main()
