"""The card's commands run exactly as written, and user errors end with a message, not a traceback."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fusionpipe.cli import app

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_card_commands_extract_train_evaluate_on_the_bundled_corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _ok(["extract", "--model", "toy-wavlm,toy-whisper"])
    assert "cache/demo-train/toy-whisper.zarr: 212 utterances" in out
    assert "already complete" in _ok(["extract", "--model", "toy-wavlm"])
    out = _ok(["train", "--fusion", "hconv", "--merge", "concat", "--steps", "2", "--eval-every", "2"])
    assert "hconv-concat" in out and "wer" in out
    run = tmp_path / "runs" / "asr-toy-wavlm+toy-whisper"
    assert json.loads((run / "config.json").read_text())["fusion"] == ["hconv"]
    out = _ok(["evaluate", str(run)])
    assert "on demo-test: wer=" in out and (run / "eval-demo-test.json").exists()
    out = _ok(["inspect", "cache/demo-test/toy-wavlm.zarr"])
    assert "complete" in out and "True" in out
    assert "ok" in _ok(["verify", "cache/demo-test/toy-wavlm.zarr"])
    out = _ok(["fuse", "--stores", "cache/demo-dev/toy-wavlm.zarr,cache/demo-dev/toy-whisper.zarr",
               "--merge", "concat", "--describe"])
    assert '"merge": "concat"' in out


def test_models_lists_the_registry():
    out = _ok(["models"])
    assert "wavlm-base-plus" in out and "microsoft/wavlm-base-plus" in out and "toy-whisper" in out


@pytest.mark.parametrize("args,message", [
    pytest.param(["extract", "--model", "wavlm-bass-plus"], "fusionpipe models", marks=pytest.mark.slow),
    (["extract", "--model", "toy-wavlm", "--manifest", "missing.tsv"], "missing.tsv does not exist"),
    pytest.param(["train", "--stores", "nowhere.zarr"], "not a fusionpipe feature store", marks=pytest.mark.slow),
])
def test_user_errors_exit_1_with_a_message_and_no_traceback(args, message, tmp_path):
    p = subprocess.run([sys.executable, "-m", "fusionpipe", *args], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1
    assert message in p.stderr and "Traceback" not in p.stderr


def test_cache_option_takes_an_fsspec_url(speech_manifest):
    from fusionpipe.store import FeatureStore

    out = _ok(["extract", "--model", "toy-wavlm", "--manifest", str(speech_manifest.source), "--cache", "memory://cli"])
    assert "memory://cli/speech/toy-wavlm.zarr: 5 utterances" in out
    assert FeatureStore.open("memory://cli/speech/toy-wavlm.zarr").is_complete()


@pytest.mark.slow
def test_train_and_evaluate_on_manifest_rows_of_one_extraction(speech_manifest, tmp_path, monkeypatch):
    from fusionpipe.manifest import Manifest, write_manifest

    monkeypatch.chdir(tmp_path)
    _ok(["extract", "--model", "toy-wavlm", "--manifest", str(speech_manifest.source), "--cache", "cache"])
    root = speech_manifest.source.parent
    for name, rows in (("part-train", speech_manifest.utterances[:3]), ("part-dev", speech_manifest.utterances[3:])):
        write_manifest(Manifest(name, speech_manifest.root, rows), root / f"{name}.tsv", root="audio")
    store = "cache/speech/toy-wavlm.zarr"
    out = _ok(["train", "--stores", store, "--manifest", str(root / "part-train.tsv"),
               "--dev-manifest", str(root / "part-dev.tsv"), "--task", "classify", "--fusion", "weighted-sum",
               "--merge", "add", "--steps", "2", "--eval-every", "2", "--head-option", "proj=8", "--out", "run"])
    assert "accuracy" in out
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["dev_stores"] == cfg["stores"] == [store] and cfg["dev_manifest"].endswith("part-dev.tsv")
    out = _ok(["evaluate", "run", "--stores", store, "--manifest", str(root / "part-dev.tsv"), "--device", "cpu"])
    assert "on part-dev: accuracy=" in out and (tmp_path / "run" / "eval-part-dev.json").exists()
    for command in ("train", "evaluate"):
        assert "--manifest" in _ok([command, "--help"])
