"""STAGE 1: the frozen upstreams, waveforms in, every hidden layer out as (T, L, D) per utterance.

    >>> up = load_upstream("toy-wavlm", device="cpu")
    >>> [h.shape for h in up.forward([np.zeros(16000, np.float32)])]
    [torch.Size([49, 4, 32])]

Models load through plain transformers ``from_pretrained`` (registry alias, HF id or a local directory);
``forward`` only adds what caching needs: batches whose results do not depend on the other utterances in
the batch, Whisper's 30 s windows, and all hidden states stacked frames-major.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (AutoConfig, AutoFeatureExtractor, AutoModel, Data2VecAudioConfig, HubertConfig,
                          Wav2Vec2Config, Wav2Vec2FeatureExtractor, WavLMConfig, WhisperConfig,
                          WhisperFeatureExtractor)
from transformers.utils.hub import cached_file, extract_commit_hash

from fusionpipe import __version__
from fusionpipe.device import resolve_device
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.hf_batching import MaskedGroupNorm, PerUtterancePosConv, swapped

SAMPLE_RATE = 16000
_FAMILIES = {"hubert": "ssl", "wavlm": "ssl", "data2vec-audio": "ssl", "wav2vec2": "ssl", "whisper": "whisper"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class UpstreamSpec:
    """One registry row: what `fusionpipe models` prints. num_layers counts hidden states (blocks + 1)."""

    alias: str
    hf_id: str
    num_layers: int
    hidden_size: int
    frame_rate: float
    family: str


# kind: (transformer blocks, hidden size) of the tiny random models; L = blocks + 1 differs between toys
_TINY = {"wavlm": (3, 32), "hubert": (2, 48), "whisper": (2, 40), "data2vec": (4, 24), "wav2vec2": (1, 16)}
_TOYS = ("wavlm", "hubert", "whisper", "data2vec")


def _row(alias: str, hf_id: str, num_layers: int, hidden_size: int, family: str = "ssl") -> UpstreamSpec:
    return UpstreamSpec(alias, hf_id, num_layers, hidden_size, 50.0, family)


UPSTREAMS: dict[str, UpstreamSpec] = {s.alias: s for s in [
    _row("hubert-base", "facebook/hubert-base-ls960", 13, 768),
    _row("hubert-large", "facebook/hubert-large-ll60k", 25, 1024),
    _row("wavlm-base-plus", "microsoft/wavlm-base-plus", 13, 768),
    _row("wavlm-large", "microsoft/wavlm-large", 25, 1024),
    _row("data2vec-base", "facebook/data2vec-audio-base", 13, 768),
    _row("data2vec-large", "facebook/data2vec-audio-large", 25, 1024),
    _row("wav2vec2-base", "facebook/wav2vec2-base", 13, 768),
    _row("whisper-base", "openai/whisper-base", 7, 512, "whisper"),
    _row("whisper-small", "openai/whisper-small", 13, 768, "whisper"),
    _row("whisper-small.en", "openai/whisper-small.en", 13, 768, "whisper"),
    _row("whisper-medium", "openai/whisper-medium", 25, 1024, "whisper"),
    _row("whisper-large-v3", "openai/whisper-large-v3", 33, 1280, "whisper"),
    *(_row(f"toy-{k}", f"toy:{k}", _TINY[k][0] + 1, _TINY[k][1], "whisper" if k == "whisper" else "ssl")
      for k in _TOYS),
]}


def list_upstreams() -> list[UpstreamSpec]:
    return list(UPSTREAMS.values())


def upstream_spec(name: str) -> UpstreamSpec | None:
    """L, D and frame rate of `name` without loading weights: its registry row, or read from a local
    save_pretrained directory's config; None when it is neither (an HF id not downloaded yet)."""
    if name in UPSTREAMS:
        return UPSTREAMS[name]
    directory = Path(name).expanduser()
    if not (directory / "config.json").is_file():
        return None
    cfg = json.loads((directory / "config.json").read_text())
    if cfg.get("model_type") == "whisper":
        pre = directory / "preprocessor_config.json"
        hop = json.loads(pre.read_text()).get("hop_length", 160) if pre.is_file() else 160
        return UpstreamSpec(name, name, cfg["encoder_layers"] + 1, cfg["d_model"], whisper_frame_rate(hop), "whisper")
    return UpstreamSpec(name, name, cfg.get("num_hidden_layers", 0) + 1, cfg.get("hidden_size", 0),
                        ssl_frame_rate(cfg.get("conv_stride", (5, 2, 2, 2, 2, 2, 2))), "ssl")


def ssl_frame_rate(conv_stride) -> float:
    """Frames per second of a wav2vec2-style model: the conv feature encoder's total stride."""
    return SAMPLE_RATE / math.prod(conv_stride)


def whisper_frame_rate(hop_length: int) -> float:
    """Frames per second of a Whisper encoder: mel hop x conv1 stride 1 x conv2 stride 2."""
    return SAMPLE_RATE / (hop_length * 2)


# ---- random-weight models that look exactly like hub checkpoints ----------------------------------------
# Seconds per Whisper window. The tiny model keeps Whisper's windowing but with 4 s windows: the demo corpus
# (1-4 s utterances) would otherwise spend 90% of its compute on the padding of 30 s windows.
_WHISPER_WINDOW = {"tiny": 4, "base": 30}


def _config(kind: str, size: str):
    """The family's real config class. Conv strides/kernels and mel bins are left at their real values so that
    frame arithmetic is the real models'; for "tiny" L and D shrink and Whisper's window is 4 s, not 30 s."""
    if kind == "whisper":
        blocks, d, heads = (12, 768, 12) if size == "base" else (*_TINY[kind], 4)  # base: whisper-small's encoder
        # only the encoder is ever used, so the decoder is one small block
        return WhisperConfig(d_model=d, encoder_layers=blocks, encoder_attention_heads=heads,
                             encoder_ffn_dim=4 * d, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=4 * d,
                             num_mel_bins=80, max_source_positions=_WHISPER_WINDOW[size] * 50)
    cls = {"wavlm": WavLMConfig, "hubert": HubertConfig, "data2vec": Data2VecAudioConfig,
           "wav2vec2": Wav2Vec2Config}[kind]
    if size == "base":
        return cls()
    blocks, d = _TINY[kind]
    # data2vec-audio stacks num_conv_pos_embeddings conv layers; the others use it as one conv's kernel size
    extra = dict(num_conv_pos_embeddings=2) if kind == "data2vec" else dict(num_conv_pos_embeddings=16)
    if kind == "hubert":  # like the large models: layer-norm convs, pre-LN blocks, final layer norm
        extra.update(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    return cls(hidden_size=d, num_hidden_layers=blocks, num_attention_heads=4, intermediate_size=2 * d,
               conv_dim=(32,) * 7, num_conv_pos_embedding_groups=4, **extra)


def _ssl_feature_extractor(config) -> Wav2Vec2FeatureExtractor:
    """What fairseq pretraining did: the layer-norm-conv models (large, data2vec) normalised each waveform and
    take padded batches with a mask; the group-norm-conv base models did neither."""
    layer_norm = getattr(config, "feat_extract_norm", "layer") == "layer"
    return Wav2Vec2FeatureExtractor(do_normalize=layer_norm, return_attention_mask=layer_norm)


def make_local_model(kind: str, out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Save a random-weight model and its feature extractor into out_dir, laid out like a hub checkpoint.

        >>> up = load_upstream(str(make_local_model("hubert", "/tmp/my-hubert")))  # doctest: +SKIP

    kind: wavlm, hubert, data2vec, wav2vec2 or whisper. size "tiny" is a few small blocks (CPU tests),
    "base" the family's base-size config (benchmarks). The same seed gives the same weight bytes.
    The tiny wavlm and wav2vec2 use group-norm convs like wavlm-base-plus / wav2vec2-base, the tiny hubert
    layer-norm convs with stable layer norm like the large models.
    """
    if kind not in _TINY or size not in ("tiny", "base"):
        raise FusionpipeError(f"make_local_model: kind must be one of {', '.join(_TINY)} and size tiny or base, "
                              f"got kind={kind!r} size={size!r}")
    config = _config(kind, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
    feature_extractor = (WhisperFeatureExtractor(feature_size=80, chunk_length=_WHISPER_WINDOW[size])
                         if kind == "whisper" else _ssl_feature_extractor(config))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    feature_extractor.save_pretrained(out_dir)
    return out_dir


# ---- the front end: everything an upstream does on the CPU before its forward ------------------------------
@dataclass
class Inputs:
    """One batch as the model takes it, laid out from sample counts alone (`FrontEnd.rows`) so that other
    processes can fill the values one utterance at a time (`FrontEnd.fill`; extract/pipeline.py).

    A row is one utterance (SSL: its feature-extractor output, zero-padded) or one Whisper window (its log-mel).
    """

    frames: list[int]       # output frames of each wave (0: too short for the convs, no row)
    owners: list[int]       # the wave of each row
    starts: list[int]       # first sample of each row in its wave (Whisper windows; 0 for SSL)
    lengths: list[int]      # real length of each row: samples (SSL) or output frames (Whisper window)
    shape: tuple[int, ...]  # of `values`: (rows, samples) SSL, (windows, n_mels, n_frames) Whisper
    values: np.ndarray | None = None  # float32

    def subset(self, waves: list[int]) -> Inputs:
        """The batch of only `waves` (the others were bad audio), as `rows` lays it out for them alone."""
        pick = {w: j for j, w in enumerate(waves)}
        rows = [r for r, o in enumerate(self.owners) if o in pick]
        lengths = [self.lengths[r] for r in rows]
        shape = (len(rows), *self.shape[1:])
        if len(self.shape) == 2:  # SSL: padded to the longest remaining utterance
            shape = (len(rows), max(lengths, default=0))
        values = np.ascontiguousarray(self.values[rows][:, :shape[1]]) if self.values is not None else None
        return Inputs([self.frames[w] for w in waves], [pick[self.owners[r]] for r in rows],
                      [self.starts[r] for r in rows], lengths, shape, values)


class FrontEnd:
    """The CPU half of an upstream: frame arithmetic and the feature extractor (normalisation, Whisper's log-mel).

    It holds no weights, so it pickles small into the pipeline's reader processes. Frame counts are integer
    arithmetic on the config's conv kernels and strides (transformers' _get_feat_extract_output_lengths, without
    torch ops: it runs per utterance).
    """

    def __init__(self, family: str, feature_extractor, conv_kernel=(), conv_stride=()):
        self.family, self.feature_extractor = family, feature_extractor
        self.convs = list(zip(conv_kernel, conv_stride))

    @property
    def window_samples(self) -> int | None:
        return self.feature_extractor.n_samples if self.family == "whisper" else None

    def num_frames(self, num_samples: int) -> int:
        if self.family == "whisper":
            full, rest = divmod(num_samples, self.window_samples)
            return full * self.window_frames(self.window_samples) + self.window_frames(rest)
        n = num_samples
        for kernel, stride in self.convs:
            n = (n - kernel) // stride + 1
        return max(0, n)

    def window_frames(self, num_samples: int) -> int:
        # the frames whose centre lies in the audio: ceil(n / hop) mel frames, as the feature extractor's
        # attention mask counts them, then the encoder's stride-2 conv (kernel 3, padding 1)
        mel = -(-num_samples // self.feature_extractor.hop_length)
        return (mel - 1) // 2 + 1

    def rows(self, num_samples: list[int]) -> Inputs:
        """The layout of a batch of waves of these lengths, without their values."""
        frames = [self.num_frames(n) for n in num_samples]
        if self.family == "whisper":
            window = self.window_samples
            pieces = [(i, s) for i, n in enumerate(num_samples) for s in range(0, n, window)]
            lengths = [self.window_frames(min(window, num_samples[i] - s)) for i, s in pieces]
            fe = self.feature_extractor
            return Inputs(frames, [i for i, _ in pieces], [s for _, s in pieces], lengths,
                          (len(pieces), fe.feature_size, fe.nb_max_frames))
        keep = [i for i, t in enumerate(frames) if t > 0]  # shorter than one conv receptive field: no frames
        lengths = [num_samples[i] for i in keep]
        return Inputs(frames, keep, [0] * len(keep), lengths, (len(keep), max(lengths, default=0)))

    def fill(self, inputs: Inputs, wave_index: int, wave: np.ndarray, values: np.ndarray) -> None:
        """Write the rows of wave `wave_index` into `values` (inputs.shape), padding included."""
        for r in (r for r, o in enumerate(inputs.owners) if o == wave_index):
            if self.family == "whisper":  # the feature extractor pads each window to its full length
                piece = wave[inputs.starts[r]:inputs.starts[r] + self.window_samples]
                mel = self.feature_extractor(piece, sampling_rate=SAMPLE_RATE, return_tensors="np")
                values[r] = mel.input_features[0]
            else:  # it normalises over the whole input, so it sees one utterance at a time
                n = inputs.lengths[r]
                x = self.feature_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np")
                values[r, :n] = x.input_values[0]
                values[r, n:] = 0

    def prepare(self, waves: list[np.ndarray]) -> Inputs:
        inputs = self.rows([len(w) for w in waves])
        inputs.values = np.empty(inputs.shape, np.float32)
        for i, w in enumerate(waves):
            self.fill(inputs, i, w, inputs.values)
        return inputs


# ---- the upstream ----------------------------------------------------------------------------------------
class Upstream:
    """A frozen upstream in eval mode. forward(waves) -> one (T_i, L, D) tensor per wave, T_i == num_frames.

    An utterance's features never depend on the other utterances of its batch: each equals the single-utterance
    forward of plain transformers (feature extractor on that utterance alone, then the model).
    forward = run(front_end.prepare(waves)): the pipeline (extract/pipeline.py) prepares in other processes.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, name: str, model_id: str, revision: str, model: nn.Module, feature_extractor,
                 device: torch.device):
        config = model.config
        self.name, self.model_id, self.revision = name, model_id, revision
        self.model, self.feature_extractor, self.device = model, feature_extractor, device
        self.family = _FAMILIES[config.model_type]
        self.hidden_size = config.hidden_size
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        if self.family == "whisper":
            self.num_layers = config.encoder_layers + 1
            assert (model.conv1.stride[0], model.conv2.stride[0]) == (1, 2), "Whisper's encoder convs changed"
            self.frame_rate = whisper_frame_rate(feature_extractor.hop_length)
            self.front_end = FrontEnd(self.family, feature_extractor)
        else:
            self.num_layers = config.num_hidden_layers + 1
            self.frame_rate = ssl_frame_rate(config.conv_stride)
            self.front_end = FrontEnd(self.family, feature_extractor, config.conv_kernel, config.conv_stride)
        self._group_norm = getattr(config, "feat_extract_norm", "layer") == "group"
        self._lock = threading.Lock()

    def __repr__(self):
        return f"Upstream({self.name!r}, L={self.num_layers}, D={self.hidden_size}, device={self.device})"

    def fingerprint(self) -> dict:
        return {"name": self.name, "model_id": self.model_id, "revision": self.revision, "family": self.family,
                "num_layers": self.num_layers, "hidden_size": self.hidden_size, "frame_rate": self.frame_rate,
                "fusionpipe_version": __version__}

    @property
    def window_seconds(self) -> float | None:
        """Whisper's fixed input window (every window costs the same compute); None for the SSL models."""
        return self.front_end.window_samples / SAMPLE_RATE if self.family == "whisper" else None

    def num_frames(self, num_samples: int) -> int:
        """Frames forward() returns for num_samples 16 kHz samples (0 when too short for the convs)."""
        return self.front_end.num_frames(num_samples)

    def forward(self, waves: list[np.ndarray], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """waves: mono 16 kHz 1-D float arrays of any lengths -> [(T_i, L, D)] on self.device.

        ``dtype``: the compute precision, and the dtype of the result: float16 runs under autocast
        (GPUs), float32 runs in float32 on every device. Default: self.dtype (float16 on a GPU).
        """
        waves = [np.asarray(w, dtype=np.float32) for w in waves]
        if any(w.ndim != 1 for w in waves):
            raise FusionpipeError(f"{self.name}: forward expects mono 1-D waveforms, got shapes "
                                  f"{[w.shape for w in waves]}")
        return self.run(self.front_end.prepare(waves), dtype)

    def run(self, inputs: Inputs, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The model on a prepared batch -> [(T_i, L, D)] per wave, on self.device (see `forward`)."""
        dtype = dtype or self.dtype
        if not inputs.owners:
            return [self._empty(dtype) for _ in inputs.frames]
        # one call at a time: batch independence swaps modules in for the call (cluster workers run 2 units)
        with self._lock, torch.inference_mode(), \
                torch.autocast(self.device.type, dtype=torch.float16, enabled=dtype == torch.float16):
            return self._run_whisper(inputs, dtype) if self.family == "whisper" else self._run_ssl(inputs, dtype)

    def _hidden_states(self, out, dtype: torch.dtype) -> torch.Tensor:  # L x (B, T, D) -> (B, T, L, D)
        # transformers 5 records the last block's output BEFORE the final layer norm of stable-layer-norm models
        # (the large HuBERT/WavLM/wav2vec2); s3prl and transformers 4 take the normalised encoder output.
        # Under autocast the layer norms return float32 and the blocks float16: one dtype for the cache.
        return torch.stack([h.to(dtype) for h in (*out.hidden_states[:-1], out.last_hidden_state)], dim=2)

    def _empty(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(0, self.num_layers, self.hidden_size, device=self.device, dtype=dtype)

    def _run_ssl(self, inputs: Inputs, dtype: torch.dtype) -> list[torch.Tensor]:
        lengths, frames = inputs.lengths, inputs.frames
        input_values = torch.from_numpy(inputs.values)  # (B, S), zero-padded
        attention_mask = (torch.arange(input_values.shape[1]) < torch.tensor(lengths)[:, None]).long()
        with ExitStack() as stack:
            if self._group_norm:
                first = self.model.feature_extractor.conv_layers[0]
                conv_frames = [(n - first.conv.kernel_size[0]) // first.conv.stride[0] + 1 for n in lengths]
                stack.enter_context(swapped(first, "layer_norm", MaskedGroupNorm(
                    first.layer_norm, torch.tensor(conv_frames, device=self.device))))
            if self.model.config.model_type == "data2vec-audio":
                encoder = self.model.encoder
                stack.enter_context(swapped(encoder, "pos_conv_embed", PerUtterancePosConv(
                    encoder.pos_conv_embed, [frames[i] for i in inputs.owners])))
            result = self.model(input_values.to(self.device), attention_mask=attention_mask.to(self.device),
                                output_hidden_states=True)
        hidden = self._hidden_states(result, dtype)  # (B, T, L, D)
        out = [self._empty(dtype) for _ in frames]
        for b, i in enumerate(inputs.owners):
            out[i] = hidden[b, :frames[i]]
        return out

    def _run_whisper(self, inputs: Inputs, dtype: torch.dtype) -> list[torch.Tensor]:
        """Whisper's encoder only accepts full windows (30 s = 3000 mel frames for the real models): every window
        is padded by the feature extractor, all windows of the batch run together, each is cut to its real frames."""
        out_w = self.model(torch.from_numpy(inputs.values).to(self.device), output_hidden_states=True)
        hidden = self._hidden_states(out_w, dtype)  # (W, 1500, L, D)
        out = [[] for _ in inputs.frames]
        for i, n, h in zip(inputs.owners, inputs.lengths, hidden):
            out[i].append(h[:n])
        return [torch.cat(hs) if hs else self._empty(dtype) for hs in out]


class NullUpstream(Upstream):
    """For benchmarks only: a real model's front end and output shape, and no model.

    `run` returns slices of one precomputed random tensor (SPREAD frames longer than the longest utterance, so
    that no two utterances of a chunk are the same bytes), at memory speed, so that bench/extract.py can
    measure the pipeline's own ceiling (decode, log-mel, cast, compress, write) on any machine. Not in the
    registry, so never loaded by name. like: "base" (WavLM base: 13 x 768 at 50 Hz, group-norm convs)
    or "whisper-base" (7 x 512, 30 s windows, the real log-mel).
    """

    SPREAD = 4096

    def __init__(self, like: str = "base", device: str = "cpu", scale: float = 1.0):
        if like == "whisper-base":
            num_layers, hidden_size = 7, 512  # openai/whisper-base's encoder
            front_end = FrontEnd("whisper", WhisperFeatureExtractor(feature_size=80))
            self.frame_rate = whisper_frame_rate(front_end.feature_extractor.hop_length)
        elif like == "base":
            config = WavLMConfig()
            num_layers, hidden_size = config.num_hidden_layers + 1, config.hidden_size
            front_end = FrontEnd("ssl", _ssl_feature_extractor(config), config.conv_kernel, config.conv_stride)
            self.frame_rate = ssl_frame_rate(config.conv_stride)
        else:
            raise FusionpipeError(f"NullUpstream: like must be 'base' or 'whisper-base', got {like!r}")
        self.name, self.model_id, self.revision = f"null-{like}", f"null:{like}", "0"
        self.model, self.feature_extractor, self.front_end = None, front_end.feature_extractor, front_end
        self.device = resolve_device(device)
        self.family, self.num_layers, self.hidden_size = front_end.family, num_layers, hidden_size
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.scale, self._lock, self._pool, self._next = scale, threading.Lock(), {}, 0

    def run(self, inputs: Inputs, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        dtype = dtype or self.dtype
        need = max(inputs.frames, default=0) + self.SPREAD
        pool = self._pool.get(dtype)
        if pool is None or len(pool) < need:  # grown rarely: batches are sorted longest first
            g = torch.Generator().manual_seed(0)
            pool = (self.scale * torch.randn(need, self.num_layers, self.hidden_size, generator=g)).to(
                self.device, dtype)
            self._pool[dtype] = pool
        out = []
        for t in inputs.frames:  # each utterance from another place: repeated frames would compress unlike real ones
            start = self._next % (len(pool) - t + 1)
            self._next += 1009
            out.append(pool[start:start + t])
        return out


# ---- loading ---------------------------------------------------------------------------------------------
TOY_VERSION = 2  # bump when a toy config changes, so no stale toy is loaded from an old cache


def _toy_dir(spec: UpstreamSpec) -> Path:
    """Toys are built once into $FUSIONPIPE_HOME/toy/<alias>-v<TOY_VERSION>, then load like any user directory. Built in a
    temporary directory and renamed, so a crash or a concurrent build never leaves a half-written model."""
    home = Path(os.environ.get("FUSIONPIPE_HOME") or Path.home() / ".cache" / "fusionpipe").expanduser()
    target = home / "toy" / f"{spec.alias}-v{TOY_VERSION}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.alias}.", dir=target.parent))
        make_local_model(spec.hf_id.removeprefix("toy:"), tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp)
            if not target.is_dir():
                raise
    return target.resolve()


def _resolve(name: str) -> str:
    """Registry alias, then an existing directory, then an HF hub id (owner/name)."""
    if name in UPSTREAMS:
        spec = UPSTREAMS[name]
        return str(_toy_dir(spec)) if spec.hf_id.startswith("toy:") else spec.hf_id
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if HUB_ID.fullmatch(name):
        return name
    if os.sep in name or name.startswith((".", "~")):
        raise FusionpipeError(f"upstream directory {name} does not exist; pass a save_pretrained() directory, "
                              f"an HF id (owner/name) or an alias (`fusionpipe models`)")
    close = difflib.get_close_matches(name, UPSTREAMS, n=1)
    raise FusionpipeError(f"unknown upstream {name!r}: not a registry alias, a directory or an HF id (owner/name)."
                          f"{f' Did you mean {close[0]!r}?' if close else ''} Known aliases: {', '.join(UPSTREAMS)}. "
                          f"Run `fusionpipe models` to list them.")


def _label(name: str, model_id: str) -> str:
    return name if name == model_id else f"{name} ({model_id})"


def _from_pretrained(auto_cls, name: str, model_id: str, **kwargs):
    try:
        return auto_cls.from_pretrained(model_id, **kwargs)
    except Exception as e:  # OSError, JSON, safetensors and config errors all mean: not a usable checkpoint
        details = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if os.path.isdir(model_id):
            raise FusionpipeError(f"could not load upstream {_label(name, model_id)} ({details}); the directory must "
                                  f"hold a save_pretrained() model: config.json, the weights, preprocessor_config.json"
                                  ) from e
        raise FusionpipeError(f"could not load {model_id} from the hub or the local cache ({details}); check the "
                              f"network / HF_HUB_OFFLINE, or pass a local directory") from e


def _revision(model_id: str) -> str:
    """The hub commit of a hub id; a directory has none, so the sha256 of its weight files names its content."""
    if os.path.isdir(model_id):
        return _weights_sha256(Path(model_id))
    config_file = cached_file(model_id, "config.json")  # from the cache: from_pretrained has just fetched it
    return extract_commit_hash(config_file, None) or _weights_sha256(Path(config_file).parent)


def _weights_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin")):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_upstream(name: str, device: str = "auto") -> Upstream:
    """Load an upstream by registry alias, toy alias, HF hub id or local save_pretrained() directory.

        >>> load_upstream("wavlm-base-plus")  # doctest: +SKIP
        Upstream('wavlm-base-plus', L=13, D=768, device=cuda)

    Always in eval mode: in train mode layerdrop skips blocks and the number of hidden states changes.
    """
    model_id = _resolve(name)
    config = _from_pretrained(AutoConfig, name, model_id)
    if config.model_type not in _FAMILIES or getattr(config, "add_adapter", False):
        raise FusionpipeError(f"upstream {_label(name, model_id)} is a {config.model_type!r} model"
                              f"{' with an adapter' if getattr(config, 'add_adapter', False) else ''}; supported: "
                              f"{', '.join(_FAMILIES)} (without adapter)")
    model = _from_pretrained(AutoModel, name, model_id, dtype=torch.float32)
    try:
        feature_extractor = AutoFeatureExtractor.from_pretrained(model_id)
    except OSError:  # pretraining-only checkpoints (e.g. facebook/hubert-large-ll60k) ship no preprocessor config
        if _FAMILIES[config.model_type] == "whisper":
            raise FusionpipeError(f"{_label(name, model_id)} has no preprocessor_config.json, which Whisper's "
                                  f"mel front end needs; copy it from the matching openai/whisper-* repository")
        feature_extractor = _ssl_feature_extractor(config)
        warnings.warn(f"{_label(name, model_id)} has no preprocessor_config.json: using {feature_extractor!r}")
    if _FAMILIES[config.model_type] == "whisper":
        model = model.get_encoder()
    device = resolve_device(device)
    model.eval().requires_grad_(False).to(device)
    return Upstream(name, model_id, _revision(model_id), model, feature_extractor, device)
