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
import os
import threading
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel
from transformers.utils.hub import cached_file, extract_commit_hash

from fusionpipe import __version__
from fusionpipe.audio import SAMPLE_RATE
from fusionpipe.device import resolve_device
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.batch_independence import MaskedGroupNorm, PerUtterancePosConv, swapped
from fusionpipe.extract.front_end import FrontEnd, Inputs
from fusionpipe.extract.registry import HUB_ID, UPSTREAMS, ssl_frame_rate, whisper_frame_rate
from fusionpipe.extract.toys import ssl_feature_extractor, toy_dir

_FAMILIES = {"hubert": "ssl", "wavlm": "ssl", "data2vec-audio": "ssl", "wav2vec2": "ssl", "whisper": "whisper"}


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

    def peak_bytes(self, num_samples: int) -> int:
        """A lower bound on the memory one utterance of ``num_samples`` (16 kHz) takes to run alone: the first
        conv layer's output and its norm (SSL), every hidden state and its stacked copy, and one layer's
        attention scores and weights where the model materialises them (eager attention; Whisper's per window).

        Only to refuse, before extraction starts, what cannot fit (a 2-hour recording), never to size batches:
        the real peak is higher (`extract --max-seconds` sizes batches)."""
        config, size = self.model.config, 2 if self.dtype == torch.float16 else 4
        eager = getattr(config, "_attn_implementation", "eager") == "eager"
        if self.family == "whisper":
            windows = -(-num_samples // self.front_end.window_samples)
            frames = self.num_frames(self.front_end.window_samples)
            heads, conv = config.encoder_attention_heads, 0
        else:
            windows, frames = 1, self.num_frames(num_samples)
            heads = config.num_attention_heads
            conv = 2 * (num_samples // config.conv_stride[0]) * config.conv_dim[0] * size
        hidden = 2 * frames * self.num_layers * self.hidden_size * size
        attention = 2 * heads * frames * frames * size if eager else 0
        return conv + windows * (hidden + attention)

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
        try:
            with self._lock, torch.inference_mode(), \
                    torch.autocast(self.device.type, dtype=torch.float16, enabled=dtype == torch.float16):
                return self._run_whisper(inputs, dtype) if self.family == "whisper" else self._run_ssl(inputs, dtype)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e):
                raise
            seconds = max(inputs.lengths) / SAMPLE_RATE if self.family != "whisper" else self.window_seconds
            raise FusionpipeError(
                f"{self.name} ran out of memory on {self.device.type} with a batch of {len(inputs.owners)} "
                f"utterance(s), the longest {seconds:,.0f} s ({str(e).splitlines()[0][:120]}); lower --max-seconds, "
                "or cut long recordings into parts of a few minutes; a rerun resumes") from None

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


# ---- loading ---------------------------------------------------------------------------------------------
def _resolve(name: str) -> str:
    """Registry alias, then an existing directory, then an HF hub id (owner/name)."""
    if name in UPSTREAMS:
        spec = UPSTREAMS[name]
        return str(toy_dir(spec)) if spec.hf_id.startswith("toy:") else spec.hf_id
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
        feature_extractor = ssl_feature_extractor(config)
        warnings.warn(f"{_label(name, model_id)} has no preprocessor_config.json: using {feature_extractor!r}")
    if _FAMILIES[config.model_type] == "whisper":
        model = model.get_encoder()
    device = resolve_device(device)
    model.eval().requires_grad_(False).to(device)
    return Upstream(name, model_id, _revision(model_id), model, feature_extractor, device)
