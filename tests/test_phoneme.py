"""Phoneme recognition (SUPERB PR): the phone vocabulary, PER, the phoneme task, LibriSpeech's lexicon."""

import jiwer
import pytest

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
