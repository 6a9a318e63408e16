"""The recipe: a YAML file under stages/ that chains the three stages, its schema and its checks.

    >>> recipe = load_recipe("stages/ablation.yaml")          # doctest: +SKIP
    >>> print(plan_recipe(recipe).describe())                 # what is cached, what would run
    >>> run_recipe(recipe)                                    # extract, train, evaluate, report

The recipe (every key is checked; an unknown, missing or mistyped one is an error naming it)::

    name: ablation                    # results go to <results>/<name>/
    cache: cache                      # root of the feature stores (default: cache)
    results: results                  # default: results
    manifest_dir: manifests           # where a bare manifest name is looked up (default: manifests)
    manifests: {train: demo-train, dev: demo-dev, test: demo-test}
    upstreams: [toy-wavlm, toy-hubert, toy-whisper]   # extracted over every manifest of every task
                                                      # (or a task's extract_from alone)
    extract: {dtype: float16, device: auto, codec: zstd, max_seconds: 160, skip_bad: false}
    tasks:                            # <name>: {settings}; the name is the `task` column
      asr: {head_options: {proj: 32, hidden: 32, layers: 1}, steps: 200, eval_every: 100, metric: cer}
      classify: {head_options: {proj: 32}, steps: 100}
      er:                             # a task named otherwise says which trainer task it is
        task: classify
        folds: [1, 2, 3, 4, 5]        # one run per fold, {fold} in manifests / trials; mean reported
        extract_from: iemocap         # stores extracted once, over the whole corpus (see below)
        manifests: {train: iemocap-fold{fold}-train, dev: iemocap-fold{fold}-dev,
                    test: iemocap-fold{fold}-test}
      sv: {task: verify, manifests: {...}, trials: {test: manifests/voxceleb1-trials.txt}}
    grid:
      upstream_sets: [[toy-wavlm], [toy-wavlm, toy-whisper], [toy-wavlm, toy-hubert, toy-whisper]]
      fusion: [weighted-sum, gumbel, hconv]
      merge: [add, concat]
    train: {lr: 1.0e-3, max_frames: 4000, seed: 0}   # TrainConfig fields, for every task
                                      # seeds: [0, 1, 2]: every variant once per seed, in the same pass;
                                      # the report gives mean +- std over them
    paper:                            # optional: task -> upstream set -> variant -> value in %
      asr: {"wavlm-base-plus+whisper-small": {weighted-sum-add: 4.77, hconv-add: 4.93}}

- Manifests: a bundled name (demo-*, keywords-*, mix-* train/dev/test: the corpus inside the package),
  a path to a TSV, or a bare name looked up as <manifest_dir>/<name>.tsv (what `fusionpipe
  manifest ...` writes). Every task needs `train` and at least one of `dev` and `test`; a
  task's own `manifests` replace the recipe's. Trial lists (verify): `trials: {dev:, test:}`,
  paths, or `demo-trials` for the bundled corpus's list: one for each of the task's dev and
  test manifests (a verify task without dev trains `steps` and keeps its last parameters).
- `extract_from: <manifest>` (per task): the task's stores are extracted ONCE, over that manifest,
  and its split (and fold) manifests choose rows of them: train, dev and test all read the same
  stores, each split its own utterances and labels (TrainConfig `manifest` / `dev_manifest`,
  `evaluate(manifest=)`). Cross-validation folds cover a corpus once per fold, so without it
  IEMOCAP's 5 folds run every upstream over the corpus 5 times. Every row of a split manifest
  must be a row of it (same id, path, num_samples and sample_rate): the plan checks, before
  extracting.
- Settings (recipe `train:`, overridden per task): any `TrainConfig` field but those the
  recipe sets itself (stores, task, fusion, merge, out, dev_stores, manifest, dev_manifest,
  trials), checked per task by `fusionpipe train`'s own checks (`TrainConfig.check_settings`:
  types, ranges, `head_options` against the task's head, `interface_options` against every
  fusion in the grid), so the recipe refuses exactly what the command line refuses.
- An upstream set is named by its aliases joined with "+", in the order given; a variant is
  "<fusion>-<merge>". A set of ONE upstream trains each fusion once, under the first merge
  of the grid: merging one stack is the identity, so add and concat would be the same run.
- `metric`: what the tables and plots report (asr: wer or cer; classify: accuracy or macro_f1;
  default: the trainer's primary metric, which also picks the best checkpoint on dev).
- Paper values are percentages, as in the paper's tables; ours are shown in % beside them.

What `run_recipe` does: extract the (manifest, upstream) stores that are missing or
incomplete (stage 1); per task (and fold) and upstream set, ONE `train()` call trains all its
variants (stage 3, reading each batch once), into <results>/<name>/runs/<task>/<set>[/<fold>];
evaluate the best checkpoints on the test stores (`test.json`); then write (report.py) results.csv,
results.md and PNG plots. A run whose variants all have results.json and whose test.json is
there is skipped, so a rerun only does what is missing; a run whose saved config differs from
the recipe is refused (delete its directory to retrain), never silently mixed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import BUNDLED, CORPUS
from fusionpipe.names import upstream_set_name
from fusionpipe.train.rundir import variant_grid, variant_name

SPLITS = ("train", "dev", "test")
# keys of TrainConfig the recipe fills in itself, per run
RUN_KEYS = ("stores", "task", "fusion", "merge", "out", "dev_stores", "manifest", "dev_manifest", "trials")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ---- the recipe --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """One entry of `tasks:`; ``manifests`` and ``trials`` may hold {fold}."""

    name: str
    task: str                    # the trainer's task: asr | classify | verify | multilingual
    manifests: dict[str, str]    # split -> manifest reference
    trials: dict[str, str]       # dev / test -> trial list path
    folds: list[str]             # [] without folds
    settings: dict[str, Any]     # TrainConfig fields (recipe `train:` then the task's own)
    metric: str | None = None    # what the tables report (default: the trainer's primary metric)
    extract_from: str | None = None  # one manifest whose stores every split and fold reads rows of

    def store_manifest(self, split: str, fold: str | None) -> str:
        """The manifest reference whose stores the split reads."""
        return self.extract_from or fill_fold(self.manifests[split], fold)

    def fold_list(self) -> list[str | None]:
        return list(self.folds) or [None]


@dataclass(frozen=True)
class Recipe:
    name: str
    source: Path
    cache: str
    results: str
    manifest_dir: str
    upstreams: list[str]
    extract: dict[str, Any]
    tasks: dict[str, TaskSpec]
    upstream_sets: list[list[str]]
    fusion: list[str]
    merge: list[str]
    paper: dict[str, dict[str, dict[str, float]]]

    @property
    def out(self) -> Path:
        return Path(self.results) / self.name

    def variants(self, upstreams: list[str]) -> list[tuple[str, str]]:
        merges = self.merge[:1] if len(upstreams) == 1 else self.merge
        return [(f, m) for f, m, _ in variant_grid(self.fusion, merges)]


class _Checker:
    """Raises FusionpipeError("<file>: <key path>: <what is wrong>")."""

    def __init__(self, source: Path):
        self.source = source

    def fail(self, where: str, msg: str):
        raise FusionpipeError(f"{self.source}: {where}: {msg}" if where else f"{self.source}: {msg}")

    def mapping(self, value, where: str, required: tuple = (), optional: tuple = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected a mapping, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str):
                self.fail(where, f"key {k!r} is not a string")
        for k in required:
            if k not in value:
                self.fail(f"{where}.{k}" if where else k, "missing (required)")
        allowed = set(required) | set(optional)
        for k in value:
            if k not in allowed:
                self.fail(f"{where}.{k}" if where else k,
                          f"unknown key; allowed here: {', '.join(sorted(allowed))}")
        return value

    def string(self, value, where: str, choices=None, pattern: re.Pattern | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(where, f"expected a non-empty string, got {_kind(value)}")
        if choices is not None and value not in choices:
            self.fail(where, f"unknown value {value!r}; choose one of {', '.join(choices)}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(where, f"{value!r} must be letters, digits, '.', '_' or '-'")
        return value

    def strings(self, value, where: str, choices=None, what: str = "value") -> list[str]:
        if not isinstance(value, list) or not value:
            self.fail(where, f"expected a non-empty list, got {_kind(value)}")
        out = []
        for i, v in enumerate(value):
            if not isinstance(v, str) or not v:
                self.fail(f"{where}[{i}]", f"expected a string, got {_kind(v)}")
            if choices is not None and v not in choices:
                self.fail(f"{where}[{i}]", f"unknown {what} {v!r}; choose one of {', '.join(choices)}")
            if v in out:
                self.fail(f"{where}[{i}]", f"{v!r} is listed twice")
            out.append(v)
        return out

    def number(self, value, where: str) -> float:
        value = _as_float(value)
        if not isinstance(value, float):
            self.fail(where, f"expected float, got {_kind(value)}")
        return value

    def boolean(self, value, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, f"expected bool, got {_kind(value)}")
        return value


def _kind(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _as_float(value):
    """A number as a float, YAML 1.1's 1e-3 (no dot: read as a string) included; anything else as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _known_upstream(name: str) -> bool:
    from fusionpipe.extract.registry import HUB_ID, UPSTREAMS

    return name in UPSTREAMS or Path(name).expanduser().is_dir() or bool(HUB_ID.fullmatch(name))


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe; every error names the file and the key path."""
    path = Path(path)
    c = _Checker(path)
    top = c.mapping(_read_yaml(path), "", required=("name", "tasks", "grid"),
                    optional=("cache", "results", "manifest_dir", "manifests", "upstreams", "extract",
                              "train", "paper"))
    name = c.string(top["name"], "name", pattern=_NAME)
    dirs = {k: c.string(top.get(k, k if k != "manifest_dir" else "manifests"), k)
            for k in ("cache", "results", "manifest_dir")}
    fusion, merge, sets = _grid(c, top["grid"])
    upstreams = _upstreams(c, top["upstreams"], sets) if "upstreams" in top else list(
        dict.fromkeys(m for s in sets for m in s))
    extract = _extract(c, top.get("extract", {}))
    common = _settings(c, top.get("train", {}), "train")
    default_manifests = _manifest_refs(c, top["manifests"], "manifests", False) if "manifests" in top else None
    tasks_raw = top["tasks"]
    if not isinstance(tasks_raw, dict) or not tasks_raw:
        c.fail("tasks", f"expected a non-empty mapping task name -> settings (e.g. tasks: {{asr: {{steps: 200}}}}), "
               f"got {_kind(tasks_raw)}")
    tasks = {key: _task(c, key, spec, common, default_manifests, fusion, merge) for key, spec in tasks_raw.items()}
    paper = _paper(c, top.get("paper", {}), tasks, sets, fusion, merge)
    return Recipe(name, path, dirs["cache"], dirs["results"], dirs["manifest_dir"], upstreams, extract, tasks,
                  sets, fusion, merge, paper)


def _read_yaml(path: Path):
    if not path.is_file():
        raise FusionpipeError(f"recipe {path} does not exist; the bundled ones are in stages/ "
                              "(ablation.yaml, demo.yaml, paper-table1-*.yaml)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FusionpipeError(f"{path}: not valid YAML ({e})") from None


def _grid(c: _Checker, value) -> tuple[list[str], list[str], list[list[str]]]:
    """grid: the interfaces, the merges and the upstream sets, each name known."""
    from fusionpipe.extract.registry import UPSTREAMS
    from fusionpipe.fuse.view import MERGES
    from fusionpipe.train.interfaces import INTERFACES

    grid = c.mapping(value, "grid", required=("upstream_sets", "fusion", "merge"))
    fusion = c.strings(grid["fusion"], "grid.fusion", INTERFACES, "interface")
    merge = c.strings(grid["merge"], "grid.merge", MERGES, "merge")
    sets_raw = grid["upstream_sets"]
    if not isinstance(sets_raw, list) or not sets_raw:
        c.fail("grid.upstream_sets", f"expected a non-empty list of lists of upstreams, got {_kind(sets_raw)}")
    sets: list[list[str]] = []
    for i, s in enumerate(sets_raw):
        members = c.strings(s, f"grid.upstream_sets[{i}]", what="upstream")
        for j, m in enumerate(members):
            if not _known_upstream(m):
                c.fail(f"grid.upstream_sets[{i}][{j}]", f"unknown upstream {m!r}: not a registry alias, a "
                       f"directory or an HF id (owner/name); aliases: {', '.join(UPSTREAMS)}")
        if members in sets:
            c.fail(f"grid.upstream_sets[{i}]", f"{upstream_set_name(members)} is listed twice")
        sets.append(members)
    return fusion, merge, sets


def _upstreams(c: _Checker, value, sets: list[list[str]]) -> list[str]:
    """upstreams: what is extracted; every member of every set among them."""
    from fusionpipe.extract.registry import UPSTREAMS

    upstreams = c.strings(value, "upstreams", what="upstream")
    for j, m in enumerate(upstreams):
        if not _known_upstream(m):
            c.fail(f"upstreams[{j}]", f"unknown upstream {m!r}; aliases: {', '.join(UPSTREAMS)}")
    for i, s in enumerate(sets):
        for j, m in enumerate(s):
            if m not in upstreams:
                c.fail(f"grid.upstream_sets[{i}][{j}]", f"{m!r} is not in upstreams ({', '.join(upstreams)}): "
                       "add it there so that it is extracted")
    return upstreams


def _extract(c: _Checker, value) -> dict[str, Any]:
    """extract: `fusionpipe extract`'s settings, its defaults filled in."""
    from fusionpipe.codecs import CODECS, DEFAULT_CODEC
    from fusionpipe.extract.defaults import DTYPE, MAX_SECONDS
    from fusionpipe.store import DTYPES

    ext = c.mapping(value, "extract", optional=("dtype", "device", "codec", "max_seconds", "skip_bad"))
    extract = {"dtype": DTYPE, "device": "auto", "codec": DEFAULT_CODEC, "max_seconds": MAX_SECONDS, "skip_bad": False}
    if "dtype" in ext:
        extract["dtype"] = c.string(ext["dtype"], "extract.dtype", DTYPES)
    if "codec" in ext:
        extract["codec"] = c.string(ext["codec"], "extract.codec", list(CODECS))
    if "device" in ext:
        extract["device"] = c.string(ext["device"], "extract.device")
    if "max_seconds" in ext:
        extract["max_seconds"] = c.number(ext["max_seconds"], "extract.max_seconds")
        if extract["max_seconds"] <= 0:
            c.fail("extract.max_seconds", "must be > 0")
    if "skip_bad" in ext:
        extract["skip_bad"] = c.boolean(ext["skip_bad"], "extract.skip_bad")
    return extract


def _settable() -> tuple[str, ...]:
    """The TrainConfig fields a recipe may set: all but those it fills in itself per run."""
    from fusionpipe.train.config import TrainConfig

    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUN_KEYS)


def _settings(c: _Checker, value, where: str) -> dict[str, Any]:
    """TrainConfig fields by name; a number of a float field as a float (YAML's 1e-3 included), as the
    command line parses it. Their values are checked per task, by `_check_settings`."""
    from fusionpipe.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return {k: _as_float(v) if hints[k] is float else v
            for k, v in c.mapping(value, where, optional=_settable()).items()}


def _check_settings(c: _Checker, where: str, given: dict, settings: dict, task: str, fusion: list[str],
                    merge: list[str]) -> None:
    """A task's settings through `fusionpipe train`'s own checks (`TrainConfig.check_settings`: types,
    ranges, the head's and every interface's options), one key at a time so that an error names its
    key path (the task's own, else train:'s), then all together."""
    from fusionpipe.train.config import TrainConfig

    def check(values: dict) -> None:  # the stores are not extracted yet: a placeholder passes
        TrainConfig(stores=["planned.zarr"], task=task, fusion=fusion, merge=merge, **values).check_settings()

    for k, v in settings.items():
        try:
            check({k: v})
        except FusionpipeError as e:
            c.fail(f"{where}.{k}" if k in given else f"train.{k}", str(e))
    try:
        check(settings)
    except FusionpipeError as e:
        c.fail(where, str(e))


def _task(c: _Checker, key, spec, common: dict, default_manifests: dict | None, fusion: list[str],
          merge: list[str]) -> TaskSpec:
    """One entry of tasks: its trainer task, manifests, trial lists, folds and settings."""
    from fusionpipe.train.tasks import METRICS, TASKS

    where = f"tasks.{key}"
    c.string(key, where, pattern=_NAME)
    spec = c.mapping(spec if spec is not None else {}, where,
                     optional=("task", "manifests", "trials", "folds", "metric", "extract_from", *_settable()))
    if "task" not in spec and key not in TASKS:
        c.fail(where, f"{key!r} is not a task: add `task:` (one of {', '.join(TASKS)})")
    task = c.string(spec.get("task", key), f"{where}.task", TASKS)
    folds: list[str] = []
    if "folds" in spec:
        if not isinstance(spec["folds"], list) or not spec["folds"]:
            c.fail(f"{where}.folds", f"expected a non-empty list, got {_kind(spec['folds'])}")
        folds = c.strings([str(f) for f in spec["folds"]], f"{where}.folds")
    if "manifests" in spec:
        manifests = _manifest_refs(c, spec["manifests"], f"{where}.manifests", bool(folds))
    elif default_manifests is not None:
        manifests = default_manifests
        if folds:
            c.fail(f"{where}.manifests", "a task with folds needs its own manifests with {fold} in them")
    else:
        c.fail(f"{where}.manifests", "missing: give `manifests:` in the task or at the top of the recipe")
    trials = _trials(c, spec.get("trials", {}), f"{where}.trials", task, manifests)
    given = _settings(c, {k: v for k, v in spec.items() if k in _settable()}, where)
    settings = {**common, **given}
    _check_settings(c, where, given, settings, task, fusion, merge)
    metric = c.string(spec["metric"], f"{where}.metric", METRICS[task]) if "metric" in spec else None
    extract_from = c.string(spec["extract_from"], f"{where}.extract_from") if "extract_from" in spec else None
    if extract_from is not None and "{fold}" in extract_from:
        c.fail(f"{where}.extract_from", "{fold} is not allowed: the point is one extraction for every fold")
    return TaskSpec(key, task, manifests, trials, folds, settings, metric, extract_from)


def _trials(c: _Checker, value, where: str, task: str, manifests: dict[str, str]) -> dict[str, str]:
    """trials: a list for each of a verify task's dev and test manifests, and none for other tasks."""
    trials = {k: c.string(v, f"{where}.{k}") for k, v in c.mapping(value, where, optional=("dev", "test")).items()}
    if task != "verify" and trials:
        c.fail(where, f"only the verify task uses trial lists, this one is {task}")
    for split in ("dev", "test"):
        if task == "verify" and split in manifests and split not in trials:
            c.fail(f"{where}.{split}", f"missing: verify scores the {split} manifest on a trial list "
                   f"(or leave {split} out of the task's manifests)")
    return trials


def _paper(c: _Checker, value, tasks: dict[str, TaskSpec], sets: list[list[str]], fusion: list[str],
           merge: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """paper: task -> upstream set -> variant -> value in %, each name one of the recipe's."""
    paper_raw = c.mapping(value, "paper", optional=tuple(tasks))
    names = [upstream_set_name(s) for s in sets]
    variant_names = [variant_name(*v) for v in variant_grid(fusion, merge)]
    paper: dict[str, dict[str, dict[str, float]]] = {}
    for t, by_set in paper_raw.items():
        by_set = c.mapping(by_set, f"paper.{t}", optional=tuple(names))
        paper[t] = {}
        for s, by_variant in by_set.items():
            by_variant = c.mapping(by_variant, f"paper.{t}.{s}", optional=tuple(variant_names))
            paper[t][s] = {v: c.number(x, f"paper.{t}.{s}.{v}") for v, x in by_variant.items()}
    return paper


def _manifest_refs(c: _Checker, value, where: str, folds: bool) -> dict[str, str]:
    refs = c.mapping(value, where, required=("train",), optional=("dev", "test"))
    out = {k: c.string(refs[k], f"{where}.{k}") for k in SPLITS if k in refs}
    if "dev" not in out and "test" not in out:
        c.fail(where, "needs dev or test (or both) besides train: something to evaluate on")
    if folds and "{fold}" not in out["train"]:
        c.fail(f"{where}.train", "the task has folds, so the train manifest must contain {fold}")
    for k, v in out.items():
        if not folds and "{fold}" in v:
            c.fail(f"{where}.{k}", "{fold} is only allowed in a task with `folds:`")
    return out


def manifest_path(recipe: Recipe, ref: str) -> Path:
    """A manifest reference -> its TSV: a name of the bundled corpus (demo-*, keywords-*, mix-*: so a recipe on
    it runs from any directory), a path, or <manifest_dir>/<name>.tsv."""
    if ref in BUNDLED or (_NAME.fullmatch(ref) and not ref.endswith(".tsv") and (CORPUS / f"{ref}.tsv").is_file()):
        return CORPUS / f"{ref}.tsv"
    if ref.endswith(".tsv") or "/" in ref or os.sep in ref:
        return Path(ref)
    return Path(recipe.manifest_dir) / f"{ref}.tsv"


def trials_path(ref: str) -> Path:
    return CORPUS / "trials.txt" if ref == "demo-trials" else Path(ref)


def fill_fold(ref: str, fold: str | None) -> str:
    """A manifest reference of one fold: {fold} filled in."""
    return ref if fold is None else ref.replace("{fold}", fold)
