"""LibriSpeech -> manifest: <root>/<split>/<speaker>/<chapter>/<id>.flac + <speaker>-<chapter>.trans.txt."""

from __future__ import annotations

from pathlib import Path

import soundfile as sf

from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance, read_text

SPLITS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other", "test-clean", "test-other")


def import_librispeech(root: str | Path, split: str) -> Manifest:
    """Manifest `librispeech-<split>` with speaker, text (upper case, as distributed) and split."""
    root = Path(root).resolve()
    split_dir = root / split
    if not split_dir.is_dir():
        raise FusionpipeError(f"{split_dir} not found: pass the directory that contains {split}/ (one of {SPLITS})")
    rows = []
    for trans in sorted(split_dir.glob("*/*/*.trans.txt")):
        for line in read_text(trans, "transcript").splitlines():
            if not line.strip():
                continue
            utt_id, text = line.split(" ", 1)
            audio = trans.parent / f"{utt_id}.flac"
            if not audio.is_file():
                raise FusionpipeError(f"{trans}: lists {utt_id} but {audio} is missing")
            info = sf.info(str(audio))
            rows.append(Utterance(utt_id, str(audio.relative_to(root)), info.frames, info.samplerate,
                                  speaker=utt_id.split("-")[0], text=text.strip(), split=split))
    if not rows:
        raise FusionpipeError(f"no *.trans.txt under {split_dir}: is this a LibriSpeech tree?")
    return Manifest(name=f"librispeech-{split}", root=root, utterances=rows)
