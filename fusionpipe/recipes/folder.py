"""Any audio tree -> manifest: every file soundfile can read, found recursively.

Transcripts are taken, when present, from a sibling `<stem>.txt` (the whole file) or from
a `transcripts.tsv` / `text` file at the root with lines `<stem><tab or space><text>`.
"""

from __future__ import annotations

from pathlib import Path

import soundfile as sf

from ..errors import FusionpipeError
from ..manifest import Manifest, Utterance

AUDIO_SUFFIXES = {"." + f.lower() for f in sf.available_formats()} | {".opus"}


def _root_transcripts(root: Path) -> dict[str, str]:
    texts = {}
    for name in ("transcripts.tsv", "text"):
        f = root / name
        if f.is_file():
            for line in f.read_text(encoding="utf-8").splitlines():
                parts = line.replace("\t", " ", 1).split(" ", 1)
                if len(parts) == 2:
                    texts[parts[0]] = parts[1].strip()
    return texts


def import_folder(root: str | Path, name: str | None = None) -> Manifest:
    """Manifest of every audio file under `root` (ids = path without suffix, '/' -> '-')."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FusionpipeError(f"{root} is not a directory")
    texts = _root_transcripts(root)
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        rel = path.relative_to(root)
        try:
            info = sf.info(str(path))
        except Exception as e:
            raise FusionpipeError(f"{path}: not readable as audio ({e}); remove or re-encode it") from None
        side = path.with_suffix(".txt")
        text = side.read_text(encoding="utf-8").strip() if side.is_file() else texts.get(path.stem)
        utt_id = str(rel.with_suffix("")).replace("/", "-").replace(" ", "_")
        rows.append(Utterance(utt_id, str(rel), info.frames, info.samplerate, text=text or None))
    if not rows:
        raise FusionpipeError(f"no audio files under {root} (looked for {sorted(AUDIO_SUFFIXES)})")
    return Manifest(name=name or root.name, root=root, utterances=rows)
