#!/usr/bin/env python3
"""Generate the bundled synthetic demo corpus (``fusionpipe/corpus``).

The corpus is synthesised with espeak-ng from sentences of tiny per-language
grammars.  espeak-ng voice *variants* (``+m1``, ``+f2`` ...) act as speakers,
four prosody settings (rate / pitch / amplitude) act as an emotion-like
``label`` (neutral, happy, angry, sad), and four languages (en, de, es, fr)
give material for multilingual ASR and language id. espeak-ng also says which
phones it spoke (the ``phonemes`` column, for phoneme recognition); the English
voices say SUPERB's keywords (keyword spotting); and the package's mixture
simulator mixes pairs of each split's utterances (diarization).

Output (all paths relative to the repository root)::

    fusionpipe/corpus/audio/<utt_id>.flac     16 kHz mono PCM_16 FLAC
    fusionpipe/corpus/trials.txt              speaker-verification trials
    fusionpipe/corpus/demo-{train,dev,test}.tsv   manifests, "# root: audio"
    fusionpipe/corpus/keywords/, keywords-{train,dev,test}.tsv   1 s keyword clips, 12 classes
    fusionpipe/corpus/mix/, mix-{train,dev,test}.tsv, .rttm      two-speaker mixtures
    fusionpipe/corpus/README.md               statistics and provenance
    manifests/{demo,keywords,mix}-*           same rows, roots ../fusionpipe/corpus/<folder>

Splits: the test split consists only of speakers whose espeak variant is
never used by a train/dev speaker (in any language); train and dev share
speakers but every utterance has its own sentence, so no sentence text occurs
in two splits.  The trial list pairs English test-split utterances.

Deterministic given ``--seed`` (espeak-ng itself is deterministic for a given
version; see the README for the version used).

Run from the repository root::

    .venv/bin/python tools/make_corpus.py

Needs ``espeak-ng`` on PATH (``apt-get install espeak-ng``) and numpy,
soundfile and soxr.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "fusionpipe" / "corpus"
AUDIO = CORPUS / "audio"
KEYWORD_AUDIO = CORPUS / "keywords"
MIX_AUDIO = CORPUS / "mix"
MANIFESTS = REPO / "manifests"

SR = 16000
MIN_DUR, MAX_DUR = 1.0, 4.0  # seconds, after trimming silence
PAD = 0.10  # seconds of silence kept at each end after trimming
MIN_RMS = 0.005
SPLITS = ("train", "dev", "test")
COLUMNS = ("id", "path", "num_samples", "sample_rate", "speaker", "text", "label", "language", "split")
DEMO_COLUMNS = COLUMNS + ("phonemes",)

# --------------------------------------------------------------------------------------
# Keyword spotting (SUPERB KS on Speech Commands v1.0): the ten words are classes of their
# own, every other word is `_unknown_`, and 1 s of background noise is `_silence_`.
# --------------------------------------------------------------------------------------
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
OTHER_WORDS = ("bed", "bird", "cat", "house")  # Speech Commands words that SUPERB counts as _unknown_
UNKNOWN, SILENCE = "_unknown_", "_silence_"
KEYWORD_TAKES = {"train": 2, "dev": 1, "test": 2}  # per voice and word; each take in another speaking style
NOISE_DBFS = (-60.0, -45.0)  # RMS of the _silence_ clips (white or brown noise), drawn per clip

# --------------------------------------------------------------------------------------
# Two-speaker mixtures for diarization, made by `fusionpipe manifest mix`'s simulator from
# each split of the demo corpus (so a split's mixtures hold only that split's speakers).
# --------------------------------------------------------------------------------------
MIXTURES = {"train": 24, "dev": 8, "test": 8}
MIX_OVERLAP = 0.25

# --------------------------------------------------------------------------------------
# Speaking styles -> emotion-like labels.  (lo, hi) ranges for espeak-ng -s (words per
# minute), -p (pitch 0-99) and -a (amplitude 0-200); each utterance draws uniformly.
# --------------------------------------------------------------------------------------
STYLES: dict[str, dict[str, tuple[int, int]]] = {
    "neutral": {"rate": (160, 175), "pitch": (45, 55), "amp": (95, 105)},
    "happy": {"rate": (195, 215), "pitch": (72, 85), "amp": (100, 112)},
    "angry": {"rate": (200, 220), "pitch": (28, 38), "amp": (120, 135)},
    "sad": {"rate": (115, 130), "pitch": (15, 26), "amp": (50, 65)},
}

# --------------------------------------------------------------------------------------
# Speakers.  Variants in HELD_OUT are used only by test speakers, so no train/dev speaker
# shares a voice variant with a test speaker, even across languages.
# --------------------------------------------------------------------------------------
ESPEAK_VOICE = {"en": "en-us", "de": "de", "es": "es", "fr": "fr-fr"}
SPEAKERS: dict[str, dict[str, list[str]]] = {
    "en": {"trainable": ["m1", "m2", "m3", "m5", "f1", "f2", "f3"], "test": ["m6", "m7", "f4"]},
    "de": {"trainable": ["m1", "f2", "m3"], "test": ["f5"]},
    "es": {"trainable": ["m2", "f1", "m5"], "test": ["m8"]},
    "fr": {"trainable": ["m3", "f3", "m1"], "test": ["m6"]},
}
HELD_OUT = {"m6", "m7", "m8", "f4", "f5"}

# --------------------------------------------------------------------------------------
# Grammars.  Each returns a sentence as a list of words (already in final case).
# --------------------------------------------------------------------------------------


def _maybe(rng: random.Random, p: float) -> bool:
    return rng.random() < p


class English:
    dets = ["THE", "A", "MY", "YOUR", "HIS", "HER", "OUR", "THAT", "EVERY"]
    adjs = ["RED", "BIG", "SMALL", "OLD", "GREEN", "BLUE", "LITTLE", "QUIET", "BROWN", "WHITE",
            "YOUNG", "TALL", "FUNNY", "CLEVER"]
    animate = ["CAT", "DOG", "MAN", "WOMAN", "GIRL", "BOY", "BIRD", "HORSE", "TEACHER", "FARMER",
               "DOCTOR", "BABY", "FOX", "RABBIT", "SISTER", "BROTHER", "NEIGHBOUR", "SAILOR"]
    inanimate = ["CAR", "BOOK", "HOUSE", "BOAT", "APPLE", "TABLE", "LETTER", "GARDEN", "HAT",
                 "BALL", "WINDOW", "PICTURE", "BASKET", "BOTTLE"]
    # (third person singular, base form)
    vt = [("SEES", "SEE"), ("LIKES", "LIKE"), ("FINDS", "FIND"), ("WANTS", "WANT"),
          ("CARRIES", "CARRY"), ("WATCHES", "WATCH"), ("FOLLOWS", "FOLLOW"), ("BUYS", "BUY"),
          ("PAINTS", "PAINT"), ("HEARS", "HEAR"), ("NEEDS", "NEED"), ("MOVES", "MOVE")]
    vi = ["SLEEPS", "RUNS", "SINGS", "WAITS", "LAUGHS", "SWIMS", "JUMPS", "WALKS", "READS", "DANCES"]
    advs = ["TODAY", "AGAIN", "NOW", "SLOWLY", "QUICKLY", "AT NIGHT", "IN THE GARDEN", "EVERY DAY",
            "ON SUNDAY", "OUTSIDE"]

    @classmethod
    def np(cls, rng: random.Random, nouns: list[str], allow_poss: bool = False) -> list[str]:
        if allow_poss and _maybe(rng, 0.15):
            owner = rng.choice(cls.animate)
            return ["THE", owner + "'S"] + ([rng.choice(cls.adjs)] if _maybe(rng, 0.3) else []) + [rng.choice(nouns)]
        words = []
        if _maybe(rng, 0.35):
            words.append(rng.choice(cls.adjs))
        words.append(rng.choice(nouns))
        det = rng.choice(cls.dets)
        if det == "A" and words[0][0] in "AEIOU":
            det = "AN"
        return [det] + words

    @classmethod
    def sentence(cls, rng: random.Random) -> list[str]:
        subj = cls.np(rng, cls.animate, allow_poss=True)
        r = rng.random()
        if r < 0.3:
            words = subj + [rng.choice(cls.vi)]
        elif r < 0.4:
            words = subj + ["DOESN'T", rng.choice(cls.vt)[1]] + cls.np(rng, cls.animate + cls.inanimate)
        else:
            words = subj + [rng.choice(cls.vt)[0]] + cls.np(rng, cls.animate + cls.inanimate)
        if _maybe(rng, 0.15):
            words += rng.choice(cls.advs).split()
        return words


class German:
    # (gender, noun)
    animate = [("m", "hund"), ("m", "vogel"), ("m", "mann"), ("m", "lehrer"), ("m", "bauer"),
               ("m", "fuchs"), ("f", "katze"), ("f", "frau"), ("f", "maus"), ("f", "lehrerin"),
               ("f", "schwester"), ("n", "kind"), ("n", "pferd"), ("n", "mädchen")]
    inanimate = [("m", "apfel"), ("m", "tisch"), ("m", "ball"), ("m", "brief"), ("m", "hut"),
                 ("f", "blume"), ("f", "tasche"), ("f", "lampe"), ("f", "tür"), ("n", "buch"),
                 ("n", "haus"), ("n", "boot"), ("n", "fenster"), ("n", "auto")]
    adjs = ["rot", "groß", "klein", "alt", "jung", "grün", "blau", "weiß", "braun", "schwarz"]
    art = {  # (case, definite) -> gender -> article
        ("nom", True): {"m": "der", "f": "die", "n": "das"},
        ("nom", False): {"m": "ein", "f": "eine", "n": "ein"},
        ("acc", True): {"m": "den", "f": "die", "n": "das"},
        ("acc", False): {"m": "einen", "f": "eine", "n": "ein"},
    }
    end = {  # adjective endings after definite (weak) / indefinite (mixed) article
        ("nom", True): {"m": "e", "f": "e", "n": "e"},
        ("nom", False): {"m": "er", "f": "e", "n": "es"},
        ("acc", True): {"m": "en", "f": "e", "n": "e"},
        ("acc", False): {"m": "en", "f": "e", "n": "es"},
    }
    vt = ["sieht", "sucht", "findet", "mag", "hört", "ruft", "malt", "kauft", "trägt", "braucht"]
    vi = ["schläft", "läuft", "singt", "wartet", "lacht", "schwimmt", "springt", "tanzt"]
    advs = ["heute", "wieder", "jetzt", "langsam", "im garten", "am abend", "oft", "draußen"]

    @classmethod
    def np(cls, rng: random.Random, nouns, case: str) -> list[str]:
        g, noun = rng.choice(nouns)
        definite = _maybe(rng, 0.6)
        words = [cls.art[(case, definite)][g]]
        if _maybe(rng, 0.35):
            words.append(rng.choice(cls.adjs) + cls.end[(case, definite)][g])
        return words + [noun]

    @classmethod
    def sentence(cls, rng: random.Random) -> list[str]:
        subj = cls.np(rng, cls.animate, "nom")
        if _maybe(rng, 0.3):
            words = subj + [rng.choice(cls.vi)]
        else:
            words = subj + [rng.choice(cls.vt)] + cls.np(rng, cls.animate + cls.inanimate, "acc")
        if _maybe(rng, 0.15):
            words += rng.choice(cls.advs).split()
        return words


class Romance:
    """Spanish and French: article + noun (+ adjective agreeing in gender) [+ verb + object]."""

    @classmethod
    def objects(cls) -> list:
        return cls.inanimate

    @classmethod
    def np(cls, rng: random.Random, nouns) -> list[str]:
        g, noun = rng.choice(nouns)
        words = [cls.art[_maybe(rng, 0.6)][g], noun]
        if _maybe(rng, 0.35):
            m, f = rng.choice(cls.adjs)
            words.append(m if g == "m" else f)
        return words

    @classmethod
    def sentence(cls, rng: random.Random) -> list[str]:
        subj = cls.np(rng, cls.animate)
        if _maybe(rng, 0.3):
            words = subj + [rng.choice(cls.vi)]
        else:
            words = subj + [rng.choice(cls.vt)] + cls.np(rng, cls.objects())
        if _maybe(rng, 0.15):
            words += rng.choice(cls.advs).split()
        return words


class Spanish(Romance):
    animate = [("m", "perro"), ("m", "gato"), ("m", "niño"), ("m", "hombre"), ("m", "caballo"),
               ("m", "pájaro"), ("m", "maestro"), ("f", "niña"), ("f", "mujer"), ("f", "vaca"),
               ("f", "maestra"), ("f", "gallina"), ("f", "abuela")]
    # objects are inanimate so that no personal "a" is needed
    inanimate = [("m", "libro"), ("m", "coche"), ("m", "árbol"), ("m", "vaso"), ("m", "sombrero"),
                 ("m", "pan"), ("f", "casa"), ("f", "mesa"), ("f", "carta"), ("f", "flor"),
                 ("f", "ventana"), ("f", "manzana"), ("f", "silla")]
    adjs = [("rojo", "roja"), ("pequeño", "pequeña"), ("blanco", "blanca"), ("negro", "negra"),
            ("nuevo", "nueva"), ("viejo", "vieja"), ("grande", "grande"), ("verde", "verde"),
            ("alto", "alta"), ("bonito", "bonita")]
    art = {True: {"m": "el", "f": "la"}, False: {"m": "un", "f": "una"}}
    vt = ["ve", "busca", "tiene", "compra", "mira", "encuentra", "lleva", "pinta", "quiere", "necesita"]
    vi = ["duerme", "corre", "canta", "espera", "ríe", "nada", "salta", "camina", "baila"]
    advs = ["hoy", "otra vez", "ahora", "despacio", "en el jardín", "por la noche", "cada día", "mañana"]

class French(Romance):
    # consonant-initial nouns only, so no elision of le/la
    animate = [("m", "chat"), ("m", "chien"), ("m", "garçon"), ("m", "cheval"), ("m", "loup"),
               ("m", "voisin"), ("m", "renard"), ("m", "père"), ("f", "fille"), ("f", "femme"),
               ("f", "vache"), ("f", "souris"), ("f", "poule"), ("f", "voisine"), ("f", "mère")]
    inanimate = [("m", "livre"), ("m", "chapeau"), ("m", "bateau"), ("m", "vélo"), ("m", "panier"),
                 ("m", "gâteau"), ("f", "maison"), ("f", "table"), ("f", "lettre"), ("f", "fleur"),
                 ("f", "voiture"), ("f", "pomme"), ("f", "porte")]
    adjs = [("noir", "noire"), ("blanc", "blanche"), ("vert", "verte"), ("rouge", "rouge"),
            ("bleu", "bleue"), ("gris", "grise"), ("jaune", "jaune"), ("brun", "brune")]
    art = {True: {"m": "le", "f": "la"}, False: {"m": "un", "f": "une"}}
    vt = ["voit", "cherche", "regarde", "trouve", "aime", "prend", "porte", "achète", "veut", "dessine"]
    vi = ["dort", "court", "chante", "attend", "rit", "nage", "saute", "marche", "danse"]
    advs = ["aujourd'hui", "encore", "maintenant", "lentement", "dans le jardin", "le soir",
            "souvent", "demain"]

    @classmethod
    def objects(cls) -> list:
        return cls.animate + cls.inanimate


GRAMMARS = {"en": English, "de": German, "es": Spanish, "fr": French}


# --------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------


@dataclass
class Utt:
    id: str
    speaker: str
    language: str
    label: str
    split: str
    text: str
    phonemes: str = ""
    num_samples: int = 0
    rms: float = 0.0
    peak: float = 0.0


def espeak_version() -> str:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().split("  ")[0]


def synthesize(voice: str, rate: int, pitch: int, amp: int, text: str, tmp: Path) -> np.ndarray:
    """Run espeak-ng, return float32 mono audio at 16 kHz, trimmed to PAD seconds of silence."""
    wav = tmp / "out.wav"
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-a", str(amp), "-w", str(wav), text]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    x, sr = sf.read(wav, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    y = soxr.resample(x, sr, SR).astype(np.float32) if sr != SR else x
    thr = max(1e-3, 0.01 * float(np.abs(y).max(initial=0.0)))
    loud = np.flatnonzero(np.abs(y) > thr)
    if loud.size == 0:
        return y[:0]
    pad = int(PAD * SR)
    y = y[max(0, loud[0] - pad): loud[-1] + pad + 1]
    return np.clip(y, -1.0, 32767 / 32768)


def phonemize(voice: str, rate: int, pitch: int, amp: int, text: str) -> str:
    """The phones espeak-ng says for ``text`` with the voice and settings of the audio: its phoneme
    mnemonics (``-x``), one token per phone (``--sep=" "``), stress marks, pauses (``_:``, ``_|``) and
    word boundaries dropped (SUPERB's phoneme recognition scores phones, not stress or word boundaries)."""
    cmd = ["espeak-ng", "-q", "-x", "--sep= ", "-v", voice, "-s", str(rate), "-p", str(pitch), "-a", str(amp), text]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    phones: list[str] = []
    for token in out.split():
        token = token.lstrip("',%=")
        if token == ";" and phones:  # a modifier that --sep splits off: espeak's `i;`, `n;` are one phone
            phones[-1] += token
        elif token and not token.startswith("_"):
            phones.append(token)
    return " ".join(phones)


def build_plan(seed: int, en_per_style: int, other_per_style: int) -> list[tuple[Utt, str]]:
    """Decide speakers, labels and splits (texts come later, during synthesis)."""
    plan = []
    rng = random.Random(seed)
    for lang, groups in SPEAKERS.items():
        n = en_per_style if lang == "en" else other_per_style
        for group, variants in groups.items():
            assert (group == "test") == all(v in HELD_OUT for v in variants), (lang, group)
            for var in variants:
                spk = f"{lang}-{var}"
                for style in STYLES:
                    if group == "test":
                        splits = ["test"] * n
                    else:  # one dev utterance per (speaker, style), rest train
                        splits = ["dev"] + ["train"] * (n - 1)
                        rng.shuffle(splits)
                    for i, split in enumerate(splits, 1):
                        uid = f"{spk}-{style}-{i:04d}"
                        plan.append((Utt(uid, spk, lang, style, split, ""), f"{ESPEAK_VOICE[lang]}+{var}"))
    return plan


def make_trials(utts: list[Utt], seed: int, n_each: int) -> list[tuple[int, str, str]]:
    rng = random.Random(seed + 1)
    test_en = sorted((u for u in utts if u.split == "test" and u.language == "en"), key=lambda u: u.id)
    same, diff = [], []
    for i, a in enumerate(test_en):
        for b in test_en[i + 1:]:
            (same if a.speaker == b.speaker else diff).append((a.id, b.id))
    n = min(n_each, len(same), len(diff))
    trials = [(1, a, b) for a, b in rng.sample(same, n)] + [(0, a, b) for a, b in rng.sample(diff, n)]
    rng.shuffle(trials)
    # randomise the order inside each pair too
    return [(t, a, b) if rng.random() < 0.5 else (t, b, a) for t, a, b in trials]


def write_manifest(path: Path, root: str, utts: list[Utt], columns: tuple[str, ...] = DEMO_COLUMNS) -> None:
    lines = [f"# root: {root}", "\t".join(columns)]
    for u in utts:
        assert "\t" not in u.text and "\n" not in u.text
        cells = {"id": u.id, "path": f"{u.id}.flac", "num_samples": str(u.num_samples), "sample_rate": str(SR),
                 "speaker": u.speaker, "text": u.text, "label": u.label, "language": u.language, "split": u.split,
                 "phonemes": u.phonemes}
        lines.append("\t".join(cells[c] for c in columns))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_both(name: str, folder: str, utts: list[Utt], columns: tuple[str, ...]) -> None:
    """<name>.tsv here (root: the folder beside it) and in manifests/ (root: ../fusionpipe/corpus/<folder>)."""
    write_manifest(CORPUS / f"{name}.tsv", folder, utts, columns)
    write_manifest(MANIFESTS / f"{name}.tsv", f"../fusionpipe/corpus/{folder}", utts, columns)


# --------------------------------------------------------------------------------------
# Keyword clips and mixtures (each with its own seeded RNG: the demo utterances' draws,
# and so their audio, are the same with or without them)
# --------------------------------------------------------------------------------------


def keyword_speakers() -> dict[str, list[str]]:
    """split -> the English voices saying keywords in it, as the demo corpus splits its speakers: the
    test-only voices in test, the others in train and dev."""
    groups = SPEAKERS["en"]
    return {"train": groups["trainable"], "dev": groups["trainable"], "test": groups["test"]}


def make_keywords(seed: int, tmp: Path) -> list[Utt]:
    """Every English voice says every word, KEYWORD_TAKES[split] times per split, in distinct speaking
    styles; each take is placed at a random offset in a 1 s clip (Speech Commands' clip length).
    `_silence_` clips, as many per split as one keyword has, are 1 s of low noise (SUPERB cuts them from
    the corpus's background-noise recordings)."""
    rng = random.Random(seed + 2)
    KEYWORD_AUDIO.mkdir(parents=True, exist_ok=True)
    for old in KEYWORD_AUDIO.glob("*.flac"):
        old.unlink()
    utts = []
    for split, voices in keyword_speakers().items():
        for var in voices:
            for word in KEYWORDS + OTHER_WORDS:
                styles = rng.sample(sorted(STYLES), KEYWORD_TAKES[split])
                for style in styles:
                    rate, pitch, amp = (rng.randint(*STYLES[style][k]) for k in ("rate", "pitch", "amp"))
                    speech = synthesize(f"{ESPEAK_VOICE['en']}+{var}", rate, pitch, amp, word, tmp)
                    if not 0 < len(speech) <= SR:
                        raise RuntimeError(f"{word!r} by en-{var} ({style}) is {len(speech) / SR:.2f} s, not within 1 s")
                    clip = np.zeros(SR, dtype=np.float32)
                    start = rng.randint(0, SR - len(speech))
                    clip[start:start + len(speech)] = speech
                    label = word if word in KEYWORDS else UNKNOWN
                    uid = f"kw-en-{var}-{word}-{split}-{style}"
                    utts.append(_clip(uid, clip, f"en-{var}", word.upper(), label, split))
        per_keyword = len(voices) * KEYWORD_TAKES[split]
        for i in range(1, per_keyword + 1):
            utts.append(_clip(f"kw-silence-{split}-{i:03d}", noise(rng), "", "", SILENCE, split))
    return utts


def noise(rng: random.Random) -> np.ndarray:
    """1 s of white or brown noise at a low level: the `_silence_` class."""
    gen = np.random.default_rng(rng.getrandbits(32))
    x = gen.standard_normal(SR)
    if rng.random() < 0.5:  # brown: integrated white noise, its drift removed
        x = np.cumsum(x)
        x -= np.convolve(x, np.ones(401) / 401, mode="same")
    x *= 10 ** (rng.uniform(*NOISE_DBFS) / 20) / np.sqrt(np.mean(x ** 2))
    return x.astype(np.float32)


def _clip(uid: str, clip: np.ndarray, speaker: str, text: str, label: str, split: str) -> Utt:
    sf.write(KEYWORD_AUDIO / f"{uid}.flac", clip, SR, subtype="PCM_16", format="FLAC", compression_level=1.0)
    return Utt(uid, speaker, "en", label, split, text, num_samples=len(clip))


def make_mixtures(seed: int) -> dict[str, int]:
    """mix-{split}.tsv / .rttm: MIXTURES[split] two-speaker mixtures of that split's demo utterances, made by
    the package's simulator (`fusionpipe manifest mix`); returns split -> seconds of audio."""
    from fusionpipe.corpora.mix import mix_manifest
    from fusionpipe.manifest import read_manifest, write_manifest as write_rows
    from fusionpipe.rttm import parse_turns, write_rttm

    MIX_AUDIO.mkdir(parents=True, exist_ok=True)
    for old in MIX_AUDIO.glob("*.flac"):
        old.unlink()
    seconds = {}
    for k, split in enumerate(SPLITS):
        demo = read_manifest(CORPUS / f"demo-{split}.tsv")
        m = mix_manifest(demo, MIXTURES[split], MIX_OVERLAP, seed + 10 + k, MIX_AUDIO, f"mix-{split}")
        write_rows(m, CORPUS / f"mix-{split}.tsv", root="mix")
        write_rows(m, MANIFESTS / f"mix-{split}.tsv", root="../fusionpipe/corpus/mix")
        turns = {u.id: parse_turns(u.turns) for u in m}
        write_rttm(CORPUS / f"mix-{split}.rttm", turns)
        write_rttm(MANIFESTS / f"mix-{split}.rttm", turns)
        seconds[split] = m.duration
    return seconds


def write_readme(utts: list[Utt], keywords: list[Utt], mix_seconds: dict[str, float], trials, seed: int,
                 args: argparse.Namespace, version: str) -> None:
    def table(key, utts=utts) -> str:
        rows = sorted({key(u) for u in utts})
        out = ["| " + " | ".join(["", *SPLITS, "total"]) + " |", "|" + "---|" * (len(SPLITS) + 2)]
        for r in rows:
            c = Counter(u.split for u in utts if key(u) == r)
            out.append(f"| {r} | " + " | ".join(str(c[s]) for s in SPLITS) + f" | {sum(c.values())} |")
        c = Counter(u.split for u in utts)
        out.append("| **total** | " + " | ".join(str(c[s]) for s in SPLITS) + f" | {len(utts)} |")
        return "\n".join(out)

    secs = defaultdict(float)
    for u in utts:
        secs[u.split] += u.num_samples / SR
    total_s = sum(secs.values())
    size = sum((AUDIO / f"{u.id}.flac").stat().st_size for u in utts)
    keyword_size = sum(p.stat().st_size for p in KEYWORD_AUDIO.glob("*.flac"))
    mix_size = sum(p.stat().st_size for p in MIX_AUDIO.glob("*.flac"))
    durs = np.array([u.num_samples / SR for u in utts])
    style_rows = "\n".join(
        f"| {s} | {p['rate'][0]}-{p['rate'][1]} | {p['pitch'][0]}-{p['pitch'][1]} | {p['amp'][0]}-{p['amp'][1]} |"
        for s, p in STYLES.items())
    spk_lines = "\n".join(
        f"  - **{lang}** (espeak-ng voice `{ESPEAK_VOICE[lang]}`): train/dev speakers "
        + ", ".join(f"`{lang}-{v}`" for v in g["trainable"]) + "; test-only speakers "
        + ", ".join(f"`{lang}-{v}`" for v in g["test"])
        for lang, g in SPEAKERS.items())
    n_same = sum(1 for t in trials if t[0] == 1)
    cmd = "python tools/make_corpus.py"
    defaults = {"seed": 1234, "en_per_style": 6, "other_per_style": 3, "trials_per_class": 150}
    for k, v in defaults.items():
        if getattr(args, k) != v:
            cmd += f" --{k.replace('_', '-')} {getattr(args, k)}"
    text = f"""# fusionpipe demo corpus (synthetic)

A tiny **synthetic** speech corpus bundled with the package so that every stage
(feature caching, fusion training, ASR / speaker verification / emotion-like
classification / multilingual ASR and language id) can be smoke-tested without
downloading anything.  Generated by `tools/make_corpus.py` (seed {seed}) with
{version}.

**Caveat:** this is espeak-ng formant synthesis, not human speech.  Results on it
(WER, EER, accuracy) say nothing about real-world performance; it is meant only
for smoke tests, demos and CI.  The "emotion" labels are speaking styles made by
changing rate, pitch and loudness, not acted emotions.

## Contents

- `audio/<utt_id>.flac`: {len(utts)} utterances, 16 kHz, mono, 16-bit FLAC,
  {durs.min():.2f}-{durs.max():.2f} s each (mean {durs.mean():.2f} s),
  {total_s:.1f} s in total ({total_s / 60:.1f} min), {size / 1e6:.2f} MB.
  Utterance ids are `<language>-<variant>-<label>-<NNNN>`, e.g. `en-m1-neutral-0001`.
- `demo-train.tsv`, `demo-dev.tsv`, `demo-test.tsv`: manifests (`# root: audio`);
  the same rows are in `manifests/demo-*.tsv` of the repository with root
  `../fusionpipe/corpus/audio`.  Columns: `{" ".join(DEMO_COLUMNS)}`.
  `phonemes` is what espeak-ng said, as it says it (`espeak-ng -q -x --sep=" "` with the
  utterance's voice, rate, pitch and amplitude): its phoneme mnemonics, one token per phone,
  separated by single spaces, stress marks, pauses and word boundaries dropped (phoneme recognition).
- `keywords/<id>.flac` and `keywords-{{train,dev,test}}.tsv` (root `keywords`; copies in
  `manifests/`): {len(keywords)} 1 s clips for keyword spotting as SUPERB defines it on Speech
  Commands v1.0: `label` is one of 12 classes, the ten words {", ".join(KEYWORDS)}, `_unknown_`
  for the other words ({", ".join(OTHER_WORDS)}) and `_silence_` (1 s of white or brown noise at
  {NOISE_DBFS[0]:.0f} to {NOISE_DBFS[1]:.0f} dBFS). Every English voice says every word, in
  speaking styles drawn per take, at a random offset in the clip; the test split's voices are the
  demo corpus's test-only ones. {keyword_size / 1e6:.2f} MB.
- `mix/<id>.flac`, `mix-{{train,dev,test}}.tsv` (root `mix`; copies in `manifests/`) and
  `mix-{{train,dev,test}}.rttm`: two-speaker mixtures for diarization, made with
  `fusionpipe manifest mix` from each split's demo utterances (so a split's mixtures hold only its
  speakers), overlap ratio {MIX_OVERLAP} (overlapped time / mixture time), sources trimmed to their
  speech and levelled at -33 to -25 dBFS. The `turns` column and the RTTM say who speaks when.
  """ + ", ".join(f"{s} {MIXTURES[s]} ({mix_seconds[s]:.1f} s)" for s in SPLITS) + f"""; {mix_size / 1e6:.2f} MB.
- `trials.txt`: {len(trials)} speaker-verification trials in VoxCeleb format
  (`<1 same speaker|0 different> <utt_id_a> <utt_id_b>`), {n_same} target and
  {len(trials) - n_same} non-target, over the English test-only speakers.

Seconds of audio per split: """ + ", ".join(f"{s} {secs[s]:.1f} s" for s in SPLITS) + f""".

### Utterances per language

{table(lambda u: u.language)}

### Utterances per label (speaking style)

{table(lambda u: u.label)}

### Keyword clips per class

{table(lambda u: u.label, keywords)}

### Utterances per speaker

{table(lambda u: u.speaker)}

## How it was made

- **Text**: sentences drawn from a tiny per-language grammar (determiner,
  optional adjective, noun, verb, object, optional adverbial; a possessive or a
  negation now and then in English) with a seeded RNG.  Every utterance has its
  own sentence, so no sentence text occurs in two splits.  English text is
  upper case `A-Z`, apostrophe and space (LibriSpeech style); German, Spanish
  and French text is lower case and keeps its accents (ä ö ü ß é è à ç ñ í ...).
- **Speakers**: espeak-ng voice variants (`+m1`, `+f2`, ...) on each language's
  voice.  Variants {", ".join(sorted(HELD_OUT))} are used only by test speakers,
  so the test split's speakers (and their voices) never occur in train or dev.
  The same variant on two languages (e.g. `en-m1`, `de-m1`) is counted as two
  speakers, but sounds alike.
{spk_lines}
- **Labels** (speaking styles), espeak-ng `-s` rate (wpm), `-p` pitch, `-a`
  amplitude, drawn uniformly per utterance from these ranges:

  | label | rate | pitch | amplitude |
  |---|---|---|---|
{chr(10).join("  " + r for r in style_rows.splitlines())}

- **Audio**: espeak-ng WAV (22.05 kHz) resampled to 16 kHz with soxr, leading
  and trailing silence trimmed to {PAD:.1f} s, utterances outside
  {MIN_DUR:.0f}-{MAX_DUR:.0f} s redrawn with a new sentence, saved as PCM_16 FLAC.
- **Splits**: test = test-only speakers (all their utterances); for the other
  speakers one utterance per (speaker, label) goes to dev, the rest to train.

Regenerate (needs `espeak-ng` on PATH; the output is identical for the same
espeak-ng version):

```
{cmd}    # from the repository root
```

It rewrites `audio/`, `keywords/`, `mix/`, `trials.txt`, the manifests (and RTTM files) here and in
`manifests/`, and this README. The keyword clips and the mixtures have random number generators of their
own, so the demo utterances are the same with them or without them.

## License

The audio is espeak-ng's synthesis of sentences generated for this project by
`tools/make_corpus.py`; no recorded speech or third-party text is included.
espeak-ng's GPL-3.0 license covers the program, not the speech it produces from
our text, so the corpus is distributed under the package's BSD-3-Clause license.
"""
    (CORPUS / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--en-per-style", type=int, default=6, help="utterances per English speaker and label")
    ap.add_argument("--other-per-style", type=int, default=3, help="the same for de/es/fr")
    ap.add_argument("--trials-per-class", type=int, default=150)
    args = ap.parse_args(argv)

    if shutil.which("espeak-ng") is None:
        print("espeak-ng not found: apt-get install espeak-ng", file=sys.stderr)
        return 1
    version = espeak_version()
    t0 = time.time()
    plan = build_plan(args.seed, args.en_per_style, args.other_per_style)
    AUDIO.mkdir(parents=True, exist_ok=True)
    for old in AUDIO.glob("*.flac"):
        old.unlink()
    MANIFESTS.mkdir(exist_ok=True)

    rng = random.Random(args.seed)
    used: set[str] = set()
    utts: list[Utt] = []
    redrawn = 0
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for k, (u, voice) in enumerate(plan):
            ranges = STYLES[u.label]
            for attempt in range(100):
                while True:
                    text = " ".join(GRAMMARS[u.language].sentence(rng))
                    if (u.language, text) not in used:
                        break
                rate, pitch, amp = (rng.randint(*ranges[key]) for key in ("rate", "pitch", "amp"))
                y = synthesize(voice, rate, pitch, amp, text.lower(), tmp)
                dur = len(y) / SR
                if MIN_DUR <= dur <= MAX_DUR:
                    break
                redrawn += 1
            else:
                raise RuntimeError(f"could not synthesise {u.id} within {MIN_DUR}-{MAX_DUR} s")
            used.add((u.language, text))
            u.text = text
            u.phonemes = phonemize(voice, rate, pitch, amp, text.lower())
            u.rms = float(np.sqrt(np.mean(y.astype(np.float64) ** 2)))
            u.peak = float(np.abs(y).max())
            if u.rms < MIN_RMS:
                raise RuntimeError(f"{u.id} is (nearly) silent: rms={u.rms:.4g} ({voice}, {text!r})")
            out = AUDIO / f"{u.id}.flac"
            sf.write(out, y, SR, subtype="PCM_16", format="FLAC", compression_level=1.0)
            info = sf.info(out)
            assert info.samplerate == SR and info.channels == 1
            u.num_samples = int(info.frames)
            utts.append(u)
            if (k + 1) % 100 == 0:
                print(f"  {k + 1}/{len(plan)} utterances, {time.time() - t0:.0f} s", flush=True)

        keywords = make_keywords(args.seed, tmp)

    for split in SPLITS:
        write_both(f"demo-{split}", "audio", [u for u in utts if u.split == split], DEMO_COLUMNS)
        write_both(f"keywords-{split}", "keywords", [u for u in keywords if u.split == split], COLUMNS)
    mix_seconds = make_mixtures(args.seed)
    trials = make_trials(utts, args.seed, args.trials_per_class)
    (CORPUS / "trials.txt").write_text("".join(f"{t} {a} {b}\n" for t, a, b in trials), encoding="ascii")
    write_readme(utts, keywords, mix_seconds, trials, args.seed, args, version)

    size = sum(p.stat().st_size for p in AUDIO.glob("*.flac"))
    secs = sum(u.num_samples for u in utts) / SR
    c = Counter(u.split for u in utts)
    print(f"{len(utts)} utterances ({', '.join(f'{s} {c[s]}' for s in SPLITS)}), "
          f"{len({u.speaker for u in utts})} speakers, {secs:.1f} s, {size / 1e6:.2f} MB FLAC, "
          f"{len(trials)} trials, {redrawn} redrawn, {time.time() - t0:.1f} s")
    print(f"min rms {min(u.rms for u in utts):.4f}, max peak {max(u.peak for u in utts):.3f}")
    print(f"{len(keywords)} keyword clips, mixtures: " + ", ".join(f"{s} {mix_seconds[s]:.1f} s" for s in SPLITS)
          + f"; corpus {sum(p.stat().st_size for p in CORPUS.rglob('*') if p.is_file()) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
