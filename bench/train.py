"""Stage 3 benchmark: what the cache buys, and what one shared pass buys.

    python bench/train.py                     # CPU: base-size random-weight WavLM, ~60 s of the demo corpus
    python bench/train.py --device cuda --seconds 300 --size base

(a) one epoch of the same interface + head, from the cache vs with the upstream run on the fly
    (audio decode + frozen forward per batch, as a no-cache pipeline would); goal >= 10x.
(b) K = 8 variants (4 interfaces x 2 merges over two stores) trained in one pass vs 8 separate
    runs of one variant each, same steps; goal <= 0.35x.
Both are measured side by side in one run; printed as ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionpipe import audio  # noqa: E402
from fusionpipe.fuse.loader import make_loader  # noqa: E402
from fusionpipe.extract.stage import extract  # noqa: E402
from fusionpipe.train.interfaces import Interface  # noqa: E402
from fusionpipe.manifest import Manifest, bundled_manifests, write_manifest, read_manifest  # noqa: E402
from fusionpipe.train.tasks import batch_targets, build_task  # noqa: E402
from fusionpipe.train.config import TrainConfig  # noqa: E402
from fusionpipe.train.rundir import variant_name  # noqa: E402
from fusionpipe.train.loop import train  # noqa: E402
from fusionpipe.train.variant import VariantModel  # noqa: E402
from fusionpipe.extract.toys import make_local_model  # noqa: E402
from fusionpipe.extract.upstreams import load_upstream  # noqa: E402


def corpus(tmp: Path, seconds: float) -> Manifest:
    write_manifest(bundled_manifests()[0].first(seconds, name=f"bench-{int(seconds)}s"), tmp / "bench.tsv")
    return read_manifest(tmp / "bench.tsv")


def epoch_time(model, task, batches, device, feats_of) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    for batch in batches:
        stacks, lengths = feats_of(batch)
        loss = task.loss(model.head, model.features(stacks, lengths), lengths, batch_targets(batch["rows"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="wavlm")
    ap.add_argument("--size", default="base")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20, help="steps per run in (b)")
    args = ap.parse_args()
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-train-"))
    m = corpus(tmp, args.seconds)
    upstream = load_upstream(str(make_local_model(args.kind, tmp / "up", size=args.size)), device=args.device)
    store = extract(m, upstream, tmp / "cache", progress=False).url
    print(f"upstream {args.kind}-{args.size} (L={upstream.num_layers}, D={upstream.hidden_size}) on {device}; "
          f"{len(m)} utterances, {m.duration:.0f} s audio")

    # (a) cache vs on the fly: same batches, same interface + head
    loader = make_loader([store], max_frames=3000)
    batches = list(loader)
    task = build_task("classify", batch_targets(loader.dataset.rows))
    torch.manual_seed(0)
    interface = Interface([upstream.hidden_size], upstream.num_layers, fusion="hconv", merge="add")
    model = VariantModel(interface, task.build_head(interface.out_dim, proj=256)).to(device)
    rows = {u.id: i for i, u in enumerate(m)}

    def cached(batch):
        return [s.to(device) for s in batch["stacks"]], batch["lengths"]  # lengths on the host, as the trainer

    def on_the_fly(batch):
        waves = [audio.load(m, rows[u]) for u in batch["ids"]]
        with torch.no_grad():
            feats = upstream.forward(waves)  # (T_i, L, D) each
        lengths = torch.tensor([f.shape[0] for f in feats])
        x = torch.zeros(len(feats), upstream.num_layers, int(lengths.max()), upstream.hidden_size, device=device)
        for b, f in enumerate(feats):
            x[b, :, :f.shape[0]] = f.float().transpose(0, 1)  # (T, L, D) -> (L, T, D)
        return [x], lengths

    t_cache = min(epoch_time(model, task, batches, device, cached) for _ in range(2))
    t_fly = epoch_time(model, task, batches, device, on_the_fly)
    print(f"(a) epoch from cache {t_cache:.2f} s, with the upstream on the fly {t_fly:.2f} s: "
          f"cache is {t_fly / t_cache:.1f}x faster (goal >= 10x)")

    # (b) K = 8 variants in one pass vs 8 separate runs, over two stores
    second = extract(m, load_upstream("toy-whisper", device=args.device), tmp / "cache", progress=False).url
    fusions, merges = ["hconv", "weighted-sum", "gumbel", "last-layer"], ["add", "concat"]
    base = dict(stores=[store, second], task="classify", steps=args.steps, eval_every=10**9, max_frames=3000,
                head_options={"proj": 256}, device=args.device)
    # warm-up: lazy imports and first-call initialisation must not land on either side
    train(TrainConfig(**{**base, "steps": 1}, fusion=fusions, merge=merges, out=str(tmp / "runs" / "warm")),
          progress=False)
    t0 = time.perf_counter()
    train(TrainConfig(**base, fusion=fusions, merge=merges, out=str(tmp / "runs" / "all")), progress=False)
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in fusions:
        for g in merges:
            train(TrainConfig(**base, fusion=[f], merge=[g], out=str(tmp / "runs" / variant_name(f, g))), progress=False)
    t_sep = time.perf_counter() - t0
    print(f"(b) 8 variants x {args.steps} steps: one pass {t_one:.2f} s, 8 separate runs {t_sep:.2f} s: "
          f"ratio {t_one / t_sep:.2f} (goal <= 0.35)")


if __name__ == "__main__":
    main()
