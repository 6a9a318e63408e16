"""Recipes (stages/*.yaml): validation that names the key, plans, end-to-end runs, incremental reruns."""

import json
from pathlib import Path

import pytest
import yaml

from fusionpipe.ablate import plan as ablation
from fusionpipe.ablate import load_recipe, plan_recipe, run_recipe
from fusionpipe.errors import FusionpipeError

STAGES = Path(__file__).resolve().parents[1] / "stages"


def _recipe(**changes) -> dict:
    base = {
        "name": "t",
        "manifests": {"train": "demo-train", "dev": "demo-dev", "test": "demo-test"},
        "upstreams": ["toy-wavlm", "toy-whisper"],
        "tasks": {"asr": {"head_options": {"proj": 8, "hidden": 8, "layers": 1}, "steps": 4}},
        "grid": {"upstream_sets": [["toy-wavlm"], ["toy-wavlm", "toy-whisper"]],
                 "fusion": ["weighted-sum", "hconv"], "merge": ["add", "concat"]},
        "train": {"lr": 1e-3, "max_frames": 400},
    }
    base.update(changes)
    return base


def _write(tmp_path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("change, message", [
    ({"grid": {"upstream_sets": [["toy-wavlm"]], "fusion": ["weighted-sum", "hconv", "hcnv"], "merge": ["add"]}},
     "grid.fusion[2]: unknown interface 'hcnv'; choose one of"),
    ({"grid": {"upstream_sets": [["toy-wavlm"]], "fusion": ["hconv"], "merge": ["sum"]}},
     "grid.merge[0]: unknown merge 'sum'"),
    ({"grid": {"upstream_sets": [["toy-wavlm"], ["toy-wavlm", "toy-wavlmm"]], "fusion": ["hconv"], "merge": ["add"]}},
     "grid.upstream_sets[1][1]: unknown upstream 'toy-wavlmm'"),
    ({"grid": {"upstream_sets": [["toy-hubert"]], "fusion": ["hconv"], "merge": ["add"]}},
     "grid.upstream_sets[0][0]: 'toy-hubert' is not in upstreams"),
    ({"grid": {"fusion": ["hconv"], "merge": ["add"]}}, "grid.upstream_sets: missing"),
    ({"grdi": {}}, "grdi: unknown key"),
    ({"tasks": {"asr": {"steps": "many"}}}, "tasks.asr.steps: --steps (steps='many'): must be a whole number"),
    ({"tasks": {"asr": {"head_options": {"hiden": 8}}}}, "tasks.asr.head_options: --head-option (head_options={'hiden': 8}): hiden: unknown to the asr head"),
    ({"tasks": {"asr": {"head_options": {"hidden": -4}}}}, "tasks.asr.head_options: --head-option (head_options={'hidden': -4}): hidden: expected a whole number"),
    ({"tasks": {"asr": {"head_options": {"dropout": 1.5}}}}, "tasks.asr.head_options: --head-option (head_options={'dropout': 1.5}): dropout: expected a number >= 0"),
    ({"train": {"interface_options": {"normalize": "yes"}}}, "train.interface_options: --interface-option (interface_options={'normalize': 'yes'}): normalize: expected true"),
    ({"tasks": {"asr": {"stores": ["x.zarr"]}}}, "tasks.asr.stores: unknown key"),
    ({"tasks": {"er": {"steps": 3}}}, "tasks.er: 'er' is not a task: add `task:`"),
    ({"tasks": {"sv": {"task": "verify"}}}, "tasks.sv.trials.dev: missing"),
    ({"tasks": {"sv": {"task": "verify", "trials": {"dev": "t.txt"}}}}, "tasks.sv.trials.test: missing"),
    ({"tasks": {"asr": {"folds": [1, 2]}}}, "tasks.asr.manifests: a task with folds needs its own manifests"),
    ({"tasks": {"asr": {"extract_from": ["demo-train"]}}}, "tasks.asr.extract_from: expected a non-empty string"),
    ({"tasks": {"asr": {"extract_from": "x-{fold}"}}}, "tasks.asr.extract_from: {fold} is not allowed"),
    ({"tasks": {"asr": {"manifest": "demo-train"}}}, "tasks.asr.manifest: unknown key"),
    ({"train": {"lr": "fast"}}, "train.lr: --lr (lr='fast'): must be a positive number"),
    ({"train": {"crop_seconds": "2-8"}}, "train.crop_seconds: --crop-seconds (crop_seconds='2-8'): give MIN,MAX"),
    ({"train": {"interface_options": {"stride": 2}}}, "train.interface_options: --interface-option (interface_options={'stride': 2}): stride: unknown to interface weighted-sum"),
    ({"manifests": {"train": "demo-train"}}, "manifests: needs dev or test"),
    ({"extract": {"dtype": "int4"}}, "extract.dtype: unknown value 'int4'"),
    ({"paper": {"asr": {"toy-wavlm": {"hconv-ad": 4.5}}}}, "paper.asr.toy-wavlm.hconv-ad: unknown key"),
    ({"paper": {"asr": {"toy-wavlm": {"hconv-add": "good"}}}}, "paper.asr.toy-wavlm.hconv-add: expected float"),
    ({"paper": {"classify": {}}}, "paper.classify: unknown key"),
])
def test_malformed_recipe_error_names_the_key(tmp_path, change, message):
    path = _write(tmp_path, _recipe(**change))
    with pytest.raises(FusionpipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_missing_required_key_and_bad_yaml_are_named(tmp_path):
    r = _recipe()
    del r["grid"]
    with pytest.raises(FusionpipeError, match="grid: missing"):
        load_recipe(_write(tmp_path, r))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(FusionpipeError, match="not valid YAML"):
        load_recipe(bad)


def test_recipe_defaults_and_yaml_exponent_without_dot(tmp_path):
    r = _recipe(train={"lr": "1e-3"})  # YAML 1.1 reads 1e-3 as a string
    recipe = load_recipe(_write(tmp_path, r))
    assert recipe.tasks["asr"].settings["lr"] == 1e-3
    assert recipe.cache == "cache" and recipe.extract["dtype"] == "float16"
    # one upstream: merging is the identity, so only the first merge is trained
    assert recipe.variants(["toy-wavlm"]) == [("weighted-sum", "add"), ("hconv", "add")]
    assert len(recipe.variants(["toy-wavlm", "toy-whisper"])) == 4


def _missing_tasks(recipe: dict) -> list[str]:
    """The trainer tasks a recipe names that this registry lacks (cross-task.yaml's phoneme and diarize come
    from other branches)."""
    from fusionpipe.train.tasks import TASKS

    return sorted({(spec or {}).get("task", name) for name, spec in recipe["tasks"].items()} - set(TASKS))


def _skip_without_its_tasks(path: Path) -> None:
    missing = _missing_tasks(yaml.safe_load(path.read_text()))
    if missing:
        pytest.skip(f"{path.name} needs the tasks {', '.join(missing)}, which this registry does not have yet")


@pytest.mark.parametrize("path", sorted(STAGES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_stages_recipe_validates_and_plans(path, tmp_path, monkeypatch):
    """Paper recipes plan on a machine without the data: the missing manifests are reported, not crashed on."""
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # no manifests/, cache/ or results/ here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    _skip_without_its_tasks(path)
    recipe = load_recipe(path)
    plan = plan_recipe(recipe)
    assert plan.runs and plan.extractions
    assert all(e.bytes_per_second > 0 for e in plan.extractions)
    if path.stem.startswith("paper-"):
        assert any("fusionpipe manifest" in p for p in plan.problems)
        assert any("not in the local Hugging Face cache" in p for p in plan.problems)
        with pytest.raises(FusionpipeError, match="cannot run"):
            run_recipe(recipe, dry_run=True, echo=lambda s: None)
    else:  # bundled corpus and toy upstreams: nothing missing
        assert plan.problems == []
        assert all(e.status == "missing" and e.bytes > 0 for e in plan.extractions)
        assert all(r.status == "train" for r in plan.runs)


@pytest.mark.parametrize("name", ["paper-table1-superb.yaml", "paper-table2-large.yaml"])
def test_paper_recipes_extract_iemocap_once_per_upstream(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(STAGES / name)
    plan = plan_recipe(recipe)
    er = [e for e in plan.extractions if e.manifest.startswith("iemocap")]
    assert sorted(e.upstream for e in er) == sorted(recipe.upstreams) and {e.manifest for e in er} == {"iemocap"}
    assert plan.describe().count("cache/iemocap") == len(recipe.upstreams)
    fold2 = next(x for x in plan.runs if x.task.name == "er" and x.fold == "2")
    assert fold2.config["stores"] == fold2.config["dev_stores"] == fold2.test_stores
    assert all(s.startswith("cache/iemocap/") for s in fold2.test_stores)
    assert (fold2.config["manifest"], fold2.config["dev_manifest"], fold2.test_manifest) == tuple(
        f"manifests/iemocap-fold2-{split}.tsv" for split in ("train", "dev", "test"))


def test_paper_recipes_carry_table_one_numbers():
    recipe = load_recipe(STAGES / "paper-table1-librispeech.yaml")
    assert recipe.paper["asr"]["wavlm-base-plus"] == {"weighted-sum-add": 5.40, "hconv-add": 4.78}
    superb = load_recipe(STAGES / "paper-table1-superb.yaml")
    assert superb.tasks["er"].folds == ["1", "2", "3", "4", "5"] and superb.tasks["sv"].task == "verify"


@pytest.mark.parametrize("where, setting, flag", [
    ("tasks", {"steps": -5}, "--steps"), ("train", {"max_frames": -400}, "--max-frames"), ("train", {"lr": -1e-3}, "--lr"),
    ("train", {"seeds": []}, "--seeds"), ("train", {"seed": 2**64}, "--seed"), ("tasks", {"eval_every": 0}, "--eval-every"),
])
def test_a_recipe_setting_train_would_refuse_is_refused_by_trains_own_check_naming_the_key(tmp_path, where, setting,
                                                                                          flag):
    """A recipe's settings go through `fusionpipe train`'s checks (TrainConfig.check_settings) when the recipe
    is read: the error names the key path and the flag, and nothing is planned or extracted."""
    r = _recipe(cache=str(tmp_path / "cache"), results=str(tmp_path / "results"))
    if where == "tasks":
        r["tasks"]["asr"].update(setting)
    else:
        r["train"].update(setting)
    key = f"{'tasks.asr' if where == 'tasks' else 'train'}.{next(iter(setting))}"
    with pytest.raises(FusionpipeError, match=rf"r\.yaml: {key}: {flag} \("):
        load_recipe(_write(tmp_path, r))
    assert not (tmp_path / "cache").exists()


def test_a_setting_of_the_wrong_type_is_refused_whatever_its_field(tmp_path):
    """Every settable TrainConfig field is checked (no annotation the checker cannot read passes by)."""
    from fusionpipe.ablate.recipe import RUN_KEYS
    from fusionpipe.train.config import TrainConfig
    import dataclasses

    for field in (f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUN_KEYS):
        r = _recipe(tasks={"asr": {}})  # nothing of its own: train's settings are the task's
        r["train"][field] = {"not": ["a", "setting"]} if field not in ("head_options", "interface_options") else 3
        with pytest.raises(FusionpipeError, match=rf"train\.{field}: "):
            load_recipe(_write(tmp_path, r))


def test_dry_run_refuses_missing_audio_and_weights(tmp_path, monkeypatch, make_manifest):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    manifest = make_manifest(tmp_path / "c", "gone", [0.5, 0.6])
    for wav in (tmp_path / "c" / "audio").iterdir():
        wav.unlink()
    (tmp_path / "c" / "audio").rmdir()
    r = _recipe(manifests={"train": str(manifest.source), "test": str(manifest.source)},
                upstreams=["wavlm-base-plus"],
                grid={"upstream_sets": [["wavlm-base-plus"]], "fusion": ["hconv"], "merge": ["add"]},
                cache=str(tmp_path / "cache"), results=str(tmp_path / "results"))
    with pytest.raises(FusionpipeError) as e:
        run_recipe(load_recipe(_write(tmp_path, r)), dry_run=True, echo=lambda s: None)
    msg = str(e.value)
    assert "audio root" in msg and "does not exist" in msg
    assert "huggingface-cli download microsoft/wavlm-base-plus" in msg


def test_weights_in_the_hf_cache_are_found_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--microsoft--wavlm-base-plus"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert ablation._weights_problem("wavlm-base-plus") is not None
    for f in ("config.json", "pytorch_model.bin"):
        (snapshot / f).write_text("{}")
    assert ablation._weights_problem("wavlm-base-plus") is None
    assert ablation._weights_problem("toy-wavlm") is None


@pytest.fixture
def tiny_recipe(tmp_path, make_manifest):
    """Two variants (weighted-sum and hconv on one toy upstream), a few steps on a tiny corpus."""
    paths = {split: make_manifest(tmp_path / "corpus", f"tiny-{split}", d, seed=s).source
             for split, d, s in (("train", [0.9, 0.7, 1.1, 0.8, 0.6, 1.0], 0), ("dev", [0.8, 0.9], 10),
                                 ("test", [0.7, 1.0], 20))}
    r = {"name": "tiny", "cache": str(tmp_path / "cache"), "results": str(tmp_path / "results"),
         "manifests": {k: str(v) for k, v in paths.items()}, "upstreams": ["toy-wavlm"],
         "tasks": {"classify": {"head_options": {"proj": 8}, "steps": 4, "eval_every": 2}},
         "grid": {"upstream_sets": [["toy-wavlm"]], "fusion": ["weighted-sum", "hconv"], "merge": ["add"]},
         "train": {"lr": 1e-3, "max_frames": 200, "seed": 0},
         "paper": {"classify": {"toy-wavlm": {"hconv-add": 50.0}}}}
    return _write(tmp_path, r, "tiny.yaml")


@pytest.mark.slow
def test_two_variant_recipe_runs_end_to_end_and_reruns_incrementally(tiny_recipe, tmp_path, monkeypatch):
    import matplotlib.image

    from fusionpipe.train import evaluation
    from fusionpipe.train import loop as stage3

    recipe = load_recipe(tiny_recipe)
    calls = []
    real_train = stage3.train
    monkeypatch.setattr(stage3, "train", lambda cfg, **kw: calls.append(cfg) or real_train(cfg, **kw))
    devices, real_evaluate = [], evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **kw: devices.append(kw["device"]) or real_evaluate(*a, **kw))
    run_recipe(recipe, progress=False, echo=lambda s: None)
    assert len(calls) == 1 and sorted(calls[0].fusion) == ["hconv", "weighted-sum"]  # both variants, one pass
    assert devices == [calls[0].device]  # the test set is scored where the run trained

    out = tmp_path / "results" / "tiny"
    md = (out / "results.md").read_text()
    assert "| toy-wavlm |" in md and "weighted-sum / add" in md and "hconv / add" in md
    assert " (50.00)" in md  # paper value beside ours
    assert "Computational overhead" in md
    rows = (out / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3
    for col in ("task", "upstreams", "fusion", "merge", "accuracy", "trainable_params", "train_seconds_per_epoch",
                "inference_seconds", "paper"):
        assert col in header
    hconv = dict(zip(header, next(r for r in rows[1:] if ",hconv," in r).split(",")))
    assert hconv["paper"] == "50" and int(hconv["trainable_params"]) > int(hconv["interface_params"]) > 0
    for png in ("classify-accuracy.png", "classify-loss.png"):
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    run_dir = out / "runs" / "classify" / "toy-wavlm"
    assert set(json.loads((run_dir / "test.json").read_text())) == {"weighted-sum-add", "hconv-add"}
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    stores = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}

    plan = run_recipe(load_recipe(tiny_recipe), progress=False, echo=lambda s: None)  # nothing left to do
    assert len(calls) == 1
    assert all(not e.todo for e in plan.extractions) and [r.status for r in plan.runs] == ["done"]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == stamps
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()} == stores
    assert (out / "results.md").read_text() == md

    # a changed setting is refused, not mixed with the old run
    changed = yaml.safe_load(tiny_recipe.read_text())
    changed["tasks"]["classify"]["steps"] = 6
    tiny_recipe.write_text(yaml.safe_dump(changed))
    plan = plan_recipe(load_recipe(tiny_recipe))
    assert plan.runs[0].status == "stale" and "steps: 4 -> 6" in plan.problems[0]
    with pytest.raises(FusionpipeError, match="delete that directory"):
        run_recipe(load_recipe(tiny_recipe), progress=False, echo=lambda s: None)


@pytest.mark.slow
def test_recipe_seeds_train_in_one_pass_and_report_mean_std_and_layer_pictures(tiny_recipe, tmp_path, monkeypatch):
    import csv

    from fusionpipe.train import loop as stage3

    r = yaml.safe_load(tiny_recipe.read_text())
    r["train"]["seeds"] = [0, 1]
    calls = []
    real_train = stage3.train
    monkeypatch.setattr(stage3, "train", lambda cfg, **kw: calls.append(cfg) or real_train(cfg, **kw))
    run_recipe(load_recipe(_write(tmp_path, r, "seeds.yaml")), progress=False, echo=lambda s: None)
    assert len(calls) == 1 and calls[0].seeds == [0, 1]  # 2 variants x 2 seeds, one pass
    out = tmp_path / "results" / "tiny"
    run_dir = out / "runs" / "classify" / "toy-wavlm"
    assert set(json.loads((run_dir / "test.json").read_text())) == {
        "weighted-sum-add@s0", "weighted-sum-add@s1", "hconv-add@s0", "hconv-add@s1"}
    md = (out / "results.md").read_text()
    assert "mean ± std over 2 seeds (seeds 0, 1)" in md and " ± " in md.split("| toy-wavlm |")[1].splitlines()[0]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {row["seeds"] for row in rows} == {"2"} and all(row["ours_std"] != "" for row in rows)
    assert "## What the layers say" in md and "knocking out layer" in md and "within toy-wavlm: mean CKA" in md
    assert (out / "classify-toy-wavlm-layer-use.png").is_file()
    assert (out / "analysis" / "cka-toy-wavlm" / "cka.png").is_file()
    assert (run_dir / "analysis" / "layer-use.csv").is_file()
    assert "stuck" not in md.split("## What the layers say")[0] and {row["stuck"] for row in rows} == {"0"}


@pytest.mark.slow  # 7 s on 2 cores
def test_the_report_flags_seeds_stuck_on_the_blank_plateau(tiny_recipe, tmp_path):
    import csv

    from fusionpipe.ablate.report import write_report

    r = yaml.safe_load(tiny_recipe.read_text())
    r["train"]["seeds"] = [0, 1]
    plan = run_recipe(load_recipe(_write(tmp_path, r, "seeds.yaml")), progress=False, echo=lambda s: None)
    results = tmp_path / "results" / "tiny" / "runs" / "classify" / "toy-wavlm" / "hconv-add@s1" / "results.json"
    saved = json.loads(results.read_text())
    results.write_text(json.dumps({**saved, "plateau": {"stuck": True, "blank_evaluations": 3, "since": 2}}))
    write_report(plan)
    md = (tmp_path / "results" / "tiny" / "results.md").read_text()
    row = md.split("| toy-wavlm |")[1].splitlines()[0]
    assert row.count("† 1/2 stuck") == 1 and "k of the n seeds ended on the CTC blank plateau" in md
    rows = {row["variant"]: row["stuck"] for row in csv.DictReader(open(tmp_path / "results" / "tiny" / "results.csv"))}
    assert rows == {"weighted-sum-add": "0", "hconv-add": "1"}


def test_cli_ablate_dry_run_prints_plan(tiny_recipe):
    from typer.testing import CliRunner

    from fusionpipe.cli import app

    result = CliRunner().invoke(app, ["ablate", str(tiny_recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "classify / toy-wavlm" in result.output and "extract" in result.output


def _folds_corpus(tmp_path, make_manifest, rows_of_fold=None):
    """An 8-utterance corpus (labels c0 / c1) and two folds of it: fold k tests on utterances 4(k-1)..4k-1,
    trains on the others but one (dev). Returns the folder of the TSVs."""
    from fusionpipe.manifest import Manifest, write_manifest

    whole = make_manifest(tmp_path / "corpus", "corpus", [0.9, 0.7, 1.1, 0.8, 0.6, 1.0, 0.75, 0.85])
    rows = whole.utterances
    for k in (1, 2):
        test = rows[4 * (k - 1):4 * k]
        rest = [u for u in rows if u not in test]
        for split, part in (("train", rest[1:]), ("dev", rest[:2]), ("test", test)):
            part = rows_of_fold(k, split, part) if rows_of_fold else part
            write_manifest(Manifest(f"corpus-fold{k}-{split}", whole.root, part),
                           tmp_path / "corpus" / f"corpus-fold{k}-{split}.tsv", root="audio")
    return tmp_path / "corpus"


def _folds_recipe(tmp_path, corpus) -> Path:
    r = {"name": "folds", "cache": str(tmp_path / "cache"), "results": str(tmp_path / "results"),
         "manifest_dir": str(corpus), "upstreams": ["toy-wavlm", "toy-whisper"],
         "tasks": {"er": {"task": "classify", "folds": [1, 2], "extract_from": "corpus",
                          "manifests": {s: f"corpus-fold{{fold}}-{s}" for s in ("train", "dev", "test")},
                          "head_options": {"proj": 8}, "steps": 3, "eval_every": 3}},
         "grid": {"upstream_sets": [["toy-wavlm", "toy-whisper"]], "fusion": ["weighted-sum"], "merge": ["add"]},
         "train": {"lr": 1e-3, "max_frames": 200, "seed": 0}}
    return _write(tmp_path, r, "folds.yaml")


@pytest.mark.slow
def test_folds_with_extract_from_extract_each_upstream_once_and_run_every_fold(tmp_path, monkeypatch, make_manifest):
    from fusionpipe.extract import stage as stage1
    from fusionpipe.train import evaluation

    recipe = load_recipe(_folds_recipe(tmp_path, _folds_corpus(tmp_path, make_manifest)))
    plan = plan_recipe(recipe)
    assert plan.problems == []
    assert [(e.manifest, e.upstream) for e in plan.extractions] == [("corpus", "toy-wavlm"), ("corpus", "toy-whisper")]
    extracted, evaluated = [], []
    real_extract, real_evaluate = stage1.extract, evaluation.evaluate
    monkeypatch.setattr(stage1, "extract", lambda m, up, *a, **kw: extracted.append(m.name) or real_extract(m, up, *a, **kw))
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **kw: evaluated.append(kw["manifest"]) or real_evaluate(*a, **kw))
    run_recipe(recipe, progress=False, echo=lambda s: None)

    assert extracted == ["corpus", "corpus"]  # one extraction per upstream, not one per fold and split
    assert sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").glob("*/*.zarr")) == [
        "corpus/toy-wavlm.zarr", "corpus/toy-whisper.zarr"]
    assert evaluated == [str(tmp_path / "corpus" / f"corpus-fold{k}-test.tsv") for k in (1, 2)]
    runs = tmp_path / "results" / "folds" / "runs" / "er" / "toy-wavlm+toy-whisper"
    for k in (1, 2):
        cfg = json.loads((runs / f"fold-{k}" / "config.json").read_text())
        assert cfg["manifest"].endswith(f"corpus-fold{k}-train.tsv") and cfg["dev_manifest"].endswith(f"fold{k}-dev.tsv")
        assert cfg["stores"] == cfg["dev_stores"] and "weighted-sum-add" in json.loads(
            (runs / f"fold-{k}" / "test.json").read_text())
    csv_rows = (tmp_path / "results" / "folds" / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 2 and ",2,test," in csv_rows[1]  # the mean of both folds, on test
    assert [r.status for r in plan_recipe(recipe).runs] == ["done", "done"]


def test_split_rows_outside_extract_from_are_a_plan_problem(tmp_path, make_manifest):
    from fusionpipe.manifest import Utterance

    def stray(k, split, part):  # fold 2's test set holds an utterance that corpus.tsv lacks
        return part + [Utterance("stray", "stray.wav", 100, 16000, label="c0")] if (k, split) == (2, "test") else part

    plan = plan_recipe(load_recipe(_folds_recipe(tmp_path, _folds_corpus(tmp_path, make_manifest, stray))))
    assert len(plan.problems) == 1
    assert "corpus-fold2-test.tsv row 5 (id stray) is not in manifest" in plan.problems[0]
    assert "tasks.er.extract_from must name a manifest that holds every row" in plan.problems[0]


def test_dry_run_disk_estimate_follows_the_recipe_codec(tmp_path):
    """The plan's bytes per audio-second are L x D x frame rate x the codec's measured ratio."""
    from fusionpipe.codecs import CODECS

    rates = {}
    for codec in ("zstd", "int8"):
        recipe = load_recipe(_write(tmp_path, _recipe(extract={"codec": codec}), f"{codec}.yaml"))
        rates[codec] = {e.upstream: e.bytes_per_second for e in plan_recipe(recipe).extractions}
    for upstream, zstd in rates["zstd"].items():
        assert rates["int8"][upstream] == pytest.approx(zstd * CODECS["int8"].ratio / CODECS["zstd"].ratio, rel=1e-3)


def _cross_task_rows(values: dict) -> list[dict]:
    """Report rows as `collect` makes them, from {(task, upstreams, variant): (mean %, std % or None)}."""
    return [{"task": t, "upstreams": s, "variant": v, "ours": m, "ours_std": sd} for (t, s, v), (m, sd) in values.items()]


def test_the_cross_task_table_says_per_task_whether_the_papers_ordering_holds(tmp_path):
    from fusionpipe.ablate.report import cross_task

    recipe = load_recipe(_write(tmp_path, _recipe(
        tasks={"asr": {"metric": "cer"}, "er": {"task": "classify"}},
        grid={"upstream_sets": [["toy-wavlm"], ["toy-whisper"], ["toy-wavlm", "toy-whisper"]],
              "fusion": ["weighted-sum", "hconv"], "merge": ["add", "concat"]})))
    fused = "toy-wavlm+toy-whisper"
    rows = _cross_task_rows({
        # asr, lower is better: HConv beats WS beyond the spread; fused beats wavlm, ties whisper within the spread
        ("asr", fused, "hconv-add"): (20.0, 1.0), ("asr", fused, "weighted-sum-add"): (30.0, 1.0),
        ("asr", fused, "hconv-concat"): (25.0, 1.0), ("asr", fused, "weighted-sum-concat"): (35.0, 1.0),
        ("asr", "toy-wavlm", "hconv-add"): (40.0, 2.0), ("asr", "toy-wavlm", "weighted-sum-add"): (41.0, 2.0),
        ("asr", "toy-whisper", "hconv-add"): (21.5, 1.0), ("asr", "toy-whisper", "weighted-sum-add"): (22.0, 1.0),
        # er, higher is better: WS beats HConv (reversed), fused beats wavlm, whisper beats fused (reversed)
        ("er", fused, "hconv-add"): (50.0, 1.0), ("er", fused, "weighted-sum-add"): (60.0, 2.0),
        ("er", "toy-wavlm", "hconv-add"): (45.0, 1.0), ("er", "toy-whisper", "hconv-add"): (70.0, 3.0),
    })
    md = "\n".join(cross_task(recipe, rows))
    assert "## Across tasks: does the paper's ordering hold?" in md
    asr_row = next(line for line in md.splitlines() if line.startswith("| asr (cer"))
    assert ("| hconv-add 20.00 ± 1.00, hconv-concat 25.00 ± 1.00, weighted-sum-add 30.00 ± 1.00, "
            "weighted-sum-concat 35.00 ± 1.00 |") in asr_row  # lower is better: smallest first
    assert f"| {fused} 20.00 ± 1.00, toy-whisper 21.50 ± 1.00, toy-wavlm 40.00 ± 2.00 |" in asr_row
    assert "| add: holds; concat: holds | toy-wavlm: holds; toy-whisper: within the seed spread |" in asr_row
    assert ("- **asr**: HConv over the weighted sum (add) holds (20.00 ± 1.00 vs 30.00 ± 1.00); HConv over the "
            "weighted sum (concat) holds (25.00 ± 1.00 vs 35.00 ± 1.00); the fused set over "
            "toy-wavlm holds (20.00 ± 1.00 vs 40.00 ± 2.00); the fused set over toy-whisper within the seed spread "
            "(20.00 ± 1.00 vs 21.50 ± 1.00).") in md
    er_row = next(line for line in md.splitlines() if line.startswith("| er (accuracy"))
    assert "| weighted-sum-add 60.00 ± 2.00, hconv-add 50.00 ± 1.00 |" in er_row  # higher is better: largest first
    assert "| add: reversed; concat: not run | toy-wavlm: holds; toy-whisper: reversed |" in er_row

    one_seed = _cross_task_rows({("asr", fused, "hconv-add"): (20.0, None), ("asr", fused, "weighted-sum-add"): (19.0, None),
                                 ("er", fused, "hconv-add"): (50.0, None)})
    md = "\n".join(cross_task(recipe, one_seed))
    assert "HConv over the weighted sum (add) reversed (20.00 vs 19.00, one seed: no spread to judge by)" in md
    assert "the fused set over toy-wavlm was not run" in md and "HConv over the weighted sum (add) was not run" in md
    only_asr = [r for r in rows if r["task"] == "asr"]
    assert cross_task(recipe, only_asr) == []  # one task: its own table says it all
    singles = load_recipe(_write(tmp_path, _recipe(
        tasks={"asr": {"metric": "cer"}, "er": {"task": "classify"}},
        grid={"upstream_sets": [["toy-wavlm"], ["toy-whisper"]], "fusion": ["weighted-sum", "hconv"],
              "merge": ["add"]}), "singles.yaml"))
    assert "| add: within the seed spread | no fused set in the grid |" in "\n".join(cross_task(singles, rows))


def test_bundled_corpus_names_resolve_from_any_directory(tmp_path, monkeypatch):
    from fusionpipe.ablate.recipe import manifest_path
    from fusionpipe.manifest import CORPUS

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(_write(tmp_path, _recipe()))
    for name in ("demo-train", "keywords-dev", "mix-test"):
        assert manifest_path(recipe, name) == CORPUS / f"{name}.tsv"
    assert manifest_path(recipe, "mine") == Path("manifests") / "mine.tsv"


def test_the_cross_task_recipe_plans_every_task_the_registry_has(tmp_path, monkeypatch):
    """Every task of stages/cross-task.yaml that this registry has plans from any directory, on the bundled
    corpus alone; the others are left out here by name (and run once their branches are merged)."""
    monkeypatch.chdir(tmp_path)
    r = yaml.safe_load((STAGES / "cross-task.yaml").read_text())
    missing = _missing_tasks(r)
    r["tasks"] = {k: v for k, v in r["tasks"].items() if v.get("task", k) not in missing}
    assert {"asr", "ks", "er", "sv"} <= set(r["tasks"])
    plan = plan_recipe(load_recipe(_write(tmp_path, r)))
    assert plan.problems == []
    assert len(plan.runs) == 3 * len(r["tasks"]) and all(len(x.names) == 3 * len(x.variants) for x in plan.runs)
    assert {e.manifest for e in plan.extractions} >= {"keywords-train", "demo-test"} | (
        set() if "diarize" in missing else {"mix-train"})
    if missing:
        pytest.skip(f"planned without {', '.join(missing)} (not in this registry yet)")


@pytest.mark.slow  # about 30 s on 2 cores
def test_a_tiny_two_task_run_gets_the_cross_task_check(tmp_path, make_manifest):
    paths = {split: make_manifest(tmp_path / "corpus", f"tiny-{split}", d, seed=s).source
             for split, d, s in (("train", [0.9, 0.7, 1.1, 0.8, 0.6, 1.0], 0), ("dev", [0.8, 0.9], 10),
                                 ("test", [0.7, 1.0], 20))}
    r = {"name": "tiny", "cache": str(tmp_path / "cache"), "results": str(tmp_path / "results"),
         "manifests": {k: str(v) for k, v in paths.items()}, "upstreams": ["toy-wavlm", "toy-whisper"],
         "tasks": {"asr": {"head_options": {"proj": 8, "hidden": 8, "layers": 1}, "steps": 3, "metric": "cer"},
                   "classify": {"head_options": {"proj": 8}, "steps": 3}},
         "grid": {"upstream_sets": [["toy-wavlm"], ["toy-whisper"], ["toy-wavlm", "toy-whisper"]],
                  "fusion": ["weighted-sum", "hconv"], "merge": ["add"]},
         "train": {"lr": 1e-3, "max_frames": 200, "seeds": [0, 1]}}
    run_recipe(load_recipe(_write(tmp_path, r, "tiny.yaml")), progress=False, echo=lambda s: None)
    md = (tmp_path / "results" / "tiny" / "results.md").read_text()
    check = md.split("## Across tasks: does the paper's ordering hold?")[1]
    for task in ("asr", "classify"):
        sentence = next(line for line in check.splitlines() if line.startswith(f"- **{task}**: "))
        assert sentence.count(" ± ") == 6  # three comparisons, each of two means with their seed spread
        assert sum(sentence.count(v) for v in ("holds (", "reversed (", "within the seed spread (")) == 3
