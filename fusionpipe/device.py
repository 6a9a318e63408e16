"""Which device a stage runs on: one resolver for extraction and training."""

from __future__ import annotations

import torch

from fusionpipe.errors import FusionpipeError


def resolve_device(device: str) -> torch.device:
    """Device "auto" is cuda when there is one, else cpu; anything else is checked, with the fix in the error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise FusionpipeError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if d.type == "cuda" and not torch.cuda.is_available():
        raise FusionpipeError(f"device {device!r} asked for but CUDA is not available; use --device cpu or auto")
    return d
