"""Libri2Mix-style diarization data -> manifests with the ``turns`` column (SUPERB SD trains on Libri2Mix).

    >>> [m.name for m in import_librimix("/data/Libri2Mix/wav16k/max",
    ...      metadata=["/data/Libri2Mix/wav16k/max/metadata/mixture_train_mix_both.csv"])]   # doctest: +SKIP
    ['librimix-train_mix_both']

Two ways to say who speaks when, one manifest per file given:

- ``rttm``: RTTM files over mixture wavs anywhere under ``root``; a recording is a wav's stem. Every RTTM line
  must name a wav there (else the file and line are named), and only one (LibriMix saves a mixture's sources
  under its name too: then ``root`` must be the mixtures' own folder, e.g. ``test/mix_both``); wavs no RTTM
  names (other splits) are left out.
- ``metadata``: LibriMix's metadata CSVs (``mixture_ID, mixture_path, source_1_path, source_2_path, ...,
  length``). A mixture's ID joins its sources' LibriSpeech utterances with ``_`` in source order
  (``1089-134686-0000_121-121726-0001``; ``original_mixture_ID`` where LibriMix hashed a long one), and the
  sources are saved under that same ID (``s1/<ID>.wav``), so source k's speaker is the first field of the
  ID's k-th part (1089, then 121). Its turns are where the source is active: 10 ms frames within `audio.SPEECH_FLOOR_DB`
  of the source's loudest one, pauses shorter than `MIN_PAUSE` bridged. The mixtures sum sources that all
  start at 0, so these turns are where each speaker's own signal has speech (an energy threshold is enough
  on clean read speech; SUPERB SD's own RTTM files import as they are with ``rttm``). Paths in the CSV may
  be absolute (as LibriMix writes them) or relative to ``root``; a path found nowhere is named with its file
  and line.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

from fusionpipe.audio import loud_frames
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance
from fusionpipe.rttm import Turn, check_overlaps, format_turns, read_rttm

MIN_PAUSE = 0.25     # seconds: shorter pauses stay inside one turn (as a listener would hear them)
REQUIRED_COLUMNS = ("mixture_ID", "mixture_path", "source_1_path")


def import_librimix(root: str | Path, rttm: list[str | Path] = (), metadata: list[str | Path] = (),
                    prefix: str = "librimix") -> list[Manifest]:
    """One manifest ``<prefix>-<file stem>`` per RTTM file and per metadata CSV, rows with ``turns``."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FusionpipeError(f"{root} is not a directory: give the folder of the mixtures (e.g. "
                              "Libri2Mix/wav16k/max)")
    if not rttm and not metadata:
        raise FusionpipeError("say who speaks when: give --rttm FILE (mixture wavs under ROOT) or --metadata CSV "
                              "(LibriMix's metadata/mixture_*.csv)")
    out = [_from_rttm(root, Path(f), prefix) for f in rttm]
    out += [_from_metadata(root, Path(f), prefix) for f in metadata]
    return out


def _manifest_name(prefix: str, path: Path) -> str:
    return f"{prefix}-{path.stem.removeprefix('mixture_')}"


def _from_rttm(root: Path, path: Path, prefix: str) -> Manifest:
    wavs: dict[str, list[Path]] = {}
    for wav in sorted(root.rglob("*.wav")):
        wavs.setdefault(wav.stem, []).append(wav)
    turns = read_rttm(path, recordings=wavs)
    if not turns:
        raise FusionpipeError(f"{path} has no SPEAKER lines: nothing to diarize")
    for recording in turns:
        if len(wavs[recording]) > 1:  # LibriMix names a mixture's sources and its noise after it too
            shown = ", ".join(str(w.relative_to(root)) for w in wavs[recording][:3])
            raise FusionpipeError(f"{path}: recording {recording} is the stem of several wavs under {root} ({shown}); "
                                  "give the folder of the mixtures as ROOT (e.g. Libri2Mix/wav16k/max/test/mix_both)")
    rows = [_row(root, recording, wavs[recording][0], ts) for recording, ts in sorted(turns.items())]
    return Manifest(_manifest_name(prefix, path), root, rows)


def _from_metadata(root: Path, path: Path, prefix: str) -> Manifest:
    if not path.is_file():
        raise FusionpipeError(f"metadata file {path} does not exist (LibriMix: <root>/metadata/mixture_*.csv)")
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise FusionpipeError(f"{path} line 1: no column {', '.join(missing)}; a LibriMix metadata CSV starts "
                                  "mixture_ID,mixture_path,source_1_path,source_2_path,...")
        sources = sorted((c for c in reader.fieldnames if c.startswith("source_") and c.endswith("_path")),
                         key=lambda c: int(c.split("_")[1]) if c.split("_")[1].isdigit() else 0)
        for record in reader:
            where = f"{path} line {reader.line_num}"
            mixture = _find(root, path, record["mixture_path"], where, "mixture_path")
            speakers = _speakers(record, len(sources), where)
            turns = []
            for c, speaker in zip(sources, speakers):
                turns += active_turns(_find(root, path, record[c], where, c), speaker)
            check_overlaps(sorted(turns), where)  # two sources of one speaker in one mixture
            rows.append(_row(root, record["mixture_ID"], mixture, turns))
    if not rows:
        raise FusionpipeError(f"{path} has a header and no mixtures")
    return Manifest(_manifest_name(prefix, path), root, rows)


def _speakers(record: dict, sources: int, where: str) -> list[str]:
    """The speaker of each source, from the mixture ID's LibriSpeech utterance names in source order."""
    mixture_id = record.get("original_mixture_ID") or record["mixture_ID"]
    utterances = (mixture_id or "").split("_")
    if len(utterances) < sources or not all(u.split("-")[0] for u in utterances[:sources]):
        raise FusionpipeError(f"{where}: mixture_ID {mixture_id!r} does not name {sources} LibriSpeech utterances "
                              "joined by '_' (e.g. 1089-134686-0000_121-121726-0001), one per source column; the "
                              "speakers are read from it")
    return [u.split("-")[0] for u in utterances[:sources]]


def _find(root: Path, csv_path: Path, value: str | None, where: str, column: str) -> Path:
    """A CSV path as written, else under ``root``, else beside the CSV's folder (metadata/..)."""
    if not value:
        raise FusionpipeError(f"{where}: {column} is empty")
    for candidate in (Path(value), root / value, csv_path.parent.parent / value):
        if candidate.is_file():
            return candidate.resolve()
    raise FusionpipeError(f"{where}: {column} {value} does not exist, as written or under {root}; give the ROOT "
                          "the paths are relative to")


def _row(root: Path, recording: str, wav: Path, turns: list[Turn]) -> Utterance:
    info = sf.info(str(wav))
    path = wav.relative_to(root).as_posix() if wav.is_relative_to(root) else str(wav)
    return Utterance(recording, path, info.frames, info.samplerate, turns=format_turns(turns))


def active_turns(path: Path, speaker: str) -> list[Turn]:
    """The turns of ``speaker`` in a source file: runs of its loud 10 ms frames (`audio.loud_frames`), pauses
    shorter than MIN_PAUSE bridged. Reads one source at a time (a LibriSpeech utterance)."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    loud, hop = loud_frames(audio.mean(axis=1), rate)
    edges = np.diff(np.concatenate([[0], loud.astype(np.int8), [0]]))
    runs = list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))
    merged: list[list[int]] = []
    for start, end in runs:
        if merged and (start - merged[-1][1]) * hop / rate < MIN_PAUSE:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    seconds = hop / rate
    return [Turn(round(s * seconds, 3), round(e * seconds, 3), speaker) for s, e in merged]
