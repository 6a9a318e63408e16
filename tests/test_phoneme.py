"""Phoneme recognition (SUPERB PR): the phone vocabulary, PER, the phoneme task, LibriSpeech's lexicon."""

import dataclasses
import json
import tempfile
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.corpora.librispeech import read_lexicon
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import read_manifest
from fusionpipe.train.tasks import PhoneVocab, build_task, per, task_from_dict


def test_phone_vocab_has_blank_first_then_the_sorted_phones():
    assert PhoneVocab.from_texts(["HH AH0 L OW1", "L OW1"]).tokens == ["<blank>", "AH0", "HH", "L", "OW1"]


def test_phone_vocab_encodes_tokens_not_characters_and_decodes_with_single_spaces():
    vocab = PhoneVocab.from_texts(["HH AH0 L OW1"])
    assert vocab.encode("HH  AH0\tOW1") == [2, 1, 4]
    assert vocab.decode([2, 0, 1, 4]) == "HH AH0 OW1"


def test_phone_vocab_refuses_the_blank_as_a_phone():
    with pytest.raises(ValueError, match="phone string 1"):
        PhoneVocab.from_texts(["A B", "A <blank>"])


PHONE = st.text(st.characters(blacklist_categories=("Z", "C")), min_size=1, max_size=4).filter(lambda p: p != "<blank>")


@settings(max_examples=200, deadline=None)
@given(strings=st.lists(st.lists(PHONE, max_size=6), min_size=1, max_size=4))
def test_phone_strings_round_trip_through_the_vocabulary(strings):
    texts = [" ".join(phones) for phones in strings]
    vocab = PhoneVocab.from_texts(texts)
    assert [vocab.decode(vocab.encode(t)) for t in texts] == texts


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.tuples(st.sampled_from(["A", "B", "C'S"]), st.lists(PHONE, max_size=3),
                                st.sampled_from([" ", "\t", "  "])), max_size=6))
def test_a_lexicon_is_read_to_each_words_first_pronunciation_or_refused_by_line(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lexicon.txt"
        path.write_text("".join(sep.join([word, *phones]) + "\n" for word, phones, sep in lines))
        bad = [n for n, (_, phones, _) in enumerate(lines, 1) if not phones]
        if bad:
            with pytest.raises(FusionpipeError, match=f"line {bad[0]}:"):
                read_lexicon([path])
            return
        first = {}
        for word, phones, _ in lines:
            first.setdefault(word, " ".join(phones))
        assert read_lexicon([path]) == first


def test_per_equals_jiwers_wer_over_the_phone_strings():
    refs = ["HH AH0 L OW1", "W ER1 L D", "AY1"]
    hyps = ["HH AH1 L OW1 OW1", "W L D", ""]
    # 1 substitution + 1 insertion, 1 deletion, 1 deletion over 4 + 4 + 1 reference phones
    assert per(refs, hyps) == pytest.approx(4 / 9)
    assert per(refs, hyps) == jiwer.wer(refs, hyps)


def test_the_phoneme_task_keeps_its_phones_with_the_checkpoint():
    task = build_task("phoneme", {"phonemes": ["HH AH0 L OW1", "W ER1 L D"]})
    state = task.to_dict()
    assert state == {"task": "phoneme", "phones": ["<blank>", "AH0", "D", "ER1", "HH", "L", "OW1", "W"]}
    assert task_from_dict(state) == task


def test_phoneme_metrics_are_per_and_the_blank_share_the_plateau_detector_reads():
    task = build_task("phoneme", {"phonemes": ["AE1 B"]})
    assert task.metrics(["AE1", ""], {"phonemes": ["AE1 B", "B"]}) == {"per": pytest.approx(2 / 3), "blank": 0.5}


LEXICON = "HELLO  HH AH0 L OW1\nHELLO  HH EH0 L OW1\n\nWORLD\tW ER1 L D\nA  AH0\n"


@pytest.fixture
def librispeech(tmp_path):
    """A LibriSpeech tree of two utterances of one chapter, and a lexicon covering their words."""
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121"
    chapter.mkdir(parents=True)
    for utt in ("84-121-0000", "84-121-0001"):
        sf.write(chapter / f"{utt}.flac", np.zeros(1600, dtype=np.float32), 16000)
    (chapter / "84-121.trans.txt").write_text("84-121-0000 HELLO WORLD\n84-121-0001 A WORLD\n")
    (tmp_path / "lexicon.txt").write_text(LEXICON)
    return tmp_path / "LibriSpeech", tmp_path / "lexicon.txt"


def test_the_lexicon_maps_each_word_to_its_first_pronunciation_stress_kept(tmp_path):
    (tmp_path / "lexicon.txt").write_text(LEXICON)
    assert read_lexicon([tmp_path / "lexicon.txt"]) == {"HELLO": "HH AH0 L OW1", "WORLD": "W ER1 L D", "A": "AH0"}


def test_a_lexicon_line_without_phones_is_named(tmp_path):
    (tmp_path / "lexicon.txt").write_text("A AH0\nWORLD\n")
    with pytest.raises(FusionpipeError, match=r"lexicon.txt line 2: 'WORLD' has no phones"):
        read_lexicon([tmp_path / "lexicon.txt"])


def test_librispeech_with_a_lexicon_fills_the_phonemes_column(librispeech, tmp_path):
    root, lexicon = librispeech
    result = CliRunner().invoke(app, ["manifest", "librispeech", str(root), "--split", "dev-clean",
                                      "--lexicon", str(lexicon), "--out", str(tmp_path / "manifests")])
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "manifests" / "librispeech-dev-clean.tsv")
    assert [u.phonemes for u in m] == ["HH AH0 L OW1 W ER1 L D", "AH0 W ER1 L D"]
    assert [u.text for u in m] == ["HELLO WORLD", "A WORLD"]


def test_words_missing_from_the_lexicon_are_counted_and_named_with_their_transcript_line(librispeech, tmp_path):
    root, lexicon = librispeech
    lexicon.write_text("HELLO HH AH0 L OW1\n")
    result = CliRunner().invoke(app, ["manifest", "librispeech", str(root), "--split", "dev-clean",
                                      "--lexicon", str(lexicon), "--out", str(tmp_path / "manifests")])
    assert isinstance(result.exception, FusionpipeError), result.output
    message = str(result.exception)
    assert "2 words of dev-clean are missing" in message
    assert "WORLD (" in message and "84-121.trans.txt line 1)" in message
    assert "A (" in message and "84-121.trans.txt line 2)" in message
    assert not (tmp_path / "manifests").exists()


@pytest.fixture
def phoneme_manifests(tmp_path):
    """English rows of the bundled demo corpus (18 train, 6 dev) with a phonemes column made by `read_lexicon`
    from a lexicon written here: each word's letters as its phones (the corpus's own espeak-ng phones are
    another engineer's)."""
    from fusionpipe.manifest import Manifest, bundled_manifests, write_manifest

    demo = {m.name: m for m in bundled_manifests()}
    words = sorted({w for m in demo.values() for u in m for w in u.text.split()})
    (tmp_path / "lexicon.txt").write_text("".join(f"{w} {' '.join(c for c in w if c.isalpha())}\n" for w in words))
    lexicon = read_lexicon([tmp_path / "lexicon.txt"])
    paths = {}
    for split, n in (("train", 18), ("dev", 6)):
        rows = [u for u in demo[f"demo-{split}"] if u.language == "en"][:n]
        rows = [dataclasses.replace(u, phonemes=" ".join(lexicon[w] for w in u.text.split())) for u in rows]
        paths[split] = write_manifest(Manifest(f"phones-{split}", demo[f"demo-{split}"].root, rows),
                                      tmp_path / f"phones-{split}.tsv")
    return paths


PITCH_PHONES = {"low": "L OW1", "high": "HH AY1"}


def test_the_phoneme_task_trains_on_manifest_rows_with_phonemes_and_reports_per(pitch_stores, tmp_path, train_config):
    from fusionpipe.manifest import Manifest, write_manifest
    from fusionpipe.store import FeatureStore
    from fusionpipe.train.evaluation import evaluate
    from fusionpipe.train.loop import train

    rows = {}
    for split in ("train", "dev"):
        m = read_manifest(FeatureStore.open(pitch_stores[split][0]).attrs["manifest"]["path"])
        phones = [dataclasses.replace(u, phonemes=PITCH_PHONES[u.label]) for u in m]
        rows[split] = str(write_manifest(Manifest(f"phones-{split}", m.root, phones), tmp_path / f"phones-{split}.tsv"))
    cfg = train_config(pitch_stores, tmp_path / "run", task="phoneme", steps=4, eval_every=2, manifest=rows["train"],
                       dev_manifest=rows["dev"], head_options={"proj": 8, "hidden": 8})
    dev = train(cfg, progress=False)["hconv-concat"]["dev"]
    assert 0 <= dev["per"] and 0 <= dev["blank"] <= 1
    assert evaluate(tmp_path / "run", pitch_stores["dev"], device="cpu", manifest=rows["dev"])["hconv-concat"]["per"] \
        == dev["per"]


@pytest.mark.slow
def test_the_phoneme_task_trains_evaluates_and_is_analyzed_through_the_cli(phoneme_manifests, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def ok(args):
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    for split in ("train", "dev"):
        ok(["extract", "--model", "toy-wavlm", "--manifest", str(phoneme_manifests[split]), "--cache", "cache"])
    out = ok(["train", "--stores", "cache/phones-train/toy-wavlm.zarr", "--dev-stores",
              "cache/phones-dev/toy-wavlm.zarr", "--task", "phoneme", "--fusion", "weighted-sum", "--merge", "add",
              "--steps", "4", "--eval-every", "2", "--head-option", "proj=8", "--head-option", "hidden=8",
              "--device", "cpu", "--out", "run"])
    assert '"per"' in out
    assert json.loads((tmp_path / "run" / "task.json").read_text())["phones"][:3] == ["<blank>", "A", "B"]
    out = ok(["evaluate", "run", "--manifest", str(phoneme_manifests["dev"]), "--device", "cpu"])
    assert "on phones-dev: per=" in out
    ok(["analyze", "run", "--device", "cpu"])
    assert (tmp_path / "run" / "analysis" / "layer-use.csv").is_file()
