"""The ablation report: results.csv, results.md and PNG plots from the runs of a recipe's plan.

One row per task x upstream set x variant, folds averaged, each task's metric on its test set
(dev where a task has none) beside the paper's value when the recipe gives one, with trainable
and interface parameters, train seconds per epoch and inference seconds (the HConv overhead
question). A recipe with several tasks also gets the cross-task check: per task, the interfaces and
the upstream sets ranked, and whether the paper's ordering (HConv over the weighted sum, the fused set
over each single upstream) holds there. `ablation.run_recipe` writes it after the runs; the runs on
disk are its only input.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

from fusionpipe.names import upstream_set_name
from fusionpipe.train.log import read_losses
from fusionpipe.train.rundir import RunDir, variant_grid, variant_name

if TYPE_CHECKING:
    from fusionpipe.ablate.plan import Plan, Run
    from fusionpipe.ablate.recipe import Recipe, TaskSpec


def _primary(spec: TaskSpec) -> tuple[str, bool]:
    """The metric the tables report, and whether lower is better."""
    from fusionpipe.train.tasks import lower_is_better, primary_metric

    metric = spec.metric or primary_metric(spec.task)
    return metric, lower_is_better(metric)


def collect(plan: Plan) -> list[dict]:
    """One row per task x upstream set x variant (folds averaged) from the runs on disk."""
    recipe = plan.recipe
    rows = []
    for spec in recipe.tasks.values():
        metric, _ = _primary(spec)
        for upstreams in recipe.upstream_sets:
            runs = [x for x in plan.runs if x.task is spec and x.upstreams == upstreams]
            for fusion, merge in recipe.variants(upstreams):
                variant = variant_name(fusion, merge)
                # per seed (a run's `seeds`, else its one seed), the folds averaged; then mean and std over seeds
                per_seed = []
                for name in (variant_name(*v) for v in variant_grid([fusion], [merge], spec.settings.get("seeds"))):
                    per_fold = [r for r in (_variant_result(x, name) for x in runs) if r is not None]
                    if per_fold:
                        per_seed.append(per_fold)
                if not per_seed:
                    continue
                every = [r for per_fold in per_seed for r in per_fold]
                split = every[0]["split"]
                keys = list(dict.fromkeys(k for r in every for k in r["metrics"]))
                seed_means = [{k: _mean([r["metrics"].get(k) for r in per_fold]) for k in keys} for per_fold in per_seed]
                metrics = {k: _mean([m.get(k) for m in seed_means]) for k in keys}
                spread = _std([m.get(metric) for m in seed_means])
                paper = recipe.paper.get(spec.name, {}).get(upstream_set_name(upstreams), {}).get(variant)
                value = metrics.get(metric)
                rows.append({
                    "task": spec.name, "upstreams": upstream_set_name(upstreams), "fusion": fusion, "merge": merge,
                    "variant": variant, "folds": len(per_seed[0]), "seeds": len(per_seed), "split": split,
                    "metrics": metrics, "metric": metric, "ours": None if value is None else round(100 * value, 2),
                    "ours_std": None if spread is None else round(100 * spread, 2), "paper": paper,
                    "trainable_params": every[0]["trainable_params"],
                    "interface_params": every[0]["interface_params"],
                    "train_seconds_per_epoch": _mean([r["train_seconds_per_epoch"] for r in every]),
                    "inference_seconds": _mean([r["inference_seconds"] for r in every]),
                    "steps": every[0]["steps"],
                    "stuck": sum(any(r["stuck"] for r in per_fold) for per_fold in per_seed),
                    "log": every[0]["log"],
                })
    return rows


def _std(values: list) -> float | None:
    """Sample standard deviation over seeds (None for fewer than two)."""
    values = [v for v in values if isinstance(v, (int, float))]
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def _variant_result(x: Run, variant: str) -> dict | None:
    run = RunDir(x.out)
    res = run.results(variant)
    if res is None:
        return None
    test = run.test()
    if variant in test:
        split, metrics = "test", dict(test[variant])
    else:
        split, metrics = "dev", dict(res.get("dev") or {})
    inference = metrics.pop("inference_seconds", None)
    return {"split": split, "metrics": metrics, "inference_seconds": inference,
            "trainable_params": res.get("trainable_params"), "interface_params": interface_params(run, variant),
            "train_seconds_per_epoch": res.get("train_seconds_per_epoch"), "steps": res.get("steps"),
            "stuck": bool((res.get("plateau") or {}).get("stuck")), "log": run.log_path(variant)}


def interface_params(run: RunDir, variant: str) -> int | None:
    """Parameters of the interface (merge front + interface; the state dict's interface.*), from best.pt."""
    if not run.best_path(variant).is_file():
        return None
    from fusionpipe.train.variant import PREFIX, current_keys

    state = current_keys(run.load_best(variant)["model"])
    return int(sum(v.numel() for k, v in state.items() if k.startswith(PREFIX) and v.is_floating_point()
                   and not k.endswith(".tau") and ".standardize." not in k))  # buffers, not parameters


def write_report(plan: Plan) -> list[Path]:
    """results.csv, results.md and the PNG plots under <results>/<name>/ of the plan's recipe; returns their paths."""
    recipe = plan.recipe
    rows = collect(plan)
    out = recipe.out
    out.mkdir(parents=True, exist_ok=True)
    paths = [_write_csv(rows, out / "results.csv")]
    plots = _plot(recipe, rows, out)
    layers = layer_pictures(plan, out)
    paths.append(_write_md(recipe, rows, plots, out / "results.md", layers))
    return paths + plots + [p for _, p, _ in layers]


CSV_HEAD = ("task", "upstreams", "fusion", "merge", "variant", "folds", "split", "seeds", "stuck")
CSV_TAIL = ("trainable_params", "interface_params", "train_seconds_per_epoch", "inference_seconds", "steps",
            "metric", "ours", "ours_std", "paper")


def _write_csv(rows: list[dict], path: Path) -> Path:
    metric_cols = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*CSV_HEAD, *metric_cols, *CSV_TAIL])
        for r in rows:
            w.writerow([r[k] for k in CSV_HEAD] + [_cell(r["metrics"].get(k)) for k in metric_cols]
                       + [_cell(r[k]) for k in CSV_TAIL])
    return path


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _write_md(recipe: Recipe, rows: list[dict], plots: list[Path], path: Path,
              layers: list[tuple[str, Path, str]] = ()) -> Path:
    lines = [f"# {recipe.name}: results", "",
             f"Recipe `{recipe.source}`. Values in %: each task's metric on its test set (dev where the "
             "task has none), folds averaged; the paper's numbers, where the recipe gives them, in "
             "parentheses: `ours (paper)`.", ""]
    variants = [(f, m) for f, m, _ in variant_grid(recipe.fusion, recipe.merge)]
    for spec in recipe.tasks.values():
        task_rows = [r for r in rows if r["task"] == spec.name]
        if not task_rows:
            continue
        metric, lower = _primary(spec)
        seeds = max(r["seeds"] for r in task_rows)
        lines += [f"## {spec.name} ({spec.task}): {metric} % ({'lower' if lower else 'higher'} is better, "
                  f"{task_rows[0]['split']}{f', mean of {len(spec.folds)} folds' if spec.folds else ''}"
                  f"{f', mean ± std over {seeds} seeds ({_seed_list(spec)})' if seeds > 1 else ''})", ""]
        lines.append("| upstreams | " + " | ".join(f"{f} / {m}" for f, m in variants) + " |")
        lines.append("|---|" + "---:|" * len(variants))
        single = stuck = False
        for upstreams in recipe.upstream_sets:
            name = upstream_set_name(upstreams)
            cells = []
            for f, m in variants:
                r = next((r for r in task_rows if r["upstreams"] == name and r["variant"] == variant_name(f, m)), None)
                if r is None:
                    trained_elsewhere = len(upstreams) == 1 and m not in recipe.merge[:1]
                    single |= trained_elsewhere
                    cells.append("—" if trained_elsewhere else "")
                    continue
                cell = _pm(r)
                if r["paper"] is not None:
                    cell += f" ({_fmt(r['paper'])})"
                if r["stuck"]:
                    cell += f" † {r['stuck']}/{r['seeds']} stuck"
                    stuck = True
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if single:
            lines += ["", f"— : merging one upstream is the identity; trained once, shown under "
                          f"{recipe.merge[0]}."]
        if stuck:
            lines += ["", "† k/n stuck: k of the n seeds ended on the CTC blank plateau (every dev output empty; "
                          "the trainer's detector, results.json `plateau`); they count in the mean with their "
                          "error rate of 100 %. docs/method.md says what causes it and what helps."]
        for p in plots:
            if p.name.startswith(f"{spec.name}-"):
                lines += ["", f"![{p.stem}]({p.name})"]
        lines.append("")

    lines += cross_task(recipe, rows)
    if layers:
        lines += ["## What the layers say", "",
                  "Per upstream set: which layers each variant uses (left: the dev metric's change when one merged "
                  "layer is knocked out, set to its training mean, every interface on one axis; right: the "
                  "weighted-sum weights and Gumbel shares; "
                  "`fusionpipe analyze RUN`), and how alike the upstreams' layers are (linear CKA on a sample of "
                  "aligned frames of the train stores; `fusionpipe analyze STORES`). A mean best-match CKA near 1 "
                  "says every layer of one upstream has a near twin in the other; far below 1, they represent the "
                  "speech differently, which is what makes fusing them worth it.", ""]
        for title, picture, sentence in layers:
            lines += [f"### {title}", "", f"![{title}]({picture.relative_to(path.parent).as_posix()})", "", sentence, ""]

    lines += ["## Computational overhead of the interfaces", "",
              "Trainable parameters (interface = merge front + interface over the layers; total adds the head), training "
              "seconds per epoch and inference seconds over the evaluation set, measured per variant "
              "inside one shared pass (data loading excluded). `x WS`: training time relative to "
              "weighted-sum with the same upstreams and merge.", "",
              "| task | upstreams | variant | interface params | total params | train s / epoch | x WS | "
              "inference s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ws = next((o for o in rows if o["task"] == r["task"] and o["upstreams"] == r["upstreams"]
                   and o["fusion"] == "weighted-sum" and o["merge"] == r["merge"]), None)
        ratio = ""
        if ws and ws["train_seconds_per_epoch"] and r["train_seconds_per_epoch"] is not None:
            ratio = f"{r['train_seconds_per_epoch'] / ws['train_seconds_per_epoch']:.2f}"
        lines.append(f"| {r['task']} | {r['upstreams']} | {r['variant']} | {_int(r['interface_params'])} | "
                     f"{_int(r['trainable_params'])} | {_fmt(r['train_seconds_per_epoch'], 3)} | {ratio} | "
                     f"{_fmt(r['inference_seconds'], 3)} |")
    lines.append("")
    path.write_text("\n".join(lines))
    return path


def cross_task(recipe: Recipe, rows: list[dict]) -> list[str]:
    """The paper's next check, one row and one sentence per task: does what the paper found on ASR, SV, ER
    and ML-SUPERB (HConv beats the weighted sum; fusing upstreams beats each alone) hold on this task?
    Only for a recipe with results on more than one task: with one, the task's own table says it all."""
    tasks = [spec for spec in recipe.tasks.values() if any(r["task"] == spec.name for r in rows)]
    if len(tasks) < 2:
        return []
    fused = max(recipe.upstream_sets, key=len)
    singles = [s for s in recipe.upstream_sets if len(s) == 1] if len(fused) > 1 else []
    same = _reference_variant(recipe)
    lines = ["## Across tasks: does the paper's ordering hold?", "",
             f"Per task, its metric in % (mean ± std over seeds). Interfaces are ranked on the fused set "
             f"{upstream_set_name(fused)}, upstream sets with one interface for all ({same}: single upstreams "
             f"train only the first merge). The paper's ordering: HConv over the weighted sum (under each merge), "
             f"and the fused set over each single upstream. A difference counts when the two `mean ± std` ranges "
             f"do not overlap; otherwise it is within the seed spread.", "",
             "| task | interfaces, best first | upstream sets, best first | HConv over weighted sum | "
             "fused over each single |", "|---|---|---|---|---|"]
    sentences = []
    for spec in tasks:
        metric, lower = _primary(spec)
        task_rows = [r for r in rows if r["task"] == spec.name and r["ours"] is not None]
        on_fused = [r for r in task_rows if r["upstreams"] == upstream_set_name(fused)]
        by_set = [r for r in task_rows if r["variant"] == same]
        hconv = [(merge, _verdict(_find(on_fused, variant_name("hconv", merge)),
                                  _find(on_fused, variant_name("weighted-sum", merge)), lower))
                 for merge in recipe.merge]
        over = [(upstream_set_name(s), _verdict(_find(by_set, upstream_set_name(fused), "upstreams"),
                                                _find(by_set, upstream_set_name(s), "upstreams"), lower))
                for s in singles]
        sets = "; ".join(f"{name}: {v[0]}" for name, v in over) or (
            "no single upstream in the grid" if len(fused) > 1 else "no fused set in the grid")
        lines.append(f"| {spec.name} ({metric}, {'lower' if lower else 'higher'} is better) | "
                     f"{_ranking(on_fused, 'variant', lower)} | {_ranking(by_set, 'upstreams', lower)} | "
                     f"{'; '.join(f'{merge}: {v[0]}' for merge, v in hconv)} | {sets} |")
        said = [f"HConv over the weighted sum ({merge}) {v[1]}" for merge, v in hconv]
        said += [f"the fused set over {name} {v[1]}" for name, v in over]
        sentences.append(f"- **{spec.name}**: " + "; ".join(said) + ".")
    return lines + [""] + sentences + [""]


VERDICTS = ("holds", "reversed", "within the seed spread")


def _verdict(claimed: dict | None, other: dict | None, lower: bool) -> tuple[str, str]:
    """Whether ``claimed`` (what the paper found better) beats ``other``: (verdict, the verdict with its
    numbers). With one seed there is no spread, and the verdict says so."""
    if claimed is None or other is None:
        return "not run", "was not run (a variant or upstream set missing)"
    a, b = claimed["ours"], other["ours"]
    spread = None if claimed["ours_std"] is None or other["ours_std"] is None else claimed["ours_std"] + other["ours_std"]
    better = a < b if lower else a > b
    if spread is not None and abs(a - b) <= spread:
        verdict = VERDICTS[2]
    else:
        verdict = VERDICTS[0] if better else VERDICTS[1]
    numbers = f"{_pm(claimed)} vs {_pm(other)}" + ("" if spread is not None else ", one seed: no spread to judge by")
    return verdict, f"{verdict} ({numbers})"


def _reference_variant(recipe: Recipe) -> str:
    """The variant every upstream set trains, to compare sets by: HConv (the paper's) under the first merge."""
    return variant_name("hconv" if "hconv" in recipe.fusion else recipe.fusion[0], recipe.merge[0])


def _find(rows: list[dict], value: str, key: str = "variant") -> dict | None:
    return next((r for r in rows if r[key] == value), None)


def _ranking(rows: list[dict], key: str, lower: bool) -> str:
    ranked = sorted(rows, key=lambda r: r["ours"] if lower else -r["ours"])
    return ", ".join(f"{r[key]} {_pm(r)}" for r in ranked) or "—"


def _pm(row: dict) -> str:
    return _fmt(row["ours"]) + (f" ± {_fmt(row['ours_std'])}" if row["ours_std"] is not None else "")


def _seed_list(spec: TaskSpec) -> str:
    return "seeds " + ", ".join(str(x) for x in spec.settings.get("seeds") or [])


def layer_pictures(plan: Plan, out: Path) -> list[tuple[str, Path, str]]:
    """(title, PNG, sentence) per task x upstream set (the layer use of its variants, first fold) and per
    upstream set (the CKA of its upstreams' layers). Each run's analysis is kept in <run>/analysis and
    each set's CKA in <results>/analysis/cka-<set>, so a rerun of the report reads them back."""
    from fusionpipe.analyze.cka import layer_similarity, read_similarity, write_similarity
    from fusionpipe.analyze.use import describe_use, layer_use, plot_layer_use, read_layer_use, write_layer_use
    from fusionpipe.errors import FusionpipeError

    found = []
    for spec in plan.recipe.tasks.values():
        metric, _ = _primary(spec)
        for upstreams in plan.recipe.upstream_sets:
            x = next((x for x in plan.runs if x.task is spec and x.upstreams == upstreams
                      and RunDir(x.out).finished(x.names)), None)
            if x is None:
                continue
            where = x.out / "analysis"
            if (where / "layer-use.csv").is_file():
                rows = read_layer_use(where)
            else:
                try:
                    rows = layer_use(x.out, device=x.config.get("device", "auto"))
                except FusionpipeError:  # no dev stores: the test stores, else the weights alone
                    rows = (layer_use(x.out, x.test_stores, x.test_manifest, x.test_trials, x.config.get("device",
                            "auto")) if x.test_stores else layer_use(x.out, knockout=False))
                write_layer_use(rows, where, metric, title=x.label)
            picture = out / f"{spec.name}-{upstream_set_name(upstreams)}-layer-use.png"
            plot_layer_use(rows, picture, metric, title=x.label)
            found.append((f"layer use: {x.label}", picture, describe_use(rows, metric)))
    for upstreams in plan.recipe.upstream_sets:
        x = next((x for x in plan.runs if x.upstreams == upstreams), None)
        stores = x.config.get("stores") if x is not None else None
        if not stores:
            continue
        where = out / "analysis" / f"cka-{upstream_set_name(upstreams)}"
        try:
            sim = read_similarity(where) if (where / "cka.csv").is_file() else layer_similarity(stores)
        except FusionpipeError:
            continue  # stores not complete: no picture rather than no report
        write_similarity(sim, where, title=f"layer CKA: {upstream_set_name(upstreams)} ({sim.manifest}, {sim.frames} frames)")
        found.append((f"layer CKA: {upstream_set_name(upstreams)}", where / "cka.png", describe_similarity(sim)))
    return found


def describe_similarity(sim) -> str:
    """A sentence per pair of upstreams: the mean best-match CKA, and what it suggests."""
    said = []
    for r in sim.summary():
        if r["upstream_a"] == r["upstream_b"]:
            continue
        x = r["mean_best_match"]
        kind = ("largely the same representations (little to gain from fusing)" if x > 0.8 else
                "partly alike layers" if x > 0.5 else "mostly different representations (complementary)")
        said.append(f"{r['upstream_a']} and {r['upstream_b']}: mean best-match CKA {x:.2f}, most alike pair of "
                    f"layers {r['max']:.2f}: {kind}")
    within = [r for r in sim.summary() if r["upstream_a"] == r["upstream_b"] and r["mean"] == r["mean"]]
    said += [f"within {r['upstream_a']}: mean CKA between its layers {r['mean']:.2f}" for r in within]
    return "; ".join(said) + f" ({sim.frames} frames, {sim.estimator} CKA)."


def _int(v) -> str:
    return "" if v is None else f"{v:,}"


def _plot(recipe: Recipe, rows: list[dict], out: Path) -> list[Path]:
    """Per task: <task>-<metric>.png (bars: upstream set x variant) and <task>-loss.png (curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for spec in recipe.tasks.values():
        task_rows = [r for r in rows if r["task"] == spec.name and r["ours"] is not None]
        if not task_rows:
            continue
        metric, lower = _primary(spec)
        sets = [upstream_set_name(s) for s in recipe.upstream_sets if any(r["upstreams"] == upstream_set_name(s) for r in task_rows)]
        variants = [v for v in (variant_name(*fms) for fms in variant_grid(recipe.fusion, recipe.merge))
                    if any(r["variant"] == v for r in task_rows)]
        width = 0.8 / len(variants)
        colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(variants))]
        fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(sets) + 3.5), 4))
        for i, v in enumerate(variants):
            xs, ys, errs = [], [], []
            for j, s in enumerate(sets):
                r = next((r for r in task_rows if r["upstreams"] == s and r["variant"] == v), None)
                if r is not None:
                    xs.append(j - 0.4 + (i + 0.5) * width)
                    ys.append(r["ours"])
                    errs.append(r["ours_std"] or 0.0)
            ax.bar(xs, ys, width, label=v, color=colors[i], yerr=errs if any(e > 0 for e in errs) else None,
                   capsize=2)
        ax.set_xticks(range(len(sets)), [s.replace("+", "+\n") for s in sets], fontsize=8)
        ax.set_ylabel(f"{metric} % ({'lower' if lower else 'higher'} is better)")
        seeds = max(r["seeds"] for r in task_rows)
        ax.set_title(f"{recipe.name}: {spec.name} ({task_rows[0]['split']}"
                     + (f"; mean ± std over {seeds} seeds)" if seeds > 1 else ")"))
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        path = out / f"{spec.name}-{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

        fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.2), squeeze=False, sharey=True)
        for ax, s in zip(axes[0], sets):
            for r in task_rows:
                if r["upstreams"] == s and r["log"].is_file():
                    steps, losses = read_losses(r["log"])
                    ax.plot(steps, _smooth(losses), label=r["variant"], color=colors[variants.index(r["variant"])],
                            linewidth=1)
            ax.set_title(s, fontsize=8)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("training loss (running mean)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{recipe.name}: {spec.name} learning curves"
                     + (f" (fold {spec.folds[0]})" if spec.folds else ""))
        fig.tight_layout()
        path = out / f"{spec.name}-loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _smooth(values: list[float]) -> list[float]:
    """Running mean over about 1/40 of the curve: per-batch losses are noisy."""
    w = max(1, len(values) // 40)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - w] if i >= w else 0.0)
        out.append(total / min(i + 1, w))
    return out

