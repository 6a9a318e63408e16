"""Stage 1 in several processes (extract/pipeline.py): the same store, byte for byte, and failures that say so."""

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest

from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.pipeline import MAX_PROCESSES, default_processes
from fusionpipe.extract.run import extract
from fusionpipe.extract.upstreams import NullUpstream
from fusionpipe.store import FeatureStore
from fusionpipe.verify import verify

# chunks of 16 frames under batches of one or two utterances: most chunks straddle a batch edge
SMALL = dict(max_seconds=5.0, chunk_frames=16, device="cpu", progress=False)


def _files(url) -> dict[str, bytes]:
    root = Path(url)
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture
def varied_manifest(make_manifest, tmp_path):
    """Lengths from 0.4 to 5.3 s: toy Whisper's 4 s windows split the longest ones."""
    return make_manifest(tmp_path / "corpus", "varied", [1.31, 0.5, 5.3, 2.7, 1.05, 4.2, 0.77, 2.2, 0.41, 3.3])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["toy-wavlm", "toy-whisper"])
def test_pipeline_store_is_byte_identical_to_the_one_process_store(model, varied_manifest, tmp_path):
    """Group-norm SSL (masked statistics, padding) and Whisper (windows): every key's bytes are equal."""
    one = extract(varied_manifest, model, tmp_path / "one", processes=0, **SMALL)
    many = extract(varied_manifest, model, tmp_path / "many", processes=2, **SMALL)
    assert FeatureStore.open(many.url).is_complete()
    assert _files(one.url) == _files(many.url)


@pytest.mark.slow
def test_bad_audio_is_left_out_as_in_the_one_process_path(varied_manifest, tmp_path, with_nan_row):
    """--skip-bad: the bad row is recorded, zeros stored, and its batch runs without it (same bytes)."""
    m = with_nan_row(varied_manifest, tmp_path, 40000)
    one = extract(m, "toy-wavlm", tmp_path / "one", processes=0, skip_bad=True, **SMALL)
    many = extract(m, "toy-wavlm", tmp_path / "many", processes=2, skip_bad=True, **SMALL)
    assert one.skipped == many.skipped == 1
    assert list(FeatureStore.open(many.url).skipped()) == ["nan"]
    assert _files(one.url) == _files(many.url) and verify(FeatureStore.open(many.url)) == []


@pytest.mark.slow
def test_an_error_reading_names_the_utterance(varied_manifest, tmp_path, with_nan_row):
    m = with_nan_row(varied_manifest, tmp_path, 40000)
    with pytest.raises(FusionpipeError, match=r"withnan.tsv row \d+ \(id nan\).*NaN.*--skip-bad"):
        extract(m, "toy-wavlm", tmp_path, processes=2, **SMALL)


@pytest.mark.slow
def test_an_error_writing_names_the_utterance(varied_manifest, tmp_path):
    """Activations float16 cannot hold are refused in a helper process, naming the utterance and the fix."""
    loud = NullUpstream("base", scale=1e6)
    with pytest.raises(FusionpipeError, match=r"null-base on varied-\d+: activations exceed the float16 range"
                                              r".*--dtype float32"):
        extract(varied_manifest, loud, tmp_path, processes=1, **SMALL)


def test_a_cpu_extracts_in_one_process_by_default_a_gpu_with_helpers():
    """On a CPU the forward takes every core (extract / bare forward is already ~1.0): bench/extract.py (d)."""
    assert default_processes("cpu") == 0
    assert 1 <= default_processes("cuda") <= MAX_PROCESSES


def test_null_upstream_has_the_real_shape_and_frame_arithmetic():
    import torch

    base, whisper = NullUpstream("base"), NullUpstream("whisper-base")
    assert (base.num_layers, base.hidden_size, base.num_frames(16000)) == (13, 768, 49)
    assert (whisper.num_layers, whisper.hidden_size, whisper.num_frames(16000)) == (7, 512, 50)
    out = whisper.forward([np.zeros(16000 * 31, np.float32)], torch.float16)
    assert out[0].shape == (1550, 7, 512) and out[0].dtype == torch.float16


@pytest.mark.slow
def test_kill_9_of_a_helper_fails_cleanly_and_the_rerun_is_byte_identical(long_manifest, tmp_path, extract_cmd,
                                                                          run_extract, start_extract_midway):
    """A real SIGKILL of one helper process: the run stops with an error naming the batch (no hang), and
    rerunning the same command completes the store with every byte of the uninterrupted one."""
    run_extract(extract_cmd(long_manifest, tmp_path / "ref", "--processes", "0"))
    cmd = extract_cmd(long_manifest, tmp_path / "killed", "--processes", "3")
    chunk_dir = tmp_path / "killed" / long_manifest.name / "toy-wavlm.zarr" / "hidden" / "c"
    proc = start_extract_midway(cmd, chunk_dir, stderr=subprocess.PIPE)
    children = [c for c in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
    assert len(children) >= 2
    os.kill(children[-1].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "process died" in err and "rerun the same command" in err
    partial = FeatureStore.open(chunk_dir.parents[1])
    assert 0 < int(partial.done_chunks().sum()) < partial.num_chunks
    run_extract(cmd)
    assert _files(tmp_path / "ref" / long_manifest.name / "toy-wavlm.zarr") == _files(chunk_dir.parents[1])

