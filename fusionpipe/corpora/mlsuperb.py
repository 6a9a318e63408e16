"""ML-SUPERB -> manifests for the monolingual and multilingual ASR tracks (1 h or 10 min).

    >>> manifests = import_mlsuperb("/data/ml_superb/eighth_version", duration="1h")   # doctest: +SKIP
    >>> sorted(manifests)[:3]                                                           # doctest: +SKIP
    ['mlsuperb-mono-cmn-1h-dev', 'mlsuperb-mono-cmn-1h-test', 'mlsuperb-mono-cmn-1h-train']

Layout assumed: the ML-SUPERB release as ESPnet's egs2/ml_superb reads it::

    <root>/<source corpus>/<lang>/wav/<utt_id>.wav          e.g. fleurs/cmn/wav/fleurs_cmn_000001.wav
    <root>/<source corpus>/<lang>/transcript_1h_train.txt     "<utt_id> <field> <text>" per line
    <root>/<source corpus>/<lang>/transcript_10min_train.txt
    <root>/<source corpus>/<lang>/transcript_10min_dev.txt
    <root>/<source corpus>/<lang>/transcript_10min_test.txt

Every row gets ``language`` (the ISO 639-3 folder name) and ``text``, normalised as ESPnet's
data_prep.py does: [bracketed] annotations removed, ASCII punctuation removed, upper case.

- Multilingual (``mlsuperb-multi-<duration>-{train,dev,test}``): every (corpus, language)'s
  train set of that duration, dev and test; training utterances over 20 s are left out (the
  ML-SUPERB default). The 20 few-shot languages (`RESERVED`) are left out of all three: the
  tables report the normal languages (our choice; their 5-shot protocol is not reproduced).
- Monolingual (``mlsuperb-mono-<lang>-<duration>-{train,dev,test}`` for the 13 `MONOLINGUAL`
  settings): train and dev from the one corpus ML-SUPERB selects for that setting (e.g. eng1 =
  MLS, eng3 = VoxPopuli), test from every corpus of that language.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import soundfile as sf

from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance, read_text

# ML-SUPERB's monolingual settings and the corpus each one trains on (ESPnet single_lang_data_prep.py)
MONOLINGUAL = {"eng1": "mls", "eng2": "nchlt", "eng3": "voxpopuli", "fra1": "voxforge", "fra2": "voxpopuli",
               "deu1": "swc", "deu2": "voxpopuli", "rus": "M-AILABS", "swa": "ALFFA", "swe": "NST",
               "jpn": "commonvoice", "cmn": "fleurs", "xty": "mexico-el"}
# the few-shot languages, held out of the normal multilingual track
RESERVED = {"dan", "lit", "tur", "srp", "vie", "kaz", "zul", "tsn", "epo", "frr", "tok", "umb", "bos", "ful",
            "ceb", "luo", "kea", "sun", "tso", "tos"}
DURATIONS = ("1h", "10min")
MAX_TRAIN_SECONDS = 20.0
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    text = re.sub(r"\[[^()]*\]", "", text)
    return " ".join(text.translate(_PUNCTUATION).upper().split())


def _transcript(path: Path) -> list[tuple[str, str]]:
    rows = []
    for n, line in enumerate(read_text(path, "transcript").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=2)
        if len(parts) < 2:
            raise FusionpipeError(f"{path}:{n}: expected '<utt_id> <field> <text>', got {line!r}")
        rows.append((parts[0], parts[2] if len(parts) == 3 else ""))
    return rows


def _rows(root: Path, lang_dir: Path, transcript: str, split: str, max_seconds: float | None) -> list[Utterance]:
    path = lang_dir / transcript
    if not path.is_file():
        return []
    out = []
    for utt, text in _transcript(path):
        wav = lang_dir / "wav" / f"{utt}.wav"
        if not wav.is_file():
            raise FusionpipeError(f"{path}: lists {utt} but {wav} is missing")
        info = sf.info(str(wav))
        if max_seconds is not None and info.frames > max_seconds * info.samplerate:
            continue
        text = normalise(text)
        if not text:
            continue  # nothing to recognise once annotations and punctuation are gone
        out.append(Utterance(utt, wav.relative_to(root).as_posix(), info.frames, info.samplerate,
                             text=text, language=lang_dir.name, split=split))
    return out


def _lang_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if (p / "wav").is_dir())


def import_mlsuperb(root: str | Path, duration: str = "1h") -> dict[str, Manifest]:
    """The multilingual manifests and the monolingual ones whose language is present, by name."""
    root = Path(root).resolve()
    if duration not in DURATIONS:
        raise FusionpipeError(f"duration {duration!r}: choose one of {', '.join(DURATIONS)}")
    langs = _lang_dirs(root)
    if not langs:
        raise FusionpipeError(f"no <corpus>/<lang>/wav/ folders under {root}: pass the ML-SUPERB data "
                              "directory (the one holding fleurs/, commonvoice/, mls/ ...)")
    out: dict[str, Manifest] = {}
    multi = {"train": [], "dev": [], "test": []}
    for d in langs:
        if d.name in RESERVED:
            continue
        multi["train"] += _rows(root, d, f"transcript_{duration}_train.txt", "train", MAX_TRAIN_SECONDS)
        multi["dev"] += _rows(root, d, "transcript_10min_dev.txt", "dev", None)
        multi["test"] += _rows(root, d, "transcript_10min_test.txt", "test", None)
    for split, rows in multi.items():
        if rows:
            name = f"mlsuperb-multi-{duration}-{split}"
            out[name] = Manifest(name, root, rows)
    for setting, corpus in MONOLINGUAL.items():
        lang = setting[:3]
        selected = root / corpus / lang
        if not (selected / "wav").is_dir():
            continue
        mono = {"train": _rows(root, selected, f"transcript_{duration}_train.txt", "train", None),
                "dev": _rows(root, selected, "transcript_10min_dev.txt", "dev", None),
                "test": [u for d in langs if d.name == lang
                         for u in _rows(root, d, "transcript_10min_test.txt", "test", None)]}
        for split, rows in mono.items():
            if rows:
                name = f"mlsuperb-mono-{setting}-{duration}-{split}"
                out[name] = Manifest(name, root, rows)
    if not any(n.startswith("mlsuperb-multi") for n in out):
        raise FusionpipeError(f"no transcript_{duration}_train.txt / transcript_10min_{{dev,test}}.txt under "
                              f"{root}/<corpus>/<lang>/: is this the ML-SUPERB data directory?")
    return out
