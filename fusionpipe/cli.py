"""The `fusionpipe` command: typer options -> one library call each. Errors print without a traceback."""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

import typer

from fusionpipe import codecs
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract import defaults as extract_defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Model and layer fusion of frozen speech foundation models.")
manifest_app = typer.Typer(no_args_is_help=True, help="Make manifests (TSV) from corpora on disk.")
app.add_typer(manifest_app, name="manifest")


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _manifests(paths: Optional[List[Path]]):
    """The manifests named, or the bundled demo corpus's splits when none is."""
    from fusionpipe.manifest import bundled_manifests, read_manifest

    if paths:
        return [read_manifest(p) for p in paths]
    found = bundled_manifests()
    if not found:
        raise FusionpipeError("no --manifest given and the bundled demo corpus is not installed; pass --manifest FILE.tsv")
    _say(f"no --manifest given: using the bundled demo corpus ({', '.join(m.name for m in found)})")
    return found


# ---- manifests ------------------------------------------------------------------------------
@manifest_app.command("librispeech")
def manifest_librispeech(root: Path, split: str = typer.Option(..., help="e.g. train-clean-100"),
                         out: Path = typer.Option(Path("manifests"), help="directory for the TSV"),
                         lexicon: Optional[List[Path]] = typer.Option(
                             None, help="pronunciation lexicon (librispeech-lexicon.txt format; repeatable, the first "
                                        "pronunciation wins): also write the phonemes column")):
    """LibriSpeech tree -> manifests/librispeech-<split>.tsv (speaker, text; phonemes with --lexicon)."""
    from fusionpipe.manifest import write_manifest
    from fusionpipe.corpora.librispeech import import_librispeech

    m = import_librispeech(root, split, lexicon or ())
    typer.echo(f"{write_manifest(m, out / f'{m.name}.tsv')}: {len(m)} utterances, {m.duration / 3600:.2f} h")


@manifest_app.command("speechcommands")
def manifest_speechcommands(root: Path, out: Path = typer.Option(Path("manifests"), help="directory for the TSVs")):
    """Speech Commands v0.01 -> speechcommands-{train,dev,test}.tsv (SUPERB KS's 12 labels, speaker, split by
    the official lists); the _silence_ clips are cut into <out>/speechcommands-silence/."""
    from fusionpipe.manifest import write_manifest
    from fusionpipe.corpora.speechcommands import import_speechcommands

    for m in import_speechcommands(root, out / "speechcommands-silence").values():
        typer.echo(f"{write_manifest(m, out / f'{m.name}.tsv')}: {len(m)} utterances, {m.duration / 3600:.2f} h")


@manifest_app.command("folder")
def manifest_folder(root: Path, name: Optional[str] = typer.Option(None, help="manifest name (default: folder name)"),
                    out: Path = typer.Option(Path("manifests"), help="directory for the TSV")):
    """Any audio tree (recursive; transcripts from <stem>.txt or a root transcripts.tsv) -> manifest."""
    from fusionpipe.manifest import write_manifest
    from fusionpipe.corpora.folder import import_folder

    m = import_folder(root, name)
    typer.echo(f"{write_manifest(m, out / f'{m.name}.tsv')}: {len(m)} utterances, {m.duration / 3600:.2f} h")


@manifest_app.command("voxceleb")
def manifest_voxceleb(root: Path,
                      trials: Optional[Path] = typer.Option(None, help="official list, e.g. veri_test2.txt"),
                      out: Path = typer.Option(Path("manifests"), help="directory for the TSVs")):
    """VoxCeleb1 wav tree -> voxceleb1-dev.tsv, voxceleb1-test.tsv (speaker) and voxceleb1-trials.txt."""
    from fusionpipe.manifest import write_manifest
    from fusionpipe.corpora.voxceleb import import_voxceleb, write_trials

    manifests = import_voxceleb(root, trials)
    for m in manifests.values():
        typer.echo(f"{write_manifest(m, out / f'{m.name}.tsv')}: {len(m)} utterances, {m.duration / 3600:.2f} h")
    if trials is not None:
        typer.echo(f"{write_trials(trials, out / 'voxceleb1-trials.txt', manifests['voxceleb1-test'])}: trial list")


@manifest_app.command("iemocap")
def manifest_iemocap(root: Path, dev_ratio: float = typer.Option(0.2, help="dev share of the training sessions"),
                     out: Path = typer.Option(Path("manifests"), help="directory for the TSVs")):
    """IEMOCAP -> iemocap.tsv (4 classes, speaker, session) and iemocap-fold{1..5}-{train,dev,test}.tsv."""
    from fusionpipe.manifest import write_manifest
    from fusionpipe.corpora.iemocap import iemocap_folds, import_iemocap

    m = import_iemocap(root)
    for x in [m, *iemocap_folds(m, dev_ratio).values()]:
        typer.echo(f"{write_manifest(x, out / f'{x.name}.tsv')}: {len(x)} utterances, {x.duration / 3600:.2f} h")


@manifest_app.command("mlsuperb")
def manifest_mlsuperb(root: Path, duration: str = typer.Option("1h", help="training set: 1h or 10min"),
                      out: Path = typer.Option(Path("manifests"), help="directory for the TSVs")):
    """ML-SUPERB data -> mlsuperb-multi-<duration>-* and mlsuperb-mono-<lang>-<duration>-* (text, language)."""
    from fusionpipe.manifest import write_manifest
    from fusionpipe.corpora.mlsuperb import import_mlsuperb

    for m in import_mlsuperb(root, duration).values():
        typer.echo(f"{write_manifest(m, out / f'{m.name}.tsv')}: {len(m)} utterances, {m.duration / 3600:.2f} h")


@manifest_app.command("librimix")
def manifest_librimix(root: Path,
                      rttm: Optional[List[Path]] = typer.Option(None, help="RTTM file over the mixture wavs under "
                                                                "ROOT (repeat for more); one manifest each"),
                      metadata: Optional[List[Path]] = typer.Option(None, help="LibriMix metadata CSV, e.g. "
                                                                    "metadata/mixture_train_mix_both.csv (repeat)"),
                      out: Path = typer.Option(Path("manifests"), help="directory for the TSVs")):
    """Libri2Mix-style mixtures -> librimix-<file stem>.tsv per RTTM or metadata CSV (turns: who speaks when)."""
    from fusionpipe.manifest import write_manifest
    from fusionpipe.corpora.librimix import import_librimix

    for m in import_librimix(root, rttm or [], metadata or []):
        typer.echo(f"{write_manifest(m, out / f'{m.name}.tsv')}: {len(m)} mixtures, {m.duration / 3600:.2f} h")


@manifest_app.command("mix")
def manifest_mix(manifest: Path, count: int = typer.Option(100, help="mixtures to make"),
                 overlap: float = typer.Option(0.25, help="overlapped share of each mixture, 0 <= R < 1"),
                 seed: int = typer.Option(0, help="the same seed makes the same mixtures"),
                 out: Path = typer.Option(Path("manifests"), help="directory for the TSV, the RTTM and <name>/ audio"),
                 name: Optional[str] = typer.Option(None, help="manifest name (default: <manifest>-mix)")):
    """Two-speaker mixtures (speaker-labelled MANIFEST) -> <name>.tsv (turns), <name>.rttm and <name>/*.flac."""
    from fusionpipe.corpora.mix import check_overlap, mix_manifest, overlap_ratio
    from fusionpipe.manifest import read_manifest, write_manifest
    from fusionpipe.rttm import parse_turns, write_rttm

    check_overlap(overlap)
    source = read_manifest(manifest)
    name = name or f"{source.name}-mix"
    m = mix_manifest(source, count, overlap, seed, out / name, name)
    typer.echo(f"{write_manifest(m, out / f'{name}.tsv', root=name)}: {len(m)} mixtures, {m.duration / 3600:.2f} h, "
               f"overlap {sum(overlap_ratio(u.turns) for u in m) / len(m):.3f}")
    typer.echo(f"{write_rttm(out / f'{name}.rttm', {u.id: parse_turns(u.turns) for u in m})}: reference turns")


# ---- stage 1 --------------------------------------------------------------------------------
@app.command()
def models():
    """The upstream registry: alias, HF id, layers (L), hidden size (D), frame rate."""
    from fusionpipe.extract.registry import list_upstreams

    typer.echo(f"{'alias':<18} {'hf id':<34} {'L':>3} {'D':>5} {'Hz':>5}")
    for s in list_upstreams():
        typer.echo(f"{s.alias:<18} {s.hf_id:<34} {s.num_layers:>3} {s.hidden_size:>5} {s.frame_rate:>5g}")


@app.command()
def extract(
    model: str = typer.Option(..., help="alias (see `fusionpipe models`), HF id or local directory; comma list ok"),
    manifest: Optional[List[Path]] = typer.Option(None, help="manifest TSV (repeatable; default: bundled demo)"),
    cache: str = typer.Option("cache", help="root of the feature stores: a directory or any fsspec URL (s3://...)"),
    device: str = typer.Option("auto", help="auto (cuda if present), cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option(extract_defaults.DTYPE, help="storage dtype: float16 or float32"),
    codec: str = typer.Option(codecs.DEFAULT_CODEC, help=codecs.help_text()),
    max_seconds: float = typer.Option(extract_defaults.MAX_SECONDS, help="padded audio seconds per batch"),
    chunk_frames: Optional[int] = typer.Option(None, help="frames per Zarr chunk (default: about 4 MB)"),
    skip_bad: bool = typer.Option(False, help="record unusable utterances and go on instead of stopping"),
    overwrite: bool = typer.Option(False, help="replace a store that holds another extraction"),
    wait: bool = typer.Option(False, help="when another process is extracting into the same store, wait for it "
                                          "(default: stop and say who holds it)"),
    processes: Optional[int] = typer.Option(None, help="reader and writer processes beside the one running the "
                                            "upstream (0: threads of that process; default: 0 on a CPU, the "
                                            "cores less one on a GPU)"),
    cluster: Optional[str] = typer.Option(None, help="'local': run the upstream on a Dask LocalCluster"),
    workers: Optional[int] = typer.Option(None, help="LocalCluster worker processes (default: one per GPU, or 1)"),
    scheduler: Optional[str] = typer.Option(None, help="run on an existing Dask cluster: tcp://HOST:8786"),
    unit_seconds: float = typer.Option(1800.0, help="audio seconds per cluster work unit (retried as a whole)"),
):
    """STAGE 1: cache every hidden layer of each upstream over each manifest (resumes after a crash)."""
    manifests = _manifests(manifest)
    models = [m.strip() for m in model.split(",") if m.strip()]
    options = dict(dtype=dtype, codec=codec, max_seconds=max_seconds, skip_bad=skip_bad, overwrite=overwrite,
                   chunk_frames=chunk_frames, wait=wait)
    if workers is not None and cluster is None:
        raise FusionpipeError("--workers sizes a LocalCluster: add --cluster local (or drop --workers)")
    if processes is not None and (cluster is not None or scheduler is not None):
        raise FusionpipeError("--processes is for one machine's extraction; a cluster's workers decode and write "
                              "in threads (drop --processes, or --cluster/--scheduler)")
    from fusionpipe.extract import stage

    stage.check_settings(dtype=dtype, codec=codec, max_seconds=max_seconds, processes=processes)
    if cluster is None and scheduler is None:
        from fusionpipe.extract.upstreams import load_upstream

        for name in models:
            upstream = load_upstream(name, device=device)
            for m in manifests:
                typer.echo(stage.extract(m, upstream, cache, processes=processes, **options).summary())
        return
    from fusionpipe.extract.cluster import connect, extract_on_cluster

    with connect(cluster, workers, scheduler) as (client, threads):
        for name in models:
            for m in manifests:
                r = extract_on_cluster(m, name, client, cache, device=device, unit_seconds=unit_seconds,
                                       threads=threads, **options)
                typer.echo(r.summary())


@app.command()
def inspect(store: str = typer.Argument(..., help="store directory or URL (memory://, s3://...)"),
            as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Shape, layers, dtype, codec, size, bytes per audio-second, completeness, fingerprint of a store."""
    from fusionpipe.store import FeatureStore
    from fusionpipe.integrity import describe

    d = describe(FeatureStore.open(store))
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    up, mf = d.pop("upstream") or {}, d.pop("manifest") or {}
    skipped = d.pop("skipped")
    error = d.pop("measured_error")
    for k, v in d.items():
        typer.echo(f"{k:<22} {v}")
    if error:  # lossy codecs: measured by the writer against the values before encoding
        per_layer = " ".join(f"{e:.2%}" for e in error["relative_error_per_layer"])
        typer.echo(f"{'measured_error':<22} ||decoded - x|| / ||x||: mean {error['relative_error_mean']:.2%}, max "
                   f"{error['relative_error_max']:.2%} over layers ({per_layer}); over "
                   f"{error['chunks_measured']} chunks")
    typer.echo(f"{'upstream':<22} {up.get('name')} ({up.get('model_id')} @ {str(up.get('revision'))[:12]}) "
               f"L={up.get('num_layers')} D={up.get('hidden_size')} {up.get('frame_rate')} Hz")
    typer.echo(f"{'manifest':<22} {mf.get('name')} ({mf.get('utterances')} rows, sha256 {str(mf.get('sha256'))[:12]})")
    typer.echo(f"{'skipped':<22} {len(skipped)}")
    for utt, reason in skipped.items():
        typer.echo(f"  {utt}: {reason}")


@app.command()
def verify(store: str = typer.Argument(..., help="store directory or URL (memory://, s3://...)"),
           repair: bool = typer.Option(False, help="delete the bad chunks (and stray files) so that a rerun of "
                                                    "`fusionpipe extract` recomputes exactly them")):
    """Check a store against its fingerprint: metadata, index, and every chunk (present, checksum, finite).

    Exit 1 on any fault. With --repair, bad chunks are deleted and the command to recompute them printed.
    """
    from fusionpipe.errors import redact
    from fusionpipe.store import IDENTITY, FeatureStore
    from fusionpipe.store_lock import lock
    from fusionpipe.integrity import check_store as check

    shown = redact(store)
    with lock(store) if repair else nullcontext():
        opened = FeatureStore.open(store, mode="r+" if repair else "r")
        faults = check(opened, repair=repair)
    for f in faults:
        typer.echo(f"FAULT {f}")
    if opened.info.format == 1:
        typer.echo(f"note: {shown} is a format-1 store: its chunks carry no checksum, so a flipped bit can go "
                   "undetected; re-extract with --overwrite to add them")
    elif IDENTITY not in opened.attrs:
        typer.echo(f"note: {shown} was written before stores recorded their attributes' digest and each chunk's "
                   "place: an edited attribute or a chunk moved within the store can go undetected; re-extract "
                   "with --overwrite to add them")
    if faults:
        if repair:
            typer.echo(f"repaired what deleting chunks can repair: rerun `fusionpipe extract` with the same "
                       f"--model, --manifest and --cache to recompute them ({shown})")
        raise typer.Exit(1)
    typer.echo(f"{shown}: ok")


# ---- stage 2 --------------------------------------------------------------------------------
@app.command()
def fuse(
    stores: List[str] = typer.Option(..., help="feature store (repeatable, or a comma list)"),
    merge: Optional[str] = typer.Option(None, help="add or concat (default: no merge, per-store stacks)"),
    align_time: str = typer.Option("max", help="common T per utterance: max (upsample) or min"),
    align_layers: str = typer.Option("interpolate", help="interpolate (to the largest L) or none (equal L)"),
    skip_missing: bool = typer.Option(False, help="leave out utterances not usable in every store"),
    describe: bool = typer.Option(False, help="print the view: stores, target L and T, merge, bytes per batch"),
    write: Optional[Path] = typer.Option(None, help="materialise the merged view as a feature store here"),
    codec: str = typer.Option("zstd", help="codec of the --write store"),
    overwrite: bool = typer.Option(False, help="replace an existing --write store"),
):
    """STAGE 2: align stores of one manifest to a common L and T and merge them (lazily; --write materialises)."""
    from fusionpipe.fuse.view import open_fused

    urls = [s.strip() for value in stores for s in value.split(",") if s.strip()]
    view = open_fused(urls, merge=merge, align_time=align_time, align_layers=align_layers, skip_missing=skip_missing)
    if describe or write is None:
        typer.echo(json.dumps(view.describe(), indent=2))
    if write is not None:
        out = view.write(write, codec=codec, overwrite=overwrite)
        typer.echo(f"{out}: {len(out)} utterances, {out.total_frames} frames, L={out.num_layers} "
                   f"D={out.hidden_size} ({out.info.upstream})")


def _list(values: Optional[List[str]]) -> List[str]:
    """Repeatable options that also take comma lists: --fusion hconv,weighted-sum."""
    return [x.strip() for v in values or [] for x in str(v).split(",") if x.strip()]


def _numbers(text: str | None, flag: str, kind=float) -> list | None:
    """"2,8" -> [2.0, 8.0]; with kind=int, "0,1,2" -> [0, 1, 2]."""
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        what, example = ("whole numbers", "0,1,2") if kind is int else ("numbers", "2,8")
        raise FusionpipeError(f"{flag}: expected {what} separated by commas, e.g. {example}; got {text!r}") from None


def _options(pairs: Optional[List[str]]) -> dict:
    """--head-option hidden=64 --head-option layers=1 -> {"hidden": 64, "layers": 1} (ints, floats, booleans
    parsed)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise FusionpipeError(f"option {pair!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# ---- stage 3 --------------------------------------------------------------------------------
@app.command()
def train(
    stores: Optional[List[str]] = typer.Option(None, help="train stores (repeat or comma list; default: demo cache)"),
    dev_stores: Optional[List[str]] = typer.Option(None, help="dev stores, same upstreams, in the same order "
                                                    "(default: none; the train stores with --dev-manifest)"),
    manifest: Optional[Path] = typer.Option(None, help="train on these rows of the stores, with its labels (default: "
                                            "all, as extracted): e.g. one fold of a corpus extracted whole"),
    dev_manifest: Optional[Path] = typer.Option(None, help="evaluate on these rows of the dev stores"),
    task: Optional[str] = typer.Option(None, help="asr, classify, verify, multilingual, phoneme, diarize "
                                       "(default: from the manifest)"),
    fusion: List[str] = typer.Option(["hconv"], help="interfaces: hconv, weighted-sum, gumbel, last-layer, single-layer"),
    merge: List[str] = typer.Option(["concat"], help="add, concat (lists: every fusion x merge trains in one pass)"),
    out: Optional[Path] = typer.Option(None, help="run directory (default: runs/<task>-<upstreams>)"),
    cache: Path = typer.Option(Path("cache"), help="store root, for the default stores"),
    steps: Optional[int] = typer.Option(None), eval_every: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None), optimizer: Optional[str] = typer.Option(None, help="adam or adamw"),
    max_frames: Optional[int] = typer.Option(None, help="padded frames per batch"),
    grad_clip: Optional[float] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    seeds: Optional[str] = typer.Option(None, help="several seeds, e.g. 0,1,2: every variant once per seed, all in "
                                        "one pass (variants named <fusion>-<merge>@s<seed>)"),
    specaugment: Optional[bool] = typer.Option(None, "--specaugment/--no-specaugment"),
    crop_seconds: Optional[str] = typer.Option(None, help="train on random crops MIN,MAX seconds (SUPERB SV: 2,8)"),
    select: Optional[str] = typer.Option(None, help="dev metric that picks the best checkpoint (e.g. cer)"),
    head_option: Optional[List[str]] = typer.Option(None, help="head size, key=value (repeatable), e.g. hidden=64"),
    interface_option: Optional[List[str]] = typer.Option(None, help="option of every --fusion, key=value "
                                                         "(repeatable), e.g. normalize=true; standardize=false "
                                                         "output_norm=false: the reference interfaces"),
    trials: Optional[str] = typer.Option(None, help="verify: trial list over the dev utterances"),
    skip_missing: bool = typer.Option(False, help="leave out utterances skipped (--skip-bad) or unfinished in some "
                                                   "store, train and dev (default: stop and say which)"),
    device: str = typer.Option("auto"), num_workers: int = typer.Option(0),
    resume: bool = typer.Option(False, help="continue the run in --out from its last checkpoint, with the flags it "
                                "was trained with (only --steps, --device, --num-workers may change)"),
):
    """STAGE 3: train the interface + task head from the cache; every fusion x merge in one pass.

    --manifest / --dev-manifest choose rows of the stores (ids, with their labels): extract a corpus
    once and train each split or fold from it. Each row must be an utterance the stores hold, the same
    audio (path, num_samples).
    """
    from fusionpipe.train import loop, rundir
    from fusionpipe.train.defaults import from_flags, train_manifest, upstream_names

    given = dict(steps=steps, eval_every=eval_every, lr=lr, optimizer=optimizer, max_frames=max_frames,
                 grad_clip=grad_clip, seed=seed, seeds=_numbers(seeds, "--seeds", int), specaugment=specaugment,
                 crop_seconds=_numbers(crop_seconds, "--crop-seconds"),
                 head_options=_options(head_option) or None, interface_options=_options(interface_option) or None,
                 trials=trials, select=select)
    cfg = from_flags(_list(stores), _list(dev_stores), cache, given, task=task, fusion=_list(fusion),
                     merge=_list(merge), out=str(out) if out else None, device=device, num_workers=num_workers,
                     manifest=str(manifest) if manifest else None,
                     dev_manifest=str(dev_manifest) if dev_manifest else None, skip_missing=skip_missing)
    rows = train_manifest(cfg)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all
    say = _say if main_rank else (lambda _: None)
    say(f"train {cfg.task} on {rows.name} ({len(rows)} utterances) with {upstream_names(cfg.stores)}; "
        f"dev: {len(cfg.dev_stores)} store(s)"
        f"{f' ({Path(dev_manifest).stem})' if dev_manifest else ''}; "
        f"variants {', '.join(rundir.variant_names(cfg))}; {cfg.steps} steps; "
        f"head {cfg.head_options or 'SUPERB'}"
        f" -> {cfg.out}")
    for name, res in loop.train(cfg, resume=resume).items():
        if main_rank:
            typer.echo(f"{name}: {json.dumps(res.get('dev', {}))} params={res['trainable_params']}")


@app.command()
def evaluate(
    run: Path,
    manifest: Optional[Path] = typer.Option(None, help="the utterances (and labels) to evaluate on: its rows of "
                                            "--stores, else its own caches (default: demo-test)"),
    stores: Optional[List[str]] = typer.Option(None, help="the stores to read (default: the caches of --manifest)"),
    cache: str = typer.Option("cache", help="store root (directory or fsspec URL) with the manifest's caches"),
    trials: Optional[str] = typer.Option(None, help="verify: trial list"),
    skip_missing: bool = typer.Option(False, help="leave out utterances skipped (--skip-bad) or unfinished in "
                                                   "some store (the metrics then cover fewer utterances)"),
    device: str = typer.Option("auto"),
):
    """Metrics of a run's best checkpoints on any cached manifest; JSON beside the run + one line each.

    With --stores and --manifest: on the manifest's rows of those stores (e.g. one fold's test set of a
    corpus extracted whole); with --stores alone: on all their utterances.
    """
    from fusionpipe.extract.stage import store_url
    from fusionpipe.manifest import bundled_manifests, read_manifest
    from fusionpipe.store import FeatureStore
    from fusionpipe.train import evaluation
    from fusionpipe.train.rundir import RunDir

    run_dir = RunDir(run)
    run_dir.require()
    cfg = run_dir.config()
    eval_stores = _list(stores)
    if not eval_stores:
        m = read_manifest(manifest) if manifest else bundled_manifests()[-1]
        eval_stores = [store_url(cache, m.name, Path(s).stem) for s in cfg.stores]
        missing = [s for s in eval_stores if not FeatureStore.exists(s)]
        if missing:
            raise FusionpipeError(f"{m.name} is not cached for this run's upstreams ({', '.join(missing)}); "
                                  f"run `fusionpipe extract --manifest {manifest or m.name} --model ...` first, "
                                  "or name stores that hold its utterances (an extraction of the whole corpus) "
                                  "with --stores")
    rows = manifest if stores else None  # else the stores are the manifest's own: all their rows
    label = Path(rows).stem if rows else Path(eval_stores[0]).parent.name
    results = evaluation.evaluate(run, eval_stores, trials=trials or cfg.trials, device=device, manifest=rows,
                                  skip_missing=skip_missing, label=label)
    run_dir.write_eval(label, results)
    for name, metrics in results.items():
        typer.echo(f"{run} {name} on {label}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


@app.command()
def predict(
    run: Path,
    audio: Optional[List[Path]] = typer.Argument(None, help="audio files (any rate, mono or down-mixed)"),
    manifest: Optional[Path] = typer.Option(None, help="the inputs as a manifest, instead of AUDIO files"),
    variant: Optional[str] = typer.Option(None, help="default: the run's best by its selection metric"),
    out: Optional[Path] = typer.Option(None, help="one row per input: .tsv, .json or .jsonl (.rttm: a "
                                       "diarization run's turns), written whole or not at all (default: TSV on "
                                       "standard output)"),
    trials: Optional[Path] = typer.Option(None, help="verify: score these pairs of inputs (label enroll test)"),
    scores: Optional[Path] = typer.Option(None, help="verify with --trials: the scores as TSV (default: printed)"),
    max_seconds: float = typer.Option(extract_defaults.MAX_SECONDS, help="padded audio seconds per upstream "
                                      "batch, as extract"),
    device: str = typer.Option("auto"),
):
    """A trained run on raw audio: its upstreams, alignment, interface and head; no store needed."""
    from fusionpipe.predict import predict as run_predict

    result = run_predict(run, audio or [], manifest, variant=variant, out=out, trials=trials, scores=scores,
                         device=device, max_seconds=max_seconds)
    if trials and scores is None:
        for a, b, label, score in result.scores:
            typer.echo(f"{a}\t{b}\t{label}\t{score!r}")
    _say(result.summary())


# ---- analysis ---------------------------------------------------------------------------------
@app.command()
def analyze(
    targets: List[str] = typer.Argument(..., help="stores of one manifest (any number), or one run directory"),
    out: Optional[Path] = typer.Option(None, help="where the CSVs and PNGs go (default: analysis/<manifest>-"
                                       "<upstreams> for stores, <run>/analysis for a run)"),
    frames: int = typer.Option(4096, help="stores: aligned frames sampled for CKA (memory: frames x sum L_i D_i "
                                          "float32)"),
    seed: int = typer.Option(0, help="stores: the seed of the frame sample"),
    estimator: str = typer.Option("linear", help="stores: linear (Kornblith et al.) or debiased (unbiased HSIC)"),
    align_time: str = typer.Option("max", help="stores: common T per utterance, max or min (stage 2's rule)"),
    stores: Optional[List[str]] = typer.Option(None, help="run: score the knockout on these stores (default: the "
                                               "run's dev stores)"),
    manifest: Optional[Path] = typer.Option(None, help="run: only these rows of --stores"),
    trials: Optional[str] = typer.Option(None, help="run, verify: trial list (default: the run's)"),
    knockout: bool = typer.Option(True, "--knockout/--no-knockout", help="run: score the layer knockout on dev "
                                  "(else only the weights)"),
    metric: Optional[str] = typer.Option(None, help="run: the metric the plot shows (default: the first)"),
    skip_missing: bool = typer.Option(False, help="leave out utterances not usable in every store"),
    device: str = typer.Option("auto", help="run: where the variants run"),
):
    """What the layers say: CKA between every layer of every upstream (STORES), or what each trained
    interface of a RUN uses (weights, Gumbel shares, layer knockout on dev). CSV + PNG."""
    from fusionpipe.train.rundir import RunDir

    if len(targets) == 1 and RunDir(targets[0]).exists():
        from fusionpipe.analyze.use import describe_use, layer_use, stuck_variants, write_layer_use

        run = Path(targets[0])
        rows = layer_use(run, _list(stores) or None, manifest, trials, device, knockout, skip_missing)
        paths = write_layer_use(rows, out or run / "analysis", metric, title=run.name)
        stuck = stuck_variants(run)
        if stuck:
            typer.echo(f"left out, ended on the CTC blank plateau (nothing learned to read): {', '.join(stuck)}")
        typer.echo(describe_use(rows, metric))
    else:
        from fusionpipe.analyze.cka import layer_similarity, write_similarity

        sim = layer_similarity(targets, frames, seed, estimator, align_time, skip_missing)
        from fusionpipe.names import upstream_set_name

        # an upstream loaded from a directory is named by its path
        names = upstream_set_name(Path(u).name for u in sim.upstreams)
        paths = write_similarity(sim, out or Path("analysis") / f"{sim.manifest}-{names}")
        for r in sim.summary():
            if r["upstream_a"] != r["upstream_b"]:
                typer.echo(f"{r['upstream_a']} ~ {r['upstream_b']}: mean best-match CKA {r['mean_best_match']:.3f}, "
                           f"max {r['max']:.3f} ({sim.frames} frames, {sim.estimator})")
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


# ---- all stages -------------------------------------------------------------------------------
@app.command()
def ablate(recipe: Path, dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, run nothing"),
           quiet: bool = typer.Option(False, help="no progress bars")):
    """Run a stages/ recipe: extract missing caches, train each upstream set's variants in one pass, report."""
    from fusionpipe.ablate import load_recipe, run_recipe

    run_recipe(load_recipe(recipe), dry_run=dry_run, progress=not quiet, echo=typer.echo)


def main() -> None:
    try:
        app()
    except FusionpipeError as e:
        _say(f"error: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
