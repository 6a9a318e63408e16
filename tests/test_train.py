"""Stage 3: the trainer learns, resumes exactly, and trains K variants in one pass as K separate runs."""

import csv
import json

import numpy as np
import pytest
import torch

from fusionpipe.train.rundir import RunDir
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.stage import extract
from fusionpipe.manifest import Manifest, Utterance, read_manifest, write_manifest
from fusionpipe.train.augment import crop_frames, random_crop
from fusionpipe.train.evaluation import evaluate
from fusionpipe.train.loop import TrainConfig, train

def _last(run, variant):
    """A variant's state in the run's last checkpoint (one file for all variants)."""
    return torch.load(run / "last.pt", weights_only=True)["variants"][variant]


@pytest.mark.slow
def test_loss_falls_and_accuracy_beats_chance(pitch_stores, tmp_path, train_config, logged_losses):
    results = train(train_config(pitch_stores, tmp_path / "run", steps=60), progress=False)
    res = results["hconv-concat"]
    losses = logged_losses(tmp_path / "run", "hconv-concat")
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert res["dev"]["accuracy"] >= 0.9  # chance is 0.5
    assert res["trainable_params"] > 0 and res["train_seconds_per_epoch"] > 0
    saved = json.loads((tmp_path / "run" / "hconv-concat" / "results.json").read_text())
    assert saved["dev"]["accuracy"] == res["dev"]["accuracy"]
    assert RunDir(tmp_path / "run").config().fusion == ["hconv"]


def test_a_config_saved_before_the_options_rename_still_loads(tmp_path):
    saved = {"stores": ["a.zarr"], "task": "asr", "head": {"proj": 64, "hidden": 64}, "interface": {"normalize": True}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = RunDir(tmp_path).config()
    assert cfg.head_options == {"proj": 64, "hidden": 64} and cfg.interface_options == {"normalize": True}


def test_variant_names_parse_back_into_fusion_merge_and_seed_in_the_runs_order():
    from fusionpipe.train.rundir import split_seed, variant_grid, variant_name

    grid = variant_grid(["hconv", "weighted-sum"], ["add", "concat"], [3, 0])
    assert [variant_name(*v) for v in grid[:3]] == ["hconv-add@s3", "hconv-add@s0", "hconv-concat@s3"]
    assert len(grid) == 8 and variant_grid(["gumbel"], ["add"]) == [("gumbel", "add", None)]
    for fusion, merge, seed in grid:
        assert split_seed(variant_name(fusion, merge, seed)) == (f"{fusion}-{merge}", seed)
    assert split_seed("weighted-sum-add") == ("weighted-sum-add", None)


def test_a_run_saved_before_the_options_rename_resumes(pitch_stores, tmp_path, train_config, logged_losses):
    """--resume compares the flags with config.json read as RunDir.config reads it (the old names mapped):
    it refused such a run with `head_options: None -> {...}`. Resumed, it trains on as if never renamed."""
    straight = tmp_path / "straight"
    train(train_config(pitch_stores, straight, steps=4, eval_every=2), progress=False)
    old = tmp_path / "old"
    train(train_config(pitch_stores, old, steps=2, eval_every=2), progress=False)
    saved = json.loads((old / "config.json").read_text())
    saved["head"], saved["interface"] = saved.pop("head_options"), saved.pop("interface_options")
    (old / "config.json").write_text(json.dumps(saved))
    train(train_config(pitch_stores, old, steps=4, eval_every=2), resume=True, progress=False)
    assert logged_losses(old, "hconv-concat") == logged_losses(straight, "hconv-concat")


def test_a_checkpoint_of_the_interface_under_its_old_name_fusion_still_evaluates(pitch_stores, tmp_path,
                                                                                 train_config):
    """Checkpoints before the rename keep the interface's parameters under fusion.*: they load as interface.*,
    and the report counts them as the interface's."""
    from fusionpipe.ablate.report import interface_params
    from fusionpipe.train.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    train(train_config(pitch_stores, run, steps=2, eval_every=2), progress=False)
    before = evaluate(run, pitch_stores["dev"])
    params = interface_params(RunDir(run), "hconv-concat")
    best = run / "hconv-concat" / "best.pt"
    state = load_checkpoint(best)
    old = {k.replace("interface.", "fusion.", 1) if k.startswith("interface.") else k: v
           for k, v in state["model"].items()}
    assert any(k.startswith("fusion.") for k in old)
    save_checkpoint({**state, "model": old}, best)
    after = evaluate(run, pitch_stores["dev"])
    assert {k: m["accuracy"] for k, m in after.items()} == {k: m["accuracy"] for k, m in before.items()}
    assert interface_params(RunDir(run), "hconv-concat") == params > 0


@pytest.mark.slow
def test_variants_in_one_pass_equal_separate_runs(pitch_stores, tmp_path, train_config, logged_losses):
    kw = dict(steps=8, eval_every=4, specaugment=True, crop_seconds=[0.3, 0.5])  # random draws of every kind
    together = train(train_config(pitch_stores, tmp_path / "all", fusion=["hconv", "gumbel"], merge=["add", "concat"],
                                  **kw), progress=False)
    assert sorted(together) == ["gumbel-add", "gumbel-concat", "hconv-add", "hconv-concat"]
    for fusion, merge in (("gumbel", "add"), ("hconv", "concat")):
        name = f"{fusion}-{merge}"
        alone = train(train_config(pitch_stores, tmp_path / name, fusion=[fusion], merge=[merge], **kw), progress=False)
        assert logged_losses(tmp_path / "all", name) == logged_losses(tmp_path / name, name)
        assert alone[name]["dev"]["accuracy"] == together[name]["dev"]["accuracy"]
        a = _last(tmp_path / "all", name)["model"]
        b = _last(tmp_path / name, name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_seeds_in_one_pass_equal_separate_runs_per_seed(pitch_stores, tmp_path, train_config, logged_losses):
    kw = dict(steps=6, eval_every=3, fusion=["gumbel"], merge=["add"], specaugment=True)  # init and draws differ
    together = train(train_config(pitch_stores, tmp_path / "all", seeds=[0, 1], **kw), progress=False)
    assert sorted(together) == ["gumbel-add@s0", "gumbel-add@s1"]
    for seed in (0, 1):
        name = f"gumbel-add@s{seed}"
        alone = train(train_config(pitch_stores, tmp_path / name, seeds=[seed], **kw), progress=False)
        assert logged_losses(tmp_path / "all", name) == logged_losses(tmp_path / name, name)
        assert alone[name]["dev"]["accuracy"] == together[name]["dev"]["accuracy"]
        a, b = _last(tmp_path / "all", name)["model"], _last(tmp_path / name, name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(tmp_path / "all", "gumbel-add@s0") != logged_losses(tmp_path / "all", "gumbel-add@s1")
    plain = train(train_config(pitch_stores, tmp_path / "plain", **kw), progress=False)  # seed 0, no seeds list
    assert logged_losses(tmp_path / "plain", "gumbel-add") == logged_losses(tmp_path / "all", "gumbel-add@s0")
    assert set(plain) == {"gumbel-add"}


@pytest.mark.parametrize("seeds", [[], [1, 1], [0.5]])
def test_bad_seeds_are_refused_naming_the_flag(pitch_stores, tmp_path, train_config, seeds):
    with pytest.raises(FusionpipeError, match="--seeds"):
        train(train_config(pitch_stores, tmp_path / "run", seeds=seeds), progress=False)


def test_random_crops_are_windows_of_each_utterance_within_the_bounds():
    torch.manual_seed(0)
    lengths = torch.tensor([50, 12, 30, 7])
    stacks = [torch.zeros(4, 3, 50, 2), torch.zeros(4, 3, 50, 5)]
    for s in stacks:  # frame t of utterance b holds 1000 b + t, zero past its length
        for b, n in enumerate(lengths):
            s[b, :, :n] = (1000 * b + torch.arange(1, n + 1, dtype=torch.float))[None, :, None]
    seen = set()
    for _ in range(50):
        out, new = random_crop(stacks, lengths, 10, 20)
        assert new.tolist()[3] == 7                                      # shorter than any window: whole
        assert all(10 <= int(n) <= min(20, int(m)) for n, m in zip(new[:3], lengths[:3]))
        for s in out:
            assert s.shape[2] == int(new.max())
            for b, n in enumerate(new.tolist()):
                window = s[b, 0, :n, 0]
                assert torch.equal(window - window[0], torch.arange(n, dtype=torch.float))  # contiguous
                assert window[0] >= 1000 * b + 1 and window[-1] <= 1000 * b + lengths[b]
                assert not s[b, :, n:].any()
        seen.add(int(out[0][0, 0, 0, 0]))
    assert len(seen) > 10  # the start moves
    assert crop_frames([2, 8], 50.0) == (100, 400)
    with pytest.raises(FusionpipeError, match="crop_seconds"):
        crop_frames([8, 2], 50.0)


@pytest.mark.slow
def test_resume_continues_with_the_same_next_step_loss(pitch_stores, tmp_path, train_config, logged_losses):
    kw = dict(eval_every=3, specaugment=True, fusion=["weighted-sum"], merge=["add"])
    train(train_config(pitch_stores, tmp_path / "straight", steps=9, **kw), progress=False)
    train(train_config(pitch_stores, tmp_path / "resumed", steps=6, **kw), progress=False)  # crosses an epoch boundary
    train(train_config(pitch_stores, tmp_path / "resumed", steps=9, **kw), resume=True, progress=False)
    assert (logged_losses(tmp_path / "straight", "weighted-sum-add")
            == logged_losses(tmp_path / "resumed", "weighted-sum-add"))


def test_existing_run_is_not_overwritten_without_resume(pitch_stores, tmp_path, train_config):
    train(train_config(pitch_stores, tmp_path / "run", steps=2), progress=False)
    with pytest.raises(FusionpipeError, match="--resume"):
        train(train_config(pitch_stores, tmp_path / "run", steps=2), progress=False)


def test_asr_trains_and_reports_wer_and_cer(pitch_stores, tmp_path, train_config):
    res = train(train_config(pitch_stores, tmp_path / "asr", task="asr", steps=4,
                             head_options={"proj": 16, "hidden": 16, "layers": 1}), progress=False)["hconv-concat"]
    assert {"wer", "cer"} <= set(res["dev"]) and 0 <= res["dev"]["cer"]


def test_evaluate_a_finished_run_on_other_stores(pitch_stores, tmp_path, train_config):
    train(train_config(pitch_stores, tmp_path / "run", steps=20), progress=False)
    metrics = evaluate(tmp_path / "run", pitch_stores["dev"], device="cpu")
    best = torch.load(tmp_path / "run" / "hconv-concat" / "best.pt", weights_only=True)["metrics"]
    assert metrics["hconv-concat"]["accuracy"] == best["accuracy"]


@pytest.mark.slow
def test_select_picks_the_best_checkpoint_by_the_named_metric(pitch_stores, tmp_path, train_config):
    train(train_config(pitch_stores, tmp_path / "run", steps=30, eval_every=5, select="macro_f1"), progress=False)
    with open(tmp_path / "run" / "hconv-concat" / "log.csv") as f:
        evals = [json.loads(r["metrics"]) for r in csv.DictReader(f) if r["metrics"]]
    best = torch.load(tmp_path / "run" / "hconv-concat" / "best.pt", weights_only=True)["metrics"]
    assert len(evals) == 6 and best["macro_f1"] == max(e["macro_f1"] for e in evals)
    with pytest.raises(FusionpipeError, match="select='bleu'"):
        train(train_config(pitch_stores, tmp_path / "other", steps=5, eval_every=5, select="bleu"), progress=False)


# ---- training on rows of a larger store (one extraction serves every split) ---------------------
@pytest.fixture(scope="module")
def pitch_whole(pitch_stores, tmp_path_factory):
    """The train and dev rows of `pitch_stores` in one manifest, extracted once: {"stores", "train", "dev"}
    where train and dev are the paths of the split manifests (rows of the whole one, as written)."""
    from fusionpipe.store import FeatureStore

    split = {k: read_manifest(FeatureStore.open(pitch_stores[k][0]).attrs["manifest"]["path"]) for k in ("train", "dev")}
    root = split["train"].source.parent
    whole = Manifest("pitch-all", root, [*split["dev"], *split["train"]])  # another order than the splits'
    m = read_manifest(write_manifest(whole, root / "pitch-all.tsv", root="."))
    stores = [extract(m, model, root / "cache", device="cpu", progress=False).url
              for model in ("toy-wavlm", "toy-whisper")]
    return {"stores": stores, **{k: str(v.source) for k, v in split.items()}}


@pytest.mark.slow
def test_training_on_manifest_rows_of_a_larger_store_equals_training_on_their_own_stores(
        pitch_stores, pitch_whole, tmp_path, train_config, logged_losses):
    kw = dict(steps=12, eval_every=4, specaugment=True, fusion=["hconv", "weighted-sum"], merge=["add"])
    own = train(train_config(pitch_stores, tmp_path / "own", **kw), progress=False)
    whole = {"train": pitch_whole["stores"], "dev": pitch_whole["stores"]}
    rows = train(train_config(whole, tmp_path / "rows", manifest=pitch_whole["train"], dev_manifest=pitch_whole["dev"],
                              **kw), progress=False)
    def scores(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if k != "inference_seconds"}

    # the same rows, in the same batches: every store keeps its utterances longest first (ties by id),
    # so a subset of the larger store comes in the order of the subset's own store, features equal
    assert (tmp_path / "rows" / "task.json").read_text() == (tmp_path / "own" / "task.json").read_text()
    for name in own:
        assert logged_losses(tmp_path / "rows", name) == logged_losses(tmp_path / "own", name)
        assert scores(rows[name]["dev"]) == scores(own[name]["dev"])
        a = _last(tmp_path / "rows", name)["model"]
        b = _last(tmp_path / "own", name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    on_rows = evaluate(tmp_path / "rows", pitch_whole["stores"], device="cpu", manifest=pitch_whole["dev"])
    on_own = evaluate(tmp_path / "own", pitch_stores["dev"], device="cpu")
    assert {k: scores(v) for k, v in on_rows.items()} == {k: scores(v) for k, v in on_own.items()}


def test_manifest_rows_the_stores_lack_are_refused_with_the_fix(pitch_stores, pitch_whole, tmp_path, train_config):
    train_rows = read_manifest(pitch_whole["train"])
    root = train_rows.source.parent
    stranger = Utterance("elsewhere-00", "train-00.wav", 1000, 16000, label="low")
    bad = write_manifest(Manifest("with-stranger", root, [*train_rows.utterances[:3], stranger]),
                         tmp_path / "with-stranger.tsv", root=str(root))
    with pytest.raises(FusionpipeError) as e:
        train(train_config(pitch_stores, tmp_path / "run", manifest=str(bad), dev_stores=[]), progress=False)
    msg = str(e.value)
    assert f"{bad} row 4 (id elsewhere-00) is not in the stores" in msg
    assert "extract the stores from a manifest that contains it" in msg
    # an id the stores have, but other audio under it
    first = train_rows[0]
    other = Utterance(first.id, first.path, first.num_samples + 1, 16000, label=first.label)
    bad = write_manifest(Manifest("other-audio", root, [other]), tmp_path / "other-audio.tsv", root=str(root))
    with pytest.raises(FusionpipeError, match=rf"{bad} row 1 \(id train-00\) is .*not the same audio"):
        evaluate(_trained(train_config, pitch_stores, tmp_path / "run2"), pitch_stores["train"], device="cpu",
                 manifest=bad)
    # a subset of the train stores with the same stores as dev must name its dev rows
    with pytest.raises(FusionpipeError, match="give dev_manifest"):
        whole = {"train": pitch_whole["stores"], "dev": pitch_whole["stores"]}
        train(train_config(whole, tmp_path / "run3", manifest=pitch_whole["train"]), progress=False)


def _trained(train_config, stores, out):
    train(train_config(stores, out, steps=2, eval_every=2), progress=False)
    return out
