"""RTTM files and the manifest's turns column: round trips, and every malformed input named by file and line."""

import pytest
from hypothesis import given, strategies as st

from fusionpipe.errors import FusionpipeError
from fusionpipe.rttm import Turn, format_turns, parse_turns, read_rttm, write_rttm


def test_rttm_round_trips_through_the_turns_column(tmp_path):
    turns = {"mix1": [Turn(0.0, 1.25, "a"), Turn(0.8, 2.1, "b")], "mix2": [Turn(0.5, 0.75, "a")]}
    path = write_rttm(tmp_path / "ref.rttm", turns)
    back = read_rttm(path, recordings=["mix1", "mix2", "mix3"])
    assert back == turns
    assert parse_turns(format_turns(back["mix1"])) == turns["mix1"]


def test_a_recording_not_in_the_manifest_is_named_with_file_and_line(tmp_path):
    path = tmp_path / "ref.rttm"
    path.write_text("SPEAKER mix1 1 0.0 1.0 <NA> <NA> a <NA> <NA>\nSPEAKER nope 1 0.0 1.0 <NA> <NA> a <NA> <NA>\n")
    with pytest.raises(FusionpipeError, match=r"ref.rttm line 2: recording 'nope' is not in the manifest"):
        read_rttm(path, recordings=["mix1"])


def test_overlapping_turns_of_one_speaker_are_refused(tmp_path):
    path = tmp_path / "ref.rttm"
    path.write_text("SPEAKER m 1 0.0 1.0 <NA> <NA> a <NA> <NA>\nSPEAKER m 1 0.5 1.0 <NA> <NA> a <NA> <NA>\n")
    with pytest.raises(FusionpipeError, match=r"ref.rttm \(recording m, from line 1\): two turns of speaker a overlap"):
        read_rttm(path)
    with pytest.raises(FusionpipeError, match="row 3: two turns of speaker a overlap"):
        parse_turns("0,1,a;0.9,2,a", "m.tsv row 3")
    assert parse_turns("0,1,a;1,2,a") == [Turn(0, 1, "a"), Turn(1, 2, "a")]  # touching is fine


@pytest.mark.parametrize("line", ["SPEAKER m 1 zero 1.0 <NA> <NA> a", "SPEAKER m 1 0.0", "SPEAKER m 1 1 -1 x x a",
                                  "SPEAKER m 1 nan 1 x x a"])
def test_malformed_rttm_lines_are_named(tmp_path, line):
    path = tmp_path / "ref.rttm"
    path.write_text("; a comment\n" + line + "\n")
    with pytest.raises(FusionpipeError, match=r"ref.rttm line 2"):
        read_rttm(path)


@given(st.text(max_size=40))
def test_any_turns_cell_is_parsed_or_refused_by_name(cell):
    try:
        turns = parse_turns(cell, "m.tsv row 1")
    except FusionpipeError as e:
        assert "m.tsv row 1" in str(e)
    else:
        assert all(0 <= t.start < t.end and t.speaker for t in turns)
