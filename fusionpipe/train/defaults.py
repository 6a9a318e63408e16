"""What `fusionpipe train` fills in that no flag gives: the demo preset and the task a manifest supports."""

from __future__ import annotations

from pathlib import Path

from fusionpipe.errors import FusionpipeError


# Used when `fusionpipe train` is given no stores: the bundled demo corpus, sized for a CPU.
# 1500 steps: about 3.5 min on 2 cores; CTC on toy features leaves the blank plateau only after ~500.
DEMO = {"steps": 1500, "eval_every": 500, "lr": 2e-3, "max_frames": 4000,
        "head": {"proj": 64, "hidden": 64, "layers": 1}}


def default_task(manifest) -> str:
    """The task a manifest supports by default: asr if it has texts, else classify, else verify."""
    for column, task in (("text", "asr"), ("label", "classify"), ("speaker", "verify")):
        if all(getattr(u, column) for u in manifest):
            return task
    raise FusionpipeError(f"manifest {manifest.name} has no text, label or speaker column to train on")


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
