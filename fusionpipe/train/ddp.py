"""Data-parallel training under torchrun: the few process-group helpers the trainer uses.

    torchrun --standalone --nproc-per-node 2 -m fusionpipe train --stores ... --device cpu

torchrun starts one process per rank and sets RANK, LOCAL_RANK and WORLD_SIZE; `init` joins them
(gloo on CPU, nccl on CUDA, one GPU per rank: cuda:LOCAL_RANK). Outside torchrun, or with one
rank, every helper is the single-process identity, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def launched() -> bool:
    """True in a process that torchrun started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Rank 0 writes every file of a run and shows the progress bar."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Under torchrun every rank trains on its own GPU, cuda:LOCAL_RANK (a cuda:N index is overridden)."""
    if launched() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device: torch.device) -> bool:
    """Join torchrun's process group; True if this call created it (the caller then calls `shutdown`)."""
    if not launched() or _active():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def shutdown() -> None:
    dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to train through: DistributedDataParallel when there are several ranks, else the model.

    No buffer sync before each forward: no head or interface keeps running statistics, so buffers never
    differ between ranks (and the Transformer head's positional table is 5 MB).
    """
    if world_size() == 1:
        return model
    ddp = nn.parallel.DistributedDataParallel
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else "broadcast_buffers"  # its older name
    # device_ids=None, also on a GPU (allowed for a module on one device): with ids, DDP copies every tensor
    # argument to that GPU before the forward, the batch's lengths too, which the trainer keeps on the host on
    # purpose (the crop, the masks and CTC read them there without a sync); the batch is on the device already
    return ddp(model, device_ids=None, **{no_sync: False})


def rank_seed(seed: int, r: int) -> int:
    """The seed of rank r's random stream (dropout, masks, Gumbel noise): rank 0 keeps `seed`."""
    return seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of `values` over the ranks (one all-reduce), on their device: nothing is read back
    (the trainer reads the losses later, `loop._read_losses`)."""
    if world_size() == 1:
        return values
    t = values.to(torch.float64)
    dist.all_reduce(t)
    return t / world_size()


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
