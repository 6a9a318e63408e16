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

Data parallel: ``torchrun --standalone --nproc-per-node N -m fusionpipe train ...`` runs N ranks
(`fusionpipe.distributed`: gloo on CPU, nccl with one GPU per rank). Each variant trains through
DistributedDataParallel. Every rank cuts the same global batches (max_frames means what it means
in one process) and reads its contiguous part of each; its summed per-utterance losses are
weighted by N / (utterances in the global batch), so DDP's average over ranks is the gradient of
the global batch's mean loss, and clipping after the all-reduce clips what one process would. A
rank whose part is empty (fewer utterances than ranks) trains on a stand-in utterance with
weight 0. The logged loss is the global batch's; dev batches are dealt whole to the ranks and
their predictions gathered, so every rank computes the single-process corpus metrics and agrees
on best.pt. Rank 0 alone writes the run directory and shows the progress bar; --resume works
with any number of ranks (positions count global batches; last.pt holds the plain model's
parameters and every rank's random state).

What cannot match one process: (1) float rounding, since a rank's part is padded to its own
longest utterance and sums come in another order (losses agree to about 1e-6 relative per
step); (2) random draws: dropout masks, SpecAugment masks and Gumbel noise come from a stream
per rank (rank 0 keeps the seed's; one Gumbel sample per rank's part, not per global batch).
No head or interface keeps batch statistics (the x-vector has no BatchNorm), so nothing else
depends on how a batch is split.
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

from . import distributed as dist
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
    manifest: str | None = None                 # train on these rows of the stores (default: all, as extracted)
    dev_manifest: str | None = None             # evaluate on these rows of the dev stores (default: all)
    trials: str | None = None                   # verify: trial list over the dev stores' utterances
    steps: int = 200_000
    eval_every: int = 1000
    lr: float = 1e-4
    optimizer: str = "adam"                     # adam | adamw (SUPERB SV uses AdamW)
    max_frames: int = 25_600                    # padded frames per batch (32 x 16 s at 50 Hz)
    grad_clip: float = 1.0
    specaugment: bool = False                   # time and feature masks on the fused features
    crop_seconds: list[float] | None = None     # train on random crops of [min, max] s each (SUPERB SV: [2, 8])
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

    def forward(self, stacks: list[torch.Tensor], lengths: torch.Tensor, task, targets: dict,
                specaugment: bool = False, reduction: str = "mean") -> torch.Tensor:
        """The training loss of a batch (in forward, so that DistributedDataParallel sees the pass)."""
        feats = self.features(stacks, lengths)
        if specaugment:
            feats = spec_augment(feats, lengths)
        return task.loss(self.head, feats, lengths, targets, reduction=reduction)


class Variant:
    """One (fusion, merge) under training: model, optimizer and its own RNG stream.

    ``model`` is the plain FusionModel (evaluated and saved); ``trainer`` the module a training
    step calls, its DistributedDataParallel wrapper under torchrun.
    """

    def __init__(self, name: str, model: FusionModel, optimizer: torch.optim.Optimizer, out: Path):
        self.name, self.model, self.optimizer, self.out = name, model, optimizer, out
        self.trainer: nn.Module = model
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.best: float | None = None
        self.best_metrics: dict | None = None
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

    def state(self, step: int, position: tuple[int, int], rank_rngs: list | None = None) -> dict:
        """last.pt; ``rank_rngs``: every rank's (rng, cuda_rng) under DDP (rank 0's are also rng, cuda_rng)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                "position": position, "rng": self.rng, "cuda_rng": self.cuda_rng, "best": self.best,
                "best_metrics": self.best_metrics, "train_seconds": self.train_seconds,
                **({"rank_rngs": rank_rngs} if rank_rngs and len(rank_rngs) > 1 else {})}

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.best, self.best_metrics = ckpt["best"], ckpt.get("best_metrics")
        self.train_seconds = ckpt["train_seconds"]
        rngs = ckpt.get("rank_rngs") or [(ckpt["rng"], ckpt["cuda_rng"])]
        if len(rngs) == dist.world_size() or dist.rank() == 0:
            self.rng, self.cuda_rng = rngs[dist.rank()]
        # else: saved with another number of ranks; this rank keeps the fresh stream of its seed

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def random_crop(stacks: list[torch.Tensor], lengths: torch.Tensor, shortest: int,
                longest: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A random window of each utterance, shortest..longest frames long (the whole of a shorter one),
    from the (B, L, T, D_i) stacks; zero past the new lengths, as the loader's batches are."""
    real = lengths.cpu()
    want = torch.randint(shortest, longest + 1, real.shape)
    new = torch.minimum(real, want)
    start = (torch.rand(real.shape) * (real - new + 1).to(torch.float)).long()  # uniform in 0..real-new
    T = int(new.max()) if len(new) else 0
    frames = start[:, None] + torch.arange(T)[None, :]                      # (B, T)
    keep = torch.arange(T)[None, :] < new[:, None]
    frames = torch.where(keep, frames, 0)
    out = []
    for s in stacks:
        index = frames.to(s.device)[:, None, :, None].expand(-1, s.shape[1], -1, s.shape[3])
        out.append(s.gather(2, index) * keep.to(s.device)[:, None, :, None])
    return out, new.to(lengths.device)


def crop_frames(seconds: list[float] | None, frame_rate: float) -> tuple[int, int] | None:
    """crop_seconds [min, max] -> (shortest, longest) frames at the fused frame rate; refuses nonsense."""
    if seconds is None:
        return None
    if len(seconds) != 2 or not 0 < seconds[0] <= seconds[1]:
        raise FusionpipeError(f"crop_seconds must be [min, max] with 0 < min <= max, got {seconds}")
    return max(1, round(seconds[0] * frame_rate)), max(1, round(seconds[1] * frame_rate))


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
        if dist.rank():  # the same parameters on every rank, but its own dropout / mask / Gumbel draws
            torch.manual_seed(dist.rank_seed(cfg.seed, dist.rank()))
        opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
        name = variant_name(fusion_name, merge)
        variants.append(Variant(name, model, opt_cls(model.parameters(), lr=cfg.lr), out / name))
    return variants


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, dict]:
    """Train every variant of `cfg` in one pass over the data; returns {variant: results}.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; see the module docstring.
    """
    if cfg.task not in PRIMARY:
        raise FusionpipeError(f"unknown task {cfg.task!r}; choose one of {', '.join(PRIMARY)}")
    out = Path(cfg.out)
    if cfg.dev_manifest and not cfg.dev_stores:
        raise FusionpipeError(f"dev_manifest={cfg.dev_manifest} chooses rows of the dev stores, but none are given "
                              "(dev_stores, --dev-stores)")
    if cfg.manifest and cfg.dev_stores == cfg.stores and not cfg.dev_manifest:
        raise FusionpipeError(f"the dev stores are the train stores and only the train utterances are chosen "
                              f"(manifest={cfg.manifest}): give dev_manifest (--dev-manifest) too, or the dev "
                              "metrics would include the training utterances")
    if (out / "config.json").exists() and not resume:
        raise FusionpipeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
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


def _train(cfg: TrainConfig, out: Path, device: torch.device, resume: bool, progress: bool) -> dict[str, dict]:
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    loader = make_loader(cfg.stores, cfg.manifest, max_frames=cfg.max_frames, shuffle=True, seed=cfg.seed,
                         num_workers=cfg.num_workers, align_time=cfg.align_time, align_layers=cfg.align_layers,
                         shard=(rank, world))
    view = loader.dataset.view
    crop = crop_frames(cfg.crop_seconds, view.frame_rate)
    rows = [loader.dataset.rows[i] for i in range(len(loader.dataset))]
    trials = read_trials(cfg.trials) if cfg.trials else ()
    if resume and (out / "task.json").exists():
        task = task_from_dict(json.loads((out / "task.json").read_text()), trials)
    else:
        try:
            task = build_task(cfg.task, _targets(rows), trials)
        except ValueError as e:
            raise FusionpipeError(f"task {cfg.task} on {cfg.manifest or view.describe()['manifest']}: {e}") from None
    dist.barrier()  # every rank has checked and read the run directory before rank 0 writes to it
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        (out / "task.json").write_text(json.dumps(task.to_dict()))

    variants = build_variants(cfg, task, view.dims, view.num_layers, out, device)
    step, position = 0, (0, 0)
    if resume:
        for v in variants:
            if (v.out / "last.pt").exists():
                ckpt = torch.load(v.out / "last.pt", weights_only=False, map_location="cpu")
                v.restore(ckpt)
                step, position = ckpt["step"], tuple(ckpt["position"])
    for v in variants:
        v.trainer = dist.wrap(v.model, device)
    dev = make_loader(cfg.dev_stores, cfg.dev_manifest, max_frames=cfg.max_frames, shuffle=False,
                      num_workers=cfg.num_workers, align_time=cfg.align_time, align_layers=cfg.align_layers,
                      shard=(rank, world), deal=True) if cfg.dev_stores else None
    logs = {v.name: _Log(v.out / "log.csv", resume) for v in variants} if main else {}

    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and main),
               desc=f"train {len(variants)} variant(s)", unit="step", dynamic_ncols=True)
    epoch, skip = position
    while step < cfg.steps:
        loader.batch_sampler.set_epoch(epoch)
        loader.batch_sampler.skip = skip  # resume inside an epoch without reading the skipped batches
        for k, batch in enumerate(loader, start=skip):
            stacks = [s.to(device, non_blocking=True) for s in batch["stacks"]]
            lengths = batch["lengths"].to(device)
            targets = _targets(batch["rows"])
            # this rank's share of global batch k (None: one process, the batch's mean loss as ever)
            weight = dist.shard(loader.batch_sampler.batches()[k], rank, world)[1] if world > 1 else None
            losses = []
            for v in variants:
                t0 = time.perf_counter()
                with v.own_rng():
                    x, n = random_crop(stacks, lengths, *crop) if crop else (stacks, lengths)
                    losses.append(_step(v, task, x, n, targets, cfg, step, weight))
                v.train_seconds += time.perf_counter() - t0
            losses = dict(zip((v.name for v in variants), dist.mean_over_ranks(losses, device)))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}")
            metrics = {}
            if dev is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics = evaluate_variants(variants, task, dev, device)
            for v in variants:
                if main:
                    logs[v.name].write(step, losses[v.name], metrics.get(v.name, {}))
                if v.name in metrics:
                    _keep_best(v, metrics[v.name], cfg)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                for v in variants:
                    rngs = dist.gather((v.rng, v.cuda_rng))
                    if main:
                        torch.save(v.state(step, (epoch, k + 1), rngs), v.out / "last.pt")
            if step >= cfg.steps:
                break
        else:
            epoch, skip = epoch + 1, 0
            continue
        break
    bar.close()
    results = {}
    for v in variants:
        if main and not (v.out / "best.pt").exists():  # no dev set: the last parameters are the result
            torch.save({"model": v.model.state_dict()}, v.out / "best.pt")
        # a full epoch's batches: len(loader) leaves out those a resumed epoch skipped
        results[v.name] = _results(v, cfg, step, len(loader.batch_sampler.batches()), dev)
        if main:
            (v.out / "results.json").write_text(json.dumps(results[v.name], indent=2))
    for log in logs.values():
        log.close()
    return results


def _step(v: Variant, task, stacks, lengths, targets, cfg: TrainConfig, step: int, weight: float | None) -> float:
    """One optimizer step; returns this rank's loss (with ``weight``: its weighted sum of per-utterance losses)."""
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
    return loss.item()


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
        stacks = [s.to(device) for s in batch["stacks"]]
        lengths = batch["lengths"].to(device)
        preds = {}
        for v in variants:
            t0 = time.perf_counter()
            preds[v.name] = task.predict(v.model.head, v.model.features(stacks, lengths), lengths)
            seconds[v.name] += time.perf_counter() - t0
        read.append((rank + j * world, preds, _targets(batch["rows"])))
    everything = dist.gather((read, seconds))
    preds = {v.name: [] for v in variants}
    targets: dict[str, list] = {}
    for _, batch_preds, batch_targets in sorted((b for got, _ in everything for b in got), key=lambda b: b[0]):
        for name, values in batch_preds.items():
            preds[name].extend(values)
        for c, values in batch_targets.items():
            targets.setdefault(c, []).extend(values)
    seconds = {name: sum(s[name] for _, s in everything) for name in seconds}  # compute time, all ranks
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
        v.best, v.best_metrics = value, metrics
        if dist.is_main():
            torch.save({"model": v.model.state_dict(), "metrics": metrics}, v.out / "best.pt")


def _results(v: Variant, cfg: TrainConfig, step: int, batches_per_epoch: int, dev) -> dict:
    res = {"variant": v.name, "task": cfg.task, "steps": step, "trainable_params": v.num_params,
           "train_seconds": round(v.train_seconds, 3),
           "train_seconds_per_epoch": round(v.train_seconds / max(step, 1) * batches_per_epoch, 3)}
    if dev is not None:  # the metrics best.pt was chosen by: no second pass over the dev set
        res["dev"] = v.best_metrics or torch.load(v.out / "best.pt", weights_only=False)["metrics"]
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
             variant: str | None = None, manifest: str | Path | None = None) -> dict[str, dict]:
    """Metrics of a finished run's best checkpoints on the utterances cached in `stores`
    (only the rows of ``manifest``, with its labels, when given)."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise FusionpipeError(f"{run} is not a training run (no config.json); train one with `fusionpipe train`")
    cfg = TrainConfig.load(run / "config.json")
    task = task_from_dict(json.loads((run / "task.json").read_text()), read_trials(trials) if trials else ())
    dev = make_loader(stores, manifest, max_frames=cfg.max_frames, shuffle=False, align_time=cfg.align_time,
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
