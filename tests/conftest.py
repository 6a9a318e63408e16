"""Shared fixtures: a private FUSIONPIPE_HOME for the toy models, and small synthetic speech corpora."""

import numpy as np
import pytest
import soundfile as sf

from fusionpipe.extract.run import extract
from fusionpipe.manifest import Manifest, Utterance, read_manifest, write_manifest


@pytest.fixture(scope="session", autouse=True)
def fusionpipe_home(tmp_path_factory):
    """Toy upstreams are built once per test session, never into the user's ~/.cache."""
    home = tmp_path_factory.mktemp("fusionpipe_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSIONPIPE_HOME", str(home))
    yield home
    mp.undo()


def _speechlike(n: int, seed: int) -> np.ndarray:
    """Voiced-sounding noise: a few harmonics with a wobbling pitch plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    f0 = 110 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) + 0.05 * rng.standard_normal(n)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def make_manifest(root, name, durations, seed=0) -> Manifest:
    """WAV files of the given durations under root/audio, and root/<name>.tsv read back."""
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, d in enumerate(durations):
        n = int(d * 16000)
        sf.write(audio / f"{name}-{i:03d}.wav", _speechlike(n, seed + i), 16000)
        rows.append(Utterance(f"{name}-{i:03d}", f"{name}-{i:03d}.wav", n, 16000, speaker=f"s{i % 3}",
                              text="A B", label=f"c{i % 2}"))
    write_manifest(Manifest(name, audio, rows), root / f"{name}.tsv", root="audio")
    return read_manifest(root / f"{name}.tsv")


@pytest.fixture
def speech_manifest(tmp_path):
    """Five utterances of different lengths (0.5 to 2.7 s), odd sample counts included."""
    return make_manifest(tmp_path / "corpus", "speech", [1.31, 0.5, 2.7, 1.05, 0.77])


@pytest.fixture
def long_manifest(tmp_path):
    """Enough audio that an extraction can be killed half way."""
    return make_manifest(tmp_path / "corpus", "long", [3.0] * 40)


def _tone(f0: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t + seed))
    phase = 2 * np.pi * np.cumsum(f) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 4)) + 0.05 * rng.standard_normal(n)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="session")
def pitch_stores(tmp_path_factory):
    """A learnable task: label 'low' (110 Hz voice) or 'high' (330 Hz), train and dev splits cached for
    toy-wavlm and toy-whisper."""
    root = tmp_path_factory.mktemp("pitch")
    stores = {}
    for split, n, seed in (("train", 24, 0), ("dev", 12, 1000)):
        rows = []
        for i in range(n):
            label = ("low", "high")[i % 2]
            samples = int(16000 * (0.6 + 0.1 * (i % 5)))
            name = f"{split}-{i:02d}"
            sf.write(root / f"{name}.wav", _tone(110 if label == "low" else 330, samples, seed + i), 16000)
            rows.append(Utterance(name, f"{name}.wav", samples, 16000, label=label, text="LOW" if label == "low" else "HIGH"))
        write_manifest(Manifest(f"pitch-{split}", root, rows), root / f"pitch-{split}.tsv", root=".")
        m = read_manifest(root / f"pitch-{split}.tsv")
        stores[split] = [extract(m, model, root / "cache", device="cpu", progress=False).url
                         for model in ("toy-wavlm", "toy-whisper")]
    return stores
