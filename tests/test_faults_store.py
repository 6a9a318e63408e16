"""Fault injection on the cache: stray .partial files, flipped bits, truncated and missing chunks,
edited indices and metadata, two writers, a full disk, URLs with credentials. Each case once broke
a store silently (issue 10); each test fails on that code and passes now."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.fuse.loader import make_loader
from fusionpipe.errors import FusionpipeError, redact
from fusionpipe.extract.stage import compute_dtype, extract
from fusionpipe.fuse.view import open_fused
from fusionpipe.store import FeatureStore
from fusionpipe.store_lock import lock
from fusionpipe.integrity import check_store

runner = CliRunner()
CHUNK = 16  # frames per chunk: several chunks per utterance, several utterances per chunk


@pytest.fixture
def store(speech_manifest, tmp_path):
    """A complete toy-wavlm store with small chunks, and a pristine copy to compare against."""
    r = extract(speech_manifest, "toy-wavlm", tmp_path / "cache", device="cpu", progress=False, chunk_frames=CHUNK)
    shutil.copytree(r.url, tmp_path / "pristine.zarr")
    return r.url


def _chunk(url, c) -> Path:
    return Path(url) / "hidden" / "c" / str(c) / "0" / "0"


def _arrays(url) -> dict:
    g = zarr.open_group(url, mode="r")
    return {k: g[k][:] for k in ("hidden", "index/ids", "index/offsets", "index/lengths")}


def _same(a, b) -> bool:
    x, y = _arrays(a), _arrays(b)
    return all(np.array_equal(x[k], y[k]) for k in x)


def _rerun(manifest, url):
    return extract(manifest, "toy-wavlm", url=url, device="cpu", progress=False, chunk_frames=CHUNK)


def _cli(*args):
    """(exit code, output) as `fusionpipe` gives them: main() prints a FusionpipeError as "error: ...", exit 1."""
    result = runner.invoke(app, list(args))
    if isinstance(result.exception, FusionpipeError):
        return 1, result.output + f"error: {result.exception}\n"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


# ---- 1. a .partial file is not a chunk ---------------------------------------------------------------
@pytest.mark.slow
def test_a_stray_partial_in_place_of_a_chunk_is_not_done_and_a_rerun_recomputes_it(store, speech_manifest, tmp_path):
    c = 3
    _chunk(store, c).unlink()
    _chunk(store, c).with_suffix(".deadbeef.partial").write_bytes(b"half a chunk")
    s = FeatureStore.open(store)
    assert not s.done_chunks()[c] and not s.is_complete()
    assert s.stray_keys() == [f"hidden/c/{c}/0/0.deadbeef.partial"]
    assert np.isnan(s.hidden[c * CHUNK:(c + 1) * CHUNK]).all()  # never plausible zeros
    faults = check_store(s)
    assert any("1 of" in f and "missing" in f for f in faults) and any("stray" in f for f in faults)
    with pytest.raises(FusionpipeError, match=r"1 utterance\(s\) are not usable"):
        open_fused([store])
    with pytest.raises(FusionpipeError, match="not usable"):
        make_loader([store])
    r = _rerun(speech_manifest, store)
    assert not r.already_complete
    assert FeatureStore.open(store).stray_keys() == [] and check_store(FeatureStore.open(store)) == []
    assert _same(store, tmp_path / "pristine.zarr")


# ---- 2. corruption is a named error -----------------------------------------------------------------
def test_every_single_bit_flip_is_caught(store):
    """60 flips, each alone in a pristine chunk: every one is a checksum error (was 7 of 60)."""
    path = _chunk(store, 2)
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    s = FeatureStore.open(store)
    for bit in rng.choice(len(good) * 8, 60, replace=False):
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(bad))
        assert s.chunk_fault(2) is not None, f"bit {bit} went unnoticed"
    path.write_bytes(good)
    assert check_store(s) == []


def test_corrupt_chunks_stop_the_loader_naming_store_chunk_and_utterances(store):
    s = FeatureStore.open(store)
    path = _chunk(store, 1)
    data = bytearray(path.read_bytes())
    data[20:36] = bytes(255 - b for b in data[20:36])  # 16 inverted bytes: trained on NaN before
    path.write_bytes(bytes(data))
    holds = s.utterances_in([1])
    with pytest.raises(FusionpipeError) as e:
        for _ in make_loader([store], max_frames=10_000):
            pass
    assert str(s) in str(e.value) and "chunk 1 " in str(e.value) and holds[0] in str(e.value)
    assert "verify --repair" in str(e.value)
    path.write_bytes(path.read_bytes()[:len(data) // 2])  # truncated: was a raw zstd traceback
    with pytest.raises(FusionpipeError, match="chunk 1 .*corrupt"):
        s.read(holds[0])


def test_verify_reports_missing_chunks_index_edits_and_metadata_edits(store, tmp_path):
    s = FeatureStore.open(store)
    _chunk(store, 4).unlink()  # said "ok" before
    faults = check_store(s)
    assert len(faults) == 1 and "1 of" in faults[0] and "missing" in faults[0] and "chunks 4" in faults[0]

    edited = tmp_path / "edited.zarr"
    shutil.copytree(tmp_path / "pristine.zarr", edited)
    offsets = zarr.open_array(str(edited / "index" / "offsets"), mode="r+")
    offsets[1] = offsets[1] + 1  # training read shifted frames before
    assert any(f.startswith("index:") for f in check_store(FeatureStore.open(edited)))

    shutil.rmtree(edited)
    shutil.copytree(tmp_path / "pristine.zarr", edited)
    meta = json.loads((edited / "zarr.json").read_text())
    meta["attributes"]["chunk_frames"] = 7  # a traceback before
    (edited / "zarr.json").write_text(json.dumps(meta))
    faults = check_store(FeatureStore.open(edited))
    assert any("chunk_frames=7" in f for f in faults)
    code, out = _cli("verify", str(edited))
    assert code == 1 and "FAULT metadata" in out


@pytest.mark.parametrize("codec", ["zstd", pytest.param("int8", marks=pytest.mark.slow),
                                   pytest.param("int8-std08", marks=pytest.mark.slow)])
def test_a_chunk_swapped_or_copied_to_another_position_is_found_and_repaired(speech_manifest, tmp_path, codec):
    """Every chunk passes its checksum wherever it lies: the placement record written with it tells that
    chunks 1 and 4 were swapped and chunk 2 copied over 6 (verify said "ok" to all three)."""
    url = extract(speech_manifest, "toy-wavlm", tmp_path / "cache", device="cpu", progress=False,
                  chunk_frames=CHUNK, codec=codec).url
    pristine = tmp_path / "pristine.zarr"
    shutil.copytree(url, pristine)
    one, four = _chunk(url, 1).read_bytes(), _chunk(url, 4).read_bytes()
    _chunk(url, 1).write_bytes(four)
    _chunk(url, 4).write_bytes(one)
    shutil.copyfile(_chunk(url, 2), _chunk(url, 6))
    faults = check_store(FeatureStore.open(url))
    assert len(faults) == 3, faults
    assert "chunk 1 " in faults[0] and "chunk 4's (moved or copied from there)" in faults[0]
    assert "chunk 4 " in faults[1] and "chunk 1's" in faults[1]
    assert "chunk 6 " in faults[2] and "chunk 2's" in faults[2]
    assert _cli("verify", "--repair", url)[0] == 1
    extract(speech_manifest, "toy-wavlm", url=url, device="cpu", progress=False, chunk_frames=CHUNK, codec=codec)
    assert _same(url, pristine) and check_store(FeatureStore.open(url)) == []


@pytest.mark.parametrize("edit", [
    lambda a: a.update(sample_rate=8000),
    lambda a: a["upstream"].update(frame_rate=25.0),
    lambda a: a.update(skipped_before={**a["skipped_before"], "en-m1-neutral-0001": "injected"}),
])
def test_an_edited_identity_attribute_is_found(store, edit):
    """The attributes nothing else checks (sample rate, frame rate, the rows skipped before extraction) are
    covered by a digest written at creation (verify said "ok" to each edit before)."""
    meta = json.loads((Path(store) / "zarr.json").read_text())
    edit(meta["attributes"])
    (Path(store) / "zarr.json").write_text(json.dumps(meta))
    faults = check_store(FeatureStore.open(store))
    assert len(faults) == 1 and "identity_sha256" in faults[0]


def test_a_store_written_before_digests_and_placement_records_still_opens_and_verifies(store):
    """Stores written before this change have neither: they open, read and verify as before, and verify
    says what it cannot tell."""
    meta = json.loads((Path(store) / "zarr.json").read_text())
    del meta["attributes"]["identity_sha256"]
    (Path(store) / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(Path(store) / "placement")
    s = FeatureStore.open(store)
    assert check_store(s) == [] and s.read(s.ids[0]).shape[0] == s.lengths[0]
    code, out = _cli("verify", store)
    assert code == 0 and "chunk moved within the store can go undetected" in out


@pytest.mark.slow
def test_verify_repair_deletes_bad_chunks_and_a_rerun_restores_the_same_bytes(store, speech_manifest, tmp_path):
    for c in (0, 5):
        p = _chunk(store, c)
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x10
        p.write_bytes(bytes(b))
    _chunk(store, 2).with_suffix(".0badc0de.partial").write_bytes(b"")
    code, out = _cli("verify", store)
    assert code == 1 and out.count("FAULT chunk") == 2 and "stray" in out
    code, out = _cli("verify", "--repair", store)
    assert code == 1 and "rerun `fusionpipe extract`" in out
    s = FeatureStore.open(store)
    assert list(np.flatnonzero(~s.done_chunks())) == [0, 5] and s.stray_keys() == []
    _rerun(speech_manifest, store)
    assert _same(store, tmp_path / "pristine.zarr")
    assert _cli("verify", store) == (0, f"{store}: ok\n")


# ---- two writers, a full disk -----------------------------------------------------------------------
def test_a_second_extract_on_the_same_store_says_who_holds_it_or_waits(speech_manifest, tmp_path):
    url = str(tmp_path / "locked.zarr")
    with lock(url):
        with pytest.raises(FusionpipeError, match=rf"being written by another process .*\"pid\": {os.getpid()}"):
            extract(speech_manifest, "toy-wavlm", url=url, device="cpu", progress=False)
    released = threading.Event()

    def hold():
        with lock(url):
            released.wait(10)
            time.sleep(0.5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.2)
    released.set()
    r = extract(speech_manifest, "toy-wavlm", url=url, device="cpu", progress=False, wait=True)
    holder.join()
    assert FeatureStore.open(r.url).is_complete()


@pytest.mark.slow
def test_a_crashed_holder_does_not_block_a_rerun(speech_manifest, tmp_path):
    url = str(tmp_path / "crashed.zarr")
    code = (f"import sys, time; from fusionpipe.store_lock import lock\n"
            f"with lock({url!r}):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(FusionpipeError, match="being written by another process"):
        extract(speech_manifest, "toy-wavlm", url=url, device="cpu", progress=False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert FeatureStore.open(extract(speech_manifest, "toy-wavlm", url=url, device="cpu",
                                     progress=False).url).is_complete()


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 64 kB filesystem (tmpfs when running as root), else zarr's file writes patched to fail the
    same way once 40 kB are written. Yields (root, grow): grow() gives it room."""
    root = tmp_path / "disk"
    root.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)],
                                            capture_output=True).returncode == 0:
        yield root, lambda: subprocess.run(["mount", "-o", "remount,size=50m", str(root)], check=True)
        subprocess.run(["umount", "-l", str(root)], check=False)
        return
    import zarr.storage._local as local

    put, budget = local._put, {"left": 40_000}

    def limited(path, value, exclusive=False):
        n = len(value.as_buffer_like())
        if budget["left"] < n:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        budget["left"] -= n
        return put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", limited)
    yield root, lambda: budget.update(left=10**12)


def test_a_store_that_cannot_fit_is_refused_before_the_model_runs(small_disk, speech_manifest):
    root, _ = small_disk
    with pytest.raises(FusionpipeError, match=r"the store needs about .* GiB more \(zstd\).*choose another --cache"):
        extract(speech_manifest, "toy-wavlm", url=str(root / "big.zarr"), device="cpu", progress=False,
                chunk_frames=CHUNK)
    assert not (root / "big.zarr").exists()


def test_a_disk_full_while_the_store_is_created_is_named(small_disk, speech_manifest, monkeypatch):
    """Past the estimate (another process took the room): the store's own metadata does not fit."""
    from fusionpipe.extract import stage

    root, _ = small_disk
    if not os.path.ismount(root):
        pytest.skip("needs the 64 kB tmpfs (root)")
    monkeypatch.setattr(stage, "check_disk", lambda *a: None)
    subprocess.run(["dd", "if=/dev/zero", f"of={root / 'filler'}", "bs=4k", "count=15"], capture_output=True)
    with pytest.raises(FusionpipeError, match=r"the disk is full .* while the store is created; .*--overwrite"):
        extract(speech_manifest, "toy-wavlm", url=str(root / "x.zarr"), device="cpu", progress=False,
                chunk_frames=CHUNK)


@pytest.mark.slow
def test_a_full_disk_names_the_store_and_a_rerun_resumes(small_disk, speech_manifest, tmp_path, monkeypatch):
    """The disk fills during the run (the up-front estimate passed: another process took the room)."""
    from fusionpipe.extract import stage

    monkeypatch.setattr(stage, "check_disk", lambda *a: None)
    root, grow = small_disk
    url = str(root / "full.zarr")
    ref = extract(speech_manifest, "toy-wavlm", url=str(tmp_path / "ref.zarr"), device="cpu", progress=False,
                  chunk_frames=CHUNK).url
    with pytest.raises(FusionpipeError, match=r"full\.zarr: the disk is full .*rerun the same command: it resumes"):
        extract(speech_manifest, "toy-wavlm", url=url, device="cpu", progress=False, chunk_frames=CHUNK)
    s = FeatureStore.open(url)
    assert 0 < s.done_chunks().sum() < s.num_chunks and s.stray_keys() == []
    grow()
    extract(speech_manifest, "toy-wavlm", url=url, device="cpu", progress=False, chunk_frames=CHUNK)
    assert _same(url, ref)


# ---- precision and device kind ----------------------------------------------------------------------
def test_float32_stores_compute_in_float32_everywhere_and_record_it(speech_manifest, tmp_path):
    assert compute_dtype("float32", "cuda") == "float32"  # autocast fp16 was always on under CUDA
    assert compute_dtype("float16", "cuda") == "float16" and compute_dtype("float16", "cpu") == "float32"
    url = str(tmp_path / "f32.zarr")
    extract(speech_manifest, "toy-wavlm", url=url, device="cpu", progress=False, dtype="float32",
            chunk_frames=CHUNK)
    s = FeatureStore.open(url)
    assert s.attrs["compute"] == {"dtype": "float32", "device": "cpu"}
    _chunk(url, 1).unlink()  # an unfinished store, then pretend its first part ran on a GPU
    g = zarr.open_group(url, mode="r+")
    g.update_attributes({"compute": {"dtype": "float16", "device": "cuda"}})
    with pytest.raises(FusionpipeError, match="device kind: cached on 'cuda', now 'cpu'.*compute dtype"):
        extract(speech_manifest, "toy-wavlm", url=url, device="cpu", progress=False, dtype="float32")


def test_forward_computes_in_the_precision_it_is_asked_for_not_the_devices_default():
    """float32 asked of an upstream whose default is float16 (a GPU's) runs without fp16 autocast: the same
    numbers as float32 on a CPU, where it is the default. (Asking a CPU upstream for its own default could
    not fail.)"""
    from fusionpipe.extract.upstreams import load_upstream

    up = load_upstream("toy-wavlm", device="cpu")
    wave = np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    (reference,) = up.forward([wave], torch.float32)
    (half,) = up.forward([wave], torch.float16)
    assert half.dtype == torch.float16 and not torch.equal(half.float(), reference)  # fp16 autocast runs on a CPU too
    up.dtype = torch.float16  # a GPU's default
    (h,) = up.forward([wave], torch.float32)
    assert h.dtype == torch.float32 and torch.equal(h, reference)
    (default,) = up.forward([wave])
    assert default.dtype == torch.float16  # what a forward that ignored the precision asked for would return


# ---- URLs ---------------------------------------------------------------------------------------------
def test_inspect_and_verify_take_urls(speech_manifest):
    url = extract(speech_manifest, "toy-wavlm", "memory://faults", device="cpu", progress=False).url
    code, out = _cli("inspect", url)
    assert code == 0 and f"store                  {url}" in out
    assert _cli("verify", url) == (0, f"{url}: ok\n")


def test_credentials_in_a_url_are_never_printed(tmp_path):
    secret = "s3://AKIAXXXX:topsecret@bucket.example/cache/x.zarr"
    assert redact(secret) == "s3://***@bucket.example/cache/x.zarr"
    assert "topsecret" not in str(FusionpipeError(f"cannot open {secret}"))
    code, out = _cli("inspect", f"file://user:topsecret@{tmp_path}/none.zarr")
    assert code == 1 and "topsecret" not in out


def test_train_on_a_store_with_skipped_utterances_offers_a_flag_it_has(speech_manifest, tmp_path):
    (speech_manifest.root / speech_manifest[1].path).write_bytes(b"not audio")
    url = extract(speech_manifest, "toy-wavlm", url=str(tmp_path / "skips.zarr"), device="cpu", progress=False,
                  skip_bad=True).url
    args = ["train", "--stores", url, "--steps", "1", "--eval-every", "1", "--head-option", "hidden=8"]
    code, out = _cli(*args, "--out", str(tmp_path / "run"))
    assert code == 1 and "--skip-missing (fuse, train, evaluate)" in out and speech_manifest[1].id in out
    code, out = _cli(*args, "--out", str(tmp_path / "run"), "--skip-missing")
    assert code == 0, out
