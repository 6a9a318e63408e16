"""Which tasks there are, and the facts about them the settings checks, the trainer and the report read.

Adding a task: one module beside this one with a `Task` subclass, and its class in `REGISTRY`. Every
table below is derived from the task classes, so nothing else needs to learn the new name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fusionpipe.train.tasks.asr import AsrTask
from fusionpipe.train.tasks.base import Task
from fusionpipe.train.tasks.classify import ClassifyTask
from fusionpipe.train.tasks.diarize import DiarizeTask
from fusionpipe.train.tasks.multilingual import MultilingualTask
from fusionpipe.train.tasks.phoneme import PhonemeTask
from fusionpipe.train.tasks.verify import VerifyTask
from fusionpipe.trials import Trial

REGISTRY: dict[str, type[Task]] = {task.name: task for task in (
    AsrTask,
    ClassifyTask,
    VerifyTask,
    MultilingualTask,
    PhonemeTask,
    DiarizeTask,
)}

TASKS = tuple(REGISTRY)
# each task's dev metrics, the primary one first (it picks best.pt and heads the report's tables)
METRICS = {name: task.metric_names for name, task in REGISTRY.items()}
HIGHER_IS_BETTER = frozenset().union(*(task.higher_is_better for task in REGISTRY.values()))
HEADS = {name: task.heads for name, task in REGISTRY.items()}
# the manifest columns some task reads: what a batch carries as targets
COLUMNS = tuple(dict.fromkeys(c for task in REGISTRY.values() for c in task.columns))


def task_class(name: str, where: str = "") -> type[Task]:
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}{where}; choose one of {', '.join(TASKS)}")
    return REGISTRY[name]


def build_task(name: str, train: Mapping[str, Sequence], trials: Sequence[Trial] = (),
               frame_rate: float | None = None) -> Task:
    """The task ``name`` with its labels from the train manifest's columns (``train``: column -> values);
    ``trials`` only for verify; ``frame_rate`` (the fused view's) only for a frame-level task."""
    cls = task_class(name)
    return cls.from_train(train, trials, frame_rate=frame_rate) if cls.frame_level else cls.from_train(train, trials)


def task_from_dict(state: Mapping, trials: Sequence[Trial] = ()) -> Task:
    """Rebuild a task from ``task.to_dict()`` (trials are eval data, passed again for verify)."""
    return task_class(state.get("task"), " in the saved state").from_dict(state, trials)


def batch_targets(rows) -> dict[str, list]:
    """Manifest rows -> the targets every task reads: {column: values, one per row}."""
    return {c: [getattr(u, c) for u in rows] for c in COLUMNS}


def primary_metric(task: str) -> str:
    """The dev metric that picks a run's best checkpoint unless told otherwise."""
    return METRICS[task][0]


def is_metric(task: str, metric: str) -> bool:
    """Whether the task's ``metrics`` report ``metric`` (multilingual: also cer/<language>)."""
    return REGISTRY[task].is_metric(metric)


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[0] not in HIGHER_IS_BETTER


def head_option_names(task: str) -> set[str]:
    """The keyword sizes the task's head takes (its constructors' parameters with defaults)."""
    return REGISTRY[task].head_option_names()


def head_option_problems(task: str, options: dict) -> list[tuple[str, str]]:
    """(option, what is wrong) for every head option the task's head cannot take: an unknown name or a
    value outside its rule. Empty when all are fine."""
    return REGISTRY[task].head_option_problems(options)
