"""STAGE 3: train only the interface and the task head, from the cache.

One pass trains K variants (interface x merge) over the same stores: every batch is read and
aligned once and fed to all of them. Each variant keeps its own parameters, optimizer and
random-number state (swapped in around its step), so it trains exactly as it would alone
with the same seed. What a run directory holds, and its one reader and writer: `fusionpipe.train.rundir`.

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

import math
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from fusionpipe import cuda
from fusionpipe.atomic import check_writable, remove_leftovers
from fusionpipe.device import resolve_device
from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse.loader import make_loader, shard
from fusionpipe.train import ddp
from fusionpipe.train.augment import crop_frames, random_crop
from fusionpipe.train.config import RESUMABLE, TrainConfig, config_changes, flag, trial_list
from fusionpipe.train.defaults import complete
from fusionpipe.train.evaluation import evaluate_variants
from fusionpipe.train.log import Log
from fusionpipe.train.rundir import RunDir
from fusionpipe.train.tasks import batch_targets, build_task, lower_is_better, primary_metric
from fusionpipe.train.variant import (Variant, build_variants, check_frames, expands_on, restore_checkpoints,
                                      save_checkpoints)

# Standardize's statistics come from this many training frames at most (about 1 h of audio at 50 Hz, drawn
# from the whole corpus): plenty for a mean and a std per channel, and the cost stays flat in the corpus size
STATISTICS_FRAMES = 200_000
READ_LOSSES_EVERY = 25  # steps between reads of the training losses (and at every evaluation and the end)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, dict]:
    """Train every variant of `cfg` in one pass over the data; returns {variant: results}.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; see the module docstring.
    """
    cfg = complete(cfg)
    cfg.check()
    run = RunDir(cfg.out)
    check_writable(run.path, "--out")
    if run.exists():
        if not resume:
            raise FusionpipeError(f"{run.path} already holds a run; pass --resume to continue it or choose another "
                                  "--out")
        _check_resumable(cfg, run)
    device = ddp.local_device(resolve_device(cfg.device))
    created = ddp.init(device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        # leave a core to the loader's decode thread: on 2 cores, two torch threads fighting it made
        # small BiLSTM steps 9x slower (1.2 s vs 0.14 s per step, demo recipe)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // ddp.world_size() - 1))
    try:
        state = start(cfg, run, device, resume, progress)
        try:
            train_steps(state)
        finally:
            for log in state.logs.values():
                log.close()
        return finish(state)
    finally:
        torch.set_num_threads(threads)
        if created:
            ddp.shutdown()


def _check_resumable(cfg: TrainConfig, run: RunDir) -> None:
    """--resume continues the run in ``run`` only with its own settings (but `RESUMABLE`)."""
    changes = config_changes(run.saved_config(), cfg, exempt=RESUMABLE)
    if changes:
        raise FusionpipeError(f"--resume: {run.path} was trained with other settings ({'; '.join(changes)}); give "
                              f"the flags it was trained with (only {', '.join(flag(k) for k in RESUMABLE)} may "
                              "change), or choose another --out")
    old = run.older_checkpoints()
    if old:
        raise FusionpipeError(f"--resume: {run.path} holds per-variant checkpoints of an older fusionpipe ({old[0]}, "
                              "...), which may stand at different steps; retrain into another --out")


@dataclass
class Training:
    """Everything the loop reads and changes, in one object (nanoGPT keeps it in globals)."""

    cfg: TrainConfig
    run: RunDir
    device: torch.device
    task: object
    variants: list[Variant]
    loader: object                      # the train batches (this rank's part of each global batch)
    dev: object | None                  # the dev batches, dealt whole to the ranks; None: no dev set
    crop: tuple | None                  # random crops of (min, max) frames, or None
    progress: bool
    logs: dict[str, Log] = field(default_factory=dict)  # rank 0's, per variant
    step: int = 0                       # optimizer steps taken
    position: tuple[int, int] = (0, 0)  # (epoch, batch) the next step reads
    saved: int = 0                      # the step last.pt holds


def start(cfg: TrainConfig, run: RunDir, device: torch.device, resume: bool, progress: bool) -> Training:
    """The state at the first step to take: data, task, variants (from last.pt on --resume), and the run
    directory written (config.json, task.json) once every rank has checked it."""
    rank, world = ddp.rank(), ddp.world_size()
    loader = make_loader(cfg.stores, cfg.manifest, max_frames=cfg.max_frames, shuffle=True, seed=cfg.seed,
                         num_workers=cfg.num_workers, align_time=cfg.align_time, align_layers=cfg.align_layers,
                         skip_missing=cfg.skip_missing, shard=(rank, world), compact=expands_on(device))
    view = loader.dataset.view
    trials = trial_list(cfg.trials) if cfg.trials else ()
    if resume and run.has_task():
        task = run.task(trials)
    else:
        rows = [loader.dataset.rows[i] for i in range(len(loader.dataset))]
        try:
            task = build_task(cfg.task, batch_targets(rows), trials, frame_rate=view.frame_rate)
        except ValueError as e:
            raise FusionpipeError(f"task {cfg.task} on {cfg.manifest or view.describe()['manifest']}: {e}") from None
    variants = build_variants(cfg, task, view.dims, view.num_layers, run, device)
    resuming = resume and run.last_path.exists()
    if not resuming:  # a resumed run keeps the statistics its checkpoint holds
        set_statistics(variants, view, cfg.seed)
    dev = make_loader(cfg.dev_stores, cfg.dev_manifest, max_frames=cfg.max_frames, shuffle=False,
                      num_workers=cfg.num_workers, align_time=cfg.align_time, align_layers=cfg.align_layers,
                      skip_missing=cfg.skip_missing, shard=(rank, world), deal=True,
                      compact=expands_on(device)) if cfg.dev_stores else None
    if dev is not None and trials:
        _check_trials(trials, dev, cfg.trials)
    state = Training(cfg, run, device, task, variants, loader, dev, crop_frames(cfg.crop_seconds, view.frame_rate),
                     progress)
    if resuming:
        state.step, state.position = restore_checkpoints(variants, run.load_last(), run.last_path)
        state.saved = state.step
        if state.step > cfg.steps:
            raise FusionpipeError(f"--steps ({cfg.steps}): {run.last_path} is at step {state.step} already; give "
                                  f"--steps {state.step} or more to --resume it")
    ddp.barrier()  # every rank has checked and read the run directory before rank 0 writes to it
    if ddp.is_main():
        run.path.mkdir(parents=True, exist_ok=True)
        for directory in (run.path, *(v.out for v in variants)):
            remove_leftovers(directory)  # temporary files of writes a kill interrupted
        run.write_config(cfg)
        run.write_task(task)
    for v in variants:
        v.trainer = ddp.wrap(v.model, device)
    if ddp.is_main():
        state.logs = {v.name: Log(run.log_path(v.name), state.step) for v in variants}
    return state


def set_statistics(variants: list[Variant], view, seed: int) -> None:
    """Give every variant's `Standardize` the per-(layer, channel) mean and std of the training frames
    (at most STATISTICS_FRAMES of them, drawn with ``seed``): one read, shared by all variants."""
    if all(v.model.interface.standardize is None for v in variants):
        return
    stats = view.layer_stats(max_frames=STATISTICS_FRAMES, seed=seed)
    for v in variants:
        v.model.interface.set_statistics(stats)


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


def train_steps(state: Training) -> None:
    """Steps from ``state.step`` (at data ``state.position``) to cfg.steps: train, log, evaluate, keep best.pt,
    save last.pt every eval_every steps and at the end.

    The losses stay on the device and are read back every READ_LOSSES_EVERY steps, all at once: on a GPU,
    reading each step's loss would make the host wait for that step to finish before it could queue the next.
    A non-finite loss still stops the run before anything of its step is logged or saved (every read comes
    before an evaluation or a checkpoint), after at most READ_LOSSES_EVERY - 1 steps more of computation.
    """
    cfg, variants, world = state.cfg, state.variants, ddp.world_size()
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (state.progress and ddp.is_main()),
               desc=f"train {len(variants)} variant(s)", unit="step", dynamic_ncols=True)
    pending = []  # (step, its batch's dataset rows, (K,) losses on the device, K stopwatches) not read back yet
    with bar:
        for epoch, k, batch in batches(state.loader, state.position, cfg.steps - state.step):
            stacks = [s.to(state.device, non_blocking=True) for s in batch["stacks"]]
            # the lengths stay on the host: the crop, the masks and CTC read them there, and the modules copy
            # them to the device without waiting (fusionpipe.cuda.upload)
            lengths = batch["lengths"]
            targets = batch_targets(batch["rows"])
            rows = state.loader.batch_sampler.batches()[k]
            # this rank's share of global batch k (None: one process, the batch's mean loss as ever)
            weight = shard(rows, ddp.rank(), world)[1] if world > 1 else None
            losses = []
            watches = []  # each variant's step, timed on the device (read with the losses)
            for v in variants:
                watch = cuda.Stopwatch(state.device)
                with v.own_rng():
                    x, n = random_crop(stacks, lengths, *state.crop) if state.crop else (stacks, lengths)
                    check_frames(n, v.model.head, batch["rows"])
                    losses.append(train_step(v, state.task, x, n, targets, cfg, state.step, weight))
                watches.append(watch.stop())
            state.step += 1
            pending.append((state.step, rows, ddp.mean_over_ranks(torch.stack(losses)), watches))
            bar.update(1)
            if not (_due(cfg, state.step) or state.step % READ_LOSSES_EVERY == 0):
                continue
            losses = log_losses(state, pending)
            pending = []
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}")
            evaluate_due(state, losses, bar)
            stuck = [v.name for v in variants if v.plateau.stuck(state.step, cfg.steps)]
            if stuck:
                bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}", stuck=",".join(stuck))
            if _due(cfg, state.step):
                save_checkpoints(variants, state.step, (epoch, k + 1), state.logs.values(), state.run)
                state.saved = state.step


def log_losses(state: Training, pending: list) -> dict[str, float]:
    """Read the pending steps' losses back, stop at a non-finite one, log every step but the current one
    (logged with its dev metrics, `evaluate_due`); returns the current step's {variant: loss}."""
    read = _read_losses(pending, state.variants)
    for s, rows, values in read:
        _stop_if_not_finite(values, s, lambda: [state.loader.dataset.rows[i].id for i in rows],
                            state.run.last_path, state.saved)
        if ddp.is_main() and s != state.step:
            for v in state.variants:
                state.logs[v.name].write(s, values[v.name], {})
    return read[-1][2]


def evaluate_due(state: Training, losses: dict[str, float], bar) -> None:
    """Log this step's losses, with each variant's dev metrics when an evaluation is due (`_due`): best.pt
    follows them, and the blank-plateau detector hears of them."""
    cfg = state.cfg
    due = state.dev is not None and _due(cfg, state.step)
    metrics = evaluate_variants(state.variants, state.task, state.dev, state.device) if due else {}
    for v in state.variants:
        if ddp.is_main():
            state.logs[v.name].write(state.step, losses[v.name], metrics.get(v.name, {}))
        if v.name in metrics:
            _keep_best(v, metrics[v.name], cfg, state.run)
            said = v.plateau.update(state.step, metrics[v.name], cfg.steps)
            if said and ddp.is_main():
                bar.write(f"variant {v.name} {said}", file=sys.stderr)


def _read_losses(pending: list, variants: list[Variant]) -> list[tuple[int, list[int], dict[str, float]]]:
    """(step, rows, {variant: loss}) of every pending step, read back to the host in one copy; the variants'
    train_seconds take the device time of those steps (done now, as the losses are)."""
    values = torch.stack([t for _, _, t, _ in pending]).tolist()  # the one host sync of these steps
    for *_, watches in pending:
        for v, watch in zip(variants, watches):
            v.train_seconds += watch.seconds()
    return [(s, rows, dict(zip((v.name for v in variants), row))) for (s, rows, _, _), row in zip(pending, values)]


def _due(cfg: TrainConfig, step: int) -> bool:
    """Evaluate and save last.pt at this step: every eval_every steps, and at the last."""
    return step % cfg.eval_every == 0 or step == cfg.steps


def _stop_if_not_finite(losses: dict[str, float], step: int, batch_ids, checkpoint, saved: int) -> None:
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
    on the device and detached: the caller reads it back later, not now (`train_steps`)."""
    v.model.train()
    v.model.interface.set_progress(step / max(1, cfg.steps))
    if weight is None:
        loss = v.trainer(stacks, lengths, task, targets, cfg.specaugment)
    else:
        loss = v.trainer(stacks, lengths, task, targets, cfg.specaugment, reduction="none").sum() * weight
    v.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP: the gradient all-reduce (an average over ranks) happens here
    nn.utils.clip_grad_norm_(v.model.parameters(), cfg.grad_clip)
    v.optimizer.step()
    return loss.detach()


def _keep_best(v: Variant, metrics: dict, cfg: TrainConfig, run: RunDir) -> None:
    key = cfg.select or primary_metric(cfg.task)
    if key not in metrics:  # a cer/<language> the dev set lacks (every other name is checked up front)
        raise FusionpipeError(f"--select ({key}): not a metric of this dev set; it has {', '.join(sorted(metrics))}")
    value = metrics[key]
    if v.best is None or (value < v.best if lower_is_better(key) else value > v.best):
        v.best, v.best_metrics = value, metrics
        if ddp.is_main():
            run.save_best(v.name, {"model": v.model.state_dict(), "metrics": metrics})


def finish(state: Training) -> dict[str, dict]:
    """Every variant's results.json (and, without a dev set, its best.pt: the last parameters); returns them."""
    results = {}
    for v in state.variants:
        if ddp.is_main() and state.dev is None:  # no dev set: the last parameters are the result (also after a resume)
            state.run.save_best(v.name, {"model": v.model.state_dict()})
        # a full epoch's batches: len(loader) leaves out those a resumed epoch skipped
        results[v.name] = _results(v, state, len(state.loader.batch_sampler.batches()))
        if ddp.is_main():
            state.run.write_results(v.name, results[v.name])
    return results


def _results(v: Variant, state: Training, batches_per_epoch: int) -> dict:
    cfg, step = state.cfg, state.step
    res = {"variant": v.name, "task": cfg.task, "steps": step, "trainable_params": v.num_params,
           "train_seconds": round(v.train_seconds, 3),
           "train_seconds_per_epoch": round(v.train_seconds / max(step, 1) * batches_per_epoch, 3)}
    if state.dev is not None:  # the metrics best.pt was chosen by: no second pass over the dev set
        res["dev"] = v.best_metrics or state.run.load_best(v.name)["metrics"]
        if "blank" in res["dev"]:  # a CTC task: say whether it ended on the blank plateau
            res["plateau"] = {"stuck": v.plateau.stuck(step, cfg.steps), "blank_evaluations": v.plateau.blank_evals,
                              "since": v.plateau.since}
    return res
