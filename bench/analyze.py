"""Analysis benchmark: time and peak memory of `fusionpipe analyze STORES` (layer CKA).

    python bench/analyze.py                                 # bundled corpus (toy stores) + synthetic base-size stores
    python bench/analyze.py --stores A.zarr B.zarr          # also these (e.g. real Whisper-base features)
    python bench/analyze.py --seconds 120,480 --frames 4096

Cases, each in a fresh process (peak RSS is that process's, minus what the imports take):
  bundled   toy-wavlm + toy-hubert + toy-whisper over demo-train (extracted into --cache when missing)
  synthetic base-size shapes (13 x 768 and 7 x 512, fp16, random) of --seconds audio each: the same
            number of sampled frames over a corpus 4x larger should cost the same memory
  --stores  any stores of one manifest you give
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from fusionpipe.analyze.cka import layer_similarity
import torch, dask, zarr, matplotlib  # the imports' memory is the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
sim = layer_similarity({stores!r}, frames={frames}, estimator={estimator!r})
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cross = [r for r in sim.summary() if r["upstream_a"] != r["upstream_b"]]
print(json.dumps({{"seconds": seconds, "peak_mb": peak / 1024, "added_mb": (peak - base) / 1024, "frames": sim.frames,
                  "layers": sum(sim.layers),
                  "best_match": {{f"{{r['upstream_a']}}~{{r['upstream_b']}}": round(r["mean_best_match"], 3)
                                 for r in cross}}}}))
"""


def measure(stores: list[str], frames: int, estimator: str) -> dict:
    code = CHILD.format(root=str(ROOT), stores=[str(s) for s in stores], frames=frames, estimator=estimator)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bundled(cache: Path) -> list[str]:
    from fusionpipe.extract.stage import extract, store_url
    from fusionpipe.manifest import bundled_manifests
    from fusionpipe.store import FeatureStore

    train = bundled_manifests()[0]
    urls = []
    for model in ("toy-wavlm", "toy-hubert", "toy-whisper"):
        url = store_url(str(cache), train.name, model)
        if not (FeatureStore.exists(url) and FeatureStore.open(url).is_complete()):
            extract(train, model, cache, device="cpu", progress=False)
        urls.append(url)
    return urls


def synthetic(root: Path, seconds: float, seed: int = 0) -> list[str]:
    """Two stores of base-size shapes, random fp16 (smooth along time), over one synthetic manifest."""
    from fusionpipe.manifest import Manifest, Utterance, write_manifest
    from fusionpipe.store import FeatureStore, Layout

    rng = np.random.default_rng(seed)
    rows, total = [], 0.0
    while total < seconds:
        n = int(rng.uniform(1.0, 8.0) * 16000)
        rows.append(Utterance(f"utt{len(rows):05d}", f"utt{len(rows):05d}.wav", n, 16000))
        total += n / 16000
    m = Manifest("bench", root, rows, source=root / "bench.tsv")
    write_manifest(m, m.source)
    urls = []
    for name, L, D in (("ssl-base", 13, 768), ("whisper-base", 7, 512)):
        frames = {u.id: (u.num_samples - 400) // 320 + 1 for u in rows}
        ids = sorted(frames, key=lambda u: (-frames[u], u))
        layout = Layout(ids, np.array([frames[u] for u in ids]))
        attrs = {"manifest": {"name": m.name, "sha256": m.content_hash(), "utterances": len(m), "path": str(m.source)},
                 "upstream": {"name": name, "num_layers": L, "hidden_size": D, "frame_rate": 50.0}}
        store = FeatureStore.create(root / f"{name}.zarr", layout, num_layers=L, hidden_size=D, attrs=attrs)
        for c in range(store.num_chunks):
            n = min(store.chunk_frames, layout.total_frames - c * store.chunk_frames)
            store.write_chunk(c, rng.standard_normal((n, L, D), dtype=np.float32).astype(np.float16))
        urls.append(str(root / f"{name}.zarr"))
    return urls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=ROOT / "cache")
    p.add_argument("--seconds", default="120,480", help="synthetic corpus sizes, audio seconds")
    p.add_argument("--frames", type=int, default=4096)
    p.add_argument("--estimator", default="linear")
    p.add_argument("--stores", nargs="*", default=[])
    args = p.parse_args()

    cases = [("bundled demo-train, 3 toys", bundled(args.cache))]
    with tempfile.TemporaryDirectory() as tmp:
        for s in [float(x) for x in args.seconds.split(",") if x]:
            root = Path(tmp) / f"s{int(s)}"
            root.mkdir()
            cases.append((f"synthetic 13x768 + 7x512, {s:.0f} s", synthetic(root, s)))
        if args.stores:
            cases.append(("given: " + ", ".join(Path(s).name for s in args.stores), args.stores))
        print("| case | frames sampled | layers | seconds | peak RSS MB | added by analyze MB | mean best-match |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for name, stores in cases:
            r = measure(stores, args.frames, args.estimator)
            print(f"| {name} | {r['frames']} | {r['layers']} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | "
                  f"{r['added_mb']:.0f} | {', '.join(f'{k} {v}' for k, v in r['best_match'].items())} |", flush=True)


if __name__ == "__main__":
    main()
