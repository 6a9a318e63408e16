"""Torch Dataset and DataLoader over a fused view: what stage 3 reads.

    >>> loader = make_loader(["cache/demo-train/toy-wavlm.zarr", "cache/demo-train/toy-whisper.zarr"],
    ...                      max_frames=4000, shuffle=True)                      # doctest: +SKIP
    >>> batch = next(iter(loader))                                               # doctest: +SKIP
    >>> [s.shape for s in batch["stacks"]], batch["lengths"][:2]                 # doctest: +SKIP
    ([torch.Size([29, 4, 138, 32]), torch.Size([29, 4, 138, 40])], tensor([138, 137]))

A batch is a dict:
    ids      list[str] (B)
    stacks   list[FloatTensor (B, L, T, D_i)], one per store: aligned to the common (L, T) but NOT
             merged (stage 3 merges with learned projections), zero past each length
    lengths  LongTensor (B,): frames of each utterance at the common T
    rows     list[Utterance] (B): the manifest rows (text, label, speaker, language), joined by id

Reading order. Every store keeps its utterances longest first, so neighbours in a store are
neighbours in length. BucketBatchSampler cuts batches out of that order: each batch is a length
bucket for free and one contiguous read per store, so each chunk is decoded about once. It
shuffles by moving the cut points (a random phase each epoch) and the order of the batches, the
fixed-sorted-batches scheme of ESPnet's samplers. Shuffling utterances across the corpus would
decode about one extra chunk per utterance (1.3x the bytes for 12 s utterances at the 4 MB chunk,
about 3x for 2 s ones).

Threads before processes. With num_workers=0 the next `prefetch` batches are built by a thread of
the trainer's process (Zarr's decoding and torch's copies release the GIL). Worker processes hand
every batch over through shared memory, one more copy of it (bench/fuse.py): use them when one
process cannot keep up. Zarr 3 runs an asyncio event loop in a thread, so opened stores never
cross a fork: the dataset pickles only its ViewSpec (store URLs, options, ids), each worker
reopens the stores on first use, and workers start with "spawn".
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import warnings
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from fusionpipe import shm
from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse.view import FusedView, ViewSpec, open_fused
from fusionpipe.manifest import Manifest, Utterance, check_subset, read_manifest
from fusionpipe.codecs import LOSSY
from fusionpipe.store import FeatureStore, list_ids


class PaddedItems(list):
    """What FusedDataset.__getitems__ returns: the items of one batch (id, [(L, T, D_i) views]),
    already laid out in the padded batch tensors that `collate` hands on without a copy."""

    def __init__(self, ids: list[str], stacks: list[torch.Tensor], lengths: torch.Tensor,
                 rows: list[Utterance] | None):
        # a CompactStack is the whole batch's (expanded on the device by the trainer), not sliced per item
        super().__init__((u, [s[b, :, :int(lengths[b])] if isinstance(s, torch.Tensor) else s for s in stacks])
                         for b, u in enumerate(ids))
        self.ids, self.stacks, self.lengths, self.rows = ids, stacks, lengths, rows
        self.slot = None  # (slot, layout) when a worker built the batch in shared memory (SharedSlots)


class FusedDataset(Dataset):
    """Item i -> (id, [FloatTensor (L, T, D_i)] per store, aligned, unmerged).

    Holds a ViewSpec and opens the stores lazily in whichever process reads.
    """

    def __init__(self, view: FusedView | ViewSpec, rows: list[Utterance] | None = None, compact: bool = False,
                 slots: SharedSlots | None = None):
        self.spec = view.spec if isinstance(view, FusedView) else view
        self.compact = compact  # lossy stores' stacks as CompactStack (`FusedView.read_compact`)
        self.slots = slots  # worker processes build batches in these (make_loader with num_workers)
        self._view = view if isinstance(view, FusedView) else None
        self.rows = rows  # manifest rows in dataset order, or None
        if rows is not None and len(rows) != len(self.spec.ids):
            raise ValueError(f"{len(rows)} rows for {len(self.spec.ids)} utterances")

    def __getstate__(self):
        return {**self.__dict__, "_view": None}

    @property
    def view(self) -> FusedView:
        if self._view is None:
            self._view = FusedView.from_spec(self.spec)
        return self._view

    def __len__(self) -> int:
        return len(self.spec.ids)

    def __getitem__(self, i: int) -> tuple[str, list[torch.Tensor]]:
        return self.spec.ids[i], [s[0] for s in self.view.read_stacks([i])]

    def __getitems__(self, indices: list[int]) -> PaddedItems:
        frames = self.view.lengths[np.asarray(indices, dtype=np.int64)]
        lengths = torch.from_numpy(frames)
        slot = self._slot(len(indices) * int(frames.max(initial=0)))
        try:
            read = self.view.read_compact if self.compact else self.view.read_stacks
            stacks = read(indices, empty=slot and slot.empty)
        except BaseException:
            if slot:
                self.slots.release(slot.k)
            raise
        rows = [self.rows[i] for i in indices] if self.rows is not None else None
        items = PaddedItems([self.spec.ids[i] for i in indices], stacks, lengths, rows)
        items.slot = slot and (slot.k, slot.layout)
        return items

    def _slot(self, frames: int) -> _Slot | None:
        """In a worker process: a free shared-memory slot of this worker that holds `frames` padded frames of
        the float32 stacks (`slot_dims`: a compact batch's lossy stacks travel as codes, outside it)."""
        info = get_worker_info()
        if self.slots is None or info is None:
            return None
        return self.slots.claim(info.id, frames * self.view.num_layers * sum(slot_dims(self.view, self.compact)) * 4)


def collate(items: list[tuple[str, list[torch.Tensor]]], rows: dict[str, Utterance] | None = None) -> dict:
    """Items -> the batch dict (module docstring). Rows come with PaddedItems, else from ``rows`` by id.
    A batch a worker built in a shared slot travels as the slot's number and layout, not as tensors
    (FusedLoader turns it back into the stacks, in place)."""
    if isinstance(items, PaddedItems) and items.slot:  # compact stacks (codes, small) travel as they are
        compact = [(k, s) for k, s in enumerate(items.stacks) if not isinstance(s, torch.Tensor)]
        return _to_trainer({"ids": items.ids, "slot": items.slot, "compact": compact, "lengths": items.lengths,
                            "rows": items.rows})
    if isinstance(items, PaddedItems):
        ids, stacks, lengths, got = items.ids, items.stacks, items.lengths, items.rows
    else:
        ids = [u for u, _ in items]
        lengths = torch.tensor([s[0].shape[1] for _, s in items], dtype=torch.long)
        T = int(lengths.max()) if len(items) else 0
        stacks = []
        for k in range(len(items[0][1]) if items else 0):
            L, _, D = items[0][1][k].shape
            out = torch.zeros(len(items), L, T, D)  # (B, L, T, D_i)
            for b, (_, s) in enumerate(items):
                out[b, :, :s[k].shape[1]] = s[k]
            stacks.append(out)
        got = None
    if got is None:
        got = [rows[u] for u in ids] if rows is not None else [None] * len(ids)
    return _to_trainer({"ids": ids, "stacks": stacks, "lengths": lengths, "rows": got})


def _tensors(x):
    """Every tensor in a batch (dicts, lists, tuples, dataclasses such as CompactStack and Codes)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))


def _to_trainer(batch: dict) -> dict:
    """In a worker process: the batch ready to cross to the trainer. Its tensors go to shared memory here,
    where a full /dev/shm is an exception: left to the queue, the same failure happens in its feeder
    thread, is only printed, and the trainer waits forever for the batch. Without the room, the batch
    crosses pickled, as bytes through the pipe (slower, and correct); FusedLoader unpickles it."""
    if get_worker_info() is None:
        return batch
    try:
        for t in _tensors(batch):
            t.share_memory_()
        return batch
    except RuntimeError:  # torch: "unable to allocate shared memory(shm) ...: No space left on device"
        return {PICKLED: pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)}


PICKLED = "pickled"  # a batch dict that crossed from a worker as bytes (`_to_trainer`)


def shard(batch: list, r: int, world: int) -> tuple[list, float]:
    """Rank r's contiguous part of a global batch, and the weight of its summed per-item losses.

    Parts differ in size by at most one (the first len(batch) % world ranks take one more). The
    weight world / len(batch) makes DDP's gradient average over ranks the mean over the global
    batch. A rank left without items (fewer items than ranks) gets the last item as a stand-in,
    weight 0: it still runs forward and backward, so every rank joins each gradient all-reduce.
    """
    n = len(batch)
    size, extra = divmod(n, world)
    start = r * size + min(r, extra)
    stop = start + size + (r < extra)
    if start < stop:
        return batch[start:stop], world / n
    return batch[-1:], 0.0


class BucketBatchSampler(Sampler):
    """Batches of consecutive utterances of `order` whose padded size (count x longest) stays within max_frames.

    ``order`` defaults to longest first; make_loader passes the stores' order (also longest first).
    Unshuffled, the batches are cut once and come in that order. Shuffled, each epoch cuts at a
    random phase and shuffles the batches, from (seed, epoch) only: set_epoch(e) before each epoch.
    Every utterance comes exactly once per epoch (with drop_last, but for the part-filled batches at
    the two ends of the cut). An utterance longer than max_frames forms a batch of its own.
    ``skip`` (settable) starts the epoch after that many batches, to resume inside an epoch.

    Data parallel (``shard=(rank, world)``): every rank cuts the same batches, from (seed, epoch), and
    yields only its contiguous part of each (`shard`), so a batch means the same as in
    one process; with ``deal`` it yields whole batches instead, numbers rank, rank + world, ...
    (evaluation: each rank's batches are the single-process ones). ``batches()`` stays global.
    """

    def __init__(self, lengths, max_frames: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 order=None, shard: tuple[int, int] = (0, 1), deal: bool = False):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if max_frames <= 0:
            raise FusionpipeError(f"max_frames must be positive, got {max_frames}")
        self.order = np.argsort(-self.lengths, kind="stable") if order is None else np.asarray(order, dtype=np.int64)
        if sorted(self.order.tolist()) != list(range(len(self.lengths))):
            raise ValueError("order must be a permutation of range(len(lengths))")
        self.max_frames, self.shuffle, self.seed, self.drop_last = max_frames, shuffle, seed, drop_last
        self.epoch, self.skip = 0, 0
        self.shard, self.deal = shard, deal
        self._cache: tuple[int, list[list[int]]] | None = None
        too_long = int((self.lengths > max_frames).sum())
        if too_long:
            warnings.warn(f"{too_long} utterance(s) are longer than max_frames={max_frames} (longest "
                          f"{int(self.lengths.max())} frames); each forms a batch of its own", stacklevel=2)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in the order they come (skip not applied)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        budget = rng.uniform(0, self.max_frames) if self.shuffle else self.max_frames  # the random phase
        out, full, current, longest = [], [], [], 0
        for i in self.order.tolist():
            n = int(self.lengths[i])
            if current and (len(current) + 1) * max(longest, n) > budget:
                out.append(current)
                full.append(budget == self.max_frames)
                current, longest, budget = [], 0, self.max_frames
            current.append(i)
            longest = max(longest, n)
        if current:
            out.append(current)
            full.append(False)
        if self.drop_last:
            out = [b for b, f in zip(out, full) if f]
        if self.shuffle:
            out = [out[j] for j in rng.permutation(len(out))]
        self._cache = (self.epoch, out)
        return out

    def __iter__(self):
        r, world = self.shard
        batches = self.batches()[self.skip:]
        if self.deal:
            yield from batches[r::world]
        else:
            yield from (shard(b, r, world)[0] for b in batches)

    def __len__(self) -> int:
        r, world = self.shard
        n = max(len(self.batches()) - self.skip, 0)
        return len(range(r, n, world)) if self.deal else n


class FusedLoader(DataLoader):
    """A DataLoader whose single-process iteration builds the next `prefetch` batches in a thread, and
    whose worker processes build batches in shared memory that the trainer reads in place."""

    def __init__(self, *args, prefetch: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefetch = prefetch

    def __iter__(self):
        batches = super().__iter__()
        if self.num_workers > 0:
            return self._from_workers(batches)
        return batches if self.prefetch <= 0 else _in_thread(batches, self.prefetch)

    def _from_workers(self, batches):
        slots = self.dataset.slots
        while True:
            try:
                b = next(batches)
            except StopIteration:
                return
            except RuntimeError as e:  # torch's words for a worker that died: "DataLoader worker (pid N) ..."
                if "DataLoader worker" not in str(e):
                    raise
                raise FusionpipeError(
                    f"a data loader worker process died ({e}); killed, or out of memory? Rerun with --resume "
                    "to continue from the last checkpoint, with a lower --max-frames or fewer --num-workers "
                    "(0: no worker processes)") from None
            if PICKLED in b:
                b = pickle.loads(b[PICKLED])
            yield slots.hand_out(b) if "slot" in b else b


class _Slot:
    """One claimed slot in a worker: hands out float32 tensors carved from it, in order, and records where."""

    def __init__(self, k: int, memory: torch.Tensor):
        self.k, self.memory, self.used, self.layout = k, memory, 0, []

    def empty(self, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        self.layout.append((self.used, shape))
        self.used += n
        return self.memory[self.used - n:self.used].view(shape)


def shared_slots(workers: int, nbytes: int, per_worker: int = 2 + 2) -> SharedSlots | None:
    """Slots for `workers` worker processes: per worker the prefetch_factor (2) batches queued for it and
    two the trainer may still hold, fewer if /dev/shm has no room for them (a slot touched past the room
    is a SIGBUS), none (the ordinary path, with a warning) if it has no room for one per worker."""
    free = shm.free_bytes()
    fits = int(min(per_worker, free // (workers * nbytes)))
    if fits >= 1:
        try:
            return SharedSlots(workers, fits, nbytes)
        except RuntimeError:  # torch reserves the pages (fallocate): /dev/shm filled up since we looked
            pass
    warnings.warn(f"--num-workers {workers}: /dev/shm has {free / 2**20:.0f} MB free, less than one batch of "
                  f"--max-frames ({nbytes / 2**20:.0f} MB) per worker, so batches take a slower path (through "
                  f"torch's shared memory, or pickled through a pipe when that is full too); {shm.MORE} or lower "
                  "--max-frames", stacklevel=3)
    return None


class SharedSlots:
    """Batch memory for the loader's worker processes: a worker aligns its batch straight into one of its
    own slots of shared memory, sends the slot's number, and the trainer reads the batch in place: no copy
    through the queue and no fresh shared-memory segment per batch (what torch does with a worker's plain
    tensors: a copy and a page fault per 4 kB, every batch).

    A slot is free again once every tensor handed out of it is gone: the trainer's tensors are views of
    one numpy view of the slot, so derived tensors keep it alive, and its finalizer clears the slot's
    shared flag (the `BatchMemory` rule, across processes). Each worker has ``per_worker`` slots of
    ``nbytes`` (the largest batch ``max_frames`` allows; pages are only touched as batches fill them), so
    host memory is bounded by the batches in flight. A batch that does not fit, or a worker whose slots
    are all still held (a consumer keeping batches), takes the ordinary path: correct, one copy slower.
    """

    def __init__(self, workers: int, per_worker: int, nbytes: int):
        self.per_worker, self.nbytes = per_worker, nbytes
        self.memory = [torch.empty(0).set_(torch.UntypedStorage._new_shared(nbytes // 4 * 4))
                       for _ in range(workers * per_worker)]  # float32, shared, untouched
        self.busy = torch.zeros(workers * per_worker, dtype=torch.int32).share_memory_()

    def claim(self, worker: int, nbytes: int) -> _Slot | None:
        """Worker side: a free slot of `worker` for a batch of `nbytes`, marked busy; None if none fits."""
        if nbytes > self.nbytes:
            return None
        for k in range(worker * self.per_worker, (worker + 1) * self.per_worker):
            if not self.busy[k]:
                self.busy[k] = 1
                return _Slot(k, self.memory[k])
        return None

    def release(self, k: int) -> None:
        self.busy[k] = 0

    def hand_out(self, batch: dict) -> dict:
        """Trainer side: the batch's stacks, read in place from its slot, which frees itself when they are gone."""
        k, layout = batch.pop("slot")
        base = self.memory[k].numpy()[:max((o + math.prod(shape) for o, shape in layout), default=0)]
        weakref.finalize(base, self.release, k)
        flat = torch.from_numpy(base)  # its views keep `base` alive (numpy slices would point past it)
        batch["stacks"] = [flat[o:o + math.prod(shape)].view(shape) for o, shape in layout]
        for k, stack in batch.pop("compact", []):  # in store order: each goes back to its place
            batch["stacks"].insert(k, stack)
        return batch


def _in_thread(batches, depth: int):
    """Yield from iterator `batches`, built `depth` items ahead by one thread (joined when the consumer stops)."""
    done = object()
    with ThreadPoolExecutor(1, thread_name_prefix="fusionpipe-loader") as pool:
        ahead = deque(pool.submit(next, batches, done) for _ in range(depth))
        try:
            while (item := ahead.popleft().result()) is not done:  # re-raises a read error here
                ahead.append(pool.submit(next, batches, done))
                yield item
        finally:
            for f in ahead:
                f.cancel()


def make_loader(stores: list[str | Path], manifest: Manifest | str | Path | None = None, max_frames: int = 8000,
                shuffle: bool = False, seed: int = 0, num_workers: int = 0, align_time: str = "max",
                align_layers: str = "interpolate", ids: list[str] | None = None, *, skip_missing: bool = False,
                drop_last: bool = False, prefetch: int = 2, shard: tuple[int, int] = (0, 1), deal: bool = False,
                compact: bool = False) -> DataLoader:
    """A DataLoader of batch dicts over the stores fused (aligned, unmerged).

    ``manifest`` (labels, and the default utterance order) defaults to the TSV the stores recorded.
    Given, its rows are the utterances read: any subset of the stores' (one extraction over a whole
    corpus serves every split and fold of it), each the same audio as the stores' row of its id
    (`check_rows`). ``ids`` restricts further; ``max_frames`` bounds batch size x longest T (target frames).
    ``prefetch``: batches built ahead by a thread when num_workers=0 (0: none, read on demand).
    ``shard=(rank, world)``, ``deal``: this rank's part of each batch, or its whole batches (`BucketBatchSampler`).
    ``compact``: a lossy store's stack comes as a `CompactStack` (its int8 codes), which ``.to(device)``
    expands, aligns and pads on the device, to the same numbers: for a GPU trainer (1 byte a value
    crosses PCIe instead of 4, and the host does no expansion). Lossless stores are unaffected.
    Call ``loader.batch_sampler.set_epoch(e)`` each epoch when shuffling.
    """
    opened = [s if isinstance(s, FeatureStore) else FeatureStore.open(s) for s in stores]
    if manifest is not None:
        if not isinstance(manifest, Manifest):
            manifest = read_manifest(manifest)
        if opened:
            check_rows(manifest, opened[0])
        if ids is None:
            ids = [u.id for u in manifest]
    view = open_fused(opened, None, align_time, align_layers, skip_missing=skip_missing, ids=ids)
    by_id = (manifest or recorded_manifest(view)).by_id()
    lacking = [u for u in view.ids if u not in by_id]
    if lacking:
        raise FusionpipeError(f"{len(lacking)} utterance(s) of the stores have no manifest row ({list_ids(lacking)}); "
                              "pass the manifest they were extracted from")
    # a compact batch's lossless stacks use the slots too; only its lossy ones travel as codes
    dims = slot_dims(view, compact)
    slots = shared_slots(num_workers, max_frames * view.num_layers * sum(dims) * 4) if num_workers and dims else None
    dataset = FusedDataset(view, [by_id[u] for u in view.ids], compact, slots)
    sampler = BucketBatchSampler(view.lengths, max_frames, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                 order=view.reading_order(), shard=shard, deal=deal)
    return FusedLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                       multiprocessing_context="spawn" if num_workers else None,
                       persistent_workers=num_workers > 0, prefetch=prefetch)


def slot_dims(view: FusedView, compact: bool) -> list[int]:
    """Hidden sizes of the stores whose stacks a worker builds as float32 (all but, when `compact`, the lossy
    ones, which `FusedView.read_compact` hands on as codes)."""
    return [d for d, s in zip(view.dims, view.stores) if not (compact and s.info.codec in LOSSY)]


def recorded_manifest(view: FusedView) -> Manifest:
    """The manifest the view's stores were extracted from (labels live there), checked against its hash."""
    store = view.stores[0]
    info = store.info
    if not info.manifest_path or not Path(info.manifest_path).is_file():
        raise FusionpipeError(f"{store} was extracted from manifest {info.manifest} at {info.manifest_path}, which "
                              "is not there any more; pass manifest=PATH.tsv (the labels come from it)")
    m = store.recorded_manifest()
    if m is None:
        raise FusionpipeError(f"manifest {info.manifest_path} changed since {store} was extracted; re-extract, or "
                              "pass manifest=PATH.tsv explicitly to use its labels anyway")
    return m


def check_rows(manifest: Manifest, store: FeatureStore) -> None:
    """Each row of an explicitly given manifest must be an utterance `store` was extracted from, the same
    audio: compared with the store's recorded manifest row (path, num_samples, sample_rate), or by id only
    when that manifest is gone or changed (then the given manifest is the one to trust, labels included).
    The stores fused with `store` share its manifest (`open_fused` checks)."""
    name = store.info.manifest
    recorded = store.recorded_manifest()
    rows = recorded.by_id() if recorded is not None else dict.fromkeys([*store.ids, *store.skipped()])
    check_subset(manifest, rows, f"the stores ({store.url}: extracted from manifest {name})",
                 "extract the stores from a manifest that contains it (e.g. the whole corpus, as a recipe's "
                 "`extract_from:` does)")
