"""Using a trained model: `predict` on raw audio against `extract` + `evaluate` on the same files.

    python bench/predict.py                                  # toy-wavlm + toy-whisper, 120 s of demo-test, CPU
    python bench/predict.py --base wavlm whisper             # random-weight base-size models (make_local_model)
    python bench/predict.py --models wavlm-base-plus --seconds 300 --device cuda

Trains a small classify run (hconv, concat) on the stores of ``--train-seconds`` of demo-train, then, on
``--seconds`` of demo-test, side by side in one run (a warm-up of both first, so imports and first-call
initialisation land on neither):
  extract + evaluate  every upstream extracted into a fresh store (the default dtype and codec), then
                      `evaluate` of the run on those stores
  predict             `predict` of the run on the manifest: upstreams loaded, run, aligned, head; rows to a TSV
and prints audio-seconds per wall second of each, their ratio, and the accuracy each gives (the same labels
give the same accuracy).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionpipe.extract.stage import extract  # noqa: E402
from fusionpipe.extract.toys import make_local_model  # noqa: E402
from fusionpipe.manifest import bundled_manifests, read_manifest, write_manifest  # noqa: E402
from fusionpipe.predict import predict  # noqa: E402
from fusionpipe.train.config import TrainConfig  # noqa: E402
from fusionpipe.train.evaluation import evaluate  # noqa: E402
from fusionpipe.train.loop import train  # noqa: E402


def extract_and_evaluate(run: Path, manifest, models: list[str], cache: Path, device: str) -> tuple[float, float]:
    """(seconds, accuracy) of stage 1 over ``manifest`` for every upstream, then `evaluate` on the new stores."""
    t0 = time.perf_counter()
    stores = [extract(manifest, m, cache, device=device, progress=False).url for m in models]
    (metrics,) = evaluate(run, stores, device=device).values()
    return time.perf_counter() - t0, metrics["accuracy"]


def predict_and_score(run: Path, manifest_path: Path, out: Path, device: str) -> tuple[float, float]:
    """(seconds, accuracy) of `predict` over the manifest, its labels scored against the manifest's."""
    t0 = time.perf_counter()
    predict(run, manifest=manifest_path, out=out, device=device, progress=False)
    seconds = time.perf_counter() - t0
    with open(out, newline="") as f:
        labels = {row["id"]: row["label"] for row in csv.DictReader(f, delimiter="\t")}
    return seconds, sum(labels[u.id] == u.label for u in read_manifest(manifest_path)) / len(labels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["toy-wavlm", "toy-whisper"])
    ap.add_argument("--base", nargs="+", help="instead: random-weight base-size models of these kinds")
    ap.add_argument("--seconds", type=float, default=120.0, help="audio of demo-test to predict on")
    ap.add_argument("--train-seconds", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    train_m, _, test_m = bundled_manifests()
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    try:
        if args.base:
            args.models = [str(make_local_model(kind, tmp / f"{kind}-base", size="base")) for kind in args.base]
        root = str(test_m.root)
        warm = write_manifest(test_m.first(3, "warm"), tmp / "warm.tsv", root=root)
        test_path = write_manifest(test_m.first(args.seconds, "bench"), tmp / "bench.tsv", root=root)
        test = read_manifest(test_path)
        train_path = write_manifest(train_m.first(args.train_seconds, "bench-train"), tmp / "train.tsv",
                                    root=str(train_m.root))
        stores = [extract(read_manifest(train_path), m, tmp / "cache", device=args.device, progress=False).url
                  for m in args.models]
        run = tmp / "run"
        train(TrainConfig(stores=stores, task="classify", fusion=["hconv"], merge=["concat"], out=str(run),
                          steps=args.steps, eval_every=10**9, head_options={"proj": 64}, device=args.device),
              progress=False)

        extract_and_evaluate(run, read_manifest(warm), args.models, tmp / "warm-cache", args.device)
        predict_and_score(run, warm, tmp / "warm.out.tsv", args.device)
        t_cache, acc_cache = extract_and_evaluate(run, test, args.models, tmp / "test-cache", args.device)
        t_predict, acc_predict = predict_and_score(run, test_path, tmp / "out.tsv", args.device)

        audio = test.duration
        print(f"{len(test)} utterances, {audio:.1f} s of audio, upstreams {' + '.join(args.models)}, "
              f"device {args.device}")
        print(f"  extract + evaluate  {t_cache:7.2f} s  {audio / t_cache:8.1f} audio-s/s  accuracy {acc_cache:.4f}")
        print(f"  predict             {t_predict:7.2f} s  {audio / t_predict:8.1f} audio-s/s  accuracy {acc_predict:.4f}")
        print(f"  predict / (extract + evaluate) wall time: {t_predict / t_cache:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
