"""Stage 1 on dask.distributed: work units, chunk ownership, a killed worker, the CLI."""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.extract.cluster import connect, extract_on_cluster, work_units
from fusionpipe.device import usable_cores
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.batching import plan
from fusionpipe.extract.stage import extract
from fusionpipe.chunks import chunk_span
from fusionpipe.store import FeatureStore
from fusionpipe.integrity import check_store
from fusionpipe.extract.upstreams import load_upstream



@pytest.fixture
def one_thread():
    """Workers run torch on one thread each here; the reference must sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert a.ids == b.ids
    assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.lengths, b.lengths)
    assert a.is_complete() and b.is_complete() and not check_store(b)
    assert a.hidden[:].tobytes() == b.hidden[:].tobytes()


def _chunks_written(url) -> int:
    """Chunks on disk, counted without opening the store (the client may be creating it right now)."""
    chunk_dir = Path(url) / "hidden" / "c"
    return len(os.listdir(chunk_dir)) if chunk_dir.is_dir() else 0


def test_work_units_cover_the_plan_in_order_and_skip_done_batches(long_manifest):
    upstream = load_upstream("toy-wavlm", device="cpu")
    p = plan(long_manifest, upstream, max_seconds=6)
    F = 64
    total = int(p.layout.lengths.sum())
    done = np.zeros(-(-total // F), dtype=bool)
    units = work_units(long_manifest, p, done, F, unit_seconds=10)
    assert [b for u in units for b in u.batches] == p.batches  # runs of the single-process batches, in order
    assert all(u.seconds >= 10 for u in units[:-1]) and sum(u.seconds for u in units) == pytest.approx(120)
    for u in units:
        first, last = u.batches[0][0], u.batches[-1][-1]
        assert u.chunks == chunk_span(p.layout.offsets[first], p.layout.offsets[last] + p.layout.lengths[last], F)
    done[:] = True
    done[units[1].chunks[1] - 1] = False  # the chunk under the edge of units 1 and 2
    again = work_units(long_manifest, p, done, F, unit_seconds=10)
    assert [b for u in again for b in u.batches] == [units[1].batches[-1], units[2].batches[0]]


@pytest.fixture(scope="module")
def local_cluster():
    with connect("local", workers=2) as (client, threads):
        yield client, threads


@pytest.mark.slow
def test_two_workers_with_one_killed_mid_run_give_the_single_process_store(long_manifest, tmp_path, one_thread,
                                                                           local_cluster):
    """Chunk-aligned units on 2 worker processes, one SIGKILLed mid-run: its units are rerun, nothing is lost,
    and the store is byte-identical to `extract` in one process."""
    client, threads = local_cluster
    assert threads == max(1, usable_cores() // 2)
    options = dict(max_seconds=6, chunk_frames=64, dtype="float16")
    ref = extract(long_manifest, "toy-wavlm", url=str(tmp_path / "ref.zarr"), device="cpu", progress=False, **options)

    url = str(tmp_path / "cluster.zarr")
    outcome = {}

    def run():
        try:
            outcome["result"] = extract_on_cluster(long_manifest, "toy-wavlm", client, url=url, device="cpu",
                                                   unit_seconds=6, threads=1, progress=False, **options)
        except BaseException as e:  # surfaced to the test below
            outcome["error"] = e

    pids = client.run(os.getpid)  # worker address -> pid
    job = threading.Thread(target=run)
    job.start()
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline and job.is_alive():
        if _chunks_written(url) >= 10:
            busy = [addr for addr, keys in client.processing().items() if keys]
            if busy:
                victim = pids[busy[0]]
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.02)
    assert victim is not None and job.is_alive(), "the run ended before a worker could be killed: make it longer"
    job.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].utterances == len(long_manifest)
    assert victim not in client.run(os.getpid).values()  # the nanny started a fresh worker in its place
    _same_store(FeatureStore.open(ref.url), FeatureStore.open(url))

    # and a rerun is a no-op
    again = extract_on_cluster(long_manifest, "toy-wavlm", client, url=url, device="cpu", progress=False, **options)
    assert again.already_complete


@pytest.fixture
def nan_manifest(speech_manifest, tmp_path, with_nan_row):
    """The speech manifest plus a file whose header is fine and whose samples hold a NaN (found at read time)."""
    return with_nan_row(speech_manifest, tmp_path, 16000)


@pytest.mark.slow
def test_a_bad_file_is_skipped_on_the_cluster_as_in_one_process(nan_manifest, tmp_path, one_thread, local_cluster):
    client, _ = local_cluster
    options = dict(max_seconds=3, chunk_frames=16, skip_bad=True)
    ref = extract(nan_manifest, "toy-hubert", url=str(tmp_path / "ref.zarr"), device="cpu", progress=False, **options)
    r = extract_on_cluster(nan_manifest, "toy-hubert", client, url=str(tmp_path / "c.zarr"), device="cpu",
                           unit_seconds=1, threads=1, progress=False, **options)
    assert r.skipped == ref.skipped == 1
    _same_store(FeatureStore.open(ref.url), FeatureStore.open(r.url))
    assert FeatureStore.open(r.url).skipped() == FeatureStore.open(ref.url).skipped()


@pytest.mark.slow
def test_a_unit_error_stops_the_run_with_the_workers_message(nan_manifest, tmp_path, local_cluster):
    client, _ = local_cluster
    with pytest.raises(FusionpipeError, match="nan.wav.*NaN.*--skip-bad"):
        extract_on_cluster(nan_manifest, "toy-hubert", client, url=str(tmp_path / "c.zarr"), device="cpu",
                           unit_seconds=1, progress=False)


@pytest.mark.slow
def test_the_workers_not_the_client_decide_the_device(speech_manifest, tmp_path, local_cluster, fake_cuda):
    """A client with GPUs (faked here) driving CPU-only workers: --device cuda is refused naming the workers,
    before any store is made (the client used to decide from its own GPUs)."""
    client, _ = local_cluster
    fake_cuda(2)
    with pytest.raises(FusionpipeError, match=r"--device cuda: workers tcp://.* see no GPU"):
        extract_on_cluster(speech_manifest, "toy-hubert", client, url=str(tmp_path / "c.zarr"), device="cuda",
                           progress=False)
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.slow
def test_memory_stores_and_ambiguous_clusters_are_refused(speech_manifest, local_cluster):
    client, _ = local_cluster
    with pytest.raises(FusionpipeError, match="memory://.*workers cannot reach"):
        extract_on_cluster(speech_manifest, "toy-hubert", client, url="memory://x/y.zarr", progress=False)
    with pytest.raises(FusionpipeError, match="exactly one"):
        with connect("local", 2, "tcp://localhost:8786"):
            pass
    with pytest.raises(FusionpipeError, match="only 'local'"):
        with connect("slurm", 2):
            pass


@pytest.mark.slow
def test_cli_extract_on_a_local_cluster_and_on_a_running_scheduler(tmp_path, local_cluster, make_manifest):
    m = make_manifest(tmp_path / "corpus", "cli", [1.5, 2.0, 0.7, 1.1])
    args = ["extract", "--model", "toy-hubert", "--manifest", str(m.source), "--cache", str(tmp_path / "cache"),
            "--device", "cpu", "--max-seconds", "2", "--chunk-frames", "8"]
    result = CliRunner().invoke(app, [*args, "--cluster", "local", "--workers", "2", "--unit-seconds", "1"])
    assert result.exit_code == 0, result.output
    assert "4 utterances" in result.output
    store = FeatureStore.open(tmp_path / "cache" / "cli" / "toy-hubert.zarr")
    assert store.is_complete() and not check_store(store)
    # the same on an existing cluster, by its scheduler's address, into another cache
    client, _ = local_cluster
    args[args.index("--cache") + 1] = str(tmp_path / "cache2")
    result = CliRunner().invoke(app, [*args, "--scheduler", client.scheduler.address, "--unit-seconds", "1"])
    assert result.exit_code == 0, result.output
    _same_store(store, FeatureStore.open(tmp_path / "cache2" / "cli" / "toy-hubert.zarr"))
    result = CliRunner().invoke(app, [*args, "--workers", "2"])
    assert isinstance(result.exception, FusionpipeError) and "--cluster local" in str(result.exception)
