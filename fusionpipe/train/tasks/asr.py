"""asr: character CTC (SUPERB ASR), the BiLSTM head, greedy decoding; metrics wer and cer.

    >>> task = AsrTask.from_train({"text": ["HELLO WORLD", "IT'S"]})
    >>> task.vocab.tokens[:3]
    ['<blank>', "'", 'D']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fusionpipe.train.heads import CTCHead
from fusionpipe.train.tasks.base import Task, column
from fusionpipe.train.tasks.ctc import CharVocab, ctc_loss, greedy_ctc_decode
from fusionpipe.train.tasks.metrics import blank_share, cer, wer
from fusionpipe.trials import Trial


@dataclass
class AsrTask(Task):
    """Character CTC ASR; predict -> one text per utterance. Metrics also include blank, the share of
    outputs decoded to nothing (a diagnostic: the plateau detector reads it, --select does not)."""

    vocab: CharVocab
    name = "asr"
    columns = ("text",)
    metric_names = ("wer", "cer")
    heads = (CTCHead,)

    @classmethod
    def from_train(cls, train: Mapping[str, Sequence], trials: Sequence[Trial] = ()) -> AsrTask:
        return cls(CharVocab.from_texts(column(train, "text", cls.name)))

    @classmethod
    def from_dict(cls, state: Mapping, trials: Sequence[Trial] = ()) -> AsrTask:
        return cls(CharVocab(list(state["vocab"])))

    def to_dict(self) -> dict:
        return {"task": self.name, "vocab": self.vocab.tokens}

    def build_head(self, in_dim: int, **sizes) -> nn.Module:
        return CTCHead(in_dim, len(self.vocab), **sizes)

    def loss(self, head, feats, lengths, targets, reduction: str = "mean") -> torch.Tensor:
        log_probs, out_lengths = head(feats, lengths)
        return ctc_loss(log_probs, out_lengths, column(targets, "text", self.name), self.vocab, reduction)

    def predict(self, head, feats, lengths) -> list[str]:
        log_probs, out_lengths = head(feats, lengths)
        return greedy_ctc_decode(log_probs, out_lengths, self.vocab)

    def outputs(self, head, feats, lengths) -> list[dict]:
        return [{"transcript": text} for text in self.predict(head, feats, lengths)]

    def metrics(self, preds: Sequence[str], targets) -> dict[str, float]:
        refs = column(targets, "text", self.name)
        return {"wer": wer(refs, preds), "cer": cer(refs, preds), "blank": blank_share(preds)}
