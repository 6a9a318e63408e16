"""Stage 3: the trainer learns, resumes exactly, and trains K variants in one pass as K separate runs."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from fusionpipe.errors import FusionpipeError
from fusionpipe.extract import extract
from fusionpipe.manifest import Manifest, Utterance, read_manifest, write_manifest
from fusionpipe.train import TrainConfig, evaluate, train

TINY_HEAD = {"proj": 16}


def _tone(f0: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t + seed))
    phase = 2 * np.pi * np.cumsum(f) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 4)) + 0.05 * rng.standard_normal(n)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def pitch_stores(tmp_path_factory):
    """A learnable task: label 'low' (110 Hz voice) or 'high' (330 Hz), train and dev splits cached for
    toy-wavlm and toy-whisper."""
    root = tmp_path_factory.mktemp("pitch")
    stores = {}
    for split, n, seed in (("train", 24, 0), ("dev", 12, 1000)):
        rows = []
        for i in range(n):
            label = ("low", "high")[i % 2]
            samples = int(16000 * (0.6 + 0.1 * (i % 5)))
            name = f"{split}-{i:02d}"
            sf.write(root / f"{name}.wav", _tone(110 if label == "low" else 330, samples, seed + i), 16000)
            rows.append(Utterance(name, f"{name}.wav", samples, 16000, label=label, text="LOW" if label == "low" else "HIGH"))
        write_manifest(Manifest(f"pitch-{split}", root, rows), root / f"pitch-{split}.tsv", root=".")
        m = read_manifest(root / f"pitch-{split}.tsv")
        stores[split] = [extract(m, model, root / "cache", device="cpu", progress=False).url
                         for model in ("toy-wavlm", "toy-whisper")]
    return stores


def _cfg(stores, out, **kw):
    base = dict(stores=stores["train"], dev_stores=stores["dev"], task="classify", fusion=["hconv"],
                merge=["concat"], out=str(out), steps=30, eval_every=10, lr=3e-3, max_frames=600, head=TINY_HEAD,
                device="cpu")
    return TrainConfig(**{**base, **kw})


def _losses(run, variant):
    with open(run / variant / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_loss_falls_and_accuracy_beats_chance(pitch_stores, tmp_path):
    results = train(_cfg(pitch_stores, tmp_path / "run", steps=60), progress=False)
    res = results["hconv-concat"]
    losses = _losses(tmp_path / "run", "hconv-concat")
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert res["dev"]["accuracy"] >= 0.9  # chance is 0.5
    assert res["trainable_params"] > 0 and res["train_seconds_per_epoch"] > 0
    saved = json.loads((tmp_path / "run" / "hconv-concat" / "results.json").read_text())
    assert saved["dev"]["accuracy"] == res["dev"]["accuracy"]
    assert TrainConfig.load(tmp_path / "run" / "config.json").fusion == ["hconv"]


def test_variants_in_one_pass_equal_separate_runs(pitch_stores, tmp_path):
    kw = dict(steps=8, eval_every=4, specaugment=True)
    together = train(_cfg(pitch_stores, tmp_path / "all", fusion=["hconv", "gumbel"], merge=["add", "concat"], **kw),
                     progress=False)
    assert sorted(together) == ["gumbel-add", "gumbel-concat", "hconv-add", "hconv-concat"]
    for fusion, merge in (("gumbel", "add"), ("hconv", "concat")):
        name = f"{fusion}-{merge}"
        alone = train(_cfg(pitch_stores, tmp_path / name, fusion=[fusion], merge=[merge], **kw), progress=False)
        assert _losses(tmp_path / "all", name) == _losses(tmp_path / name, name)
        assert alone[name]["dev"]["accuracy"] == together[name]["dev"]["accuracy"]
        a = torch.load(tmp_path / "all" / name / "last.pt", weights_only=False)["model"]
        b = torch.load(tmp_path / name / name / "last.pt", weights_only=False)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_with_the_same_next_step_loss(pitch_stores, tmp_path):
    kw = dict(eval_every=3, specaugment=True, fusion=["weighted-sum"], merge=["add"])
    train(_cfg(pitch_stores, tmp_path / "straight", steps=9, **kw), progress=False)
    train(_cfg(pitch_stores, tmp_path / "resumed", steps=6, **kw), progress=False)  # crosses an epoch boundary
    train(_cfg(pitch_stores, tmp_path / "resumed", steps=9, **kw), resume=True, progress=False)
    assert _losses(tmp_path / "straight", "weighted-sum-add") == _losses(tmp_path / "resumed", "weighted-sum-add")


def test_existing_run_is_not_overwritten_without_resume(pitch_stores, tmp_path):
    train(_cfg(pitch_stores, tmp_path / "run", steps=2), progress=False)
    with pytest.raises(FusionpipeError, match="--resume"):
        train(_cfg(pitch_stores, tmp_path / "run", steps=2), progress=False)


def test_asr_trains_and_reports_wer_and_cer(pitch_stores, tmp_path):
    res = train(_cfg(pitch_stores, tmp_path / "asr", task="asr", steps=4, head={"proj": 16, "hidden": 16, "layers": 1}),
                progress=False)["hconv-concat"]
    assert {"wer", "cer"} <= set(res["dev"]) and 0 <= res["dev"]["cer"]


def test_evaluate_a_finished_run_on_other_stores(pitch_stores, tmp_path):
    train(_cfg(pitch_stores, tmp_path / "run", steps=20), progress=False)
    metrics = evaluate(tmp_path / "run", pitch_stores["dev"], device="cpu")
    best = torch.load(tmp_path / "run" / "hconv-concat" / "best.pt", weights_only=False)["metrics"]
    assert metrics["hconv-concat"]["accuracy"] == best["accuracy"]


def test_select_picks_the_best_checkpoint_by_the_named_metric(pitch_stores, tmp_path):
    train(_cfg(pitch_stores, tmp_path / "run", steps=30, eval_every=5, select="macro_f1"), progress=False)
    with open(tmp_path / "run" / "hconv-concat" / "log.csv") as f:
        evals = [json.loads(r["metrics"]) for r in csv.DictReader(f) if r["metrics"]]
    best = torch.load(tmp_path / "run" / "hconv-concat" / "best.pt", weights_only=False)["metrics"]
    assert len(evals) == 6 and best["macro_f1"] == max(e["macro_f1"] for e in evals)
    with pytest.raises(FusionpipeError, match="select='bleu'"):
        train(_cfg(pitch_stores, tmp_path / "other", steps=5, eval_every=5, select="bleu"), progress=False)
