"""`fusionpipe predict`: a trained run over audio files or a manifest, one output row per input.

    >>> predict("runs/demo", audio=["fusionpipe/corpus/audio/en-f1-sad-0001.flac"])   # doctest: +SKIP

Inputs stream through in blocks of about ``block_seconds`` of audio, in input order: a block is decoded,
each upstream runs over it in stage 1's batches (`extract.batching.plan`: longest first, ``max_seconds`` of
padded audio each), and the interface and head run in the evaluation loader's batches (`BucketBatchSampler`
in store order, the run's ``max_frames``). Memory holds one block's features, never the corpus'. Over a
manifest that fits one block these are exactly the batches `extract` and `evaluate` form, so predict
repeats their numbers bit for bit (tests/test_predict.py).

Every input is checked before the model loads (missing, unreadable, too short); silent audio is found
when decoded. Either way --out stays as it was (`output.RowWriter`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from fusionpipe import audio
from fusionpipe.atomic import atomic_write
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance, read_manifest
from fusionpipe.store import store_order
from fusionpipe.trials import read_trials
from fusionpipe.extract.batching import plan
from fusionpipe.extract.defaults import IO_THREADS, MAX_SECONDS
from fusionpipe.extract.stage import progress_bar
from fusionpipe.fuse.align import common_frames
from fusionpipe.fuse.loader import BucketBatchSampler
from fusionpipe.train.tasks.verify import trial_scores
from fusionpipe.predict.model import TrainedModel, load
from fusionpipe.predict.output import RowWriter, check_out

BLOCK_SECONDS = 300.0  # audio whose features are held at once (base-size SSL, float16: about 1 MB per second)
SILENCE = 10 ** (-90 / 20)  # a peak below -90 dBFS: no signal to predict from


@dataclass
class Prediction:
    """What a `predict` call did; ``scores``: the trial scores (verify with trials), in the trial list's order."""

    run: str
    variant: str
    utterances: int
    seconds_audio: float
    seconds_wall: float
    out: Path | None
    lossy: list[str] = field(default_factory=list)
    scores: list[tuple[str, str, int, float]] = field(default_factory=list)

    def summary(self) -> str:
        speed = self.seconds_audio / self.seconds_wall if self.seconds_wall else float("inf")
        where = f" -> {self.out}" if self.out else ""
        lossy = (f"; the run was trained on lossy stores ({', '.join(self.lossy)}): these outputs come from exact "
                 "features, evaluate's from quantized ones, and may differ slightly") if self.lossy else ""
        return (f"{self.run} {self.variant}: {self.utterances} inputs, {self.seconds_audio:.1f} s audio in "
                f"{self.seconds_wall:.1f} s ({speed:.1f} audio-s/s){where}{lossy}")


def predict(run: str | Path, audio_files: list[str | Path] = (), manifest: str | Path | None = None, *,
            variant: str | None = None, out: str | Path | None = None, trials: str | Path | None = None,
            scores: str | Path | None = None, device: str = "auto", max_seconds: float = MAX_SECONDS,
            block_seconds: float = BLOCK_SECONDS, progress: bool = True) -> Prediction:
    """The run's ``variant`` (default: its best) over ``audio_files`` or the rows of ``manifest``: one row
    per input to ``out`` (.tsv, .json, .jsonl; None: standard output as TSV). ``trials`` (verify): the
    cosine score of each pair of inputs it lists, to ``scores`` (TSV) and in the result."""
    t0 = time.perf_counter()
    inputs = input_manifest(audio_files, manifest)
    out = Path(out) if out is not None else None
    if out is not None:
        check_out(out)
    trial_list = read_trials(trials) if trials else []
    check_trials(trial_list, inputs, trials)
    model = load(run, variant, device)
    if trial_list and model.task.name != "verify":
        raise FusionpipeError(f"--trials: {run} is a {model.task.name} run; trial scores are for verify runs")
    check_inputs(inputs, model)
    in_trials = {u for a, b, _ in trial_list for u in (a, b)}
    embeddings = {}
    bar = progress_bar(inputs.duration, f"predict {model.name}", progress)
    try:
        with RowWriter(out) as writer:
            for block in blocks(inputs, block_seconds):
                for u, output in zip(block, predict_block(model, block, max_seconds, bar)):
                    writer.write({"id": u.id, "path": str(block.audio_path(u)), **output})
                    if u.id in in_trials:
                        embeddings[u.id] = np.asarray(output["embedding"], dtype=np.float32)
    finally:
        bar.close()
    scored = [(a, b, label, s) for (a, b, label), s in zip(trial_list, trial_scores(embeddings, trial_list))]
    if scores is not None and scored:
        atomic_write(scores, "enroll\ttest\tlabel\tscore\n" + "".join(f"{a}\t{b}\t{label}\t{s!r}\n"
                                                                      for a, b, label, s in scored))
    return Prediction(str(run), model.name, len(inputs), inputs.duration, time.perf_counter() - t0, out,
                      model.lossy, scored)


def input_manifest(audio_files, manifest) -> Manifest:
    """The inputs as a manifest: the given one, or a row per audio file (id: its name without the suffix, or
    its path where two names clash; rate and length from its header)."""
    if bool(audio_files) == (manifest is not None):
        raise FusionpipeError("give the audio to predict on: AUDIO files, or --manifest M (not both)")
    if manifest is not None:
        return read_manifest(manifest)
    paths = [Path(p).expanduser().absolute() for p in audio_files]
    stems = [p.stem for p in paths]
    rows = []
    for i, path in enumerate(paths):
        if not path.is_file():
            raise FusionpipeError(f"AUDIO {path}: no such file")
        try:
            info = sf.info(str(path))
        except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError by format
            raise FusionpipeError(f"AUDIO {path}: cannot read it as audio ({e}); give a WAV, FLAC or OGG file"
                                  ) from None
        utt_id = path.stem if stems.count(path.stem) == 1 else str(path)
        rows.append(Utterance(utt_id, str(path), info.frames, info.samplerate))
    return Manifest("AUDIO", Path("/"), rows)


def check_trials(trials: list, inputs: Manifest, path) -> None:
    missing = sorted({u for a, b, _ in trials for u in (a, b)} - {u.id for u in inputs})
    if missing:
        raise FusionpipeError(f"--trials {path}: {len(missing)} utterance id(s) are not among the inputs, e.g. "
                              f"{', '.join(missing[:3])}; give their audio too (ids: file names without suffix)")


def check_inputs(inputs: Manifest, model: TrainedModel) -> None:
    """Every input's header, read before any audio is decoded: missing, unreadable, disagreeing with its
    manifest row, empty, or shorter than one frame of an upstream."""
    def problem(row: int) -> str | None:
        try:
            audio.check_header(inputs, row)
        except audio.BadAudio as e:
            return str(e)
        samples = audio.target_num_samples(inputs[row])
        short = [u.name for u in model.upstreams if u.num_frames(samples) == 0]
        if short:
            return (f"{inputs.where(row)}: {samples} samples is shorter than one frame of {', '.join(short)}; "
                    "give longer audio")
        return None

    with ThreadPoolExecutor(IO_THREADS) as pool:  # header reads are I/O bound
        first = next((p for p in pool.map(problem, range(len(inputs))) if p), None)
    if first:
        raise FusionpipeError(first)


def blocks(inputs: Manifest, seconds: float):
    """Consecutive runs of inputs of about ``seconds`` of audio each (at least one input), as manifests."""
    rows, total = [], 0.0
    for u in inputs:
        if rows and total + u.duration > seconds:
            yield Manifest(inputs.name, inputs.root, rows, inputs.source)
            rows, total = [], 0.0
        rows.append(u)
        total += u.duration
    if rows:
        yield Manifest(inputs.name, inputs.root, rows, inputs.source)


def decode(block: Manifest, row: int) -> np.ndarray:
    """The samples of a row (`audio.load`), refused when silent."""
    wave = audio.load(block, row)
    if float(np.abs(wave).max()) < SILENCE:
        raise FusionpipeError(f"{block.where(row)}: {block.audio_path(block[row])} is silent (peak below -90 dBFS); "
                              "remove it from the inputs")
    return wave


def predict_block(model: TrainedModel, block: Manifest, max_seconds: float, bar) -> list[dict]:
    """One output dict per row of ``block``, in its order: each upstream in stage 1's batches, then the
    interface and head in the evaluation loader's."""
    with ThreadPoolExecutor(IO_THREADS) as pool:
        waves = list(pool.map(lambda r: decode(block, r), range(len(block))))
    ids = [u.id for u in block]
    encoded = [[None] * len(block) for _ in model.upstreams]  # per upstream, per row: (T, L_k, D_k)
    for k, upstream in enumerate(model.upstreams):
        p = plan(block, upstream, max_seconds)
        for batch in p.batches:
            rows = [p.rows[i] for i in batch]
            for r, f in zip(rows, model.encode(k, [waves[r] for r in rows], [ids[r] for r in rows])):
                encoded[k][r] = f
            bar.update(sum(block[r].duration for r in rows) / len(model.upstreams))
    frames = np.array([[f.shape[0] for f in fs] for fs in encoded], dtype=np.int64)
    sampler = BucketBatchSampler(common_frames(frames, model.align_time), model.max_frames,
                                 order=store_order(ids, frames[0]))
    outputs = [None] * len(block)
    for batch in sampler.batches():
        for i, output in zip(batch, model.outputs([[fs[i] for i in batch] for fs in encoded],
                                                  [ids[i] for i in batch])):
            outputs[i] = output
    return outputs
