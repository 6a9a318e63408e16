"""Data-parallel training (torchrun + DistributedDataParallel) matches one process on the same global batches."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fusionpipe.train.rundir import RunDir
from fusionpipe.fuse.loader import BucketBatchSampler, make_loader
from fusionpipe.fuse.loader import shard
from fusionpipe.train.tasks import TASKS, build_task
from fusionpipe.train.loop import TrainConfig, train

SMALL_SIZES = {  # dropout 0: the per-rank random draws are the one thing DDP cannot reproduce
    "asr": {"proj": 8, "hidden": 8, "dropout": 0.0},
    "multilingual": {"proj": 20, "d_model": 16, "heads": 2, "ffn": 32, "layers": 1, "dropout": 0.0},
    "classify": {"proj": 8},
    "verify": {"embed_dim": 12, "proj": 10, "tdnn": 10, "last": 14},
    "phoneme": {"proj": 8, "hidden": 8, "dropout": 0.0},
    "diarize": {"hidden": 8},
}
TARGETS = {"text": ["AB", "BA B", "Z", "B", "ABBA"], "label": ["x", "y", "x", "x", "y"],
           "speaker": ["s1", "s2", "s1", "s2", "s2"], "id": ["u0", "u1", "u2", "u3", "u4"],
           "phonemes": ["AE1 B", "B AA1 B", "Z", "B", "AE1 B B AA1"],
           "turns": ["0.0,0.3,a;0.2,0.4,b", "0.1,0.2,a", "", "0.0,0.5,b", "0.3,0.4,a;0.0,0.1,c"]}
# "Z": no target ("unknown" characters are skipped); "": nobody speaks


@pytest.mark.parametrize("n, world, parts, weights", [
    (5, 2, [[0, 1, 2], [3, 4]], [2 / 5, 2 / 5]),
    (7, 3, [[0, 1, 2], [3, 4], [5, 6]], [3 / 7] * 3),
    (1, 2, [[0], [0]], [2.0, 0.0]),                  # rank 1 trains on a stand-in, weight 0
    (2, 4, [[0], [1], [1], [1]], [2.0, 2.0, 0.0, 0.0]),
])
def test_shard_splits_a_global_batch_into_contiguous_parts(n, world, parts, weights):
    got = [shard(list(range(n)), r, world) for r in range(world)]
    assert [p for p, _ in got] == parts and [w for _, w in got] == pytest.approx(weights)
    assert sum(w * len(p) for p, w in got) == pytest.approx(world)  # DDP's mean over ranks = the global mean


def test_every_rank_cuts_the_same_batches_and_reads_its_part():
    lengths = np.random.default_rng(0).integers(20, 60, 50)
    one = BucketBatchSampler(lengths, 300, shuffle=True, seed=3)
    ranks = [BucketBatchSampler(lengths, 300, shuffle=True, seed=3, shard=(r, 2)) for r in range(2)]
    dealt = [BucketBatchSampler(lengths, 300, seed=3, shard=(r, 2), deal=True) for r in range(2)]
    for epoch in range(3):
        for s in [one, *ranks]:
            s.set_epoch(epoch)
        for batch, a, b in zip(one, *ranks):
            assert (a + b == batch) or (len(batch) == 1 and a == b == batch)
    unsharded = BucketBatchSampler(lengths, 300, seed=3).batches()
    assert list(dealt[0]) == unsharded[0::2] and list(dealt[1]) == unsharded[1::2]
    assert len(dealt[0]) + len(dealt[1]) == len(unsharded)


@pytest.mark.parametrize("name", TASKS)
def test_weighted_part_losses_give_the_gradient_of_the_global_batch(name):
    """What each rank's loss must be: per-utterance losses, weighted, summed over ranks = the batch's mean loss."""
    torch.manual_seed(0)
    x, lengths = torch.randn(5, 24, 6), torch.tensor([24, 20, 17, 24, 15])
    task = build_task(name, TARGETS, frame_rate=50.0)
    head = task.build_head(6, **SMALL_SIZES[name])

    def grads(loss):
        head.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in head.parameters()]

    mean = task.loss(head, x, lengths, TARGETS)
    per_item = task.loss(head, x, lengths, TARGETS, reduction="none")
    assert per_item.shape == (5,) and per_item.mean().item() == pytest.approx(mean.item(), rel=1e-6)
    world, total = 2, None
    for r in range(world):  # each rank's part, on its own (shorter) padding; DDP averages the gradients
        part, weight = shard(list(range(5)), r, world)
        t = max(int(lengths[i]) for i in part)
        loss = task.loss(head, x[part, :t], lengths[part], {k: [v[i] for i in part] for k, v in TARGETS.items()},
                         reduction="none").sum() * weight
        g = grads(loss)
        total = g if total is None else [a + b for a, b in zip(total, g)]
    for a, b in zip(grads(mean), total):
        torch.testing.assert_close(b / world, a, rtol=1e-5, atol=1e-6)  # float rounding only


def _metrics(run, variant):
    with open(run / variant / "log.csv") as f:
        return [{k: v for k, v in json.loads(r["metrics"]).items() if k != "inference_seconds"}
                for r in csv.DictReader(f) if r["metrics"]]


def _files(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "tb" not in p.parts)


@pytest.mark.slow
def test_torchrun_two_ranks_train_as_one_process_and_resume(pitch_stores, tmp_path, train_config, logged_losses):
    """Same config, one process vs 2 gloo ranks (6 steps, then --resume to 12): the same loss curve,
    dev metrics and parameters; rank 0 alone writes. Seed 3 at max_frames 300 cuts global batches of
    1 (a stand-in on rank 1) to 8 utterances (odd ones split unevenly)."""
    kw = dict(task="classify", fusion=["weighted-sum", "hconv"], merge=["concat"], steps=12, eval_every=3,
              max_frames=300, seed=3, head_options={"proj": 16})
    one = tmp_path / "one"
    train(train_config(pitch_stores, one, **kw), progress=False)

    cfg = RunDir(one).config()
    sampler = make_loader(cfg.stores, max_frames=300, shuffle=True, seed=3).batch_sampler
    sizes = [len(b) for e in range(3) for b in (sampler.set_epoch(e), sampler.batches())[1]][:12]
    assert 1 in sizes and any(n % 2 and n > 1 for n in sizes)
    two = tmp_path / "two"
    cli = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fusionpipe",
           "train", "--stores", ",".join(cfg.stores), "--dev-stores", ",".join(cfg.dev_stores), "--task", cfg.task,
           "--fusion", ",".join(cfg.fusion), "--merge", ",".join(cfg.merge), "--eval-every", "3", "--lr", str(cfg.lr),
           "--max-frames", "300", "--seed", "3", "--head-option", "proj=16", "--device", "cpu", "--out", str(two)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for steps, resume in ((6, []), (12, ["--resume"])):
        done = subprocess.run(cli + ["--steps", str(steps)] + resume, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]

    saved = RunDir(two).config()
    assert {**vars(saved), "out": ""} == {**vars(cfg), "out": ""}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"] and _files(two) == _files(one)
    for variant in ("weighted-sum-concat", "hconv-concat"):
        np.testing.assert_allclose(logged_losses(two, variant), logged_losses(one, variant), rtol=0, atol=3e-6)
        assert _metrics(two, variant) == _metrics(one, variant) and len(_metrics(one, variant)) == 4
        a = torch.load(one / "last.pt", weights_only=True)["variants"][variant]
        b = torch.load(two / "last.pt", weights_only=True)["variants"][variant]
        assert list(b["model"]) == list(a["model"])  # the plain model's keys, no "module." prefix
        for k in a["model"]:
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=2e-6)
        assert len(b["rank_rngs"]) == 2 and torch.load(two / "last.pt", weights_only=True)["step"] == 12
        res = json.loads((two / variant / "results.json").read_text())
        assert res["dev"]["accuracy"] == json.loads((one / variant / "results.json").read_text())["dev"]["accuracy"]
