"""What the CTC tasks (asr, multilingual, phoneme) share: the token vocabulary, the loss, greedy decoding, and
`CtcTask`, the head, loss and predictions of a task that reads one column of token strings."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusionpipe import cuda
from fusionpipe.train.heads import CTCHead
from fusionpipe.train.tasks.base import Task, column

BLANK = "<blank>"
SEPARATOR = "|"  # stands for the space between words


@dataclass
class TokenVocab(ABC):
    """A CTC vocabulary: ``tokens[0]`` is the blank, the rest sorted. What a token is (a character, a
    phone) is the subclass's `split` and `join`; everything else is shared."""

    tokens: list[str]

    @staticmethod
    @abstractmethod
    def split(text: str) -> list[str]:
        """A text -> its tokens."""

    @staticmethod
    @abstractmethod
    def join(tokens: Sequence[str]) -> str:
        """Tokens -> the text they spell (split's inverse, whitespace normalised)."""

    @classmethod
    def check(cls, i: int, text: str) -> None:
        """Refuse a training text the vocabulary cannot represent (ValueError naming text ``i``)."""

    @classmethod
    def from_texts(cls, texts: Sequence[str]):
        units: set[str] = set()
        for i, text in enumerate(texts):
            cls.check(i, text)
            units.update(cls.split(text))
        return cls([BLANK] + sorted(units))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        """Text -> ids (no blank). ``unknown``: "error" (ValueError) or "skip" for tokens
        missing from the vocabulary."""
        index = {t: i for i, t in enumerate(self.tokens)}
        ids = []
        for token in self.split(text):
            if token in index:
                ids.append(index[token])
            elif unknown == "error":
                raise ValueError(f"token {token!r} of {text[:40]!r} is not in the vocabulary "
                                 "(built from the training texts); use unknown='skip' to drop it")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; blanks are dropped, repeats are NOT collapsed (see greedy_ctc_decode)."""
        return self.join([self.tokens[i] for i in ids if i != 0])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.tokens, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path):
        tokens = json.loads(Path(path).read_text(encoding="utf-8"))
        if not tokens or tokens[0] != BLANK:
            raise ValueError(f"{path}: not a vocabulary (a JSON list starting with {BLANK!r})")
        return cls(tokens)


@dataclass
class CharVocab(TokenVocab):
    """Character vocabulary: every character a token, "|" the word separator.

        >>> vocab = CharVocab.from_texts(["HELLO WORLD", "IT'S"])
        >>> vocab.tokens[:4]
        ['<blank>', "'", 'D', 'E']
        >>> vocab.decode(vocab.encode("HELLO  IT'S"))
        "HELLO IT'S"

    Texts are used as they are (no case folding); runs of whitespace count as one space.
    """

    @staticmethod
    def split(text: str) -> list[str]:
        return list(" ".join(text.split()).replace(" ", SEPARATOR))

    @staticmethod
    def join(tokens: Sequence[str]) -> str:
        return " ".join("".join(tokens).replace(SEPARATOR, " ").split())

    @classmethod
    def check(cls, i: int, text: str) -> None:
        if SEPARATOR in text:
            raise ValueError(f"text {i} ({text[:40]!r}) contains {SEPARATOR!r}, the word separator")


@dataclass
class PhoneVocab(TokenVocab):
    """Phone vocabulary: the tokens of a phone string, separated by whitespace (the manifest's
    ``phonemes`` column); no word separator, as SUPERB PR has none.

        >>> vocab = PhoneVocab.from_texts(["HH AH0 L OW1", "W ER1 L D"])
        >>> vocab.tokens[:4]
        ['<blank>', 'AH0', 'D', 'ER1']
        >>> vocab.decode(vocab.encode("L  OW1"))
        'L OW1'
    """

    @staticmethod
    def split(text: str) -> list[str]:
        return text.split()

    @staticmethod
    def join(tokens: Sequence[str]) -> str:
        return " ".join(tokens)

    @classmethod
    def check(cls, i: int, text: str) -> None:
        if BLANK in text.split():
            raise ValueError(f"phone string {i} ({text[:40]!r}) contains {BLANK!r}, the CTC blank")


def greedy_ctc_decode(log_probs: torch.Tensor, lengths: torch.Tensor, vocab: TokenVocab) -> list[str]:
    """(B, T, V) log-probs + (B,) valid lengths -> B texts (token strings): best token per frame, repeats
    collapsed, blanks dropped."""
    best = log_probs.argmax(-1).cpu()
    return [vocab.decode(torch.unique_consecutive(best[b, : int(n)]).tolist())
            for b, n in enumerate(lengths.cpu())]


def ctc_loss(log_probs: torch.Tensor, lengths: torch.Tensor, texts: Sequence[str],
             vocab: TokenVocab, reduction: str = "mean") -> torch.Tensor:
    """CTC (blank 0, mean over the batch of per-utterance loss / target length, as s3prl;
    ``reduction="none"``: those (B,) per-utterance terms, as torch's "mean" computes them).
    Tokens missing from the vocabulary are skipped: they cannot be predicted anyway.
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


class CtcTask(Task):
    """A task that reads the token strings of its first manifest column with CTC and the BiLSTM head: asr
    the characters of ``text``, phoneme the phones of ``phonemes``. The subclass holds the vocabulary
    (``vocab``), says how it is built and kept, which metrics it reports and what `fusionpipe predict` calls
    its decoded strings (``output``)."""

    heads = (CTCHead,)
    output: ClassVar[str]  # the column name of its decoded strings in predict's rows

    def build_head(self, in_dim: int, **sizes) -> nn.Module:
        return CTCHead(in_dim, len(self.vocab), **sizes)

    def loss(self, head, feats, lengths, targets, reduction: str = "mean") -> torch.Tensor:
        log_probs, out_lengths = head(feats, lengths)
        return ctc_loss(log_probs, out_lengths, column(targets, self.columns[0], self.name), self.vocab, reduction)

    def predict(self, head, feats, lengths) -> list[str]:
        log_probs, out_lengths = head(feats, lengths)
        return greedy_ctc_decode(log_probs, out_lengths, self.vocab)

    def outputs(self, head, feats, lengths) -> list[dict]:
        return [{self.output: text} for text in self.predict(head, feats, lengths)]
