"""Corpus importers for the paper recipes (VoxCeleb1, IEMOCAP, ML-SUPERB) on tiny fake trees."""

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import read_manifest
from fusionpipe.corpora.iemocap import iemocap_folds, import_iemocap
from fusionpipe.corpora.mlsuperb import import_mlsuperb
from fusionpipe.corpora.voxceleb import import_voxceleb, write_trials
from fusionpipe.train.tasks import read_trials


def _wav(path, seconds=0.2, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * rate), np.float32), rate)


# ---- VoxCeleb1 -----------------------------------------------------------------------------------
@pytest.fixture
def voxceleb(tmp_path):
    root = tmp_path / "VoxCeleb1"
    for rel in ("id10001/1zcIwhmdeo4/00001.wav", "id10001/7gWzIy6yIIk/00002.wav", "id10002/abc-DEF_123/00001.wav",
                "id10270/x6uYqmx31kE/00001.wav", "id10270/8jEAjG6SegY/00008.wav", "id10271/1gtz-CUIygI/00001.wav"):
        _wav(root / "wav" / rel)
    trials = tmp_path / "veri_test2.txt"
    trials.write_text("1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav\n"
                      "0 id10270/x6uYqmx31kE/00001.wav id10271/1gtz-CUIygI/00001.wav\n")
    return root, trials


def test_voxceleb_splits_speakers_by_the_trial_list(voxceleb):
    root, trials = voxceleb
    manifests = import_voxceleb(root, trials)
    dev, test = manifests["voxceleb1-dev"], manifests["voxceleb1-test"]
    assert {u.speaker for u in dev} == {"id10001", "id10002"}
    assert {u.speaker for u in test} == {"id10270", "id10271"}
    utt = test.by_id()["id10270-x6uYqmx31kE-00001"]
    assert utt.split == "test" and utt.num_samples == 3200 and test.audio_path(utt).is_file()


def test_voxceleb_trials_use_our_utterance_ids(voxceleb, tmp_path):
    root, trials = voxceleb
    test = import_voxceleb(root, trials)["voxceleb1-test"]
    out = write_trials(trials, tmp_path / "voxceleb1-trials.txt", test)
    assert read_trials(out) == [("id10270-x6uYqmx31kE-00001", "id10270-8jEAjG6SegY-00008", 1),
                                ("id10270-x6uYqmx31kE-00001", "id10271-1gtz-CUIygI-00001", 0)]
    (root / "wav" / "id10271" / "1gtz-CUIygI" / "00001.wav").unlink()
    with pytest.raises(FusionpipeError, match="id10271-1gtz-CUIygI-00001 not in manifest voxceleb1-test"):
        write_trials(trials, tmp_path / "again.txt", import_voxceleb(root, trials)["voxceleb1-test"])


def test_voxceleb_without_a_trial_list_uses_the_official_test_speakers(voxceleb):
    root, _ = voxceleb
    assert {u.speaker for u in import_voxceleb(root)["voxceleb1-test"]} == {"id10270", "id10271"}


def test_cli_manifest_voxceleb_writes_manifests_and_trials(voxceleb, tmp_path):
    root, trials = voxceleb
    out = tmp_path / "manifests"
    result = CliRunner().invoke(app, ["manifest", "voxceleb", str(root), "--trials", str(trials), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(read_manifest(out / "voxceleb1-dev.tsv")) == 3
    assert len(read_trials(out / "voxceleb1-trials.txt")) == 2


# ---- IEMOCAP -------------------------------------------------------------------------------------
@pytest.fixture
def iemocap(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    labels = ["neu", "exc", "hap", "ang", "sad", "fru", "xxx"]
    for k in range(1, 6):
        dialog = f"Ses0{k}F_impro01"
        lines = ["% header line", ""]
        for i, label in enumerate(labels):
            utt = f"{dialog}_{'FM'[i % 2]}{i:03d}"
            _wav(root / f"Session{k}" / "sentences" / "wav" / dialog / f"{utt}.wav", 0.1)
            lines.append(f"[{i}.0000 - {i}.5000]\t{utt}\t{label}\t[2.5000, 2.5000, 2.5000]")
            lines.append(f"C-E1:\t{label};\t()")  # the evaluators' lines are ignored
        ev = root / f"Session{k}" / "dialog" / "EmoEvaluation" / f"{dialog}.txt"
        ev.parent.mkdir(parents=True, exist_ok=True)
        ev.write_text("\n".join(lines) + "\n")
    return root


def test_iemocap_maps_to_four_superb_classes_with_speaker_and_session(iemocap):
    m = import_iemocap(iemocap)
    assert len(m) == 5 * 5  # fru and xxx are left out
    assert {u.label for u in m} == {"neu", "hap", "ang", "sad"}
    u = m.by_id()["Ses02F_impro01_M001"]  # exc -> hap, spoken by the male actor of session 2
    assert (u.label, u.speaker, u.split) == ("hap", "Ses02M", "Session2")


def test_iemocap_folds_leave_one_session_out(iemocap):
    m = import_iemocap(iemocap)
    folds = iemocap_folds(m, dev_ratio=0.3)
    assert len(folds) == 15
    for k in range(1, 6):
        train, dev, test = (folds[f"iemocap-fold{k}-{s}"] for s in ("train", "dev", "test"))
        assert {u.split for u in test} == {f"Session{k}"}
        assert f"Session{k}" not in {u.split for u in train} | {u.split for u in dev}
        ids = [u.id for u in train] + [u.id for u in dev] + [u.id for u in test]
        assert len(ids) == len(set(ids)) == len(m) and dev.utterances
    # the dev choice is a property of the utterance, the same in every fold
    in_dev = {u.id for k in range(2, 6) for u in folds[f"iemocap-fold{k}-dev"] if u.split == "Session1"}
    assert in_dev == {u.id for u in folds["iemocap-fold2-dev"] if u.split == "Session1"}


def test_iemocap_missing_audio_is_named(iemocap):
    wav = next((iemocap / "Session3" / "sentences" / "wav").rglob("*F000.wav"))
    wav.unlink()
    with pytest.raises(FusionpipeError, match="Ses03F_impro01_F000"):
        import_iemocap(iemocap)


# ---- ML-SUPERB -----------------------------------------------------------------------------------
def _mls_lang(root, corpus, lang, rows, durations=("1h",)):
    d = root / corpus / lang
    for split_file, utts in rows.items():
        lines = []
        for utt, text, seconds in utts:
            _wav(d / "wav" / f"{utt}.wav", seconds)
            lines.append(f"{utt} {utt} {text}")
        (d / split_file).parent.mkdir(parents=True, exist_ok=True)
        (d / split_file).write_text("\n".join(lines) + "\n")


@pytest.fixture
def mlsuperb(tmp_path):
    root = tmp_path / "ml_superb"
    _mls_lang(root, "mls", "eng", {
        "transcript_1h_train.txt": [("mls_eng_000001", "Hello, world! [noise]", 0.2),
                                    ("mls_eng_000002", "a long one", 20.5)],
        "transcript_10min_dev.txt": [("mls_eng_000003", "dev text.", 0.2)],
        "transcript_10min_test.txt": [("mls_eng_000004", "test text", 0.2)]})
    _mls_lang(root, "voxpopuli", "eng", {
        "transcript_1h_train.txt": [("voxpopuli_eng_000001", "other corpus", 0.2)],
        "transcript_10min_dev.txt": [("voxpopuli_eng_000002", "vp dev", 0.2)],
        "transcript_10min_test.txt": [("voxpopuli_eng_000003", "vp test", 0.2)]})
    _mls_lang(root, "fleurs", "cmn", {
        "transcript_1h_train.txt": [("fleurs_cmn_000001", "你好 世界", 0.2)],
        "transcript_10min_dev.txt": [("fleurs_cmn_000002", "开发", 0.2)],
        "transcript_10min_test.txt": [("fleurs_cmn_000003", "测试", 0.2)]})
    _mls_lang(root, "fleurs", "dan", {  # a few-shot language: not in the normal tracks
        "transcript_1h_train.txt": [("fleurs_dan_000001", "hej", 0.2)],
        "transcript_10min_dev.txt": [("fleurs_dan_000002", "hej", 0.2)],
        "transcript_10min_test.txt": [("fleurs_dan_000003", "hej", 0.2)]})
    return root


def test_mlsuperb_multilingual_track(mlsuperb):
    out = import_mlsuperb(mlsuperb, "1h")
    train = out["mlsuperb-multi-1h-train"]
    assert {u.id for u in train} == {"mls_eng_000001", "voxpopuli_eng_000001", "fleurs_cmn_000001"}  # > 20 s, dan out
    u = train.by_id()["mls_eng_000001"]
    assert (u.text, u.language, u.split) == ("HELLO WORLD", "eng", "train")
    assert train.by_id()["fleurs_cmn_000001"].language == "cmn"
    assert {u.language for u in out["mlsuperb-multi-1h-test"]} == {"eng", "cmn"}


def test_mlsuperb_monolingual_tracks_train_on_the_selected_corpus(mlsuperb):
    out = import_mlsuperb(mlsuperb, "1h")
    assert [u.id for u in out["mlsuperb-mono-eng1-1h-train"]] == ["mls_eng_000001", "mls_eng_000002"]
    assert [u.id for u in out["mlsuperb-mono-eng3-1h-dev"]] == ["voxpopuli_eng_000002"]
    assert {u.id for u in out["mlsuperb-mono-eng1-1h-test"]} == {"mls_eng_000004", "voxpopuli_eng_000003"}
    assert [u.text for u in out["mlsuperb-mono-cmn-1h-train"]] == ["你好 世界"]
    assert "mlsuperb-mono-swa-1h-train" not in out  # not on disk


def test_mlsuperb_wrong_root_says_what_it_expects(tmp_path):
    with pytest.raises(FusionpipeError, match="ML-SUPERB data directory"):
        import_mlsuperb(tmp_path)
