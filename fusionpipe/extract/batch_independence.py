"""Batch independence for transformers' speech models: the modules swapped in for the duration of a call.

A cached utterance must not depend on the other utterances of its batch. Padding leaks into real
frames in two places of these architectures, and each gets a stand-in module that computes what a
lone utterance would see (tested against single-utterance forwards through plain transformers):

    MaskedGroupNorm      the first conv layer's GroupNorm (HuBERT / WavLM / wav2vec2 base)
    PerUtterancePosConv  data2vec-audio's stacked positional convs

`swapped` puts one in place for a call and restores the original after it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class MaskedGroupNorm(nn.Module):
    """GroupNorm whose statistics cover each utterance's real frames only.

    GroupNorm in the first conv layer (hubert-base, wavlm-base-plus, wav2vec2-base) normalises every channel over
    the whole time axis: over a zero-padded batch, every frame of the shorter utterances would change. The convs
    have no padding, so once these statistics are right, real output frames depend on real samples only and the
    whole conv stack runs batched.
    """

    def __init__(self, norm: nn.GroupNorm, lengths: torch.Tensor):
        super().__init__()
        self.norm, self.lengths = norm, lengths  # lengths: (B,) real frames at this layer

    def forward(self, x):  # (B, C, T) -> (B, C, T), float32 like GroupNorm under autocast
        B, C, T = x.shape
        groups = x.float().view(B, self.norm.num_groups, -1, T)  # (B, G, C/G, T)
        mask = (torch.arange(T, device=x.device) < self.lengths[:, None])[:, None, None]  # (B, 1, 1, T)
        count = self.lengths.view(B, 1, 1, 1) * groups.shape[2]
        mean = (groups * mask).sum((2, 3), keepdim=True) / count
        var = ((groups - mean) * mask).square().sum((2, 3), keepdim=True) / count
        y = ((groups - mean) * torch.rsqrt(var + self.norm.eps)).view(B, C, T)
        return y * self.norm.weight[:, None] + self.norm.bias[:, None]


class PerUtterancePosConv(nn.Module):
    """Runs data2vec-audio's positional embedding on each utterance's real frames and zero-pads the outputs.

    It is a stack of convs with layer norm in between: padded frames stop being zero after the first conv, and
    the next ones would leak them into the last real frames (about 0.9 s). The single-conv positional embedding
    of the other models sees zeroed padding, as a lone utterance sees the conv's zero padding: no change there.
    """

    def __init__(self, module: nn.Module, lengths: list[int]):
        super().__init__()
        self.module, self.lengths = module, lengths

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        return torch.cat([F.pad(self.module(x[b:b + 1, :n]), (0, 0, 0, x.shape[1] - n))
                          for b, n in enumerate(self.lengths)])


@contextmanager
def swapped(parent: nn.Module, attr: str, replacement: nn.Module):
    original = getattr(parent, attr)
    setattr(parent, attr, replacement)
    try:
        yield
    finally:
        setattr(parent, attr, original)
