"""ANALYSIS: which layers each trained interface uses, for every variant (and seed) of a run.

    >>> rows = layer_use("runs/classify-toy-wavlm+toy-whisper")       # doctest: +SKIP
    >>> write_layer_use(rows, "runs/classify-toy-wavlm+toy-whisper/analysis")  # layer-use.csv, .png  # doctest: +SKIP

One row per measure (columns `USE_COLUMNS`), from the variants' best.pt:

    weight       weighted-sum: the softmax weight of each merged layer
    share        gumbel: the share of output dimensions that select each upstream (argmax of the
                 logits, as at evaluation); layer left empty
    layer-share  gumbel: share x that upstream's softmax layer weight: the part of the output that
                 comes from (upstream, layer)
    knockout     every interface: the dev metric with merged layer l knocked out in every upstream's
                 aligned stack, minus the metric without (one row per metric); what puts HConv, which
                 has no weights to read, on one axis with the others
    dev          the dev metric without a knockout (layer left empty)

A knockout reads each dev batch once and runs every variant L + 1 times on it (no layer knocked out,
then each layer), so it costs L + 1 evaluations of the variants' forward passes, not of the reads.
A knocked-out layer is set to its training mean (what the variant's `Standardize` recorded; zero once
standardized), or to zeros for a variant trained without standardize: zeros would put the huge
outlier channels of a pretrained model (|x| ~ 300) at -mean/std after standardisation, far outside
anything seen in training. Read the size of a change as "how much the interface relies on it", not
as information content.

Variants that ended on the CTC blank plateau (results.json ``plateau``) have learned nothing to read:
`layer_use` leaves them out (`stuck_variants` names them) instead of averaging them into the seeds.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from fusionpipe.device import resolve_device
from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse.view import open_fused
from fusionpipe.names import upstream_set_name
from fusionpipe.store import FeatureStore
from fusionpipe.train.config import trial_list
from fusionpipe.train.evaluation import eval_loader, predictions, scored, trained_variants
from fusionpipe.train.interfaces import GumbelSelect, WeightedSum
from fusionpipe.train.rundir import RunDir, split_seed, variant_names, variants_of
from fusionpipe.train.tasks import lower_is_better

USE_COLUMNS = ("variant", "fusion", "merge", "seed", "measure", "upstream", "layer", "metric", "value")
MEASURES = ("weight", "share", "layer-share", "knockout", "dev")


def layer_use(run: str | Path, stores: list[str] | None = None, manifest: str | Path | None = None,
              trials: str | None = None, device: str = "auto", knockout: bool = True,
              skip_missing: bool = False) -> list[dict]:
    """Every measure of every variant of ``run`` (`USE_COLUMNS` rows). The knockout is scored on ``stores``
    (default: the run's dev stores, with its dev manifest) and needs them; ``knockout=False`` reads
    only the weights."""
    run = RunDir(run)
    run.require()
    cfg = run.config()
    names = variant_names(cfg)
    stuck = run.stuck_variants(names)
    if stuck and set(names) <= set(stuck):
        raise FusionpipeError(f"{run.path}: every variant ended on the CTC blank plateau ({', '.join(stuck)}); there "
                              "is no layer use to read. docs/method.md says what helps; train again")
    upstream_names = [FeatureStore.open(s).upstream_name for s in cfg.stores]
    merged = upstream_set_name(upstream_names)
    if stores is None:
        stores, manifest = cfg.dev_stores, cfg.dev_manifest if manifest is None else manifest
    if knockout and not stores:
        raise FusionpipeError(f"{run.path} has no dev stores to score a knockout on: give --stores (the run's "
                              "upstreams, in its order; --manifest for some rows of them), or --no-knockout for the "
                              "weights only")
    trials = trials or cfg.trials
    task = run.task(trial_list(trials) if trials else ())
    device = resolve_device(device)
    loader = eval_loader(cfg, stores, manifest, device, skip_missing, prefetch=1) if knockout else None
    view = loader.dataset.view if knockout else open_fused(cfg.stores, None, cfg.align_time, cfg.align_layers,
                                                             skip_missing=True)
    variants = trained_variants(run, cfg, task, view, device, [n for n in names if n not in stuck])

    def head(name: str) -> dict:  # the columns that say which variant and seed
        base, seed = split_seed(name)
        fusion, merge, _ = next(v for v in variants_of(cfg) if f"{v[0]}-{v[1]}" == base)
        return {"variant": base, "fusion": fusion, "merge": merge, "seed": cfg.seed if seed is None else seed}

    rows = [{**head(v.name), **r} for v in variants
            for r in _weights(v.model.interface.interface, upstream_names, merged)]
    if loader is not None:
        for name, scores in _knockout(variants, task, loader, view.num_layers, device).items():
            baseline = scores[None]
            for metric, value in baseline.items():
                rows.append({**head(name), "measure": "dev", "upstream": merged, "layer": None, "metric": metric,
                             "value": value})
                rows += [{**head(name), "measure": "knockout", "upstream": merged, "layer": layer, "metric": metric,
                          "value": scores[layer][metric] - value} for layer in range(view.num_layers)]
    return rows


def stuck_variants(run: str | Path) -> list[str]:
    """The variants of a run whose results.json says they ended on the CTC blank plateau."""
    run = RunDir(run)
    return run.stuck_variants(variant_names(run.config()))


def _weights(interface, upstreams: list[str], merged: str) -> list[dict]:
    """The rows an interface's parameters give directly: weighted-sum weights, Gumbel shares."""
    rows = []
    if isinstance(interface, WeightedSum):
        w = torch.softmax(interface.weights.detach().float(), 0)
        rows += [{"measure": "weight", "upstream": merged, "layer": i, "metric": None, "value": float(x)}
                 for i, x in enumerate(w)]
    elif isinstance(interface, GumbelSelect):
        picked = interface.logits.detach().argmax(0)  # (D,): the upstream each dimension takes at evaluation
        for k, (name, ws) in enumerate(zip(upstreams, interface.sums)):
            share = float((picked == k).float().mean())
            rows.append({"measure": "share", "upstream": name, "layer": None, "metric": None, "value": share})
            w = torch.softmax(ws.weights.detach().float(), 0)
            rows += [{"measure": "layer-share", "upstream": name, "layer": i, "metric": None,
                      "value": share * float(x)} for i, x in enumerate(w)]
    return rows


def _knockout(variants, task, loader, num_layers: int, device) -> dict[str, dict]:
    """{variant: {None: dev metrics, layer: metrics with that merged layer at its training mean (`_knocked`)}},
    reading each batch once (the evaluation loop's `predictions`, one predictor per variant and layer)."""
    knock = [None, *range(num_layers)]
    preds, targets, _ = predictions(loader, device, {(v.name, k): _knocked_out(v, task, k)
                                                     for v in variants for k in knock})
    return {v.name: {k: scored(task, v.name, preds[(v.name, k)], targets) for k in knock} for v in variants}


def _knocked_out(v, task, layer: int | None):
    """A predictor of variant ``v`` with merged ``layer`` of every upstream's stack set to what `_knocked` says
    (and put back after: the batch is shared by every predictor); ``layer`` None: the stacks as read."""
    def predict(stacks, lengths, rows):
        kept = None if layer is None else [s[:, layer].clone() for s in stacks]  # N x (B, T, D_i)
        if layer is not None:
            for s, value in zip(stacks, _knocked(v, layer)):
                s[:, layer] = value
        try:
            return task.predict(v.model.head, v.model.features(stacks, lengths), lengths)
        finally:
            for s, x in zip(stacks, kept or ()):
                s[:, layer] = x
    return predict


def _knocked(v, layer: int) -> list:
    """What merged layer ``layer`` of each upstream becomes in a knockout of variant ``v``: its training mean
    (D_i,), which its Standardize maps to zero; 0 without standardize."""
    front = v.model.interface.standardize
    if front is None:
        return [0.0] * len(v.model.interface.dims)
    return [front.get_buffer(f"mean_{k}")[layer] for k in range(len(v.model.interface.dims))]


# ---- files ----------------------------------------------------------------------------------------
def write_layer_use(rows: list[dict], out: str | Path, metric: str | None = None, title: str = "") -> list[Path]:
    """layer-use.csv and layer-use.png under ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "layer-use.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(USE_COLUMNS)
        for r in rows:
            w.writerow(["" if r[k] is None else (repr(r[k]) if isinstance(r[k], float) else r[k])
                        for k in USE_COLUMNS])
    return [out / "layer-use.csv", plot_layer_use(rows, out / "layer-use.png", metric, title)]


def read_layer_use(path: str | Path) -> list[dict]:
    """The rows back from a layer-use.csv (a directory holding it, or the file)."""
    path = Path(path)
    path = path / "layer-use.csv" if path.is_dir() else path
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            r["seed"] = int(r["seed"])
            r["layer"] = int(r["layer"]) if r["layer"] else None
            r["metric"] = r["metric"] or None
            r["value"] = float(r["value"])
        return rows
    except (OSError, KeyError, ValueError) as e:
        raise FusionpipeError(f"{path} is not a layer-use.csv written by `fusionpipe analyze` ({type(e).__name__}: "
                              f"{e}); run `fusionpipe analyze RUN` again") from None


def mean_std(rows: list[dict], measure: str, metric: str | None = None) -> dict[tuple, tuple[float, float, int]]:
    """{(variant, upstream, layer): (mean, std, seeds)} of one measure over the seeds (std 0 for one seed)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r["measure"] == measure and (metric is None or r["metric"] == metric):
            groups.setdefault((r["variant"], r["upstream"], r["layer"]), []).append(r["value"])
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def knockout_metric(rows: list[dict], metric: str | None = None) -> str | None:
    """The metric the knockout is shown in: ``metric`` when the rows have it, else the first one they have."""
    have = list(dict.fromkeys(r["metric"] for r in rows if r["measure"] == "knockout"))
    return metric if metric in have else (have[0] if have else None)


def plot_layer_use(rows: list[dict], path: str | Path, metric: str | None = None, title: str = "") -> Path:
    """Left: the knockout profile of every variant (metric change per knocked-out layer); right: the layer
    weights (weighted-sum) and Gumbel layer shares. Mean over seeds, error bars one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = knockout_metric(rows, metric)
    seeds = len({r["seed"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    ax = axes[0]
    if metric is not None:
        stats = mean_std(rows, "knockout", metric)
        for v in variants:
            pts = sorted((k[2], m, s) for k, (m, s, _) in stats.items() if k[0] == v)
            if pts:
                x, m, s = zip(*pts)
                ax.errorbar(x, m, yerr=s if seeds > 1 else None, label=v, color=colors[v], marker="o", ms=3,
                            capsize=2, linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.6)
        direction = "up = worse" if lower_is_better(metric) else "down = worse"
        ax.set_ylabel(f"dev {metric} change ({direction})")
        ax.set_title("knockout: one merged layer at its training mean", fontsize=9)
    else:
        ax.set_title("knockout: not scored (no dev stores)", fontsize=9)
    ax.set_xlabel("merged layer")
    ax = axes[1]
    for measure, style in (("weight", "-"), ("layer-share", "--")):
        stats = mean_std(rows, measure)
        for key in sorted({(k[0], k[1]) for k in stats}):
            pts = sorted((k[2], m, s) for k, (m, s, _) in stats.items() if (k[0], k[1]) == key)
            x, m, s = zip(*pts)
            label = key[0] if measure == "weight" else f"{key[0]}: {key[1]}"
            ax.errorbar(x, m, yerr=s if seeds > 1 else None, label=label, color=colors[key[0]], linestyle=style,
                        marker="o", ms=3, capsize=2, linewidth=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("weight (weighted-sum) / share (gumbel)")
    ax.set_title("what the weights say", fontsize=9)
    for a in axes:
        a.xaxis.get_major_locator().set_params(integer=True)  # layers are whole numbers
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=6)
    fig.suptitle((title + "; " if title else "") + (f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def describe_use(rows: list[dict], metric: str | None = None) -> str:
    """One sentence per variant of what the rows show: the layer whose knockout costs most, and for
    weighted-sum the layer it weighs most."""
    metric = knockout_metric(rows, metric)
    parts = []
    knock = mean_std(rows, "knockout", metric) if metric else {}
    weights = mean_std(rows, "weight")
    shares = mean_std(rows, "share")
    for v in dict.fromkeys(r["variant"] for r in rows):
        said = []
        ko = [(k[2], m) for k, (m, _, _) in knock.items() if k[0] == v]
        if ko:
            worst = max(ko, key=lambda p: p[1] if lower_is_better(metric) else -p[1])
            spread = max(abs(m) for _, m in ko)
            said.append(f"knocking out layer {worst[0]} costs most ({worst[1]:+.3f} {metric})" if spread > 0
                        else "no single layer's knockout changes it")
        w = [(k[2], m) for k, (m, _, _) in weights.items() if k[0] == v]
        if w:
            top = max(w, key=lambda p: p[1])
            said.append(f"its largest weight is layer {top[0]} ({top[1]:.2f}; uniform {1 / len(w):.2f})")
        s = [(k[1], m) for k, (m, _, _) in shares.items() if k[0] == v]
        if s:
            said.append("dimensions selected from " + ", ".join(f"{u} {m:.0%}" for u, m in s))
        if said:
            parts.append(f"{v}: " + "; ".join(said))
    return ". ".join(parts) + "." if parts else ""

