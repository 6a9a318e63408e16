"""classify: utterance classification (SUPERB emotion), the mean-pool head, cross-entropy; metrics accuracy
and macro_f1.

    >>> task = ClassifyTask.from_train({"label": ["sad", "ang", "sad", "neu"]})
    >>> task.classes
    ['ang', 'neu', 'sad']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusionpipe import cuda
from fusionpipe.train.heads import ClassifierHead
from fusionpipe.train.tasks.base import Task, column, label_indices
from fusionpipe.train.tasks.metrics import accuracy, macro_f1
from fusionpipe.trials import Trial


@dataclass
class ClassifyTask(Task):
    """Classes = the sorted labels of the train manifest; predict -> one label per utterance."""

    classes: list[str]
    name = "classify"
    columns = ("label",)
    metric_names = ("accuracy", "macro_f1")
    higher_is_better = frozenset(metric_names)
    heads = (ClassifierHead,)

    @classmethod
    def from_train(cls, train: Mapping[str, Sequence], trials: Sequence[Trial] = ()) -> ClassifyTask:
        return cls(sorted(set(column(train, "label", cls.name))))

    @classmethod
    def from_dict(cls, state: Mapping, trials: Sequence[Trial] = ()) -> ClassifyTask:
        return cls(list(state["classes"]))

    def to_dict(self) -> dict:
        return {"task": self.name, "classes": self.classes}

    def build_head(self, in_dim: int, **sizes) -> nn.Module:
        return ClassifierHead(in_dim, len(self.classes), **sizes)

    def loss(self, head, feats, lengths, targets, reduction: str = "mean") -> torch.Tensor:
        logits, _ = head(feats, lengths)
        labels = label_indices(column(targets, "label", self.name), self.classes, "labels")
        return F.cross_entropy(logits, cuda.upload(labels, logits.device), reduction=reduction)

    def predict(self, head, feats, lengths) -> list[str]:
        logits, _ = head(feats, lengths)
        return [self.classes[i] for i in logits.argmax(-1).tolist()]

    def outputs(self, head, feats, lengths) -> list[dict]:
        """The label and every class's probability (softmax of the logits `predict` takes the argmax of)."""
        logits, _ = head(feats, lengths)
        best, probabilities = logits.argmax(-1).tolist(), logits.float().softmax(-1).tolist()
        return [{"label": self.classes[i], "probabilities": dict(zip(self.classes, p))}
                for i, p in zip(best, probabilities)]

    def metrics(self, preds: Sequence[str], targets) -> dict[str, float]:
        refs = column(targets, "label", self.name)
        return {"accuracy": accuracy(refs, preds), "macro_f1": macro_f1(refs, preds)}
