"""Stage 1's plan: which manifest rows can be extracted, in store order (longest first), cut into batches.

Every row's header is read and its length held against the upstream (too short for one frame, or too long
for the memory there is) before anything runs; a bad row stops the plan, or is recorded with --skip-bad.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fusionpipe import audio
from fusionpipe.device import free_bytes
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest
from fusionpipe.store import Layout, store_order
from fusionpipe.extract.defaults import IO_THREADS
from fusionpipe.extract.upstreams import Upstream


@dataclass
class ExtractionPlan:
    """Store order and batches of one (manifest, upstream) pair."""

    rows: list[int]           # manifest rows in store order (longest first)
    layout: Layout
    batches: list[list[int]]  # positions in store order
    skipped: dict[str, str]   # id -> reason, for rows left out before extraction


def plan(manifest: Manifest, upstream: Upstream, max_seconds: float, skip_bad: bool = False) -> ExtractionPlan:
    """Check every row's header, count its frames, sort longest first, cut batches under the budget.

    The budget counts padded audio: a batch of b utterances costs b x (longest), Whisper
    utterances cost whole windows (30 s for the real models).
    """
    good, frames, skipped = [], [], {}
    with ThreadPoolExecutor(IO_THREADS) as pool:  # header reads are I/O bound
        errors = list(pool.map(lambda r: _header_error(manifest, r), range(len(manifest))))
    free = free_bytes(upstream.device)
    for row, err in enumerate(errors):
        n = 0
        if err is None:
            samples = audio.target_num_samples(manifest[row])
            n = upstream.num_frames(samples)
            err = _length_error(manifest, row, upstream, samples, n, free)
        if err is not None:
            if not skip_bad:
                raise FusionpipeError(f"{err} (or pass --skip-bad to record it and go on)")
            skipped[manifest[row].id] = str(err)
            continue
        good.append(row)
        frames.append(n)
    order = store_order([manifest[r].id for r in good], frames)
    rows = [good[i] for i in order]
    layout = Layout([manifest[r].id for r in rows], np.array([frames[i] for i in order], dtype=np.int64))

    def cost(row: int) -> float:
        seconds = audio.target_num_samples(manifest[row]) / audio.SAMPLE_RATE
        window = upstream.window_seconds
        return math.ceil(seconds / window) * window if window else seconds

    batches, current = [], []
    for pos, row in enumerate(rows):
        longest = cost(rows[current[0]]) if current else cost(row)  # sorted: the first is the longest
        if current and (len(current) + 1) * longest > max_seconds:
            batches.append(current)
            current = []
        current.append(pos)
    if current:
        batches.append(current)
    return ExtractionPlan(rows, layout, batches, skipped)


def _length_error(manifest: Manifest, row: int, upstream: Upstream, samples: int, frames: int,
                  free: int | None) -> Exception | None:
    """A row too short for one frame of the upstream, or too long to run through it in the memory there is
    (a 2-hour recording): refused here, before extraction, not by the allocator midway."""
    if frames == 0:
        return audio.BadAudio(f"{manifest.where(row)}: {manifest[row].num_samples} samples is shorter than one "
                              f"frame of {upstream.name}; remove the row")
    need = upstream.peak_bytes(samples)
    if free is not None and need > free:
        return audio.BadAudio(
            f"{manifest.where(row)}: {samples / audio.SAMPLE_RATE:,.0f} s of audio needs at least "
            f"{need / 2**30:,.1f} GiB to run through {upstream.name} in one piece, more than the "
            f"{free / 2**30:,.1f} GiB free on {upstream.device.type}; cut the recording into parts of a few "
            "minutes (e.g. `sox IN OUT trim 0 300 : newfile : restart`) and list them as rows")
    return None


def _header_error(manifest: Manifest, row: int) -> Exception | None:
    try:
        audio.check_header(manifest, row)
    except audio.BadAudio as e:
        return e
    return None
