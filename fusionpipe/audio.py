"""Load and validate audio: every upstream gets float32 mono 16 kHz, or a clear error.

Two levels of checking, so bad rows are found before hours of GPU time are spent:
`check_header` reads only the file header (cheap; run on the whole manifest up front),
`load` reads the samples (finds corrupt data and NaNs while extracting).
"""

from __future__ import annotations

import warnings

import numpy as np
import soundfile as sf
import soxr

from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance

SAMPLE_RATE = 16000
SPEECH_FLOOR_DB = -40.0  # a 10 ms frame this far below the loudest of its recording is silence (`loud_frames`)


class BadAudio(FusionpipeError):
    """An utterance that cannot be used; `--skip-bad` records it and goes on."""


def target_num_samples(utt: Utterance, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples after resampling to `sample_rate`: fixed by the manifest, so frame counts are known up front."""
    if utt.sample_rate == sample_rate:
        return utt.num_samples
    return int(round(utt.num_samples * sample_rate / utt.sample_rate))


def check_header(manifest: Manifest, row: int) -> None:
    """Raise BadAudio if the file of `row` is missing, unreadable or disagrees with the manifest."""
    utt = manifest[row]
    path = manifest.audio_path(utt)
    where = manifest.where(row)
    if not path.is_file():
        raise BadAudio(f"{where}: audio file {path} does not exist (is the manifest root right?)")
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError by format
        raise BadAudio(f"{where}: cannot read {path} as audio ({e})") from None
    if info.samplerate != utt.sample_rate or info.frames != utt.num_samples:
        raise BadAudio(
            f"{where}: {path} has {info.frames} samples at {info.samplerate} Hz, the manifest says "
            f"{utt.num_samples} at {utt.sample_rate} Hz; regenerate the manifest"
        )
    if info.frames == 0:
        raise BadAudio(f"{where}: {path} is empty")


def load(manifest: Manifest, row: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Samples of `row` as float32 mono at `sample_rate`, exactly `target_num_samples` long.

    Multi-channel audio is down-mixed (mean of channels) with a warning: the upstreams are
    all mono models and a mix is what a listener would hear.
    """
    utt = manifest[row]
    path = manifest.audio_path(utt)
    where = manifest.where(row)
    try:
        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise BadAudio(f"{where}: cannot decode {path} ({e}); re-encode or remove the row") from None
    if sr != utt.sample_rate or len(wave) != utt.num_samples:
        raise BadAudio(
            f"{where}: {path} decodes to {len(wave)} samples at {sr} Hz, the manifest says "
            f"{utt.num_samples} at {utt.sample_rate} Hz; regenerate the manifest"
        )
    if wave.shape[1] > 1:
        warnings.warn(f"{where}: {wave.shape[1]} channels, down-mixed to mono", stacklevel=2)
    wave = wave.mean(axis=1, dtype=np.float32)
    if not np.isfinite(wave).all():
        raise BadAudio(f"{where}: {path} contains NaN or infinite samples")
    if sr != sample_rate:
        wave = soxr.resample(wave, sr, sample_rate, quality="HQ").astype(np.float32)
        n = target_num_samples(utt, sample_rate)
        wave = np.pad(wave[:n], (0, max(0, n - len(wave))))
    return np.ascontiguousarray(wave)


def loud_frames(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """Where one clean source speaks: (frames,) booleans over its 10 ms frames, true within SPEECH_FLOOR_DB of
    the loudest (and above -100 dBFS RMS, so digital silence is never speech), and the frame hop in samples.
    The mixture simulator trims its sources by it, the LibriMix importer makes their turns of it."""
    hop = max(1, round(sample_rate / 100))
    n = len(wave) // hop
    if n == 0:
        return np.zeros(0, bool), hop
    rms = np.sqrt(np.mean(np.asarray(wave[:n * hop], np.float64).reshape(n, hop) ** 2, axis=1))
    return rms > max(rms.max() * 10 ** (SPEECH_FLOOR_DB / 20), 1e-5), hop
