"""Every GPU-only path once, with a PASS / FAIL / SKIP line each: the checks bench/gpu_check.sh runs.

    python bench/gpu_check.py                  # on a GPU: base-size random WavLM, the bundled corpus
    python bench/gpu_check.py --seconds 120    # less audio

On a machine without a GPU it runs what a CPU can run of the same paths (toy upstream: helpers and the
one-process path give the same store, the compact path gives the float32 batches, a resume, a CPU
checkpoint resumed elsewhere) and says SKIP for the rest; tests/test_gpu_logic.py holds the logic
that needs no GPU at all (device choice, RNG states, host syncs on the meta device).

Paths, in order:
  extract-fp16 / extract-fp32   extraction with helper processes (pinned shared-memory slots on a GPU) gives
                                the one-process path's store byte for byte, without a pinning warning
  extract-cuda1                 the same on cuda:1 (2 GPUs): slots pinned for that GPU
  compact                       a lossy store's batches cross as codes and expand on the device to the
                                float32 loader's numbers; a run trains through them with finite losses
  syncs                         training steps under torch.cuda.set_sync_debug_mode: classify none, and
                                the count CTC costs (inside torch's ctc_loss, train/tasks/ctc.py says why)
  resume                        a run stopped and resumed equals the straight run (to GPU rounding); a
                                CPU checkpoint resumes on the GPU
  torchrun                      2 ranks with nccl (2 GPUs)
  cluster                       a LocalCluster of 2 workers puts one on each GPU (2 GPUs)
  P5                            loader GB/s delivered / GB/s a BiLSTM-CTC step consumes on this GPU
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusionpipe import cuda  # noqa: E402
from fusionpipe.extract.stage import extract  # noqa: E402
from fusionpipe.extract.toys import make_local_model  # noqa: E402
from fusionpipe.fuse.loader import make_loader  # noqa: E402
from fusionpipe.manifest import bundled_manifests, read_manifest, write_manifest  # noqa: E402
from fusionpipe.store import FeatureStore  # noqa: E402
from fusionpipe.train.config import TrainConfig  # noqa: E402
from fusionpipe.train.interfaces import Interface  # noqa: E402
from fusionpipe.train.loop import Variant, train, train_step  # noqa: E402
from fusionpipe.train.variant import VariantModel  # noqa: E402
from fusionpipe.train.tasks import batch_targets, build_task  # noqa: E402
from fusionpipe.integrity import check_store  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []


def report(path: str, status: str, detail: str) -> None:
    RESULTS.append((path, status, detail))
    print(f"{status:<4} {path:<14} {detail}", flush=True)


def check(path: str, gpus_needed: int = 0):
    """Run the decorated check, turning an exception into a FAIL line; SKIP without the GPUs it needs."""
    def wrap(fn):
        def run(ctx):
            if cuda.device_count() < gpus_needed:
                return report(path, "SKIP", f"needs {gpus_needed} GPU(s), this machine has {cuda.device_count()}")
            t0 = time.perf_counter()
            try:
                status, detail = fn(ctx)
            except Exception as e:  # a check that crashes is a failed path, with its traceback
                traceback.print_exc()
                status, detail = "FAIL", f"{type(e).__name__}: {str(e)[:300]}"
            report(path, status, f"{detail} [{time.perf_counter() - t0:.1f} s]")
        return run
    return wrap


def same_bytes(a: str, b: str) -> bool:
    x, y = FeatureStore.open(a), FeatureStore.open(b)
    return x.ids == y.ids and x.hidden[:].tobytes() == y.hidden[:].tobytes() and not check_store(x) and not check_store(y)


def extract_both(ctx, dtype: str, device: str) -> tuple[str, str]:
    """One store through the pipeline (helpers), one through the one-process path; a pinning warning is an error."""
    helpers = max(2, min(4, (os.cpu_count() or 2) - 1))
    out = []
    for name, processes in (("helpers", helpers), ("one", 0)):
        with warnings.catch_warnings():
            # a slot left unpinned (pipeline.pin's warning) must fail the check, not scroll by
            warnings.filterwarnings("error", message="extraction on ")
            r = extract(ctx.train, ctx.model, url=str(ctx.tmp / f"{dtype}-{device}-{name}.zarr"), device=device,
                        dtype=dtype, processes=processes, progress=False)
        out.append(r.url)
    return out[0], out[1]


@check("extract-fp16")
def extract_fp16(ctx):
    a, b = extract_both(ctx, "float16", ctx.device)
    ctx.store = a
    info = FeatureStore.open(a).info
    ok = same_bytes(a, b) and info.device == torch.device(ctx.device).type
    return ("PASS" if ok else "FAIL"), f"helpers == one process byte for byte: {ok}; computed {info.compute_dtype}"


@check("extract-fp32")
def extract_fp32(ctx):
    a, b = extract_both(ctx, "float32", ctx.device)
    ok = same_bytes(a, b)
    return ("PASS" if ok else "FAIL"), f"helpers == one process byte for byte: {ok}"


@check("extract-cuda1", gpus_needed=2)
def extract_cuda1(ctx):
    a, b = extract_both(ctx, "float16", "cuda:1")
    x, y = FeatureStore.open(a).hidden[:], FeatureStore.open(ctx.store).hidden[:]
    ok = same_bytes(a, b)
    return ("PASS" if ok else "FAIL"), (f"helpers == one process on cuda:1: {ok}; cuda:1 vs cuda:0 max |diff| "
                                        f"{np.abs(x.astype(np.float32) - y.astype(np.float32)).max():.3g}")


@check("compact")
def compact(ctx):
    lossy = extract(ctx.train, ctx.model, url=str(ctx.tmp / "lossy.zarr"), device=ctx.device, codec="int8-std08",
                    progress=False).url
    device = torch.device(ctx.device)
    worst, scale = 0.0, 0.0
    for codes, floats in zip(make_loader([lossy], max_frames=4000, compact=True),
                             make_loader([lossy], max_frames=4000, compact=False)):
        for s, f in zip(codes["stacks"], floats["stacks"]):
            worst = max(worst, float((s.to(device) - f.to(device)).abs().max()))
            scale = max(scale, float(f.abs().max()))
    run = ctx.tmp / "runs" / "compact"
    train(TrainConfig(stores=[lossy], task="classify", fusion=["hconv"], merge=["add"], out=str(run), steps=20,
                      eval_every=10, max_frames=4000, head_options={"proj": 64}, device=ctx.device), progress=False)
    losses = [float(r.split(",")[1]) for r in (run / "hconv-add" / "log.csv").read_text().splitlines()[1:]]
    # the same arithmetic on either side; a GPU may fuse a multiply-add where the CPU rounds twice
    ok = worst <= 1e-6 * scale and len(losses) == 20 and all(math.isfinite(x) for x in losses)
    return ("PASS" if ok else "FAIL"), (f"codes expanded on {device} vs float32 batches: max |diff| {worst:.3g} "
                                        f"(max |x| {scale:.3g}); 20 steps, last loss {losses[-1]:.3f}")


@check("syncs", gpus_needed=1)
def syncs(ctx):
    """Training steps under torch's sync debug mode, counting its warnings (one per host sync)."""
    device = torch.device(ctx.device)
    loader = make_loader([ctx.store], max_frames=4000)
    batches = [b for _, b in zip(range(6), loader)]
    counts = {}
    for task_name, fusion in (("classify", "hconv"), ("classify", "gumbel"), ("asr", "weighted-sum")):
        task = build_task(task_name, batch_targets(loader.dataset.rows))
        interface = Interface(loader.dataset.view.dims, loader.dataset.view.num_layers, fusion=fusion, merge="add")
        model = VariantModel(interface, task.build_head(interface.out_dim, proj=64)).to(device)
        v = Variant("v", model, torch.optim.Adam(model.parameters()), None, device)
        cfg = argparse.Namespace(steps=10, specaugment=True, grad_clip=1.0)
        for n, batch in enumerate(batches):
            stacks = [s.to(device, non_blocking=True) for s in batch["stacks"]]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn" if n >= 2 else 0)  # the first steps warm up
                try:
                    with v.own_rng():
                        train_step(v, task, stacks, batch["lengths"], batch_targets(batch["rows"]), cfg, n, None)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            counts[f"{task_name}/{fusion}"] = counts.get(f"{task_name}/{fusion}", 0) + sum(
                "synchroniz" in str(w.message) for w in caught)
    torch.cuda.synchronize()
    per_step = {k: v / (len(batches) - 2) for k, v in counts.items()}
    ok = all(v == 0 for k, v in per_step.items() if not k.startswith("asr"))
    return ("PASS" if ok else "FAIL"), "host syncs per step: " + ", ".join(f"{k} {v:g}" for k, v in per_step.items())


@check("resume")
def resume(ctx):
    base = dict(stores=[ctx.store], task="classify", fusion=["hconv", "weighted-sum"], merge=["add"], eval_every=5,
                max_frames=3000, head_options={"proj": 64}, device=ctx.device)
    straight, resumed, moved = (ctx.tmp / "runs" / n for n in ("straight", "resumed", "moved"))
    train(TrainConfig(**base, steps=20, out=str(straight)), progress=False)
    train(TrainConfig(**base, steps=10, out=str(resumed)), progress=False)
    train(TrainConfig(**base, steps=20, out=str(resumed)), resume=True, progress=False)
    worst = 0.0
    for v in ("hconv-add", "weighted-sum-add"):
        a = [float(r.split(",")[1]) for r in (straight / v / "log.csv").read_text().splitlines()[1:]]
        b = [float(r.split(",")[1]) for r in (resumed / v / "log.csv").read_text().splitlines()[1:]]
        worst = max(worst, max(abs(x - y) / max(abs(x), 1e-9) for x, y in zip(a, b)), 0 if len(a) == len(b) else 1)
    detail = f"resumed vs straight, max relative loss difference {worst:.2g}"
    if ctx.device != "cpu":  # a checkpoint written on the CPU continues on the GPU, each variant its own stream
        train(TrainConfig(**{**base, "device": "cpu"}, steps=5, out=str(moved)), progress=False)
        train(TrainConfig(**base, steps=10, out=str(moved)), resume=True, progress=False)
        detail += "; CPU checkpoint resumed on the GPU"
    # GPU kernels may sum in another order from run to run (index_put's atomics in HConv's backward)
    return ("PASS" if worst < (1e-3 if ctx.device != "cpu" else 1e-6) else "FAIL"), detail


@check("torchrun", gpus_needed=2)
def torchrun(ctx):
    out = ctx.tmp / "runs" / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fusionpipe",
           "train", "--stores", ctx.store, "--task", "classify", "--fusion", "hconv", "--merge", "add", "--steps", "20",
           "--eval-every", "10", "--max-frames", "4000", "--device", "cuda", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    if r.returncode:
        return "FAIL", f"exit {r.returncode}: {r.stderr[-500:]}"
    losses = [float(x.split(",")[1]) for x in (out / "hconv-add" / "log.csv").read_text().splitlines()[1:]]
    return ("PASS" if all(map(math.isfinite, losses)) else "FAIL"), f"nccl, 2 ranks, 20 steps, last loss {losses[-1]:.3f}"


@check("cluster", gpus_needed=2)
def cluster(ctx):
    from fusionpipe.extract import cluster as c
    with c.connect("local", workers=2) as (client, _):
        r = c.extract_on_cluster(ctx.train, str(ctx.model), client, url=str(ctx.tmp / "cluster.zarr"), device="cuda",
                                 unit_seconds=20, progress=False)
        devices = sorted(d for ds in client.run(lambda: [str(u.device) for u in c._loaded.values()]).values()
                         for d in ds)
    ok = devices == ["cuda:0", "cuda:1"] and same_bytes(r.url, ctx.store)
    return ("PASS" if ok else "FAIL"), f"workers' upstreams on {devices}; store == the one-process store: {ok}"


@check("P5", gpus_needed=1)
def p5(ctx):
    """GB/s of float32 batches the loader (2 worker processes) delivers, against what a BiLSTM-CTC step eats."""
    device = torch.device(ctx.device)
    loader = make_loader([ctx.store], max_frames=8000, num_workers=2)
    next(iter(loader))  # the workers' start-up is not the loader's rate
    t0, nbytes, batches = time.perf_counter(), 0, []
    for batch in loader:
        nbytes += sum(s.numel() * 4 for s in batch["stacks"])
        if len(batches) < 4:
            batches.append(([s.to(device) for s in batch["stacks"]], batch["lengths"], batch["rows"]))
    delivered = nbytes / (time.perf_counter() - t0) / 1e9
    task = build_task("asr", batch_targets(loader.dataset.rows))
    interface = Interface(loader.dataset.view.dims, loader.dataset.view.num_layers, fusion="weighted-sum", merge="add")
    model = VariantModel(interface, task.build_head(interface.out_dim)).to(device)  # SUPERB-size BiLSTM-CTC
    v = Variant("v", model, torch.optim.Adam(model.parameters()), None, device)
    cfg = argparse.Namespace(steps=10, specaugment=False, grad_clip=1.0)
    for n in range(2):  # warm-up
        train_step(v, task, *batches[n][:2], batch_targets(batches[n][2]), cfg, n, None)
    torch.cuda.synchronize()
    t0, eaten = time.perf_counter(), 0
    for rep in range(3):
        for stacks, lengths, rows in batches:
            train_step(v, task, stacks, lengths, batch_targets(rows), cfg, rep, None)
            eaten += sum(s.numel() * 4 for s in stacks)
    torch.cuda.synchronize()
    consumed = eaten / (time.perf_counter() - t0) / 1e9
    return "PASS", (f"P5 loader / step = {delivered / consumed:.2f} (loader, 2 workers: {delivered:.2f} GB/s; "
                    f"BiLSTM-CTC step: {consumed:.2f} GB/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0, help="audio of demo-train used on a GPU")
    args = ap.parse_args()
    gpus = cuda.device_count()
    ctx = argparse.Namespace(tmp=Path(tempfile.mkdtemp(prefix="fp-gpu-check-")), store=None)
    ctx.device = "cuda:0" if gpus else "cpu"
    train_manifest = bundled_manifests()[0]
    if gpus:  # a base-size random upstream, as docs/benchmarks.md's GPU figures
        ctx.model = str(make_local_model("wavlm", ctx.tmp / "wavlm-base", size="base"))
        train_manifest = train_manifest.first(args.seconds, name=f"check-{int(args.seconds)}s")
        what = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
    else:  # a CPU would take minutes per base-size extraction: the toy upstream runs the same code paths
        ctx.model = "toy-wavlm"
        train_manifest = train_manifest.first(60, name="check-60s")
        what = "no GPU: CPU paths only, toy upstream"
    write_manifest(train_manifest, ctx.tmp / "train.tsv")
    ctx.train = read_manifest(ctx.tmp / "train.tsv")
    print(f"gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: torch {torch.__version__}, {what}; "
          f"{len(ctx.train)} utterances, {ctx.train.duration:.0f} s audio; {os.cpu_count()} cores", flush=True)
    for step in (extract_fp16, extract_fp32, extract_cuda1, compact, syncs, resume, torchrun, cluster, p5):
        if ctx.store is None and step is not extract_fp16:
            ctx.store = extract(ctx.train, ctx.model, url=str(ctx.tmp / "fallback.zarr"), device=ctx.device,
                                progress=False).url
        step(ctx)
    failed = [p for p, s, _ in RESULTS if s == "FAIL"]
    print(f"gpu_check: {sum(s == 'PASS' for _, s, _ in RESULTS)} passed, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}, {sum(s == 'SKIP' for _, s, _ in RESULTS)} skipped")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
