"""The feature store: every hidden layer of one upstream over one manifest, in Zarr v3.

Layout of ``cache/<manifest>/<upstream>.zarr`` (fairseq's .npy + .len idea, in Zarr)::

    hidden          [total_frames, L, D]  all utterances' frames concatenated, chunked on
                                          frames only: one chunk holds every layer of a run
                                          of frames, because the interface reads all layers
    index/ids       [N] str               utterance ids, in store order
    index/offsets   [N] int64             first frame of each utterance in `hidden`
    index/lengths   [N] int64             frames of each utterance
    skipped/<id>    JSON                  utterances found bad while extracting (--skip-bad)
    attrs           fingerprint (upstream, revision, manifest hash, dtype, codec, L, D, frame
                    rate, version), sample rate, chunk size, rows skipped before extraction

Crash safety. ``total_frames`` is known before running (frame arithmetic on the manifest's
sample counts), so `hidden` is preallocated and each chunk is written exactly once, whole.
Zarr's stores write a chunk atomically (local: temp file + rename; object stores: one PUT)
and empty chunks are written too, so *a chunk exists if and only if it is complete*: the set
of existing chunk keys is the done-flag set. A kill at any moment leaves whole chunks or no
chunk; a rerun recomputes exactly the missing ones. Two writers never share a chunk.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.sync import sync

from . import __version__
from .errors import FusionpipeError

FORMAT = 1
DTYPES = ("float16", "float32")
CHUNK_BYTES = 4 * 2**20  # chosen with bench/extract.py: larger chunks buy no speed and cost resume granularity

# Measured on pretrained Whisper-base fp16 activations (shared/design.md): zstd-3 1.12x at
# 620 MB/s, blosc byte-shuffle 1.12x, bit-shuffle 1.06x, lz4 1.00x; bench/extract.py re-measures.
CODECS = {
    "zstd": lambda: [ZstdCodec(level=3)],
    "blosc-zstd": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "blosc-zstd-bitshuffle": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "blosc-lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "none": lambda: None,
}
DEFAULT_CODEC = "zstd"


def chunk_span(start, stop, chunk_frames: int):
    """Chunks [lo, hi) that frames [start, stop) touch (ints or numpy arrays)."""
    return start // chunk_frames, -(-stop // chunk_frames)


def default_chunk_frames(num_layers: int, hidden_size: int, dtype: str) -> int:
    return max(1, CHUNK_BYTES // (num_layers * hidden_size * np.dtype(dtype).itemsize))


@dataclass(frozen=True)
class Layout:
    """Where each utterance lives in `hidden`, in store order."""

    ids: list[str]
    lengths: np.ndarray  # (N,) frames

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64) if len(self.ids) else np.zeros(0, np.int64)

    @property
    def total_frames(self) -> int:
        return int(self.lengths.sum())


class FeatureStore:
    """One Zarr group of stage 1's layout, opened for reading or extraction.

    >>> store = FeatureStore.open("cache/demo-train/toy-wavlm.zarr")   # doctest: +SKIP
    >>> store.read("en-m1-neutral-0001").shape                       # doctest: +SKIP
    (112, 4, 32)
    """

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        # write_empty_chunks is a runtime setting, not stored: without it an all-zero chunk (a skipped
        # utterance) would never be written and its chunk never counted as done
        self.hidden: zarr.Array = group["hidden"].with_config({"write_empty_chunks": True})
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.ids: list[str] = [str(i) for i in group["index/ids"][:]] if len(self) else []
        self.offsets: np.ndarray = group["index/offsets"][:]
        self.lengths: np.ndarray = group["index/lengths"][:]
        self.position = {u: i for i, u in enumerate(self.ids)}

    # ---- create / open -------------------------------------------------------------------
    @classmethod
    def create(cls, url: str | Path, layout: Layout, *, num_layers: int, hidden_size: int,
               dtype: str = "float16", codec: str = DEFAULT_CODEC, chunk_frames: int | None = None,
               attrs: dict | None = None, overwrite: bool = False) -> FeatureStore:
        if dtype not in DTYPES:
            raise FusionpipeError(f"dtype {dtype!r} is not supported; choose one of {DTYPES}")
        if codec not in CODECS:
            raise FusionpipeError(f"codec {codec!r} is not known; choose one of {sorted(CODECS)}")
        chunk_frames = chunk_frames or default_chunk_frames(num_layers, hidden_size, dtype)
        group = zarr.open_group(str(url), mode="w" if overwrite else "w-")
        n = len(layout.ids)
        # Zarr refuses zero-length chunks; an empty manifest still gets a valid (empty) store.
        group.create_array("index/ids", shape=(n,), chunks=(max(n, 1),), dtype=str)
        group.create_array("index/offsets", shape=(n,), chunks=(max(n, 1),), dtype="int64")
        group.create_array("index/lengths", shape=(n,), chunks=(max(n, 1),), dtype="int64")
        if n:
            group["index/ids"][:] = np.array(layout.ids, dtype=object)
            group["index/offsets"][:] = layout.offsets
            group["index/lengths"][:] = layout.lengths
        group.create_array(
            "hidden", shape=(layout.total_frames, num_layers, hidden_size), dtype=dtype,
            chunks=(chunk_frames, num_layers, hidden_size), compressors=CODECS[codec](),
            fill_value=0, config={"write_empty_chunks": True},  # chunk exists <=> chunk done
        )
        # one write of the group's metadata, last: `format` marks a store whose creation finished
        # (Attributes.update would rewrite zarr.json once per key)
        group.update_attributes({
            **(attrs or {}), "format": FORMAT, "fusionpipe_version": __version__, "dtype": dtype,
            "codec": codec, "num_layers": num_layers, "hidden_size": hidden_size,
            "chunk_frames": chunk_frames, "total_frames": layout.total_frames, "num_utterances": n,
        })
        return cls(group, str(url))

    @classmethod
    def open(cls, url: str | Path, mode: str = "r") -> FeatureStore:
        try:
            group = zarr.open_group(str(url), mode=mode)
            if "hidden" not in group or group.attrs.get("format") != FORMAT:
                raise KeyError("hidden")
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError) as e:
            raise FusionpipeError(
                f"{url} is not a fusionpipe feature store ({type(e).__name__}: {e}); make it with `fusionpipe "
                "extract` (a store whose creation was interrupted looks like this: pass --overwrite)"
            ) from None
        return cls(group, str(url))

    @staticmethod
    def exists(url: str | Path) -> bool:
        try:
            zarr.open_group(str(url), mode="r")
            return True
        except Exception:
            return False

    # ---- shape facts ---------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.attrs["num_utterances"])

    @property
    def num_layers(self) -> int:
        return int(self.attrs["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.attrs["hidden_size"])

    @property
    def chunk_frames(self) -> int:
        return int(self.attrs["chunk_frames"])

    @property
    def total_frames(self) -> int:
        return int(self.attrs["total_frames"])

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.total_frames / self.chunk_frames)

    @property
    def frame_rate(self) -> float:
        return float(self.attrs["upstream"]["frame_rate"])

    @property
    def name(self) -> str:
        return Path(self.url.rstrip("/")).stem

    # ---- done flags ----------------------------------------------------------------------
    def done_chunks(self) -> np.ndarray:
        """(num_chunks,) bool: which chunks of `hidden` are on disk (each one is whole)."""
        done = np.zeros(self.num_chunks, dtype=bool)
        prefix = f"{self.hidden.path}/c/"
        keys = sync(_list(self.group.store, prefix))
        for k in keys:
            done[int(k[len(prefix):].split("/")[0])] = True
        return done

    def done_utterances(self, done_chunks: np.ndarray | None = None) -> np.ndarray:
        """(N,) bool: utterances whose every chunk is on disk."""
        done = self.done_chunks() if done_chunks is None else done_chunks
        # prefix sums make "all chunks in [lo, hi) done" O(1) per utterance
        missing = np.concatenate([[0], np.cumsum(~done)])
        lo, hi = chunk_span(self.offsets, self.offsets + self.lengths, self.chunk_frames)
        return (missing[hi] - missing[lo]) == 0

    def is_complete(self) -> bool:
        return bool(self.done_chunks().all())

    def write_chunk(self, c: int, frames: np.ndarray) -> None:
        """Write chunk `c` whole; `frames` is (chunk_frames or fewer for the last chunk, L, D)."""
        start = c * self.chunk_frames
        self.hidden[start:start + len(frames)] = frames

    # ---- skips ---------------------------------------------------------------------------
    def skipped(self) -> dict[str, str]:
        """Utterances left out: bad before extraction (attrs) or found bad while extracting."""
        out = dict(self.attrs.get("skipped_before", {}))
        for k in sync(_list(self.group.store, _key(self.group, "skipped/"))):
            rec = json.loads(sync(self.group.store.get(k, default_buffer_prototype())).to_bytes())
            out[rec["id"]] = rec["reason"]
        return out

    def mark_skipped(self, utt_id: str, reason: str) -> None:
        buf = default_buffer_prototype().buffer.from_bytes(json.dumps({"id": utt_id, "reason": reason}).encode())
        sync(self.group.store.set(_key(self.group, f"skipped/{self.position[utt_id]}.json"), buf))

    # ---- reading -------------------------------------------------------------------------
    def read_range(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Frames [lo, hi) of `hidden` (all layers), decoded into `out` when given (no extra copy)."""
        if out is None:
            return self.hidden[lo:hi]
        self.hidden.get_basic_selection((slice(lo, hi),), out=NDBuffer.from_numpy_array(out))
        return out

    def read(self, utt_id: str) -> np.ndarray:
        """(T, L, D) frames of one utterance, in the storage dtype."""
        i = self.position.get(utt_id)
        if i is None:
            raise FusionpipeError(f"{self.url} has no utterance {utt_id!r}")
        o = int(self.offsets[i])
        return self.hidden[o:o + int(self.lengths[i])]

    def size_on_disk(self) -> int:
        return sum(sync(_sizes(self.group.store, _key(self.group, ""))))


def _key(group: zarr.Group, rel: str) -> str:
    return f"{group.path}/{rel}" if group.path else rel


async def _list(store, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


async def _sizes(store, prefix: str) -> list[int]:
    return [await store.getsize(k) async for k in store.list_prefix(prefix)]


def describe(store: FeatureStore) -> dict:
    """What `fusionpipe inspect` prints: shape, fingerprint, completeness, bytes."""
    done = store.done_chunks()
    done_utts = store.done_utterances(done)
    size = store.size_on_disk()
    seconds = store.total_frames / store.frame_rate if store.total_frames else 0.0
    skipped = store.skipped()
    return {
        "store": store.url,
        "shape": [store.total_frames, store.num_layers, store.hidden_size],
        "utterances": len(store),
        "utterances_done": int(done_utts.sum()),
        "chunks_done": f"{int(done.sum())}/{store.num_chunks}",
        "complete": bool(done.all()),
        "dtype": store.attrs["dtype"],
        "codec": store.attrs["codec"],
        "chunk_frames": store.chunk_frames,
        "size_on_disk_bytes": size,
        "bytes_per_audio_second": round(size / seconds) if seconds else None,
        "skipped": skipped,
        "upstream": store.attrs.get("upstream"),
        "manifest": store.attrs.get("manifest"),
    }


def verify(store: FeatureStore) -> list[str]:
    """Faults found: every done utterance must be readable, finite and of its indexed length."""
    faults = []
    if len(store.offsets) != len(store) or (len(store) and store.offsets[-1] + store.lengths[-1] != store.total_frames):
        faults.append("index: offsets/lengths do not tile the hidden array")
    done = store.done_chunks()
    skipped = store.skipped()
    for c in np.flatnonzero(done):
        start = int(c) * store.chunk_frames
        try:
            block = store.hidden[start:start + store.chunk_frames]
        except Exception as e:  # a corrupt chunk: zarr/codec errors vary
            faults.append(f"chunk {c} (frames {start}..): unreadable ({type(e).__name__}: {e})")
            continue
        if not np.isfinite(block).all():
            faults.append(f"chunk {c} (frames {start}..): non-finite values")
    for i in np.flatnonzero(store.done_utterances(done)):
        if store.ids[i] not in skipped and store.lengths[i] <= 0:
            faults.append(f"utterance {store.ids[i]}: zero frames")
    return faults
