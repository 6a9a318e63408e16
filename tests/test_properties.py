"""Property-based tests (hypothesis) of the validators a user's values meet first: the command line's
parsers, the option rules, TrainConfig.check_settings and a recipe. Any value either passes and then
works (builds, trains) or is refused with a FusionpipeError; never a traceback."""

import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionpipe.ablate import load_recipe, run_recipe
from fusionpipe.cli import _numbers, _options
from fusionpipe.errors import FusionpipeError
from fusionpipe.train.config import TrainConfig
from fusionpipe.train.interfaces import INTERFACES, Interface, interface_option_names, interface_option_problems
from fusionpipe.train.loop import train
from fusionpipe.train.tasks import TASKS, build_task, check_head, head_option_names, head_option_problems

# what a user can type or write in YAML/JSON: numbers of every size and sign, booleans, text, nothing, lists
VALUES = st.one_of(st.integers(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                   st.booleans(), st.text(max_size=8), st.none(), st.lists(st.integers(-2, 9), max_size=3))
HEAD_KEYS = sorted(set().union(*(head_option_names(t) for t in TASKS)))
INTERFACE_KEYS = sorted(set().union(*(interface_option_names(f) for f in INTERFACES)))
SETTINGS = dict(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_option_has_a_value_rule():
    """An option added to a registry without its rule would pass unchecked (or fail with a KeyError)."""
    for f in INTERFACES:
        for name in interface_option_names(f):
            interface_option_problems(f, {name: object()})  # no KeyError: a rule exists, and refuses this
            assert interface_option_problems(f, {name: object()})
    for task in TASKS:
        for name in head_option_names(task):
            assert head_option_problems(task, {name: object()})


@given(st.text(max_size=30))
@settings(**SETTINGS)
def test_the_option_and_number_parsers_take_any_text(text):
    for parse in (lambda: _options([text]), lambda: _numbers(text, "--seeds", int),
                  lambda: _numbers(text, "--crop-seconds")):
        try:
            parse()
        except FusionpipeError:
            pass


@given(st.sampled_from(["asr", "classify"]), st.dictionaries(st.sampled_from(HEAD_KEYS + ["nope"]), VALUES, max_size=3))
@settings(**SETTINGS)
def test_head_options_pass_and_build_or_are_refused(task, options):
    problems = head_option_problems(task, options)
    if problems:
        assert all(isinstance(k, str) and why for k, why in problems)
        return
    t = build_task(task, {"text": ["AB", "C"], "label": ["x", "y"]})
    try:
        check_head(t, 8, options, torch.device("cpu"))
    except FusionpipeError:
        return  # too big for memory, or sizes that do not fit together: said so, before allocating
    head = t.build_head(8, **options) if sum(_meta_params(t, options)) < 200_000 else None
    if head is not None:  # small enough to train a step here
        loss = t.loss(head, torch.randn(2, 20, 8), torch.tensor([20, 15]), _targets(task))
        loss.backward()
        assert math.isfinite(float(loss.detach()))


def _meta_params(task, options):
    with torch.device("meta"):
        return [p.numel() for p in task.build_head(8, **options).parameters()]


def _targets(task):
    from fusionpipe.manifest import Utterance

    rows = [Utterance("a", "a.wav", 16000, 16000, text="AB", label="x"),
            Utterance("b", "b.wav", 16000, 16000, text="C", label="y")]
    from fusionpipe.train.tasks import batch_targets
    return batch_targets(rows)


@given(st.sampled_from(INTERFACES), st.dictionaries(st.sampled_from(INTERFACE_KEYS + ["nope"]), VALUES, max_size=3))
@settings(**SETTINGS)
def test_interface_options_pass_and_build_or_are_refused(fusion, options):
    problems = interface_option_problems(fusion, options)
    if problems:
        return
    try:
        interface = Interface([8, 6], 5, fusion=fusion, merge="concat", **options)
    except ValueError as e:  # the one fact known only with the stores: a layer outside their layers
        assert fusion == "single-layer" and "outside the 5 layers" in str(e)
        return
    out = interface([torch.randn(2, 5, 7, 8), torch.randn(2, 5, 7, 6)], torch.tensor([7, 4]))
    if any(p.requires_grad for p in interface.parameters()):  # last-layer without a projection has none to train
        out.sum().backward()
    assert out.shape[:2] == (2, 7)


FIELDS = {
    "steps": VALUES, "eval_every": VALUES, "max_frames": VALUES, "lr": VALUES, "grad_clip": VALUES, "seed": VALUES,
    "num_workers": VALUES, "seeds": st.one_of(st.none(), st.lists(st.integers(-2, 2**65), max_size=3), VALUES),
    "crop_seconds": st.one_of(st.none(), st.lists(VALUES, max_size=3)), "optimizer": VALUES, "select": VALUES,
    "head_options": st.one_of(VALUES, st.dictionaries(st.sampled_from(HEAD_KEYS), VALUES, max_size=2)),
    "interface_options": st.one_of(VALUES, st.dictionaries(st.sampled_from(INTERFACE_KEYS), VALUES, max_size=2)),
    "fusion": st.one_of(VALUES, st.lists(st.sampled_from([*INTERFACES, "x"]), max_size=2)),
    "align_time": VALUES, "specaugment": VALUES,
}


@pytest.mark.slow
@given(st.fixed_dictionaries({}, optional=FIELDS))
@settings(**SETTINGS)
def test_any_train_setting_passes_the_checks_or_is_refused(fields):
    cfg = TrainConfig(stores=["a.zarr"], task="classify", **fields)
    try:
        cfg.check_settings()
    except FusionpipeError as e:
        assert str(e).startswith("--")  # names the flag
        return
    assert cfg.steps >= 1 and cfg.max_frames >= 1 and 0 < cfg.lr < math.inf and cfg.seed >= 0


@pytest.mark.slow
@given(st.fixed_dictionaries({}, optional={
    "lr": st.floats(1e-5, 1.0), "seed": st.integers(0, 2**63 - 1), "max_frames": st.integers(1, 400),
    "head_options": st.dictionaries(st.just("proj"), st.integers(1, 16), max_size=1),
    "interface_options": st.dictionaries(st.sampled_from(["normalize", "project"]), st.booleans(), max_size=2)}))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_settings_that_pass_the_checks_train(pitch_stores, fields):
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(stores=pitch_stores["train"], task="classify", fusion=["weighted-sum"], steps=2,
                          eval_every=2, device="cpu", out=out, **fields)
        cfg.check_settings()
        results = train(cfg, progress=False)
        assert results["weighted-sum-concat"]["steps"] == 2


RECIPE_SETTINGS = {k: FIELDS[k] for k in ("steps", "eval_every", "max_frames", "lr", "seed", "seeds", "head_options")}


@pytest.mark.slow
@given(st.fixed_dictionaries({}, optional=RECIPE_SETTINGS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_recipe_setting_is_planned_or_refused_before_anything_runs(train_settings):
    with tempfile.TemporaryDirectory() as tmp:
        recipe = {"name": "t", "cache": f"{tmp}/cache", "results": f"{tmp}/results",
                  "manifests": {"train": "demo-train", "dev": "demo-dev"}, "upstreams": ["toy-wavlm"],
                  "tasks": {"asr": {"steps": 4}}, "train": train_settings,
                  "grid": {"upstream_sets": [["toy-wavlm"]], "fusion": ["weighted-sum"], "merge": ["add"]}}
        path = Path(tmp) / "r.yaml"
        try:
            path.write_text(yaml.safe_dump(recipe))
        except yaml.YAMLError:
            return
        try:
            run_recipe(load_recipe(path), dry_run=True, echo=lambda s: None)
        except FusionpipeError:
            pass
        assert not Path(f"{tmp}/cache").exists()
