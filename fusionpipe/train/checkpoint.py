"""Stage 3: checkpoints written whole or not at all, read without running code."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from fusionpipe.atomic import atomic_write
from fusionpipe.errors import FusionpipeError


def save_checkpoint(obj: dict, path: Path) -> None:
    """torch.save, whole or not at all (`atomic_write`): a kill leaves the previous file intact."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by `save_checkpoint`, read with weights_only=True: tensors and plain
    containers only, so a crafted file cannot run code; a torn, foreign or crafted one stops with a
    FusionpipeError naming it."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FusionpipeError(f"{path} is missing; the run did not finish writing it (train it again)") from None
    except Exception as e:  # noqa: BLE001 -- torch raises many kinds (UnpicklingError, RuntimeError, EOFError)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise FusionpipeError(f"{path} is not a checkpoint fusionpipe can read, and it was not unpickled further "
                              f"(weights_only: {reason}); it is damaged or was not written by fusionpipe: delete "
                              "it or train the run again") from None
    if not isinstance(ckpt, dict):
        raise FusionpipeError(f"{path} holds a {type(ckpt).__name__}, not a fusionpipe checkpoint")
    return ckpt
