"""Processes and shared memory (docs/reliability.md): helpers and loader workers die with their parent, and
shared memory that cannot be had is an error or a slower path, never a SIGBUS or a hang.

The shared-memory cases run in a private mount namespace with a small tmpfs on /dev/shm (`unshare -m`,
root only; skipped elsewhere), so the machine's own /dev/shm is never filled."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse.loader import make_loader

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's fusionpipe


@pytest.fixture(scope="session")
def small_shm():
    """`small_shm(size, argv, timeout)`: run argv with a tmpfs of `size` (e.g. "1m") as its /dev/shm, in a
    mount namespace of its own; returns the CompletedProcess (text, stdout and stderr captured)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small /dev/shm in a private mount namespace needs root")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m / mount not permitted here: {probe.stderr.decode().strip()}")

    def run(size: str, argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size="$0" tmpfs /dev/shm && exec "$@"',
                               size, *argv], capture_output=True, text=True, timeout=timeout, env=ENV)
    return run


def _shm_files(pids: list[int]) -> set[str]:
    """The /dev/shm files (slots, semaphores) the processes `pids` have mapped."""
    out = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        out |= {line.split()[-1] for line in maps.splitlines() if "/dev/shm/" in line}
    return {f.removesuffix(" (deleted)") for f in out if not f.endswith("(deleted)")}


def _running(procs: list, within: float) -> list:
    """Those of `procs` still running after up to `within` seconds (a zombie, exited but not reaped by the
    pid 1 of a container, counts as gone)."""
    deadline = time.time() + within
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_main_process_leaves_no_process_and_no_shared_memory(long_manifest, tmp_path, extract_cmd,
                                                                         start_extract_midway, sig):
    """kill -9 / kill -TERM of `extract --processes 2`: within seconds no helper, no resource tracker and no
    /dev/shm segment or semaphore of the run is left (they used to live on, reparented to pid 1)."""
    cmd = extract_cmd(long_manifest, tmp_path / "c", "--processes", "2")
    proc = start_extract_midway(cmd, tmp_path / "c" / long_manifest.name / "toy-wavlm.zarr" / "hidden" / "c")
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3  # two helpers and the resource tracker
    names = {c.pid: " ".join(c.cmdline()) for c in children}
    shm = _shm_files([proc.pid, *names])
    assert any("psm_" in f for f in shm)
    os.kill(proc.pid, sig)
    proc.wait()
    alive = _running(children, within=15)
    for c in alive:  # not to leave them to the next test
        c.kill()
    assert not alive, [names[c.pid] for c in alive]
    assert not [f for f in shm if Path(f).exists()]


SLOTS = """
import numpy as np
import torch
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.pipeline import _Slots

slots = _Slots(1 << 20, torch.device("cpu"))  # 2 x 1 MB of the 4 MB
with open("/dev/shm/filler", "wb") as f:  # another process takes the rest
    try:
        while True:
            f.write(b"x" * 65536)
            f.flush()
    except OSError:
        pass
for i in range(2):  # every page of the slots: reserved, so no SIGBUS
    slots.view(i, (1 << 20,), np.uint8)[:] = 1
print("touched")
try:
    _Slots(1 << 20, torch.device("cpu"))
except FusionpipeError as e:
    print("refused:", e)
"""


@pytest.mark.slow
def test_slots_are_reserved_when_made_so_a_full_dev_shm_is_an_error_not_a_sigbus(small_shm):
    """The pipeline's slots reserve their pages (posix_fallocate): slots that do not fit are refused naming
    the fixes, and slots once made survive another process filling /dev/shm (they were a SIGBUS, rc 135)."""
    r = small_shm("4m", [sys.executable, "-c", SLOTS])
    assert r.returncode == 0, r.stderr
    assert "touched" in r.stdout
    assert "refused:" in r.stdout and "--shm-size" in r.stdout and "--processes 0" in r.stdout


@pytest.mark.slow
def test_extract_with_too_little_dev_shm_is_an_error_naming_the_flags(small_shm, long_manifest, tmp_path,
                                                                      extract_cmd):
    r = small_shm("256k", extract_cmd(long_manifest, tmp_path / "c", "--processes", "2"))
    assert r.returncode == 1, r.stderr
    assert "error:" in r.stderr and "--processes 0" in r.stderr and "--shm-size" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_loader_workers_train_with_a_tiny_dev_shm(small_shm, pitch_stores, tmp_path):
    """1 MB of /dev/shm, less than one batch: the workers' batches cross pickled through the pipe and the run
    finishes (it used to wait forever for a batch whose move to shared memory had failed in a feeder thread)."""
    cmd = [sys.executable, "-m", "fusionpipe", "train", "--stores", ",".join(pitch_stores["train"]), "--task",
           "classify", "--fusion", "weighted-sum", "--steps", "3", "--eval-every", "3", "--max-frames", "2000",
           "--num-workers", "2", "--device", "cpu", "--out", str(tmp_path / "run")]
    r = small_shm("1m", cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "weighted-sum-concat" / "results.json").is_file()


@pytest.mark.slow
def test_a_loader_worker_killed_mid_epoch_is_an_error_naming_the_fix(pitch_stores):
    loader = make_loader(pitch_stores["train"], max_frames=100, num_workers=2)
    batches = iter(loader)
    next(batches)
    workers = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
    assert workers
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
    with pytest.raises(FusionpipeError, match=r"data loader worker process died .*--resume.*--num-workers"):
        for _ in batches:
            pass
