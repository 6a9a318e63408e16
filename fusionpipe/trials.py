"""The trial list of speaker verification: one ``label enroll_id test_id`` line per pair, 1 = same speaker.

    >>> format_trial(("id1-a", "id2-b", 0))
    '0 id1-a id2-b'

The ids are manifest utterance ids. Importers write it (`fusionpipe.corpora.voxceleb.write_trials`) and the
verify task reads it (`read_trials`), so the line format lives here, in neither.
"""

from __future__ import annotations

from pathlib import Path

Trial = tuple[str, str, int]  # (enrollment utterance id, test utterance id, 1 same speaker / 0)


def parse_trial(line: str) -> Trial | None:
    """One line -> a trial; None when it is not ``<0|1> enroll test`` (the caller says where and what)."""
    parts = line.split()
    if len(parts) != 3 or parts[0] not in ("0", "1"):
        return None
    return parts[1], parts[2], int(parts[0])


def format_trial(trial: Trial) -> str:
    enroll, test, label = trial
    return f"{label} {enroll} {test}"


def read_trials(path: str | Path) -> list[Trial]:
    """VoxCeleb-style trial list, one "label enroll_id test_id" per line; blank lines are skipped. The ids
    must be the manifest's utterance ids (the importers name utterances so that they are)."""
    trials = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if (trial := parse_trial(line)) is None:
            raise ValueError(f"{path}:{n}: expected 'label enroll_id test_id' with label 0 or 1, got {line!r}")
        trials.append(trial)
    return trials

