"""Two-speaker mixtures with a chosen overlap, from any manifest with speaker labels (`fusionpipe manifest mix`).

Diarization needs recordings where two people talk, some of the time at once, and a reference of who
speaks when. Libri2Mix-style corpora are one source; this simulator makes one from any corpus whose
manifest names its speakers, so that the bundled demo corpus (and any other) can serve:

    >>> m = mix_manifest(read_manifest("manifests/demo-train.tsv"), count=24, overlap=0.3, seed=0,
    ...                  audio_dir=Path("mixes/demo-mix"), name="demo-mix")    # doctest: +SKIP

Each mixture takes two utterances of different speakers, trims each to where it is actually speaking
(leading and trailing silence cut by frame energy, so a turn is never silence; pauses inside an
utterance stay part of its turn, as in a hand-made RTTM's turn), and starts the second so that the
overlapped time is ``overlap`` of the mixture's length (`start_of_second`).
Levels are LibriMix's idea made simple: each source is scaled to a random RMS between -33 and -25 dBFS
(LibriMix draws loudness in LUFS over the same range), and the sum is scaled down only if it would clip.

The mixtures are written one by one (16 kHz mono 16-bit FLAC), so memory does not grow with ``count``;
the rows keep the sources' turns in the ``turns`` column and `write_rttm` writes the same turns as RTTM.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from fusionpipe.audio import SAMPLE_RATE, load, loud_frames
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance
from fusionpipe.rttm import Turn, format_turns, parse_turns

LEVEL_DBFS = (-33.0, -25.0)       # each source's RMS over its speech, drawn uniformly (LibriMix's range)
PEAK = 0.99                       # the mixture is scaled down when it would go beyond this
ATTEMPTS = 200                    # pairs drawn per mixture before the overlap is called impossible


def check_overlap(overlap: float) -> float:
    """The overlap ratio is the overlapped share of a mixture's length: from 0 (one after the other) up to,
    not including, 1 (both would have to speak all the time, the same length exactly)."""
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap < 1.0):
        raise FusionpipeError(f"--overlap {overlap}: the overlap ratio is the overlapped share of each mixture, "
                              "a number from 0 (no overlap) up to but not including 1, e.g. --overlap 0.3")
    return float(overlap)


def speech_span(wave: np.ndarray) -> tuple[int, int]:
    """(first, last + 1) sample of the source's speech (`audio.loud_frames`); (0, 0) for silence."""
    loud, hop = loud_frames(wave)
    frames = np.flatnonzero(loud)
    if frames.size == 0:
        return 0, 0
    return int(frames[0] * hop), int((frames[-1] + 1) * hop)


def start_of_second(a: int, b: int, overlap: float) -> int | None:
    """Where (in samples) the second source starts so that overlapped / mixture length == overlap, or None
    when two sources of lengths a and b cannot have that overlap.

    The second starts at s <= a and ends at or after the first (the first is never inside the second nor the
    second inside the first: then the ratio would be fixed by the lengths alone), so the overlap is a - s and
    the mixture s + b long: (a - s) / (s + b) = r gives s = (a - r b) / (1 + r), which needs a >= r b (s >= 0)
    and b >= r a (the second ends last)."""
    if a < overlap * b or b < overlap * a:
        return None
    return int(round((a - overlap * b) / (1 + overlap)))


@dataclass
class Source:
    row: int
    speaker: str
    wave: np.ndarray  # the speech only, at its drawn level


def mix_manifest(source: Manifest, count: int, overlap: float, seed: int, audio_dir: str | os.PathLike,
                 name: str) -> Manifest:
    """``count`` two-speaker mixtures of ``source``'s utterances, written to ``audio_dir`` as <name>-NNNN.flac;
    returns their manifest (root ``audio_dir``) with the ``turns`` column. The same arguments give the same
    mixtures. Refused before anything is written: a row without a speaker, fewer than two speakers, an
    overlap outside [0, 1), a count below 1."""
    overlap = check_overlap(overlap)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise FusionpipeError(f"--count {count}: give the number of mixtures to make, a whole number >= 1")
    by_speaker = _rows_by_speaker(source)
    audio_dir = Path(audio_dir)
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    speakers = sorted(by_speaker)
    split = _common(u.split for u in source)
    rows = []
    for i in range(1, count + 1):
        first, second, start = _draw_pair(source, by_speaker, speakers, overlap, rng, i)
        mixture, turns = _place(first, second, start)
        utt_id = f"{name}-{i:04d}"
        path = _write_flac(audio_dir / f"{utt_id}.flac", mixture)
        language = _common(source[s.row].language for s in (first, second))
        rows.append(Utterance(utt_id, path.name, len(mixture), SAMPLE_RATE, language=language, split=split,
                              turns=format_turns(turns)))
    return Manifest(name=name, root=audio_dir.resolve(), utterances=rows)


def _rows_by_speaker(source: Manifest) -> dict[str, list[int]]:
    by_speaker: dict[str, list[int]] = {}
    for i, u in enumerate(source):
        if not u.speaker:
            raise FusionpipeError(f"{source.where(i)} has no speaker: mixing needs the speaker of every row (the "
                                  "`speaker` column) to put two different people in each mixture and name them "
                                  "in the turns; fill it in or drop the row")
        by_speaker.setdefault(u.speaker, []).append(i)
    if len(by_speaker) < 2:
        raise FusionpipeError(f"manifest {source.source or source.name}: {len(by_speaker)} speaker(s) "
                              f"({', '.join(by_speaker) or 'none'}); a mixture needs two different speakers, so "
                              "the manifest needs at least two")
    return by_speaker


def _draw_pair(source: Manifest, by_speaker: dict[str, list[int]], speakers: list[str], overlap: float,
               rng: random.Random, index: int) -> tuple[Source, Source, int]:
    """Two utterances of two different speakers (each speaker, then each utterance, uniformly) whose speech
    lengths allow ``overlap``, in a random order, and where the second starts."""
    lengths = []
    for _ in range(ATTEMPTS):
        pair = [_source(source, rng.choice(by_speaker[s]), rng) for s in rng.sample(speakers, 2)]
        first, second = pair
        start = start_of_second(len(first.wave), len(second.wave), overlap)
        if start is not None and len(first.wave) and len(second.wave):
            return first, second, start
        lengths.append(min(len(first.wave), len(second.wave)) / max(len(first.wave), len(second.wave), 1))
    raise FusionpipeError(f"mixture {index}: none of {ATTEMPTS} pairs of utterances can overlap by {overlap}: the "
                          f"shorter source must be at least {overlap} of the longer, and the closest pair drawn "
                          f"was {max(lengths):.2f}; ask for a smaller --overlap or use utterances of more alike "
                          "lengths")


def _source(source: Manifest, row: int, rng: random.Random) -> Source:
    wave = load(source, row)
    begin, end = speech_span(wave)
    speech = wave[begin:end].astype(np.float64)
    rms = float(np.sqrt(np.mean(speech ** 2))) if len(speech) else 0.0
    gain = 10 ** (rng.uniform(*LEVEL_DBFS) / 20) / rms if rms > 0 else 0.0
    return Source(row, source[row].speaker, (speech * gain).astype(np.float32))


def _place(first: Source, second: Source, start: int) -> tuple[np.ndarray, list[Turn]]:
    """The mixture (the first at 0, the second at ``start``) and each source's turn, in seconds."""
    length = max(len(first.wave), start + len(second.wave))
    mixture = np.zeros(length, dtype=np.float32)
    mixture[:len(first.wave)] += first.wave
    mixture[start:start + len(second.wave)] += second.wave
    peak = float(np.abs(mixture).max())
    if peak > PEAK:
        mixture *= PEAK / peak
    turns = [Turn(0.0, len(first.wave) / SAMPLE_RATE, first.speaker),
             Turn(start / SAMPLE_RATE, (start + len(second.wave)) / SAMPLE_RATE, second.speaker)]
    return mixture, turns


def _write_flac(path: Path, wave: np.ndarray) -> Path:
    """16-bit FLAC, whole or absent (written beside, then renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        sf.write(tmp, wave, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
        os.replace(tmp, path)
    except (OSError, sf.LibsndfileError) as e:  # libsndfile says only "System error" on a full disk
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        raise FusionpipeError(f"cannot write mixture {path} ({e}; {free:,} bytes free there): free some space or "
                              "choose another --out and rerun; the manifest and RTTM are written only after every "
                              "mixture, so nothing half-made is left to use") from None
    return path


def _common(values) -> str | None:
    """The one value all share (the split, the language), else None."""
    found = set(values)
    return found.pop() if len(found) == 1 else None


def overlap_ratio(cell: str) -> float:
    """Overlapped time / mixture time (from the first turn's start to the last turn's end) of a turns cell:
    what `mix_manifest` was asked for, measured back from what it wrote."""
    turns = parse_turns(cell)
    edges = sorted({t.start for t in turns} | {t.end for t in turns})
    overlapped = sum(b - a for a, b in zip(edges, edges[1:])
                     if sum(t.start <= a and b <= t.end for t in turns) >= 2)
    return overlapped / (max(t.end for t in turns) - min(t.start for t in turns))
