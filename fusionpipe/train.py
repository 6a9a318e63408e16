"""STAGE 3: train only the fusion interface and the task head, from the cache.

One pass trains K variants (interface x merge) over the same stores: every batch is read and
aligned once and fed to all of them. Each variant keeps its own parameters, optimizer and
random-number state (swapped in around its step), so it trains exactly as it would alone
with the same seed. Layout of a run directory::

    runs/<name>/config.json          the TrainConfig, as given
    runs/<name>/task.json            labels (vocabulary, classes, speakers) from the train manifest
    runs/<name>/<variant>/last.pt    parameters, optimizer, step, RNG state: --resume continues exactly
    runs/<name>/<variant>/best.pt    parameters at the best dev metric
    runs/<name>/<variant>/log.csv    step, loss, dev metrics
    runs/<name>/<variant>/results.json
"""

from __future__ import annotations

import csv
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .data import make_loader
from .errors import FusionpipeError
from .interfaces import Fusion
from .tasks import build_task, read_trials, task_from_dict
from .upstreams import resolve_device

# the metric that selects the best checkpoint, and whether lower is better
PRIMARY = {"asr": ("wer", True), "multilingual": ("cer", True), "classify": ("accuracy", False),
           "verify": ("eer", True)}


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json beside the results (CLI flag = field name)."""

    stores: list[str]
    task: str = "asr"
    fusion: list[str] = field(default_factory=lambda: ["hconv"])
    merge: list[str] = field(default_factory=lambda: ["concat"])
    out: str = "runs/default"
    dev_stores: list[str] = field(default_factory=list)
    trials: str | None = None                   # verify: trial list over the dev stores' utterances
    steps: int = 200_000
    eval_every: int = 1000
    lr: float = 1e-4
    optimizer: str = "adam"                     # adam | adamw (SUPERB SV uses AdamW)
    max_frames: int = 25_600                    # padded frames per batch (32 x 16 s at 50 Hz)
    grad_clip: float = 1.0
    specaugment: bool = False                   # time and feature masks on the fused features
    select: str | None = None                   # dev metric that picks best.pt (default: the task's, PRIMARY)
    seed: int = 0
    head: dict = field(default_factory=dict)    # head sizes, e.g. {"hidden": 64}
    interface: dict = field(default_factory=dict)  # interface options, e.g. {"normalize": True}
    align_time: str = "max"
    align_layers: str = "interpolate"
    device: str = "auto"
    num_workers: int = 0

    def variants(self) -> list[tuple[str, str]]:
        return [(f, m) for f in self.fusion for m in self.merge]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls(**json.loads(Path(path).read_text()))


def variant_name(fusion: str, merge: str) -> str:
    return f"{fusion}-{merge}"


class FusionModel(nn.Module):
    """Fusion (merge + interface) -> head. The only trained parameters of a variant."""

    def __init__(self, fusion: Fusion, head: nn.Module):
        super().__init__()
        self.fusion, self.head = fusion, head

    def features(self, stacks: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        return self.fusion(stacks, lengths)


class Variant:
    """One (fusion, merge) under training: model, optimizer and its own RNG stream."""

    def __init__(self, name: str, model: FusionModel, optimizer: torch.optim.Optimizer, out: Path):
        self.name, self.model, self.optimizer, self.out = name, model, optimizer, out
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.best: float | None = None
        self.train_seconds = 0.0

    @contextmanager
    def own_rng(self):
        """Dropout, masks and Gumbel noise draw from this variant's stream only."""
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state_all()

    def state(self, step: int, position: tuple[int, int]) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                "position": position, "rng": self.rng, "cuda_rng": self.cuda_rng, "best": self.best,
                "train_seconds": self.train_seconds}

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.rng, self.cuda_rng, self.best = ckpt["rng"], ckpt["cuda_rng"], ckpt["best"]
        self.train_seconds = ckpt["train_seconds"]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def spec_augment(x: torch.Tensor, lengths: torch.Tensor, time_masks: int = 2, time_width: int = 20,
                 feat_masks: int = 2, feat_width: int = 16) -> torch.Tensor:
    """SpecAugment-style masks on (B, T, D) features (s3prl applies them to upstream features)."""
    B, T, D = x.shape
    keep = torch.ones_like(x)
    for b in range(B):
        for _ in range(time_masks):
            w = int(torch.randint(0, time_width + 1, ()))
            t0 = int(torch.randint(0, max(1, int(lengths[b]) - w), ()))
            keep[b, t0:t0 + w] = 0
        for _ in range(feat_masks):
            w = int(torch.randint(0, feat_width + 1, ()))
            f0 = int(torch.randint(0, max(1, D - w), ()))
            keep[b, :, f0:f0 + w] = 0
    return x * keep


def _targets(rows) -> dict[str, list]:
    return {c: [getattr(u, c) for u in rows] for c in ("id", "text", "label", "speaker", "language")}


def build_variants(cfg: TrainConfig, task, dims: list[int], num_layers: int, out: Path,
                   device: torch.device) -> list[Variant]:
    variants = []
    for fusion_name, merge in cfg.variants():
        torch.manual_seed(cfg.seed)  # identical initialisation whether trained alone or with others
        try:
            fusion = Fusion(dims, num_layers, merge=merge, interface=fusion_name, **cfg.interface)
        except ValueError as e:
            raise FusionpipeError(f"variant {variant_name(fusion_name, merge)}: {e}") from None
        model = FusionModel(fusion, task.build_head(fusion.out_dim, **cfg.head)).to(device)
        opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
        name = variant_name(fusion_name, merge)
        variants.append(Variant(name, model, opt_cls(model.parameters(), lr=cfg.lr), out / name))
    return variants


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, dict]:
    """Train every variant of `cfg` in one pass over the data; returns {variant: results}."""
    if cfg.task not in PRIMARY:
        raise FusionpipeError(f"unknown task {cfg.task!r}; choose one of {', '.join(PRIMARY)}")
    out = Path(cfg.out)
    if (out / "config.json").exists() and not resume:
        raise FusionpipeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        # leave a core to the loader's decode thread: on 2 cores, two torch threads fighting it made
        # small BiLSTM steps 9x slower (1.2 s vs 0.14 s per step, demo recipe)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    try:
        return _train(cfg, out, device, resume, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, out: Path, device: torch.device, resume: bool, progress: bool) -> dict[str, dict]:
    loader = make_loader(cfg.stores, max_frames=cfg.max_frames, shuffle=True, seed=cfg.seed,
                         num_workers=cfg.num_workers, align_time=cfg.align_time, align_layers=cfg.align_layers)
    view = loader.dataset.view
    rows = [loader.dataset.rows[i] for i in range(len(loader.dataset))]
    trials = read_trials(cfg.trials) if cfg.trials else ()
    if resume and (out / "task.json").exists():
        task = task_from_dict(json.loads((out / "task.json").read_text()), trials)
    else:
        try:
            task = build_task(cfg.task, _targets(rows), trials)
        except ValueError as e:
            raise FusionpipeError(f"task {cfg.task} on {view.describe()['manifest']}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    (out / "task.json").write_text(json.dumps(task.to_dict()))

    variants = build_variants(cfg, task, view.dims, view.num_layers, out, device)
    step, position = 0, (0, 0)
    if resume:
        for v in variants:
            if (v.out / "last.pt").exists():
                ckpt = torch.load(v.out / "last.pt", weights_only=False)
                v.restore(ckpt)
                step, position = ckpt["step"], tuple(ckpt["position"])
    dev = make_loader(cfg.dev_stores, max_frames=cfg.max_frames, shuffle=False, num_workers=cfg.num_workers,
                      align_time=cfg.align_time, align_layers=cfg.align_layers) if cfg.dev_stores else None
    logs = {v.name: _Log(v.out / "log.csv", resume) for v in variants}

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=f"train {len(variants)} variant(s)",
               unit="step", dynamic_ncols=True)
    epoch, skip = position
    while step < cfg.steps:
        loader.batch_sampler.set_epoch(epoch)
        loader.batch_sampler.skip = skip  # resume inside an epoch without reading the skipped batches
        for k, batch in enumerate(loader, start=skip):
            stacks = [s.to(device, non_blocking=True) for s in batch["stacks"]]
            lengths = batch["lengths"].to(device)
            targets = _targets(batch["rows"])
            losses = {}
            for v in variants:
                t0 = time.perf_counter()
                with v.own_rng():
                    losses[v.name] = _step(v, task, stacks, lengths, targets, cfg, step)
                v.train_seconds += time.perf_counter() - t0
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}")
            metrics = {}
            if dev is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics = evaluate_variants(variants, task, dev, device)
            for v in variants:
                logs[v.name].write(step, losses[v.name], metrics.get(v.name, {}))
                if v.name in metrics:
                    _keep_best(v, metrics[v.name], cfg)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                for v in variants:
                    torch.save(v.state(step, (epoch, k + 1)), v.out / "last.pt")
            if step >= cfg.steps:
                break
        else:
            epoch, skip = epoch + 1, 0
            continue
        break
    bar.close()
    results = {}
    for v in variants:
        if not (v.out / "best.pt").exists():  # no dev set: the last parameters are the result
            torch.save({"model": v.model.state_dict()}, v.out / "best.pt")
        # a full epoch's batches: len(loader) leaves out those a resumed epoch skipped
        results[v.name] = _results(v, cfg, step, len(loader.batch_sampler.batches()), dev)
        (v.out / "results.json").write_text(json.dumps(results[v.name], indent=2))
    for log in logs.values():
        log.close()
    return results


def _step(v: Variant, task, stacks, lengths, targets, cfg: TrainConfig, step: int) -> float:
    v.model.train()
    v.model.fusion.set_progress(step / max(1, cfg.steps))
    feats = v.model.features(stacks, lengths)
    if cfg.specaugment:
        feats = spec_augment(feats, lengths)
    loss = task.loss(v.model.head, feats, lengths, targets)
    v.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(v.model.parameters(), cfg.grad_clip)
    v.optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate_variants(variants: list[Variant], task, loader, device: torch.device) -> dict[str, dict]:
    """Dev/test metrics of every variant, reading each batch once."""
    preds = {v.name: [] for v in variants}
    seconds = {v.name: 0.0 for v in variants}
    targets: dict[str, list] = {}
    for v in variants:
        v.model.eval()
    for batch in loader:
        stacks = [s.to(device) for s in batch["stacks"]]
        lengths = batch["lengths"].to(device)
        for c, values in _targets(batch["rows"]).items():
            targets.setdefault(c, []).extend(values)
        for v in variants:
            t0 = time.perf_counter()
            preds[v.name].extend(task.predict(v.model.head, v.model.features(stacks, lengths), lengths))
            seconds[v.name] += time.perf_counter() - t0
    out = {}
    for v in variants:
        try:
            out[v.name] = {**task.metrics(preds[v.name], targets), "inference_seconds": seconds[v.name]}
        except ValueError as e:
            raise FusionpipeError(f"evaluating {v.name}: {e}") from None
    return out


HIGHER_IS_BETTER = ("accuracy", "macro_f1")


def _keep_best(v: Variant, metrics: dict, cfg: TrainConfig) -> None:
    key = cfg.select or PRIMARY[cfg.task][0]
    lower = key not in HIGHER_IS_BETTER
    if key not in metrics:
        raise FusionpipeError(f"select={key!r} is not a dev metric of task {cfg.task}; choose one of {sorted(metrics)}")
    value = metrics[key]
    if v.best is None or (value < v.best if lower else value > v.best):
        v.best = value
        torch.save({"model": v.model.state_dict(), "metrics": metrics}, v.out / "best.pt")


def _results(v: Variant, cfg: TrainConfig, step: int, batches_per_epoch: int, dev) -> dict:
    res = {"variant": v.name, "task": cfg.task, "steps": step, "trainable_params": v.num_params,
           "train_seconds": round(v.train_seconds, 3),
           "train_seconds_per_epoch": round(v.train_seconds / max(step, 1) * batches_per_epoch, 3)}
    if dev is not None:  # the metrics best.pt was chosen by: no second pass over the dev set
        res["dev"] = torch.load(v.out / "best.pt", weights_only=False)["metrics"]
    return res


class _Log:
    """log.csv per variant (and TensorBoard event files when tensorboard is installed)."""

    def __init__(self, path: Path, resume: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not (resume and path.exists())
        self.f = open(path, "w" if new else "a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(["step", "loss", "metrics"])
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / "tb"))
        except ImportError:
            self.tb = None

    def write(self, step: int, loss: float, metrics: dict) -> None:
        self.w.writerow([step, f"{loss:.6f}", json.dumps(metrics) if metrics else ""])
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            for k, val in metrics.items():
                self.tb.add_scalar(f"dev/{k}", val, step)

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def evaluate(run: str | Path, stores: list[str], trials: str | None = None, device: str = "auto",
             variant: str | None = None) -> dict[str, dict]:
    """Metrics of a finished run's best checkpoints on the utterances cached in `stores`."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise FusionpipeError(f"{run} is not a training run (no config.json); train one with `fusionpipe train`")
    cfg = TrainConfig.load(run / "config.json")
    task = task_from_dict(json.loads((run / "task.json").read_text()), read_trials(trials) if trials else ())
    dev = make_loader(stores, max_frames=cfg.max_frames, shuffle=False, align_time=cfg.align_time,
                      align_layers=cfg.align_layers)
    view = dev.dataset.view
    dev_device = resolve_device(device)
    variants = build_variants(cfg, task, view.dims, view.num_layers, run, dev_device)
    variants = [v for v in variants if variant in (None, v.name)]
    for v in variants:
        v.model.load_state_dict(torch.load(v.out / "best.pt", weights_only=False, map_location=dev_device)["model"])
    return evaluate_variants(variants, task, dev, dev_device)


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
    from .store import FeatureStore

    train_dir, dev_dir = Path(cache) / "demo-train", Path(cache) / "demo-dev"
    stores = sorted(str(p) for p in train_dir.glob("*.zarr") if FeatureStore.open(p).is_complete())
    if not stores:
        raise FusionpipeError(f"no --stores given and nothing cached under {train_dir}; run "
                              "`fusionpipe extract --model toy-wavlm,toy-whisper` first (or pass --stores)")
    dev = [str(dev_dir / Path(s).name) for s in stores]
    return stores, [d for d in dev if Path(d).exists()] if len(dev) == len(stores) else []
