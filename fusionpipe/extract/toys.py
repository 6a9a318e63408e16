"""Random-weight models that look exactly like hub checkpoints: the toys of the registry, tests and benchmarks.

    >>> up = load_upstream(str(make_local_model("hubert", "/tmp/my-hubert")))  # doctest: +SKIP

A toy alias (`toy-wavlm`, ...) is built once into $FUSIONPIPE_HOME and then loads like any
save_pretrained() directory, through the same code as a real checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (AutoModel, Data2VecAudioConfig, HubertConfig, Wav2Vec2Config, Wav2Vec2FeatureExtractor,
                          WavLMConfig, WhisperConfig, WhisperFeatureExtractor)

from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.registry import TINY, UpstreamSpec

# Seconds per Whisper window. The tiny model keeps Whisper's windowing but with 4 s windows: the demo corpus
# (1-4 s utterances) would otherwise spend 90% of its compute on the padding of 30 s windows.
_WHISPER_WINDOW = {"tiny": 4, "base": 30}


def _config(kind: str, size: str):
    """The family's real config class. Conv strides/kernels and mel bins are left at their real values so that
    frame arithmetic is the real models'; for "tiny" L and D shrink and Whisper's window is 4 s, not 30 s."""
    if kind == "whisper":
        blocks, d, heads = (12, 768, 12) if size == "base" else (*TINY[kind], 4)  # base: whisper-small's encoder
        # only the encoder is ever used, so the decoder is one small block
        return WhisperConfig(d_model=d, encoder_layers=blocks, encoder_attention_heads=heads,
                             encoder_ffn_dim=4 * d, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=4 * d,
                             num_mel_bins=80, max_source_positions=_WHISPER_WINDOW[size] * 50)
    cls = {"wavlm": WavLMConfig, "hubert": HubertConfig, "data2vec": Data2VecAudioConfig,
           "wav2vec2": Wav2Vec2Config}[kind]
    if size == "base":
        return cls()
    blocks, d = TINY[kind]
    # data2vec-audio stacks num_conv_pos_embeddings conv layers; the others use it as one conv's kernel size
    extra = dict(num_conv_pos_embeddings=2) if kind == "data2vec" else dict(num_conv_pos_embeddings=16)
    if kind == "hubert":  # like the large models: layer-norm convs, pre-LN blocks, final layer norm
        extra.update(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    return cls(hidden_size=d, num_hidden_layers=blocks, num_attention_heads=4, intermediate_size=2 * d,
               conv_dim=(32,) * 7, num_conv_pos_embedding_groups=4, **extra)


def ssl_feature_extractor(config) -> Wav2Vec2FeatureExtractor:
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
    if kind not in TINY or size not in ("tiny", "base"):
        raise FusionpipeError(f"make_local_model: kind must be one of {', '.join(TINY)} and size tiny or base, "
                              f"got kind={kind!r} size={size!r}")
    config = _config(kind, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
    feature_extractor = (WhisperFeatureExtractor(feature_size=80, chunk_length=_WHISPER_WINDOW[size])
                         if kind == "whisper" else ssl_feature_extractor(config))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    feature_extractor.save_pretrained(out_dir)
    return out_dir


TOY_VERSION = 2  # bump when a toy config changes, so no stale toy is loaded from an old cache


def toy_dir(spec: UpstreamSpec) -> Path:
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
