"""A lossy store's stack of a batch, sent to the device as its codes and expanded there."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusionpipe.quantize import Codes
from fusionpipe.fuse.align import align_into


@dataclass
class CompactStack:
    """One lossy store's stack of a batch, not yet expanded: the codes of each contiguous read
    (`codecs.Codes`, 1 byte a value) and where its utterances go. ``.to(device)`` moves the codes,
    expands, aligns and pads there, giving exactly `FusedView.read_stacks`'s (B, L, T, D) float32
    tensor: a GPU trainer's loader sends these, a quarter of the float32 bytes over PCIe and no
    expansion on the host."""

    shape: tuple[int, int, int, int]
    lengths: list[int]  # aligned frames of each utterance
    reads: list[tuple[Codes, list[tuple[int, int, int]]]]  # codes, [(b, offset in them, frames)]

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        out = torch.zeros(self.shape, device=device)
        for codes, items in self.reads:
            block = codes.to(device, non_blocking=non_blocking).expand()  # (frames, L_k, D) storage dtype
            for b, o, n in items:
                align_into(block[o:o + n], out[b, :, :self.lengths[b]], accumulate=False)
        return out

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c, _ in self.reads)
