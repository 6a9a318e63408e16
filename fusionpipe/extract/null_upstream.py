"""An upstream without a model, for bench/extract.py: the pipeline's own ceiling on any machine."""

from __future__ import annotations

import threading

import torch
from transformers import WavLMConfig, WhisperFeatureExtractor

from fusionpipe.device import resolve_device
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.front_end import FrontEnd, Inputs
from fusionpipe.extract.registry import ssl_frame_rate, whisper_frame_rate
from fusionpipe.extract.toys import ssl_feature_extractor
from fusionpipe.extract.upstreams import Upstream


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
            front_end = FrontEnd("ssl", ssl_feature_extractor(config), config.conv_kernel, config.conv_stride)
            self.frame_rate = ssl_frame_rate(config.conv_stride)
        else:
            raise FusionpipeError(f"NullUpstream: like must be 'base' or 'whisper-base', got {like!r}")
        self.name, self.model_id, self.revision = f"null-{like}", f"null:{like}", "0"
        self.model, self.feature_extractor, self.front_end = None, front_end.feature_extractor, front_end
        self.device = resolve_device(device)
        self.family, self.num_layers, self.hidden_size = front_end.family, num_layers, hidden_size
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.scale, self._lock, self._pool, self._next = scale, threading.Lock(), {}, 0

    def peak_bytes(self, num_samples: int) -> int:
        """No model runs: only the output it returns."""
        return self.num_frames(num_samples) * self.num_layers * self.hidden_size * 4

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
