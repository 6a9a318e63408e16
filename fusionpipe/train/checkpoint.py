"""Stage 3: checkpoints written whole or not at all, read without running code; last.pt of every variant."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fusionpipe.atomic import atomic_write
from fusionpipe.errors import FusionpipeError
from fusionpipe.train import ddp

if TYPE_CHECKING:
    from fusionpipe.train.rundir import RunDir
    from fusionpipe.train.variant import Variant


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


def save_checkpoints(variants: list[Variant], step: int, position: tuple[int, int], logs, run: RunDir) -> None:
    """last.pt: every variant's state at ``step``, in one file (a kill leaves all of them at one step).
    Every rank takes part (the RNG states are gathered); rank 0 writes, after the logs reach the disk."""
    rngs = {v.name: ddp.gather((v.rng, v.cuda_rng)) for v in variants}
    if not ddp.is_main():
        return
    for log in logs:
        log.sync()
    run.save_last({"step": step, "position": list(position),
                   "variants": {v.name: v.state(rngs[v.name]) for v in variants}})


def restore_checkpoints(variants: list[Variant], state: dict, path) -> tuple[int, tuple[int, int]]:
    """Every variant's state from last.pt (at ``path``); returns (step, data position)."""
    saved = state.get("variants") or {}
    if sorted(saved) != sorted(v.name for v in variants):
        raise FusionpipeError(f"{path} holds the variants {', '.join(sorted(saved)) or 'none'}, this run "
                              f"{', '.join(v.name for v in variants)}; give the run's --fusion and --merge")
    try:
        for v in variants:
            v.restore(saved[v.name])
        step, position = int(state["step"]), tuple(int(x) for x in state["position"])
        if step < 0 or len(position) != 2 or min(position) < 0:  # an edited file: nothing trains from there
            raise ValueError(f"step {step}, data position {position}")
        return step, position
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise FusionpipeError(f"{path} does not fit this run ({type(e).__name__}: {str(e)[:200]}); "
                              "train it again into another --out") from None
