"""A trained run as one torch module: 16 kHz waveforms in, the task's output out (`fusionpipe.load`).

    >>> import fusionpipe, torch
    >>> model = fusionpipe.load("runs/classify-toy-wavlm+toy-whisper")        # doctest: +SKIP
    >>> model([torch.randn(16000), torch.randn(24000)])                         # doctest: +SKIP
    [{'label': 'happy', 'probabilities': {...}}, {'label': 'sad', 'probabilities': {...}}]

The features are the cache's, computed again with the cache's own code: each upstream the run's stores
recorded loads through stage 1's `load_upstream` (its weights hash checked against the store's) and runs its
batch-independent forward, Whisper's windows included, in the precision stage 1 computes in; the result is
cast to the store's dtype (`extract.cast`), aligned by stage 2's `align_into` into zero-padded stacks as
`FusedView.read_stacks` builds them, and the variant's interface and head run as `evaluate` runs them. So
stage 1's batches give the store's bytes, and the same batches give what `evaluate` gives from a float32 or
float16 store; other batches agree to the storage dtype's rounding (the forward is batch-independent in
what it computes, not in which BLAS kernel a batch shape picks). A lossy store's quantization (int8 codes)
is the one step left out, and `lossy` names the stores that had it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import torch
from torch import nn

from fusionpipe.codecs import LOSSY
from fusionpipe.device import resolve_device
from fusionpipe.errors import FusionpipeError
from fusionpipe.store import FeatureStore
from fusionpipe.extract.cast import cast, unstorable
from fusionpipe.extract.registry import HUB_ID, UPSTREAMS
from fusionpipe.extract.stage import compute_dtype
from fusionpipe.extract.toys import toy_dir
from fusionpipe.extract.upstreams import Upstream, load_upstream
from fusionpipe.fuse.align import align_into, common_frame_rate, common_frames
from fusionpipe.train.config import TrainConfig
from fusionpipe.train.evaluation import finished_run, trained_variants
from fusionpipe.train.rundir import RunDir, variant_names
from fusionpipe.train.tasks import lower_is_better, primary_metric
from fusionpipe.train.variant import check_frames


@dataclass(frozen=True)
class RecordedUpstream:
    """An upstream as one of the run's stores recorded it: what to load, the weights it must have, and the
    format its features were stored in."""

    store: str
    name: str
    model_id: str
    revision: str | None
    num_layers: int
    hidden_size: int
    frame_rate: float
    dtype: str
    codec: str

    @property
    def source(self) -> str:
        """What `load_upstream` is given: a registry alias by its name (a toy's directory differs between
        machines), anything else by the HF id or directory the store recorded."""
        return self.name if self.name in UPSTREAMS else self.model_id

    def searched(self) -> str:
        """Where loading looked, for the error when it finds nothing."""
        where = UPSTREAMS[self.name].hf_id if self.name in UPSTREAMS else self.model_id
        if where.startswith("toy:"):
            return str(toy_dir(UPSTREAMS[self.name]))
        if not HUB_ID.fullmatch(where) or Path(where).is_absolute():
            return f"the directory {where}"
        return f"the hub cache {huggingface_hub.constants.HF_HUB_CACHE} for {where}" + \
            (" (HF_HUB_OFFLINE is set: the hub itself was not asked)" if huggingface_hub.constants.HF_HUB_OFFLINE
             else " and the hub")


def recorded_upstreams(cfg: TrainConfig) -> list[RecordedUpstream]:
    """The upstreams of a run, in its order, from the attributes of its (train) stores."""
    out = []
    for url in cfg.stores:
        if not FeatureStore.exists(url):
            relative = "://" not in url and not Path(url).is_absolute()
            raise FusionpipeError(f"the run's store {url} is gone: predict reads there which upstream made each "
                                  "feature and its weights hash; " + (
                                      f"the run named it relative to the directory it was trained in, so run "
                                      f"predict from there (here is {Path.cwd()}), or " if relative else "") +
                                  "extract it again (`fusionpipe extract`, the same --model and --manifest) or "
                                  "restore it")
        store = FeatureStore.open(url)
        info = store.info
        if not info.model_id:
            raise FusionpipeError(f"the run's store {url} records no upstream (a fused or hand-made store): predict "
                                  "runs upstreams on audio, so train on stores that `fusionpipe extract` wrote")
        out.append(RecordedUpstream(url, info.upstream, info.model_id, info.revision, store.num_layers,
                                    store.hidden_size, store.frame_rate, info.dtype, info.codec))
    return out


def load_recorded(rec: RecordedUpstream, device: str | torch.device) -> Upstream:
    """Load ``rec`` through stage 1's `load_upstream`, refusing weights other than those the store was
    extracted with (the head was trained on their features)."""
    try:
        upstream = load_upstream(rec.source, device=str(device))
    except FusionpipeError as e:
        raise FusionpipeError(f"the run's upstream {rec.name} (recorded in {rec.store}) cannot be loaded: {e}. "
                              f"Looked in {rec.searched()}; put its weights there (download it once with "
                              "network access) and retry") from None
    if rec.revision and upstream.revision != rec.revision:
        raise FusionpipeError(
            f"the run's upstream {rec.name}: the weights at {upstream.model_id} (hash {upstream.revision[:12]}) are "
            f"not those {rec.store} was extracted with ({rec.revision[:12]}), and the run's head was trained on "
            "their features; restore those weights, or extract and train again with these")
    if (upstream.num_layers, upstream.hidden_size) != (rec.num_layers, rec.hidden_size):
        raise FusionpipeError(f"the run's upstream {rec.name}: L={upstream.num_layers} D={upstream.hidden_size}, "
                              f"its store {rec.store} holds L={rec.num_layers} D={rec.hidden_size}")
    return upstream


def best_variant(run: RunDir, cfg: TrainConfig) -> str:
    """The variant with the best dev value of the metric that picked the run's best.pt files (--select, else
    the task's primary one); the first variant of a run trained without a dev set."""
    key = cfg.select or primary_metric(cfg.task)
    scored = [(name, ((run.results(name) or {}).get("dev") or {}).get(key)) for name in variant_names(cfg)]
    scored = [(name, value) for name, value in scored if value is not None]
    if not scored:
        return variant_names(cfg)[0]
    sign = 1 if lower_is_better(key) else -1
    return min(scored, key=lambda nv: sign * nv[1])[0]


class TrainedModel(nn.Module):
    """The run's upstreams, stage 2's alignment and one variant's interface and head, as one module.

    ``model(waves)``: a list of 1-D 16 kHz tensors (or arrays), or a padded (B, S) tensor with ``lengths``
    -> one output dict per wave (`Task.outputs`). The steps are public for batching of one's own:
    ``encode(k, waves)`` (upstream k's stored features), ``stacks`` (aligned, padded), ``outputs``.
    """

    def __init__(self, upstreams: list[Upstream], recorded: list[RecordedUpstream], variant, task,
                 cfg: TrainConfig, name: str):
        super().__init__()
        self.upstreams, self.recorded = upstreams, recorded
        self.encoders = nn.ModuleList(u.model for u in upstreams)  # registered, so .to(device) moves them
        self.variant, self.task, self.name = variant, task, name
        self.align_time, self.max_frames = cfg.align_time, cfg.max_frames
        self.num_layers = max(u.num_layers for u in upstreams)
        self.eval()

    def __repr__(self) -> str:
        return (f"TrainedModel({self.task.name}, variant {self.name}, upstreams "
                f"{', '.join(u.name for u in self.upstreams)}, device {self.device})")

    @property
    def device(self) -> torch.device:
        return next(self.variant.parameters()).device

    @property
    def lossy(self) -> list[str]:
        """The stores whose codec was lossy: there `evaluate` read quantized features, this module exact ones."""
        return [r.store for r in self.recorded if r.codec in LOSSY]

    def _apply(self, fn, recurse=True):  # .to(device): the upstreams run where their weights went
        super()._apply(fn, recurse)
        for upstream, encoder in zip(self.upstreams, self.encoders):
            upstream.device = next(encoder.parameters()).device
        return self

    def train(self, mode: bool = True):
        """Always in eval mode: the upstreams' layerdrop would skip blocks, the head's dropout would draw."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, waves, lengths=None) -> list[dict]:
        waves = as_waves(waves, lengths)
        return self.outputs([self.encode(k, waves) for k in range(len(self.upstreams))])

    def encode(self, k: int, waves: list[np.ndarray], ids: list[str] | None = None) -> list[torch.Tensor]:
        """Upstream k on a batch -> [(T_i, L_k, D_k)] on the host, in its store's dtype: stage 1's numbers."""
        upstream, rec = self.upstreams[k], self.recorded[k]
        ids = ids or [f"input {i}" for i in range(len(waves))]
        short = [u for u, w in zip(ids, waves) if upstream.num_frames(len(w)) == 0]
        if short:
            raise FusionpipeError(f"{', '.join(short[:5])}: shorter than one frame of {upstream.name}; give longer audio")
        precision = getattr(torch, compute_dtype(rec.dtype, upstream.device.type))
        out = []
        for utt_id, f in zip(ids, upstream.forward(waves, precision)):
            stored = cast(f, rec.dtype)
            if not torch.isfinite(stored).all():
                raise unstorable(upstream.name, utt_id, rec.dtype, f)
            out.append(stored.cpu())
        return out

    def stacks(self, encoded: list[list[torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per upstream its encoded batch -> (per upstream (B, L, T_max, D_k) float32, zero past each length;
        (B,) lengths), aligned on the host as the loader aligns the cache (`FusedView.read_stacks`)."""
        frames = np.array([[f.shape[0] for f in fs] for fs in encoded], dtype=np.int64)  # (N, B)
        lengths = common_frames(frames, self.align_time)
        out = []
        for fs in encoded:
            stack = torch.zeros(len(fs), self.num_layers, int(lengths.max()), fs[0].shape[2])
            for b, f in enumerate(fs):
                align_into(f, stack[b, :, :lengths[b]], accumulate=False)
            out.append(stack)
        return out, torch.from_numpy(lengths)

    @torch.no_grad()
    def outputs(self, encoded: list[list[torch.Tensor]], ids: list[str] | None = None) -> list[dict]:
        """The variant's interface and head on a batch of encoded utterances -> one output dict each."""
        stacks, lengths = self.stacks(encoded)
        rows = [SimpleNamespace(id=u) for u in ids or [f"input {i}" for i in range(len(lengths))]]
        check_frames(lengths, self.variant.head, rows)
        feats = self.variant.features([s.to(self.device, non_blocking=True) for s in stacks], lengths)
        return self.task.outputs(self.variant.head, feats, lengths)


def as_waves(waves, lengths=None) -> list[np.ndarray]:
    """A list of 1-D waveforms, or a padded (B, S) batch with its (B,) lengths -> 1-D float32 arrays."""
    if isinstance(waves, torch.Tensor) and waves.dim() == 2:
        if lengths is None:
            raise FusionpipeError("a padded (B, S) batch of waveforms needs its lengths: model(waves, lengths)")
        waves = [w[:int(n)] for w, n in zip(waves, lengths)]
    elif lengths is not None:
        raise FusionpipeError("lengths go with a padded (B, S) tensor; a list of waveforms carries its own")
    out = [(w.detach().cpu().float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32))
           for w in waves]
    bad = [i for i, w in enumerate(out) if w.ndim != 1]
    if bad:
        raise FusionpipeError(f"waveform(s) {bad[:5]} are not 1-D: give mono 16 kHz samples, one 1-D tensor each")
    return out


def load(run: str | Path, variant: str | None = None, device: str = "auto") -> TrainedModel:
    """The run's ``variant`` (default: its best by the run's selection metric) as a `TrainedModel` on
    ``device``. Everything cheap is checked before any upstream loads: the run, the variant, its best.pt,
    the stores that recorded the upstreams."""
    run, cfg, _ = finished_run(run, variant)
    name = variant or best_variant(run, cfg)
    recorded = recorded_upstreams(cfg)
    task = run.task()
    on = resolve_device(device)
    shape = SimpleNamespace(dims=[r.hidden_size for r in recorded], num_layers=max(r.num_layers for r in recorded),
                            frame_rate=common_frame_rate([r.frame_rate for r in recorded], cfg.align_time))
    (trained,) = trained_variants(run, cfg, task, shape, on, [name])
    upstreams = [load_recorded(r, on) for r in recorded]
    return TrainedModel(upstreams, recorded, trained.model, task, cfg, name).to(on)
