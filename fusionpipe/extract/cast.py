"""Features -> the storage dtype: one cast (torch's rounding) and one error for a value that does not fit.

Both extraction paths cast here, the one-process path on the device (stage.extract_batches) and the
helper processes on the host (pipeline.py), so they write the same bytes and fail with the same words.
"""

from __future__ import annotations

import numpy as np
import torch

from fusionpipe.errors import FusionpipeError


def cast(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """`x` in the storage dtype ("float16" or "float32"), rounded by torch wherever `x` lives."""
    return x.to(getattr(torch, dtype))


def unstorable(model: str, utt_id: str, dtype: str, values: torch.Tensor | np.ndarray) -> FusionpipeError:
    """The error for an utterance whose `values` (before the cast) hold something `dtype` cannot: activations
    past its range (fp16 overflows from 65520), or NaN/inf from the upstream itself."""
    values = torch.as_tensor(values)
    if torch.isfinite(values).all():
        return FusionpipeError(f"{model} on {utt_id}: activations exceed the {dtype} range (|x| max "
                               f"{values.abs().max().item():.3g}); extract this model with --dtype float32")
    return FusionpipeError(f"{model} on {utt_id}: the upstream produced NaN/inf activations")
