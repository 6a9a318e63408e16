"""Specification of stage 2's loader (fusionpipe.fuse.loader): the batches stage 3 trains on."""

import gc
import pickle
import shutil

import numpy as np
import pytest
import torch

from fusionpipe.fuse.loader import BucketBatchSampler, FusedDataset, SharedSlots, collate, make_loader
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.stage import extract
from fusionpipe.fuse.view import open_fused
from fusionpipe.store import FeatureStore


@pytest.fixture(scope="module")
def toy_stores(tmp_path_factory, make_manifest):
    """toy-wavlm (L=4, D=32, 49 frames/s) and toy-whisper (L=3, D=40, 50 frames/s) over the speech corpus;
    Whisper's store has 16-frame chunks so that batches read across chunk edges."""
    root = tmp_path_factory.mktemp("toys")
    m = make_manifest(root / "corpus", "speech", [1.31, 0.5, 2.7, 1.05, 0.77])
    wavlm = extract(m, "toy-wavlm", root / "cache", device="cpu", progress=False).url
    whisper = extract(m, "toy-whisper", root / "cache", device="cpu", progress=False, chunk_frames=16).url
    return m, [wavlm, whisper]


def all_batches(loader):
    return [b for b in loader]


def test_toy_wavlm_and_whisper_batches_follow_the_contract(toy_stores):
    m, stores = toy_stores
    loader = make_loader(stores, max_frames=300)
    view = loader.dataset.view
    wavlm, whisper = (FeatureStore.open(s) for s in stores)
    seen = []
    for batch in all_batches(loader):
        assert set(batch) == {"ids", "stacks", "lengths", "rows"}
        B, T = len(batch["ids"]), int(batch["lengths"].max())
        assert B * T <= 300 or B == 1
        assert [tuple(s.shape) for s in batch["stacks"]] == [(B, 4, T, 32), (B, 4, T, 40)]
        assert all(s.dtype == torch.float32 for s in batch["stacks"]) and batch["lengths"].dtype == torch.long
        for b, u in enumerate(batch["ids"]):
            t = int(batch["lengths"][b])
            assert t == max(len(wavlm.read(u)), len(whisper.read(u))) == len(whisper.read(u))  # Whisper: 1 more
            for s, expected in zip(batch["stacks"], view.aligned(view.ids.index(u))):
                np.testing.assert_array_equal(s[b, :, :t].numpy(), expected)
                assert not s[b, :, t:].any()
            assert batch["rows"][b] == m.by_id()[u]
        seen += batch["ids"]
    assert sorted(seen) == sorted(u.id for u in m)


@pytest.mark.slow
def test_two_spawned_workers_give_the_main_process_batches(toy_stores):
    _, stores = toy_stores
    main, workers = (make_loader(stores, max_frames=200, shuffle=True, seed=3, num_workers=n) for n in (0, 2))
    for epoch in (0, 1):
        main.batch_sampler.set_epoch(epoch)
        workers.batch_sampler.set_epoch(epoch)
        a, b = all_batches(main), all_batches(workers)
        assert [x["ids"] for x in a] == [y["ids"] for y in b]
        for x, y in zip(a, b):
            assert all(torch.equal(s, t) for s, t in zip(x["stacks"], y["stacks"]))
            assert [r.text for r in x["rows"]] == [r.text for r in y["rows"]]


@pytest.mark.slow
def test_workers_build_batches_in_shared_slots_freed_only_when_the_trainer_drops_them(toy_stores, monkeypatch):
    """Workers align into shared-memory slots the trainer reads in place. One slot per worker here, so
    slots are reused every batch: dropping each batch (training) and holding them all (no slot free:
    the ordinary path) both give the main process's numbers, and a held batch is never written over."""
    _, stores = toy_stores
    main = [(b["ids"], [s.clone() for s in b["stacks"]]) for b in make_loader(stores, max_frames=60)]
    loader = make_loader(stores, max_frames=60, num_workers=2)
    slots = loader.dataset.slots = SharedSlots(2, 1, loader.dataset.slots.nbytes)
    handed = []
    hand_out = SharedSlots.hand_out
    monkeypatch.setattr(SharedSlots, "hand_out", lambda self, batch: handed.append(1) or hand_out(self, batch))
    assert len(main) > 2
    for _ in range(2):  # the trainer's way: each batch dropped before the next
        got = [(b["ids"], [s.clone() for s in b["stacks"]]) for b in loader]
        assert [g[0] for g in got] == [m[0] for m in main]
        assert all(torch.equal(x, y) for g, m in zip(got, main) for x, y in zip(g[1], m[1]))
    assert len(handed) > 2  # more batches came through the 2 slots than there are slots: reused
    held = list(loader)  # every batch kept: slots stay busy, later batches take the ordinary path
    assert int(slots.busy.sum()) >= 1
    assert all(torch.equal(x, y) for b, m in zip(held, main) for x, y in zip(b["stacks"], m[1]))
    del held
    gc.collect()
    assert int(slots.busy.sum()) == 0  # freed once the trainer let go


def test_worker_slots_fit_in_dev_shm_or_the_loader_warns_and_takes_the_ordinary_path(toy_stores, monkeypatch):
    from fusionpipe import shm as module

    _, stores = toy_stores
    batch = 60 * 4 * (32 + 40) * 4  # max_frames x L x sum(D) x float32
    for free, per_worker in ((10**12, 4), (2 * 3 * batch, 3)):  # room for 4 each, for 3 each
        monkeypatch.setattr(module.shutil, "disk_usage", lambda path, free=free: shutil._ntuple_diskusage(0, 0, free))
        slots = make_loader(stores, max_frames=60, num_workers=2).dataset.slots
        assert slots.nbytes == batch and slots.per_worker == per_worker and len(slots.memory) == 2 * per_worker
    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, batch))
    with pytest.warns(UserWarning, match=r"--num-workers 2: /dev/shm .*--shm-size"):
        assert make_loader(stores, max_frames=60, num_workers=2).dataset.slots is None


def test_ids_restrict_the_loader_to_a_subset(toy_stores):
    m, stores = toy_stores
    subset = [m[3].id, m[0].id]
    got = [u for b in make_loader(stores, ids=subset) for u in b["ids"]]
    assert sorted(got) == sorted(subset)


def test_the_dataset_pickles_only_its_spec_and_reopens_lazily(toy_stores):
    _, stores = toy_stores
    ds = make_loader(stores).dataset
    ds.view  # opened here
    blob = pickle.dumps(ds)
    again = pickle.loads(blob)
    assert again._view is None and len(blob) < 5000
    uid, stacks = again[2]
    assert uid == ds.spec.ids[2] and [s.shape[0] for s in stacks] == [4, 4]
    assert all(torch.equal(s, t) for s, t in zip(stacks, ds[2][1]))


def test_collate_pads_plain_items_like_the_batched_read(toy_stores):
    _, stores = toy_stores
    ds = FusedDataset(open_fused(stores))
    fast = collate(ds.__getitems__([0, 2, 4]))
    slow = collate([ds[i] for i in (0, 2, 4)])
    assert fast["ids"] == slow["ids"] and torch.equal(fast["lengths"], slow["lengths"])
    assert all(torch.equal(a, b) for a, b in zip(fast["stacks"], slow["stacks"]))


def test_loader_without_the_recorded_manifest_asks_for_one(tmp_path, make_tsv, make_store, random_data):
    tsv = make_tsv(tmp_path / "m.tsv", ["a", "b"])
    store = make_store(tmp_path / "s.zarr", random_data(["a", "b"], [3, 2], 2, 2, 0), tsv)
    (tmp_path / "m.tsv").unlink()
    with pytest.raises(FusionpipeError, match="not there any more; pass manifest="):
        make_loader([store.url])
    make_tsv(tmp_path / "elsewhere.tsv", ["a", "b"])
    batch = next(iter(make_loader([store.url], manifest=tmp_path / "elsewhere.tsv")))
    assert sorted(r.text for r in batch["rows"]) == ["T a", "T b"]


# ---- the sampler ------------------------------------------------------------------------------
LENGTHS = np.random.default_rng(0).integers(20, 400, size=500)


def test_every_batch_stays_within_the_frame_budget():
    for shuffle in (False, True):
        for batch in BucketBatchSampler(LENGTHS, 1600, shuffle=shuffle, seed=1):
            assert len(batch) * LENGTHS[batch].max() <= 1600


def test_every_utterance_comes_exactly_once_per_epoch():
    s = BucketBatchSampler(LENGTHS, 1600, shuffle=True, seed=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        assert sorted(i for b in s for i in b) == list(range(len(LENGTHS)))


def test_the_order_depends_only_on_seed_and_epoch():
    a, b = (BucketBatchSampler(LENGTHS, 1600, shuffle=True, seed=1) for _ in range(2))
    b.set_epoch(1)
    b.set_epoch(0)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(BucketBatchSampler(LENGTHS, 1600, shuffle=True, seed=2)) != list(b)


def test_batches_are_length_buckets_cut_from_the_given_order():
    batches = list(BucketBatchSampler(LENGTHS, 1600))
    flat = [i for b in batches for i in b]
    assert flat == list(np.argsort(-LENGTHS, kind="stable"))
    padded = sum(len(b) * LENGTHS[b].max() for b in batches)
    assert padded < 1.1 * LENGTHS.sum()


def test_drop_last_drops_only_the_part_filled_batches():
    s = BucketBatchSampler(LENGTHS, 1600, shuffle=True, seed=1, drop_last=True)
    full = BucketBatchSampler(LENGTHS, 1600, shuffle=True, seed=1)
    kept = {tuple(b) for b in s}
    assert kept < {tuple(b) for b in full} and len(full) - len(s) <= 2


def test_skip_resumes_inside_an_epoch():
    s = BucketBatchSampler(LENGTHS, 1600, shuffle=True, seed=1)
    whole = list(s)
    s.skip = 3
    assert list(s) == whole[3:] and len(s) == len(whole) - 3


def test_an_utterance_over_the_budget_gets_a_batch_of_its_own():
    with pytest.warns(UserWarning, match="longer than max_frames"):
        s = BucketBatchSampler([500, 10, 10], 100)
    assert list(s) == [[0], [1, 2]]


def test_the_prefetch_thread_gives_the_batches_read_on_demand(toy_stores):
    _, stores = toy_stores
    ahead, on_demand = (make_loader(stores, max_frames=140, shuffle=True, seed=1, prefetch=p) for p in (2, 0))
    a, b = all_batches(ahead), all_batches(on_demand)
    assert [x["ids"] for x in a] == [y["ids"] for y in b] and len(a) == 3
    assert all(torch.equal(s, t) for x, y in zip(a, b) for s, t in zip(x["stacks"], y["stacks"]))


def test_leaving_an_epoch_early_stops_the_prefetch_thread(toy_stores):
    import threading

    _, stores = toy_stores
    loader = make_loader(stores, max_frames=140)
    for k, _ in enumerate(loader):
        if k == 1:
            break
    assert not any(t.name == "fusionpipe-loader" for t in threading.enumerate())


def test_a_read_error_reaches_the_training_loop(toy_stores, monkeypatch):
    _, stores = toy_stores
    loader = make_loader(stores, max_frames=140)

    def broken(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(loader.dataset.view, "read_stacks", broken)
    with pytest.raises(OSError, match="disk gone"):
        all_batches(loader)
