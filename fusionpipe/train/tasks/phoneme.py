"""phoneme: phoneme recognition (SUPERB PR), CTC over the phone tokens of the manifest's ``phonemes``
column, greedy decoding; metric per (phone error rate).

    >>> task = PhonemeTask.from_train({"phonemes": ["HH AH0 L OW1", "W ER1 L D"]})
    >>> task.vocab.tokens[:3]
    ['<blank>', 'AH0', 'D']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fusionpipe.train.tasks.base import column
from fusionpipe.train.tasks.ctc import CtcTask, PhoneVocab
from fusionpipe.train.tasks.metrics import blank_share, per
from fusionpipe.trials import Trial


@dataclass
class PhonemeTask(CtcTask):
    """Phone CTC; predict -> one phone string (tokens separated by spaces) per utterance. The head is asr's
    (docs/decisions.md says why not SUPERB PR's linear one). Metrics also include blank, the share of outputs
    decoded to nothing, which the plateau detector reads as it does for asr."""

    vocab: PhoneVocab
    name = "phoneme"
    columns = ("phonemes",)
    metric_names = ("per",)
    output = "phonemes"

    @classmethod
    def from_train(cls, train: Mapping[str, Sequence], trials: Sequence[Trial] = ()) -> PhonemeTask:
        return cls(PhoneVocab.from_texts(column(train, "phonemes", cls.name)))

    @classmethod
    def from_dict(cls, state: Mapping, trials: Sequence[Trial] = ()) -> PhonemeTask:
        return cls(PhoneVocab(list(state["phones"])))

    def to_dict(self) -> dict:
        return {"task": self.name, "phones": self.vocab.tokens}

    def metrics(self, preds: Sequence[str], targets) -> dict[str, float]:
        return {"per": per(column(targets, "phonemes", self.name), preds), "blank": blank_share(preds)}
