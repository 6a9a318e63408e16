"""Any audio tree -> manifest: every file soundfile can read, found recursively.

Transcripts are taken, when present, from a sibling `<stem>.txt` (the whole file) or from
a `transcripts.tsv` / `text` file at the root with lines `<stem><tab or space><text>`.
"""

from __future__ import annotations

from pathlib import Path

import soundfile as sf

from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance, read_text

AUDIO_SUFFIXES = {"." + f.lower() for f in sf.available_formats()} | {".opus"}


def _root_transcripts(root: Path) -> dict[str, str]:
    texts = {}
    for name in ("transcripts.tsv", "text"):
        f = root / name
        if f.is_file():
            for line in read_text(f, "transcript list").splitlines():
                parts = line.replace("\t", " ", 1).split(" ", 1)
                if len(parts) == 2:
                    texts[parts[0]] = parts[1].strip()
    return texts


def import_folder(root: str | Path, name: str | None = None) -> Manifest:
    """Manifest of every audio file under `root` (ids = path without suffix, '/' -> '-', ' ' -> '_');
    two files that would get the same id are an error naming both."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FusionpipeError(f"{root} is not a directory")
    texts = _root_transcripts(root)
    rows, first = [], {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        rel = path.relative_to(root)
        try:
            info = sf.info(str(path))
        except Exception as e:
            raise FusionpipeError(f"{path}: not readable as audio ({e}); remove or re-encode it") from None
        side = path.with_suffix(".txt")
        text = read_text(side, "transcript").strip() if side.is_file() else texts.get(path.stem)
        utt_id = str(rel.with_suffix("")).replace("/", "-").replace(" ", "_")
        if utt_id in first:  # `a b.flac` and `a_b.flac`, or `x.flac` and `x.wav`: refuse before a TSV is written
            raise FusionpipeError(f"{root}: {first[utt_id]} and {rel} would both get utterance id {utt_id!r} "
                                  f"(ids are the path without its suffix, '/' -> '-', ' ' -> '_'); rename or "
                                  f"remove one of the two files")
        first[utt_id] = rel
        rows.append(Utterance(utt_id, str(rel), info.frames, info.samplerate, text=text or None))
    if not rows:
        raise FusionpipeError(f"no audio files under {root} (looked for {sorted(AUDIO_SUFFIXES)})")
    return Manifest(name=name or root.name, root=root, utterances=rows)
