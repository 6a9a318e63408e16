"""Shared fixtures: a private FUSIONPIPE_HOME for the toy models, small synthetic speech corpora, synthetic
stores, and the builders the test modules share. A builder is a fixture that returns the function it defines
(defined once, there), so that no test module imports another and the suite runs under any --import-mode."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.overrides import TorchFunctionMode

from fusionpipe.extract.stage import extract
from fusionpipe.manifest import Manifest, Utterance, read_manifest, write_manifest
from fusionpipe.store import FeatureStore, Layout
from fusionpipe.train.loop import TrainConfig


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


@pytest.fixture(scope="session")
def make_manifest():
    """`make_manifest(root, name, durations, seed=0)`: WAV files of the given durations under root/audio,
    and root/<name>.tsv read back."""
    def make_manifest(root, name, durations, seed=0) -> Manifest:
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
    return make_manifest


@pytest.fixture
def speech_manifest(tmp_path, make_manifest):
    """Five utterances of different lengths (0.5 to 2.7 s), odd sample counts included."""
    return make_manifest(tmp_path / "corpus", "speech", [1.31, 0.5, 2.7, 1.05, 0.77])


@pytest.fixture
def long_manifest(tmp_path, make_manifest):
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


# ---- synthetic stores: stage 1's output without running an upstream ------------------------------
@pytest.fixture(scope="session")
def make_tsv():
    """`make_tsv(path, ids)`: a manifest TSV naming `ids` (no audio: stage 2 never opens it), in that order."""
    def make_tsv(path, ids) -> Manifest:
        rows = [Utterance(u, f"{u}.wav", 16000, 16000, text=f"T {u}", label=f"c{i % 2}") for i, u in enumerate(ids)]
        m = Manifest(path.stem, path.parent, rows, source=path)
        write_manifest(m, path)
        return m
    return make_tsv


@pytest.fixture(scope="session")
def make_store():
    """`make_store(url, data, manifest, name="up", dtype="float32", chunk_frames=5, frame_rate=50.0,
    written=None)`: a stage-1 store of `data` (id -> (T, L, D)), longest first like extract() lays it out.
    `written`: chunk numbers to write (default all): the others stay missing, as after a crash."""
    def make_store(url, data: dict, manifest: Manifest, name="up", dtype="float32", chunk_frames=5,
                   frame_rate=50.0, written=None):
        ids = sorted(data, key=lambda u: (-len(data[u]), u))
        L, D = next(iter(data.values())).shape[1:]
        attrs = {"manifest": {"name": manifest.name, "sha256": manifest.content_hash(), "utterances": len(manifest),
                              "path": str(manifest.source) if manifest.source else None},
                 "upstream": {"name": name, "num_layers": L, "hidden_size": D, "frame_rate": frame_rate}}
        store = FeatureStore.create(url, Layout(ids, np.array([len(data[u]) for u in ids])), num_layers=L,
                                    hidden_size=D, dtype=dtype, chunk_frames=chunk_frames, attrs=attrs)
        frames = np.concatenate([data[u] for u in ids]).astype(dtype)
        for c in range(store.num_chunks) if written is None else written:
            store.write_chunk(c, frames[c * chunk_frames:(c + 1) * chunk_frames])
        return store
    return make_store


@pytest.fixture(scope="session")
def random_data():
    """`random_data(ids, frames, L, D, seed)`: id -> standard normal (T, L, D) float32 frames."""
    def random_data(ids, frames, L, D, seed):
        rng = np.random.default_rng(seed)
        return {u: rng.standard_normal((t, L, D)).astype(np.float32) for u, t in zip(ids, frames)}
    return random_data


# ---- stage 3 runs on the pitch stores ---------------------------------------------------------------
TINY_HEAD = {"proj": 16}


@pytest.fixture(scope="session")
def train_config():
    """`train_config(stores, out, **kw)`: a small classify run on {"train": [...], "dev": [...]} stores
    (e.g. pitch_stores) into `out`, 30 steps on the CPU; `kw` overrides any TrainConfig field."""
    def train_config(stores, out, **kw) -> TrainConfig:
        base = dict(stores=stores["train"], dev_stores=stores["dev"], task="classify", fusion=["hconv"],
                    merge=["concat"], out=str(out), steps=30, eval_every=10, lr=3e-3, max_frames=600,
                    head_options=TINY_HEAD, device="cpu")
        return TrainConfig(**{**base, **kw})
    return train_config


@pytest.fixture(scope="session")
def logged_losses():
    """`logged_losses(run, variant)`: the training losses a run's variant logged, step by step."""
    def logged_losses(run, variant) -> list[float]:
        with open(run / variant / "log.csv") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]
    return logged_losses


# ---- stage 1 in a subprocess, killed half way ------------------------------------------------------
def _this_checkout() -> dict:
    """The environment of a fresh process that imports this checkout's fusionpipe."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture
def extract_cmd():
    """`extract_cmd(manifest, cache, *extra_flags)`: the command line of `fusionpipe extract` of toy-wavlm in a
    fresh process (same torch threads, same float sums)."""
    def extract_cmd(manifest, cache, *extra) -> list[str]:
        return [sys.executable, "-m", "fusionpipe", "extract", "--model", "toy-wavlm", "--manifest",
                str(manifest.source), "--cache", str(cache), "--max-seconds", "3", "--chunk-frames", "16",
                "--device", "cpu", *extra]
    return extract_cmd


@pytest.fixture
def run_extract():
    """`run_extract(cmd)`: run an extraction command to its end, in a fresh process."""
    def run_extract(cmd: list[str]) -> None:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_this_checkout())
    return run_extract


@pytest.fixture
def start_extract_midway():
    """`start_extract_midway(cmd, chunk_dir, stderr=...)`: start `cmd` and return it, still running, once 3
    chunks are on disk."""
    def start_extract_midway(cmd: list[str], chunk_dir: Path, stderr=subprocess.DEVNULL) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=_this_checkout(), text=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if chunk_dir.is_dir() and len(os.listdir(chunk_dir)) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "extraction finished before it could be killed: make the manifest longer"
        return proc
    return start_extract_midway


@pytest.fixture
def kill_extract_midway(start_extract_midway):
    """`kill_extract_midway(cmd, chunk_dir)`: start an extraction and SIGKILL it once 3 chunks are on disk (a
    real kill -9, mid-extraction)."""
    def kill_extract_midway(cmd: list[str], chunk_dir: Path) -> None:
        proc = start_extract_midway(cmd, chunk_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return kill_extract_midway


@pytest.fixture(scope="session")
def with_nan_row():
    """`with_nan_row(manifest, out_dir, samples)`: `manifest` plus a row "nan" whose header is fine and whose
    samples hold a NaN: found while reading, not by the plan's header checks. Written as `out_dir`/withnan.tsv."""
    def with_nan_row(manifest: Manifest, out: Path, samples: int) -> Manifest:
        x = np.zeros(samples, np.float32)
        x[100] = np.nan
        sf.write(manifest.root / "nan.wav", x, 16000, subtype="FLOAT")
        m = Manifest("withnan", manifest.root, [*manifest.utterances, Utterance("nan", "nan.wav", samples, 16000)])
        write_manifest(m, out / "withnan.tsv")
        return read_manifest(out / "withnan.tsv")
    return with_nan_row


# ---- a GPU where there is none: the seam of fusionpipe/cuda.py, and a counter of host syncs ----------------
class FakeCuda:
    """Stands in for fusionpipe.cuda with `gpus` GPUs: one random state per GPU (16 bytes, as torch's), the
    host registrations it was asked for (`registered`: (size, device, flags)), and `fail` to make them fail."""

    def __init__(self, gpus: int, fail: str | None = None):
        self.gpus, self.fail = gpus, fail
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(gpus)}
        self.registered, self.unregistered, self.synced = [], [], []

    def _index(self, device) -> int:
        d = torch.device(device)
        assert d.type == "cuda", f"a CUDA call for {d}"
        index = 0 if d.index is None else d.index
        if index >= self.gpus:  # as torch: no generator, no context for a GPU that is not there
            raise IndexError(f"cuda:{index} with {self.gpus} GPU(s)")
        return index

    def available(self) -> bool:
        return self.gpus > 0

    def device_count(self) -> int:
        return self.gpus

    def get_rng_state(self, device) -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state, device) -> None:
        self.states[self._index(device)] = state.clone()

    def draw(self, device) -> None:
        """What a dropout mask on that GPU does to its generator: moves it on."""
        self.states[self._index(device)] += 1

    def register_host(self, ptr, size, device):
        self._index(device)
        self.registered.append((ptr, size, torch.device(device)))
        return self.fail

    def unregister_host(self, ptr, device):
        self.unregistered.append((ptr, torch.device(device)))
        return None

    def synchronize(self, device) -> None:
        self.synced.append(torch.device(device))

    def empty_cache(self) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """`fake_cuda(gpus, fail=None)`: fusionpipe.cuda's GPU calls answered by a `FakeCuda` for this test."""
    from fusionpipe import cuda

    def install(gpus: int, fail: str | None = None) -> FakeCuda:
        fake = FakeCuda(gpus, fail)
        for name in ("available", "device_count", "get_rng_state", "set_rng_state", "register_host",
                     "unregister_host", "synchronize", "empty_cache"):
            monkeypatch.setattr(cuda, name, getattr(fake, name))
        return fake
    return install


class HostSyncs(TorchFunctionMode):
    """Records every call that makes a GPU's host wait for the device, for code run on the `meta` device (every
    tensor not on the CPU counts as the accelerator's): reading a value back (item, tolist, int(), float(),
    bool(), .cpu(), .numpy(), .to(cpu)) and copying up with a wait (.to(device) or copy_ without non_blocking,
    torch.tensor(..., device=)). A read-back on `meta` also raises, which a test sees as well."""

    READ = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    @staticmethod
    def _on_device(x) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type != "cpu"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READ and args and self._on_device(args[0]):
            self.calls.append(f"{name} of a device tensor")
        elif name == "copy_":  # dst.copy_(src, non_blocking=False)
            blocking = not kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            self._copy(name, args[1].device, args[0].device, blocking)
        elif name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device") or next((a.device if isinstance(a, torch.Tensor) else a for a in args[1:]
                                                  if isinstance(a, (torch.device, str, torch.Tensor))),
                                                 "cuda" if name == "cuda" else None)
            if target is not None:
                self._copy(name, args[0].device, torch.device(target), not kwargs.get("non_blocking", False))
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type != "cpu":
            self.calls.append(f"torch.{name}(..., device={kwargs['device']}) with a wait")
        return func(*args, **kwargs)


    def _copy(self, name: str, src: torch.device, dst: torch.device, blocking: bool) -> None:
        if blocking and src.type == "cpu" and dst.type != "cpu":
            self.calls.append(f"{name} up to {dst} with a wait")
        elif src.type != "cpu" and dst.type == "cpu":
            self.calls.append(f"{name} back to the host")


@pytest.fixture
def host_syncs():
    """A `HostSyncs` recorder to run code under: `with host_syncs() as syncs: ...; assert syncs.calls == []`."""
    return HostSyncs
