"""STAGE 3: train only the interface and the task head, from the cache.

One pass trains K variants (interface x merge) over the same stores: every batch is read and
aligned once and fed to all of them. Each variant keeps its own parameters, optimizer and
random-number state (swapped in around its step), so it trains exactly as it would alone
with the same seed. Layout of a run directory::

    runs/<name>/config.json          the TrainConfig, as given (--resume must give the same: `config_changes`)
    runs/<name>/task.json            labels (vocabulary, classes, speakers) from the train manifest
    runs/<name>/last.pt              the last checkpoint: its step, the data position and every variant's
                                     parameters, optimizer and RNG state (--resume continues exactly)
    runs/<name>/<variant>/best.pt    parameters at the best dev metric, with those metrics
    runs/<name>/<variant>/log.csv    step, loss, dev metrics
    runs/<name>/<variant>/results.json

Crash safety: every file but log.csv is written whole or not at all (`fusionpipe.atomic`: a temporary
file in the same directory, fsync, os.replace), and last.pt is ONE file for all variants, so a kill at
any moment leaves every variant at the same step and --resume continues all of them from it. log.csv
is flushed to disk before each checkpoint and only ever appended to; --resume first drops its rows
past the checkpoint's step (logged after it, then lost with the kill; the file is rewritten
atomically, header kept), so the log reads as one uninterrupted run. A best.pt may be newer than
last.pt (a kill between the two): the resumed run retrains those steps and writes it again.
Checkpoints hold only tensors and plain containers and are read with torch.load(weights_only=True)
(`load_checkpoint`): a crafted file cannot run code. Every setting is checked before any data is
read (`TrainConfig.check`), and a non-finite training loss stops the run, naming the variant, the
step and the batch's utterances, before anything of that step is saved.

Data parallel: ``torchrun --standalone --nproc-per-node N -m fusionpipe train ...`` runs N ranks
(`fusionpipe.train.ddp`: gloo on CPU, nccl with one GPU per rank). Each variant trains through
DistributedDataParallel. Every rank cuts the same global batches (max_frames means what it means
in one process) and reads its contiguous part of each; its summed per-utterance losses are
weighted by N / (utterances in the global batch), so DDP's average over ranks is the gradient of
the global batch's mean loss, and clipping after the all-reduce clips what one process would. A
rank whose part is empty (fewer utterances than ranks) trains on a stand-in utterance with
weight 0. The logged loss is the global batch's; dev batches are dealt whole to the ranks and
their predictions gathered, so every rank computes the single-process corpus metrics and agrees
on best.pt. Rank 0 alone writes the run directory and shows the progress bar; --resume works
with any number of ranks (positions count global batches; last.pt holds the plain models'
parameters and every rank's random state).

What cannot match one process: (1) float rounding, since a rank's part is padded to its own
longest utterance and sums come in another order (losses agree to about 1e-6 relative per
step); (2) random draws: dropout masks, SpecAugment masks and Gumbel noise come from a stream
per rank (rank 0 keeps the seed's; one Gumbel sample per rank's part, not per global batch).
No head or interface keeps batch statistics (the x-vector has no BatchNorm), so nothing else
depends on how a batch is split.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fusionpipe import cuda
from fusionpipe.atomic import check_writable, remove_leftovers, write_json
from fusionpipe.device import resolve_device
from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse.loader import make_loader, shard
from fusionpipe.train import ddp as dist
from fusionpipe.train.augment import crop_frames, random_crop, spec_augment
from fusionpipe.train.checkpoint import load_checkpoint, save_checkpoint
from fusionpipe.train.defaults import complete
from fusionpipe.train.config import (OPTIMIZERS, RESUMABLE, TrainConfig, check_upstreams, config_changes, flag,
                                     trial_list, variant_name)
from fusionpipe.train.interfaces import Interface
from fusionpipe.train.log import Log
from fusionpipe.train.tasks import batch_targets, build_task, check_head, lower_is_better, primary_metric, task_from_dict


class VariantModel(nn.Module):
    """Interface (merge front + interface) -> head. The only trained parameters of a variant."""

    def __init__(self, interface: Interface, head: nn.Module):
        super().__init__()
        self.fusion, self.head = interface, head  # "fusion": the checkpoint keys of existing runs (fusion.*)

    def features(self, stacks: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        return self.fusion(stacks, lengths)

    def forward(self, stacks: list[torch.Tensor], lengths: torch.Tensor, task, targets: dict,
                specaugment: bool = False, reduction: str = "mean") -> torch.Tensor:
        """The training loss of a batch (in forward, so that DistributedDataParallel sees the pass)."""
        feats = self.features(stacks, lengths)
        if specaugment:
            feats = spec_augment(feats, lengths)
        return task.loss(self.head, feats, lengths, targets, reduction=reduction)


# Standardize's statistics come from this many training frames at most (about 1 h of audio at 50 Hz, drawn
# from the whole corpus): plenty for a mean and a std per channel, and the cost stays flat in the corpus size
STATISTICS_FRAMES = 200_000
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
        if len(rngs) == dist.world_size() or dist.rank() == 0:
            rng, saved = rngs[dist.rank()]
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


def build_variants(cfg: TrainConfig, task, dims: list[int], num_layers: int, out: Path,
                   device: torch.device) -> list[Variant]:
    variants = []
    for fusion, merge, seed in cfg.seeded_variants():
        seed = cfg.seed if seed is None else seed
        torch.manual_seed(seed)  # identical initialisation whether trained alone or with others
        try:
            interface = Interface(dims, num_layers, fusion=fusion, merge=merge, **cfg.interface_options)
        except ValueError as e:
            raise FusionpipeError(f"variant {variant_name(fusion, merge)}: {e}") from None
        check_head(task, interface.out_dim, cfg.head_options, device)
        model = VariantModel(interface, task.build_head(interface.out_dim, **cfg.head_options)).to(device)
        if dist.rank():  # the same parameters on every rank, but its own dropout / mask / Gumbel draws
            torch.manual_seed(dist.rank_seed(seed, dist.rank()))
        name = variant_name(fusion, merge, None if cfg.seeds is None else seed)
        variants.append(Variant(name, model, OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr), out / name,
                                device))
    return variants


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, dict]:
    """Train every variant of `cfg` in one pass over the data; returns {variant: results}.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; see the module docstring.
    """
    cfg = complete(cfg)
    cfg.check()
    out = Path(cfg.out)
    check_writable(out, "--out")
    if (out / "config.json").exists():
        if not resume:
            raise FusionpipeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        _check_resumable(cfg, out)
    device = dist.local_device(resolve_device(cfg.device))
    created = dist.init(device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        # leave a core to the loader's decode thread: on 2 cores, two torch threads fighting it made
        # small BiLSTM steps 9x slower (1.2 s vs 0.14 s per step, demo recipe)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.world_size() - 1))
    try:
        return _train(cfg, out, device, resume, progress)
    finally:
        torch.set_num_threads(threads)
        if created:
            dist.shutdown()


def _check_resumable(cfg: TrainConfig, out: Path) -> None:
    """--resume continues the run in ``out`` only with its own settings (but `RESUMABLE`)."""
    try:
        saved = json.loads((out / "config.json").read_text())
    except ValueError as e:
        raise FusionpipeError(f"{out / 'config.json'} is not a fusionpipe training config ({e})") from None
    changes = config_changes(saved, cfg, exempt=RESUMABLE)
    if changes:
        raise FusionpipeError(f"--resume: {out} was trained with other settings ({'; '.join(changes)}); give the "
                              f"flags it was trained with (only {', '.join(flag(k) for k in RESUMABLE)} may change), "
                              "or choose another --out")
    old = sorted(str(p) for p in out.glob("*/last.pt"))
    if old:
        raise FusionpipeError(f"--resume: {out} holds per-variant checkpoints of an older fusionpipe ({old[0]}, ...), "
                              "which may stand at different steps; retrain into another --out")


def set_statistics(variants: list[Variant], view, seed: int) -> None:
    """Give every variant's `Standardize` the per-(layer, channel) mean and std of the training frames
    (at most STATISTICS_FRAMES of them, drawn with ``seed``): one read, shared by all variants."""
    if all(v.model.fusion.standardize is None for v in variants):
        return
    stats = view.layer_stats(max_frames=STATISTICS_FRAMES, seed=seed)
    for v in variants:
        v.model.fusion.set_statistics(stats)


def expands_on(device: torch.device) -> bool:
    """Whether lossy stores' batches cross to `device` as codes and expand there (`make_loader(compact=)`):
    on an accelerator, yes; on the CPU expanding in the loader's thread overlaps the training step instead."""
    return device.type != "cpu"


def _train(cfg: TrainConfig, out: Path, device: torch.device, resume: bool, progress: bool) -> dict[str, dict]:
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    loader = make_loader(cfg.stores, cfg.manifest, max_frames=cfg.max_frames, shuffle=True, seed=cfg.seed,
                         num_workers=cfg.num_workers, align_time=cfg.align_time, align_layers=cfg.align_layers,
                         skip_missing=cfg.skip_missing, shard=(rank, world), compact=expands_on(device))
    view = loader.dataset.view
    crop = crop_frames(cfg.crop_seconds, view.frame_rate)
    rows = [loader.dataset.rows[i] for i in range(len(loader.dataset))]
    trials = trial_list(cfg.trials) if cfg.trials else ()
    if resume and (out / "task.json").exists():
        task = task_from_dict(json.loads((out / "task.json").read_text()), trials)
    else:
        try:
            task = build_task(cfg.task, batch_targets(rows), trials)
        except ValueError as e:
            raise FusionpipeError(f"task {cfg.task} on {cfg.manifest or view.describe()['manifest']}: {e}") from None
    variants = build_variants(cfg, task, view.dims, view.num_layers, out, device)
    checkpoint = out / "last.pt"
    if not (resume and checkpoint.exists()):  # a resumed run keeps the statistics its checkpoint holds
        set_statistics(variants, view, cfg.seed)
    dev = make_loader(cfg.dev_stores, cfg.dev_manifest, max_frames=cfg.max_frames, shuffle=False,
                      num_workers=cfg.num_workers, align_time=cfg.align_time, align_layers=cfg.align_layers,
                      skip_missing=cfg.skip_missing, shard=(rank, world), deal=True,
                      compact=expands_on(device)) if cfg.dev_stores else None
    if dev is not None and trials:
        _check_trials(trials, dev, cfg.trials)
    step, position = 0, (0, 0)
    if resume and checkpoint.exists():
        step, position = restore_checkpoints(variants, load_checkpoint(checkpoint), checkpoint)
        if step > cfg.steps:
            raise FusionpipeError(f"--steps ({cfg.steps}): {checkpoint} is at step {step} already; give --steps "
                                  f"{step} or more to --resume it")
    dist.barrier()  # every rank has checked and read the run directory before rank 0 writes to it
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for directory in (out, *(v.out for v in variants)):
            remove_leftovers(directory)  # temporary files of writes a kill interrupted
        cfg.save(out / "config.json")
        write_json(out / "task.json", task.to_dict(), indent=None)
    for v in variants:
        v.trainer = dist.wrap(v.model, device)
    logs = {v.name: Log(v.out / "log.csv", step) for v in variants} if main else {}

    try:
        step = _train_steps(cfg, task, variants, loader, dev, crop, device, logs, step, position, checkpoint, progress)
    finally:
        for log in logs.values():
            log.close()
    results = {}
    for v in variants:
        if main and dev is None:  # no dev set: the last parameters are the result (also after a resume)
            save_checkpoint({"model": v.model.state_dict()}, v.out / "best.pt")
        # a full epoch's batches: len(loader) leaves out those a resumed epoch skipped
        results[v.name] = _results(v, cfg, step, len(loader.batch_sampler.batches()), dev)
        if main:
            write_json(v.out / "results.json", results[v.name])
    return results


def batches(loader, position: tuple[int, int], count: int):
    """``count`` global batches from data ``position`` (epoch, batch) on, epoch after epoch:
    (epoch, k, batch), batch k of that epoch. A resumed epoch does not read the batches it skips."""
    epoch, skip = position
    while count > 0:
        loader.batch_sampler.set_epoch(epoch)
        loader.batch_sampler.skip = skip
        for k, batch in enumerate(loader, start=skip):
            yield epoch, k, batch
            count -= 1
            if count == 0:
                return
        epoch, skip = epoch + 1, 0


READ_LOSSES_EVERY = 25  # steps between reads of the training losses (and at every evaluation and the end)


def _train_steps(cfg: TrainConfig, task, variants: list[Variant], loader, dev, crop, device: torch.device,
                 logs: dict, step: int, position: tuple[int, int], checkpoint: Path, progress: bool) -> int:
    """Steps from ``step`` (at data ``position``) to cfg.steps: train, log, evaluate, keep best.pt, save
    last.pt every eval_every steps and at the end; returns the step reached.

    The losses stay on the device and are read back every READ_LOSSES_EVERY steps, all at once: on a GPU,
    reading each step's loss would make the host wait for that step to finish before it could queue the next.
    A non-finite loss still stops the run before anything of its step is logged or saved (every read comes
    before an evaluation or a checkpoint), after at most READ_LOSSES_EVERY - 1 steps more of computation.
    """
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and main),
               desc=f"train {len(variants)} variant(s)", unit="step", dynamic_ncols=True)
    saved = step
    pending = []  # (step, its batch's dataset rows, (K,) losses on the device, K stopwatches) not read back yet
    with bar:
        for epoch, k, batch in batches(loader, position, cfg.steps - step):
            stacks = [s.to(device, non_blocking=True) for s in batch["stacks"]]
            # the lengths stay on the host: the crop, the masks and CTC read them there, and the modules copy
            # them to the device without waiting (fusionpipe.cuda.upload)
            lengths = batch["lengths"]
            targets = batch_targets(batch["rows"])
            rows = loader.batch_sampler.batches()[k]
            # this rank's share of global batch k (None: one process, the batch's mean loss as ever)
            weight = shard(rows, rank, world)[1] if world > 1 else None
            losses = []
            watches = []  # each variant's step, timed on the device (read with the losses)
            for v in variants:
                watch = cuda.Stopwatch(device)
                with v.own_rng():
                    x, n = random_crop(stacks, lengths, *crop) if crop else (stacks, lengths)
                    check_frames(n, v.model.head, batch["rows"])
                    losses.append(train_step(v, task, x, n, targets, cfg, step, weight))
                watches.append(watch.stop())
            step += 1
            pending.append((step, rows, dist.mean_over_ranks(torch.stack(losses)), watches))
            bar.update(1)
            if not (_due(cfg, step) or step % READ_LOSSES_EVERY == 0):
                continue
            read, pending = _read_losses(pending, variants), []
            for s, rows_s, values in read:
                _stop_if_not_finite(values, s, lambda: [loader.dataset.rows[i].id for i in rows_s], checkpoint,
                                    saved)
                if main and s != step:
                    for v in variants:
                        logs[v.name].write(s, values[v.name], {})
            losses = read[-1][2]
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}")

            metrics = maybe_evaluate(variants, task, dev, device, cfg, step)
            for v in variants:
                if main:
                    logs[v.name].write(step, losses[v.name], metrics.get(v.name, {}))
                if v.name in metrics:
                    _keep_best(v, metrics[v.name], cfg)
                    said = v.plateau.update(step, metrics[v.name], cfg.steps)
                    if said and main:
                        bar.write(f"variant {v.name} {said}", file=sys.stderr)
            stuck = [v.name for v in variants if v.plateau.stuck(step, cfg.steps)]
            if stuck:
                bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}", stuck=",".join(stuck))
            if _due(cfg, step):
                save_checkpoints(variants, step, (epoch, k + 1), logs.values(), checkpoint)
                saved = step
    return step


def _read_losses(pending: list, variants: list[Variant]) -> list[tuple[int, list[int], dict[str, float]]]:
    """(step, rows, {variant: loss}) of every pending step, read back to the host in one copy; the variants'
    train_seconds take the device time of those steps (done now, as the losses are)."""
    values = torch.stack([t for _, _, t, _ in pending]).tolist()  # the one host sync of these steps
    for *_, watches in pending:
        for v, watch in zip(variants, watches):
            v.train_seconds += watch.seconds()
    return [(s, rows, dict(zip((v.name for v in variants), row))) for (s, rows, _, _), row in zip(pending, values)]


def check_frames(lengths: torch.Tensor, head, rows) -> None:
    """Every utterance (after the crop) is long enough for the head, checked on the host lengths: the heads
    check only lengths on the CPU (on a GPU reading them back would cost a sync per step)."""
    short = [u.id for u, n in zip(rows, lengths.tolist()) if n < head.min_frames]
    if short:
        raise FusionpipeError(f"{type(head).__name__} needs at least {head.min_frames} frames per utterance; "
                              f"{', '.join(short[:5])} have fewer: leave them out of the manifest (in training, "
                              "or give a longer --crop-seconds minimum)")


def _due(cfg: TrainConfig, step: int) -> bool:
    """Evaluate and save last.pt at this step: every eval_every steps, and at the last."""
    return step % cfg.eval_every == 0 or step == cfg.steps


def maybe_evaluate(variants: list[Variant], task, dev, device: torch.device, cfg: TrainConfig,
                   step: int) -> dict[str, dict]:
    """Every variant's dev metrics when a dev set is given and the step is due (`_due`), else {}."""
    if dev is None or not _due(cfg, step):
        return {}
    return evaluate_variants(variants, task, dev, device)


def save_checkpoints(variants: list[Variant], step: int, position: tuple[int, int], logs, path: Path) -> None:
    """last.pt: every variant's state at ``step``, in one file (a kill leaves all of them at one step).
    Every rank takes part (the RNG states are gathered); rank 0 writes, after the logs reach the disk."""
    rngs = {v.name: dist.gather((v.rng, v.cuda_rng)) for v in variants}
    if not dist.is_main():
        return
    for log in logs:
        log.sync()
    save_checkpoint({"step": step, "position": list(position),
                     "variants": {v.name: v.state(rngs[v.name]) for v in variants}}, path)


def restore_checkpoints(variants: list[Variant], state: dict, path: Path) -> tuple[int, tuple[int, int]]:
    """Every variant's state from last.pt; returns (step, data position)."""
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


def _stop_if_not_finite(losses: dict[str, float], step: int, batch_ids, checkpoint: Path, saved: int) -> None:
    """Stop at a NaN or infinite loss (of the global batch: every rank stops), naming the variant(s), the
    step and the utterances of the batch (``batch_ids()``), before anything of the step is logged or saved."""
    bad = [name for name, loss in losses.items() if not math.isfinite(loss)]
    if not bad:
        return
    ids = batch_ids()
    kept = f"{checkpoint} still holds step {saved}" if saved else "no checkpoint was written yet"
    raise FusionpipeError(f"variant {', '.join(bad)}: the training loss is {losses[bad[0]]} at step {step}, on the "
                          f"batch of utterances {', '.join(ids)}; stopped before saving anything of that step "
                          f"({kept}). Check those utterances' features (`fusionpipe verify STORE`), or train "
                          "with a lower --lr or --grad-clip")


def _check_trials(trials, dev, path: str) -> None:
    """Every utterance of the trial list must be among the dev rows (else EER fails after training)."""
    have = {u.id for u in dev.dataset.rows}
    missing = sorted({u for a, b, _ in trials for u in (a, b)} - have)
    if missing:
        raise FusionpipeError(f"--trials ({path}): {len(missing)} trial utterance(s) are not among the dev "
                              f"utterances, e.g. {', '.join(missing[:3])}; give the trial list of the dev stores")


def train_step(v: Variant, task, stacks, lengths, targets, cfg: TrainConfig, step: int,
          weight: float | None) -> torch.Tensor:
    """One optimizer step; returns this rank's loss (with ``weight``: its weighted sum of per-utterance losses),
    on the device and detached: the caller reads it back later, not now (`_train_steps`)."""
    v.model.train()
    v.model.fusion.set_progress(step / max(1, cfg.steps))
    if weight is None:
        loss = v.trainer(stacks, lengths, task, targets, cfg.specaugment)
    else:
        loss = v.trainer(stacks, lengths, task, targets, cfg.specaugment, reduction="none").sum() * weight
    v.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP: the gradient all-reduce (an average over ranks) happens here
    nn.utils.clip_grad_norm_(v.model.parameters(), cfg.grad_clip)
    v.optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate_variants(variants: list[Variant], task, loader, device: torch.device) -> dict[str, dict]:
    """Dev/test metrics of every variant, reading each batch once.

    Under DDP the loader deals whole batches to the ranks (batch j of rank r is batch r + j * world);
    every rank gathers all of them, in the single-process order, and computes the same metrics.
    """
    rank, world = dist.rank(), dist.world_size()
    read = []  # (batch number, {variant: predictions}, targets) of the batches this rank read
    seconds = {v.name: 0.0 for v in variants}
    for v in variants:
        v.model.eval()
    for j, batch in enumerate(loader):
        stacks = [s.to(device, non_blocking=True) for s in batch["stacks"]]
        lengths = batch["lengths"]  # on the host, as in training
        preds = {}
        for v in variants:
            check_frames(lengths, v.model.head, batch["rows"])
            t0 = time.perf_counter()
            preds[v.name] = task.predict(v.model.head, v.model.features(stacks, lengths), lengths)
            seconds[v.name] += time.perf_counter() - t0
        read.append((rank + j * world, preds, batch_targets(batch["rows"])))
    everything = dist.gather((read, seconds))
    preds = {v.name: [] for v in variants}
    targets: dict[str, list] = {}
    for _, their_preds, their_targets in sorted((b for got, _ in everything for b in got), key=lambda b: b[0]):
        for name, values in their_preds.items():
            preds[name].extend(values)
        for c, values in their_targets.items():
            targets.setdefault(c, []).extend(values)
    seconds = {name: sum(s[name] for _, s in everything) for name in seconds}  # compute time, all ranks
    out = {}
    for v in variants:
        try:
            out[v.name] = {**task.metrics(preds[v.name], targets), "inference_seconds": seconds[v.name]}
        except ValueError as e:
            raise FusionpipeError(f"evaluating {v.name}: {e}") from None
    return out


def _keep_best(v: Variant, metrics: dict, cfg: TrainConfig) -> None:
    key = cfg.select or primary_metric(cfg.task)
    if key not in metrics:  # a cer/<language> the dev set lacks (every other name is checked up front)
        raise FusionpipeError(f"--select ({key}): not a metric of this dev set; it has {', '.join(sorted(metrics))}")
    value = metrics[key]
    if v.best is None or (value < v.best if lower_is_better(key) else value > v.best):
        v.best, v.best_metrics = value, metrics
        if dist.is_main():
            save_checkpoint({"model": v.model.state_dict(), "metrics": metrics}, v.out / "best.pt")


def _results(v: Variant, cfg: TrainConfig, step: int, batches_per_epoch: int, dev) -> dict:
    res = {"variant": v.name, "task": cfg.task, "steps": step, "trainable_params": v.num_params,
           "train_seconds": round(v.train_seconds, 3),
           "train_seconds_per_epoch": round(v.train_seconds / max(step, 1) * batches_per_epoch, 3)}
    if dev is not None:  # the metrics best.pt was chosen by: no second pass over the dev set
        res["dev"] = v.best_metrics or load_checkpoint(v.out / "best.pt")["metrics"]
        if "blank" in res["dev"]:  # a CTC task: say whether it ended on the blank plateau
            res["plateau"] = {"stuck": v.plateau.stuck(step, cfg.steps), "blank_evaluations": v.plateau.blank_evals,
                              "since": v.plateau.since}
    return res


def evaluate(run: str | Path, stores: list[str], trials: str | None = None, device: str = "auto",
             variant: str | None = None, manifest: str | Path | None = None,
             skip_missing: bool = False) -> dict[str, dict]:
    """Metrics of a finished run's best checkpoints on the utterances cached in `stores`
    (only the rows of ``manifest``, with its labels, when given; ``skip_missing``: without the
    utterances skipped or unfinished in some store)."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise FusionpipeError(f"{run} is not a training run (no config.json); train one with `fusionpipe train`")
    cfg = TrainConfig.load(run / "config.json")
    names = cfg.variant_names()
    if variant is not None and variant not in names:
        raise FusionpipeError(f"{run} has no variant {variant}; it has {', '.join(names)}")
    check_upstreams(cfg.stores, stores, "--stores", "the run's --stores")
    task = task_from_dict(json.loads((run / "task.json").read_text()), trial_list(trials) if trials else ())
    if task.name == "verify" and not trials:
        raise FusionpipeError("--trials: a verify run is scored on a trial list over the evaluated utterances; "
                              "give --trials FILE")
    checkpoints = {name: load_checkpoint(run / name / "best.pt") for name in names if variant in (None, name)}
    dev_device = resolve_device(device)
    dev = make_loader(stores, manifest, max_frames=cfg.max_frames, shuffle=False, align_time=cfg.align_time,
                      align_layers=cfg.align_layers, skip_missing=skip_missing, compact=expands_on(dev_device))
    view = dev.dataset.view
    variants = [v for v in build_variants(cfg, task, view.dims, view.num_layers, run, dev_device)
                if v.name in checkpoints]
    for v in variants:
        v.model.load_state_dict(checkpoints[v.name]["model"])
    return evaluate_variants(variants, task, dev, dev_device)
