"""Using a trained run on raw audio: `fusionpipe predict` and `fusionpipe.load` repeat what `evaluate` computes
from the cache, stream their inputs, and refuse bad input before writing anything."""

import json
import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import fusionpipe
from fusionpipe import audio
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.batching import plan
from fusionpipe.extract.defaults import MAX_SECONDS
from fusionpipe.extract.stage import extract
from fusionpipe.manifest import CORPUS, Manifest, Utterance, bundled_manifests, read_manifest, write_manifest
from fusionpipe.predict import predict
from fusionpipe.predict.model import best_variant, load_recorded, recorded_upstreams
from fusionpipe.predict.output import RowWriter
from fusionpipe.predict.run import blocks
from fusionpipe.rttm import Turn, format_turns, read_rttm
from fusionpipe.store import FeatureStore
from fusionpipe.train.evaluation import eval_loader, evaluate, predictions, predictor, trained_variants
from fusionpipe.train.loop import train
from fusionpipe.train.rundir import RunDir
from fusionpipe.train.tasks.metrics import eer

CPU = torch.device("cpu")


# ---- helpers: the same outputs from the cache (evaluate's loop) and from audio (predict) ------------------------
def from_cache(run, stores, variant: str) -> dict[str, dict]:
    """Utterance id -> the task's outputs, computed as `evaluate` computes: its loader over the stores, the
    variant's best.pt, its batches; also checks that the outputs decode to `evaluate`'s own predictions."""
    run = RunDir(run)
    cfg, task = run.config(), run.task()
    loader = eval_loader(cfg, stores, None, CPU)
    (v,) = trained_variants(run, cfg, task, loader.dataset.view, CPU, [variant])
    out = {}
    with torch.no_grad():
        for batch in loader:
            feats = v.model.features(batch["stacks"], batch["lengths"])
            out.update(zip(batch["ids"], task.outputs(v.model.head, feats, batch["lengths"])))
    preds, targets, _ = predictions(loader, CPU, {variant: predictor(v, task)})
    decoded = dict(zip(targets["id"], preds[variant]))
    for u, o in out.items():
        p = decoded[u]
        if "embedding" in o:
            assert np.array_equal(p, o["embedding"]), u
        else:
            assert (format_turns(p) if "turns" in o else p) == next(iter(o.values())), u
    return out


def from_audio(run, manifest, tmp_path, **kw) -> dict[str, dict]:
    out = tmp_path / "predicted.jsonl"
    predict(run, manifest=manifest, out=out, device="cpu", progress=False, **kw)
    return {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}


def differences(cached: dict, audio: dict) -> dict:
    """How far the outputs from audio are from the cache's: decoded outputs that differ, and the largest
    difference of a number (probability, embedding value)."""
    assert cached.keys() == audio.keys()
    decoded = [u for u in cached if any(cached[u][k] != audio[u][k]
                                        for k in ("label", "transcript", "phonemes", "turns") if k in cached[u])]
    numbers = [np.abs(np.subtract(cached[u][k] if k == "embedding" else list(cached[u][k].values()),
                                  audio[u][k] if k == "embedding" else list(audio[u][k].values()))).max()
               for u in cached for k in ("embedding", "probabilities") if k in cached[u]]
    return {"decoded": decoded, "max_abs": float(max(numbers, default=0.0))}


def manifest_of(store_url: str):
    return read_manifest(FeatureStore.open(store_url).info.manifest_path)


@pytest.fixture(scope="module")
def classify_run(pitch_stores, tmp_path_factory, train_config):
    """A finished classify run (hconv and weighted sum) on the pitch stores (float16, toy-wavlm + toy-whisper)."""
    out = tmp_path_factory.mktemp("predict") / "run"
    train(train_config(pitch_stores, out, steps=20, fusion=["hconv", "weighted-sum"]), progress=False)
    return out


# ---- equivalence ---------------------------------------------------------------------------------------------
def test_predict_from_audio_equals_evaluate_from_the_cache_bit_for_bit(classify_run, pitch_stores, tmp_path):
    """A float16 store computed in float32 on the CPU: the features, batches and outputs are the cache's."""
    dev = manifest_of(pitch_stores["dev"][0])
    cached = from_cache(classify_run, pitch_stores["dev"], "hconv-concat")
    audio = from_audio(classify_run, dev.source, tmp_path, variant="hconv-concat")
    assert differences(cached, audio) == {"decoded": [], "max_abs": 0.0}
    metrics = evaluate(classify_run, pitch_stores["dev"], device="cpu", variant="hconv-concat")["hconv-concat"]
    labels = [audio[u.id]["label"] for u in dev]
    assert metrics["accuracy"] == np.mean([p == u.label for p, u in zip(labels, dev)])


def test_the_module_encodes_audio_into_the_cached_features(classify_run, pitch_stores):
    """Beneath every output: in stage 1's batches (its plan) each upstream's features are its store's bytes;
    in other batches they agree to the storage dtype's rounding (BLAS kernels differ by batch shape)."""
    dev = manifest_of(pitch_stores["dev"][0])
    model = fusionpipe.load(classify_run, variant="hconv-concat", device="cpu")
    waves = [audio.load(dev, i) for i in range(len(dev))]
    for k, url in enumerate(pitch_stores["dev"]):
        store = FeatureStore.open(url)
        p = plan(dev, model.upstreams[k], MAX_SECONDS)
        for batch in p.batches:
            rows = [p.rows[i] for i in batch]
            for r, f in zip(rows, model.encode(k, [waves[r] for r in rows])):
                assert np.array_equal(f.numpy(), store.read(dev[r].id)), dev[r].id
        for u, wave in zip(dev, waves):
            (f,) = model.encode(k, [wave])
            np.testing.assert_allclose(f.float().numpy(), store.read(u.id).astype(np.float32), rtol=2 ** -9,
                                       atol=2 ** -14)


def test_predict_in_small_blocks_gives_the_same_labels(classify_run, pitch_stores, tmp_path):
    """Streaming: blocks of 2 s of audio, so other batches than the cache's; the numbers agree to the
    features' rounding, the labels exactly."""
    dev = manifest_of(pitch_stores["dev"][0])
    whole = from_audio(classify_run, dev.source, tmp_path, variant="hconv-concat")
    streamed = from_audio(classify_run, dev.source, tmp_path, variant="hconv-concat", block_seconds=2.0)
    diff = differences(whole, streamed)
    assert diff["decoded"] == [] and diff["max_abs"] < 1e-5


def test_load_is_one_torch_module_on_waveforms(classify_run, pitch_stores):
    dev = manifest_of(pitch_stores["dev"][0])
    model = fusionpipe.load(classify_run, variant="hconv-concat", device="cpu")
    assert isinstance(model, nn.Module) and model.to("cpu") is model and not model.training
    waves = [torch.from_numpy(sf.read(str(dev.audio_path(u)), dtype="float32")[0]) for u in dev][:3]
    outputs = model(waves)
    padded = nn.utils.rnn.pad_sequence(waves, batch_first=True)
    assert model(padded, torch.tensor([len(w) for w in waves])) == outputs
    cached = from_cache(classify_run, pitch_stores["dev"], "hconv-concat")
    assert [o["label"] for o in outputs] == [cached[u.id]["label"] for u in list(dev)[:3]]
    assert set(outputs[0]["probabilities"]) == {"high", "low"}


def test_the_default_variant_is_the_best_by_the_selection_metric(classify_run):
    run = RunDir(classify_run)
    dev = {name: run.results(name)["dev"]["accuracy"] for name in ("hconv-concat", "weighted-sum-concat")}
    assert best_variant(run, run.config()) == max(dev, key=dev.get)  # ties: the first, as max


def test_the_cli_prints_one_row_per_audio_file(classify_run, pitch_stores, tmp_path):
    from fusionpipe.cli import app

    files = [str(manifest_of(pitch_stores["dev"][0]).audio_path(u)) for u in manifest_of(pitch_stores["dev"][0])][:2]
    result = CliRunner().invoke(app, ["predict", str(classify_run), *files, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines[0].split("\t") == ["id", "path", "label", "probabilities"] and len(lines) == 3


# ---- bad input: a clear error, nothing half-written --------------------------------------------------------------
@pytest.fixture
def dev_files(pitch_stores):
    dev = manifest_of(pitch_stores["dev"][0])
    return [dev.audio_path(u) for u in dev]


def predict_error(run, files, out, **kw) -> str:
    """The error of a predict call whose --out held "before": the message, once checked that --out is as it was."""
    out.parent.mkdir(exist_ok=True)
    out.write_text("before")
    with pytest.raises(FusionpipeError) as e:
        predict(run, files, out=out, device="cpu", progress=False, **kw)
    assert out.read_text() == "before" and [p.name for p in out.parent.iterdir()] == [out.name]
    return str(e.value)


def test_unreadable_audio_is_named_before_anything_runs(classify_run, dev_files, tmp_path):
    bad = tmp_path / "in" / "notes.wav"
    bad.parent.mkdir()
    bad.write_text("not audio")
    message = predict_error(classify_run, [*dev_files, bad], tmp_path / "out" / "p.tsv")
    assert str(bad) in message and "cannot read" in message


def test_silent_audio_is_refused_and_out_stays_as_it_was(classify_run, dev_files, tmp_path):
    silent = tmp_path / "in" / "silent.wav"
    silent.parent.mkdir()
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    message = predict_error(classify_run, [*dev_files, silent], tmp_path / "out" / "p.json")
    assert "silent" in message and "silent.wav" in message


def test_a_variant_that_does_not_exist_lists_those_that_do(classify_run, dev_files, tmp_path):
    message = predict_error(classify_run, dev_files, tmp_path / "out" / "p.tsv", variant="gumbel-add")
    assert "no variant gumbel-add" in message and "hconv-concat, weighted-sum-concat" in message


def test_a_run_without_checkpoints_is_refused(classify_run, dev_files, tmp_path):
    copy = shutil.copytree(classify_run, tmp_path / "run")
    for best in copy.glob("*/best.pt"):
        best.unlink()
    message = predict_error(copy, dev_files, tmp_path / "out" / "p.tsv", variant="hconv-concat")
    assert "hconv-concat have no best.pt" in message


def test_a_user_error_on_the_command_line_exits_1_without_a_traceback(classify_run, dev_files, monkeypatch, capsys):
    from fusionpipe.cli import main

    monkeypatch.setattr(sys, "argv", ["fusionpipe", "predict", str(classify_run), str(dev_files[0]),
                                      "--variant", "gumbel-add", "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and "no variant gumbel-add" in err and "Traceback" not in err


def recorded_copy(pitch_stores, tmp_path, **upstream):
    """The run's first upstream as recorded by a copy of its store whose attributes say ``upstream``."""
    url = shutil.copytree(pitch_stores["train"][0], tmp_path / "store.zarr")
    group = zarr.open_group(str(url), mode="r+")
    group.attrs["upstream"] = {**group.attrs["upstream"], **upstream}
    (rec,) = recorded_upstreams(type("Cfg", (), {"stores": [str(url)]}))
    return rec


def test_a_store_gone_from_here_says_where_a_relative_one_was_named_from(tmp_path, monkeypatch):
    """A run trained in another directory named its stores relative to it: the error says to run from there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FusionpipeError, match=r"cache/x\.zarr is gone: .* relative to the directory it was trained in"):
        recorded_upstreams(SimpleNamespace(stores=["cache/x.zarr"]))
    with pytest.raises(FusionpipeError, match=r"is gone: .*; extract it again") as absolute:
        recorded_upstreams(SimpleNamespace(stores=[str(tmp_path / "x.zarr")]))
    assert "relative" not in str(absolute.value)


def test_weights_that_cannot_be_found_name_the_upstream_and_where_it_looked(pitch_stores, tmp_path):
    rec = recorded_copy(pitch_stores, tmp_path, name="my-wavlm", model_id=str(tmp_path / "gone" / "my-wavlm"))
    with pytest.raises(FusionpipeError, match=r"upstream my-wavlm .* Looked in the directory .*gone/my-wavlm"):
        load_recorded(rec, "cpu")


def test_an_alias_is_looked_for_in_the_hub_cache_under_its_hub_id(pitch_stores, tmp_path):
    rec = recorded_copy(pitch_stores, tmp_path, name="wavlm-base-plus", model_id="microsoft/wavlm-base-plus")
    assert rec.source == "wavlm-base-plus" and rec.searched().startswith("the hub cache ")
    assert rec.searched().split(" for ")[1].startswith("microsoft/wavlm-base-plus")


def test_other_weights_than_the_stores_are_refused_naming_the_upstream(pitch_stores, tmp_path):
    rec = recorded_copy(pitch_stores, tmp_path, revision="0" * 64)
    with pytest.raises(FusionpipeError, match=r"upstream toy-wavlm: the weights at .* not those .*\(000000000000\)"):
        load_recorded(rec, "cpu")


def test_an_unknown_out_format_is_refused_before_the_model_loads(classify_run, dev_files, tmp_path):
    with pytest.raises(FusionpipeError, match=r"--out .*p\.csv: name a \.tsv, \.json, \.jsonl, \.rttm file"):
        predict(classify_run, dev_files, out=tmp_path / "p.csv", progress=False)


def test_a_killed_predicts_temporary_is_removed_by_the_next_and_a_running_ones_is_kept(tmp_path):
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".out.tsv.{dead.pid}.00ff00ff.tmp"
    running = tmp_path / f".out.tsv.{os.getpid()}.00ff00ff.tmp"
    other = tmp_path / f".other.tsv.{dead.pid}.00ff00ff.tmp"
    for f in (killed, running, other):
        f.write_text("half")
    with RowWriter(tmp_path / "out.tsv") as w:
        w.write({"id": "u1", "label": "x"})
    assert not killed.exists() and running.exists() and other.exists()
    assert (tmp_path / "out.tsv").read_text() == "id\tlabel\nu1\tx\n"


def test_a_full_disk_under_out_is_named_and_leaves_the_old_file(tmp_path):
    import errno

    out = tmp_path / "out.jsonl"
    out.write_text("old\n")

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FusionpipeError, match=r"--out .*out.jsonl: the disk is full .* the file is as it was"):
        with RowWriter(out) as w:
            w.file.write = full
            w.write({"id": "u1", "label": "x"})
    assert out.read_text() == "old\n" and not list(tmp_path.glob(".*.tmp"))


def test_turns_are_written_as_rttm_and_other_outputs_are_refused_whole(tmp_path):
    out = tmp_path / "p.rttm"
    with RowWriter(out) as w:
        w.write({"id": "mix1", "path": "mix1.wav", "turns": "0.80,2.10,s2;0.00,1.25,s1"})
        w.write({"id": "mix2", "path": "mix2.wav", "turns": ""})
    assert read_rttm(out) == {"mix1": [Turn(0.0, 1.25, "s1"), Turn(0.8, 2.1, "s2")]}
    with pytest.raises(FusionpipeError, match=r"p\.rttm: RTTM holds who speaks when, .* writes label"):
        with RowWriter(out) as w:
            w.write({"id": "u1", "path": "u1.wav", "label": "sad"})
    assert read_rttm(out)["mix1"] and [p.name for p in tmp_path.iterdir()] == ["p.rttm"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 20.0), max_size=30), st.floats(0.5, 30.0))
def test_blocks_cover_every_input_once_in_order_within_the_budget(durations, seconds):
    rows = [Utterance(f"u{i}", f"u{i}.wav", int(d * 16000), 16000) for i, d in enumerate(durations)]
    got = list(blocks(Manifest("m", ".", rows), seconds))
    assert [u for b in got for u in b] == rows
    assert all(len(b) == 1 or b.duration <= seconds + 1e-9 for b in got) and all(len(b) for b in got)


# ---- every task on the bundled corpus, per store format ---------------------------------------------------------
TASKS = {"asr": {"head_options": {"proj": 16, "hidden": 16, "layers": 1}}, "classify": {},
         "phoneme": {"head_options": {"proj": 16, "hidden": 16, "layers": 1}},
         "verify": {"head_options": {"proj": 16, "embed_dim": 16, "tdnn": 16, "last": 32}},
         "multilingual": {"head_options": {"proj": 16, "d_model": 16, "layers": 1, "heads": 2, "ffn": 32}}}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The first 30 s of the bundled train manifest and three utterances of each of the first three test
    speakers (so that trials have targets and non-targets), written as manifests of their own."""
    root = tmp_path_factory.mktemp("bundled")
    train_m, _, test_m = bundled_manifests()
    speakers = list(dict.fromkeys(u.speaker for u in test_m))[:3]
    test_rows = [u for s in speakers for u in [u for u in test_m if u.speaker == s][:3]]
    return {split: read_manifest(write_manifest(m, root / f"b{split}.tsv", root=str(m.root)))
            for split, m in (("train", train_m.first(30, "btrain")),
                             ("test", Manifest("btest", test_m.root, test_rows)))}


@pytest.mark.slow
@pytest.mark.parametrize("codec,dtype", [("zstd", "float32"), ("zstd", "float16"), ("int8-std08", "float16")])
def test_every_task_predicts_from_audio_what_evaluate_computes_from_the_cache(bundled, codec, dtype, tmp_path,
                                                                              train_config):
    stores = {split: [extract(m, up, tmp_path / "cache", device="cpu", dtype=dtype, codec=codec,
                              progress=False).url for up in ("toy-wavlm", "toy-whisper")]
              for split, m in bundled.items()}
    test = list(bundled["test"])
    (tmp_path / "trials.txt").write_text("".join(f"{int(a.speaker == b.speaker)} {a.id} {b.id}\n"
                                                 for i, a in enumerate(test) for b in test[i + 1:]))
    report = {}
    for task, kw in TASKS.items():
        run = tmp_path / task
        train(train_config({"train": stores["train"], "dev": stores["test"]}, run, task=task, steps=6, eval_every=3,
                           trials=str(tmp_path / "trials.txt") if task == "verify" else None,
                           **{"head_options": {"proj": 16}, **kw}), progress=False)
        variant = best_variant(RunDir(run), RunDir(run).config())
        cached = from_cache(run, stores["test"], variant)
        audio = from_audio(run, bundled["test"].source, tmp_path, variant=variant)
        report[task] = differences(cached, audio)
        if task == "verify":  # the trial scores of --trials rank as evaluate's
            scored = predict(run, manifest=bundled["test"].source, trials=tmp_path / "trials.txt",
                             scores=tmp_path / "scores.tsv", variant=variant, device="cpu", progress=False).scores
            evaluated = evaluate(run, stores["test"], trials=str(tmp_path / "trials.txt"), device="cpu",
                                 variant=variant)[variant]["eer"]
            report["eer"] = abs(eer([s for *_, s in scored], [label for _, _, label, _ in scored]) - evaluated)
            assert len((tmp_path / "scores.tsv").read_text().splitlines()) == len(scored) + 1
    assert bool(fusionpipe.load(run, device="cpu").lossy) == (codec == "int8-std08")
    print(f"\n{codec} {dtype}: predict from audio against evaluate from the cache: {report}")
    if codec in ("zstd",):  # lossless: on the CPU both compute in float32 and store the same cast
        assert all(r in ({"decoded": [], "max_abs": 0.0}, 0.0) for r in report.values()), report
    else:  # lossy: the difference is measured and reported (printed above), never zero for every task
        assert any(r["max_abs"] > 0 for r in report.values() if isinstance(r, dict)), report


def test_diarize_predicts_from_audio_the_turns_evaluate_computes_and_writes_them_as_rttm(tmp_path, train_config):
    """The bundled two-speaker mixtures: the turns from audio are the cache's, bit for bit, and --out X.rttm
    holds them."""
    mixtures = read_manifest(CORPUS / "mix-test.tsv")
    stores = [extract(mixtures, up, tmp_path / "cache", device="cpu", progress=False).url
              for up in ("toy-wavlm", "toy-whisper")]
    run = tmp_path / "sd"
    train(train_config({"train": stores, "dev": stores}, run, task="diarize", steps=6, eval_every=3,
                       head_options={"hidden": 8}), progress=False)
    variant = best_variant(RunDir(run), RunDir(run).config())
    cached = from_cache(run, stores, variant)
    audio = from_audio(run, mixtures.source, tmp_path, variant=variant)
    assert differences(cached, audio) == {"decoded": [], "max_abs": 0.0}
    predict(run, manifest=mixtures.source, out=tmp_path / "sd.rttm", device="cpu", progress=False, variant=variant)
    written = read_rttm(tmp_path / "sd.rttm", [u.id for u in mixtures])
    assert written, "the run predicts some speech"
    assert {u: format_turns(turns) for u, turns in written.items()} == {u: o["turns"] for u, o in audio.items()
                                                                        if o["turns"]}
