"""Phoneme recognition (SUPERB PR): the phone vocabulary, PER, the phoneme task, LibriSpeech's lexicon."""

import jiwer
import numpy as np
import pytest
import soundfile as sf
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
