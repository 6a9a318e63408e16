"""What `fusionpipe train` fills in that no flag gives: the task a manifest supports, the run directory,
and the demo preset when no stores are given. `complete` is the one place both the command and
`train()` take the first two from, so a TrainConfig built in Python trains what the same flags train;
`from_flags` is the command's whole rule (flags over the preset over TrainConfig's defaults)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fusionpipe.errors import FusionpipeError
from fusionpipe.names import upstream_set_name
from fusionpipe.train.config import TrainConfig


# Used when `fusionpipe train` is given no stores: the bundled demo corpus, sized for a CPU.
# 1500 steps: about 3.5 min on 2 cores; CTC on toy features leaves the blank plateau after ~200 (the loss below 3
# from step ~180 with the default interface options; dev CER 0.78 at step 500, 0.75 at 1500).
DEMO = {"steps": 1500, "eval_every": 500, "lr": 2e-3, "max_frames": 4000,
        "head_options": {"proj": 64, "hidden": 64, "layers": 1}}


def default_task(manifest) -> str:
    """The task a manifest supports by default: diarize if it has turns (mixtures), else asr if it has texts,
    else phoneme if it has phone strings, else classify, else verify."""
    for column, task in (("turns", "diarize"), ("text", "asr"), ("phonemes", "phoneme"), ("label", "classify"),
                         ("speaker", "verify")):
        if all(getattr(u, column) for u in manifest):
            return task
    raise FusionpipeError(f"manifest {manifest.name} has no turns, text, phonemes, label or speaker column to train on")


def demo_stores(cache: str | Path = "cache") -> tuple[list[str], list[str]]:
    """Complete stores of the bundled demo-train manifest and their demo-dev twins."""
    from fusionpipe.store import FeatureStore

    train_dir, dev_dir = Path(cache) / "demo-train", Path(cache) / "demo-dev"
    stores = sorted(str(p) for p in train_dir.glob("*.zarr") if FeatureStore.open(p).is_complete())
    if not stores:
        raise FusionpipeError(f"no --stores given and nothing cached under {train_dir}; run "
                              "`fusionpipe extract --model toy-wavlm,toy-whisper` first (or pass --stores)")
    dev = [str(dev_dir / Path(s).name) for s in stores]
    return stores, [d for d in dev if Path(d).exists()] if len(dev) == len(stores) else []


def train_manifest(cfg: TrainConfig):
    """The rows a config trains on: its ``manifest``, else the manifest its train stores recorded."""
    from fusionpipe.fuse.loader import recorded_manifest
    from fusionpipe.fuse.view import open_fused
    from fusionpipe.manifest import read_manifest

    if cfg.manifest is not None:
        return read_manifest(cfg.manifest)
    return recorded_manifest(open_fused(cfg.stores, skip_missing=cfg.skip_missing))


def upstream_names(stores: list[str]) -> str:
    """The stores' upstreams joined with "+", in their order: wavlm-base-plus+whisper-small."""
    from fusionpipe.store import FeatureStore

    return upstream_set_name(FeatureStore.open(s).upstream_name for s in stores)


def complete(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``task`` and ``out`` filled in where None: the task the train manifest supports
    (`default_task`) and runs/<task>-<upstreams>. Without stores nothing is filled (`TrainConfig.check`
    refuses them)."""
    if not cfg.stores or (cfg.task is not None and cfg.out is not None):
        return cfg
    task = cfg.task or default_task(train_manifest(cfg))
    return dataclasses.replace(cfg, task=task, out=cfg.out or str(Path("runs") / f"{task}-{upstream_names(cfg.stores)}"))


def from_flags(stores: list[str], dev_stores: list[str], cache: str | Path, given: dict, **settings) -> TrainConfig:
    """The TrainConfig of `fusionpipe train`: the flags ``given`` (those left None take no part) over the demo
    preset (`DEMO`, only when no stores are given: then the complete demo stores under ``cache``) over
    TrainConfig's defaults; ``settings`` are the flags that always have a value. Task and out completed."""
    given = {k: v for k, v in given.items() if v is not None}
    preset = {}
    if not stores:
        stores, found_dev = demo_stores(cache)
        dev_stores = dev_stores or found_dev
        preset = DEMO
    return complete(TrainConfig(stores=stores, dev_stores=dev_stores, **settings, **{**preset, **given}))
