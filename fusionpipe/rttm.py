"""Who speaks when: RTTM files and the manifest's ``turns`` column, the two forms of a diarization reference.

An RTTM line (NIST) is ``SPEAKER <recording> <channel> <start> <duration> <NA> <NA> <speaker> <NA> <NA>``; only
SPEAKER lines are read. A manifest keeps a recording's turns in one cell, ``start,end,speaker`` in seconds
from the start of the audio, turns separated by ``;``:

    >>> turns = parse_turns("0.00,1.25,s1;0.80,2.10,s2")
    >>> turns[1]
    Turn(start=0.8, end=2.1, speaker='s2')
    >>> format_turns(turns)
    '0.000,1.250,s1;0.800,2.100,s2'
    >>> format_rttm_line("mix-0001", turns[1])
    'SPEAKER mix-0001 1 0.800 1.300 <NA> <NA> s2 <NA> <NA>'

Importers read RTTM into the column (`read_rttm`), the diarization task reads the column (`parse_turns`), and
predictions are written back as RTTM (`write_rttm`), so both formats live here and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from fusionpipe.atomic import atomic_write
from fusionpipe.errors import FusionpipeError


class Turn(NamedTuple):
    start: float  # seconds
    end: float
    speaker: str


def format_turns(turns: Iterable[Turn]) -> str:
    """Turns -> the manifest cell (milliseconds are RTTM's precision too)."""
    return ";".join(f"{t.start:.3f},{t.end:.3f},{t.speaker}" for t in sorted(turns))


def parse_turns(cell: str | None, where: str = "turns") -> list[Turn]:
    """The manifest cell -> turns sorted by start; ``where`` names the row in the error of a malformed one.
    An empty cell is a recording where nobody speaks."""
    turns = []
    for part in (cell or "").split(";"):
        if not part.strip():
            continue
        fields = part.split(",")
        try:
            if len(fields) != 3 or not fields[2].strip():
                raise ValueError
            turn = Turn(float(fields[0]), float(fields[1]), fields[2].strip())
        except ValueError:
            raise FusionpipeError(f"{where}: turn {part!r} is not start,end,speaker (seconds, e.g. "
                                  "0.50,1.75,spk1)") from None
        turns.append(check_turn(turn, where))
    turns.sort()
    check_overlaps(turns, where)
    return turns


def check_turn(turn: Turn, where: str) -> Turn:
    if not (math.isfinite(turn.start) and math.isfinite(turn.end) and 0 <= turn.start < turn.end):
        raise FusionpipeError(f"{where}: turn of {turn.speaker} from {turn.start} s to {turn.end} s: a turn needs "
                              "0 <= start < end, in seconds")
    return turn


def check_overlaps(turns: list[Turn], where: str) -> None:
    """Refuse two turns of one speaker that overlap: one person does not speak twice at once, so it is a
    labelling error (merge the two turns), and it would count that speaker's speech twice in the DER."""
    last: dict[str, Turn] = {}
    for t in sorted(turns):
        before = last.get(t.speaker)
        if before is not None and t.start < before.end:
            raise FusionpipeError(f"{where}: two turns of speaker {t.speaker} overlap ({before.start:.3f}-"
                                  f"{before.end:.3f} s and {t.start:.3f}-{t.end:.3f} s); merge them into one turn")
        if before is None or t.end > before.end:
            last[t.speaker] = t


def format_rttm_line(recording: str, turn: Turn) -> str:
    return (f"SPEAKER {recording} 1 {turn.start:.3f} {turn.end - turn.start:.3f} <NA> <NA> {turn.speaker} "
            "<NA> <NA>")


def read_rttm(path: str | Path, recordings: Iterable[str] | None = None) -> dict[str, list[Turn]]:
    """recording -> its turns (sorted) from an RTTM file. Every malformed line, overlapping turns of one
    speaker, and (given ``recordings``, the manifest's ids) a recording the manifest does not have, is an
    error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FusionpipeError(f"RTTM file {path} does not exist")
    known = None if recordings is None else set(recordings)
    out: dict[str, list[Turn]] = {}
    first_line: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] != "SPEAKER":
            continue
        where = f"{path} line {n}"
        try:
            if len(fields) < 8:
                raise ValueError
            start, duration = float(fields[3]), float(fields[4])
        except ValueError:
            raise FusionpipeError(f"{where}: expected 'SPEAKER <recording> <channel> <start> <duration> <NA> <NA> "
                                  f"<speaker> ...', got {line.strip()!r}") from None
        recording = fields[1]
        if known is not None and recording not in known:
            raise FusionpipeError(f"{where}: recording {recording!r} is not in the manifest; every RTTM recording "
                                  "must be a manifest id (the audio file's stem): fix the name or add the row")
        out.setdefault(recording, []).append(check_turn(Turn(start, start + duration, fields[7]), where))
        first_line.setdefault(recording, n)
    for recording, turns in out.items():
        turns.sort()
        check_overlaps(turns, f"{path} (recording {recording}, from line {first_line[recording]})")
    return out


def write_rttm(path: str | Path, turns: Mapping[str, Iterable[Turn]]) -> Path:
    """recording -> turns as one RTTM file, written atomically (a kill leaves the old file or none)."""
    lines = [format_rttm_line(rec, t) for rec, ts in turns.items() for t in sorted(ts)]
    return atomic_write(Path(path), "".join(line + "\n" for line in lines))
