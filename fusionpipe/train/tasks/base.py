"""The protocol every task follows, so that the trainer, the evaluator and the settings checks treat all alike.

A task is a small dataclass holding its label maps (a vocabulary, the classes, the speakers), built from
the train manifest's columns, and class facts the rest of the package reads instead of keeping lists of
its own: its ``name``, the manifest ``columns`` it reads, its dev ``metric_names`` (the primary first: it
picks best.pt and heads the report's tables), which of them are ``higher_is_better`` (every other is an
error rate) and its ``heads`` (the classes whose keyword sizes `build_head` passes on, which are therefore
its head options).

``feats`` is the interface output (B, T, D), ``lengths`` (B,) long. ``targets`` maps each column of
``columns`` to a list with one value per utterance (a batch's, or the whole eval set's, in the order of
``preds``). The protocol is per utterance, not per label: a frame-level task (diarization) keeps a
sequence of frame labels per utterance in its column, its head returns frame-level outputs with their
lengths (`HeadOutput`), and ``predict`` gives one sequence per utterance as the CTC tasks do.

A task whose labels lie on the frames (``frame_level``: diarize) must know the fused view's frame rate (stage
2's time alignment decides it): `build_task` passes it to its ``from_train`` as ``frame_rate=``, its
``to_dict`` keeps it, and a finished run is evaluated only on views of that rate (`evaluation.trained_variants`).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import psutil
import torch
from torch import nn

from fusionpipe import cuda
from fusionpipe.errors import FusionpipeError
from fusionpipe.train.heads import option_rule
from fusionpipe.train.options import value_problem
from fusionpipe.trials import Trial


class Task(ABC):
    """One task: labels from the train manifest, a head, its loss, predictions and corpus-level metrics."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    metric_names: ClassVar[tuple[str, ...]]
    higher_is_better: ClassVar[frozenset[str]] = frozenset()
    heads: ClassVar[tuple[type[nn.Module], ...]]
    frame_level: ClassVar[bool] = False  # labels on the view's frames: from_train takes frame_rate=

    @classmethod
    @abstractmethod
    def from_train(cls, train: Mapping[str, Sequence], trials: Sequence[Trial] = ()) -> Task:
        """The task with its labels from the train manifest (``train``: column -> values). ``trials``: the
        pairs a verification task scores (eval data, not labels); the others have none."""

    @classmethod
    @abstractmethod
    def from_dict(cls, state: Mapping, trials: Sequence[Trial] = ()) -> Task:
        """Rebuild the task from `to_dict` (kept with a checkpoint)."""

    @abstractmethod
    def to_dict(self) -> dict:
        """The label maps, and ``"task": name``, as JSON."""

    @abstractmethod
    def build_head(self, in_dim: int, **sizes) -> nn.Module:
        """The head: an nn.Module with every trained parameter of the task."""

    @abstractmethod
    def loss(self, head, feats, lengths, targets, reduction: str = "mean") -> torch.Tensor:
        """The scalar loss of a batch; ``reduction="none"``: the (B,) per-utterance terms whose mean it is
        (data-parallel training sums them per rank)."""

    @abstractmethod
    def predict(self, head, feats, lengths) -> list:
        """One prediction per utterance of a batch."""

    @abstractmethod
    def metrics(self, preds: Sequence, targets) -> dict[str, float]:
        """Metric name -> value over a whole eval set."""

    def outputs(self, head, feats, lengths) -> list[dict]:
        """What `fusionpipe predict` writes for each utterance of a batch: one dict of JSON values, its keys the
        output's columns. A task says here what its prediction means to a user (a transcript, a label with its
        probabilities, an embedding); by default, `predict`'s value as it is. Named as the manifest's columns
        where one fits: phoneme's ``phonemes`` (phones separated by spaces), diarize's ``turns``
        (`rttm.format_turns`), which ``--out X.rttm`` writes as RTTM."""
        return [{"prediction": p} for p in self.predict(head, feats, lengths)]

    @classmethod
    def is_metric(cls, metric: str) -> bool:
        """Whether `metrics` reports ``metric`` (a task with metrics per group says so here)."""
        return metric in cls.metric_names

    @classmethod
    def head_option_names(cls) -> set[str]:
        """The keyword sizes the task's heads take (their constructors' parameters with defaults)."""
        return {p.name for c in cls.heads for p in inspect.signature(c.__init__).parameters.values()
                if p.default is not inspect.Parameter.empty}

    @classmethod
    def head_option_problems(cls, options: dict) -> list[tuple[str, str]]:
        """(option, what is wrong) for every head option the task's head cannot take: an unknown name or a
        value outside its rule (`heads.option_rule`). Empty when all are fine."""
        allowed = cls.head_option_names()
        out = []
        for name, value in options.items():
            if name not in allowed:
                out.append((name, f"unknown to the {cls.name} head, which takes {', '.join(sorted(allowed))}"))
            elif (why := value_problem(option_rule(name), value)) is not None:
                out.append((name, f"{why} (the {cls.name} head)"))
        return out


def column(targets: Mapping[str, Sequence], name: str, task: str) -> list:
    """The values of column ``name``, one per utterance, refused when missing or empty on any utterance."""
    if name not in targets:
        raise ValueError(f"task {task!r} needs the manifest column {name!r}; got {sorted(targets)}")
    values = list(targets[name])
    empty = [i for i, v in enumerate(values) if v is None]
    if empty:
        raise ValueError(f"task {task!r} needs {name!r} on every utterance; {len(empty)} have none "
                         f"(the first is number {empty[0]})")
    return values


def label_indices(labels: Sequence[str], known: Sequence[str], what: str) -> torch.Tensor:
    """Labels -> their indices in ``known`` (B,) long, refusing labels the train manifest did not have."""
    index = {c: i for i, c in enumerate(known)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        shown = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        raise ValueError(f"{what} {unknown[:5]} are not among the train {what} ({shown})")
    return torch.tensor([index[x] for x in labels], dtype=torch.long)


def check_head(task: Task, in_dim: int, sizes: dict, device: torch.device) -> None:
    """Refuse head sizes that cannot be built, or whose parameters with their gradients and Adam's two
    moments (4 x 4 bytes each) exceed the memory of ``device``: the head is built on the meta device
    first, which allocates nothing. Called before a head is built for real."""
    try:
        with torch.device("meta"):
            head = task.build_head(in_dim, **sizes)
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:
        raise FusionpipeError(f"--head-option {sizes}: the {task.name} head cannot be built ({e}); choose other "
                              "sizes") from None
    n = sum(p.numel() for p in head.parameters())
    if device.type == "cuda":
        free = cuda.free_memory(device)
    else:
        free = psutil.virtual_memory().available
    if 16 * n > free:
        raise FusionpipeError(f"--head-option {sizes}: the {task.name} head would have {n:,} parameters, "
                              f"{16 * n / 2**30:.1f} GiB with their gradients and optimizer state, and {device} has "
                              f"{free / 2**30:.1f} GiB free; choose smaller sizes")
