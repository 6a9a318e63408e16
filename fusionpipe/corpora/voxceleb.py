"""VoxCeleb1 -> manifests for speaker verification (SUPERB SV), and its trial list in our format.

    >>> manifests = import_voxceleb("/data/VoxCeleb1", trials="/data/VoxCeleb1/veri_test2.txt")  # doctest: +SKIP
    >>> [m.name for m in manifests.values()]                                                   # doctest: +SKIP
    ['voxceleb1-dev', 'voxceleb1-test']
    >>> write_trials("/data/VoxCeleb1/veri_test2.txt", "manifests/voxceleb1-trials.txt")      # doctest: +SKIP

Layout: the wav tree of the official zips, ``<speaker id>/<YouTube video id>/<NNNNN>.wav``
(id10001/1zcIwhmdeo4/00001.wav), found under ``root``, ``root/wav`` or ``root/*/wav`` (so
``vox1_dev_wav/wav`` and ``vox1_test_wav/wav`` unpacked side by side work as they are).

- Utterance id = the path without ".wav", "/" -> "-": ``id10270-x6uYqmx31kE-00001``; speaker =
  the speaker id; split = ``dev`` or ``test``.
- Test speakers: those of the trial list when one is given (veri_test2.txt, the cleaned
  VoxCeleb1-O list, uses the 40 speakers id10270-id10309), else that official range. Every
  other speaker is in ``voxceleb1-dev`` (1,211 speakers: SUPERB trains on it).
- The official trial lines ``1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav``
  become ``1 id10270-x6uYqmx31kE-00001 id10270-8jEAjG6SegY-00008`` (label enroll test), the
  format of `fusionpipe.trials`, which the verify task reads.
"""

from __future__ import annotations

from pathlib import Path

import soundfile as sf

from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance, read_text
from fusionpipe.trials import Trial, format_trial, parse_trial

OFFICIAL_TEST_SPEAKERS = {f"id{n}" for n in range(10270, 10310)}


def utterance_id(rel: str) -> str:
    """'id10270/x6uYqmx31kE/00001.wav' -> 'id10270-x6uYqmx31kE-00001'."""
    return rel.removesuffix(".wav").replace("/", "-")


def _wav_roots(root: Path) -> list[Path]:
    """Directories that hold the id*/ speaker folders."""
    candidates = [root, root / "wav", *sorted(p / "wav" for p in root.iterdir() if p.is_dir())]
    return [c for c in candidates if c.is_dir() and any(p.is_dir() and p.name.startswith("id") for p in c.iterdir())]


def read_official_trials(path: str | Path) -> list[Trial]:
    """(enroll path, test path, label) of an official VoxCeleb trial list: our line format, over paths."""
    path = Path(path)
    if not path.is_file():
        raise FusionpipeError(f"trial list {path} does not exist (VoxCeleb1-O cleaned: veri_test2.txt)")
    out = []
    for n, line in enumerate(read_text(path, "trial list").splitlines(), 1):
        if not line.strip():
            continue
        if (trial := parse_trial(line)) is None:
            raise FusionpipeError(f"{path}:{n}: expected '<0|1> idXXXXX/video/NNNNN.wav idYYYYY/video/NNNNN.wav', "
                                  f"got {line!r}")
        out.append(trial)
    return out


def import_voxceleb(root: str | Path, trials: str | Path | None = None) -> dict[str, Manifest]:
    """{'voxceleb1-dev': Manifest, 'voxceleb1-test': Manifest} with speaker and split."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FusionpipeError(f"{root} is not a directory: pass the VoxCeleb1 root (holding wav/id*/...)")
    roots = _wav_roots(root)
    if not roots:
        raise FusionpipeError(f"no speaker folders id*/ under {root}, {root}/wav or {root}/*/wav: "
                              "is this the unpacked VoxCeleb1 wav tree?")
    test_speakers = OFFICIAL_TEST_SPEAKERS
    if trials is not None:
        test_speakers = {p.split("/")[0] for a, b, _ in read_official_trials(trials) for p in (a, b)}
    rows: dict[str, list[Utterance]] = {"dev": [], "test": []}
    seen: dict[str, Path] = {}
    for wav_root in roots:
        for path in sorted(wav_root.glob("id*/*/*.wav")):
            rel = path.relative_to(wav_root).as_posix()
            utt = utterance_id(rel)
            if utt in seen:
                raise FusionpipeError(f"{path}: utterance {utt} is also at {seen[utt]}; keep one copy")
            seen[utt] = path
            info = sf.info(str(path))
            speaker = rel.split("/")[0]
            split = "test" if speaker in test_speakers else "dev"
            rows[split].append(Utterance(utt, path.relative_to(root).as_posix(), info.frames, info.samplerate,
                                         speaker=speaker, split=split))
    for split, utts in rows.items():
        if not utts:
            raise FusionpipeError(f"no {split} utterances under {root} (test speakers: "
                                  f"{', '.join(sorted(test_speakers)[:3])} ...); is the tree complete?")
    return {f"voxceleb1-{split}": Manifest(f"voxceleb1-{split}", root, utts) for split, utts in rows.items()}


def write_trials(official: str | Path, out: str | Path, test: Manifest | None = None) -> Path:
    """Convert an official trial list to ours; with ``test``, check every utterance is in it."""
    known = {u.id for u in test} if test is not None else None
    lines = []
    for n, (a, b, label) in enumerate(read_official_trials(official), 1):
        ids = utterance_id(a), utterance_id(b)
        if known is not None:
            missing = [u for u in ids if u not in known]
            if missing:
                raise FusionpipeError(f"{official}:{n}: {', '.join(missing)} not in manifest {test.name}; "
                                      "is the VoxCeleb1 test wav tree complete?")
        lines.append(format_trial((*ids, label)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
