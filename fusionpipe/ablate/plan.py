"""What a recipe needs and does: which stores are cached, what trains, and running it all."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.stage import store_url
from fusionpipe.manifest import Manifest, check_subset, read_manifest
from fusionpipe.codecs import expected_bytes
from fusionpipe.ablate.recipe import Recipe, TaskSpec, fill_fold, manifest_path, trials_path
from fusionpipe.ablate.report import write_report
from fusionpipe.names import upstream_set_name
from fusionpipe.train.config import TrainConfig, config_changes
from fusionpipe.train.rundir import RunDir, variant_grid, variant_name

# how to make a manifest the recipe names but the disk lacks, by name prefix
HOW_TO_MAKE = {
    "librispeech-": "fusionpipe manifest librispeech /path/to/LibriSpeech --split {rest}",
    "voxceleb1-": "fusionpipe manifest voxceleb /path/to/VoxCeleb1 --trials /path/to/veri_test2.txt",
    "iemocap": "fusionpipe manifest iemocap /path/to/IEMOCAP_full_release",
    "mlsuperb-": "fusionpipe manifest mlsuperb /path/to/ml_superb/data",
}


# ---- the plan -------------------------------------------------------------------------------------
@dataclass
class Extraction:
    """One (manifest, upstream) store."""

    upstream: str
    manifest: str                 # manifest name (file stem)
    path: Path                    # its TSV
    url: str
    seconds: float | None         # audio in the manifest; None when it is missing
    bytes_per_second: float | None  # on disk per audio-second: L x D x frame rate x the codec's measured ratio
    status: str                   # cached | partial | missing
    done: float = 0.0             # fraction of chunks on disk

    @property
    def bytes(self) -> float | None:
        """Estimated store size on disk: bytes per audio-second x seconds."""
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
    def names(self) -> list[str]:
        """The names of the run's variants: each (fusion, merge) once per seed of ``seeds`` when set."""
        seeds = self.config.get("seeds")
        return [variant_name(*v) for f, m in self.variants for v in variant_grid([f], [m], seeds)]

    @property
    def label(self) -> str:
        return f"{self.task.name}{'' if self.fold is None else f' fold {self.fold}'} / {upstream_set_name(self.upstreams)}"


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
            seeds = x.config.get("seeds")
            lines.append(f"  {x.label:<48} {what}  ({', '.join(variant_name(f, m) for f, m in x.variants)})"
                         + (f" x seeds {', '.join(map(str, seeds))}" if seeds else ""))
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s): nothing runs until they are fixed")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _dims(upstream: str) -> tuple[int, int, float] | None:
    """(L, D, frame rate) from the registry or a local directory's config, without loading weights."""
    from fusionpipe.extract.registry import upstream_spec

    spec = upstream_spec(upstream)
    return (spec.num_layers, spec.hidden_size, spec.frame_rate) if spec else None


def _weights_problem(upstream: str) -> str | None:
    """Why the weights of `upstream` cannot be loaded offline, or None."""
    from fusionpipe.extract.registry import UPSTREAMS

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
    lists are listed in ``plan.problems``. (The settings were checked when the recipe was read.)
    """
    problems: list[str] = []
    manifests = _read_manifests(recipe, problems)
    extractions = _plan_extractions(recipe, manifests, problems)
    runs = _plan_runs(recipe, manifests, problems)
    return Plan(recipe, extractions, runs, problems)


def _splits(recipe: Recipe):
    """(task, fold, split) of every split manifest of every task and fold, in recipe order."""
    for spec in recipe.tasks.values():
        for fold in spec.fold_list():
            for split in spec.manifests:
                yield spec, fold, split


def _read_manifests(recipe: Recipe, problems: list[str]) -> dict[Path, Manifest | None]:
    """Step 1: every manifest the tasks use, in order (the split manifests and those stores are
    extracted from), read; None where it is missing or unreadable, which is a problem."""
    refs: dict[Path, str] = {}
    for spec, fold, split in _splits(recipe):
        for ref in (spec.store_manifest(split, fold), fill_fold(spec.manifests[split], fold)):
            refs.setdefault(manifest_path(recipe, ref), ref)
    manifests: dict[Path, Manifest | None] = {}
    for path, ref in refs.items():
        manifests[path] = None
        if not path.is_file():
            problems.append(_missing_manifest(ref, path))
            continue
        try:
            manifests[path] = read_manifest(path)
        except FusionpipeError as e:
            problems.append(str(e))
    return manifests


def _plan_extractions(recipe: Recipe, manifests: dict[Path, Manifest | None], problems: list[str]) -> list[Extraction]:
    """Step 2: the (manifest, upstream) stores the runs read, which of them are cached already, and
    what extracting the others needs: the audio of each manifest, the weights of each upstream."""
    extracted = {manifest_path(recipe, spec.store_manifest(split, fold)) for spec, fold, split in _splits(recipe)}
    extractions = []
    for upstream in recipe.upstreams:
        rate = _bytes_per_second(recipe, upstream)
        for path, m in manifests.items():
            if path in extracted:
                name = m.name if m is not None else path.stem
                e = Extraction(upstream, name, path, store_url(recipe.cache, name, upstream),
                               m.duration if m is not None else None, rate, "missing")
                _store_state(e, m, problems)
                extractions.append(e)
    for path, m in manifests.items():
        if m is not None and any(e.todo and e.path == path for e in extractions):
            problems += _audio_problems(path, m)
    for upstream in recipe.upstreams:
        if any(e.todo and e.upstream == upstream for e in extractions) and (weights := _weights_problem(upstream)):
            problems.append(weights)
    problems += _subset_problems(recipe, manifests)
    return extractions


def _plan_runs(recipe: Recipe, manifests: dict[Path, Manifest | None], problems: list[str]) -> list[Run]:
    """Step 3: one train() call per task, fold and upstream set, and what its run directory says:
    to train, to resume, to evaluate, done, or stale (trained with other settings: a problem)."""
    runs = []
    for spec in recipe.tasks.values():
        for fold in spec.fold_list():
            trials = _trial_paths(spec, fold, problems)
            runs += [_run(recipe, spec, fold, upstreams, trials, manifests) for upstreams in recipe.upstream_sets]
    problems += [f"run {x.label}: {x.reason}" for x in runs if x.status == "stale"]
    return runs


def _bytes_per_second(recipe: Recipe, upstream: str) -> float | None:
    """On disk per audio-second of the upstream's store, in the recipe's dtype and codec (ratios measured
    by bench/storage.py); None when the upstream's sizes are unknown without loading it."""
    dims = _dims(upstream)
    if dims is None:
        return None
    L, D, rate = dims
    return expected_bytes(recipe.extract["codec"], rate, L, D, recipe.extract["dtype"])


def _audio_problems(path: Path, m: Manifest) -> list[str]:
    if not m.root.is_dir():
        return [f"manifest {path}: its audio root {m.root} does not exist; fix the `# root:` line "
                "(first line of the TSV) or mount the corpus there"]
    if len(m) and not m.audio_path(m[0]).is_file():
        return [f"manifest {path}: audio {m.audio_path(m[0])} (row 1) does not exist; is the "
                "`# root:` line right?"]
    return []


def _trial_paths(spec: TaskSpec, fold: str | None, problems: list[str]) -> dict[str, Path]:
    """The task's trial lists of one fold; each missing one is a problem."""
    trials = {k: trials_path(fill_fold(v, fold)) for k, v in spec.trials.items()}
    for k, t in trials.items():
        if not t.is_file():
            problems.append(f"tasks.{spec.name}.trials.{k}: {t} does not exist"
                            + ("; make it with `fusionpipe manifest voxceleb ... --trials veri_test2.txt`"
                               if "voxceleb" in str(t) else ""))
    return trials


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
                part = manifests.get(manifest_path(recipe, fill_fold(ref, fold)))
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
        return str(manifest_path(recipe, fill_fold(spec.manifests[split], fold)))

    out = recipe.out / "runs" / spec.name / upstream_set_name(upstreams)
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
    saved = RunDir(out)
    if saved.exists():
        changes = config_changes(saved.saved_config(), TrainConfig(**config))
        if changes:
            run.status = "stale"
            run.reason = (f"{out} was trained with other settings ({'; '.join(changes)}); delete that directory to "
                          "retrain it, or restore the recipe")
            return run
        if not saved.finished(run.names):
            run.status = "resume"
        elif run.test_stores and not saved.has_test(run.names):
            run.status = "evaluate"
        else:
            run.status = "done"
    return run


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

    from fusionpipe.extract.stage import extract
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

    from fusionpipe.train import evaluation, loop

    for x in plan.runs:
        if x.status in ("train", "resume"):
            echo(f"train {x.label}: {len(x.variants)} variant(s) in one pass -> {x.out}")
            loop.train(TrainConfig(**x.config), resume=x.status == "resume", progress=progress)
        if x.status != "done" and x.test_stores:
            metrics = evaluation.evaluate(x.out, x.test_stores, trials=x.test_trials, manifest=x.test_manifest,
                                          device=TrainConfig(**x.config).device)  # the run's device, not auto
            RunDir(x.out).write_test(metrics)
    paths = write_report(plan)
    echo("wrote " + ", ".join(str(p) for p in paths))
    return plan
