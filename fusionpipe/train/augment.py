"""Stage 3: the training-time augmentations of fused features: random crops and SpecAugment masks."""

from __future__ import annotations

import math

import torch

from fusionpipe import cuda
from fusionpipe.errors import FusionpipeError


def random_crop(stacks: list[torch.Tensor], lengths: torch.Tensor, shortest: int,
                longest: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A random window of each utterance, shortest..longest frames long (the whole of a shorter one),
    from the (B, L, T, D_i) stacks; zero past the new lengths, as the loader's batches are.

    ``lengths`` on the host, and so are the new ones: the windows are drawn there (the CPU generator, so
    the same draws on any device) and reach the stacks' device as one index and one mask, copied without
    waiting.
    """
    want = torch.randint(shortest, longest + 1, lengths.shape)
    new = torch.minimum(lengths, want)
    start = (torch.rand(lengths.shape) * (lengths - new + 1).to(torch.float)).long()  # uniform in 0..real-new
    T = int(new.max()) if len(new) else 0
    frames = start[:, None] + torch.arange(T)[None, :]                      # (B, T)
    keep = torch.arange(T)[None, :] < new[:, None]
    frames = torch.where(keep, frames, 0)
    out = []
    if stacks:
        frames, keep = cuda.upload(frames, stacks[0].device), cuda.upload(keep, stacks[0].device)
    for s in stacks:
        index = frames[:, None, :, None].expand(-1, s.shape[1], -1, s.shape[3])
        out.append(s.gather(2, index) * keep[:, None, :, None])
    return out, new


def crop_frames(seconds: list[float] | None, frame_rate: float) -> tuple[int, int] | None:
    """crop_seconds [min, max] -> (shortest, longest) frames at the fused frame rate; refuses nonsense."""
    if seconds is None:
        return None
    if len(seconds) != 2 or not 0 < seconds[0] <= seconds[1] < math.inf:
        raise FusionpipeError(f"--crop-seconds (crop_seconds={seconds}): give MIN,MAX with 0 < MIN <= MAX, "
                              "e.g. 2,8")
    return max(1, round(seconds[0] * frame_rate)), max(1, round(seconds[1] * frame_rate))


def spec_augment(x: torch.Tensor, lengths: torch.Tensor, time_masks: int = 2, time_width: int = 20,
                 feat_masks: int = 2, feat_width: int = 16) -> torch.Tensor:
    """SpecAugment-style masks on (B, T, D) features (s3prl applies them to upstream features).

    The masks are drawn on the host from the host ``lengths`` (the CPU generator: the same masks on any
    device) as a (B, T) time mask and a (B, D) feature mask, and reach the device in one copy each.
    """
    B, T, D = x.shape
    time = torch.ones(B, T)
    feat = torch.ones(B, D)
    for b, n in enumerate(lengths.tolist()):
        for _ in range(time_masks):
            w = int(torch.randint(0, time_width + 1, ()))
            t0 = int(torch.randint(0, max(1, n - w), ()))
            time[b, t0:t0 + w] = 0
        for _ in range(feat_masks):
            w = int(torch.randint(0, feat_width + 1, ()))
            f0 = int(torch.randint(0, max(1, D - w), ()))
            feat[b, f0:f0 + w] = 0
    keep = cuda.upload(time, x.device)[:, :, None] * cuda.upload(feat, x.device)[:, None, :]  # (B, T, D), 0 or 1
    return x * keep.to(x.dtype)
