"""STAGE 2's alignment rule: every upstream to a common number of frames T and layers L.

The paper aligns the N upstreams "by upsampling and linear interpolation where
needed" and says no more; which length is the target is (unverified) our choice:
- time: every utterance goes to T = max T_i over the stores (``align_time="max"``, upsampling;
  ``"min"`` downsamples to min T_i instead). Output frame t samples input position
  t * (T_i - 1) / (T - 1) with linear interpolation (PyTorch's ``align_corners=True``): the first
  and the last frames are exact, a store already at T is not touched. The same rule covers the
  off-by-one of Whisper (50 frames per second) against the SSL models (49), and models of other
  frame rates (a 25 Hz model against a 50 Hz one).
- layers: L = max L_i (``align_layers="interpolate"``), linear along the layer axis with the same
  end-exact rule, so layer 0 (the CNN/embedding output) and the last layer are kept as they are;
  ``"none"`` requires equal L and refuses otherwise.
Interpolation runs time first, then layers, in float32.
The hot path (`align_into`) and the Dask path (`aligned_block`) run the same code, hence the same numbers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

ALIGN_TIME = ("max", "min")
ALIGN_LAYERS = ("interpolate", "none")


class _Lerp(NamedTuple):
    """Output k samples input position k*(n_in-1)/(n_out-1), in two parts: a `run` of consecutive outputs whose
    inputs are two shifted slices (f[k0 : k0 + m] and f[k0 + 1 : k0 + 1 + m], weights `w_run`), and the outputs
    outside it, `rest`, gathered from inputs `left` and `right` with weights `w`.

    The run saves two gathers: it is the whole utterance but its ends when T differs by one frame (Whisper
    against an SSL model), the common case.
    """

    run: slice
    k0: int
    w_run: torch.Tensor
    rest: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    w: torch.Tensor


@lru_cache(maxsize=4096)
def _lerp_index(n_in: int, n_out: int, device: torch.device) -> _Lerp:
    """The interpolation of n_in entries to n_out, its tensors on `device`: computed and copied there once per
    (n_in, n_out, device), so that a GPU aligning a batch neither uploads indices nor reads one back."""
    pos = np.zeros(n_out)
    if n_out > 1:
        pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
        pos[-1] = n_in - 1  # the last output is the last input exactly, whatever the rounding
    left = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    right = np.minimum(left + 1, n_in - 1)
    w = (pos - left).astype(np.float32)
    # left is monotone, so the outputs of one shift (left - k) are consecutive: take the most common one
    shift = np.where(right == left + 1, left - np.arange(n_out), n_in)  # n_in: not sliceable
    run = slice(0, 0)
    if (shift < n_in).any():
        values, counts = np.unique(shift[shift < n_in], return_counts=True)
        k = np.flatnonzero(shift == values[counts.argmax()])
        run = slice(int(k[0]), int(k[-1]) + 1)
    rest = np.r_[0:run.start, run.stop:n_out]

    def on(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return _Lerp(run, int(left[run.start]) if run.stop > run.start else 0, on(w[run]), on(rest),
                 on(left[rest]), on(right[rest]), on(w[rest]))


def _lerp(f: torch.Tensor, dim: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """f (float32) resampled to n entries along `dim`, ends exact; into `out` when given."""
    ix = _lerp_index(f.shape[dim], n, f.device)
    shape = [1] * f.dim()
    shape[dim] = -1
    g = torch.empty(*f.shape[:dim], n, *f.shape[dim + 1:], device=f.device) if out is None else out
    m = ix.run.stop - ix.run.start
    if m:
        torch.lerp(f.narrow(dim, ix.k0, m), f.narrow(dim, ix.k0 + 1, m), ix.w_run.view(shape),
                   out=g.narrow(dim, ix.run.start, m))
    if len(ix.rest):
        g.index_copy_(dim, ix.rest, torch.lerp(f.index_select(dim, ix.left), f.index_select(dim, ix.right),
                                               ix.w.view(shape)))
    return g


def common_frames(frames: np.ndarray, align_time: str) -> np.ndarray:
    """(N stores, B utterances) frame counts -> (B,) the frames every store is aligned to (the time rule above)."""
    return frames.max(0) if align_time == "max" else frames.min(0)


def common_frame_rate(rates: list[float], align_time: str) -> float:
    """The stores' frame rates -> the fused view's (the same time rule: the fastest under max, the slowest
    under min)."""
    return max(rates) if align_time == "max" else min(rates)


def align_into(x: np.ndarray | torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """One utterance of one store, (T_i, L_i, D) in the storage dtype -> out (L, T, D) float32 (= or +=).

    Time first, then layers, in float32; a store already at (L, T) is only cast and transposed.
    On the device of `x` and `out` (a GPU expanding lossy codes aligns there too).
    """
    L, T, _ = out.shape
    a = (x if isinstance(x, torch.Tensor) else torch.from_numpy(x)).permute(1, 0, 2)  # -> (L_i, T_i, D)
    Li, Ti, _ = a.shape
    if (Li, Ti) == (L, T):
        (out.add_ if accumulate else out.copy_)(a)  # cast + transpose in one pass
        return
    f = torch.empty(a.shape, device=a.device).copy_(a)  # contiguous float32: lerp reads it in slices
    last = None if accumulate else out  # the last step writes straight into out
    if Ti != T:
        f = _lerp(f, 1, T, out=last if Li == L else None)
    if Li != L:
        f = _lerp(f, 0, L, out=last)
    if accumulate:
        out.add_(f)


def aligned_block(x: np.ndarray, L: int, T: int) -> np.ndarray:
    """The Dask task of one (utterance, store): the same code as the hot path, hence the same numbers."""
    out = torch.empty(L, T, x.shape[2])
    align_into(np.ascontiguousarray(x), out, accumulate=False)
    return out.numpy()
