"""Stage 3's variant: one (fusion, merge, seed) of a run, its model, optimizer and random stream; last.pt of them all.

Shared by training (`fusionpipe.train.loop`) and by everything that scores a finished run
(`fusionpipe.train.evaluation`, the analysis): a variant is built the same way for both, from its seed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fusionpipe import cuda
from fusionpipe.errors import FusionpipeError
from fusionpipe.train import ddp
from fusionpipe.train.augment import spec_augment
from fusionpipe.train.config import OPTIMIZERS, TrainConfig
from fusionpipe.train.interfaces import Interface
from fusionpipe.train.rundir import RunDir, variant_name, variants_of
from fusionpipe.train.tasks import check_head


class VariantModel(nn.Module):
    """Interface (merge front + interface) -> head. The only trained parameters of a variant."""

    def __init__(self, interface: Interface, head: nn.Module):
        super().__init__()
        self.interface, self.head = interface, head

    def features(self, stacks: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        return self.interface(stacks, lengths)

    def forward(self, stacks: list[torch.Tensor], lengths: torch.Tensor, task, targets: dict,
                specaugment: bool = False, reduction: str = "mean") -> torch.Tensor:
        """The training loss of a batch (in forward, so that DistributedDataParallel sees the pass)."""
        feats = self.features(stacks, lengths)
        if specaugment:
            feats = spec_augment(feats, lengths)
        return task.loss(self.head, feats, lengths, targets, reduction=reduction)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also a state dict of an older fusionpipe, whose interface keys begin with ``fusion.``."""
        return super().load_state_dict(current_keys(state_dict), strict=strict, assign=assign)


OLD_PREFIX, PREFIX = "fusion.", "interface."  # the interface's keys before and since it was named interface


def current_keys(state: dict) -> dict:
    """A variant's state dict with today's key names: ``fusion.*`` (checkpoints before the rename) -> ``interface.*``."""
    return {PREFIX + k[len(OLD_PREFIX):] if k.startswith(OLD_PREFIX) else k: v for k, v in state.items()}


# the CTC blank plateau: every dev output empty at this many evaluations in a row, the last of them
# past this share of the steps. Before it, an all-blank output is the normal start of CTC training: on real
# Whisper-base features (bench/method.py) HConv with standardize alone was all blank up to step 125 of 200
# and then learned; with the defaults every interface leaves it within the first half of such a run
PLATEAU_EVALS = 3
PLATEAU_FROM = 1 / 2


@dataclass
class Plateau:
    """Whether a CTC variant is stuck on the blank plateau: its dev output all blank, evaluation after
    evaluation (it then predicts only the blank and learns nothing; docs/method.md says why and what helps)."""

    blank_evals: int = 0            # evaluations in a row, up to the last, whose every dev output was empty
    since: int | None = None        # the step of the first of them
    warned: bool = False

    def update(self, step: int, metrics: dict, steps: int) -> str | None:
        """Record an evaluation; what to tell the user, if anything: that the variant has just been found
        stuck (once per episode), or that it has left the plateau after such a warning."""
        if metrics.get("blank", 0.0) < 1.0:
            left = self.warned
            self.blank_evals, self.since, self.warned = 0, None, False
            return f"left the CTC blank plateau at step {step}: it learns again" if left else None
        self.blank_evals += 1
        self.since = step if self.since is None else self.since
        if self.stuck(step, steps) and not self.warned:
            self.warned = True
            return (f"is stuck on the CTC blank plateau: every dev output has been empty at {self.blank_evals} "
                    f"evaluations in a row (steps {self.since}-{step}). Try a lower --lr (e.g. a third), more "
                    "--steps, or, if you turned them off, the default interface options standardize=true and "
                    "output_norm=true (docs/method.md)")
        return None

    def stuck(self, step: int, steps: int) -> bool:
        """Stuck now: PLATEAU_EVALS all-blank evaluations in a row past PLATEAU_FROM of the steps, or a run
        whose last evaluation, at its last step, was all blank (it ended having learned nothing usable)."""
        return (self.blank_evals >= PLATEAU_EVALS and step >= PLATEAU_FROM * steps) or \
            (step >= steps and self.blank_evals > 0)


class Variant:
    """One (fusion, merge) under training: model, optimizer and its own RNG stream.

    ``model`` is the plain VariantModel (evaluated and saved); ``trainer`` the module a training
    step calls, its DistributedDataParallel wrapper under torchrun.
    """

    def __init__(self, name: str, model: VariantModel, optimizer: torch.optim.Optimizer, out: Path,
                 device: torch.device):
        self.name, self.model, self.optimizer, self.out, self.device = name, model, optimizer, out, device
        self.trainer: nn.Module = model
        self.rng = torch.get_rng_state()
        self.cuda_rng = device_rng(device)
        self.best: float | None = None
        self.best_metrics: dict | None = None
        self.train_seconds = 0.0
        self.plateau = Plateau()

    @contextmanager
    def own_rng(self):
        """Dropout, masks and Gumbel noise draw from this variant's stream only (the CPU generator's, and on a
        GPU that GPU's: the one device this process trains on)."""
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            cuda.set_rng_state(self.cuda_rng, self.device)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = cuda.get_rng_state(self.device)

    def state(self, rank_rngs: list | None = None) -> dict:
        """This variant's part of last.pt (tensors and plain containers only: `load_checkpoint`);
        ``rank_rngs``: every rank's (rng, cuda_rng) under DDP (rank 0's are also rng, cuda_rng)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": self.rng,
                "cuda_rng": self.cuda_rng, "best": self.best, "best_metrics": self.best_metrics,
                "train_seconds": self.train_seconds,
                "plateau": [self.plateau.blank_evals, self.plateau.since, self.plateau.warned],
                **({"rank_rngs": [list(r) for r in rank_rngs]} if rank_rngs and len(rank_rngs) > 1 else {})}

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.best, self.best_metrics = ckpt["best"], ckpt.get("best_metrics")
        self.train_seconds = ckpt["train_seconds"]
        self.plateau = Plateau(*ckpt.get("plateau", ()))  # last.pt of an older fusionpipe: none recorded
        rngs = ckpt.get("rank_rngs") or [(ckpt["rng"], ckpt["cuda_rng"])]
        if len(rngs) == ddp.world_size() or ddp.rank() == 0:
            rng, saved = rngs[ddp.rank()]
            self.rng, self.cuda_rng = rng, resumed_device_rng(saved, self.device, self.cuda_rng)
        # else: saved with another number of ranks; this rank keeps the fresh stream of its seed

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def device_rng(device: torch.device) -> torch.Tensor | None:
    """The state of the device generator a variant on `device` draws from: None on a CPU (its draws are the
    CPU generator's, `Variant.rng`), so that a CPU run never initialises CUDA."""
    return cuda.get_rng_state(device) if device.type == "cuda" else None


def resumed_device_rng(saved, device: torch.device, fresh: torch.Tensor | None) -> torch.Tensor | None:
    """The device RNG state a resumed variant continues from, given the checkpoint's `cuda_rng` (`saved`), the
    device it resumes on and the state it was built with (`fresh`: its seed's own stream). A pure function of
    the checkpoint and the device, whatever GPUs this process sees:
    - on a CPU, none;
    - a state saved on a GPU: that state;
    - nothing saved (checkpointed on a CPU, resumed on a GPU): the fresh stream, kept per variant;
    - a list, one state per GPU the saving process saw (checkpoints before this rule): the one of this device's
      index, or the fresh stream if that process saw fewer GPUs.
    """
    if device.type != "cuda":
        return None
    if isinstance(saved, (list, tuple)):
        index = device.index or 0
        return saved[index] if index < len(saved) else fresh
    return fresh if saved is None else saved


def build_variants(cfg: TrainConfig, task, dims: list[int], num_layers: int, run: RunDir,
                   device: torch.device) -> list[Variant]:
    """Every variant of ``cfg``, initialised from its seed as it would be alone (untrained)."""
    built = []
    for fusion, merge, seed in variants_of(cfg):
        seed = cfg.seed if seed is None else seed
        torch.manual_seed(seed)  # identical initialisation whether trained alone or with others
        try:
            interface = Interface(dims, num_layers, fusion=fusion, merge=merge, **cfg.interface_options)
        except ValueError as e:
            raise FusionpipeError(f"variant {variant_name(fusion, merge)}: {e}") from None
        check_head(task, interface.out_dim, cfg.head_options, device)
        model = VariantModel(interface, task.build_head(interface.out_dim, **cfg.head_options)).to(device)
        if ddp.rank():  # the same parameters on every rank, but its own dropout / mask / Gumbel draws
            torch.manual_seed(ddp.rank_seed(seed, ddp.rank()))
        name = variant_name(fusion, merge, None if cfg.seeds is None else seed)
        built.append(Variant(name, model, OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr),
                                run.variant(name),
                                device))
    return built


def expands_on(device: torch.device) -> bool:
    """Whether lossy stores' batches cross to `device` as codes and expand there (`make_loader(compact=)`):
    on an accelerator, yes; on the CPU expanding in the loader's thread overlaps the training step instead."""
    return device.type != "cpu"


def check_frames(lengths: torch.Tensor, head, rows) -> None:
    """Every utterance (after the crop) is long enough for the head, checked on the host lengths: the heads
    check only lengths on the CPU (on a GPU reading them back would cost a sync per step)."""
    short = [u.id for u, n in zip(rows, lengths.tolist()) if n < head.min_frames]
    if short:
        raise FusionpipeError(f"{type(head).__name__} needs at least {head.min_frames} frames per utterance; "
                              f"{', '.join(short[:5])} have fewer: leave them out of the manifest (in training, "
                              "or give a longer --crop-seconds minimum)")


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
