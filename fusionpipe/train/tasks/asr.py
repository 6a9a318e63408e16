"""asr: character CTC (SUPERB ASR), the BiLSTM head, greedy decoding; metrics wer and cer.

    >>> task = AsrTask.from_train({"text": ["HELLO WORLD", "IT'S"]})
    >>> task.vocab.tokens[:3]
    ['<blank>', "'", 'D']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fusionpipe.train.tasks.base import column
from fusionpipe.train.tasks.ctc import CharVocab, CtcTask
from fusionpipe.train.tasks.metrics import blank_share, cer, wer
from fusionpipe.trials import Trial


@dataclass
class AsrTask(CtcTask):
    """Character CTC ASR; predict -> one text per utterance. Metrics also include blank, the share of
    outputs decoded to nothing (a diagnostic: the plateau detector reads it, --select does not)."""

    vocab: CharVocab
    name = "asr"
    columns = ("text",)
    metric_names = ("wer", "cer")
    output = "transcript"

    @classmethod
    def from_train(cls, train: Mapping[str, Sequence], trials: Sequence[Trial] = ()) -> AsrTask:
        return cls(CharVocab.from_texts(column(train, "text", cls.name)))

    @classmethod
    def from_dict(cls, state: Mapping, trials: Sequence[Trial] = ()) -> AsrTask:
        return cls(CharVocab(list(state["vocab"])))

    def to_dict(self) -> dict:
        return {"task": self.name, "vocab": self.vocab.tokens}

    def metrics(self, preds: Sequence[str], targets) -> dict[str, float]:
        refs = column(targets, "text", self.name)
        return {"wer": wer(refs, preds), "cer": cer(refs, preds), "blank": blank_share(preds)}
