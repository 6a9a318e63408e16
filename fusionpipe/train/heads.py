"""Stage 3: task heads on top of the fusion interface (SUPERB / ML-SUPERB defaults).

    >>> import torch
    >>> from fusionpipe.train.heads import ClassifierHead
    >>> head = ClassifierHead(in_dim=768, num_classes=4)
    >>> logits, _ = head(torch.randn(2, 50, 768), torch.tensor([50, 20]))
    >>> logits.shape
    torch.Size([2, 4])

Every head takes features (B, T, D) and ``lengths`` (B,) long (valid frames; the trainer keeps them
on the host, and a head copies them to the device itself) and returns a `HeadOutput` (output, lengths):
``lengths`` are the valid frames of a frame-level output, where the input's were, and None for an
utterance-level one. Padding never leaks into valid outputs: masked
pooling, a BiLSTM whose backward direction reads each sequence reversed within its length
(`BiLSTM`, no packing), key padding masks, convolutions that only count fully valid windows.
``min_frames`` is the shortest input a head accepts; shorter ones raise ValueError, so a data
loader can filter or crop first. Every size is an argument, so tests can shrink the heads; what each
may be is `option_rule`'s, checked before a head is built (`--head-option`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusionpipe import cuda
from fusionpipe.train.interfaces import frame_mask
from fusionpipe.train.options import Rule, real, whole

# what a head's keyword argument may be (options.py): a size, a whole number >= 1, unless named here; a stack
# deeper than 256 layers is a typo (and would take minutes to build before it failed)
_RULES = {"dropout": real(0, 1), "s": real(0, open_low=True), "m": real(0), "layers": whole(1, 256),
          "speakers": whole(1, 64)}
_SIZE = whole(1)


def option_rule(name: str) -> Rule:
    """The rule of the head keyword ``name`` (every head spells a size the same way, so one table serves all)."""
    return _RULES.get(name, _SIZE)


class HeadOutput(NamedTuple):
    output: torch.Tensor  # (B, T', V) log-probs, (B, C) logits, or (B, E) speaker hidden
    lengths: torch.Tensor | None  # (B,) valid frames of a frame-level output, else None


def _check_min_frames(head: nn.Module, lengths: torch.Tensor) -> None:
    if lengths.device.type != "cpu":  # reading them back would cost a sync: the trainer checks its host copy
        return
    if int(lengths.min()) < head.min_frames:
        raise ValueError(f"{type(head).__name__} needs at least {head.min_frames} frames per "
                         f"utterance, got {int(lengths.min())}; drop or pad shorter utterances")


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, D), mean over the valid frames only."""
    lengths = cuda.upload(lengths, x.device)
    mask = frame_mask(lengths, x.shape[1])[..., None].to(x.dtype)
    return (x * mask).sum(1) / lengths[:, None].to(x.dtype)


def masked_mean_std(x: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, T, D) -> (B, 2D): mean and (population) standard deviation over the valid frames."""
    lengths = cuda.upload(lengths, x.device)
    mask = frame_mask(lengths, x.shape[1])[..., None].to(x.dtype)
    mean = (x * mask).sum(1) / lengths[:, None].to(x.dtype)
    var = (((x - mean[:, None]) * mask) ** 2).sum(1) / lengths[:, None].to(x.dtype)
    return torch.cat([mean, var.clamp(min=eps).sqrt()], dim=-1)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of (B, T, D) within its own length; padding stays at the end."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]  # (1, T)
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # (B, T)
    return x.gather(1, index[..., None].expand_as(x))


class BiLSTM(nn.Module):
    """Bidirectional LSTM over padded batches, exact on valid frames without packing.

    The forward direction never sees the padding before a valid frame; the backward direction
    runs on each sequence reversed within its length, so its padding also comes last. Packed
    sequences give the same numbers but their CPU backward pass slices the packed data once per
    time step (15x slower here on a 2-core CPU: measured 19 s vs 1.2 s for a 22 x 179 batch).
    """

    def __init__(self, in_dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        dims = [in_dim] + [2 * hidden] * (layers - 1)
        self.forward_lstms = nn.ModuleList(nn.LSTM(d, hidden, batch_first=True) for d in dims)
        self.backward_lstms = nn.ModuleList(nn.LSTM(d, hidden, batch_first=True) for d in dims)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, 2H)
        lengths = cuda.upload(lengths, x.device)
        for i, (fw, bw) in enumerate(zip(self.forward_lstms, self.backward_lstms)):
            if i:
                x = self.dropout(x)  # between layers, as nn.LSTM(dropout=...)
            back = reverse_padded(bw(reverse_padded(x, lengths))[0], lengths)
            x = torch.cat([fw(x)[0], back], dim=-1)
        return x * frame_mask(lengths, x.shape[1])[..., None].to(x.dtype)


class CTCHead(nn.Module):
    """SUPERB ASR: Linear(D -> proj), BiLSTM (hidden per direction; dropout after every layer),
    Linear -> CTC log-probs (B, T, V), blank = 0. Returns (log_probs, lengths)."""

    min_frames = 1

    def __init__(self, in_dim: int, vocab_size: int, proj: int = 1024, hidden: int = 1024,
                 layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.proj = nn.Linear(in_dim, proj)
        self.lstm = BiLSTM(proj, hidden, layers, dropout)
        self.dropout = nn.Dropout(dropout)  # s3prl drops out after the last layer as well
        self.out = nn.Linear(2 * hidden, vocab_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> HeadOutput:
        _check_min_frames(self, lengths)
        h = self.lstm(self.proj(x), lengths)
        return HeadOutput(self.out(self.dropout(h)).log_softmax(-1), lengths)  # (B, T, V)


class ClassifierHead(nn.Module):
    """SUPERB emotion: Linear(D -> proj), mean over valid frames, Linear -> logits (B, C).
    Returns (logits, None)."""

    min_frames = 1

    def __init__(self, in_dim: int, num_classes: int, proj: int = 256):
        super().__init__()
        self.proj = nn.Linear(in_dim, proj)
        self.out = nn.Linear(proj, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> HeadOutput:
        _check_min_frames(self, lengths)
        return HeadOutput(self.out(masked_mean(self.proj(x), lengths)), None)


class DiarizationHead(nn.Module):
    """SUPERB speaker diarization (s3prl's diarization Model with SUPERB SD's config): a forward LSTM
    (layers, hidden; 1 x 512), Linear -> per-frame speaker activity logits (B, T, speakers), one column per
    speaker slot. Which slot is which speaker is left open: the loss is permutation-invariant
    (`tasks.diarize.pit_bce`). A forward LSTM never reads the padding after a valid frame, so valid outputs
    do not depend on the batch. Returns (logits, lengths)."""

    min_frames = 1

    def __init__(self, in_dim: int, speakers: int = 2, hidden: int = 512, layers: int = 1):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, speakers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> HeadOutput:
        _check_min_frames(self, lengths)
        return HeadOutput(self.out(self.lstm(x)[0]), lengths)  # (B, T, speakers)


class XVectorHead(nn.Module):
    """SUPERB speaker verification x-vector (s3prl sv_voxceleb1, no batch norm).

    Linear(D -> proj); 5 TDNN layers = unpadded dilated Conv1d + ReLU with contexts 5, 3
    (dilation 2), 3 (dilation 3), 1, 1 and widths tdnn, tdnn, tdnn, tdnn, last; statistics
    pooling (mean + std over the valid output frames: the unpadded convs leave
    lengths - 14); Linear(2 * last -> embed_dim) ReLU; Linear(embed_dim -> embed_dim) ReLU.
    forward returns (second affine output (B, embed_dim), None), the input of
    `AMSoftmaxLoss`; `embed` returns the first affine output, L2-normalised, for scoring.
    """

    CONTEXTS = ((5, 1), (3, 2), (3, 3), (1, 1), (1, 1))  # (kernel, dilation)
    min_frames = 1 + sum((k - 1) * d for k, d in CONTEXTS)  # 15

    def __init__(self, in_dim: int, embed_dim: int = 512, proj: int = 512, tdnn: int = 512,
                 last: int = 1500):
        super().__init__()
        self.proj = nn.Linear(in_dim, proj)
        widths = [proj, tdnn, tdnn, tdnn, tdnn, last]
        layers = []
        for i, (kernel, dilation) in enumerate(self.CONTEXTS):
            layers += [nn.Conv1d(widths[i], widths[i + 1], kernel, dilation=dilation), nn.ReLU()]
        self.tdnn = nn.Sequential(*layers)
        self.affine1 = nn.Linear(2 * last, embed_dim)
        self.affine2 = nn.Linear(embed_dim, embed_dim)
        self.embed_dim = embed_dim

    def _first_affine(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _check_min_frames(self, lengths)
        h = self.tdnn(self.proj(x).transpose(1, 2)).transpose(1, 2)  # (B, T, proj) -> (B, T - 14, last)
        stats = masked_mean_std(h, lengths - (self.min_frames - 1))  # (B, 2 * last)
        return F.relu(self.affine1(stats))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> HeadOutput:
        return HeadOutput(F.relu(self.affine2(self._first_affine(x, lengths))), None)

    def embed(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, embed_dim) L2-normalised speaker embeddings (cosine = dot)."""
        return F.normalize(self._first_affine(x, lengths), dim=-1)


class AMSoftmaxLoss(nn.Module):
    """Additive-margin softmax (s3prl AMSoftmaxLoss): cross-entropy over
    s * (cos(x, w_c) - m * [c == label]), with x and the class weights w_c L2-normalised."""

    def __init__(self, embed_dim: int, num_classes: int, s: float = 30.0, m: float = 0.4):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(embed_dim, num_classes))
        nn.init.xavier_normal_(self.weight)
        self.s, self.m = s, m

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, C) cosine similarity to every class."""
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        margin = self.m * F.one_hot(labels, self.weight.shape[1]).to(x.dtype)
        return F.cross_entropy(self.s * (self.cosine(x) - margin), labels, reduction=reduction)


class SpeakerHead(nn.Module):
    """`XVectorHead` plus its `AMSoftmaxLoss`, one module so the optimiser trains both.
    forward and embed are the x-vector's; ``amsoftmax(head(x, lengths).output, labels)``
    is the training loss."""

    def __init__(self, in_dim: int, num_speakers: int, s: float = 30.0, m: float = 0.4, **sizes):
        super().__init__()
        self.xvector = XVectorHead(in_dim, **sizes)
        self.amsoftmax = AMSoftmaxLoss(self.xvector.embed_dim, num_speakers, s, m)
        self.min_frames = self.xvector.min_frames

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> HeadOutput:
        return self.xvector(x, lengths)

    def embed(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.xvector.embed(x, lengths)


class Conv2dSubsampling2(nn.Module):
    """ESPnet Conv2dSubsampling2: Conv2d(3, stride 2) ReLU Conv2d(3, stride 1) ReLU, Linear,
    scaled sinusoidal positional encoding. (B, T, idim) -> (B, (T - 1) // 2 - 2, odim).

    Unlike ESPnet's mask slicing, an output frame counts as valid only if its whole window
    is valid: out_lengths = (lengths - 1) // 2 - 2, so padding cannot leak in.
    """

    def __init__(self, idim: int, odim: int, dropout: float = 0.1, max_len: int = 5000):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, odim, 3, 2), nn.ReLU(), nn.Conv2d(odim, odim, 3, 1), nn.ReLU())
        self.out = nn.Linear(odim * ((idim - 1) // 2 - 2), odim)
        self.dropout = nn.Dropout(dropout)
        pos = torch.arange(max_len)[:, None]
        freq = torch.exp(torch.arange(0, odim, 2) * (-math.log(10000.0) / odim))
        pe = torch.zeros(max_len, odim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("pe", pe, persistent=False)
        self.scale = math.sqrt(odim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x.unsqueeze(1))  # (B, 1, T, F) -> (B, C, T', F')
        b, c, t, f = h.shape
        h = self.out(h.transpose(1, 2).reshape(b, t, c * f))  # (B, T', C * F') -> (B, T', odim)
        if t > self.pe.shape[0]:
            raise ValueError(f"Conv2dSubsampling2: {t} frames exceed the positional table ({self.pe.shape[0]})")
        return self.dropout(h * self.scale + self.pe[:t]), (lengths - 1) // 2 - 2


class TransformerCTCHead(nn.Module):
    """ML-SUPERB: Linear(D -> proj), Conv2dSubsampling2 (time / 2), pre-norm Transformer
    encoder (layers x (heads, d_model, ffn)) with a final LayerNorm, Linear -> CTC log-probs.
    Returns (log_probs (B, T', V), out_lengths), T' = (T - 1) // 2 - 2."""

    min_frames = 7  # the shortest input with one fully valid subsampled frame

    def __init__(self, in_dim: int, vocab_size: int, proj: int = 80, d_model: int = 256,
                 heads: int = 8, ffn: int = 1024, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(in_dim, proj)
        self.subsample = Conv2dSubsampling2(proj, d_model, dropout)
        block = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> HeadOutput:
        _check_min_frames(self, lengths)
        h, out_lengths = self.subsample(self.proj(x), lengths)  # (B, T', d_model)
        h = self.encoder(h, src_key_padding_mask=~frame_mask(cuda.upload(out_lengths, h.device), h.shape[1]))
        return HeadOutput(self.out(h).log_softmax(-1), out_lengths)
