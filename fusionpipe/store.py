"""The feature store: every hidden layer of one upstream over one manifest, in Zarr v3.

Layout of ``cache/<manifest>/<upstream>.zarr`` (fairseq's .npy + .len idea, in Zarr)::

    hidden          [total_frames, L, D]  all utterances' frames concatenated, chunked on
                                          frames only: one chunk holds every layer of a run
                                          of frames, because the interface reads all layers
    index/ids       [N] str               utterance ids, in store order
    index/offsets   [N] int64             first frame of each utterance in `hidden`
    index/lengths   [N] int64             frames of each utterance
    skipped/<id>    JSON                  utterances found bad while extracting (--skip-bad)
    error/<c>.json  JSON                  lossy codecs only: chunk c's error against the values before
                                          encoding, written before the chunk (`measured_error`)
    attrs           fingerprint (upstream, revision, manifest hash, dtype, codec, L, D, frame
                    rate, version), sample rate, chunk size, rows skipped before extraction

Crash safety. ``total_frames`` is known before running (frame arithmetic on the manifest's
sample counts), so `hidden` is preallocated and each chunk is written exactly once, whole.
Zarr's stores write a chunk atomically (local: a ``<key>.<uuid>.partial`` file renamed into
place; object stores: one PUT) and empty chunks are written too, so *a chunk's exact key exists
if and only if the chunk is complete*: those keys are the done-flag set. Anything else under
``hidden/c/`` (a ``.partial`` left by a kill) never counts and is deleted when a writer opens
the store. A kill at any moment leaves whole chunks or no chunk; a rerun recomputes exactly the
missing ones. Two writers never share a chunk (`lock`: one extraction per store at a time).

Representations. Lossless (zstd, the default, and blosc variants) or lossy (int8, int8-std08,
int8-std10, int8-std20): int8 codes whose per-(layer, channel) steps live inside each chunk, by the zarr
codec of fusionpipe/quantize.py, so everything below holds for them too. The codecs' table:
fusionpipe/codecs.py. docs/decisions.md.

Integrity. Every chunk ends in a crc32c checksum (zarr v3's codec), so a flipped bit is a read
error naming the store, the chunk and its utterances, never a different number. A chunk not
written reads as NaN (the fill value), never as plausible zeros. The index is hashed into the
attributes, so `verify` catches an edited offset or length. See docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from fusionpipe import __version__
from fusionpipe.chunks import CHUNK_BYTES, MAX_CHUNK_BYTES, chunk_span, default_chunk_frames, starts
from fusionpipe.codecs import CODECS, DEFAULT_CODEC, LOSSY, RECOMMENDED_LOSSY, compressors, serializer
from fusionpipe.errors import FusionpipeError, redact
from fusionpipe.manifest import Manifest, read_manifest
from fusionpipe.quantize import Codes, parse

FORMAT = 2           # 2: crc32c on every chunk, NaN fill, index hash; 1 (read only): neither
READABLE_FORMATS = (1, 2)
DTYPES = ("float16", "float32")
# what makes two stores' features interchangeable: these keys of the upstream that computed them
# (extraction resumes only into a store that matches them; training compares its stores by them)
FINGERPRINT = ("model_id", "revision", "num_layers", "hidden_size")


def index_hash(ids, lengths) -> str:
    """sha256 of the index (ids and frame counts; offsets follow from them), fixed at creation."""
    return hashlib.sha256(json.dumps([[str(i) for i in ids], [int(n) for n in lengths]]).encode()).hexdigest()


def check_format(dtype: str, codec: str) -> None:
    """Refuse a storage dtype or codec no store can hold, naming the flag (`extract` and `fuse --write` take
    both); `extract` calls it before its upstream loads, FeatureStore.create for every other writer."""
    if dtype not in DTYPES:
        raise FusionpipeError(f"--dtype {dtype!r}: the stores hold {' or '.join(DTYPES)} (float16 halves the cache "
                              f"and is the default; codecs such as {RECOMMENDED_LOSSY} store fewer bits)")
    if codec not in CODECS:
        raise FusionpipeError(f"--codec {codec!r} is not known; choose one of {', '.join(CODECS)}")


def local_path(url: str | Path) -> Path | None:
    """The filesystem path of a local store URL (a plain path or file://); None for object and memory stores."""
    url = str(url)
    if "://" in url and not url.startswith("file://"):
        return None
    return Path(url.removeprefix("file://"))


def need_backend(url: str) -> None:
    """Refuse a URL whose fsspec filesystem is not installed (s3:// without s3fs, http:// without aiohttp),
    naming the package, before zarr's double ImportError traceback."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("", "file", "memory"):
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        raise FusionpipeError(f"{redact(url)}: {scheme}:// stores need a package that is not installed ({e}); "
                              "install it into this environment (pip install ...), or use a local path") from None
    except ValueError:
        raise FusionpipeError(f"{redact(url)}: no filesystem knows the protocol {scheme}://; give a local path or an "
                              "fsspec URL (s3://, gs://, memory://, ...)") from None


IDENTITY = "identity_sha256"  # the attribute that holds `identity_hash` of all the others


def identity_hash(attrs: dict) -> str:
    """sha256 of a store's attributes (but this one), fixed at creation: the fingerprint, sample and frame
    rate, the rows skipped before extraction, the shape, the codec; `verify` recomputes it. Hashed as JSON,
    the form zarr keeps them in, so the attributes read back hash the same."""
    rest = {k: v for k, v in attrs.items() if k != IDENTITY}
    return hashlib.sha256(json.dumps(json.loads(json.dumps(rest)), sort_keys=True).encode()).hexdigest()


def store_order(ids, lengths) -> np.ndarray:
    """Positions of utterances `ids` of `lengths` frames in store order: longest first, ties by id (so a
    subset of a store comes in the same order, and in the same batches, as its own store would;
    docs/decisions.md)."""
    return np.array(sorted(range(len(ids)), key=lambda i: (-int(lengths[i]), ids[i])), dtype=np.int64)


@dataclass(frozen=True)
class Layout:
    """Where each utterance lives in `hidden`, in store order."""

    ids: list[str]
    lengths: np.ndarray  # (N,) frames

    @property
    def offsets(self) -> np.ndarray:
        return starts(self.lengths)

    @property
    def total_frames(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class StoreInfo:
    """What a store's attributes record, typed (`FeatureStore.info`): read these, not the raw `attrs`."""

    upstream: str                    # the upstream's name (alias, directory name, or fused-<merge>(...))
    model_id: str | None
    revision: str | None
    frame_rate: float
    manifest: str | None             # the manifest's name, content hash and path at extraction
    manifest_sha256: str | None
    manifest_path: str | None
    dtype: str                       # storage dtype and codec
    codec: str
    compute_dtype: str | None        # how the numbers were computed (None: fused or format-1 stores)
    device: str | None
    format: int
    index_sha256: str | None
    skipped_before: dict             # id -> reason, rows left out before extraction
    upstream_fingerprint: dict       # the upstream's whole fingerprint, as recorded

    @classmethod
    def from_attrs(cls, a: dict) -> StoreInfo:
        up, mf, compute = a.get("upstream") or {}, a.get("manifest") or {}, a.get("compute") or {}
        return cls(upstream=up.get("name"), model_id=up.get("model_id"), revision=up.get("revision"),
                   frame_rate=float(up.get("frame_rate") or 0.0), manifest=mf.get("name"),
                   manifest_sha256=mf.get("sha256"), manifest_path=mf.get("path"), dtype=a.get("dtype"),
                   codec=a.get("codec"), compute_dtype=compute.get("dtype"), device=compute.get("device"),
                   format=a.get("format"), index_sha256=a.get("index_sha256"),
                   skipped_before=dict(a.get("skipped_before") or {}), upstream_fingerprint=dict(up))


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
        # the array's own metadata is the one place for its shape; the attrs repeat it for readers
        # without zarr, and `verify` checks that the two agree
        self.total_frames, self.num_layers, self.hidden_size = (int(n) for n in self.hidden.shape)
        self.chunk_frames = int(self.hidden.chunks[0])
        self.attrs: dict[str, Any] = dict(group.attrs)  # raw; code reads `info`
        self.info = StoreInfo.from_attrs(self.attrs)
        self.ids: list[str] = [str(i) for i in group["index/ids"][:]] if len(self) else []
        self.offsets: np.ndarray = group["index/offsets"][:]
        self.lengths: np.ndarray = group["index/lengths"][:]
        self.position = {u: i for i, u in enumerate(self.ids)}

    # ---- create / open -------------------------------------------------------------------
    @classmethod
    def create(cls, url: str | Path, layout: Layout, *, num_layers: int, hidden_size: int,
               dtype: str = "float16", codec: str = DEFAULT_CODEC, chunk_frames: int | None = None,
               attrs: dict | None = None, overwrite: bool = False) -> FeatureStore:
        check_format(dtype, codec)
        frame_bytes = num_layers * hidden_size * np.dtype(dtype).itemsize
        if chunk_frames is not None and (not isinstance(chunk_frames, int) or isinstance(chunk_frames, bool)
                                         or not 1 <= chunk_frames <= MAX_CHUNK_BYTES // frame_bytes):
            raise FusionpipeError(
                f"--chunk-frames {chunk_frames}: give a whole number from 1 to {MAX_CHUNK_BYTES // frame_bytes} (a "
                f"chunk holds every layer of its frames, {frame_bytes:,} bytes each here, and is written and read "
                f"whole; at most {MAX_CHUNK_BYTES // 2**20} MB), or leave it out for about {CHUNK_BYTES // 2**20} MB")
        chunk_frames = chunk_frames or default_chunk_frames(num_layers, hidden_size, dtype)
        need_backend(str(url))
        try:
            return cls._create(url, layout, num_layers, hidden_size, dtype, codec, chunk_frames, attrs, overwrite)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FusionpipeError(f"{redact(str(url))}: the disk is full ({e.strerror}) while the store is created; "
                                      "free some space (or choose another --cache) and rerun with --overwrite"
                                      ) from None
            raise

    @classmethod
    def _create(cls, url, layout: Layout, num_layers: int, hidden_size: int, dtype: str, codec: str,
                chunk_frames: int, attrs: dict | None, overwrite: bool) -> FeatureStore:
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
            chunks=(chunk_frames, num_layers, hidden_size), compressors=compressors(codec),
            serializer=serializer(codec),
            # chunk exists <=> chunk done; a chunk never written reads as NaN, never as plausible zeros
            fill_value=float("nan"), config={"write_empty_chunks": True},
        )
        # one write of the group's metadata, last: `format` marks a store whose creation finished
        # (Attributes.update would rewrite zarr.json once per key)
        everything = {
            **(attrs or {}), "format": FORMAT, "fusionpipe_version": __version__, "dtype": dtype,
            "codec": codec, "num_layers": num_layers, "hidden_size": hidden_size,
            "chunk_frames": chunk_frames, "total_frames": layout.total_frames, "num_utterances": n,
            "index_sha256": index_hash(layout.ids, layout.lengths),
        }
        group.update_attributes({**everything, IDENTITY: identity_hash(everything)})
        return cls(group, str(url))

    @classmethod
    def open(cls, url: str | Path, mode: str = "r") -> FeatureStore:
        need_backend(str(url))
        try:
            group = zarr.open_group(str(url), mode=mode)
            if "hidden" not in group or group.attrs.get("format") not in READABLE_FORMATS:
                raise KeyError("hidden")
            if mode != "r" and group.attrs.get("format") != FORMAT:
                raise FusionpipeError(f"{url} is a format-{group.attrs.get('format')} store (no chunk checksums); "
                                      "it stays readable, but to add to it re-extract with --overwrite")
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError) as e:
            raise FusionpipeError(
                f"{url} is not a fusionpipe feature store ({type(e).__name__}: {e}); make it with `fusionpipe "
                "extract` (a store whose creation was interrupted looks like this: pass --overwrite)"
            ) from None
        return cls(group, str(url))

    @staticmethod
    def exists(url: str | Path) -> bool:
        need_backend(str(url))
        try:
            zarr.open_group(str(url), mode="r")
            return True
        except Exception:
            return False

    # ---- shape facts ---------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.attrs["num_utterances"])

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.total_frames / self.chunk_frames)

    @property
    def frame_rate(self) -> float:
        return self.info.frame_rate

    @property
    def name(self) -> str:
        return Path(self.url.rstrip("/")).stem

    @property
    def upstream_name(self) -> str:
        """The upstream the store holds, as reports and fused names spell it: its recorded name, else the
        store's own (a store made by hand records none)."""
        return self.info.upstream or self.name

    def __str__(self) -> str:
        return redact(self.url)

    # ---- done flags ----------------------------------------------------------------------
    def chunk_key(self, c: int) -> str:
        return f"{self.hidden.path}/c/{c}/0/0"

    def chunk_keys(self) -> tuple[np.ndarray, list[str]]:
        """(chunks whose exact key exists, every other key under hidden/c/: stray files)."""
        done = np.zeros(self.num_chunks, dtype=bool)
        prefix = f"{self.hidden.path}/c/"
        exact = re.compile(r"(\d+)/0/0")
        stray = []
        for k in sync(_list(self.group.store, prefix)):
            m = exact.fullmatch(k[len(prefix):])
            if m and int(m[1]) < self.num_chunks:
                done[int(m[1])] = True
            else:
                stray.append(k)
        return done, stray

    def done_chunks(self) -> np.ndarray:
        """(num_chunks,) bool: which chunks of `hidden` are on disk (each one is whole).

        Only a chunk's exact key counts: a ``*.partial`` file (a write killed before its rename)
        or any other stray key never marks a chunk done.
        """
        return self.chunk_keys()[0]

    def stray_keys(self) -> list[str]:
        """Keys under hidden/c/ that are not chunks (left by a killed write); `remove_stray` deletes them."""
        return self.chunk_keys()[1]

    def remove_stray(self) -> list[str]:
        """Delete the stray keys (call with the store's `lock` held: another writer's .partial is not stray)."""
        stray = self.stray_keys()
        for k in stray:
            sync(self.group.store.delete(k))
        return stray

    def delete_chunk(self, c: int) -> None:
        sync(self.group.store.delete(self.chunk_key(c)))

    def utterances_in(self, chunks) -> list[str]:
        """Ids of the utterances with frames in any of `chunks` (chunk numbers)."""
        marked = np.zeros(self.num_chunks + 1, dtype=np.int64)
        marked[np.asarray(chunks, dtype=np.int64) + 1] = 1
        count = np.cumsum(marked)  # count[c]: marked chunks before c
        lo, hi = chunk_span(self.offsets, self.offsets + self.lengths, self.chunk_frames)
        return [self.ids[i] for i in np.flatnonzero(count[hi] > count[lo])]

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
        """Write chunk `c` whole; `frames` is (chunk_frames or fewer for the last chunk, L, D).

        The chunk goes through the array's codec pipeline once, here, and its bytes are stored under
        the chunk's key as zarr itself would (same bytes, same atomic set). A lossy chunk's error is
        measured by decoding those very bytes, and recorded before the chunk exists."""
        buf = self._encode_chunk(frames)
        try:
            if self.info.codec in LOSSY:  # the record first: a chunk on disk always has its error recorded
                self._record_error(c, frames, self._decode_chunk(buf)[:len(frames)])
            self._record_placement(c, buf)
            sync(self.group.store.set(self.chunk_key(c), buf))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FusionpipeError(
                    f"{self}: the disk is full ({e.strerror}) while writing chunk {c}; free some space (or move "
                    "--cache) and rerun the same command: it resumes from the chunks already on disk"
                ) from None
            raise

    def _encode_chunk(self, frames: np.ndarray):
        """(n <= chunk_frames, L, D) -> the chunk's stored bytes; a short (last) chunk is padded with
        the fill value first, as zarr pads it."""
        pipeline, spec = codec_pipeline(self.hidden)
        if len(frames) != self.chunk_frames:
            full = np.full(spec.shape, spec.fill_value, dtype=self.hidden.dtype)
            full[:len(frames)] = frames
            frames = full
        nd = spec.prototype.nd_buffer.from_numpy_array(np.ascontiguousarray(frames, dtype=self.hidden.dtype))
        (buf,) = sync(pipeline.encode([(nd, spec)]))
        return buf

    def _decode_chunk(self, buf) -> np.ndarray:
        pipeline, spec = codec_pipeline(self.hidden)
        (nd,) = sync(pipeline.decode([(buf, spec)]))
        return nd.as_numpy_array()

    def _record_placement(self, c: int, buf) -> None:
        """``placement/<c>.json``: chunk c's position and its checksum (the crc32c its bytes end in), written
        before the chunk. The checksum proves a chunk's bytes whole, not their place: this record is what
        tells a chunk moved or copied from another position (`placement_fault`)."""
        self._put_record(f"placement/{c}.json", {"chunk": c, "crc32c": int.from_bytes(buf.to_bytes()[-4:], "little")})

    def placement_records(self) -> dict[int, dict]:
        """{chunk: its placement record} of every record on disk (one listing and a small read each)."""
        out = {}
        for k in self._record_keys("placement/"):
            try:
                out[int(k.rsplit("/", 1)[1].removesuffix(".json"))] = self._get_record(k)
            except (ValueError, AttributeError):
                out[-1] = {"bad": k}
        return out

    def chunk_crc(self, c: int) -> int | None:
        """The crc32c chunk c's stored bytes end in (its last 4 bytes, one ranged read), or None if it is
        not on disk."""
        buf = sync(self.group.store.get(self.chunk_key(c), default_buffer_prototype(), SuffixByteRequest(4)))
        return None if buf is None else int.from_bytes(buf.to_bytes(), "little")

    def _record_error(self, c: int, frames: np.ndarray, decoded: np.ndarray) -> None:
        """Error of chunk `c` (`decoded` from its bytes) against the values given, per layer, as
        `error/<c>.json`. Encoding is deterministic, so a chunk rewritten on resume rewrites the same record."""
        x = np.asarray(frames, np.float32)
        err = decoded.astype(np.float32) - x  # float32 differences, float64 sums
        rec = {"chunk": c, "frames": len(x), "sum_sq_error": _sum_sq(err), "sum_sq": _sum_sq(x),
               "max_abs_error": np.abs(err).max(axis=(0, 2)).tolist() if len(x) else [0.0] * x.shape[1]}
        self._put_record(f"error/{c}.json", rec)

    def measured_error(self, done_chunks: np.ndarray | None = None) -> dict | None:
        """The encoding error of a lossy store, measured by the writer against the unencoded values,
        over the chunks on disk: per layer ||decoded - x|| / ||x|| and max |decoded - x|. None if lossless."""
        if self.info.codec not in LOSSY:
            return None
        done = self.done_chunks() if done_chunks is None else done_chunks
        L = self.num_layers
        sse, ss, mx, counted = np.zeros(L), np.zeros(L), np.zeros(L), 0
        for rec in map(self._get_record, self._record_keys("error/")):
            if rec["chunk"] < len(done) and done[rec["chunk"]]:
                sse += rec["sum_sq_error"]
                ss += rec["sum_sq"]
                mx = np.maximum(mx, rec["max_abs_error"])
                counted += 1
        rel = np.sqrt(sse / np.where(ss > 0, ss, 1))
        return {"relative_error_per_layer": [round(float(r), 5) for r in rel],
                "relative_error_mean": round(float(rel.mean()), 5), "relative_error_max": round(float(rel.max()), 5),
                "max_abs_error_per_layer": [round(float(m), 4) for m in mx],
                "chunks_measured": f"{counted}/{int(done.sum())}"}

    def hidden_bytes(self, sizes: dict[str, int] | None = None) -> int:
        """Bytes of the chunks of `hidden` on disk (from `sizes`, a `key_sizes()` listing, when given)."""
        prefix = f"{self.hidden.path}/c/"
        sizes = sync(_sizes(self.group.store, prefix)) if sizes is None else sizes
        return sum(n for k, n in sizes.items() if k.startswith(prefix))

    # ---- skips ---------------------------------------------------------------------------
    def skipped(self) -> dict[str, str]:
        """Utterances left out: bad before extraction (attrs) or found bad while extracting."""
        out = dict(self.info.skipped_before)
        for rec in map(self._get_record, self._record_keys("skipped/")):
            out[rec["id"]] = rec["reason"]
        return out

    def mark_skipped(self, utt_id: str, reason: str) -> None:
        self._put_record(f"skipped/{self.position[utt_id]}.json", {"id": utt_id, "reason": reason})

    # ---- the small JSON records beside the chunks (skipped/, error/, placement/) ---------------
    def _put_record(self, rel: str, record: dict) -> None:
        buf = default_buffer_prototype().buffer.from_bytes(json.dumps(record).encode())
        sync(self.group.store.set(_key(self.group, rel), buf))

    def _record_keys(self, folder: str) -> list[str]:
        return sync(_list(self.group.store, _key(self.group, folder)))

    def _get_record(self, key: str) -> dict:
        return json.loads(sync(self.group.store.get(key, default_buffer_prototype())).to_bytes())

    # ---- reading -------------------------------------------------------------------------
    def read_range(self, lo: int, hi: int) -> np.ndarray:
        """Frames [lo, hi) of `hidden` (all layers). A chunk that fails its checksum or cannot be
        decoded is an error naming the store, the chunk and its utterances."""
        try:
            return self.hidden[lo:hi]
        except Exception:  # codec errors vary (checksum ValueError, zstd RuntimeError, ...): find the chunk
            self._raise_corrupt(lo, hi)
            raise

    def read_codes(self, lo: int, hi: int) -> Codes:
        """Frames [lo, hi) of a lossy store, not expanded (`quantize.Codes`, expanded where the values are
        used): the chunks' checksums are checked and zstd undone here, as `read_range` does."""
        if self.info.codec not in LOSSY:
            raise ValueError(f"{self} is stored {self.info.codec}: only a lossy store has codes")
        first, last = chunk_span(lo, hi, self.chunk_frames)
        shape = (self.chunk_frames, self.num_layers, self.hidden_size)
        deltas = np.zeros((last - first, *shape), np.uint8)
        steps = np.empty((last - first, *shape[1:]), np.float32)
        try:
            for i, payload in enumerate(sync(self._payloads(range(first, last)))):
                valid, steps[i], codes = parse(payload.as_numpy_array(), shape)
                deltas[i, :valid] = codes
        except Exception:
            self._raise_corrupt(lo, hi)
            raise
        return Codes(torch.from_numpy(deltas), torch.from_numpy(steps), lo - first * self.chunk_frames, hi - lo,
                     self.hidden.metadata.codecs[0].predict_layers, getattr(torch, str(self.hidden.dtype)))

    async def _payloads(self, chunks) -> list:
        """The chunks' bytes with the bytes->bytes codecs undone (checksum checked, zstd decompressed)."""
        (pipeline, spec), prototype = codec_pipeline(self.hidden), default_buffer_prototype()
        data = await asyncio.gather(*(self.group.store.get(self.chunk_key(c), prototype) for c in chunks))
        if any(d is None for d in data):
            raise KeyError("a chunk is missing")
        for codec in pipeline.bytes_bytes_codecs[::-1]:
            data = await codec.decode([(d, spec) for d in data])
        return list(data)

    def _raise_corrupt(self, lo: int, hi: int) -> None:
        """Raise the error naming the first bad chunk of frames [lo, hi), if one is."""
        first, last = chunk_span(lo, hi, self.chunk_frames)
        for c in range(first, last):
            why = self.chunk_fault(c)
            if why:
                raise FusionpipeError(
                    f"{self} chunk {c} (frames {c * self.chunk_frames}..) is corrupt ({why}); it holds "
                    f"{list_ids(self.utterances_in([c]))}. Run `fusionpipe verify --repair {self}` to delete "
                    "the bad chunks, then rerun `fusionpipe extract` to recompute exactly them"
                ) from None

    def chunk_fault(self, c: int) -> str | None:
        """Why chunk `c` cannot be used (unreadable, failed checksum, non-finite values), or None."""
        start = c * self.chunk_frames
        try:
            block = self.hidden[start:start + self.chunk_frames]
        except Exception as e:
            return f"unreadable: {type(e).__name__}: {e}"
        return None if np.isfinite(block).all() else "non-finite values"

    def read(self, utt_id: str) -> np.ndarray:
        """(T, L, D) frames of one utterance, in the storage dtype."""
        i = self.position.get(utt_id)
        if i is None:
            raise FusionpipeError(f"{self} has no utterance {utt_id!r}")
        o = int(self.offsets[i])
        return self.read_range(o, o + int(self.lengths[i]))

    def recorded_manifest(self) -> Manifest | None:
        """The manifest this store was extracted from (labels live there), or None when it is gone
        or its rows changed since (checked by content hash)."""
        path = self.info.manifest_path
        if not path or not Path(path).is_file():
            return None
        m = read_manifest(path)
        return m if m.content_hash() == self.info.manifest_sha256 else None

    def key_sizes(self) -> dict[str, int]:
        """Every key of the store and its bytes (one listing: on an object store, a request per key)."""
        return sync(_sizes(self.group.store, _key(self.group, "")))

    def size_on_disk(self) -> int:
        return sum(self.key_sizes().values())


def codec_pipeline(array: zarr.Array):
    """(the codec pipeline of `array`, the spec of its chunks): what encodes and decodes a chunk whole, as zarr
    itself does. zarr has no public API for this; this is the one place its private one is reached, so a
    zarr upgrade that changes it fails here, with the versions named (tests/test_storage.py runs it)."""
    try:
        a = array._async_array
        pipeline, spec = a.codec_pipeline, a.metadata.get_chunk_spec((0,) * array.ndim, a.config,
                                                                      default_buffer_prototype())
        for method in ("encode", "decode"):
            getattr(pipeline, method)
        pipeline.bytes_bytes_codecs  # noqa: B018  (read_codes undoes these itself)
    except (AttributeError, TypeError) as e:
        raise RuntimeError(
            f"zarr {zarr.__version__} changed the private API fusionpipe uses to encode and decode whole chunks "
            f"({type(e).__name__}: {e}); fusionpipe/store.py `codec_pipeline` must follow it, or install the zarr "
            "version pyproject.toml was tested with") from e
    return pipeline, spec


def _sum_sq(x: np.ndarray) -> list[float]:
    """Per layer sum of squares of a (T, L, D) block, accumulated in float64."""
    return np.einsum("tld,tld->l", x, x, dtype=np.float64).tolist()


def _key(group: zarr.Group, rel: str) -> str:
    return f"{group.path}/{rel}" if group.path else rel


async def _list(store, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


async def _sizes(store, prefix: str) -> dict[str, int]:
    return {k: await store.getsize(k) async for k in store.list_prefix(prefix)}


def list_ids(ids: list[str], show: int = 5) -> str:
    """A message's list of utterance ids: the first few and how many more."""
    return ", ".join(ids[:show]) + (f" and {len(ids) - show} more" if len(ids) > show else "") if ids else "no utterance"
