"""ANALYSIS: how alike the layers of the upstreams are. Linear CKA between every layer of every
upstream and every layer of every other (and within each), on a seeded sample of aligned frames.

    >>> sim = layer_similarity(["cache/demo-dev/toy-wavlm.zarr", "cache/demo-dev/toy-whisper.zarr"])  # doctest: +SKIP
    >>> sim.block(0, 1).shape          # (L_a, L_b): toy-wavlm's layers x toy-whisper's   # doctest: +SKIP
    (4, 3)
    >>> sim.summary()[0]["mean_best_match"]                                              # doctest: +SKIP
    >>> write_similarity(sim, "analysis/demo-dev")  # cka.csv, cka-summary.csv, cka.png  # doctest: +SKIP

The frames: ``frames`` (default 4096) positions drawn uniformly without replacement from every
aligned frame of the view (stage 2's time rule: T = max T_i, end-exact linear interpolation,
`fusionpipe.fuse.align`), from ``seed``, so a rerun draws the same frames. Layers are NOT
interpolated: each upstream keeps its own L_i, so a 7-layer Whisper-base compares its 7 layers with
WavLM's 13. Stores are read one run of neighbouring sampled utterances at a time (one Dask task
each, threads), keeping only the sampled frames: memory is the sample, N x sum_i L_i D_i float32
(4096 frames of Whisper-base + WavLM-base: 220 MB), whatever the corpus size.

The estimator, computed from the sample in feature space: X_u (N, D_u), centred, for layer u.
``linear`` (Kornblith et al. 2019): CKA(u, v) = ||X_v^T X_u||_F^2 / (||X_u^T X_u||_F ||X_v^T X_v||_F).
``debiased``: the same ratio of the unbiased HSIC estimator (Song et al. 2012), whose Gram terms
reduce with centred features and r_i = ||x_i||^2 to
    ||X_v^T X_u||^2 - (1 + 2/(n-2)) r_u.r_v + sum(r_u) sum(r_v) / ((n-1)(n-2)),
so it needs nothing beyond the linear one but the per-frame norms. The linear estimator is biased
upwards when D is not small against N (two unrelated isotropic 768-d features at N = 4096 score
about 0.16); the debiased one is near 0 there. Why feature space and not N x N Gram matrices:
the Gram route needs one N x N matrix per layer at once (20 layers x 4096^2 float32 = 1.3 GB) to
take their pairwise products; feature space needs one D_u x (L_b D_b) product at a time (30 MB for
WavLM-base) and costs N (sum L_i D_i)^2 multiply-adds, about 750 GFLOP for Whisper-base + WavLM-base
at N = 4096. docs/decisions.md records the choice.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse.align import align_into
from fusionpipe.fuse.runs import neighbour_runs
from fusionpipe.fuse.view import FusedView, open_fused

FRAMES = 4096
ESTIMATORS = ("linear", "debiased")
READ_FRAMES = 4096  # aligned frames per read task (a few chunks); bounds the memory of one task


@dataclass
class Similarity:
    """CKA between every layer of every upstream: ``matrix`` (G, G), G = sum L_i, rows and columns in the
    order (upstream 0: layers 0..L_0-1, upstream 1: ...), as `labels` lists them."""

    upstreams: list[str]
    layers: list[int]          # L_i of each upstream, in order
    matrix: np.ndarray         # (G, G) float64, symmetric
    frames: int                # N, frames sampled
    estimator: str
    seed: int
    manifest: str

    def labels(self) -> list[tuple[str, int]]:
        return [(u, layer) for u, n in zip(self.upstreams, self.layers) for layer in range(n)]

    def block(self, a: int, b: int) -> np.ndarray:
        """(L_a, L_b): upstream a's layers (rows) against upstream b's (columns)."""
        edges = np.cumsum([0, *self.layers])
        return self.matrix[edges[a]:edges[a + 1], edges[b]:edges[b + 1]]

    def summary(self) -> list[dict]:
        """One row per pair of upstreams (a before b, and each with itself).

        ``mean_best_match``: for every layer of one upstream the CKA of its most similar layer in the
        other, averaged over the layers of both (symmetric; 1 = every layer has a twin); ``max``:
        the most similar pair of layers; ``mean``: all pairs of layers. Within an upstream, the
        diagonal (a layer with itself, 1) is left out and mean_best_match is its neighbours'.
        """
        rows = []
        for a in range(len(self.upstreams)):
            for b in range(a, len(self.upstreams)):
                m = self.block(a, b).copy()
                if a == b:
                    np.fill_diagonal(m, np.nan)
                if m.size == 0 or np.isnan(m).all():  # one layer with itself: nothing to compare
                    best = mean = top = float("nan")
                else:
                    best = float((np.nanmean(np.nanmax(m, 1)) + np.nanmean(np.nanmax(m, 0))) / 2)
                    mean, top = float(np.nanmean(m)), float(np.nanmax(m))
                rows.append({"upstream_a": self.upstreams[a], "upstream_b": self.upstreams[b],
                             "mean_best_match": best, "max": top, "mean": mean, "frames": self.frames,
                             "estimator": self.estimator, "seed": self.seed, "manifest": self.manifest})
        return rows


def layer_similarity(stores: list, frames: int = FRAMES, seed: int = 0, estimator: str = "linear",
                     align_time: str = "max", skip_missing: bool = False) -> Similarity:
    """CKA between every layer of the stores' upstreams (stores of one manifest), on ``frames`` aligned
    frames drawn from ``seed`` (all of them when the view has fewer)."""
    if estimator not in ESTIMATORS:
        raise FusionpipeError(f"--estimator {estimator!r} is not known; choose one of {', '.join(ESTIMATORS)}")
    if not isinstance(frames, int) or frames < 4:
        raise FusionpipeError(f"--frames ({frames}): sample at least 4 frames (default {FRAMES})")
    view = open_fused(list(stores), None, align_time, "interpolate", skip_missing=skip_missing)
    utt, t = sample_frames(view.lengths, frames, seed)
    samples = [read_sampled(view, k, utt, t) for k in range(len(view.stores))]
    names = _names(view)
    return Similarity(names, [s.num_layers for s in view.stores], cka_matrix(samples, estimator), len(utt),
                      estimator, seed, view.stores[0].info.manifest or "")


def _names(view: FusedView) -> list[str]:
    names = [s.upstream_name for s in view.stores]
    return [f"{n}#{k}" if names.count(n) > 1 else n for k, n in enumerate(names)]


def sample_frames(lengths: np.ndarray, frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(utterance index, frame) of ``frames`` distinct aligned frames drawn uniformly, sorted; all when fewer."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        raise FusionpipeError("the stores hold no frames to compare")
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(frames, total), replace=False))
    utt = np.searchsorted(ends, picks, side="right")
    return utt, picks - (ends[utt] - lengths[utt])


def read_sampled(view: FusedView, k: int, utt: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(N, L_k, D_k) float32: store k's sampled frames, aligned in time to the view, its own layers.

    One Dask task per run of neighbouring utterances of the store (one contiguous read), on threads
    (Zarr decodes without the GIL); each returns only its sampled frames.
    """
    import dask

    store = view.stores[k]
    wanted = np.unique(utt)
    pos = np.array([store.position[view.ids[i]] for i in wanted], dtype=np.int64)
    # split where a hole exceeds a chunk or the task has enough frames
    groups = neighbour_runs(store.offsets[pos], store.lengths[pos], gap=store.chunk_frames,
                            sizes=view.lengths[wanted], budget=READ_FRAMES)
    rows_of = {int(i): np.flatnonzero(utt == i) for i in wanted}

    def task(group: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        lo = int(store.offsets[pos[group[0]]])
        hi = max(int(store.offsets[pos[j]] + store.lengths[pos[j]]) for j in group)
        block = store.read_range(lo, hi)  # (frames, L_k, D_k), storage dtype
        out = []
        for j in group:
            i, o, n = int(wanted[j]), int(store.offsets[pos[j]]) - lo, int(store.lengths[pos[j]])
            aligned = torch.empty(store.num_layers, int(view.lengths[i]), store.hidden_size)
            align_into(block[o:o + n], aligned, accumulate=False)  # time only: L stays L_k
            rows = rows_of[i]
            out.append((rows, aligned[:, torch.from_numpy(t[rows])].permute(1, 0, 2).numpy()))
        return out

    sample = np.empty((len(utt), store.num_layers, store.hidden_size), np.float32)
    for parts in dask.compute(*[dask.delayed(task)(g) for g in groups], scheduler="threads"):
        for rows, values in parts:
            sample[rows] = values
    return sample


def cka_matrix(samples: list[np.ndarray], estimator: str = "linear") -> np.ndarray:
    """(G, G) CKA between every layer of ``samples`` [(N, L_i, D_i)], the same N frames in each."""
    n = samples[0].shape[0]
    if estimator == "debiased" and n < 4:
        raise FusionpipeError("the debiased estimator needs at least 4 frames")
    xs = []
    for s in samples:
        x = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32))
        xs.append((x - x.double().mean(0).float()).reshape(n, -1))  # centred, (N, L_i * D_i)
    layers = [s.shape[1] for s in samples]
    dims = [s.shape[2] for s in samples]
    edges = np.cumsum([0, *layers])
    G = int(edges[-1])
    cross = np.zeros((G, G))  # ||X_v^T X_u||_F^2
    for a in range(len(xs)):
        for b in range(a, len(xs)):
            for u in range(layers[a]):
                xu = xs[a][:, u * dims[a]:(u + 1) * dims[a]]
                first = u if a == b else 0  # within one upstream: v >= u, the rest by symmetry
                p = xu.T @ xs[b][:, first * dims[b]:]  # (D_a, (L_b - first) * D_b)
                sq = p.double().square().reshape(dims[a], -1, dims[b]).sum((0, 2)).numpy()
                cross[edges[a] + u, edges[b] + first:edges[b + 1]] = sq
                cross[edges[b] + first:edges[b + 1], edges[a] + u] = sq
    hsic = cross
    if estimator == "debiased":
        r = torch.cat([x.double().square().reshape(n, layers[i], dims[i]).sum(2) for i, x in enumerate(xs)], 1)
        rr = (r.T @ r).numpy()  # r_u . r_v
        total = r.sum(0).numpy()
        hsic = cross - (1 + 2 / (n - 2)) * rr + np.outer(total, total) / ((n - 1) * (n - 2))
    norm = np.sqrt(np.maximum(np.diag(hsic), 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = hsic / np.outer(norm, norm)
    return np.where(np.outer(norm, norm) > 0, out, np.nan)


# ---- files ----------------------------------------------------------------------------------------
CKA_COLUMNS = ("upstream_a", "layer_a", "upstream_b", "layer_b", "cka", "frames", "estimator", "seed", "manifest")
SUMMARY_COLUMNS = ("upstream_a", "upstream_b", "mean_best_match", "max", "mean", "frames", "estimator", "seed",
                   "manifest")


def write_similarity(sim: Similarity, out: str | Path, title: str | None = None) -> list[Path]:
    """cka.csv (every pair of layers, both orders), cka-summary.csv (one row per pair of upstreams) and
    cka.png (the heatmap) under ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = sim.labels()
    meta = [sim.frames, sim.estimator, sim.seed, sim.manifest]
    with open(out / "cka.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CKA_COLUMNS)
        for i, (ua, la) in enumerate(labels):
            for j, (ub, lb) in enumerate(labels):
                w.writerow([ua, la, ub, lb, _exact(sim.matrix[i, j]), *meta])
    with open(out / "cka-summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        for r in sim.summary():
            w.writerow([_exact(r[k]) if isinstance(r[k], float) else r[k] for k in SUMMARY_COLUMNS])
    return [out / "cka.csv", out / "cka-summary.csv", plot_similarity(sim, out / "cka.png", title)]


def _exact(v: float) -> str:
    return "" if math.isnan(v) else repr(float(v))


def read_similarity(path: str | Path) -> Similarity:
    """A Similarity back from the cka.csv `write_similarity` wrote (a directory holding it, or the file)."""
    path = Path(path)
    path = path / "cka.csv" if path.is_dir() else path
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        upstreams = list(dict.fromkeys(r["upstream_a"] for r in rows))
        layers = [1 + max(int(r["layer_a"]) for r in rows if r["upstream_a"] == u) for u in upstreams]
        edges = dict(zip(upstreams, np.cumsum([0, *layers])))
        matrix = np.full((sum(layers),) * 2, np.nan)
        for r in rows:
            matrix[edges[r["upstream_a"]] + int(r["layer_a"]), edges[r["upstream_b"]] + int(r["layer_b"])] = (
                float(r["cka"]) if r["cka"] else np.nan)
        first = rows[0]
        return Similarity(upstreams, layers, matrix, int(first["frames"]), first["estimator"], int(first["seed"]),
                          first["manifest"])
    except (OSError, KeyError, ValueError, IndexError) as e:
        raise FusionpipeError(f"{path} is not a cka.csv written by `fusionpipe analyze` ({type(e).__name__}: "
                              f"{e}); run `fusionpipe analyze STORES...` again") from None


def plot_similarity(sim: Similarity, path: str | Path, title: str | None = None) -> Path:
    """The (G, G) heatmap, upstreams delimited, layer 0 (CNN / embedding output) first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    G = sum(sim.layers)
    size = min(3.0 + 0.28 * G, 14.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(sim.matrix, vmin=0, vmax=1, cmap="magma", origin="upper")
    edges = np.cumsum([0, *sim.layers])
    for e in edges[1:-1]:
        ax.axhline(e - 0.5, color="white", linewidth=1.5)
        ax.axvline(e - 0.5, color="white", linewidth=1.5)
    every = max(1, G // 40)
    ticks = [i for i in range(G) if i % every == 0]
    labels = [f"{u.split('/')[-1]}:{layer}" if layer == 0 else str(layer) for u, layer in sim.labels()]
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=f"{sim.estimator} CKA")
    ax.set_title(title or f"layer CKA, {sim.manifest}, {sim.frames} frames (seed {sim.seed})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
