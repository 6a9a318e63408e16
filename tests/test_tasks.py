"""Specification of labels, losses and metrics per task (fusionpipe.train.tasks)."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.train.tasks import (METRICS, TASKS, CharVocab, accuracy, build_task, cer, cer_per_language, eer,
                                    greedy_ctc_decode, head_option_names, head_option_problems, is_metric,
                                    lower_is_better, macro_f1, primary_metric, task_from_dict, wer)
from fusionpipe.trials import format_trial, parse_trial, read_trials

SMALL_SIZES = {
    "asr": {"proj": 8, "hidden": 8},
    "multilingual": {"proj": 20, "d_model": 16, "heads": 2, "ffn": 32, "layers": 1},
    "classify": {"proj": 8},
    "verify": {"embed_dim": 12, "proj": 10, "tdnn": 10, "last": 14},
    "phoneme": {"proj": 8, "hidden": 8},
    "diarize": {"hidden": 8},
}
TURNS = ["0.00,0.20,s1;0.10,0.30,s2", "0.05,0.25,s3"]  # diarize's column; 50 frames per second below


@pytest.fixture
def vocab():
    return CharVocab.from_texts(["AB BA", "B"])  # tokens: <blank> A B |


@pytest.fixture
def feats():
    torch.manual_seed(0)
    return torch.randn(2, 20, 6), torch.tensor([20, 16])


def test_vocab_has_blank_first_then_sorted_characters_with_the_word_separator(vocab):
    assert vocab.tokens == ["<blank>", "A", "B", "|"]


def test_vocab_encode_decode_round_trip(vocab):
    assert vocab.encode("AB  B") == [1, 2, 3, 2]
    assert vocab.decode(vocab.encode("AB  B")) == "AB B"


def test_vocab_save_load_is_a_json_list(vocab, tmp_path):
    vocab.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text()) == vocab.tokens
    assert CharVocab.load(tmp_path / "vocab.json") == vocab


def test_vocab_unknown_characters_raise_unless_skipped(vocab):
    with pytest.raises(ValueError, match="'C'"):
        vocab.encode("ABC")
    assert vocab.encode("ABC", unknown="skip") == [1, 2]


def test_greedy_ctc_decode_collapses_repeats_drops_blanks_and_stops_at_length(vocab):
    frames = [[1, 1, 0, 1, 2, 3, 2, 2, 1], [2, 0, 2, 3, 3, 1, 0, 0, 2]]  # best token per frame
    log_probs = torch.full((2, 9, 4), -10.0)
    for b, row in enumerate(frames):
        log_probs[b, torch.arange(9), torch.tensor(row)] = 0.0
    assert greedy_ctc_decode(log_probs, torch.tensor([9, 7]), vocab) == ["AAB BA", "BB A"]


def test_wer_and_cer_on_a_known_pair():
    assert wer(["a b c", "d e"], ["a x c", "d"]) == pytest.approx(2 / 5)
    assert cer(["abc"], ["abd"]) == pytest.approx(1 / 3)


def test_cer_per_language_scores_each_language_on_its_own():
    result = cer_per_language(["abc", "xy", "abcd"], ["abd", "xy", "abcd"], ["eng", "fra", "eng"])
    assert result == {"eng": pytest.approx(1 / 7), "fra": 0.0}


def test_accuracy_and_macro_f1():
    refs, preds = ["a", "a", "b", "b"], ["a", "b", "b", "b"]
    assert accuracy(refs, preds) == 0.75
    assert macro_f1(refs, preds) == pytest.approx((2 / 3 + 0.8) / 2)


def test_eer_of_separable_scores_is_zero():
    assert eer([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 0.0


def test_eer_where_miss_and_false_alarm_meet_at_a_threshold():
    assert eer([0.1, 0.2, 0.6, 0.5, 0.7, 0.9], [0, 0, 0, 1, 1, 1]) == pytest.approx(1 / 3)


def test_eer_interpolates_between_roc_points():
    # Misses stay 1/3 while false alarms jump 0 -> 1/2: the curves cross at 1/3.
    assert eer([0.2, 0.6, 0.4, 0.8, 0.9], [0, 0, 1, 1, 1]) == pytest.approx(1 / 3)


def test_eer_needs_both_kinds_of_trial():
    with pytest.raises(ValueError, match="both"):
        eer([0.1, 0.2], [1, 1])


def test_unknown_task_is_a_value_error_naming_the_tasks():
    with pytest.raises(ValueError, match=", ".join(TASKS)):
        build_task("nope", {})


def test_the_train_help_names_every_task():
    """cli.py lists them itself (importing the tasks would cost every command torch's start-up)."""
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    assert [name for name in TASKS if name not in out] == []


def test_a_missing_manifest_column_is_named():
    with pytest.raises(ValueError, match="'label'"):
        build_task("classify", {"text": ["a"]})


def test_an_utterance_without_the_needed_value_is_named():
    with pytest.raises(ValueError, match="'text' on every utterance; 1 have none"):
        build_task("asr", {"text": ["AB", None]})


@pytest.mark.parametrize("name", ["asr", "multilingual"])
def test_ctc_tasks_give_a_differentiable_loss_and_text_predictions(name, feats):
    x, lengths = feats
    task = build_task(name, {"text": ["AB BA", "B"]})
    head = task.build_head(6, **SMALL_SIZES[name])
    loss = task.loss(head, x, lengths, {"text": ["AB", "BA B"]})
    loss.backward()
    assert loss.dim() == 0 and math.isfinite(loss.item())
    predictions = task.predict(head, x, lengths)
    assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)


def test_asr_metrics_are_wer_and_cer():
    task = build_task("asr", {"text": ["AB BA"]})
    assert task.metrics(["AB B"], {"text": ["AB BA"]}) == {"wer": 0.5, "cer": pytest.approx(1 / 5), "blank": 0.0}


def test_multilingual_metrics_add_a_cer_per_language():
    task = build_task("multilingual", {"text": ["AB"]})
    metrics = task.metrics(["AB", "A"], {"text": ["AB", "AB"], "language": ["eng", "deu"]})
    assert metrics == {"cer": 0.25, "cer/deu": 0.5, "cer/eng": 0.0, "blank": 0.0}


def test_classify_classes_are_the_sorted_train_labels():
    assert build_task("classify", {"label": ["sad", "ang", "sad", "neu"]}).classes == ["ang", "neu", "sad"]


def test_classify_loss_prediction_and_unknown_label(feats):
    x, lengths = feats
    task = build_task("classify", {"label": ["ang", "sad"]})
    head = task.build_head(6, **SMALL_SIZES["classify"])
    assert math.isfinite(task.loss(head, x, lengths, {"label": ["sad", "ang"]}).item())
    assert set(task.predict(head, x, lengths)) <= {"ang", "sad"}
    with pytest.raises(ValueError, match="hap"):
        task.loss(head, x, lengths, {"label": ["hap", "ang"]})


def test_verify_trains_on_speakers_and_predicts_unit_embeddings(feats):
    x, lengths = feats
    task = build_task("verify", {"speaker": ["s2", "s1", "s2"]})
    assert task.speakers == ["s1", "s2"]
    head = task.build_head(6, **SMALL_SIZES["verify"])
    assert math.isfinite(task.loss(head, x, lengths, {"speaker": ["s1", "s2"]}).item())
    embeddings = task.predict(head, x, lengths)
    assert [e.shape for e in embeddings] == [(12,), (12,)]
    assert np.allclose([np.linalg.norm(e) for e in embeddings], 1.0, atol=1e-5)


def test_verify_metrics_score_the_trials_by_cosine():
    trials = [("a1", "a2", 1), ("a1", "b1", 0), ("b1", "b2", 1), ("a2", "b2", 0)]
    task = build_task("verify", {"speaker": ["a", "b"]}, trials=trials)
    preds = [np.array([1.0, 0.1]), np.array([2.0, 0.0]), np.array([0.0, 1.0]), np.array([0.1, 3.0])]
    assert task.metrics(preds, {"id": ["a1", "a2", "b1", "b2"]}) == {"eer": 0.0}
    with pytest.raises(ValueError, match="b2"):
        task.metrics(preds[:3], {"id": ["a1", "a2", "b1"]})


def test_read_trials_takes_voxceleb_label_enroll_test_lines(tmp_path):
    (tmp_path / "trials.txt").write_text("1 id1/a.wav id1/b.wav\n\n0 id1/a.wav id2/c.wav\n")
    assert read_trials(tmp_path / "trials.txt") == [("id1/a.wav", "id1/b.wav", 1), ("id1/a.wav", "id2/c.wav", 0)]


def test_a_trial_line_reads_back_as_the_trial_it_was_written_from():
    assert parse_trial(format_trial(("id1-a", "id2-b", 0))) == ("id1-a", "id2-b", 0)


@pytest.mark.parametrize("line", ["2 a b", "1 a", "1 a b c", "yes a b"])
def test_a_malformed_trial_line_is_named_with_its_file_and_line(tmp_path, line):
    (tmp_path / "trials.txt").write_text(f"1 a b\n{line}\n")
    with pytest.raises(ValueError, match=r"trials.txt:2: expected 'label enroll_id test_id'"):
        read_trials(tmp_path / "trials.txt")


TRAIN = {"text": ["AB BA", "B"], "label": ["x", "y"], "speaker": ["s1", "s2"], "language": ["eng", "deu"],
         "phonemes": ["AE1 B", "B IY1"], "id": ["a", "b"], "turns": TURNS}
EVAL = TRAIN


@pytest.mark.parametrize("name", TASKS)
def test_a_task_reports_the_metrics_it_declares_the_primary_first(name, feats):
    """The tables the settings checks and the report read (METRICS, primary_metric, is_metric) are the
    task's own declaration, and its metrics() reports each of them."""
    x, lengths = feats
    task = build_task(name, TRAIN, trials=[("a", "b", 0), ("a", "a", 1)], frame_rate=50.0)
    head = task.build_head(6, **SMALL_SIZES[name])
    reported = task.metrics(task.predict(head, x, lengths), EVAL)
    assert set(METRICS[name]) <= set(reported) and primary_metric(name) == METRICS[name][0]
    assert all(is_metric(name, m) for m in METRICS[name]) and not is_metric(name, "nope")


def test_only_accuracy_and_f1_are_better_higher():
    assert [m for m in ("wer", "cer", "cer/eng", "eer", "accuracy", "macro_f1") if not lower_is_better(m)] == \
        ["accuracy", "macro_f1"]


@pytest.mark.parametrize("name", TASKS)
def test_the_head_options_of_a_task_are_what_its_head_takes(name):
    """Every option the settings checks let through builds (a name the head did not take would pass the
    checks and fail later, after the data is read); any other name is refused up front."""
    task = build_task(name, TRAIN, frame_rate=50.0)
    for option in head_option_names(name):
        value = 0.25 if option in ("dropout", "s", "m") else SMALL_SIZES[name].get(option, 2)
        task.build_head(6, **{**SMALL_SIZES[name], option: value})
    assert head_option_problems(name, {"nope": 2})[0][0] == "nope"


@pytest.mark.parametrize("name", TASKS)
def test_a_task_is_rebuilt_from_its_dict(name):
    train = {"text": ["AB BA"], "label": ["x", "y"], "speaker": ["s1", "s2"], "phonemes": ["AE1 B"], "id": ["a"],
             "turns": TURNS[:1]}
    task = build_task(name, train, frame_rate=50.0)
    assert task_from_dict(json.loads(json.dumps(task.to_dict()))) == task
