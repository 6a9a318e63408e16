"""A feature store's integrity: what `fusionpipe inspect` and `fusionpipe verify` say about it.

(Named for what it checks: `verify` in the train room is the speaker-verification task.)

`describe`: shape, fingerprint, completeness, bytes per audio-second, the ratio to float16 and a lossy
store's measured error. `verify`: every fault of a store, checked against what it records about itself:
the metadata against the array, the index against its hash, every expected chunk (present, passes its
crc32c, finite); ``repair`` deletes what a rerun of `fusionpipe extract` recomputes. docs/reliability.md.
"""

from __future__ import annotations

import numpy as np

from fusionpipe.chunks import starts
from fusionpipe.codecs import CODECS, LOSSY, compressors, serializer
from fusionpipe.store import FORMAT, IDENTITY, FeatureStore, identity_hash, index_hash, list_ids


def describe(store: FeatureStore) -> dict:
    """What `fusionpipe inspect` prints: shape, fingerprint, completeness, bytes."""
    done = store.done_chunks()
    done_utts = store.done_utterances(done)
    sizes = store.key_sizes()  # listed once: the total and the chunks of `hidden` both come from it
    size = sum(sizes.values())
    seconds = store.total_frames / store.frame_rate if store.total_frames else 0.0
    skipped = store.skipped()
    first = np.flatnonzero(done) * store.chunk_frames
    done_frames = int((np.minimum(first + store.chunk_frames, store.total_frames) - first).sum())
    fp16 = done_frames * store.num_layers * store.hidden_size * 2
    return {
        "store": str(store),
        "format": store.info.format,
        "shape": [store.total_frames, store.num_layers, store.hidden_size],
        "utterances": len(store),
        "utterances_done": int(done_utts.sum()),
        "chunks_done": f"{int(done.sum())}/{store.num_chunks}",
        "complete": bool(done.all()),
        "dtype": store.info.dtype,
        "codec": store.info.codec,
        "compute": store.attrs.get("compute"),
        "chunk_frames": store.chunk_frames,
        "size_on_disk_bytes": size,
        "bytes_per_audio_second": round(size / seconds) if seconds else None,
        # the chunks on disk against the same frames as raw float16 (the cache's unit of cost)
        "ratio_to_float16": round(store.hidden_bytes(sizes) / fp16, 4) if fp16 else None,
        "measured_error": store.measured_error(done),
        "skipped": skipped,
        "upstream": store.attrs.get("upstream"),
        "manifest": store.attrs.get("manifest"),
    }


def check_store(store: FeatureStore, repair: bool = False) -> list[str]:
    """Every fault of a store: metadata against the fingerprint, the index, every expected chunk.

    Each chunk must exist (missing ones are reported, with their utterances), decode (checksum),
    and hold finite values. ``repair`` deletes the bad chunks and stray keys so that a rerun of
    `fusionpipe extract` recomputes exactly them; faults of the metadata or the index are not
    repairable that way (they need --overwrite) and are only reported.
    """
    faults = _metadata_faults(store) + _index_faults(store)
    if faults:  # chunk positions mean nothing under a wrong shape or index
        return faults
    done, stray = store.chunk_keys()
    faults += [f"stray key {k} (a write killed before its rename)" for k in stray]
    missing = np.flatnonzero(~done)
    if len(missing):
        faults.append(f"{len(missing)} of {store.num_chunks} chunks missing (chunks {_ranges(missing)}): "
                      f"{list_ids(store.utterances_in(missing))} not extracted yet; rerun `fusionpipe extract`")
    bad = []
    records = store.placement_records()
    written_at = {}  # crc32c -> the chunks whose record holds it: where a misplaced chunk came from
    for c, rec in records.items():
        written_at.setdefault(rec.get("crc32c"), []).append(c)
    for c in np.flatnonzero(done):
        why = store.chunk_fault(int(c)) or (_placement_fault(store, int(c), records, written_at) if records else None)
        if why:
            bad.append(int(c))
            faults.append(f"chunk {c} (frames {int(c) * store.chunk_frames}..): {why}; it holds "
                          f"{list_ids(store.utterances_in([c]))}")
    if repair:
        for c in bad:
            store.delete_chunk(c)
        store.remove_stray()
    return faults


def _placement_fault(store: FeatureStore, c: int, records: dict, written_at: dict) -> str | None:
    """Why chunk c's bytes are not the chunk written at position c, or None. The crc32c a chunk ends in
    proves its bytes whole wherever they lie; the placement record written with it says where it belongs."""
    rec = records.get(c)
    if rec is None or rec.get("chunk") != c:
        return "no placement record for this position (deleted, or moved from another position)"
    crc = store.chunk_crc(c)
    if crc == rec.get("crc32c"):
        return None
    origin = [o for o in written_at.get(crc, []) if o != c]
    return ("misplaced: its bytes are not the chunk written here"
            + (f" but chunk {origin[0]}'s (moved or copied from there)" if origin else " (replaced)"))


def _metadata_faults(store: FeatureStore) -> list[str]:
    a, h = store.attrs, store.hidden
    faults = []
    if IDENTITY in a and a[IDENTITY] != identity_hash(a):
        faults.append("metadata: the attributes differ from those recorded at creation (identity_sha256 covers the "
                      "fingerprint, sample and frame rate, the rows skipped before extraction, shape and codec); "
                      "restore zarr.json, or re-extract with --overwrite")
    for key, actual in (("total_frames", store.total_frames), ("num_layers", store.num_layers),
                        ("hidden_size", store.hidden_size), ("chunk_frames", store.chunk_frames),
                        ("dtype", str(h.dtype)), ("num_utterances", len(store.ids))):
        if a.get(key) != actual:
            faults.append(f"metadata: attribute {key}={a.get(key)!r} but the array says {actual!r}")
    up = a.get("upstream") or {}
    for key in ("num_layers", "hidden_size"):
        if key in up and up[key] != a.get(key):
            faults.append(f"metadata: upstream {key}={up[key]!r} but the store has {a.get(key)!r}")
    if a.get("codec") in CODECS and a.get("format") == FORMAT:
        want = [c.to_dict() for c in compressors(a["codec"])]
        have = [c.to_dict() for c in h.compressors]
        if want != have:
            faults.append(f"metadata: codec {a['codec']!r} but the chunks are encoded with {have}")
        if a["codec"] in LOSSY and h.serializer.to_dict() != serializer(a["codec"]).to_dict():
            faults.append(f"metadata: codec {a['codec']!r} but the chunks are serialized with "
                          f"{h.serializer.to_dict()}")
    elif a.get("codec") not in CODECS:
        faults.append(f"metadata: codec {a.get('codec')!r} is not known")
    return faults


def _index_faults(store: FeatureStore) -> list[str]:
    ids, offsets, lengths = store.ids, store.offsets, store.lengths
    faults = []
    if not (len(ids) == len(offsets) == len(lengths) == len(store)):
        return [f"index: {len(ids)} ids, {len(offsets)} offsets, {len(lengths)} lengths for {len(store)} utterances"]
    if len(set(ids)) != len(ids):
        faults.append("index: duplicate utterance ids")
    expect = starts(lengths)
    if (lengths < 0).any() or not np.array_equal(offsets, expect) or int(lengths.sum()) != store.total_frames:
        bad = np.flatnonzero(offsets != expect)
        faults.append(f"index: offsets/lengths do not tile the {store.total_frames} frames of the hidden array"
                      + (f" (first mismatch at utterance {ids[bad[0]]})" if len(bad) else ""))
    recorded = store.info.index_sha256
    if recorded is not None and recorded != index_hash(ids, lengths):
        faults.append("index: ids or frame counts differ from those recorded at extraction (index_sha256)")
    skipped = store.skipped()
    for i in np.flatnonzero(lengths <= 0):
        if ids[i] not in skipped:
            faults.append(f"utterance {ids[i]}: zero frames")
    return faults


def _ranges(cs: np.ndarray, show: int = 5) -> str:
    """[1,2,3,7] -> '1-3, 7'."""
    runs = np.split(cs, np.flatnonzero(np.diff(cs) != 1) + 1)
    text = [f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs[:show]]
    return ", ".join(text) + (" ..." if len(runs) > show else "")
