"""diarize: speaker diarization (SUPERB SD), per-frame activity of up to N speakers; metric der and its parts.

The labels are the manifest's ``turns`` (`fusionpipe.rttm`), put on the fused view's own frame grid: stage 2's
time alignment decides the frame rate (`FusedView.frame_rate`: the fastest upstream's under ``align_time=max``,
the slowest's under ``min``), the trainer gives it to `from_train`, and task.json keeps it, so that evaluate and
predict read the same grid. Frame t spans [t, t + 1) / frame_rate seconds and is labelled active for a speaker
whose turn holds its centre:

    >>> task = DiarizeTask.from_train({"id": ["m1"], "turns": ["0.00,0.06,a;0.04,0.10,b"]}, frame_rate=50.0)
    >>> task.labels({"id": ["m1"], "turns": ["0.00,0.06,a;0.04,0.10,b"]}, [5], 2)[0].tolist()
    [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0]]

Which head slot is which speaker is left open: the loss is permutation-invariant (`pit_bce`), and predicted
turns are named by slot (``speaker0``, ``speaker1``, ...). The DER is pyannote.metrics' with no collar and
overlapping speech scored, as SUPERB SD scores it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from fusionpipe import cuda
from fusionpipe.errors import FusionpipeError
from fusionpipe.rttm import Turn, format_turns, parse_turns
from fusionpipe.train.heads import DiarizationHead
from fusionpipe.train.interfaces import frame_mask
from fusionpipe.train.tasks.base import Task, column
from fusionpipe.trials import Trial


def speakers_of(turns: Sequence[Turn]) -> list[str]:
    """A recording's speakers in the order they first speak (their slots in its label matrix)."""
    return list(dict.fromkeys(t.speaker for t in sorted(turns)))


def frame_labels(turns: Sequence[Turn], frames: int, frame_rate: float, slots: int) -> np.ndarray:
    """(frames, slots) float32 0/1: frame t is active for a speaker whose turn holds its centre,
    (t + 0.5) / frame_rate seconds. The speakers take slots in `speakers_of` order; the rest stay 0."""
    centres = (np.arange(frames) + 0.5) / frame_rate
    out = np.zeros((frames, slots), np.float32)
    slot = {s: k for k, s in enumerate(speakers_of(turns))}
    for t in turns:
        out[(centres >= t.start) & (centres < t.end), slot[t.speaker]] = 1.0
    return out


def pit_bce(logits: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Permutation-invariant BCE, per utterance: (B, T, N) logits and 0/1 labels, (B,) valid frames ->
    (B,) the mean BCE over valid frames and slots, under the assignment of label columns to output slots
    that makes it smallest.

    The mean is a sum over slots, so the best permutation is a linear assignment over the N x N costs
    (slot i against label column j): exact, and N^3 instead of the N! of trying every permutation
    (tests/test_diarize.py checks it against that brute force). The assignment is chosen on the host;
    the gradient flows through the chosen costs."""
    B, T, N = logits.shape
    mask = frame_mask(cuda.upload(lengths, logits.device), T).to(logits.dtype)  # (B, T)
    pairs = F.binary_cross_entropy_with_logits(logits[..., :, None].expand(B, T, N, N),
                                               labels[..., None, :].expand(B, T, N, N), reduction="none")
    cost = (pairs * mask[..., None, None]).sum(1) / (mask.sum(1) * N).clamp(min=1)[:, None, None]  # (B, N, N)
    columns = torch.tensor(np.stack([linear_sum_assignment(c)[1] for c in cost.detach().float().cpu().numpy()]),
                           device=logits.device).reshape(B, N)
    return cost.gather(2, columns[..., None]).squeeze(-1).sum(1)


def segments(active: np.ndarray, frame_rate: float) -> list[Turn]:
    """(T, N) booleans -> the turns of each slot (``speaker<k>``): runs of active frames, frame t spanning
    [t, t + 1) / frame_rate seconds."""
    turns = []
    for k in range(active.shape[1]):
        edges = np.diff(np.concatenate([[0], active[:, k].astype(np.int8), [0]]))
        for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            turns.append(Turn(start / frame_rate, end / frame_rate, f"speaker{k}"))
    return sorted(turns)


def diarization_error(references: Sequence[Sequence[Turn]], hypotheses: Sequence[Sequence[Turn]]) -> dict[str, float]:
    """DER over a whole eval set and its parts (each a share of the reference speech): pyannote.metrics'
    DiarizationErrorRate with collar 0 and overlap scored (SUPERB SD's setting), speakers mapped per recording."""
    # imported here: pandas comes with it, and every other command would pay for its import
    from pyannote.core import Annotation, Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    metric = DiarizationErrorRate(collar=0.0, skip_overlap=False)
    for ref, hyp in zip(references, hypotheses, strict=True):
        annotations = []
        for turns in (ref, hyp):
            a = Annotation()
            for i, t in enumerate(turns):
                a[Segment(t.start, t.end), i] = t.speaker
            annotations.append(a)
        end = max((t.end for t in (*ref, *hyp)), default=0.0)
        if end > 0:  # the whole recording as far as anyone speaks: false alarms count wherever they are
            metric(*annotations, uem=Timeline([Segment(0.0, end)]))
    total = float(metric["total"])  # pyannote's components are numpy floats; checkpoints keep plain ones
    if total <= 0:
        raise FusionpipeError("no reference speech to score a DER on: every `turns` cell of the evaluated "
                              "recordings is empty; evaluate on mixtures where someone speaks (fill their turns)")
    parts = {"miss": float(metric["missed detection"]) / total, "false_alarm": float(metric["false alarm"]) / total,
             "confusion": float(metric["confusion"]) / total}
    return {"der": sum(parts.values()), **parts}


@dataclass
class DiarizeTask(Task):
    """predict -> the turns (`fusionpipe.rttm.Turn`) of each utterance. Targets: ``turns`` for the loss and
    the DER, ``id`` to name an utterance in errors. ``most_speakers``: the most any train recording has (the
    head needs that many slots, ``--head-option speakers``), ``busiest``: that recording."""

    frame_rate: float
    most_speakers: int
    busiest: str
    name = "diarize"
    columns = ("id", "turns")
    metric_names = ("der", "miss", "false_alarm", "confusion")
    heads = (DiarizationHead,)
    frame_level = True

    @classmethod
    def from_train(cls, train: Mapping[str, Sequence], trials: Sequence[Trial] = (),
                   frame_rate: float | None = None) -> DiarizeTask:
        if not frame_rate:
            raise ValueError("diarize puts its labels on the fused view's frames: give its frame_rate")
        counts = [(len(speakers_of(turns)), u) for u, turns in zip(column(train, "id", cls.name),
                                                                    cls.parsed(train))]
        most, busiest = max(counts, key=lambda c: c[0])
        return cls(float(frame_rate), most, busiest)

    @classmethod
    def from_dict(cls, state: Mapping, trials: Sequence[Trial] = ()) -> DiarizeTask:
        return cls(float(state["frame_rate"]), int(state["most_speakers"]), str(state["busiest"]))

    def to_dict(self) -> dict:
        return {"task": self.name, "frame_rate": self.frame_rate, "most_speakers": self.most_speakers,
                "busiest": self.busiest}

    def build_head(self, in_dim: int, **sizes) -> DiarizationHead:
        head = DiarizationHead(in_dim, **sizes)
        if self.most_speakers > head.out.out_features:
            raise ValueError(f"utterance {self.busiest} of the train manifest has {self.most_speakers} speakers and "
                             f"the head {head.out.out_features} speaker slots; give --head-option "
                             f"speakers={self.most_speakers}, or leave such recordings out")
        return head

    @classmethod
    def parsed(cls, targets: Mapping[str, Sequence]) -> list[list[Turn]]:
        """Each utterance's turns, a malformed cell named by its utterance (ValueError: the caller says where)."""
        try:
            return [parse_turns(cell, f"utterance {u}") for u, cell in
                    zip(column(targets, "id", cls.name), column(targets, "turns", cls.name))]
        except FusionpipeError as e:
            raise ValueError(str(e)) from None

    def labels(self, targets: Mapping[str, Sequence], lengths, slots: int) -> torch.Tensor:
        """(B, T_max, slots) 0/1 frame labels of a batch on this task's frame grid, zero past each length."""
        T = max(int(n) for n in lengths)
        out = np.zeros((len(lengths), T, slots), np.float32)
        for b, (u, turns, n) in enumerate(zip(column(targets, "id", self.name), self.parsed(targets), lengths)):
            if len(speakers_of(turns)) > slots:
                raise ValueError(f"utterance {u} has {len(speakers_of(turns))} speakers and the head {slots} "
                                 "speaker slots (--head-option speakers)")
            out[b, :int(n)] = frame_labels(turns, int(n), self.frame_rate, slots)
        return torch.from_numpy(out)

    def loss(self, head, feats, lengths, targets, reduction: str = "mean") -> torch.Tensor:
        logits, out_lengths = head(feats, lengths)
        labels = cuda.upload(self.labels(targets, out_lengths.tolist(), logits.shape[2]), logits.device)
        per_utterance = pit_bce(logits, labels, out_lengths)
        return per_utterance if reduction == "none" else per_utterance.mean()

    def predict(self, head, feats, lengths) -> list[list[Turn]]:
        logits, out_lengths = head(feats, lengths)
        active = (logits > 0).cpu().numpy()  # activity probability above 0.5
        return [segments(active[b, :n], self.frame_rate) for b, n in enumerate(out_lengths.tolist())]

    def outputs(self, head, feats, lengths) -> list[dict]:
        """Who speaks when, as the manifest's ``turns`` cell (``--out X.rttm`` writes it as RTTM)."""
        return [{"turns": format_turns(turns)} for turns in self.predict(head, feats, lengths)]

    def metrics(self, preds: Sequence[Sequence[Turn]], targets) -> dict[str, float]:
        return diarization_error(self.parsed(targets), preds)
