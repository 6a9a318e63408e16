"""`fusionpipe manifest librimix`: Libri2Mix-style mixtures with RTTM files or LibriMix's metadata CSVs ->
manifests with the turns column, on a tiny fake tree; bad input named by file and line."""

import csv

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.corpora.librimix import active_turns, import_librimix
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import read_manifest
from fusionpipe.rttm import Turn, parse_turns, write_rttm

RATE = 16000
MIX = "1089-134686-0000_121-121726-0001"  # LibriMix's ID: the sources' LibriSpeech utterances, in source order


def _voice(seconds: float, spans: list[tuple[float, float]]) -> np.ndarray:
    """A 220 Hz tone inside each (start, end) span, silence elsewhere."""
    t = np.arange(round(seconds * RATE)) / RATE
    on = np.zeros_like(t, dtype=bool)
    for start, end in spans:
        on |= (t >= start) & (t < end)
    return (0.5 * np.sin(2 * np.pi * 220 * t) * on).astype(np.float32)


@pytest.fixture
def librimix(tmp_path):
    """Libri2Mix/wav16k/max with one test mixture: speaker 1089 from 0 to 0.5 s, 121 from 0.4 to 1.0 s, and
    LibriMix's metadata CSV (absolute paths, as LibriMix writes them)."""
    root = tmp_path / "Libri2Mix" / "wav16k" / "max"
    sources = [_voice(1.0, [(0.0, 0.5)]), _voice(1.0, [(0.4, 1.0)])]
    paths = {}
    for folder, audio in (("s1", sources[0]), ("s2", sources[1]), ("mix_clean", sources[0] + sources[1])):
        paths[folder] = root / "test" / folder / f"{MIX}.wav"
        paths[folder].parent.mkdir(parents=True)
        sf.write(paths[folder], audio, RATE)
    (root / "metadata").mkdir()
    with (root / "metadata" / "mixture_test_mix_clean.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mixture_ID", "mixture_path", "source_1_path", "source_2_path", "length"])
        writer.writerow([MIX, paths["mix_clean"], paths["s1"], paths["s2"], RATE])
    return root


def test_metadata_turns_are_where_each_source_speaks_and_speakers_come_from_the_mixture_id(librimix):
    [m] = import_librimix(librimix, metadata=[librimix / "metadata" / "mixture_test_mix_clean.csv"])
    assert m.name == "librimix-test_mix_clean" and len(m) == 1
    row = m.utterances[0]
    assert (row.id, row.path, row.num_samples) == (MIX, f"test/mix_clean/{MIX}.wav", RATE)
    assert parse_turns(row.turns) == [Turn(0.0, 0.5, "1089"), Turn(0.4, 1.0, "121")]


def test_short_pauses_stay_inside_a_turn_and_long_ones_split_it(tmp_path):
    path = tmp_path / "s1.wav"
    sf.write(path, _voice(2.0, [(0.0, 0.5), (0.6, 1.0), (1.4, 1.8)]), RATE)  # pauses of 0.1 s and 0.4 s
    assert active_turns(path, "a") == [Turn(0.0, 1.0, "a"), Turn(1.4, 1.8, "a")]


def test_metadata_paths_relative_to_root_are_found(librimix):
    csv_path = librimix / "metadata" / "mixture_test_mix_clean.csv"
    text = csv_path.read_text().replace(f"{librimix}/", "")
    csv_path.write_text(text)
    [m] = import_librimix(librimix, metadata=[csv_path])
    assert m.utterances[0].path == f"test/mix_clean/{MIX}.wav"


def test_rttm_over_the_mixture_wavs(librimix, tmp_path):
    rttm = write_rttm(tmp_path / "test.rttm", {MIX: [Turn(0.0, 0.5, "1089"), Turn(0.4, 1.0, "121")]})
    with pytest.raises(FusionpipeError, match=rf"test.rttm: recording {MIX} is the stem of several wavs .* give the "
                                              "folder of the mixtures as ROOT"):
        import_librimix(librimix, rttm=[rttm])  # the sources s1/, s2/ bear the mixture's name too
    [m] = import_librimix(librimix / "test" / "mix_clean", rttm=[rttm])
    assert m.name == "librimix-test" and m.utterances[0].path == f"{MIX}.wav"
    assert parse_turns(m.utterances[0].turns) == [Turn(0.0, 0.5, "1089"), Turn(0.4, 1.0, "121")]


def test_an_rttm_recording_with_no_wav_under_root_is_named_with_file_and_line(librimix, tmp_path):
    rttm = tmp_path / "test.rttm"
    rttm.write_text(f"SPEAKER {MIX} 1 0.0 0.5 <NA> <NA> 1089 <NA> <NA>\n"
                    "SPEAKER elsewhere 1 0.0 0.5 <NA> <NA> 1089 <NA> <NA>\n")
    with pytest.raises(FusionpipeError, match=r"test.rttm line 2: recording 'elsewhere' is not in the manifest"):
        import_librimix(librimix, rttm=[rttm])


@pytest.mark.parametrize("edit, problem", [
    (lambda rows: [["mixture_ID", "source_1_path"], *[[r[0], r[2]] for r in rows[1:]]],
     r"line 1: no column mixture_path"),
    (lambda rows: [rows[0], [rows[1][0], rows[1][1], "/nowhere/s1.wav", *rows[1][3:]]],
     r"line 2: source_1_path /nowhere/s1.wav does not exist"),
    (lambda rows: [rows[0], ["mixA", *rows[1][1:]]], r"line 2: mixture_ID 'mixA' does not name 2 LibriSpeech"),
    (lambda rows: rows[:1], "has a header and no mixtures"),
])
def test_a_bad_metadata_csv_is_named_with_file_and_line(librimix, edit, problem):
    csv_path = librimix / "metadata" / "mixture_test_mix_clean.csv"
    rows = list(csv.reader(csv_path.open()))
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows(edit(rows))
    with pytest.raises(FusionpipeError, match=rf"mixture_test_mix_clean.csv.*{problem}"):
        import_librimix(librimix, metadata=[csv_path])


def test_neither_rttm_nor_metadata_says_what_to_give(librimix):
    with pytest.raises(FusionpipeError, match="--rttm FILE .* or --metadata CSV"):
        import_librimix(librimix)


def test_cli_manifest_librimix_writes_a_manifest_with_turns(librimix, tmp_path):
    out = tmp_path / "manifests"
    result = CliRunner().invoke(app, ["manifest", "librimix", str(librimix), "--metadata",
                                      str(librimix / "metadata" / "mixture_test_mix_clean.csv"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    m = read_manifest(out / "librimix-test_mix_clean.tsv")
    assert parse_turns(m.utterances[0].turns) == [Turn(0.0, 0.5, "1089"), Turn(0.4, 1.0, "121")]
