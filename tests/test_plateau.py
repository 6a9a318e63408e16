"""Specification of the CTC blank plateau: what causes it (a few huge channels), the default that
prevents it (Standardize), and the detector that says when a variant is stuck (train.loop.Plateau).

The synthetic case reproduces the real one (docs/method.md): frames that spell their text (every
character its own vector, 4 frames each), plus 2 of 16 channels offset by +300, as the outlier
channels of real Whisper-base hidden states are. The reference HConv (standardize=false) sits on the
blank plateau; the default learns.
"""

import json

import numpy as np
import pytest
import torch

from fusionpipe.train.config import TrainConfig
from fusionpipe.train.interfaces import Interface
from fusionpipe.train.loop import train
from fusionpipe.train.variant import PLATEAU_EVALS, Plateau

TINY_CTC = {"proj": 16, "hidden": 16, "layers": 1}


def spelled(ids, texts, L, D, outlier=0.0, seed=0):
    """id -> (T, L, D) frames spelling the text (4 frames a character, spaces left out); channels 0-1
    offset by ``outlier``."""
    rng = np.random.default_rng(seed)
    vec = {c: rng.standard_normal(D) for c in sorted(set("".join(texts)))}
    data = {}
    for u, text in zip(ids, texts):
        frames = np.concatenate([np.repeat(vec[c][None], 4, 0) for c in text.replace(" ", "")])
        x = frames[:, None, :] + 0.1 * rng.standard_normal((len(frames), L, D))
        x[..., :2] += outlier
        data[u] = x.astype(np.float32)
    return data


@pytest.fixture(scope="module")
def outlier_store(tmp_path_factory, make_tsv, make_store):
    root = tmp_path_factory.mktemp("plateau")
    ids = [f"a{i}" for i in range(12)]
    m = make_tsv(root / "spelled.tsv", ids)
    return make_store(str(root / "spelled.zarr"), spelled(ids, [u.text for u in m], 5, 16, outlier=300.0), m).url


def ctc_run(store, out, steps, **kw) -> TrainConfig:
    return TrainConfig(stores=[store], dev_stores=[store], task="asr", fusion=["hconv"], merge=["add"], out=str(out),
                       steps=steps, eval_every=10, lr=1e-2, max_frames=600, head_options=TINY_CTC, device="cpu", **kw)


@pytest.mark.slow
def test_reference_hconv_on_outlier_channels_is_stuck_and_the_detector_says_so(outlier_store, tmp_path, capsys):
    res = train(ctc_run(outlier_store, tmp_path / "ref", 60,
                        interface_options={"standardize": False, "output_norm": False}),
                progress=False)["hconv-add"]
    assert res["dev"]["cer"] == 1.0 and res["dev"]["blank"] == 1.0
    assert res["plateau"] == {"stuck": True, "blank_evaluations": 6, "since": 10}
    saved = json.loads((tmp_path / "ref" / "hconv-add" / "results.json").read_text())
    assert saved["plateau"]["stuck"] is True
    err = capsys.readouterr().err
    assert "variant hconv-add is stuck on the CTC blank plateau" in err and "steps 10-30" in err
    assert "--lr" in err and "standardize=true" in err and "output_norm=true" in err


@pytest.mark.slow
def test_default_hconv_on_the_same_features_learns_and_the_detector_stays_quiet(outlier_store, tmp_path, capsys):
    res = train(ctc_run(outlier_store, tmp_path / "default", 120), progress=False)["hconv-add"]
    assert res["dev"]["cer"] < 0.5 and res["dev"]["blank"] == 0.0
    assert res["plateau"] == {"stuck": False, "blank_evaluations": 0, "since": None}
    assert "plateau" not in capsys.readouterr().err


def test_training_sets_the_statistics_of_the_train_frames(outlier_store, tmp_path):
    from fusionpipe.train.checkpoint import load_checkpoint

    train(ctc_run(outlier_store, tmp_path / "run", 2), progress=False)
    state = load_checkpoint(tmp_path / "run" / "hconv-add" / "best.pt")["model"]
    mean = state["interface.standardize.mean_0"]
    assert mean.shape == (5, 16) and torch.all(mean[:, :2] > 299) and torch.all(mean[:, 2:].abs() < 3)


def test_plateau_needs_evaluations_in_a_row_past_half_of_the_steps():
    p = Plateau()
    blank, learning = {"blank": 1.0}, {"blank": 0.5}
    said = [p.update(step, blank, 200) for step in (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)]
    assert said[:9] == [None] * 9  # three in a row at step 30, but before half of the run
    assert "stuck" in said[9] and p.stuck(100, 200) and p.blank_evals == 10
    assert p.update(110, blank, 200) is None  # once per episode
    assert "left the CTC blank plateau at step 120" in p.update(120, learning, 200)
    assert not p.stuck(120, 200)
    assert [Plateau().update(s, blank, 30) for s in range(10, 10 * PLATEAU_EVALS, 10)] == [None] * (PLATEAU_EVALS - 1)


def test_a_run_that_ends_all_blank_is_stuck_even_with_few_evaluations():
    p = Plateau()
    assert "stuck" in p.update(600, {"blank": 1.0}, 600) and p.stuck(600, 600)


def test_tasks_without_ctc_are_never_on_the_plateau():
    p = Plateau()
    for step in range(100, 1100, 100):
        assert p.update(step, {"accuracy": 0.25}, 1000) is None
    assert not p.stuck(1000, 1000)


@pytest.mark.parametrize("value", ["no", 1, None, "true"])
@pytest.mark.parametrize("option", ["standardize", "output_norm"])
def test_standardize_and_output_norm_take_only_true_or_false(option, value):
    with pytest.raises(ValueError, match=option):
        Interface([8], 5, fusion="hconv", **{option: value})


@pytest.mark.slow
def test_analyze_leaves_out_variants_that_ended_stuck_and_names_them(outlier_store, tmp_path):
    from typer.testing import CliRunner

    from fusionpipe.analyze.use import layer_use, stuck_variants
    from fusionpipe.cli import app

    run = tmp_path / "run"
    train(ctc_run(outlier_store, run, 4, seeds=[0, 1]), progress=False)
    for seed, stuck in ((0, False), (1, True)):  # 4 steps end all blank: say which one the test calls stuck
        results = run / f"hconv-add@s{seed}" / "results.json"
        saved = json.loads(results.read_text())
        results.write_text(json.dumps({**saved, "plateau": {"stuck": stuck, "blank_evaluations": 1, "since": 4}}))
    assert stuck_variants(run) == ["hconv-add@s1"]
    assert {r["seed"] for r in layer_use(run, device="cpu")} == {0}
    result = CliRunner().invoke(app, ["analyze", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "left out, ended on the CTC blank plateau (nothing learned to read): hconv-add@s1" in result.output


def test_a_knocked_out_layer_is_its_training_mean_which_standardizes_to_zero():
    from types import SimpleNamespace

    from fusionpipe.analyze.use import _knocked

    torch.manual_seed(0)
    interface = Interface([4, 6], 3, fusion="hconv")
    interface.set_statistics([(torch.randn(3, 4), torch.rand(3, 4) + 0.5), (torch.randn(3, 6), torch.rand(3, 6) + 0.5)])
    stacks = [torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 6)]
    for s, value in zip(stacks, _knocked(SimpleNamespace(model=SimpleNamespace(interface=interface)), 1)):
        s[:, 1] = value
    for out in interface.standardize(stacks):
        assert torch.allclose(out[:, 1], torch.zeros_like(out[:, 1]), atol=1e-6) and out[:, 0].abs().sum() > 0
    reference = Interface([4, 6], 3, fusion="hconv", standardize=False)
    assert _knocked(SimpleNamespace(model=SimpleNamespace(interface=reference)), 1) == [0.0, 0.0]
