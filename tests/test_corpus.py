"""Consistency checks of the bundled synthetic demo corpus (fusionpipe/corpus).

Reads the manifests directly (no dependency on fusionpipe.manifest) so that the corpus
is checked independently of the loader.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

sf = pytest.importorskip("soundfile")

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "fusionpipe" / "corpus"
AUDIO = CORPUS / "audio"
TRIALS = CORPUS / "trials.txt"
SPLITS = ("train", "dev", "test")
COLUMNS = ["id", "path", "num_samples", "sample_rate", "speaker", "text", "label", "language", "split"]
DEMO_COLUMNS = COLUMNS + ["phonemes"]
MIX_COLUMNS = ["id", "path", "num_samples", "sample_rate", "language", "split", "turns"]
KEYWORDS = {"yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"}
CLASSES = KEYWORDS | {"_unknown_", "_silence_"}  # SUPERB KS's 12
MAX_BYTES = 20 * 1000 * 1000
EN_TEXT = re.compile(r"^[A-Z']+( [A-Z']+)*$")


def read_manifest(path: Path, columns: list[str] = DEMO_COLUMNS) -> tuple[Path, list[dict[str, str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    m = re.fullmatch(r"#\s*root:\s*(.+)", lines[0])
    assert m, f"{path}: first line must be '# root: ...', got {lines[0]!r}"
    root = Path(m.group(1).strip())
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    assert lines[1].split("\t") == columns, f"{path}: bad header {lines[1]!r}"
    rows = []
    for n, line in enumerate(lines[2:], 3):
        fields = line.split("\t")
        assert len(fields) == len(columns), f"{path}:{n}: {len(fields)} fields"
        rows.append(dict(zip(columns, fields)))
    return root, rows


def _load(manifest_dir: Path, kind: str = "demo",
          columns: list[str] = DEMO_COLUMNS) -> dict[str, tuple[Path, list[dict[str, str]]]]:
    return {s: read_manifest(manifest_dir / f"{kind}-{s}.tsv", columns) for s in SPLITS}


@pytest.fixture(scope="module")
def repo_manifests():
    return _load(REPO / "manifests")


@pytest.fixture(scope="module")
def rows(repo_manifests):
    return {s: r for s, (_, r) in repo_manifests.items()}


def test_roots_point_at_bundled_audio(repo_manifests):
    for split, (root, _) in repo_manifests.items():
        assert root == AUDIO.resolve(), split
    for split, (root, _) in _load(CORPUS).items():
        assert root == AUDIO.resolve(), split


def test_package_copy_has_same_rows(rows):
    for split, (_, pkg_rows) in _load(CORPUS).items():
        assert pkg_rows == rows[split], split


def test_rows_match_audio(repo_manifests):
    seen = set()
    for split, (root, rows) in repo_manifests.items():
        assert rows, f"empty split {split}"
        for r in rows:
            assert r["id"] not in seen, f"duplicate id {r['id']}"
            seen.add(r["id"])
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+", r["id"]), r["id"]
            assert r["split"] == split
            path = root / r["path"]
            assert path.is_file(), path
            info = sf.info(str(path))
            assert info.format == "FLAC", path
            assert info.samplerate == int(r["sample_rate"]) == 16000, path
            assert info.channels == 1, path
            assert info.frames == int(r["num_samples"]), path
            assert 1.0 <= info.frames / info.samplerate <= 4.0, path
            assert r["text"] and r["text"] == r["text"].strip() and "  " not in r["text"]
            assert r["speaker"] and r["label"] and r["language"]
            if r["language"] == "en":
                assert EN_TEXT.match(r["text"]), r["text"]
            else:
                assert r["text"] == r["text"].lower(), r["text"]
    # no stray audio that no manifest lists
    assert {p.stem for p in AUDIO.glob("*.flac")} == seen


def test_some_audio_is_not_silent(rows):
    np = pytest.importorskip("numpy")
    # one file per (language, label) - reading them all would be slower than needed
    picked = {}
    for r in (r for split in SPLITS for r in rows[split]):
        picked.setdefault((r["language"], r["label"]), r)
    for r in picked.values():
        x, sr = sf.read(str(AUDIO / r["path"]), dtype="float32")
        assert sr == 16000
        assert float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) > 0.005, r["id"]


def test_splits_have_disjoint_sentences(rows):
    texts = {s: {(r["language"], r["text"]) for r in rows[s]} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not texts[a] & texts[b], f"sentences shared by {a} and {b}"


def test_test_speakers_are_unseen(rows):
    train_spk = {r["speaker"] for r in rows["train"]}
    dev_spk = {r["speaker"] for r in rows["dev"]}
    test_spk = {r["speaker"] for r in rows["test"]}
    assert not test_spk & train_spk
    assert not test_spk & dev_spk


def test_trials(rows):
    test = {r["id"]: r for r in rows["test"]}
    train_spk = {r["speaker"] for r in rows["train"]}
    counts = defaultdict(int)
    pairs = set()
    for n, line in enumerate(TRIALS.read_text(encoding="ascii").splitlines(), 1):
        label, a, b = line.split()
        assert label in ("0", "1"), f"trials.txt:{n}"
        assert a in test and b in test, f"trials.txt:{n}: not in the test split"
        assert a != b
        assert test[a]["speaker"] not in train_spk and test[b]["speaker"] not in train_spk
        assert (label == "1") == (test[a]["speaker"] == test[b]["speaker"]), f"trials.txt:{n}"
        assert frozenset((a, b)) not in pairs, f"trials.txt:{n}: duplicate pair"
        pairs.add(frozenset((a, b)))
        counts[label] += 1
    assert counts["0"] > 0 and counts["1"] > 0
    assert counts["0"] == counts["1"]


def test_total_size():
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"corpus is {total / 1e6:.2f} MB"


def test_train_covers_languages_labels_speakers(rows):
    train = rows["train"]
    assert len({r["language"] for r in train}) >= 3
    assert {r["label"] for r in train} == {"neutral", "happy", "angry", "sad"}
    assert len({r["speaker"] for r in train if r["language"] == "en"}) >= 5
    assert len({r["speaker"] for r in rows["test"] if r["language"] == "en"}) >= 2
    # dev and test have every label and language that train has
    for split in ("dev", "test"):
        assert {r["label"] for r in rows[split]} == {r["label"] for r in train}, split
        assert {r["language"] for r in rows[split]} == {r["language"] for r in train}, split


def test_every_utterance_has_its_phones(rows):
    """espeak-ng's own phones (phoneme recognition): one token per phone, single spaces, no stress marks,
    pauses or word boundaries."""
    for r in (r for split in SPLITS for r in rows[split]):
        phones = r["phonemes"]
        assert phones and phones == phones.strip() and "  " not in phones, r["id"]
        assert not any(t.startswith(("'", ",", "_", "%", "=")) or t == ";" for t in phones.split()), r["id"]
        # at least one phone per two letters of text, fewer than two per letter (x is k s)
        letters = sum(c.isalpha() for c in r["text"])
        assert letters / 2 <= len(phones.split()) < 2 * letters, (r["id"], r["text"], phones)


@pytest.fixture(scope="module")
def keywords():
    return {s: rows for s, (_, rows) in _load(REPO / "manifests", "keywords", COLUMNS).items()}


def test_keyword_manifests_are_superb_ks(keywords, rows):
    """Speech Commands as SUPERB uses it: 1 s clips, 12 classes in every split, the test split's voices
    never in train or dev (as the demo corpus splits them), every voice saying every keyword."""
    repo = _load(REPO / "manifests", "keywords", COLUMNS)
    for split, (root, pkg_rows) in _load(CORPUS, "keywords", COLUMNS).items():
        assert root == repo[split][0] == (CORPUS / "keywords").resolve() and pkg_rows == keywords[split], split
    seen = set()
    for split, kw in keywords.items():
        assert {r["label"] for r in kw} == CLASSES, split
        for r in kw:
            assert r["split"] == split and r["num_samples"] == "16000" and r["id"] not in seen
            seen.add(r["id"])
            word = r["text"].lower()
            assert r["label"] == (word if word in KEYWORDS else "_unknown_" if word else "_silence_"), r
            assert bool(r["speaker"]) == bool(word), r
        voices = {r["speaker"] for r in kw if r["speaker"]}
        for v in voices:
            assert {r["label"] for r in kw if r["speaker"] == v} == CLASSES - {"_silence_"}, (split, v)
    speakers = {s: {r["speaker"] for r in kw if r["speaker"]} for s, kw in keywords.items()}
    demo_test = {r["speaker"] for r in rows["test"]}
    assert speakers["test"] <= demo_test and not (speakers["train"] | speakers["dev"]) & demo_test
    assert {p.stem for p in (CORPUS / "keywords").glob("*.flac")} == seen  # no stray audio


def test_keyword_clips_are_one_second_with_the_word_in_it(keywords):
    np = pytest.importorskip("numpy")
    for label in ("yes", "_unknown_", "_silence_"):
        r = next(r for r in keywords["test"] if r["label"] == label)
        x, sr = sf.read(str(CORPUS / "keywords" / r["path"]), dtype="float32")
        assert sr == 16000 and len(x) == 16000
        rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        assert (rms < 0.01) if label == "_silence_" else (rms > 0.005), (label, rms)


def _turns(cell: str) -> list[tuple[float, float, str]]:
    return sorted((float(a), float(b), spk) for a, b, spk in (t.split(",") for t in cell.split(";")))


def _rttm(path: Path) -> dict[str, list[tuple[float, float, str]]]:
    out = defaultdict(list)
    for line in path.read_text(encoding="ascii").splitlines():
        f = line.split()
        assert f[0] == "SPEAKER" and f[2] == "1", line
        out[f[1]].append((float(f[3]), round(float(f[3]) + float(f[4]), 3), f[7]))
    return {k: sorted(v) for k, v in out.items()}


def test_mixtures_hold_two_speakers_of_their_split_with_rttm(rows):
    """Diarization: each mixture two different speakers of the same split, overlapping by a quarter of the
    mixture, the turns inside the audio, and the RTTM (package and manifests/ copies) saying the same."""
    mixes = _load(REPO / "manifests", "mix", MIX_COLUMNS)
    seen = set()
    for split, (root, mix) in mixes.items():
        assert root == (CORPUS / "mix").resolve() and _load(CORPUS, "mix", MIX_COLUMNS)[split][1] == mix
        assert len(mix) >= 8, split
        rttm = _rttm(CORPUS / f"mix-{split}.rttm")
        assert rttm == _rttm(REPO / "manifests" / f"mix-{split}.rttm")
        assert set(rttm) == {r["id"] for r in mix}
        speakers = {r["speaker"] for r in rows[split]}
        for r in mix:
            seen.add(r["id"])
            turns = _turns(r["turns"])
            assert r["split"] == split and rttm[r["id"]] == turns and len(turns) == 2, r["id"]
            (s1, e1, a), (s2, e2, b) = turns
            assert a != b and {a, b} <= speakers and s1 == 0.0 and s2 < e1 <= e2, r
            assert (e1 - s2) / e2 == pytest.approx(0.25, abs=0.002), r  # overlapped share of the mixture
            assert int(r["num_samples"]) == pytest.approx(e2 * 16000, abs=16)
    assert {p.stem for p in (CORPUS / "mix").glob("*.flac")} == seen
