"""multilingual: ML-SUPERB (mono or multilingual), character CTC with the Transformer head; metrics cer and
cer/<language> for every language of the eval set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from fusionpipe.train.heads import TransformerCTCHead
from fusionpipe.train.tasks.asr import AsrTask
from fusionpipe.train.tasks.base import column
from fusionpipe.train.tasks.metrics import blank_share, cer, cer_per_language


@dataclass
class MultilingualTask(AsrTask):
    """`AsrTask` with ML-SUPERB's head and a CER per language."""

    name = "multilingual"
    columns = ("text", "language")
    metric_names = ("cer",)
    heads = (TransformerCTCHead,)

    @classmethod
    def is_metric(cls, metric: str) -> bool:
        return metric in cls.metric_names or (metric.startswith("cer/") and len(metric) > 4)

    def build_head(self, in_dim: int, **sizes) -> nn.Module:
        return TransformerCTCHead(in_dim, len(self.vocab), **sizes)

    def metrics(self, preds: Sequence[str], targets) -> dict[str, float]:
        refs = column(targets, "text", self.name)
        per_language = cer_per_language(refs, preds, column(targets, "language", self.name))
        return {"cer": cer(refs, preds), "blank": blank_share(preds),
                **{f"cer/{k}": v for k, v in per_language.items()}}
