"""Stage 3: per-task labels, losses, predictions and metrics.

    >>> from fusionpipe.train.tasks import build_task
    >>> task = build_task("classify", {"label": ["sad", "ang", "sad", "neu"]})
    >>> task.classes
    ['ang', 'neu', 'sad']
    >>> head = task.build_head(in_dim=768)
    >>> sorted(task.metrics(["sad", "ang"], {"label": ["sad", "neu"]}))
    ['accuracy', 'macro_f1']

One small dataclass per task in `TASKS`; the trainer uses the same five calls for all:

- ``build_task(name, train, trials=None)``: labels from the TRAIN manifest's columns
  (``train`` maps a column name to its values, one per utterance).
- ``task.build_head(in_dim, **sizes)``: the head (an nn.Module with all trained parameters).
- ``task.loss(head, feats, lengths, targets)``: scalar loss of a batch; with ``reduction="none"``
  the (B,) per-utterance losses whose mean it is (data-parallel training sums them per rank).
- ``task.predict(head, feats, lengths)``: one prediction per utterance of a batch.
- ``task.metrics(preds, targets)``: dict of metric name -> float over a whole eval set.

``feats`` is the fusion output (B, T, D), ``lengths`` (B,) long. ``targets`` maps each
column in ``task.columns`` to a list with one value per utterance (a batch's, or the whole
eval set's, in the order of ``preds``). Columns: asr ``text``; multilingual ``text`` and
``language``; classify ``label``; verify ``id`` and ``speaker``. Error rates and EER are
fractions (0.05 = 5 %). ``task.to_dict()`` / `task_from_dict` keep the label maps with a
checkpoint.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import jiwer
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, roc_curve
from torch import nn

from fusionpipe import cuda
from fusionpipe.errors import FusionpipeError
from fusionpipe.train.heads import ClassifierHead, CTCHead, SpeakerHead, TransformerCTCHead, XVectorHead
from fusionpipe.train.options import real, value_problem, whole

TASKS = ("asr", "classify", "verify", "multilingual")
# each task's dev metrics, the primary one first (it picks best.pt and heads the report's tables);
# multilingual also reports cer/<language> for every language of the eval set; the CTC tasks also report
# blank, the share of outputs decoded to nothing (a diagnostic: the plateau detector reads it, --select does not)
METRICS = {"asr": ("wer", "cer"), "multilingual": ("cer",), "classify": ("accuracy", "macro_f1"),
           "verify": ("eer",)}
HIGHER_IS_BETTER = frozenset({"accuracy", "macro_f1"})  # every other metric is an error rate

BLANK = "<blank>"
SEPARATOR = "|"  # stands for the space between words


# ---------------------------------------------------------------------------- characters
@dataclass
class CharVocab:
    """Character vocabulary for CTC: ``tokens[0]`` is the blank, "|" the word separator.

        >>> vocab = CharVocab.from_texts(["HELLO WORLD", "IT'S"])
        >>> vocab.tokens[:4]
        ['<blank>', "'", 'D', 'E']
        >>> vocab.decode(vocab.encode("HELLO  IT'S"))
        "HELLO IT'S"

    Texts are used as they are (no case folding); runs of whitespace count as one space.
    """

    tokens: list[str]

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> CharVocab:
        chars: set[str] = set()
        for i, text in enumerate(texts):
            if SEPARATOR in text:
                raise ValueError(f"text {i} ({text[:40]!r}) contains {SEPARATOR!r}, the word separator")
            chars.update(" ".join(text.split()).replace(" ", SEPARATOR))
        return cls([BLANK] + sorted(chars))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        """Text -> ids (no blank). ``unknown``: "error" (ValueError) or "skip" for characters
        missing from the vocabulary."""
        index = {t: i for i, t in enumerate(self.tokens)}
        ids = []
        for ch in " ".join(text.split()).replace(" ", SEPARATOR):
            if ch in index:
                ids.append(index[ch])
            elif unknown == "error":
                raise ValueError(f"character {ch!r} of {text[:40]!r} is not in the vocabulary "
                                 "(built from the training texts); use unknown='skip' to drop it")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; blanks are dropped, repeats are NOT collapsed (see greedy_ctc_decode)."""
        text = "".join(self.tokens[i] for i in ids if i != 0).replace(SEPARATOR, " ")
        return " ".join(text.split())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.tokens, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharVocab:
        tokens = json.loads(Path(path).read_text(encoding="utf-8"))
        if not tokens or tokens[0] != BLANK:
            raise ValueError(f"{path}: not a vocabulary (a JSON list starting with {BLANK!r})")
        return cls(tokens)


def greedy_ctc_decode(log_probs: torch.Tensor, lengths: torch.Tensor, vocab: CharVocab) -> list[str]:
    """(B, T, V) log-probs + (B,) valid lengths -> B texts: best token per frame, repeats
    collapsed, blanks dropped."""
    best = log_probs.argmax(-1).cpu()
    return [vocab.decode(torch.unique_consecutive(best[b, : int(n)]).tolist())
            for b, n in enumerate(lengths.cpu())]


def ctc_loss(log_probs: torch.Tensor, lengths: torch.Tensor, texts: Sequence[str],
             vocab: CharVocab, reduction: str = "mean") -> torch.Tensor:
    """CTC (blank 0, mean over the batch of per-utterance loss / target length, as s3prl;
    ``reduction="none"``: those (B,) per-utterance terms, as torch's "mean" computes them).
    Characters missing from the vocabulary are skipped: they cannot be predicted anyway.
    zero_infinity: an utterance with more targets than frames gives 0, not inf."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"ctc_loss: reduction {reduction!r}; use 'mean' or 'none'")
    ids = [vocab.encode(t, unknown="skip") for t in texts]
    targets = cuda.upload(torch.tensor([i for seq in ids for i in seq], dtype=torch.long), log_probs.device)
    target_lengths = torch.tensor([len(seq) for seq in ids], dtype=torch.long)
    # both lengths as given (the trainer's are on the host): torch's CUDA ctc_loss reads them on the host, and
    # would copy lengths on the device back, waiting for it; its "mean" (the division below, then the mean)
    # would copy the target lengths up with a wait, hence reduction="none" here. Justified, not removable here:
    # the CUDA kernel itself still copies lengths and offsets up with waits of its own (at::tensor and .cuda()
    # in LossCTC.cu), a few syncs per CTC forward and backward that only torch can remove.
    losses = F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=0, zero_infinity=True,
                        reduction="none") / cuda.upload(target_lengths.clamp(min=1), log_probs.device)
    return losses.mean() if reduction == "mean" else losses


# ---------------------------------------------------------------------------- metrics
def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate over the whole set (jiwer), as a fraction."""
    return float(jiwer.wer(list(refs), list(hyps)))


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


# ---------------------------------------------------------------------------- tasks
def batch_targets(rows) -> dict[str, list]:
    """Manifest rows -> the targets every task reads: {column: values, one per row}."""
    return {c: [getattr(u, c) for u in rows] for c in ("id", "text", "label", "speaker", "language")}


def _column(targets: Mapping[str, Sequence], name: str, task: str) -> list:
    if name not in targets:
        raise ValueError(f"task {task!r} needs the manifest column {name!r}; got {sorted(targets)}")
    values = list(targets[name])
    empty = [i for i, v in enumerate(values) if v is None]
    if empty:
        raise ValueError(f"task {task!r} needs {name!r} on every utterance; {len(empty)} have none "
                         f"(the first is number {empty[0]})")
    return values


@dataclass
class AsrTask:
    """Character CTC ASR (SUPERB ASR: BiLSTM head), greedy decoding; metrics wer and cer.
    predict -> list of texts."""

    vocab: CharVocab
    name: ClassVar[str] = "asr"
    columns: ClassVar[tuple[str, ...]] = ("text",)

    @classmethod
    def from_train(cls, train: Mapping[str, Sequence]):
        return cls(CharVocab.from_texts(_column(train, "text", cls.name)))

    def build_head(self, in_dim: int, **sizes) -> nn.Module:
        return CTCHead(in_dim, len(self.vocab), **sizes)

    def loss(self, head, feats, lengths, targets, reduction: str = "mean") -> torch.Tensor:
        log_probs, out_lengths = head(feats, lengths)
        return ctc_loss(log_probs, out_lengths, _column(targets, "text", self.name), self.vocab, reduction)

    def predict(self, head, feats, lengths) -> list[str]:
        log_probs, out_lengths = head(feats, lengths)
        return greedy_ctc_decode(log_probs, out_lengths, self.vocab)

    def metrics(self, preds: Sequence[str], targets) -> dict[str, float]:
        refs = _column(targets, "text", self.name)
        return {"wer": wer(refs, preds), "cer": cer(refs, preds), "blank": blank_share(preds)}

    def to_dict(self) -> dict:
        return {"task": self.name, "vocab": self.vocab.tokens}


@dataclass
class MultilingualTask(AsrTask):
    """ML-SUPERB (mono or multilingual): character CTC with the Transformer head; metrics
    cer and cer/<language> for every language in the eval set."""

    name: ClassVar[str] = "multilingual"
    columns: ClassVar[tuple[str, ...]] = ("text", "language")

    def build_head(self, in_dim: int, **sizes) -> nn.Module:
        return TransformerCTCHead(in_dim, len(self.vocab), **sizes)

    def metrics(self, preds: Sequence[str], targets) -> dict[str, float]:
        refs = _column(targets, "text", self.name)
        per_language = cer_per_language(refs, preds, _column(targets, "language", self.name))
        return {"cer": cer(refs, preds), "blank": blank_share(preds),
                **{f"cer/{k}": v for k, v in per_language.items()}}


@dataclass
class ClassifyTask:
    """Utterance classification (SUPERB emotion): mean-pool head, cross-entropy; metrics
    accuracy and macro_f1. Classes = sorted labels of the train manifest.
    predict -> list of labels."""

    classes: list[str]
    name: ClassVar[str] = "classify"
    columns: ClassVar[tuple[str, ...]] = ("label",)

    @classmethod
    def from_train(cls, train: Mapping[str, Sequence]):
        return cls(sorted(set(_column(train, "label", cls.name))))

    def build_head(self, in_dim: int, **sizes) -> nn.Module:
        return ClassifierHead(in_dim, len(self.classes), **sizes)

    def indices(self, labels: Sequence[str]) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the train classes {self.classes}")
        return torch.tensor([index[x] for x in labels], dtype=torch.long)

    def loss(self, head, feats, lengths, targets, reduction: str = "mean") -> torch.Tensor:
        logits, _ = head(feats, lengths)
        labels = cuda.upload(self.indices(_column(targets, "label", self.name)), logits.device)
        return F.cross_entropy(logits, labels, reduction=reduction)

    def predict(self, head, feats, lengths) -> list[str]:
        logits, _ = head(feats, lengths)
        return [self.classes[i] for i in logits.argmax(-1).tolist()]

    def metrics(self, preds: Sequence[str], targets) -> dict[str, float]:
        refs = _column(targets, "label", self.name)
        return {"accuracy": accuracy(refs, preds), "macro_f1": macro_f1(refs, preds)}

    def to_dict(self) -> dict:
        return {"task": self.name, "classes": self.classes}


Trial = tuple[str, str, int]  # (enrollment utterance id, test utterance id, 1 same speaker / 0)


def read_trials(path: str | Path) -> list[Trial]:
    """VoxCeleb-style trial list, one "label enroll_id test_id" per line. The ids must be
    the manifest's utterance ids (the importer names utterances so that they are)."""
    trials = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("0", "1"):
            raise ValueError(f"{path}:{n}: expected 'label enroll_id test_id' with label 0 or 1, got {line!r}")
        trials.append((parts[1], parts[2], int(parts[0])))
    return trials


@dataclass
class VerifyTask:
    """Speaker verification (SUPERB SV): x-vector + AM-softmax over the train speakers;
    predict -> one L2-normalised embedding (numpy, (embed_dim,)) per utterance; metrics:
    eer of the cosine scores of the trial pairs. Targets: ``speaker`` for the loss, ``id``
    (utterance ids, in the order of preds) for metrics; every trial id must be there."""

    speakers: list[str]
    trials: list[Trial] = field(default_factory=list)
    name: ClassVar[str] = "verify"
    columns: ClassVar[tuple[str, ...]] = ("id", "speaker")

    @classmethod
    def from_train(cls, train: Mapping[str, Sequence], trials: Sequence[Trial] = ()):
        return cls(sorted(set(_column(train, "speaker", cls.name))), list(trials))

    def build_head(self, in_dim: int, **sizes) -> nn.Module:
        return SpeakerHead(in_dim, len(self.speakers), **sizes)

    def loss(self, head, feats, lengths, targets, reduction: str = "mean") -> torch.Tensor:
        index = {s: i for i, s in enumerate(self.speakers)}
        names = _column(targets, "speaker", self.name)
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise ValueError(f"speakers {unknown[:5]} are not among the {len(index)} train speakers")
        hidden, _ = head(feats, lengths)
        labels = cuda.upload(torch.tensor([index[s] for s in names], dtype=torch.long), hidden.device)
        return head.amsoftmax(hidden, labels, reduction)

    def predict(self, head, feats, lengths) -> list[np.ndarray]:
        return list(head.embed(feats, lengths).detach().float().cpu().numpy())

    def metrics(self, preds: Sequence[np.ndarray], targets) -> dict[str, float]:
        if not self.trials:
            raise ValueError("verify: no trial list to score (--trials FILE; in Python, trials=)")
        embedding = dict(zip(_column(targets, "id", self.name), preds))
        missing = sorted({u for a, b, _ in self.trials for u in (a, b)} - set(embedding))
        if missing:
            raise ValueError(f"verify: {len(missing)} trial utterances have no embedding, e.g. {missing[:3]}")
        scores = [float(np.dot(embedding[a], embedding[b])
                        / (np.linalg.norm(embedding[a]) * np.linalg.norm(embedding[b]) + 1e-12))
                  for a, b, _ in self.trials]
        return {"eer": eer(scores, [label for _, _, label in self.trials])}

    def to_dict(self) -> dict:
        return {"task": self.name, "speakers": self.speakers}


def build_task(name: str, train: Mapping[str, Sequence], trials: Sequence[Trial] = ()):
    """The task ``name`` with its labels from the train manifest's columns (``train``:
    column -> values); ``trials`` only for verify."""
    if name == "asr":
        return AsrTask.from_train(train)
    if name == "multilingual":
        return MultilingualTask.from_train(train)
    if name == "classify":
        return ClassifyTask.from_train(train)
    if name == "verify":
        return VerifyTask.from_train(train, trials)
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def task_from_dict(state: Mapping, trials: Sequence[Trial] = ()):
    """Rebuild a task from ``task.to_dict()`` (trials are eval data, passed again for verify)."""
    name = state.get("task")
    if name == "asr":
        return AsrTask(CharVocab(list(state["vocab"])))
    if name == "multilingual":
        return MultilingualTask(CharVocab(list(state["vocab"])))
    if name == "classify":
        return ClassifyTask(list(state["classes"]))
    if name == "verify":
        return VerifyTask(list(state["speakers"]), list(trials))
    raise ValueError(f"unknown task {name!r} in the saved state; choose one of {', '.join(TASKS)}")


# ---------------------------------------------------------------------------- facts for checking settings
HEADS = {"asr": (CTCHead,), "multilingual": (TransformerCTCHead,), "classify": (ClassifierHead,),
         "verify": (SpeakerHead, XVectorHead)}  # the classes whose keyword sizes ``build_head`` passes on


def primary_metric(task: str) -> str:
    """The dev metric that picks a run's best checkpoint unless told otherwise."""
    return METRICS[task][0]


def is_metric(task: str, metric: str) -> bool:
    """Whether the task's ``metrics`` report ``metric`` (multilingual: also cer/<language>)."""
    return metric in METRICS[task] or (task == "multilingual" and metric.startswith("cer/") and len(metric) > 4)


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[0] not in HIGHER_IS_BETTER


def head_option_names(task: str) -> set[str]:
    """The keyword sizes the task's head takes (its constructors' parameters with defaults)."""
    return {p.name for c in HEADS[task] for p in inspect.signature(c.__init__).parameters.values()
            if p.default is not inspect.Parameter.empty}


# what a head option's value may be (options.py): the sizes (every other option) are whole numbers >= 1;
# a stack deeper than 256 layers is a typo (and would take minutes to build before it failed)
_HEAD_OPTION_VALUES = {"dropout": real(0, 1), "s": real(0, open_low=True), "m": real(0), "layers": whole(1, 256)}


def head_option_problems(task: str, options: dict) -> list[tuple[str, str]]:
    """(option, what is wrong) for every head option the task's head cannot take: an unknown name or a
    value outside its rule. Empty when all are fine."""
    allowed = head_option_names(task)
    out = []
    for name, value in options.items():
        if name not in allowed:
            out.append((name, f"unknown to the {task} head, which takes {', '.join(sorted(allowed))}"))
        elif (why := value_problem(_HEAD_OPTION_VALUES.get(name, whole(1)), value)) is not None:
            out.append((name, f"{why} (the {task} head)"))
    return out


def check_head(task, in_dim: int, sizes: dict, device: torch.device) -> None:
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
