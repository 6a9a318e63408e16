"""The diarize task (SUPERB SD): PIT loss, DER, labels on the fused view's frames, its errors, and training
end to end (synthetic stores here; 2-speaker mixtures of the bundled corpus through the CLI, marked slow)."""

import itertools
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.stage import extract
from fusionpipe.fuse.loader import make_loader
from fusionpipe.manifest import Manifest, Utterance, bundled_manifests, read_manifest, write_manifest
from fusionpipe.rttm import Turn, format_turns, parse_turns, read_rttm
from fusionpipe.train.evaluation import evaluate
from fusionpipe.train.interfaces import frame_mask
from fusionpipe.train.loop import TrainConfig, train
from fusionpipe.train.tasks import batch_targets, build_task
from fusionpipe.train.tasks.diarize import diarization_error, frame_labels, pit_bce, segments

runner = CliRunner()


def brute_force_pit_bce(logits, labels, lengths):
    """The definition: the mean BCE over valid frames and slots, under the best of all N! permutations."""
    mask = frame_mask(lengths, logits.shape[1]).to(logits.dtype)[..., None]
    per_permutation = []
    for p in itertools.permutations(range(logits.shape[2])):
        bce = F.binary_cross_entropy_with_logits(logits, labels[..., list(p)], reduction="none")
        per_permutation.append((bce * mask).sum((1, 2)) / (lengths * logits.shape[2]))
    return torch.stack(per_permutation).min(0).values


@pytest.mark.parametrize("speakers", [1, 2, 3, 4])
def test_pit_loss_is_the_minimum_over_every_permutation(speakers):
    torch.manual_seed(speakers)
    lengths = torch.tensor([30, 17, 5])
    logits = torch.randn(3, 30, speakers, requires_grad=True)
    labels = (torch.rand(3, 30, speakers) > 0.5).float()
    labels[1, 17:] = 7.0  # padding holds anything: it must not count
    got = pit_bce(logits, labels, lengths)
    torch.testing.assert_close(got, brute_force_pit_bce(logits, labels, lengths))
    got.sum().backward()
    assert logits.grad[1, 17:].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


def test_pit_loss_does_not_care_which_slot_a_speaker_takes():
    labels = torch.zeros(1, 10, 2)
    labels[0, :6, 0] = 1
    labels[0, 4:, 1] = 1
    logits = 8 * (2 * labels - 1)
    swapped = logits.flip(-1)
    lengths = torch.tensor([10])
    assert pit_bce(swapped, labels, lengths).item() == pytest.approx(pit_bce(logits, labels, lengths).item())
    assert pit_bce(logits, labels, lengths).item() < 1e-3


def test_der_on_hand_built_recordings():
    """Recording 1: a 0-4 s and b 3-6 s against x 0-3 s, y 3-7 s (x = a, y = b): 1 s of a missed where both
    speak, 1 s of false alarm after 6 s. Recording 2: a 0-2 s, b 2-4 s against x 0-3 s, y 3-4 s: 1 s of b
    given to a's slot, confusion. Reference speech 7 + 4 s; collar 0, overlap scored."""
    refs = [[Turn(0, 4, "a"), Turn(3, 6, "b")], [Turn(0, 2, "a"), Turn(2, 4, "b")]]
    hyps = [[Turn(0, 3, "x"), Turn(3, 7, "y")], [Turn(0, 3, "x"), Turn(3, 4, "y")]]
    got = diarization_error(refs, hyps)
    assert got == pytest.approx({"der": 3 / 11, "miss": 1 / 11, "false_alarm": 1 / 11, "confusion": 1 / 11})
    assert all(type(v) is float for v in got.values())  # a checkpoint (weights_only) keeps plain floats only
    assert diarization_error(refs[:1], refs[:1])["der"] == 0
    with pytest.raises(FusionpipeError, match="no reference speech"):
        diarization_error([[]], [[Turn(0, 1, "x")]])


def test_frame_activity_back_to_turns():
    turns = [Turn(0.0, 0.5, "a"), Turn(0.3, 0.9, "b"), Turn(1.2, 1.5, "a")]
    labels = frame_labels(turns, 80, 50.0, 3)
    assert labels[:, 2].sum() == 0  # a third slot no one takes
    assert segments(labels > 0, 50.0) == [Turn(0.0, 0.5, "speaker0"), Turn(0.3, 0.9, "speaker1"),
                                          Turn(1.2, 1.5, "speaker0")]


@given(st.lists(st.lists(st.booleans(), min_size=12, max_size=12), min_size=1, max_size=3),
       st.sampled_from([12.5, 25.0, 50.0]))
def test_turns_on_the_frame_grid_become_exactly_their_frames_and_back(activity, rate):
    """Any per-frame activity of up to 3 speakers, written as turns on the grid, labels exactly those
    frames (each speaker in some slot: which one the loss leaves open), and `segments` gives as many turns
    back."""
    active = np.array(activity, dtype=bool).T  # (T, speakers)
    turns = segments(active, rate)  # named speaker<k> after column k
    speaking = [tuple(active[:, k]) for k in range(active.shape[1]) if active[:, k].any()]
    labels = frame_labels(turns, len(active), rate, 3).astype(bool)
    assert sorted(tuple(labels[:, k]) for k in range(len(speaking))) == sorted(speaking)
    assert not labels[:, len(speaking):].any()
    assert len(segments(labels, rate)) == len(turns)


# ---- labels on the fused view's frame grid -------------------------------------------------------------
TURNS = {"m0": "0.20,0.60,a;0.50,1.00,b", "m1": "0.00,0.30,b"}


def _stores(tmp_path, make_store, rates, turns=TURNS, seconds=1.0, features=None):
    """One store per frame rate over `turns`' recordings (each `seconds` long), with their manifest."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [Utterance(u, f"{u}.wav", int(16000 * seconds), 16000, turns=t) for u, t in turns.items()]
    manifest = Manifest("mix", tmp_path, rows, source=tmp_path / "mix.tsv")
    write_manifest(manifest, tmp_path / "mix.tsv")
    stores = []
    for k, rate in enumerate(rates):
        frames = round(seconds * rate)
        data = features(rate) if features else {u: np.zeros((frames, 2, 3), np.float32) for u in turns}
        stores.append(make_store(str(tmp_path / f"up{k}.zarr"), data, manifest, name=f"up{k}",
                                 frame_rate=float(rate)).url)
    return stores, manifest


@pytest.mark.parametrize("align_time, rate", [("max", 50), ("min", 25)])
def test_labels_land_on_the_frames_of_the_fused_view(tmp_path, make_store, align_time, rate):
    """Two upstreams of 50 and 25 frames per second: stage 2 aligns them to the faster under max, the slower
    under min, and the labels are put on exactly those frames."""
    stores, _ = _stores(tmp_path, make_store, [50, 25])
    loader = make_loader(stores, max_frames=1000, shuffle=False, align_time=align_time)
    view = loader.dataset.view
    assert view.frame_rate == rate
    task = build_task("diarize", {"id": list(TURNS), "turns": list(TURNS.values())}, frame_rate=view.frame_rate)
    batch = next(iter(loader))
    lengths = batch["lengths"].tolist()
    labels = task.labels(batch_targets(batch["rows"]), lengths, 2)
    assert labels.shape == (2, rate, 2) == (2, batch["stacks"][0].shape[2], 2)
    m0 = labels[[r.id for r in batch["rows"]].index("m0")]
    seconds = (torch.arange(rate) + 0.5) / rate  # each frame's centre
    assert torch.equal(m0[:, 0].bool(), (seconds >= 0.2) & (seconds < 0.6))
    assert torch.equal(m0[:, 1].bool(), (seconds >= 0.5) & (seconds < 1.0))
    assert int(m0[:, 0].sum()) == round(0.4 * rate)


def test_evaluate_writes_each_variants_predicted_turns_as_rttm(tmp_path, make_store):
    turns = _random_turns(4, 2)
    stores, _ = _stores(tmp_path, make_store, [50], turns, features=_activity_features(turns))
    run = tmp_path / "run"
    train(_config(stores, tmp_path, fusion=["weighted-sum", "hconv"], steps=1, eval_every=1), progress=False)
    scores = evaluate(run, stores, device="cpu", label="mix")
    for name in ("weighted-sum-add", "hconv-add"):
        predicted = read_rttm(run / f"eval-mix-{name}.rttm", recordings=turns)
        reference = {u: parse_turns(cell) for u, cell in turns.items()}
        hypotheses = [predicted.get(u, []) for u in reference]
        assert scores[name]["der"] == pytest.approx(diarization_error(list(reference.values()), hypotheses)["der"],
                                                    abs=2e-3)  # the RTTM keeps milliseconds


def test_a_run_is_evaluated_only_on_its_frame_grid(tmp_path, make_store):
    stores, _ = _stores(tmp_path, make_store, [50, 25])
    run = tmp_path / "run"
    train(TrainConfig(stores=stores, task="diarize", fusion=["weighted-sum"], merge=["add"], out=str(run), steps=1,
                      eval_every=1, head_options={"hidden": 4}, device="cpu", align_time="max"), progress=False)
    assert json.loads((run / "task.json").read_text())["frame_rate"] == 50.0
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "align_time": "min"}))  # now 25 frames per second
    with pytest.raises(FusionpipeError, match="frames of 50 per second and these stores fuse to 25"):
        evaluate(run, stores, device="cpu")


# ---- bad input, named before training ---------------------------------------------------------------
def _config(stores, tmp_path, **kw):
    return TrainConfig(**{**dict(stores=stores, task="diarize", fusion=["weighted-sum"], merge=["add"],
                                 out=str(tmp_path / "run"), steps=2, eval_every=2, head_options={"hidden": 4},
                                 device="cpu"), **kw})


def test_more_speakers_than_the_head_has_slots_names_the_recording(tmp_path, make_store):
    stores, _ = _stores(tmp_path, make_store, [50], turns={"m0": "0,0.5,a;0.2,0.7,b;0.6,0.9,c", "m1": "0,1,a"})
    with pytest.raises(FusionpipeError, match=r"utterance m0 .* has 3 speakers and the head 2 speaker slots; give "
                                              r"--head-option speakers=3"):
        train(_config(stores, tmp_path), progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
    train(_config(stores, tmp_path, head_options={"hidden": 4, "speakers": 3}), progress=False)


def test_a_malformed_or_overlapping_turns_cell_names_the_manifest_and_the_recording(tmp_path, make_store):
    for k, (cell, problem) in enumerate((("0,0.5,a;0.4,0.9,a", "two turns of speaker a overlap"),
                                         ("0,0.5", "is not start,end,speaker"))):
        stores, _ = _stores(tmp_path / str(k), make_store, [50], turns={"m0": "0,1,a", "m1": cell})
        with pytest.raises(FusionpipeError, match=rf"task diarize on .*mix.*utterance m1: .*{problem}"):
            train(_config(stores, tmp_path / str(k)), progress=False)


def test_random_crops_are_refused_for_diarize(tmp_path):
    with pytest.raises(FusionpipeError, match=r"--crop-seconds .* would move the frames under their labels"):
        _config(["x.zarr"], tmp_path, crop_seconds=[1.0, 2.0]).check_settings()


# ---- training end to end --------------------------------------------------------------------------------
def _activity_features(turns, seed=0, seconds=1.0):
    """Features that carry who speaks: channel k of every layer is speaker k's activity, plus noise."""
    def features(rate):
        rng = np.random.default_rng(seed)
        out = {}
        for u, cell in turns.items():
            active = frame_labels(parse_turns(cell), round(seconds * rate), rate, 3)
            x = 0.3 * rng.standard_normal((len(active), 2, 3)).astype(np.float32)
            out[u] = x + active[:, None, :]
        return out
    return features


def _random_turns(n, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        a0, b0 = sorted(rng.uniform(0, 0.6, 2))
        out[f"m{i}"] = format_turns([Turn(a0, a0 + 0.35, "a"), Turn(b0, min(1.0, b0 + 0.4), "b")])
    return out


def test_diarize_learns_who_speaks_when_from_the_features(tmp_path, make_store):
    """On stores whose features carry each speaker's activity, a short run reaches a low dev DER (a head
    that learned nothing scores about 1)."""
    train_turns, dev_turns = _random_turns(16, 0), _random_turns(6, 1)
    train_stores, _ = _stores(tmp_path / "train", make_store, [50], train_turns,
                              features=_activity_features(train_turns))
    dev_stores, _ = _stores(tmp_path / "dev", make_store, [50], dev_turns, features=_activity_features(dev_turns, 1))
    cfg = _config(train_stores, tmp_path, dev_stores=dev_stores, steps=60, eval_every=60, lr=1e-2,
                  head_options={"hidden": 16})
    results = train(cfg, progress=False)["weighted-sum-add"]
    assert results["dev"]["der"] < 0.25, results["dev"]


@pytest.fixture(scope="session")
def mixtures(tmp_path_factory):
    """2-speaker mixtures of the bundled corpus's clips: clip a at 0 s, clip b of another speaker from an offset
    (numpy sums), turns from where each clip lies; train and dev manifests, each cached for toy-wavlm and
    toy-whisper."""
    root = tmp_path_factory.mktemp("mix")
    corpus = bundled_manifests()[0]
    by_speaker = {}
    for u in corpus.utterances:
        by_speaker.setdefault(u.speaker, []).append(u)
    speakers = sorted(by_speaker)
    stores = {}
    for split, count, first in (("train", 10, 0), ("dev", 4, 10)):
        rows = []
        for i in range(first, first + count):
            a, b = by_speaker[speakers[i % len(speakers)]][0], by_speaker[speakers[(i + 5) % len(speakers)]][1]
            xa = sf.read(corpus.root / a.path, dtype="float32")[0]
            xb = sf.read(corpus.root / b.path, dtype="float32")[0]
            offset = int(16000 * (0.3 + 0.1 * (i % 5)))
            mix = np.zeros(max(len(xa), offset + len(xb)), np.float32)
            mix[:len(xa)] += xa
            mix[offset:offset + len(xb)] += xb
            name = f"{split}-{i:02d}"
            sf.write(root / f"{name}.wav", mix, 16000)
            turns = [Turn(0.0, len(xa) / 16000, a.speaker), Turn(offset / 16000, (offset + len(xb)) / 16000, b.speaker)]
            rows.append(Utterance(name, f"{name}.wav", len(mix), 16000, turns=format_turns(turns)))
        write_manifest(Manifest(f"mix-{split}", root, rows), root / f"mix-{split}.tsv", root=".")
        m = read_manifest(root / f"mix-{split}.tsv")
        stores[split] = [extract(m, model, root / "cache", device="cpu", progress=False).url
                         for model in ("toy-wavlm", "toy-whisper")]
    return root, stores


@pytest.mark.slow
def test_diarize_trains_evaluates_writes_rttm_and_is_analyzed_through_the_cli(mixtures, tmp_path):
    """No --task: a manifest with turns trains diarize by default."""
    root, stores = mixtures
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--stores", ",".join(stores["train"]), "--dev-stores",
                                 ",".join(stores["dev"]), "--fusion", "weighted-sum,hconv",
                                 "--merge", "concat", "--steps", "6", "--eval-every", "3", "--head-option",
                                 "hidden=16", "--out", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "der" in result.output
    result = runner.invoke(app, ["evaluate", str(run), "--stores", ",".join(stores["dev"]), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    scores = json.loads((run / "eval-mix-dev.json").read_text())
    assert set(scores) == {"weighted-sum-concat", "hconv-concat"}
    for name, metrics in scores.items():
        assert 0 <= metrics["der"] and math.isclose(metrics["der"], metrics["miss"] + metrics["false_alarm"]
                                                    + metrics["confusion"])
        predicted = read_rttm(run / f"eval-mix-dev-{name}.rttm", recordings=[f"dev-{i:02d}" for i in range(10, 14)])
        assert all(t.speaker.startswith("speaker") for turns in predicted.values() for t in turns)
    result = runner.invoke(app, ["analyze", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (run / "analysis" / "layer-use.csv").is_file()
    result = runner.invoke(app, ["train", "--stores", ",".join(stores["train"]), "--task", "diarize",
                                 "--crop-seconds", "1,2", "--out", str(tmp_path / "crop")])
    assert isinstance(result.exception, FusionpipeError) and "--crop-seconds" in str(result.exception)
