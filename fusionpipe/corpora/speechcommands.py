"""Speech Commands v1.0 -> manifests for keyword spotting (SUPERB KS), trained with the classify task.

    >>> ms = import_speechcommands("/data/speech_commands_v0.01", "manifests/speechcommands-silence")  # doctest: +SKIP
    >>> [m.name for m in ms.values()]                                                                # doctest: +SKIP
    ['speechcommands-train', 'speechcommands-dev', 'speechcommands-test']

Layout: the unpacked speech_commands_v0.01.tar.gz, one folder per word (``yes/0a7c2a8d_nohash_0.wav``),
``_background_noise_/*.wav``, ``validation_list.txt`` and ``testing_list.txt``.

- SUPERB KS's 12 labels: the ten ``KEYWORDS``, ``_unknown_`` for every other word, ``_silence_``.
- Split: a file named in validation_list.txt is ``dev``, in testing_list.txt ``test``, any other ``train``
  (the official lists, exactly).
- Utterance id ``<word>-<file stem>`` (``yes-0a7c2a8d_nohash_0``: stems repeat across words); speaker = the
  stem's hash prefix (``0a7c2a8d``).
- ``_silence_``: each background noise file is cut into consecutive 1 s clips from its start (a shorter
  tail is dropped), written as WAV files to ``silence_dir`` (not into the corpus: the user's data stays read
  only) and named in the manifests by absolute path. A clip goes to a split by the dataset's own rule for
  its files (`split_of`, the hash in the corpus README) applied to its name, so reruns give the same clips,
  the same split and the same manifests.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import soundfile as sf

from fusionpipe.atomic import atomic_write
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance, read_text

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN, SILENCE = "_unknown_", "_silence_"
CLASSES = KEYWORDS + (UNKNOWN, SILENCE)  # SUPERB KS's 12
NOISE_DIR = "_background_noise_"
LISTS = {"dev": "validation_list.txt", "test": "testing_list.txt"}
SPLITS = ("train", "dev", "test")
CLIP_SECONDS = 1.0
DOWNLOAD = "http://download.tensorflow.org/data/speech_commands_v0.01.tar.gz"
_MAX_FILES_PER_CLASS = 2**27 - 1  # the corpus README's which_set constant


def label_of(word: str) -> str:
    """A word folder -> its SUPERB KS label: the word itself if it is a keyword, else ``_unknown_``."""
    return word if word in KEYWORDS else UNKNOWN


def speaker_of(stem: str) -> str:
    """'0a7c2a8d_nohash_0' -> '0a7c2a8d' (the hashed speaker id the corpus puts before _nohash_)."""
    return re.sub(r"_nohash_.*$", "", stem)


def split_of(name: str, dev_percent: float = 10.0, test_percent: float = 10.0) -> str:
    """The corpus README's `which_set` rule (the one that made the official lists), on a clip's name: a stable
    hash decides, so the silence clips split the same way on every run and machine."""
    digest = int(hashlib.sha1(speaker_of(name).encode("utf-8")).hexdigest(), 16)
    percent = (digest % (_MAX_FILES_PER_CLASS + 1)) * (100.0 / _MAX_FILES_PER_CLASS)
    return "dev" if percent < dev_percent else "test" if percent < dev_percent + test_percent else "train"


def read_split_lists(root: Path) -> dict[str, str]:
    """'word/file.wav' -> 'dev' or 'test', from the official lists; every line must name a file of the tree."""
    listed: dict[str, str] = {}
    for split, name in LISTS.items():
        path = root / name
        if not path.is_file():
            raise FusionpipeError(f"{path} is missing: Speech Commands' split lists ({', '.join(LISTS.values())}) "
                                  f"come in the v0.01 archive ({DOWNLOAD}); pass the folder that holds them and the "
                                  "word folders")
        for n, line in enumerate(read_text(path, "split list").splitlines(), 1):
            rel = line.strip()
            if not rel:
                continue
            if not (root / rel).is_file():
                raise FusionpipeError(f"{path} line {n}: {rel} does not exist under {root}; restore the file from "
                                      "the archive or remove the line")
            if rel in listed:
                raise FusionpipeError(f"{path} line {n}: {rel} is also in {LISTS[listed[rel]]}; a file is in one "
                                      "split only: remove one of the two lines")
            listed[rel] = split
    return listed


def _word_rows(root: Path, listed: dict[str, str]) -> list[Utterance]:
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != NOISE_DIR and
                         not p.name.startswith(".")):
        for wav in sorted(folder.glob("*.wav")):
            rel = f"{folder.name}/{wav.name}"
            info = sf.info(str(wav))
            rows.append(Utterance(f"{folder.name}-{wav.stem}", rel, info.frames, info.samplerate,
                                  speaker=speaker_of(wav.stem), label=label_of(folder.name),
                                  split=listed.get(rel, "train")))
    return rows


def cut_silence(noise_dir: Path, silence_dir: Path) -> list[Utterance]:
    """The 1 s ``_silence_`` clips of every noise file, written to ``silence_dir`` (rewritten each run, with the
    same bytes). Reads one clip at a time: memory stays one clip."""
    silence_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for noise in sorted(noise_dir.glob("*.wav")):
        info = sf.info(str(noise))
        size = int(CLIP_SECONDS * info.samplerate)
        for k in range(info.frames // size):
            clip_id = f"silence-{noise.stem}-{k:03d}"
            audio, rate = sf.read(str(noise), start=k * size, frames=size, dtype="int16", always_2d=True)
            buffer = io.BytesIO()
            sf.write(buffer, audio, rate, format="WAV", subtype="PCM_16")
            clip = atomic_write(silence_dir / f"{clip_id}.wav", buffer.getvalue()).resolve()
            rows.append(Utterance(clip_id, str(clip), size, rate, label=SILENCE, split=split_of(clip_id)))
    return rows


def import_speechcommands(root: str | Path, silence_dir: str | Path) -> dict[str, Manifest]:
    """{'speechcommands-train'|'-dev'|'-test': Manifest} with label, speaker (words) and split; the silence
    clips are cut into ``silence_dir``."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FusionpipeError(f"{root} is not a directory: pass the unpacked Speech Commands v0.01 folder")
    listed = read_split_lists(root)
    if not (root / NOISE_DIR).is_dir():
        raise FusionpipeError(f"{root / NOISE_DIR} is missing: the _silence_ class is cut from it; pass the whole "
                              f"unpacked v0.01 archive ({DOWNLOAD})")
    words = _word_rows(root, listed)
    if not words:
        raise FusionpipeError(f"no <word>/*.wav under {root}: pass the unpacked Speech Commands v0.01 folder "
                              f"({DOWNLOAD})")
    rows = words + cut_silence(root / NOISE_DIR, Path(silence_dir))
    return {f"speechcommands-{s}": Manifest(f"speechcommands-{s}", root, [u for u in rows if u.split == s])
            for s in SPLITS}
