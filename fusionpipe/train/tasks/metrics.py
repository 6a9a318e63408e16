"""Corpus-level metrics of the tasks, over a whole eval set. Error rates and EER are fractions (0.05 = 5 %).

    >>> wer(["A B C"], ["A X C"])
    0.3333333333333333
"""

from __future__ import annotations

from collections.abc import Sequence

import jiwer
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_curve

def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate over the whole set (jiwer), as a fraction."""
    return float(jiwer.wer(list(refs), list(hyps)))


def per(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Phone error rate over the whole set, as a fraction: jiwer's WER over phone strings (tokens separated
    by spaces), so a phone counts as a word does. SUPERB PR's per is the same edit distance over phones."""
    return wer(refs, hyps)


def blank_share(hyps: Sequence[str]) -> float:
    """Share of CTC outputs decoded to nothing (every frame blank): 1.0 is the blank plateau."""
    return sum(not h for h in hyps) / max(len(hyps), 1)


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate over the whole set (jiwer), as a fraction."""
    return float(jiwer.cer(list(refs), list(hyps)))


def cer_per_language(refs: Sequence[str], hyps: Sequence[str], languages: Sequence[str]) -> dict[str, float]:
    """{language: CER of that language's utterances}, languages sorted."""
    out = {}
    for lang in sorted(set(languages)):
        pairs = [(r, h) for r, h, g in zip(refs, hyps, languages) if g == lang]
        out[lang] = cer([r for r, _ in pairs], [h for _, h in pairs])
    return out


def accuracy(refs: Sequence, preds: Sequence) -> float:
    return float(accuracy_score(list(refs), list(preds)))


def macro_f1(refs: Sequence, preds: Sequence) -> float:
    """F1 averaged over the classes present in refs or preds, unweighted."""
    return float(f1_score(list(refs), list(preds), average="macro"))


def eer(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Equal error rate: where the miss rate (1 - TPR) meets the false-alarm rate on the
    ROC (sklearn roc_curve), linearly interpolated between the two ROC points around the
    crossing. ``labels``: 1 = same speaker (target), 0 = different."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise ValueError("eer needs both target (1) and non-target (0) trials")
    fpr, tpr, _ = roc_curve(labels, np.asarray(scores, dtype=float))
    gap = fpr - (1.0 - tpr)  # rises from -1 (threshold +inf) to +1
    i = int(np.argmax(gap >= 0))
    if i == 0 or gap[i] == 0:
        return float(fpr[i])
    t = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))
