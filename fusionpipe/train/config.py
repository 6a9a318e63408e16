"""Stage 3: TrainConfig, everything a run depends on, and the checks made before any data is read."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse.align import ALIGN_LAYERS, ALIGN_TIME
from fusionpipe.store import FINGERPRINT
from fusionpipe.train.augment import crop_frames
from fusionpipe.train.interfaces import INTERFACES, MERGES, interface_option_problems
from fusionpipe.train.tasks import METRICS, REGISTRY, TASKS, head_option_problems, is_metric, read_trials

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# config fields that may differ between a run and its rerun without changing results (where it runs)
NOT_COMPARED = ("device", "num_workers")
# ... and what a --resume may change besides: more steps continue the run (a Gumbel temperature
# schedule, which follows step / steps, then stretches from the resumed step on)
RESUMABLE = (*NOT_COMPARED, "steps")
# where the run directory is: no setting (a copied or moved run resumes and evaluates; `config_changes`)
WHERE = ("out",)


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json beside the results (CLI flag = field name).

    The defaults are `fusionpipe train`'s: ``task`` and ``out`` left None are filled in by `train()`
    (`fusionpipe.train.defaults.complete`) as the command fills them, and a ``dev_manifest`` without
    ``dev_stores`` chooses rows of the train stores.
    """

    stores: list[str]
    task: str | None = None                     # None: what the train manifest supports (asr, classify, verify)
    fusion: list[str] = field(default_factory=lambda: ["hconv"])
    merge: list[str] = field(default_factory=lambda: ["concat"])
    out: str | None = None                      # None: runs/<task>-<upstreams>
    dev_stores: list[str] = field(default_factory=list)
    manifest: str | None = None                 # train on these rows of the stores (default: all, as extracted)
    dev_manifest: str | None = None             # evaluate on these rows of the dev stores (default: all)
    trials: str | None = None                   # verify: trial list over the dev stores' utterances
    steps: int = 200_000
    eval_every: int = 1000
    lr: float = 1e-4
    optimizer: str = "adam"                     # adam | adamw (SUPERB SV uses AdamW)
    max_frames: int = 25_600                    # padded frames per batch (32 x 16 s at 50 Hz)
    grad_clip: float = 1.0
    specaugment: bool = False                   # time and feature masks on the fused features
    crop_seconds: list[float] | None = None     # train on random crops of [min, max] s each (SUPERB SV: [2, 8])
    select: str | None = None                   # dev metric that picks best.pt (default: the task's primary one)
    seed: int = 0                               # initialisation and random draws; the batch order always
    seeds: list[int] | None = None              # several seeds in ONE pass: every variant once per seed
    head_options: dict = field(default_factory=dict)       # head sizes, e.g. {"hidden": 64}
    interface_options: dict = field(default_factory=dict)  # options of every --fusion, e.g. {"normalize": True}
    align_time: str = "max"
    align_layers: str = "interpolate"
    skip_missing: bool = False                  # leave out utterances skipped or unfinished in some store
    device: str = "auto"
    num_workers: int = 0

    def __post_init__(self):
        if self.dev_manifest and not self.dev_stores:
            self.dev_stores = list(self.stores)

    def check(self) -> None:
        """Refuse settings that cannot train or evaluate, before any data is read or any step taken.

        Each error names the flag as the command line spells it (and the field) and what to give.
        The dev stores must hold the train stores' upstreams, in their order (`check_upstreams`).
        """
        self.check_settings()
        self._check_dev()

    def check_settings(self) -> None:
        """The checks of `check` that read no file: every value in its type and range. A recipe's planned
        runs go through these before anything is extracted (their stores do not exist yet)."""
        def refuse(name: str, problem: str):
            raise FusionpipeError(f"{flag(name)} ({name}={getattr(self, name)!r}): {problem}")

        if not self.stores or not isinstance(self.stores, list) or not all(isinstance(s, str) for s in self.stores):
            refuse("stores", "no train stores; give at least one")
        if not isinstance(self.task, str) or self.task not in TASKS:
            refuse("task", f"unknown task; choose one of {', '.join(TASKS)}")
        for name, choices in (("fusion", INTERFACES), ("merge", MERGES)):
            values = getattr(self, name)
            if not values or not isinstance(values, list) or any(not isinstance(x, str) or x not in choices
                                                                  for x in values):
                refuse(name, f"give one or more of {', '.join(choices)}")
        for name in ("head_options", "interface_options"):
            if not isinstance(getattr(self, name), dict):
                refuse(name, "expected a mapping option -> value, e.g. {\"hidden\": 64}")
        for name in ("optimizer", "select", "align_time", "align_layers", "device"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                refuse(name, "expected a name (text)")
        for name, choices in (("align_time", ALIGN_TIME), ("align_layers", ALIGN_LAYERS)):
            if getattr(self, name) not in choices:
                refuse(name, f"choose {' or '.join(choices)}")
        for name in ("specaugment", "skip_missing"):
            if not isinstance(getattr(self, name), bool):
                refuse(name, "expected true or false")
        for name, what in (("steps", "optimizer steps in all"), ("eval_every", "evaluate and save a checkpoint "
                           "every N steps"), ("max_frames", "padded frames per batch")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                refuse(name, f"must be a whole number >= 1 ({what})")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                refuse(name, "must be a positive number")
        if self.seeds is not None and (not isinstance(self.seeds, list) or not self.seeds or len(set(self.seeds))
                                       != len(self.seeds) or any(isinstance(x, bool) or not isinstance(x, int)
                                                                 for x in self.seeds)):
            refuse("seeds", "give distinct whole numbers, e.g. --seeds 0,1,2 (each variant trains once per seed, "
                            "all in one pass)")
        if self.optimizer not in OPTIMIZERS:
            refuse("optimizer", f"choose {' or '.join(OPTIMIZERS)}")
        if self.crop_seconds is not None:
            if not isinstance(self.crop_seconds, list) or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                              for x in self.crop_seconds):
                refuse("crop_seconds", "give MIN,MAX in seconds, e.g. 2,8")
            crop_frames(self.crop_seconds, 1.0)
            if REGISTRY[self.task].frame_level:
                refuse("crop_seconds", f"task {self.task} labels every frame of a whole recording, and a random crop "
                                       "would move the frames under their labels; drop --crop-seconds")
        if self.select is not None and not is_metric(self.task, self.select):
            per_language = " or cer/<language>" if self.task == "multilingual" else ""
            refuse("select", f"not a dev metric of task {self.task}; choose one of "
                             f"{', '.join(METRICS[self.task])}{per_language}")
        for name, problems in (("head_options", head_option_problems(self.task, self.head_options)),
                               *(("interface_options", interface_option_problems(f, self.interface_options))
                                 for f in self.fusion)):
            if problems:
                refuse(name, "; ".join(f"{k}: {why}" for k, why in problems))
        for name, low, high, what in (("seed", 0, 2**63, "the seed"), ("num_workers", 0, 1024, "loader processes")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
                refuse(name, f"must be a whole number from {low} to {high - 1} ({what})")
        if self.seeds is not None and any(not 0 <= x < 2**63 for x in self.seeds):
            refuse("seeds", f"each seed must be a whole number from 0 to {2**63 - 1}")

    def _check_dev(self) -> None:
        if self.trials and self.task != "verify":
            raise FusionpipeError(f"--trials ({self.trials}): only --task verify scores a trial list; drop it")
        if self.task == "verify" and self.dev_stores and not self.trials:
            raise FusionpipeError("--task verify scores the dev stores on a trial list: give --trials FILE "
                                  "(lines 'label enroll_id test_id' over the dev utterances), or no --dev-stores")
        if self.trials:
            trial_list(self.trials)
        if self.manifest and self.dev_stores == self.stores and not self.dev_manifest:
            raise FusionpipeError(f"the dev stores are the train stores and only the train utterances are chosen "
                                  f"(manifest={self.manifest}): give dev_manifest (--dev-manifest) too, or the dev "
                                  "metrics would include the training utterances")
        if self.dev_stores:
            check_upstreams(self.stores, self.dev_stores, "--dev-stores")


def trial_list(path: str | Path) -> list:
    """`read_trials`, its errors naming the --trials flag."""
    try:
        return read_trials(path)
    except (OSError, ValueError) as e:
        raise FusionpipeError(f"--trials ({path}): {e}") from None


def flag(name: str) -> str:
    """A TrainConfig field's command-line spelling: eval_every -> --eval-every; the repeatable
    key=value options are singular: head_options -> --head-option."""
    return "--" + name.removesuffix("s" if name.endswith("_options") else "").replace("_", "-")


def config_changes(saved: dict, given: TrainConfig, exempt: tuple[str, ...] = NOT_COMPARED) -> list[str]:
    """``key: saved -> given`` for each field (but ``exempt``) in which ``given`` differs from a saved
    config.json: a rerun (ablation plan) or --resume must train what the run directory holds."""
    new = json.loads(json.dumps(asdict(given)))  # as config.json holds it: tuples are lists
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in new.items()
            if k not in exempt and k not in WHERE and saved.get(k) != v]


def _upstream(url: str) -> dict:
    from fusionpipe.store import FeatureStore

    up = FeatureStore.open(url).info.upstream_fingerprint
    return {k: up.get(k) for k in ("name", *FINGERPRINT)}


def _describe(up: dict) -> str:
    return (f"{up['name']} ({up['model_id']} @ {str(up['revision'])[:12]}, L={up['num_layers']}, "
            f"D={up['hidden_size']})")


def check_upstreams(reference: list[str], given: list[str], given_flag: str, reference_flag: str = "--stores") -> None:
    """Refuse ``given`` stores unless they hold features of ``reference``'s upstreams, one for one and in
    the same order (the fusion has one input per upstream, in order); errors name both flags."""
    if list(given) == list(reference):
        return
    if len(given) != len(reference):
        raise FusionpipeError(f"{given_flag} names {len(given)} store(s) and {reference_flag} {len(reference)}: "
                              f"give one store per upstream of {reference_flag}, in its order")
    want, got = [_upstream(s) for s in reference], [_upstream(s) for s in given]

    def key(up: dict) -> tuple:
        return tuple(str(up[k]) for k in FINGERPRINT)

    if [key(u) for u in got] == [key(u) for u in want]:
        return
    if sorted(map(key, got)) == sorted(map(key, want)):
        raise FusionpipeError(f"{given_flag} holds the upstreams of {reference_flag} in another order "
                              f"({', '.join(u['name'] for u in got)}); give them in the order "
                              f"{', '.join(u['name'] for u in want)}")
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if key(a) != key(b))
    raise FusionpipeError(f"{given_flag} store {i + 1} ({given[i]}) holds features of {_describe(got[i])}, but "
                          f"{reference_flag} store {i + 1} ({reference[i]}) of {_describe(want[i])}; give stores "
                          f"extracted with the same upstreams, in the order of {reference_flag}")

