"""Manifests: one row per utterance, a TSV with a header (shared by all three stages).

    # root: /data/LibriSpeech
    id	path	num_samples	sample_rate	speaker	text	label	language	split
    103-1240-0000	train-clean-100/103/1240/103-1240-0000.flac	225360	16000	103	CHAPTER ONE ...

`path` is relative to the root named on the first line, so a corpus can move: edit one
line (or pass ``root=``). A relative root is relative to the manifest file's directory.

    >>> m = read_manifest("manifests/demo-train.tsv")          # doctest: +SKIP
    >>> m.name, len(m), m[0].id, m.audio_path(m[0])           # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fusionpipe.atomic import atomic_write
from fusionpipe.errors import FusionpipeError

REQUIRED = ("id", "path", "num_samples", "sample_rate")
# the first five predate the rest: a row hashes them always and the later ones only when set (`content_hash`),
# so adding a column never changes the hash of a manifest without it, nor invalidates its caches
FIRST_OPTIONAL = ("speaker", "text", "label", "language", "split")
# phonemes: the phone tokens said, separated by spaces (phoneme recognition; a lexicon's or espeak-ng's);
# turns: who speaks when, "start,end,speaker" in seconds from the start of the audio, turns separated by
# ";" (diarization; read from RTTM by the importers)
OPTIONAL = FIRST_OPTIONAL + ("phonemes", "turns")
COLUMNS = REQUIRED + OPTIONAL
ROOT_PREFIX = "# root:"


@dataclass(frozen=True)
class Utterance:
    """One manifest row.

    >>> Utterance("u1", "a/u1.flac", 16000, 16000, speaker="s1").duration
    1.0
    """

    id: str
    path: str
    num_samples: int
    sample_rate: int
    speaker: str | None = None
    text: str | None = None
    label: str | None = None
    language: str | None = None
    split: str | None = None
    phonemes: str | None = None
    turns: str | None = None

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


@dataclass
class Manifest:
    """A named list of utterances whose paths are relative to ``root``."""

    name: str
    root: Path
    utterances: list[Utterance]
    source: Path | None = None  # the TSV it was read from, for error messages

    def __len__(self) -> int:
        return len(self.utterances)

    def __iter__(self) -> Iterator[Utterance]:
        return iter(self.utterances)

    def __getitem__(self, i: int) -> Utterance:
        return self.utterances[i]

    def audio_path(self, utt: Utterance) -> Path:
        return self.root / utt.path

    def by_id(self) -> dict[str, Utterance]:
        return {u.id: u for u in self.utterances}

    @property
    def duration(self) -> float:
        return sum(u.duration for u in self.utterances)

    def first(self, seconds: float, name: str | None = None) -> Manifest:
        """The leading rows that make up `seconds` of audio (benchmarks and probes on part of a corpus)."""
        rows, total = [], 0.0
        for u in self.utterances:
            if total >= seconds:
                break
            rows.append(u)
            total += u.duration
        return Manifest(name or f"{self.name}-{int(seconds)}s", self.root, rows, self.source)

    def content_hash(self) -> str:
        """sha256 of the rows (not the root): moving a corpus keeps its caches valid."""
        h = hashlib.sha256()
        for u in self.utterances:
            h.update("\t".join(_cells(u)).encode())
            h.update(b"\n")
        return h.hexdigest()

    def where(self, row: int) -> str:
        """'manifests/x.tsv row 12 (id u1)': the place to point at in an error."""
        src = self.source or self.name
        return f"{src} row {row + 1} (id {self.utterances[row].id})"


def check_subset(part: Manifest, whole: dict[str, Utterance | None], whole_name: str, fix: str) -> None:
    """Every row of ``part`` must be a row of ``whole`` (id -> row; None: only the id is known) that
    describes the same audio: the same path (as written, relative to the root), num_samples and
    sample_rate. Raises FusionpipeError naming the first row that is not, ``whole_name`` and ``fix``."""
    for i, u in enumerate(part):
        if u.id not in whole:
            raise FusionpipeError(f"{part.where(i)} is not in {whole_name}; {fix}")
        r = whole[u.id]
        if r is not None and (r.path, r.num_samples, r.sample_rate) != (u.path, u.num_samples, u.sample_rate):
            raise FusionpipeError(f"{part.where(i)} is {u.path} ({u.num_samples} samples at {u.sample_rate} Hz) "
                                  f"but {whole_name} has {r.path} ({r.num_samples} samples at {r.sample_rate} Hz) "
                                  f"under that id: not the same audio; {fix}")


def _cells(u: Utterance) -> list[str]:
    """The row as hashed: the required and first optional columns always, a later column as name=value
    only when set."""
    first = ["" if getattr(u, c) is None else str(getattr(u, c)) for c in REQUIRED + FIRST_OPTIONAL]
    later = [f"{c}={getattr(u, c)}" for c in OPTIONAL[len(FIRST_OPTIONAL):] if getattr(u, c) is not None]
    return first + later


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a UTF-8 file (a manifest, a transcript list), or a FusionpipeError naming the file, the line
    and the fix when it is not UTF-8.

    A leading UTF-8 byte order mark is dropped ("utf-8-sig"): Excel and Notepad write one when saving
    "CSV UTF-8" or "UTF-8 with BOM", it says nothing about the content, and kept it would glue itself to the
    first header cell ("\ufeff# root:" or "\ufeffid") and make a correct file look malformed. Because
    ``Manifest.content_hash`` hashes the parsed rows, never the file's bytes, a manifest saved with a BOM is
    the same manifest as without one: its stores stay valid. (A UTF-16 file, Excel's "Unicode Text", is
    refused by name rather than guessed at.)
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(_UTF16_BOMS):
        raise FusionpipeError(f"{what} {path} is UTF-16 (it starts with a UTF-16 byte order mark, as Excel's "
                              f"'Unicode Text' writes); save it as UTF-8, e.g. "
                              f"`iconv -f UTF-16 -t UTF-8 {path} > fixed.tsv`")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise FusionpipeError(
            f"{what} {path} line {line} is not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); save it as "
            f"UTF-8 (Excel: 'CSV UTF-8'; from Latin-1: `iconv -f LATIN1 -t UTF-8 {path} > fixed.tsv`)"
        ) from None


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Manifest:
    """Read a manifest TSV; every malformed row is an error naming the file and the row."""
    path = Path(path)
    if not path.is_file():
        raise FusionpipeError(
            f"manifest {path} does not exist; make one with `fusionpipe manifest folder DIR` "
            "or `fusionpipe manifest librispeech DIR`"
        )
    lines = read_text(path, "manifest").splitlines()
    declared_root = None
    if lines and lines[0].startswith(ROOT_PREFIX):
        declared_root = lines.pop(0)[len(ROOT_PREFIX):].strip()
        first_data_line = 3
    else:
        first_data_line = 2
    if not lines:
        raise FusionpipeError(f"manifest {path} is empty: it needs a header line with {', '.join(REQUIRED)}")
    header = lines[0].split("\t")
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    if missing or unknown:
        raise FusionpipeError(
            f"manifest {path} header {header}: missing columns {missing}, unknown columns {unknown}; "
            f"columns are {list(REQUIRED)} and optionally {list(OPTIONAL)}"
        )
    rows, seen = [], {}
    for n, line in enumerate(lines[1:], start=first_data_line):
        if not line.strip():
            continue
        cells = line.split("\t")
        where = f"{path} line {n}"
        if len(cells) != len(header):
            raise FusionpipeError(f"{where}: {len(cells)} fields, header has {len(header)} (tabs inside a text?)")
        rec = dict(zip(header, cells))
        try:
            num_samples, sample_rate = int(rec["num_samples"]), int(rec["sample_rate"])
        except ValueError:
            raise FusionpipeError(
                f"{where}: num_samples={rec['num_samples']!r} and sample_rate={rec['sample_rate']!r} must be integers"
            ) from None
        if not rec["id"] or not rec["path"] or num_samples < 0 or sample_rate <= 0:
            raise FusionpipeError(f"{where}: needs a non-empty id and path, num_samples >= 0 and sample_rate > 0")
        if rec["id"] in seen:
            raise FusionpipeError(f"{where}: duplicate id {rec['id']!r}, also on line {seen[rec['id']]}; ids must be "
                                  f"unique: rename or remove one of the two rows")
        seen[rec["id"]] = n
        opt = {c: (rec.get(c) or None) for c in OPTIONAL}
        rows.append(Utterance(rec["id"], rec["path"], num_samples, sample_rate, **opt))
    if root is None:
        root = declared_root if declared_root is not None else "."
    root = Path(root)
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    return Manifest(name=path.stem, root=root, utterances=rows, source=path)


def write_manifest(manifest: Manifest, path: str | os.PathLike, root: str | None = None) -> Path:
    """Write ``manifest`` as TSV (atomically). Only the optional columns that hold a value are written."""
    path = Path(path)
    first: dict[str, Utterance] = {}
    for u in manifest:  # read_manifest would refuse the file: refuse it before it is written
        if u.id in first:
            raise FusionpipeError(f"manifest {manifest.name}: {first[u.id].path} and {u.path} both have id {u.id!r}; "
                                  f"ids must be unique, so {path} was not written: rename one of the two")
        first[u.id] = u
    path.parent.mkdir(parents=True, exist_ok=True)
    used = [c for c in OPTIONAL if any(getattr(u, c) is not None for u in manifest)]
    columns = list(REQUIRED) + used
    lines = [f"{ROOT_PREFIX} {root if root is not None else manifest.root}", "\t".join(columns)]
    for u in manifest:  # every row checked before anything is written: a refusal leaves no file behind
        cells = ["" if getattr(u, c) is None else str(getattr(u, c)) for c in columns]
        if any("\t" in c or "\n" in c or "\r" in c for c in cells):
            raise FusionpipeError(f"utterance {u.id}: a field contains a tab or newline, which TSV cannot hold; "
                                  f"{path} was not written: rename the file or fix the field")
        lines.append("\t".join(cells))
    return atomic_write(path, "\n".join(lines) + "\n")


BUNDLED = ("demo-train", "demo-dev", "demo-test")
CORPUS = Path(__file__).parent / "corpus"  # the demo corpus shipped inside the package


def bundled_manifests() -> list[Manifest]:
    """The demo corpus shipped inside the package (train, dev, test), or [] if it is absent."""
    paths = [CORPUS / f"{name}.tsv" for name in BUNDLED]
    return [read_manifest(p) for p in paths] if all(p.is_file() for p in paths) else []
