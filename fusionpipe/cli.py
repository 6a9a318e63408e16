"""The `fusionpipe` command: typer options -> one library call each. Errors print without a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import FusionpipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Model and layer fusion of frozen speech foundation models.")
manifest_app = typer.Typer(no_args_is_help=True, help="Make manifests (TSV) from corpora on disk.")
app.add_typer(manifest_app, name="manifest")


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _manifests(paths: Optional[List[Path]]):
    """The manifests named, or the bundled demo corpus's splits when none is."""
    from .manifest import bundled_manifests, read_manifest

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
                         out: Path = typer.Option(Path("manifests"), help="directory for the TSV")):
    """LibriSpeech tree -> manifests/librispeech-<split>.tsv (speaker, text)."""
    from .manifest import write_manifest
    from .recipes.librispeech import import_librispeech

    m = import_librispeech(root, split)
    typer.echo(f"{write_manifest(m, out / f'{m.name}.tsv')}: {len(m)} utterances, {m.duration / 3600:.2f} h")


@manifest_app.command("folder")
def manifest_folder(root: Path, name: Optional[str] = typer.Option(None, help="manifest name (default: folder name)"),
                    out: Path = typer.Option(Path("manifests"), help="directory for the TSV")):
    """Any audio tree (recursive; transcripts from <stem>.txt or a root transcripts.tsv) -> manifest."""
    from .manifest import write_manifest
    from .recipes.folder import import_folder

    m = import_folder(root, name)
    typer.echo(f"{write_manifest(m, out / f'{m.name}.tsv')}: {len(m)} utterances, {m.duration / 3600:.2f} h")


# ---- stage 1 --------------------------------------------------------------------------------
@app.command()
def models():
    """The upstream registry: alias, HF id, layers (L), hidden size (D), frame rate."""
    from .upstreams import list_upstreams

    typer.echo(f"{'alias':<18} {'hf id':<34} {'L':>3} {'D':>5} {'Hz':>5}")
    for s in list_upstreams():
        typer.echo(f"{s.alias:<18} {s.hf_id:<34} {s.num_layers:>3} {s.hidden_size:>5} {s.frame_rate:>5g}")


@app.command()
def extract(
    model: str = typer.Option(..., help="alias (see `fusionpipe models`), HF id or local directory; comma list ok"),
    manifest: Optional[List[Path]] = typer.Option(None, help="manifest TSV (repeatable; default: bundled demo)"),
    cache: Path = typer.Option(Path("cache"), help="root of the feature stores"),
    device: str = typer.Option("auto", help="auto (cuda if present), cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("float16", help="storage dtype: float16 or float32"),
    codec: str = typer.Option("zstd", help="zstd, blosc-zstd, blosc-zstd-bitshuffle, blosc-lz4, none"),
    max_seconds: float = typer.Option(160.0, help="padded audio seconds per batch"),
    chunk_frames: Optional[int] = typer.Option(None, help="frames per Zarr chunk (default: about 4 MB)"),
    skip_bad: bool = typer.Option(False, help="record unusable utterances and go on instead of stopping"),
    overwrite: bool = typer.Option(False, help="replace a store that holds another extraction"),
):
    """STAGE 1: cache every hidden layer of each upstream over each manifest (resumes after a crash)."""
    from .extract import extract as run
    from .upstreams import load_upstream

    manifests = _manifests(manifest)
    for name in [m.strip() for m in model.split(",") if m.strip()]:
        upstream = load_upstream(name, device=device)
        for m in manifests:
            r = run(m, upstream, cache, dtype=dtype, codec=codec, max_seconds=max_seconds, skip_bad=skip_bad,
                    overwrite=overwrite, chunk_frames=chunk_frames)
            typer.echo(r.summary())


@app.command()
def inspect(store: Path, as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Shape, layers, dtype, codec, size, bytes per audio-second, completeness, fingerprint of a store."""
    from .store import FeatureStore, describe

    d = describe(FeatureStore.open(store))
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    up, mf = d.pop("upstream") or {}, d.pop("manifest") or {}
    skipped = d.pop("skipped")
    for k, v in d.items():
        typer.echo(f"{k:<22} {v}")
    typer.echo(f"{'upstream':<22} {up.get('name')} ({up.get('model_id')} @ {str(up.get('revision'))[:12]}) "
               f"L={up.get('num_layers')} D={up.get('hidden_size')} {up.get('frame_rate')} Hz")
    typer.echo(f"{'manifest':<22} {mf.get('name')} ({mf.get('utterances')} rows, sha256 {str(mf.get('sha256'))[:12]})")
    typer.echo(f"{'skipped':<22} {len(skipped)}")
    for utt, reason in skipped.items():
        typer.echo(f"  {utt}: {reason}")


@app.command()
def verify(store: Path):
    """Read every finished chunk back: exit 1 on any unreadable, non-finite or mis-indexed data."""
    from .store import FeatureStore, verify as check

    faults = check(FeatureStore.open(store))
    for f in faults:
        typer.echo(f"FAULT {f}")
    if faults:
        raise typer.Exit(1)
    typer.echo(f"{store}: ok")


def main() -> None:
    try:
        app()
    except FusionpipeError as e:
        _say(f"error: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
