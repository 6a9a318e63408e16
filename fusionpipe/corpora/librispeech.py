"""LibriSpeech -> manifest: <root>/<split>/<speaker>/<chapter>/<id>.flac + <speaker>-<chapter>.trans.txt.

With a pronunciation lexicon (`read_lexicon`, the librispeech-lexicon.txt format) every row also gets
``phonemes``, the phone tokens of its words, for phoneme recognition (SUPERB PR):

    >>> m = import_librispeech("/data/LibriSpeech", "dev-clean", lexicon=["librispeech-lexicon.txt"])  # doctest: +SKIP
    >>> m[0].phonemes                                                                                 # doctest: +SKIP
    'JH AO1 N Z AH0 N ...'

Phones are kept as the lexicon writes them, ARPAbet stress digits included, as SUPERB PR's vocabulary
(s3prl downstream/ctc/vocab/phoneme.txt, 69 phones with stress) does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import soundfile as sf

from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance, read_text

SPLITS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other", "test-clean", "test-other")
SHOWN_MISSING = 5  # the missing words an error names, each with the transcript line it comes from


def read_lexicon(paths: Sequence[str | Path]) -> dict[str, str]:
    """Word -> its phones (one string, single spaces) from lexicon files: a word and its phones per line,
    whitespace separated. The first pronunciation of a word wins, over all files in order (as s3prl's
    LibriPhone reads its two lexicons), so that a word always maps to the same phones."""
    lexicon: dict[str, str] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FusionpipeError(f"lexicon {path} does not exist; pass --lexicon librispeech-lexicon.txt (from "
                                  "https://www.openslr.org/11/)")
        for n, line in enumerate(read_text(path, "lexicon").splitlines(), 1):
            if not line.strip():
                continue
            word, *phones = line.split()
            if not phones:
                raise FusionpipeError(f"lexicon {path} line {n}: {line.strip()!r} has no phones; a line is a word "
                                      "then its phones, whitespace separated (fix or remove the line)")
            lexicon.setdefault(word, " ".join(phones))
    return lexicon


def _transcript_lines(split_dir: Path):
    """(transcript file, line number, utterance id, text) of every utterance under ``split_dir``, in order."""
    for trans in sorted(split_dir.glob("*/*/*.trans.txt")):
        for n, line in enumerate(read_text(trans, "transcript").splitlines(), 1):
            if line.strip():
                utt_id, text = line.split(" ", 1)
                yield trans, n, utt_id, text.strip()


def _check_words(split_dir: Path, lexicon: dict[str, str], lexicon_paths: Sequence[str | Path]) -> None:
    """Refuse a split with words the lexicon lacks, naming how many and where the first few come from, before
    any audio file is read."""
    missing: dict[str, str] = {}
    for trans, n, _, text in _transcript_lines(split_dir):
        for word in text.split():
            if word not in lexicon and word not in missing:
                missing[word] = f"{trans} line {n}"
    if missing:
        shown = "; ".join(f"{w} ({where})" for w, where in list(missing.items())[:SHOWN_MISSING])
        more = f" and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        raise FusionpipeError(
            f"lexicon {', '.join(map(str, lexicon_paths))}: {len(missing)} words of {split_dir.name} are missing "
            f"from it: {shown}{more}; add them (e.g. s3prl's librispeech-lexicon-allothers-g2p.txt as a second "
            "--lexicon, or lines from a G2P model) or pass the lexicon that covers this split")


def import_librispeech(root: str | Path, split: str, lexicon: Sequence[str | Path] = ()) -> Manifest:
    """Manifest `librispeech-<split>` with speaker, text (upper case, as distributed) and split; with
    ``lexicon`` (lexicon files, the first pronunciation wins) also phonemes."""
    root = Path(root).resolve()
    split_dir = root / split
    if not split_dir.is_dir():
        raise FusionpipeError(f"{split_dir} not found: pass the directory that contains {split}/ (one of {SPLITS})")
    words = read_lexicon(lexicon) if lexicon else None
    if words is not None:
        _check_words(split_dir, words, lexicon)
    rows = []
    for trans, _, utt_id, text in _transcript_lines(split_dir):
        audio = trans.parent / f"{utt_id}.flac"
        if not audio.is_file():
            raise FusionpipeError(f"{trans}: lists {utt_id} but {audio} is missing")
        info = sf.info(str(audio))
        phonemes = " ".join(words[w] for w in text.split()) if words is not None else None
        rows.append(Utterance(utt_id, str(audio.relative_to(root)), info.frames, info.samplerate,
                              speaker=utt_id.split("-")[0], text=text, split=split, phonemes=phonemes))
    if not rows:
        raise FusionpipeError(f"no *.trans.txt under {split_dir}: is this a LibriSpeech tree?")
    return Manifest(name=f"librispeech-{split}", root=root, utterances=rows)
