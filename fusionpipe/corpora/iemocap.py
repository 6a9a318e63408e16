"""IEMOCAP -> manifest for emotion recognition (SUPERB ER: 4 classes, leave-one-session-out).

    >>> m = import_iemocap("/data/IEMOCAP_full_release")                 # doctest: +SKIP
    >>> folds = iemocap_folds(m)                                         # doctest: +SKIP
    >>> sorted(folds)[:3]                                                # doctest: +SKIP
    ['iemocap-fold1-dev', 'iemocap-fold1-test', 'iemocap-fold1-train']

Layout (the official release)::

    <root>/Session{1..5}/sentences/wav/<dialog>/<utterance>.wav
    <root>/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt
        lines "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]"

- Labels: the SUPERB 4-class mapping, neu, hap (hap + exc merged), ang, sad; utterances with any
  other label (fru, sur, fea, dis, oth, xxx) are left out.
- speaker = session + the speaker's gender, from the utterance name: Ses01F_impro01_M003 is
  spoken by the male actor of session 1, "Ses01M". split = "Session1" .. "Session5".
- Folds (leave one session out): fold k tests on session k; the other four sessions are split
  into train and dev, dev = ``dev_ratio`` (default 0.2, s3prl's valid_ratio) of them chosen by
  a hash of the utterance id, so the choice is stable and the same for every upstream.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import soundfile as sf

from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance

LABELS = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad"}
SESSIONS = tuple(range(1, 6))
_LINE = re.compile(r"^\[[\d.]+ - [\d.]+\]\t(\S+)\t(\S+)\t")


def speaker_of(utt_id: str) -> str:
    """'Ses01F_impro01_M003' -> 'Ses01M' (the session and the gender of the actor speaking)."""
    return utt_id[:5] + utt_id.rsplit("_", 1)[-1][0]


def import_iemocap(root: str | Path) -> Manifest:
    """Manifest `iemocap` of the 4-class utterances of all five sessions."""
    root = Path(root).resolve()
    sessions = [root / f"Session{k}" for k in SESSIONS]
    if not any(s.is_dir() for s in sessions):
        raise FusionpipeError(f"no Session1..Session5 under {root}: pass the IEMOCAP_full_release directory")
    rows = []
    for k, session in zip(SESSIONS, sessions):
        evaluations = sorted((session / "dialog" / "EmoEvaluation").glob("*.txt"))
        if not evaluations:
            raise FusionpipeError(f"{session}/dialog/EmoEvaluation has no *.txt label files")
        for ev in evaluations:
            for line in ev.read_text(encoding="utf-8", errors="replace").splitlines():
                match = _LINE.match(line)
                if not match or match.group(2) not in LABELS:
                    continue
                utt = match.group(1)
                wav = session / "sentences" / "wav" / ev.stem / f"{utt}.wav"
                if not wav.is_file():
                    raise FusionpipeError(f"{ev}: labels {utt} but {wav} is missing")
                info = sf.info(str(wav))
                rows.append(Utterance(utt, wav.relative_to(root).as_posix(), info.frames, info.samplerate,
                                      speaker=speaker_of(utt), label=LABELS[match.group(2)], split=f"Session{k}"))
    if not rows:
        raise FusionpipeError(f"no neu/hap/exc/ang/sad utterances found under {root}")
    return Manifest("iemocap", root, rows)


def _dev_rank(utt_id: str) -> float:
    return int(hashlib.sha1(utt_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def iemocap_folds(manifest: Manifest, dev_ratio: float = 0.2,
                  folds: tuple[int, ...] = SESSIONS) -> dict[str, Manifest]:
    """iemocap-fold<k>-{train,dev,test}: test = session k, dev = dev_ratio of the rest (by id hash)."""
    out = {}
    for k in folds:
        test = [u for u in manifest if u.split == f"Session{k}"]
        rest = [u for u in manifest if u.split != f"Session{k}"]
        if not test or not rest:
            raise FusionpipeError(f"fold {k}: session {k} has {len(test)} utterances and the others {len(rest)}; "
                                  "leave-one-session-out needs all five sessions")
        dev = [u for u in rest if _dev_rank(u.id) < dev_ratio]
        train = [u for u in rest if _dev_rank(u.id) >= dev_ratio]
        for split, utts in (("train", train), ("dev", dev), ("test", test)):
            name = f"iemocap-fold{k}-{split}"
            out[name] = Manifest(name, manifest.root, utts)
    return out
