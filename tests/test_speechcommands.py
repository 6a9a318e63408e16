"""Keyword spotting (SUPERB KS): the Speech Commands v0.01 importer, its 12 labels, splits and silence clips."""

import json

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.corpora.speechcommands import CLASSES, import_speechcommands, split_of
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import read_manifest

WORDS = {"yes": ["0a7c2a8d_nohash_0", "0a7c2a8d_nohash_1", "1b4c9b89_nohash_0"],
         "stop": ["0a7c2a8d_nohash_0", "2c6d3924_nohash_0"],
         "cat": ["1b4c9b89_nohash_0", "3d86b69a_nohash_0"],
         "marvin": ["2c6d3924_nohash_0"]}
DEV = ["yes/1b4c9b89_nohash_0.wav", "cat/1b4c9b89_nohash_0.wav"]
TEST = ["stop/2c6d3924_nohash_0.wav", "marvin/2c6d3924_nohash_0.wav"]
NOISE_SECONDS = {"white_noise": 3.5, "running_tap": 2.0}


@pytest.fixture
def speechcommands(tmp_path):
    """A Speech Commands tree of four words (two keywords, two others), two noise files and the split lists."""
    root = tmp_path / "speech_commands_v0.01"
    rng = np.random.default_rng(0)
    for word, stems in WORDS.items():
        (root / word).mkdir(parents=True)
        for stem in stems:
            sf.write(root / word / f"{stem}.wav", 0.1 * rng.standard_normal(8000), 16000, subtype="PCM_16")
    (root / "_background_noise_").mkdir()
    for name, seconds in NOISE_SECONDS.items():
        sf.write(root / "_background_noise_" / f"{name}.wav", 0.1 * rng.standard_normal(int(seconds * 16000)),
                 16000, subtype="PCM_16")
    (root / "validation_list.txt").write_text("\n".join(DEV) + "\n")
    (root / "testing_list.txt").write_text("\n".join(TEST) + "\n")
    return root


def _words(m):
    return sorted(u.path for u in m if u.label != "_silence_")


def test_the_split_follows_the_official_lists_exactly(speechcommands, tmp_path):
    ms = import_speechcommands(speechcommands, tmp_path / "silence")
    assert _words(ms["speechcommands-dev"]) == sorted(DEV)
    assert _words(ms["speechcommands-test"]) == sorted(TEST)
    every = [f"{w}/{s}.wav" for w, stems in WORDS.items() for s in stems]
    assert _words(ms["speechcommands-train"]) == sorted(set(every) - set(DEV) - set(TEST))
    assert all(u.split == name.split("-")[1] for name, m in ms.items() for u in m)


def test_keywords_keep_their_word_other_words_are_unknown_and_speaker_is_the_hash_prefix(speechcommands, tmp_path):
    rows = {u.id: u for m in import_speechcommands(speechcommands, tmp_path / "silence").values() for u in m}
    assert (rows["yes-0a7c2a8d_nohash_1"].label, rows["yes-0a7c2a8d_nohash_1"].speaker) == ("yes", "0a7c2a8d")
    assert rows["stop-2c6d3924_nohash_0"].label == "stop"
    assert rows["cat-3d86b69a_nohash_0"].label == rows["marvin-2c6d3924_nohash_0"].label == "_unknown_"
    assert {u.label for u in rows.values()} <= set(CLASSES) and len(CLASSES) == 12


def test_silence_is_cut_into_whole_one_second_clips_of_the_noise(speechcommands, tmp_path):
    rows = [u for m in import_speechcommands(speechcommands, tmp_path / "silence").values() for u in m
            if u.label == "_silence_"]
    assert sorted(u.id for u in rows) == [f"silence-running_tap-{k:03d}" for k in range(2)] + \
        [f"silence-white_noise-{k:03d}" for k in range(3)]
    noise, _ = sf.read(speechcommands / "_background_noise_" / "white_noise.wav", dtype="int16")
    clip, rate = sf.read(tmp_path / "silence" / "silence-white_noise-002.wav", dtype="int16")
    assert rate == 16000 and np.array_equal(clip, noise[32000:48000])
    assert all(u.num_samples == 16000 and u.split == split_of(u.id) for u in rows)


def test_a_rerun_writes_the_same_silence_clips_and_manifests(speechcommands, tmp_path):
    first = import_speechcommands(speechcommands, tmp_path / "silence")
    clips = {p.name: p.read_bytes() for p in (tmp_path / "silence").iterdir()}
    again = import_speechcommands(speechcommands, tmp_path / "silence")
    assert {name: m.content_hash() for name, m in again.items()} == {n: m.content_hash() for n, m in first.items()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "silence").iterdir()} == clips


def test_the_split_rule_of_the_silence_clips_is_the_corpus_readmes_hash():
    # one speaker's files share a split (the hash is of the name before _nohash_), and the shares are ~10 %
    assert split_of("0a7c2a8d_nohash_0") == split_of("0a7c2a8d_nohash_1")
    shares = [split_of(f"silence-noise-{k:03d}") for k in range(2000)]
    assert 0.07 < shares.count("dev") / 2000 < 0.13 and 0.07 < shares.count("test") / 2000 < 0.13


@settings(max_examples=200, deadline=None)
@given(speaker=st.text(min_size=1, max_size=12).filter(lambda s: "_nohash_" not in s), take=st.integers(0, 99))
def test_a_speakers_files_always_share_the_split_the_hash_of_their_prefix_gives(speaker, take):
    assert split_of(f"{speaker}_nohash_{take}") == split_of(speaker) in ("train", "dev", "test")


def test_a_tree_without_word_folders_is_refused(speechcommands, tmp_path):
    for word in WORDS:
        for wav in (speechcommands / word).iterdir():
            wav.unlink()
    (speechcommands / "validation_list.txt").write_text("")
    (speechcommands / "testing_list.txt").write_text("")
    with pytest.raises(FusionpipeError, match="no <word>/\\*.wav under"):
        import_speechcommands(speechcommands, tmp_path / "silence")


@pytest.mark.parametrize("missing", ["validation_list.txt", "testing_list.txt"])
def test_a_tree_without_a_split_list_is_refused_naming_it_and_the_archive(speechcommands, tmp_path, missing):
    (speechcommands / missing).unlink()
    with pytest.raises(FusionpipeError, match=f"{missing} is missing.*speech_commands_v0.01.tar.gz"):
        import_speechcommands(speechcommands, tmp_path / "silence")
    assert not (tmp_path / "silence").exists()


def test_a_list_line_naming_a_missing_file_is_named_with_file_and_line(speechcommands, tmp_path):
    (speechcommands / "testing_list.txt").write_text("stop/2c6d3924_nohash_0.wav\n\nno/ffffffff_nohash_0.wav\n")
    with pytest.raises(FusionpipeError, match=r"testing_list.txt line 3: no/ffffffff_nohash_0.wav does not exist"):
        import_speechcommands(speechcommands, tmp_path / "silence")


def test_a_file_in_both_lists_is_named(speechcommands, tmp_path):
    (speechcommands / "testing_list.txt").write_text(DEV[1] + "\n")
    with pytest.raises(FusionpipeError, match=r"testing_list.txt line 1: cat/1b4c9b89_nohash_0.wav is also in "
                                              r"validation_list.txt"):
        import_speechcommands(speechcommands, tmp_path / "silence")


def test_the_cli_writes_three_manifests_and_the_clips_beside_them(speechcommands, tmp_path):
    out = tmp_path / "manifests"
    result = CliRunner().invoke(app, ["manifest", "speechcommands", str(speechcommands), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    dev = read_manifest(out / "speechcommands-dev.tsv")
    assert dev.root == speechcommands and all(dev.audio_path(u).is_file() for u in dev)
    silence = [u for s in ("train", "dev", "test") for u in read_manifest(out / f"speechcommands-{s}.tsv")
               if u.label == "_silence_"]
    assert len(silence) == 5 and all(u.path.startswith(str(out / "speechcommands-silence")) for u in silence)


def test_a_keyword_spotting_run_trains_with_classify_on_the_imported_manifests(speechcommands, tmp_path, train_config):
    from fusionpipe.extract.stage import extract
    from fusionpipe.manifest import write_manifest
    from fusionpipe.train.loop import train

    stores = {}
    manifests = import_speechcommands(speechcommands, tmp_path / "manifests" / "silence")
    for split in ("train", "dev"):
        m = read_manifest(write_manifest(manifests[f"speechcommands-{split}"], tmp_path / "manifests" / f"{split}.tsv"))
        stores[split] = [extract(m, "toy-wavlm", tmp_path / "cache", device="cpu", progress=False).url]
    res = train(train_config(stores, tmp_path / "run", steps=4, eval_every=2), progress=False)["hconv-concat"]
    assert 0 <= res["dev"]["accuracy"] <= 1
    classes = json.loads((tmp_path / "run" / "task.json").read_text())["classes"]
    train_rows = read_manifest(tmp_path / "manifests" / "train.tsv")
    assert classes == sorted({u.label for u in train_rows}) and "_unknown_" in classes
