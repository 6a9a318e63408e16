"""The upstream registry: aliases of the hub checkpoints and toys, and L, D, frame rate without loading weights.

    >>> UPSTREAMS["wavlm-base-plus"].num_layers, UPSTREAMS["toy-wavlm"].hf_id
    (13, 'toy:wavlm')

What `fusionpipe models` prints and the recipes check names against; extract/upstreams.py loads them.
It imports neither torch nor transformers, so reading it is cheap.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from fusionpipe.audio import SAMPLE_RATE

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


# kind: (transformer blocks, hidden size) of the tiny random models (extract/toys.py); L = blocks + 1 differs
# between toys
TINY = {"wavlm": (3, 32), "hubert": (2, 48), "whisper": (2, 40), "data2vec": (4, 24), "wav2vec2": (1, 16)}
TOYS = ("wavlm", "hubert", "whisper", "data2vec")


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
    *(_row(f"toy-{k}", f"toy:{k}", TINY[k][0] + 1, TINY[k][1], "whisper" if k == "whisper" else "ssl")
      for k in TOYS),
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
