"""The two-speaker mixture simulator (`fusionpipe manifest mix`): the overlap asked for is the overlap written,
the turns are where each source speaks, the same seed gives the same mixtures, and bad input is named."""

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, strategies as st
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.corpora.mix import check_overlap, mix_manifest, overlap_ratio, speech_span
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance, read_manifest, write_manifest
from fusionpipe.rttm import parse_turns, read_rttm

SR = 16000
SPEECH = {"s0": 1.0, "s1": 1.3, "s2": 1.6}  # seconds each speaker talks per utterance, between silences
LEAD, TAIL = 0.3, 0.2                       # seconds of silence around it in the source files


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two utterances per speaker: LEAD s of silence, a tone with a little noise for SPEECH[speaker] s, TAIL s
    of silence, so a mixture that kept the silences would show it in its turns."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    rows = []
    for k, (speaker, seconds) in enumerate(SPEECH.items()):
        for j in range(2):
            n = int(seconds * SR)
            tone = 0.3 * np.sin(2 * np.pi * (150 + 60 * k + 7 * j) * np.arange(n) / SR) + 0.01 * rng.standard_normal(n)
            wave = np.concatenate([np.zeros(int(LEAD * SR)), tone, np.zeros(int(TAIL * SR))]).astype(np.float32)
            uid = f"{speaker}-{j}"
            sf.write(root / f"{uid}.wav", wave, SR)
            rows.append(Utterance(uid, f"{uid}.wav", len(wave), SR, speaker=speaker, split="train"))
    write_manifest(Manifest("src", root, rows), root / "src.tsv", root=".")
    return read_manifest(root / "src.tsv")


@pytest.mark.parametrize("overlap", [0.0, 0.2, 0.45])
def test_the_overlap_measured_from_the_turns_is_the_one_asked_for(sources, tmp_path, overlap):
    m = mix_manifest(sources, count=6, overlap=overlap, seed=1, audio_dir=tmp_path, name="mx")
    assert len(m) == 6
    for u in m:
        assert overlap_ratio(u.turns) == pytest.approx(overlap, abs=2e-3), u.turns


def test_turns_are_where_each_source_speaks(sources, tmp_path):
    m = mix_manifest(sources, count=8, overlap=0.3, seed=2, audio_dir=tmp_path, name="mx")
    for u in m:
        turns = parse_turns(u.turns)
        assert len(turns) == 2 and turns[0].speaker != turns[1].speaker and turns[0].start == 0.0
        for t in turns:  # silences trimmed: a turn lasts as long as its source's tone, to the 10 ms frame
            assert t.end - t.start == pytest.approx(SPEECH[t.speaker], abs=0.011)
        wave, sr = sf.read(m.audio_path(u), dtype="float32")
        assert sr == SR and len(wave) == u.num_samples
        assert len(wave) / SR == pytest.approx(max(t.end for t in turns), abs=1e-3)
        frames = wave[: len(wave) // 160 * 160].reshape(-1, 160)
        assert np.sqrt((frames ** 2).mean(axis=1)).min() > 0.01  # someone speaks in every 10 ms: no silent gap
        # where only the first speaks, there is one tone; where both do, the level is that of two
        first_only = wave[: int(turns[1].start * SR)]
        both = wave[int(turns[1].start * SR) + 160: int(min(t.end for t in turns) * SR) - 160]
        assert first_only.std() > 0.01 and both.std() > first_only.std()


def test_the_seed_decides_the_mixtures(sources, tmp_path):
    a = mix_manifest(sources, count=4, overlap=0.25, seed=7, audio_dir=tmp_path / "a", name="mx")
    b = mix_manifest(sources, count=4, overlap=0.25, seed=7, audio_dir=tmp_path / "b", name="mx")
    c = mix_manifest(sources, count=4, overlap=0.25, seed=8, audio_dir=tmp_path / "c", name="mx")
    assert a.utterances == b.utterances
    for u in a:
        assert (tmp_path / "a" / u.path).read_bytes() == (tmp_path / "b" / u.path).read_bytes()
    assert a.utterances != c.utterances


def test_a_full_disk_names_the_mixture_and_leaves_no_part_file(sources, tmp_path, monkeypatch):
    import errno

    from fusionpipe.corpora import mix

    def full(path, *args, **kw):
        open(path, "wb").write(b"fLaC")  # a torn start, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mix.sf, "write", full)
    with pytest.raises(FusionpipeError, match=r"cannot write mixture .*mx-0001\.flac .*free some space"):
        mix_manifest(sources, count=2, overlap=0.25, seed=7, audio_dir=tmp_path / "a", name="mx")
    assert not list((tmp_path / "a").iterdir())


def test_speech_span_cuts_silence_only():
    wave = np.zeros(SR, dtype=np.float32)
    wave[4000:12000] = 0.2
    assert speech_span(wave) == (4000, 12000)
    assert speech_span(np.zeros(SR, dtype=np.float32)) == (0, 0)


def test_a_row_without_a_speaker_is_named(sources, tmp_path):
    rows = list(sources.utterances)
    rows[3] = Utterance(rows[3].id, rows[3].path, rows[3].num_samples, SR)
    bad = Manifest("src", sources.root, rows, sources.source)
    with pytest.raises(FusionpipeError, match=r"src.tsv row 4 \(id s1-1\) has no speaker"):
        mix_manifest(bad, count=2, overlap=0.2, seed=0, audio_dir=tmp_path, name="mx")


def test_one_speaker_is_not_enough(sources, tmp_path):
    one = Manifest("src", sources.root, [u for u in sources if u.speaker == "s0"], sources.source)
    with pytest.raises(FusionpipeError, match=r"1 speaker\(s\) \(s0\); a mixture needs two different speakers"):
        mix_manifest(one, count=2, overlap=0.2, seed=0, audio_dir=tmp_path, name="mx")
    assert not list(tmp_path.iterdir())


def test_an_overlap_the_lengths_cannot_give_is_named(sources, tmp_path):
    with pytest.raises(FusionpipeError, match="none of 200 pairs of utterances can overlap by 0.9"):
        mix_manifest(sources, count=1, overlap=0.9, seed=0, audio_dir=tmp_path, name="mx")


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_an_overlap_is_accepted_exactly_in_0_to_1(overlap):
    try:
        assert check_overlap(overlap) == overlap and 0 <= overlap < 1
    except FusionpipeError as e:
        assert not 0 <= overlap < 1 and "--overlap" in str(e)


def test_the_command_writes_manifest_rttm_and_audio(sources, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["manifest", "mix", str(sources.source), "--count", "3", "--overlap", "0.3",
                                 "--out", str(tmp_path), "--name", "demo-mix"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "3 mixtures" in result.output and "overlap 0.300" in result.output
    m = read_manifest(tmp_path / "demo-mix.tsv")
    assert all(m.audio_path(u).is_file() for u in m) and {u.split for u in m} == {"train"}
    rttm = read_rttm(tmp_path / "demo-mix.rttm", recordings=[u.id for u in m])
    for u in m:  # RTTM keeps start and duration, so an end may differ in the last float digit
        assert [(t.speaker, t.start, round(t.end, 3)) for t in rttm[u.id]] == [
            (t.speaker, t.start, t.end) for t in parse_turns(u.turns)]
    bad = runner.invoke(app, ["manifest", "mix", str(sources.source), "--overlap", "1", "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, FusionpipeError) and "--overlap 1.0" in str(bad.exception)  # main() prints it
    assert not (tmp_path / "x").exists()
