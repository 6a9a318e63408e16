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
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
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


def decode(data: bytes | memoryview, shape: tuple[int, int, int], dtype, fill_value=np.nan,
           predict_layers: bool = False) -> np.ndarray:
    """The codec's bytes -> (T, L, D) array of `dtype`; frames past the valid ones are `fill_value`."""
    T, L, D = shape
    data = memoryview(data)
    if bytes(data[:4]) != MAGIC:
        raise ValueError(f"not a {NAME} chunk (magic {bytes(data[:4])!r})")
    (valid,) = struct.unpack("<I", data[4:8])
    if valid > T or len(data) != 8 + 4 * L * D + valid * L * D:
        raise ValueError(f"{NAME} chunk of {len(data)} bytes does not hold {valid} frames of ({L}, {D})")
    steps = np.frombuffer(data, np.float32, L * D, 8).reshape(L, D)
    codes = np.frombuffer(data, np.uint8, valid * L * D, 8 + 4 * L * D).reshape(valid, L * D).copy()
    for t in range(1, valid):  # undo the frame differences (mod 256); 7x faster than np.cumsum(axis=0)
        np.add(codes[t], codes[t - 1], out=codes[t])
    codes = codes.view(np.int8).reshape(valid, L, D)
    out = np.full(shape, fill_value, dtype=dtype)
    values = np.empty((valid, L, D), np.float32)
    for layer in range(L):
        np.multiply(codes[:, layer], steps[layer], out=values[:, layer], dtype=np.float32)
        if predict_layers and layer:  # the same float32 additions, in the same order, as `encode`
            np.add(values[:, layer], values[:, layer - 1], out=values[:, layer])
    out[:valid] = values
    return out


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

    def roundtrip(self, x: np.ndarray) -> np.ndarray:
        """What reading `x` back after writing it gives (the writer measures its error with this)."""
        return decode(encode(x, self.step, self.predict_layers), x.shape, x.dtype, np.nan, self.predict_layers)


register_codec(NAME, Quantize)
