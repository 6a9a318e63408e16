"""Stage 3: log.csv of a variant (and TensorBoard event files when tensorboard is installed)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from fusionpipe.atomic import atomic_write


class Log:
    """log.csv per variant (and TensorBoard event files when tensorboard is installed).

    Only appended to; opened at ``step`` (0: a new run, else the checkpoint a --resume starts from),
    it first keeps the header and the rows up to that step (a row torn by a kill, or logged after
    the checkpoint, goes), rewritten atomically.
    """

    HEADER = ["step", "loss", "metrics"]

    def __init__(self, path: Path, step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in self._rows(path) if int(row[0]) <= step] if step else []
        text = io.StringIO()
        csv.writer(text).writerows([self.HEADER, *kept])
        atomic_write(path, text.getvalue())
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / "tb"))
        except ImportError:
            self.tb = None

    @staticmethod
    def _rows(path: Path) -> list[list[str]]:
        """The whole rows of an existing log (its header and any torn or foreign line left out)."""
        if not path.exists():
            return []
        with open(path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # the kill came in the middle of this row
        return [row for row in csv.reader(lines) if len(row) == 3 and row[0].isdigit()]

    def sync(self) -> None:
        """Everything written so far is on disk (before a checkpoint commits its step)."""
        self.f.flush()
        os.fsync(self.f.fileno())

    def write(self, step: int, loss: float, metrics: dict) -> None:
        self.w.writerow([step, f"{loss:.6f}", json.dumps(metrics) if metrics else ""])
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            for k, val in metrics.items():
                self.tb.add_scalar(f"dev/{k}", val, step)

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def read_losses(path: Path) -> tuple[list[int], list[float]]:
    """(steps, training losses) of a log.csv, its finite losses only (for learning curves)."""
    steps, losses = [], []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            try:
                loss = float(rec["loss"])
            except (TypeError, ValueError):
                continue
            if math.isfinite(loss):
                steps.append(int(rec["step"]))
                losses.append(loss)
    return steps, losses
