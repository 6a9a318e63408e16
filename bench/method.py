"""Method benchmark: does every interface learn, on every seed, on REAL features, with the default options?

    python /work/shared/tools/real_whisper_base.py /path/real-whisper-base   # builds the real checkpoint
    python bench/method.py --model /path/real-whisper-base                  # 10 seeds, asr + classify
    python bench/method.py --model ... --seeds 5 --asr-steps 300 --tasks asr # what fits a 2-core CPU in ~1 h
    python bench/method.py --model ... --interface-option standardize=false  # the reference interfaces
    python bench/method.py --model ... --tasks asr --paper --device cuda --asr-steps 5000 --eval-every 250
                                                                  # the paper's ASR head and lr (a GPU's job)
    python bench/method.py --model ... --diagnose                            # what holds HConv on the plateau
    python bench/method.py --model toy-whisper --work /tmp/toy --diagnose    # the same on a random-weight toy

Real pretrained Whisper-base is extracted over the bundled corpus once (demo-train / -dev / -test, cached
under --work). Then HConv, weighted sum and Gumbel train with every option at its default (the demo
head and learning rate, as `fusionpipe train` with no flags), all seeds in ONE pass, dev-evaluated
every --eval-every steps, best.pt (asr: by dev CER, as WER ties near 1 on this small corpus) scored on
demo-test. Printed per task:
  - each interface's test metric, mean +- sd over seeds, and the per-seed values;
  - asr: the step at which each seed leaves the CTC blank plateau (first dev evaluation with CER < 0.9),
    against the weighted sum's median; the seeds the plateau detector found stuck.
--diagnose: for HConv and weighted sum, as the reference (standardize=false, output_norm=false), with
standardize only, and with the defaults (seed 0): the interface output's scale, its share of
frame-to-frame (temporal) variance and its dead units (before output_norm), the scale of the head's
input projection, the share of saturated LSTM input gates (|pre-activation| > 4), the share of probe
frames decoded blank, gradient norms reaching the interface and the head, at initialisation and over
the first steps (docs/method.md, "The blank plateau").
Random-weight toys never show the plateau; this bench needs the real checkpoint (skipped without it).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionpipe.extract.stage import extract  # noqa: E402
from fusionpipe.fuse.loader import make_loader  # noqa: E402
from fusionpipe.manifest import bundled_manifests  # noqa: E402
from fusionpipe.train.config import TrainConfig  # noqa: E402
from fusionpipe.train.defaults import DEMO  # noqa: E402
from fusionpipe.train.interfaces import Interface  # noqa: E402
from fusionpipe.train.evaluation import evaluate  # noqa: E402
from fusionpipe.train.loop import STATISTICS_FRAMES, train  # noqa: E402
from fusionpipe.train.variant import VariantModel  # noqa: E402
from fusionpipe.train.tasks import batch_targets, build_task  # noqa: E402

LEFT = 0.9  # a seed has left the CTC blank plateau at its first dev evaluation with CER (PER) below this
METRIC = {"asr": "cer", "phoneme": "per", "classify": "accuracy"}  # what each task is judged by here


def stores(model: str, work: Path) -> dict[str, str]:
    out = {}
    for m in bundled_manifests():  # demo-train, demo-dev, demo-test
        out[m.name] = extract(m, model, work / "cache", device="cpu", progress=False).url
    return out


def dev_curve(run: Path, variant: str, metric: str) -> list[tuple[int, float]]:
    with open(run / variant / "log.csv") as f:
        return [(int(r["step"]), json.loads(r["metrics"])[metric]) for r in csv.DictReader(f) if r["metrics"]]


def paper_asr() -> dict:
    """The paper recipe's ASR head and learning rate (stages/paper-table1-librispeech.yaml)."""
    from fusionpipe.ablate import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "stages" / "paper-table1-librispeech.yaml")
    settings = recipe.tasks["asr"].settings
    return {"head_options": settings["head_options"], "lr": settings.get("lr", TrainConfig.lr)}


def seeds_table(task: str, s: dict[str, str], seeds: list[int], steps: int, eval_every: int, fusions: list[str],
                options: dict, work: Path, paper: bool = False, device: str = "cpu") -> None:
    metric, ctc = METRIC[task], task in ("asr", "phoneme")
    head = DEMO["head_options"] if ctc else {"proj": DEMO["head_options"]["proj"]}
    lr = DEMO["lr"]
    if paper:
        head, lr = paper_asr()["head_options"], paper_asr()["lr"]
    tag = _tag(options).replace(", ", "-") + ("-paper" if paper else "")
    out = work / (f"run-{task}-{tag}-{len(seeds)}seeds-{steps}" + (f"-{metric}" if ctc else ""))
    cfg = TrainConfig(stores=[s["demo-train"]], dev_stores=[s["demo-dev"]], task=task, fusion=fusions, merge=["add"],
                      out=str(out), steps=steps, eval_every=eval_every, lr=lr, max_frames=2000,
                      head_options=head, interface_options=options, seeds=seeds, device=device,
                      select=metric if ctc else None)  # WER ties near 1 on this corpus (stages/ablation.yaml)
    t0 = time.perf_counter()
    results = train(cfg, resume=(out / "config.json").exists(), progress=False)
    seconds = time.perf_counter() - t0
    test = evaluate(out, [s["demo-test"]], device=device)
    print(f"\n### {task}: {len(fusions)} interfaces x {len(seeds)} seeds in one pass, {steps} steps "
          f"({seconds / 60:.0f} min on {device}), lr {lr}, head {head}, interface options {tag}; test {metric}\n")
    print(f"| interface | mean +- sd | per seed ({', '.join(map(str, seeds))}) |" +
          (" leaves the plateau at step (per seed) | stuck (detector) |" if ctc else ""))
    print("|---|---|---|" + ("---|---|" if ctc else ""))
    left = {}
    for fusion in fusions:
        names = [f"{fusion}-add@s{seed}" for seed in seeds]
        values = [test[n][metric] for n in names]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")  # one seed has no spread
        row = f"| {fusion} | {statistics.mean(values):.3f} +- {spread:.3f} | " \
              f"{', '.join(f'{v:.3f}' for v in values)} |"
        if ctc:
            left[fusion] = [next((st for st, err in dev_curve(out, n, metric) if err < LEFT), None) for n in names]
            stuck = [str(seed) for seed, n in zip(seeds, names) if results[n].get("plateau", {}).get("stuck")]
            row += f" {', '.join('never' if x is None else str(x) for x in left[fusion])} | {', '.join(stuck) or 'none'} |"
        print(row)
    if ctc and "weighted-sum" in left and all(x is not None for x in left["weighted-sum"]):
        ws = statistics.median(left["weighted-sum"])
        for fusion, steps_left in left.items():
            late = [seed for seed, x in zip(seeds, steps_left) if x is None or x > 1.5 * ws]
            print(f"\n{fusion}: {len(seeds) - len(late)} of {len(seeds)} seeds leave the plateau by 1.5 x the weighted "
                  f"sum's median step ({ws:g} -> {1.5 * ws:g}); late or never: {late or 'none'}", end="")
        print()


def diagnose(s: dict[str, str], steps: int) -> None:
    """The figures of docs/method.md "The blank plateau": reference vs standardized, HConv vs weighted sum."""
    torch.manual_seed(0)
    loader = make_loader([s["demo-train"]], max_frames=2000, shuffle=True, seed=0)
    view = loader.dataset.view
    task = build_task("asr", batch_targets(loader.dataset.rows))
    probe = next(iter(make_loader([s["demo-train"]], max_frames=2000)))
    stats = view.layer_stats(max_frames=STATISTICS_FRAMES)
    print("\n### What happens in the first steps (asr, demo head, lr 2e-3, seed 0; probe: the first train batch)\n")
    print("| interface | options | step | loss | output rms | temporal share | dead units | head proj rms | "
          "saturated gates | frames blank | grad interface | grad head |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for fusion in ("hconv", "weighted-sum"):
        for options in ({"standardize": False, "output_norm": False}, {"output_norm": False}, {}):
            torch.manual_seed(0)
            interface = Interface(view.dims, view.num_layers, fusion=fusion, merge="add", **options)
            interface.set_statistics(stats)
            model = VariantModel(interface, task.build_head(interface.out_dim, **DEMO["head_options"]))
            opt = torch.optim.Adam(model.parameters(), lr=DEMO["lr"])
            row = lambda step, loss, grads: print(  # noqa: E731
                f"| {fusion} | {_tag(options)} | {step} | {loss} | " + " | ".join(
                    f"{x:.3g}" for x in (*probe_stats(model, probe).values(), *grads)) + " |", flush=True)
            row(0, "", (float("nan"), float("nan")))
            step, epoch = 0, 0
            while step < steps:
                loader.batch_sampler.set_epoch(epoch)
                epoch += 1
                for batch in loader:
                    loss = task.loss(model.head, model.features(batch["stacks"], batch["lengths"]), batch["lengths"],
                                     batch_targets(batch["rows"]))
                    opt.zero_grad()
                    loss.backward()
                    grads = [torch.nn.utils.clip_grad_norm_(m.parameters(), float("inf")).item()
                             for m in (model.interface, model.head)]
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    step += 1
                    if step in (1, 10, 25, 50, 100, 200, 300, 400):
                        row(step, f"{loss.item():.2f}", grads)
                    if step >= steps:
                        break


def _tag(options: dict) -> str:
    return ", ".join(f"{k}={str(v).lower()}" for k, v in sorted(options.items())) or "default"


@torch.no_grad()
def probe_stats(model: VariantModel, batch: dict) -> dict[str, float]:
    model.eval()
    lengths = batch["lengths"]
    norm, model.interface.output_norm = model.interface.output_norm, False
    raw = model.features(batch["stacks"], lengths)  # (B, T, D): the interface's own output, before output_norm
    model.interface.output_norm = norm
    f = model.features(batch["stacks"], lengths)  # what the head reads
    mask = torch.arange(f.shape[1])[None] < lengths[:, None]
    valid = raw[mask]
    within = sum(((raw[b, :n] - raw[b, :n].mean(0)) ** 2).sum() for b, n in enumerate(lengths.tolist()))
    p = model.head.proj(f)[mask]
    lstm = model.head.lstm.forward_lstms[0]
    gates = p @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + lstm.bias_hh_l0
    blank = (model.head(f, lengths).output.argmax(-1)[mask] == 0).float().mean()
    model.train()
    return {"rms": valid.square().mean().sqrt().item(), "temporal": (within / valid.square().sum()).item(),
            "dead": (valid.abs().amax(0) == 0).float().mean().item(), "proj": p.square().mean().sqrt().item(),
            "saturated": (gates.abs() > 4).float().mean().item(), "blank": blank.item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="real Whisper-base directory (shared/tools/real_whisper_base.py)")
    ap.add_argument("--work", default="/tmp/fp-bench-method")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--tasks", default="asr,classify", help="asr, phoneme, classify (comma-separated)")
    ap.add_argument("--fusions", default="hconv,weighted-sum,gumbel")
    ap.add_argument("--asr-steps", type=int, default=600)
    ap.add_argument("--classify-steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--interface-option", action="append", default=[], help="k=v, e.g. standardize=false")
    ap.add_argument("--paper", action="store_true", help="asr with the paper recipe's head and lr (a GPU's job)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--diagnose-steps", type=int, default=200)
    args = ap.parse_args()
    if not args.model or not (Path(args.model).is_dir() or args.model.startswith("toy-")):
        print("bench/method.py needs the real Whisper-base checkpoint (--model DIR, built by "
              "shared/tools/real_whisper_base.py): random-weight models never show the blank plateau. Skipped.")
        return
    torch.set_num_threads(1)
    work = Path(args.work)
    s = stores(args.model, work)
    if args.diagnose:
        diagnose(s, args.diagnose_steps)
        return
    options = {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.interface_option)}
    for task in args.tasks.split(","):
        steps = args.asr_steps if task in ("asr", "phoneme") else args.classify_steps
        seeds_table(task, s, list(range(args.seeds)), steps, args.eval_every, args.fusions.split(","), options, work,
                    paper=args.paper and task == "asr", device=args.device)


if __name__ == "__main__":
    main()
