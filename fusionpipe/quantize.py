"""Lossy chunk codecs for the feature store: int8 codes with their scales inside the chunk.

    >>> import numpy as np, zarr, fusionpipe.store                       # registers the codec
    >>> a = zarr.create_array({}, shape=(600, 7, 512), chunks=(600, 7, 512), dtype="float16",
    ...                       serializer=Quantize(step=0.1, predict_layers=True))   # doctest: +SKIP

`Quantize` is a zarr v3 array->bytes codec (it takes the place of zarr's ``bytes`` codec, so
zstd and the crc32c checksum still follow it). A chunk (T, L, D) of float16/32 becomes::

    b"FPQ1"  uint32 valid_frames          leading frames that are finite (the rest: zarr's NaN padding)
    float32  step[L, D]                   one quantisation step per (layer, channel), this chunk only
    int8     codes[valid_frames, L, D]    stored as differences along frames, mod 256

so a chunk carries its own scales: it is whole or absent, and the checksum covers the scales.
Encoding is a pure numpy function of the chunk (no state, no threads): a rerun writes the same
bytes. Decoding happens wherever zarr decodes (any reader that imported fusionpipe.store).

Two ways to pick the step, measured on real Whisper-base activations (docs/decisions.md):
- ``step=None``: symmetric int8, step = max|x| / 127 per (layer, channel): the classic int8.
- ``step=k``: step = k * std of the channel over the chunk's frames, widened where needed so the
  codes fit int8 (outlier channels, |x| up to 350, keep their own range). The error is then
  about k / sqrt(12) of each channel's spread, whatever its scale.
``predict_layers``: layer l is coded as its difference from the *decoded* layer l-1 (closed loop,
so errors do not accumulate): the residual stream makes that difference smaller than the layer.
The frame differences of the codes are exact (integers mod 256): they cost nothing in error and
make the codes peaked around 0, which zstd's entropy stage turns into bytes saved.

Expanding on the GPU. `parse` splits a chunk into its steps and codes without expanding them and
`expand` (torch, any device) is the decoder's arithmetic: the loader hands a GPU trainer the codes
(`Codes`, 1 byte a value against 4 for the float32 batch) and the GPU expands them, to the same numbers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec

MAGIC = b"FPQ1"
NAME = "fusionpipe.quantize"


def encode(x: np.ndarray, step: float | None, predict_layers: bool) -> bytes:
    """(T, L, D) float chunk -> the codec's bytes (header, steps, frame-differenced int8 codes)."""
    valid = _valid_frames(x)
    x = np.asarray(x[:valid], dtype=np.float32)
    T, L, D = x.shape
    steps = np.empty((L, D), np.float32)
    codes = np.empty((T, L, D), np.int8)
    prev = np.zeros((T, D), np.float32)
    spread = x.std(axis=0) if step is not None and T else None  # (L, D)
    for layer in range(L):
        residual = x[:, layer] - prev if predict_layers else x[:, layer]
        widest = np.abs(residual).max(axis=0) / 127 if T else np.zeros(D, np.float32)
        s = widest if step is None else np.maximum(np.float32(step) * spread[layer], widest)
        s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
        q = np.clip(np.rint(residual / s), -127, 127).astype(np.int8)
        steps[layer], codes[:, layer] = s, q
        if predict_layers:
            prev = prev + q.astype(np.float32) * s  # exactly what `decode` computes
    u = codes.view(np.uint8)
    u = np.concatenate([u[:1], u[1:] - u[:-1]]) if T else u  # uint8 arithmetic wraps: mod 256
    return MAGIC + struct.pack("<I", valid) + steps.tobytes() + u.tobytes()


def parse(data: bytes | memoryview, shape: tuple[int, int, int]) -> tuple[int, np.ndarray, np.ndarray]:
    """The codec's bytes of a (T, L, D) chunk -> (valid frames, steps (L, D) float32, the frame-differenced
    codes (valid, L, D) uint8): views into `data`, nothing expanded (what crosses to a GPU, `Codes`)."""
    T, L, D = shape
    data = memoryview(data)
    if bytes(data[:4]) != MAGIC:
        raise ValueError(f"not a {NAME} chunk (magic {bytes(data[:4])!r})")
    (valid,) = struct.unpack("<I", data[4:8])
    if valid > T or len(data) != 8 + 4 * L * D + valid * L * D:
        raise ValueError(f"{NAME} chunk of {len(data)} bytes does not hold {valid} frames of ({L}, {D})")
    steps = np.frombuffer(data, np.float32, L * D, 8).reshape(L, D)
    deltas = np.frombuffer(data, np.uint8, valid * L * D, 8 + 4 * L * D).reshape(valid, L, D)
    return valid, steps, deltas


def expand(deltas: torch.Tensor, steps: torch.Tensor, predict_layers: bool) -> torch.Tensor:
    """Frame-differenced codes (..., T, L, D) uint8 and their steps (..., L, D) -> float32 values (..., T, L, D),
    on whatever device the tensors are on: the one implementation of the decoder's arithmetic, so a GPU
    expands a chunk to exactly the numbers `decode` gives (the same float32 operations in the same order
    as `encode`'s closed loop)."""
    codes = torch.cumsum(deltas, dim=-3, dtype=torch.uint8).view(torch.int8)  # uint8 sums wrap: mod 256
    values = torch.mul(codes, steps.unsqueeze(-3))  # int8 x float32 -> float32, one pass
    if predict_layers:
        for layer in range(1, values.shape[-2]):
            values[..., layer, :].add_(values[..., layer - 1, :])
    return values


def decode(data: bytes | memoryview, shape: tuple[int, int, int], dtype, fill_value=np.nan,
           predict_layers: bool = False) -> np.ndarray:
    """The codec's bytes -> (T, L, D) array of `dtype`; frames past the valid ones are `fill_value`."""
    valid, steps, deltas = parse(data, shape)
    out = np.empty(shape, dtype=dtype)
    out[valid:] = fill_value
    if valid:
        torch.from_numpy(out[:valid]).copy_(expand(_tensor(deltas), _tensor(steps), predict_layers))
    return out


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # torch refuses read-only memory


def _valid_frames(x: np.ndarray) -> int:
    """Leading frames of a chunk that are finite: zarr pads the last chunk of an array with the fill
    value (NaN). NaN anywhere else is not something a quantiser can keep: refuse it."""
    finite = np.isfinite(x).reshape(len(x), -1)
    rows = finite.all(axis=1)
    valid = len(x) if rows.all() else int(np.argmin(rows))
    if finite[valid:].any():
        raise ValueError(f"{NAME}: non-finite values inside a chunk (frame {valid}); only trailing padding may be NaN")
    return valid


@dataclass(frozen=True)
class Quantize(ArrayBytesCodec):
    """zarr v3 array->bytes codec: (T, L, D) floats <-> int8 codes + per-(layer, channel) steps."""

    step: float | None = None
    predict_layers: bool = False
    is_fixed_size = False

    def __init__(self, *, step: float | None = None, predict_layers: bool = False) -> None:
        object.__setattr__(self, "step", None if step is None else float(step))
        object.__setattr__(self, "predict_layers", bool(predict_layers))

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, config = parse_named_configuration(data, NAME, require_configuration=False)
        return cls(**(config or {}))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        return {"name": NAME, "configuration": {"step": self.step, "predict_layers": self.predict_layers}}

    def validate(self, *, shape, dtype, chunk_grid) -> None:
        if len(shape) != 3 or dtype.to_native_dtype().kind != "f":
            raise ValueError(f"{NAME} codes (frames, layers, channels) float arrays, not {len(shape)}-d "
                             f"{dtype.to_native_dtype()}")

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        dtype = chunk_spec.dtype.to_native_dtype()
        out = decode(chunk_bytes.as_numpy_array(), chunk_spec.shape, dtype, chunk_spec.fill_value,
                     self.predict_layers)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(out)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = encode(chunk_array.as_numpy_array(), self.step, self.predict_layers)
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError(f"{NAME} chunks vary in size")


register_codec(NAME, Quantize)


@dataclass
class Codes:
    """Frames [start, start + frames) of a run of n consecutive chunks, not expanded: what a GPU trainer
    receives instead of float32 (`FeatureStore.read_codes`). ``deltas`` (n, chunk_frames, L, D) uint8,
    zero past each chunk's valid frames; ``steps`` (n, L, D) float32; ``dtype`` the store's (the values
    are rounded to it, as reading the store gives them)."""

    deltas: torch.Tensor
    steps: torch.Tensor
    start: int
    frames: int
    predict_layers: bool
    dtype: torch.dtype

    def to(self, device, non_blocking: bool = False) -> Codes:
        return Codes(self.deltas.to(device, non_blocking=non_blocking), self.steps.to(device, non_blocking=non_blocking),
                     self.start, self.frames, self.predict_layers, self.dtype)

    def expand(self) -> torch.Tensor:
        """(frames, L, D) values in the store's dtype, on the tensors' device."""
        n, cf, L, D = self.deltas.shape
        values = expand(self.deltas, self.steps, self.predict_layers).view(n * cf, L, D)
        return values[self.start:self.start + self.frames].to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.deltas.nbytes + self.steps.nbytes
