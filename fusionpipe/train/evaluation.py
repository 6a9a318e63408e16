"""Stage 3: scoring variants on cached utterances, during training (dev) and after it (a finished run).

    >>> evaluate("runs/classify-toy-wavlm+toy-whisper", ["cache/demo-test/toy-wavlm.zarr",
    ...          "cache/demo-test/toy-whisper.zarr"])                                   # doctest: +SKIP
    {'hconv-concat': {'accuracy': 0.97, 'inference_seconds': 0.4}}

`predictions` is the one evaluation loop: it reads each batch once and runs every predictor on it, so the
dev metrics of K variants (`evaluate_variants`) and the analysis's layer knockout (every variant with
each merged layer knocked out, `fusionpipe.analyze.use`) cost one pass over the data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

from fusionpipe.device import resolve_device
from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse.loader import make_loader
from fusionpipe.train import ddp
from fusionpipe.train.config import TrainConfig, check_upstreams, trial_list
from fusionpipe.train.rundir import RunDir, variant_names
from fusionpipe.train.tasks import batch_targets
from fusionpipe.train.variant import Variant, build_variants, check_frames, expands_on

# a predictor: (N x (B, L, T, D_i) stacks on the device, (B,) lengths on the host, the batch's rows) -> B predictions
Predictor = Callable[[list, torch.Tensor, list], list]


@torch.no_grad()
def predictions(loader, device: torch.device, predictors: dict[Hashable, Predictor]
                ) -> tuple[dict[Hashable, list], dict[str, list], dict[Hashable, float]]:
    """(predictions per predictor, targets per column, compute seconds per predictor) over the loader's
    utterances, in the single-process order, reading each batch once.

    Under DDP the loader deals whole batches to the ranks (batch j of rank r is batch r + j * world);
    every rank gathers all of them, in the single-process order, and so computes the same metrics.
    """
    rank, world = ddp.rank(), ddp.world_size()
    read = []  # (batch number, {key: predictions}, targets) of the batches this rank read
    seconds = {key: 0.0 for key in predictors}
    for j, batch in enumerate(loader):
        stacks = [s.to(device, non_blocking=True) for s in batch["stacks"]]
        lengths = batch["lengths"]  # on the host, as in training
        preds = {}
        for key, predict in predictors.items():
            t0 = time.perf_counter()
            preds[key] = predict(stacks, lengths, batch["rows"])
            seconds[key] += time.perf_counter() - t0
        read.append((rank + j * world, preds, batch_targets(batch["rows"])))
    everything = ddp.gather((read, seconds))
    preds = {key: [] for key in predictors}
    targets: dict[str, list] = {}
    for _, their_preds, their_targets in sorted((b for got, _ in everything for b in got), key=lambda b: b[0]):
        for key, values in their_preds.items():
            preds[key].extend(values)
        for c, values in their_targets.items():
            targets.setdefault(c, []).extend(values)
    seconds = {key: sum(s[key] for _, s in everything) for key in seconds}  # compute time, all ranks
    return preds, targets, seconds


def predictor(v: Variant, task) -> Predictor:
    """What variant ``v`` predicts for a batch (its utterances checked long enough for its head)."""
    def predict(stacks, lengths, rows):
        check_frames(lengths, v.model.head, rows)
        return task.predict(v.model.head, v.model.features(stacks, lengths), lengths)
    return predict


def scored(task, name: str, preds: list, targets: dict) -> dict:
    """``task.metrics``, an error naming the variant ``name`` when its predictions cannot be scored."""
    try:
        return task.metrics(preds, targets)
    except ValueError as e:
        raise FusionpipeError(f"evaluating {name}: {e}") from None


def evaluate_variants(variants: list[Variant], task, loader, device: torch.device) -> dict[str, dict]:
    """Dev/test metrics of every variant, reading each batch once, with each variant's inference seconds."""
    return scored_predictions(variants, task, loader, device)[0]


def scored_predictions(variants: list[Variant], task, loader, device: torch.device
                       ) -> tuple[dict[str, dict], dict[str, list], list[str]]:
    """`evaluate_variants`' metrics, with each variant's predictions and the utterance ids they are of."""
    for v in variants:
        v.model.eval()
    preds, targets, seconds = predictions(loader, device, {v.name: predictor(v, task) for v in variants})
    metrics = {v.name: {**scored(task, v.name, preds[v.name], targets), "inference_seconds": seconds[v.name]}
               for v in variants}
    return metrics, preds, targets["id"]


# ---- a finished run -------------------------------------------------------------------------------
def eval_loader(cfg: TrainConfig, stores: list[str], manifest, device: torch.device, skip_missing: bool = False,
                **kw):
    """A loader of ``stores`` (only the rows of ``manifest`` when given) as the run ``cfg`` reads its dev
    stores, for `device`; the stores must hold the run's upstreams in its order."""
    check_upstreams(cfg.stores, stores, "--stores", "the run's --stores")
    return make_loader(stores, manifest, max_frames=cfg.max_frames, shuffle=False, align_time=cfg.align_time,
                       align_layers=cfg.align_layers, skip_missing=skip_missing, compact=expands_on(device), **kw)


def trained_variants(run: RunDir, cfg: TrainConfig, task, view, device: torch.device,
                     names: list[str]) -> list[Variant]:
    """The variants ``names`` of a finished run, each with the parameters of its best.pt, in eval mode."""
    if task.frame_level and abs(task.frame_rate - view.frame_rate) > 1e-9:
        raise FusionpipeError(f"{run.path}: its {task.name} labels lie on frames of {task.frame_rate:g} per second and "
                              f"these stores fuse to {view.frame_rate:g}; give stores of the run's upstreams (and its "
                              "--align-time)")
    lacking = [n for n in names if not run.best_path(n).is_file()]
    if lacking:
        raise FusionpipeError(f"{run.path}: variant(s) {', '.join(lacking)} have no best.pt yet; finish the run "
                              "(`fusionpipe train ... --resume` with its flags) first")
    variants = [v for v in build_variants(cfg, task, view.dims, view.num_layers, run, device) if v.name in names]
    for v in variants:
        v.model.load_state_dict(run.load_best(v.name)["model"])
        v.model.eval()
    return variants


def finished_run(run: str | Path, variant: str | None = None) -> tuple[RunDir, TrainConfig, list[str]]:
    """A run directory, its config and its variant names, refusing what is not a run and a ``variant``
    it does not have (naming those it has): what `evaluate` and `fusionpipe predict` check first."""
    run = RunDir(run)
    run.require()
    cfg = run.config()
    names = variant_names(cfg)
    if variant is not None and variant not in names:
        raise FusionpipeError(f"{run.path} has no variant {variant}; it has {', '.join(names)}")
    return run, cfg, names


def evaluate(run: str | Path, stores: list[str], trials: str | None = None, device: str = "auto",
             variant: str | None = None, manifest: str | Path | None = None,
             skip_missing: bool = False, label: str | None = None) -> dict[str, dict]:
    """Metrics of a finished run's best checkpoints on the utterances cached in `stores`
    (only the rows of ``manifest``, with its labels, when given; ``skip_missing``: without the
    utterances skipped or unfinished in some store). ``label``: also keep what a diarize run predicted
    there, as one RTTM file per variant beside the eval JSON (`RunDir.write_rttm`)."""
    run, cfg, names = finished_run(run, variant)
    task = run.task(trial_list(trials) if trials else ())
    if task.name == "verify" and not trials:
        raise FusionpipeError("--trials: a verify run is scored on a trial list over the evaluated utterances; "
                              "give --trials FILE")
    on = resolve_device(device)
    loader = eval_loader(cfg, stores, manifest, on, skip_missing)
    chosen = [n for n in names if variant in (None, n)]
    variants = trained_variants(run, cfg, task, loader.dataset.view, on, chosen)
    metrics, preds, ids = scored_predictions(variants, task, loader, on)
    if label is not None and task.name == "diarize" and ddp.is_main():
        for name, turns in preds.items():
            run.write_rttm(label, name, dict(zip(ids, turns)))
    return metrics
