"""Stage 1 benchmark: what each store representation costs in bytes, error, speed, and what the head learns.

    python /work/shared/tools/real_whisper_base.py /path/real-whisper-base   # builds the real checkpoint
    python bench/storage.py --model /path/real-whisper-base                 # ~25 min on 2 CPU cores
    python bench/storage.py --model ... --steps 100 --seeds 2 --no-wavlm    # a quick look

Real activations decide: random-weight models have none of the outlier channels (|x| up to 350 in
Whisper-base layers 4-5, most channels below 6) that make codecs hard, so the representation is
chosen on the real pretrained Whisper-base checkpoint that shared/tools/real_whisper_base.py builds
(MIT weights from two PyPI packages). Without it (--model absent) the real part is skipped with a
message; the base-size random-weight WavLM part (the SSL shape: 13 x 768) still runs.

The lossy stores hold exactly the same utterances: the float16 store is re-encoded chunk by chunk
(`FeatureStore.create` + `write_chunk`, which records each chunk's error as extraction does).

Prints, per representation against the float16 store (zstd, the lossless default):
  storage     bytes per audio-second, ratio to raw float16, relative error ||decoded - x|| / ||x|| per
              layer (the store's, and the worst chunk's), encode / decode MB/s per core (of float16
              input), loader frames/s through make_loader; for a GPU trainer's loader (codes handed
              on, expanded on the device): host frames/s and bytes per frame to the device
  downstream  the same variants (hconv and weighted-sum, interface normalize=true) trained with each
              seed on each representation (asr and classify on the bundled corpus, demo-dev picks
              the checkpoint), scored on demo-test: mean +- sd over seeds, and whether the mean is
              within one float16 seed sd of the float16 mean
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from numcodecs import Zstd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionpipe.quantize import decode, encode  # noqa: E402
from fusionpipe.extract.stage import extract  # noqa: E402
from fusionpipe.extract.toys import make_local_model  # noqa: E402
from fusionpipe.fuse.loader import make_loader  # noqa: E402
from fusionpipe.manifest import CORPUS, bundled_manifests, read_manifest, write_manifest  # noqa: E402
from fusionpipe.codecs import LOSSY, serializer  # noqa: E402
from fusionpipe.store import FeatureStore, Layout  # noqa: E402

FP16 = "zstd"


def reencode(src: FeatureStore, url: str, codec: str) -> FeatureStore:
    """`src` (a complete store) written again with `codec`, chunk by chunk: the same utterances, bytes re-coded."""
    if FeatureStore.exists(url):
        old = FeatureStore.open(url)
        if old.info.codec == codec and old.is_complete():
            return old
    dst = FeatureStore.create(url, Layout(src.ids, src.lengths), num_layers=src.num_layers,
                              hidden_size=src.hidden_size, codec=codec, chunk_frames=src.chunk_frames,
                              attrs={**src.attrs, "codec": codec}, overwrite=True)
    F = src.chunk_frames
    for c in range(src.num_chunks):
        dst.write_chunk(c, src.read_range(c * F, (c + 1) * F))
    return dst


def error_records(store: FeatureStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the records the writer made: per layer sum of squared errors and of squares, and the
    (chunks, L) relative error of each chunk."""
    import json

    from fusionpipe.store import _list, default_buffer_prototype, sync
    recs = [json.loads(sync(store.group.store.get(k, default_buffer_prototype())).to_bytes())
            for k in sync(_list(store.group.store, "error/"))]
    sse, ss = (np.array([r[k] for r in recs]) for k in ("sum_sq_error", "sum_sq"))
    return sse.sum(axis=0), ss.sum(axis=0), np.sqrt(sse / np.maximum(ss, 1e-30))


def codec_speed(chunks: list[np.ndarray], codec: str) -> tuple[float, float]:
    """(encode, decode) MB/s of float16 input on one core: quantiser (if any) + zstd-3, no I/O."""
    z = Zstd(level=3)
    q = serializer(codec) if codec in LOSSY else None
    mb = sum(c.nbytes for c in chunks) / 1e6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: the decoder's torch ops would use every core
    if q:  # the first torch call of a process pays torch's start-up: not the codec's cost
        decode(encode(chunks[0], q.step, q.predict_layers), chunks[0].shape, np.float16, np.nan, q.predict_layers)
    t0 = time.perf_counter()
    blobs = [z.encode(encode(c, q.step, q.predict_layers) if q else np.ascontiguousarray(c)) for c in chunks]
    t1 = time.perf_counter()
    for c, b in zip(chunks, blobs):
        raw = z.decode(b)
        if q:
            decode(raw, c.shape, np.float16, np.nan, q.predict_layers)
        else:
            np.frombuffer(raw, np.float16).reshape(c.shape)
    t2 = time.perf_counter()
    torch.set_num_threads(threads)
    return mb / (t1 - t0), mb / (t2 - t1)


def manifest_of(store: FeatureStore) -> str | None:
    """The TSV the store's labels come from: the recorded one, or, when that path is gone (a cache
    built from another checkout), the bundled manifest of the same name (`None`: let the loader say)."""
    info = store.info
    if info.manifest_path and Path(info.manifest_path).is_file():
        return info.manifest_path
    bundled = CORPUS / f"{info.manifest}.tsv"
    return str(bundled) if bundled.is_file() else None


def loader_speed(url: str, compact: bool = False) -> tuple[float, float]:
    """Frames per second through make_loader (read, decode, align, pad to tensors; with ``compact`` a
    lossy store's batches stay int8 codes, as a GPU trainer gets them) and bytes per frame handed on."""
    t0, frames, nbytes = time.perf_counter(), 0, 0
    for batch in make_loader([url], manifest_of(FeatureStore.open(url)), max_frames=4000, compact=compact):
        frames += int(batch["lengths"].sum())
        nbytes += sum(s.nbytes for s in batch["stacks"])
    return frames / (time.perf_counter() - t0), nbytes / frames


def expand_speed(url: str) -> float:
    """Frames per second of `CompactStack.to("cpu")`: the expansion a GPU does, timed on one CPU core."""
    spent, frames = 0.0, 0
    for batch in make_loader([url], manifest_of(FeatureStore.open(url)), max_frames=4000, compact=True):
        t0 = time.perf_counter()
        batch["stacks"][0].to("cpu")
        spent += time.perf_counter() - t0
        frames += int(batch["lengths"].sum())
    return frames / spent


def storage_table(title: str, stores: dict[str, list[FeatureStore]], speed_chunks: int) -> None:
    """stores: representation -> its stores (one per manifest)."""
    print(f"\n## {title}\n")
    ref = stores[FP16]
    L, D = ref[0].num_layers, ref[0].hidden_size
    seconds = sum(s.total_frames / s.frame_rate for s in ref)
    raw = sum(s.total_frames for s in ref) * L * D * 2
    first = ref[0]
    chunks = [first.read_range(c * first.chunk_frames, (c + 1) * first.chunk_frames)
              for c in range(min(speed_chunks, first.num_chunks))]
    fp16_loader = None
    print(f"{seconds:.0f} s of audio, L={L}, D={D}, {sum(s.num_chunks for s in ref)} chunks of "
          f"{first.chunk_frames} frames\n")
    print("| representation | bytes/audio-s | ratio to fp16 | rel. error mean / max over layers | worst chunk | "
          "encode MB/s/core | decode MB/s/core | loader frames/s (vs fp16) |")
    print("|---|---|---|---|---|---|---|---|")
    per_layer, compact = {}, []
    for codec, group in stores.items():
        size = sum(s.hidden_bytes() for s in group)
        enc, dec = codec_speed(chunks, codec)
        fps, per_frame = loader_speed(group[0].url)
        fp16_loader = fp16_loader or fps
        if codec in LOSSY:
            cfps, cper_frame = loader_speed(group[0].url, compact=True)
            compact.append(f"| {codec} | {fps:,.0f} | {cfps:,.0f} ({cfps / fps:.2f}x) | {per_frame:,.0f} | "
                           f"{cper_frame:,.0f} ({per_frame / cper_frame:.1f}x fewer) | {expand_speed(group[0].url):,.0f} |")
        if codec in LOSSY:
            recs = [error_records(s) for s in group]
            errs = np.concatenate([r[2] for r in recs])
            rel = np.sqrt(sum(r[0] for r in recs) / sum(r[1] for r in recs))
            per_layer[codec] = (rel, errs.max(axis=0))
            err = f"{rel.mean():.2%} / {rel.max():.2%} | {errs.max():.2%}"
        else:
            err = "0 (lossless) | 0"
        name = "fp16 (zstd, default)" if codec == FP16 else codec
        print(f"| {name} | {size / seconds:,.0f} | {size / raw:.3f} ({raw / size:.2f}x smaller) | {err} | "
              f"{enc:.0f} | {dec:.0f} | {fps:,.0f} ({fps / fp16_loader:.2f}x) |")
    if compact:
        print("\nGPU training's loader (`make_loader(compact=True)`): the host reads, checks and unzips the chunks "
              "and hands on the int8 codes; the device expands, aligns and pads them (timed here on one CPU core)\n")
        print("| representation | host frames/s, float32 batches | host frames/s, codes | bytes/frame to the device, "
              "float32 | codes | expand frames/s (CPU) |")
        print("|---|---|---|---|---|---|")
        print("\n".join(compact))
    if per_layer:
        print("\nrelative error per layer (store / worst chunk):\n")
        print("| layer | " + " | ".join(per_layer) + " |")
        print("|---|" + "---|" * len(per_layer))
        for layer in range(L):
            print(f"| {layer} | " + " | ".join(f"{rel[layer]:.2%} / {worst[layer]:.2%}"
                                               for rel, worst in per_layer.values()) + " |")


def downstream(stores: dict[str, dict[str, FeatureStore]], seeds: list[int], steps: int, max_frames: int,
               work: Path, tasks: list[str], report_only: bool = False) -> None:
    """stores: representation -> {"demo-train": store, "demo-dev": ..., "demo-test": ...}."""
    from fusionpipe.train.config import TrainConfig, variant_name
    from fusionpipe.train.defaults import DEMO
    from fusionpipe.train.evaluation import evaluate
    from fusionpipe.train.loop import train

    fusions = ["hconv", "weighted-sum"]
    print(f"\n## Downstream: real Whisper-base features, seeds {seeds}, scored on demo-test\n", flush=True)
    for task, metric, better in (("asr", "cer", "lower"), ("classify", "accuracy", "higher")):
        if task not in tasks:
            continue
        steps_here = steps if task == "asr" else max(1, steps // 2)  # the classify head converges sooner
        scores: dict[tuple[str, str], list[float]] = {}
        for codec, group in stores.items():
            for seed in seeds:
                out = work / f"run-{task}-{codec}-{seed}"
                cfg = TrainConfig(stores=[group["demo-train"].url], dev_stores=[group["demo-dev"].url], task=task,
                                  manifest=manifest_of(group["demo-train"]), dev_manifest=manifest_of(group["demo-dev"]),
                                  fusion=fusions, merge=["concat"], out=str(out), steps=steps_here,
                                  eval_every=max(1, steps_here // 3), lr=DEMO["lr"], max_frames=max_frames,
                                  head_options=(DEMO["head_options"] if task == "asr"
                                                else {"proj": DEMO["head_options"]["proj"]}),
                                  interface_options={"normalize": True}, seed=seed, device="cpu")
                if not all((out / variant_name(f, "concat") / "results.json").exists() for f in fusions):
                    if report_only:
                        continue
                    train(cfg, resume=(out / "config.json").exists(), progress=False)
                got = evaluate(out, [group["demo-test"].url], device="cpu", manifest=manifest_of(group["demo-test"]))
                for name, m in got.items():
                    scores.setdefault((name, codec), []).append(float(m[metric]))
                print(f"  {task} {codec} seed {seed}: " + ", ".join(f"{n} {m[metric]:.4f}" for n, m in got.items()),
                      flush=True)
        print(f"\n{task}: {steps_here} steps, {max_frames} frames per batch; test {metric} ({better} is better), "
              f"mean +- sd over {len(seeds)} seeds\n")
        print("| variant | " + " | ".join("fp16" if c == FP16 else c for c in stores) + " |")
        print("|---|" + "---|" * len(stores))
        for name in sorted({n for n, _ in scores}):
            ref = np.array(scores[(name, FP16)])
            cells = []
            for codec in stores:
                v = np.array(scores.get((name, codec), []))
                if len(v) < len(ref):  # not trained (yet): a partial row says so
                    cells.append(f"{len(v)} of {len(ref)} seeds")
                    continue
                paired = v - ref  # same seed: same initialisation and batch order, only the features differ
                mark = "" if codec == FP16 else (
                    f" (within; paired diff {paired.mean():+.3f} +- {paired.std(ddof=1):.3f})"
                    if abs(v.mean() - ref.mean()) <= ref.std(ddof=1) else
                    f" (OUTSIDE; paired diff {paired.mean():+.3f} +- {paired.std(ddof=1):.3f})")
                cells.append(f"{v.mean():.3f} +- {v.std(ddof=1):.3f}{mark}")
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("\n(within: |mean - fp16 mean| <= the fp16 seed sd; paired diff: representation - fp16 per seed)")
        if task == "asr":  # HConv sometimes never leaves the CTC blank plateau in this budget: say which seeds
            stuck = [f"{n} {c} seed {seeds[i]}" for (n, c), v in scores.items() for i, x in enumerate(v) if x >= 0.99]
            print(f"runs left on the CTC blank plateau (cer >= 0.99): {', '.join(stuck) or 'none'}")
        print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="real Whisper-base directory (shared/tools/real_whisper_base.py)")
    ap.add_argument("--cache", default=None, help="where the stores go (default: a temporary directory); reused")
    ap.add_argument("--codecs", default=",".join(LOSSY))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="asr steps (classify: half)")
    ap.add_argument("--max-frames", type=int, default=2000, help="padded frames per training batch")
    ap.add_argument("--train-codecs", default="int8-std10,int8-std08,int8", help="representations trained beside fp16")
    ap.add_argument("--speed-chunks", type=int, default=4)
    ap.add_argument("--wavlm-seconds", type=float, default=60.0, help="audio for the random WavLM (0: skip)")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--tasks", default="asr,classify")
    ap.add_argument("--report-only", action="store_true", help="tabulate the finished runs under --cache, train none")
    args = ap.parse_args()
    work = Path(args.cache or tempfile.mkdtemp(prefix="bench-storage-"))
    codecs = [FP16] + [c for c in args.codecs.split(",") if c]
    manifests = bundled_manifests()

    by_codec = {}
    if args.model and Path(args.model).is_dir():
        by_codec = {c: {} for c in codecs}
        for m in manifests:
            r = extract(m, args.model, work / "real", device="cpu", codec=FP16, progress=False)
            src = FeatureStore.open(r.url)
            by_codec[FP16][m.name] = src
            for c in codecs[1:]:
                by_codec[c][m.name] = reencode(src, str(work / "real" / m.name / f"{Path(args.model).name}.{c}.zarr"), c)
        storage_table(f"Real pretrained Whisper-base ({args.model}), bundled corpus",
                      {c: list(g.values()) for c, g in by_codec.items()}, args.speed_chunks)
    else:
        print(f"SKIPPED the real Whisper-base part: --model {args.model!r} is not a directory. Build it with "
              "`python /work/shared/tools/real_whisper_base.py OUTDIR` and pass --model OUTDIR; codecs must be "
              "chosen on real activations, not on random weights.")

    if args.wavlm_seconds > 0:
        model = make_local_model("wavlm", work / "wavlm-base-random", size="base")
        m = manifests[0].first(args.wavlm_seconds)
        m = read_manifest(write_manifest(m, work / "wavlm" / f"{m.name}.tsv"))  # stores find their labels by path
        r = extract(m, str(model), work / "wavlm", device="cpu", codec=FP16, progress=False)
        src = FeatureStore.open(r.url)
        stores = {FP16: [src]} | {c: [reencode(src, r.url.replace(".zarr", f".{c}.zarr"), c)] for c in codecs[1:]}
        storage_table(f"Random-weight base-size WavLM (SSL shape), {m.name}", stores, args.speed_chunks)

    if not args.no_train and by_codec:
        trained = [FP16] + [c for c in args.train_codecs.split(",") if c in by_codec]
        downstream({c: by_codec[c] for c in trained}, list(range(args.seeds)), args.steps, args.max_frames, work,
                   args.tasks.split(","), args.report_only)


if __name__ == "__main__":
    main()
