"""All three stages from one recipe: a YAML file under stages/ -> plan -> run -> results.

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
    paper:                            # optional: task -> upstream set -> variant -> value in %
      asr: {"wavlm-base-plus+whisper-small": {weighted-sum-add: 4.77, hconv-add: 4.93}}

- Manifests: a bundled name (demo-train, demo-dev, demo-test: the corpus inside the package),
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
  trials); `head_options` (sizes) are checked against the task's head, `interface_options`
  against every fusion in the grid.
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
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from fusionpipe.atomic import write_json
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.run import store_url
from fusionpipe.manifest import BUNDLED, CORPUS, check_subset, read_manifest
from fusionpipe.ablate.report import set_name, write_report
from fusionpipe.train.config import variant_name

SPLITS = ("train", "dev", "test")
# keys of TrainConfig the recipe fills in itself, per run
RUN_KEYS = ("stores", "task", "fusion", "merge", "out", "dev_stores", "manifest", "dev_manifest", "trials")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# how to make a manifest the recipe names but the disk lacks, by name prefix
HOW_TO_MAKE = {
    "librispeech-": "fusionpipe manifest librispeech /path/to/LibriSpeech --split {rest}",
    "voxceleb1-": "fusionpipe manifest voxceleb /path/to/VoxCeleb1 --trials /path/to/veri_test2.txt",
    "iemocap": "fusionpipe manifest iemocap /path/to/IEMOCAP_full_release",
    "mlsuperb-": "fusionpipe manifest mlsuperb /path/to/ml_superb/data",
}


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
        return self.extract_from or _fill(self.manifests[split], fold)

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
        return [(f, m) for f in self.fusion for m in merges]


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

    def typed(self, value, type_name: str, where: str):
        """Check a value against a TrainConfig field's annotation (as written in train/config.py)."""
        t = type_name.replace(" ", "")
        if t == "bool":
            ok = isinstance(value, bool)
        elif t == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif t == "float":
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif t in ("str", "str|None"):
            ok = isinstance(value, str) or (value is None and "None" in t)
        elif t == "dict":
            ok = isinstance(value, dict)
        elif t == "list[str]":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif t == "list[float]|None":
            ok = value is None or (isinstance(value, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        else:
            ok = True
        if not ok:
            self.fail(where, f"expected {type_name}, got {_kind(value)}")
        return value


def _kind(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _train_fields() -> dict[str, str]:
    from fusionpipe.train.config import TrainConfig

    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def _known_upstream(name: str) -> bool:
    from fusionpipe.extract.upstreams import HUB_ID, UPSTREAMS

    return name in UPSTREAMS or Path(name).expanduser().is_dir() or bool(HUB_ID.fullmatch(name))


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe; every error names the file and the key path."""
    from fusionpipe.fuse.view import MERGES
    from fusionpipe.train.interfaces import INTERFACES, interface_option_names
    from fusionpipe.store import CODECS, DTYPES
    from fusionpipe.train.tasks import METRICS, TASKS, head_option_names
    from fusionpipe.extract.upstreams import UPSTREAMS

    path = Path(path)
    if not path.is_file():
        raise FusionpipeError(f"recipe {path} does not exist; the bundled ones are in stages/ "
                              "(ablation.yaml, demo.yaml, paper-table1-*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FusionpipeError(f"{path}: not valid YAML ({e})") from None
    c = _Checker(path)
    top = c.mapping(raw, "", required=("name", "tasks", "grid"),
                    optional=("cache", "results", "manifest_dir", "manifests", "upstreams", "extract",
                              "train", "paper"))
    name = c.string(top["name"], "name", pattern=_NAME)
    dirs = {k: c.string(top.get(k, k if k != "manifest_dir" else "manifests"), k)
            for k in ("cache", "results", "manifest_dir")}

    # grid
    grid = c.mapping(top["grid"], "grid", required=("upstream_sets", "fusion", "merge"))
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
            c.fail(f"grid.upstream_sets[{i}]", f"{set_name(members)} is listed twice")
        sets.append(members)
    used = list(dict.fromkeys(m for s in sets for m in s))
    if "upstreams" in top:
        upstreams = c.strings(top["upstreams"], "upstreams", what="upstream")
        for j, m in enumerate(upstreams):
            if not _known_upstream(m):
                c.fail(f"upstreams[{j}]", f"unknown upstream {m!r}; aliases: {', '.join(UPSTREAMS)}")
        for i, s in enumerate(sets):
            for j, m in enumerate(s):
                if m not in upstreams:
                    c.fail(f"grid.upstream_sets[{i}][{j}]", f"{m!r} is not in upstreams ({', '.join(upstreams)}): "
                           "add it there so that it is extracted")
    else:
        upstreams = used

    # extract
    ext = c.mapping(top.get("extract", {}), "extract",
                    optional=("dtype", "device", "codec", "max_seconds", "skip_bad"))
    extract = {"dtype": "float16", "device": "auto", "codec": "zstd", "max_seconds": 160.0, "skip_bad": False}
    if "dtype" in ext:
        extract["dtype"] = c.string(ext["dtype"], "extract.dtype", DTYPES)
    if "codec" in ext:
        extract["codec"] = c.string(ext["codec"], "extract.codec", list(CODECS))
    if "device" in ext:
        extract["device"] = c.string(ext["device"], "extract.device")
    if "max_seconds" in ext:
        extract["max_seconds"] = c.typed(ext["max_seconds"], "float", "extract.max_seconds")
        if extract["max_seconds"] <= 0:
            c.fail("extract.max_seconds", "must be > 0")
    if "skip_bad" in ext:
        extract["skip_bad"] = c.typed(ext["skip_bad"], "bool", "extract.skip_bad")

    # settings: recipe-wide, then per task
    train_fields = _train_fields()
    settable = [k for k in train_fields if k not in RUN_KEYS]

    def settings(value, where: str) -> dict:
        value = c.mapping(value, where, optional=tuple(settable))
        return {k: c.typed(v, train_fields[k], f"{where}.{k}") for k, v in value.items()}

    common = settings(top.get("train", {}), "train")
    default_manifests = _manifest_refs(c, top["manifests"], "manifests", False) if "manifests" in top else None

    tasks_raw = top["tasks"]
    if not isinstance(tasks_raw, dict) or not tasks_raw:
        c.fail("tasks", f"expected a non-empty mapping task name -> settings (e.g. tasks: {{asr: {{steps: 200}}}}), "
               f"got {_kind(tasks_raw)}")
    tasks: dict[str, TaskSpec] = {}
    for key, spec in tasks_raw.items():
        where = f"tasks.{key}"
        c.string(key, where, pattern=_NAME)
        spec = c.mapping(spec if spec is not None else {}, where,
                         optional=("task", "manifests", "trials", "folds", "metric", "extract_from", *settable))
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
        trials_raw = c.mapping(spec.get("trials", {}), f"{where}.trials", optional=("dev", "test"))
        trials = {k: c.string(v, f"{where}.trials.{k}") for k, v in trials_raw.items()}
        if task != "verify" and trials:
            c.fail(f"{where}.trials", f"only the verify task uses trial lists, this one is {task}")
        for split in ("dev", "test"):
            if task == "verify" and split in manifests and split not in trials:
                c.fail(f"{where}.trials.{split}", f"missing: verify scores the {split} manifest on a trial list "
                       f"(or leave {split} out of the task's manifests)")
        merged = {**common, **settings({k: v for k, v in spec.items() if k in settable}, where)}
        for k, v in merged.get("head_options", {}).items():
            allowed = head_option_names(task)
            if k not in allowed:
                c.fail(f"{where}.head_options.{k}" if "head_options" in spec else f"train.head_options.{k}",
                       f"unknown head size for task {task}; it takes {', '.join(sorted(allowed))}")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                c.fail(f"{where}.head_options.{k}", f"expected a number, got {_kind(v)}")
        for k in merged.get("interface_options", {}):
            for f in fusion:
                allowed = interface_option_names(f)
                if k not in allowed:
                    c.fail(f"{where}.interface_options.{k}" if "interface_options" in spec
                           else f"train.interface_options.{k}",
                           f"interface {f} (in grid.fusion) takes no option {k!r}; it takes "
                           f"{', '.join(sorted(allowed)) or 'none'}")
        metric = c.string(spec["metric"], f"{where}.metric", METRICS[task]) if "metric" in spec else None
        extract_from = c.string(spec["extract_from"], f"{where}.extract_from") if "extract_from" in spec else None
        if extract_from is not None and "{fold}" in extract_from:
            c.fail(f"{where}.extract_from", "{fold} is not allowed: the point is one extraction for every fold")
        tasks[key] = TaskSpec(key, task, manifests, trials, folds, merged, metric, extract_from)

    # paper references
    paper_raw = c.mapping(top.get("paper", {}), "paper", optional=tuple(tasks))
    names = [set_name(s) for s in sets]
    variant_names = [variant_name(f, m) for f in fusion for m in merge]
    paper: dict[str, dict[str, dict[str, float]]] = {}
    for t, by_set in paper_raw.items():
        by_set = c.mapping(by_set, f"paper.{t}", optional=tuple(names))
        paper[t] = {}
        for s, by_variant in by_set.items():
            by_variant = c.mapping(by_variant, f"paper.{t}.{s}", optional=tuple(variant_names))
            paper[t][s] = {v: c.typed(x, "float", f"paper.{t}.{s}.{v}") for v, x in by_variant.items()}
    return Recipe(name, path, dirs["cache"], dirs["results"], dirs["manifest_dir"], upstreams, extract, tasks,
                  sets, fusion, merge, paper)


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


# ---- the plan -------------------------------------------------------------------------------------
@dataclass
class Extraction:
    """One (manifest, upstream) store."""

    upstream: str
    manifest: str                 # manifest name (file stem)
    path: Path                    # its TSV
    url: str
    seconds: float | None         # audio in the manifest; None when it is missing
    bytes_per_second: float | None  # L x D x bytes per value x frame rate (registry), per audio-second
    status: str                   # cached | partial | missing
    done: float = 0.0             # fraction of chunks on disk

    @property
    def bytes(self) -> float | None:
        """Estimated store size: bytes per audio-second x seconds (before the codec)."""
        if self.seconds is None or self.bytes_per_second is None:
            return None
        return self.seconds * self.bytes_per_second

    @property
    def todo(self) -> bool:
        return self.status != "cached"


@dataclass
class Run:
    """One train() call: a task (fold) on one upstream set, all its variants together."""

    task: TaskSpec
    fold: str | None
    upstreams: list[str]
    variants: list[tuple[str, str]]
    out: Path
    config: dict                  # TrainConfig(**config)
    test_stores: list[str]
    test_trials: str | None
    test_manifest: str | None = None  # the test rows of test_stores (extract_from), None: all of them
    status: str = "train"         # train | resume | evaluate | done | stale
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.task.name}{'' if self.fold is None else f' fold {self.fold}'} / {set_name(self.upstreams)}"


@dataclass
class Plan:
    recipe: Recipe
    extractions: list[Extraction]
    runs: list[Run]
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        r = self.recipe
        todo = [e for e in self.extractions if e.todo]
        known = [e.bytes * (1 - e.done) for e in todo if e.bytes is not None]
        unknown = sum(e.bytes is None for e in todo)
        n_variants = sum(len(x.variants) for x in self.runs)
        lines = [f"recipe {r.name} ({r.source}): {len(r.upstreams)} upstream(s), {len(r.tasks)} task(s), "
                 f"{len(r.upstream_sets)} upstream set(s), {n_variants} variant runs in {len(self.runs)} "
                 f"train() call(s) -> {r.out}",
                 f"caches under {r.cache}: {len(self.extractions)} store(s), {len(todo)} to extract, "
                 f"about {_size(sum(known))} more on disk"
                 + (f" (+ {unknown} of unknown size: manifest missing)" if unknown else "")]
        for e in self.extractions:
            hours = "? h (no manifest yet)" if e.seconds is None else f"{e.seconds / 3600:.2f} h"
            rate = "?" if e.bytes_per_second is None else _size(e.bytes_per_second)
            size = "" if e.bytes is None else f" = {_size(e.bytes)}"
            state = {"cached": "cached", "partial": f"resume ({e.done:.0%} done)", "missing": "extract"}[e.status]
            lines.append(f"  {state:<8} {e.url:<52} {rate}/audio-s x {hours}{size}")
        lines.append(f"runs under {r.out / 'runs'}:")
        for x in self.runs:
            steps = x.config.get("steps", "?")
            what = {"train": f"train   {len(x.variants)} variant(s) x {steps} steps",
                    "resume": f"resume  {len(x.variants)} variant(s) x {steps} steps",
                    "evaluate": "evaluate on test", "done": "done (skipped)", "stale": "STALE"}[x.status]
            lines.append(f"  {x.label:<48} {what}  ({', '.join(variant_name(f, m) for f, m in x.variants)})")
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s): nothing runs until they are fixed")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def manifest_path(recipe: Recipe, ref: str) -> Path:
    """A manifest reference -> its TSV: bundled name, path, or <manifest_dir>/<name>.tsv."""
    if ref in BUNDLED:
        return CORPUS / f"{ref}.tsv"
    if ref.endswith(".tsv") or "/" in ref or os.sep in ref:
        return Path(ref)
    return Path(recipe.manifest_dir) / f"{ref}.tsv"


def trials_path(ref: str) -> Path:
    return CORPUS / "trials.txt" if ref == "demo-trials" else Path(ref)


def _fill(ref: str, fold: str | None) -> str:
    return ref if fold is None else ref.replace("{fold}", fold)


def _dims(upstream: str) -> tuple[int, int, float] | None:
    """(L, D, frame rate) from the registry, or from a local directory's config.json."""
    from fusionpipe.extract.upstreams import UPSTREAMS

    if upstream in UPSTREAMS:
        s = UPSTREAMS[upstream]
        return s.num_layers, s.hidden_size, s.frame_rate
    config = Path(upstream).expanduser() / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        if cfg.get("model_type") == "whisper":
            return cfg["encoder_layers"] + 1, cfg["d_model"], 50.0
        return cfg.get("num_hidden_layers", 0) + 1, cfg.get("hidden_size", 0), 50.0
    return None


def _weights_problem(upstream: str) -> str | None:
    """Why the weights of `upstream` cannot be loaded offline, or None."""
    from fusionpipe.extract.upstreams import UPSTREAMS

    spec = UPSTREAMS.get(upstream)
    if spec is not None and spec.hf_id.startswith("toy:"):
        return None  # built locally on first use
    local = Path(upstream).expanduser()
    if spec is None and local.is_dir():
        if (local / "config.json").is_file():
            return None
        return f"upstream {upstream}: the directory has no config.json; it must be a save_pretrained() directory"
    hf_id = spec.hf_id if spec is not None else upstream
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(hf_id, filename), str)

    if cached("config.json") and any(cached(f) for f in ("model.safetensors", "pytorch_model.bin",
                                                          "model.safetensors.index.json")):
        return None
    return (f"upstream {upstream}: the weights of {hf_id} are not in the local Hugging Face cache; download "
            f"them first (`huggingface-cli download {hf_id}`, or any from_pretrained() with network access), "
            "or name a save_pretrained() directory in the recipe instead of the alias")


def _missing_manifest(ref: str, path: Path) -> str:
    stem = path.stem
    hint = "fusionpipe manifest folder /path/to/audio --name " + stem
    for prefix, command in HOW_TO_MAKE.items():
        if stem.startswith(prefix):
            hint = command.format(rest=stem[len(prefix):])
    return f"manifest {ref!r}: {path} does not exist; make it with `{hint}` (--out {path.parent})"


def plan_recipe(recipe: Recipe) -> Plan:
    """What is cached, what must be extracted (and its disk), which runs train, resume or are done.

    Never loads a model or audio, never touches the network; missing data, weights or trial
    lists are listed in ``plan.problems``.
    """
    problems: list[str] = []
    # every manifest the tasks use, in order, and those that stores are extracted from
    refs: dict[Path, str] = {}
    extracted: set[Path] = set()
    for spec in recipe.tasks.values():
        for fold in spec.fold_list():
            for split in SPLITS:
                if split in spec.manifests:
                    for ref in (spec.store_manifest(split, fold), _fill(spec.manifests[split], fold)):
                        refs.setdefault(manifest_path(recipe, ref), ref)
                    extracted.add(manifest_path(recipe, spec.store_manifest(split, fold)))
    manifests = {}
    for path, ref in refs.items():
        if not path.is_file():
            problems.append(_missing_manifest(ref, path))
            manifests[path] = None
            continue
        try:
            manifests[path] = read_manifest(path)
        except FusionpipeError as e:
            problems.append(str(e))
            manifests[path] = None

    extractions = []
    for upstream in recipe.upstreams:
        dims = _dims(upstream)
        bytes_per_second = None
        if dims is not None:
            L, D, rate = dims
            bytes_per_second = L * D * (2 if recipe.extract["dtype"] == "float16" else 4) * rate
        for path, m in manifests.items():
            if path not in extracted:
                continue
            name = m.name if m is not None else path.stem
            url = store_url(recipe.cache, name, upstream)
            seconds = m.duration if m is not None else None
            e = Extraction(upstream, name, path, url, seconds, bytes_per_second, "missing")
            _store_state(e, m, problems)
            extractions.append(e)
    # what extraction needs: the audio of each manifest, the weights of each upstream
    for path, m in manifests.items():
        if m is None or not any(e.todo and e.path == path for e in extractions):
            continue
        if not m.root.is_dir():
            problems.append(f"manifest {path}: its audio root {m.root} does not exist; fix the `# root:` line "
                            "(first line of the TSV) or mount the corpus there")
        elif len(m) and not m.audio_path(m[0]).is_file():
            problems.append(f"manifest {path}: audio {m.audio_path(m[0])} (row 1) does not exist; is the "
                            "`# root:` line right?")
    for upstream in recipe.upstreams:
        if any(e.todo and e.upstream == upstream for e in extractions):
            p = _weights_problem(upstream)
            if p:
                problems.append(p)
    problems += _subset_problems(recipe, manifests)

    runs = []
    for spec in recipe.tasks.values():
        for fold in spec.fold_list():
            trials = {k: trials_path(_fill(v, fold)) for k, v in spec.trials.items()}
            for k, t in trials.items():
                if not t.is_file():
                    problems.append(f"tasks.{spec.name}.trials.{k}: {t} does not exist"
                                    + ("; make it with `fusionpipe manifest voxceleb ... --trials veri_test2.txt`"
                                       if "voxceleb" in str(t) else ""))
            for upstreams in recipe.upstream_sets:
                runs.append(_run(recipe, spec, fold, upstreams, trials, manifests))
    for x in runs:
        if x.status == "stale":
            problems.append(f"run {x.label}: {x.reason}")
    return Plan(recipe, extractions, runs, problems)


def _subset_problems(recipe: Recipe, manifests: dict) -> list[str]:
    """Every split manifest of a task with `extract_from` must be rows of that manifest (checked before
    any extraction; stage 3 checks them against the stores again)."""
    problems = []
    for spec in recipe.tasks.values():
        whole = manifests.get(manifest_path(recipe, spec.extract_from)) if spec.extract_from else None
        if whole is None:
            continue
        rows = whole.by_id()
        for fold in spec.fold_list():
            for split, ref in spec.manifests.items():
                part = manifests.get(manifest_path(recipe, _fill(ref, fold)))
                if part is None:
                    continue
                try:
                    check_subset(part, rows, f"manifest {whole.source} (tasks.{spec.name}.extract_from)",
                                 f"tasks.{spec.name}.extract_from must name a manifest that holds every row of "
                                 "the task's split manifests")
                except FusionpipeError as e:
                    problems.append(str(e))
    return problems


def _store_state(e: Extraction, m, problems: list[str]) -> None:
    from fusionpipe.store import FeatureStore

    if not FeatureStore.exists(e.url):
        return
    try:
        store = FeatureStore.open(e.url)
        done = store.done_chunks()
    except FusionpipeError as err:
        problems.append(str(err))
        return
    e.done = float(done.mean()) if len(done) else 1.0
    e.status = "cached" if done.all() else "partial"
    cached_sha = store.info.manifest_sha256
    if m is not None and cached_sha != m.content_hash():
        problems.append(f"{e.url} holds features of another version of manifest {m.name} (its rows changed); "
                        "delete the store to extract it again")


def _run(recipe: Recipe, spec: TaskSpec, fold: str | None, upstreams: list[str], trials: dict[str, Path],
         manifests: dict) -> Run:
    def stores(split: str) -> list[str]:
        if split not in spec.manifests:
            return []
        path = manifest_path(recipe, spec.store_manifest(split, fold))
        m = manifests.get(path)
        return [store_url(recipe.cache, m.name if m is not None else path.stem, u) for u in upstreams]

    def rows(split: str) -> str | None:
        """The split's manifest where it chooses rows of larger stores (extract_from), else None (all rows)."""
        if spec.extract_from is None or split not in spec.manifests:
            return None
        return str(manifest_path(recipe, _fill(spec.manifests[split], fold)))

    out = recipe.out / "runs" / spec.name / set_name(upstreams)
    if fold is not None:
        out = out / f"fold-{fold}"
    variants = recipe.variants(upstreams)
    dev_trials = trials.get("dev")
    config = {**spec.settings, "stores": stores("train"), "task": spec.task,
              "fusion": list(dict.fromkeys(f for f, _ in variants)),
              "merge": list(dict.fromkeys(m for _, m in variants)), "out": str(out),
              "dev_stores": stores("dev"), "manifest": rows("train"), "dev_manifest": rows("dev"),
              "trials": str(dev_trials) if dev_trials else None}
    test_trials = trials.get("test")
    run = Run(spec, fold, upstreams, variants, out, config, stores("test"),
              str(test_trials) if test_trials else None, test_manifest=rows("test"))
    saved = out / "config.json"
    if saved.is_file():
        from fusionpipe.train.config import TrainConfig, config_changes

        changes = config_changes(json.loads(saved.read_text()), TrainConfig(**config))
        if changes:
            run.status = "stale"
            run.reason = (f"{out} was trained with other settings ({'; '.join(changes)}); delete that directory to "
                          "retrain it, or restore the recipe")
            return run
        finished = all((out / variant_name(f, m) / "results.json").is_file() for f, m in variants)
        if not finished:
            run.status = "resume"
        elif run.test_stores and not _has_test(out, variants):
            run.status = "evaluate"
        else:
            run.status = "done"
    return run


def _has_test(out: Path, variants) -> bool:
    f = out / "test.json"
    return f.is_file() and all(variant_name(a, b) in json.loads(f.read_text()) for a, b in variants)


# ---- running ----------------------------------------------------------------------------------------
def run_recipe(recipe: Recipe, dry_run: bool = False, progress: bool = True,
               echo: Callable[[str], None] = print) -> Plan:
    """Print the plan; refuse if anything is missing; else extract, train, evaluate and report."""
    plan = plan_recipe(recipe)
    echo(plan.describe())
    if plan.problems:
        raise FusionpipeError(f"{recipe.source}: cannot run, {len(plan.problems)} problem(s):\n"
                              + "\n".join(f"  - {p}" for p in plan.problems))
    if dry_run:
        return plan

    from fusionpipe.extract.run import extract
    from fusionpipe.extract.upstreams import load_upstream

    for upstream in recipe.upstreams:
        jobs = [e for e in plan.extractions if e.upstream == upstream and e.todo]
        if not jobs:
            continue
        loaded = load_upstream(upstream, device=recipe.extract["device"])
        for e in jobs:
            result = extract(read_manifest(e.path), loaded, recipe.cache, dtype=recipe.extract["dtype"],
                             codec=recipe.extract["codec"], max_seconds=recipe.extract["max_seconds"],
                             skip_bad=recipe.extract["skip_bad"], progress=progress)
            echo(result.summary())
        del loaded

    from fusionpipe.train import loop as stage3

    for x in plan.runs:
        if x.status in ("train", "resume"):
            echo(f"train {x.label}: {len(x.variants)} variant(s) in one pass -> {x.out}")
            stage3.train(stage3.TrainConfig(**x.config), resume=x.status == "resume", progress=progress)
        if x.status != "done" and x.test_stores:
            metrics = stage3.evaluate(x.out, x.test_stores, trials=x.test_trials, manifest=x.test_manifest)
            write_json(x.out / "test.json", metrics)
    paths = write_report(plan)
    echo("wrote " + ", ".join(str(p) for p in paths))
    return plan
