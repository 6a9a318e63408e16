"""verify: speaker verification (SUPERB SV), x-vector + AM-softmax over the train speakers; metric eer of the
cosine scores of the trial pairs (`fusionpipe.trials`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fusionpipe import cuda
from fusionpipe.train.heads import SpeakerHead, XVectorHead
from fusionpipe.train.tasks.base import Task, column, label_indices
from fusionpipe.train.tasks.metrics import eer
from fusionpipe.trials import Trial


@dataclass
class VerifyTask(Task):
    """predict -> one L2-normalised embedding (numpy, (embed_dim,)) per utterance. Targets: ``speaker`` for
    the loss, ``id`` (utterance ids, in the order of preds) for metrics; every trial id must be there."""

    speakers: list[str]
    trials: list[Trial] = field(default_factory=list)
    name = "verify"
    columns = ("id", "speaker")
    metric_names = ("eer",)
    heads = (SpeakerHead, XVectorHead)  # SpeakerHead passes its sizes on to the x-vector

    @classmethod
    def from_train(cls, train: Mapping[str, Sequence], trials: Sequence[Trial] = ()) -> VerifyTask:
        return cls(sorted(set(column(train, "speaker", cls.name))), list(trials))

    @classmethod
    def from_dict(cls, state: Mapping, trials: Sequence[Trial] = ()) -> VerifyTask:
        return cls(list(state["speakers"]), list(trials))  # trials are eval data, passed again

    def to_dict(self) -> dict:
        return {"task": self.name, "speakers": self.speakers}

    def build_head(self, in_dim: int, **sizes) -> SpeakerHead:
        return SpeakerHead(in_dim, len(self.speakers), **sizes)

    def loss(self, head, feats, lengths, targets, reduction: str = "mean") -> torch.Tensor:
        labels = label_indices(column(targets, "speaker", self.name), self.speakers, "speakers")
        hidden, _ = head(feats, lengths)
        return head.amsoftmax(hidden, cuda.upload(labels, hidden.device), reduction)

    def predict(self, head, feats, lengths) -> list[np.ndarray]:
        return list(head.embed(feats, lengths).detach().float().cpu().numpy())

    def metrics(self, preds: Sequence[np.ndarray], targets) -> dict[str, float]:
        if not self.trials:
            raise ValueError("verify: no trial list to score (--trials FILE; in Python, trials=)")
        embedding = dict(zip(column(targets, "id", self.name), preds))
        missing = sorted({u for a, b, _ in self.trials for u in (a, b)} - set(embedding))
        if missing:
            raise ValueError(f"verify: {len(missing)} trial utterances have no embedding, e.g. {missing[:3]}")
        return {"eer": eer(trial_scores(embedding, self.trials), [label for _, _, label in self.trials])}

    def outputs(self, head, feats, lengths) -> list[dict]:
        return [{"embedding": e.tolist()} for e in self.predict(head, feats, lengths)]


def trial_scores(embedding: Mapping[str, np.ndarray], trials: Sequence[Trial]) -> list[float]:
    """The cosine score of each trial pair (every id of ``trials`` has its embedding): what eer ranks, and
    what `fusionpipe predict --trials` writes."""
    return [float(np.dot(embedding[a], embedding[b])
                  / (np.linalg.norm(embedding[a]) * np.linalg.norm(embedding[b]) + 1e-12))
            for a, b, _ in trials]
