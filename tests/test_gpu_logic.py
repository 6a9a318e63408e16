"""The GPU-only paths' logic, proved on a machine without a GPU (bench/gpu_check.sh runs them on one).

Three ways in: the device is an argument, and code run on the `meta` device under `host_syncs` shows every
read-back and every waiting copy a GPU would pay; fusionpipe/cuda.py is the one seam into torch.cuda, which
`fake_cuda` replaces with GPUs that keep their random states and registrations; the rules (which GPU a
worker takes, which random state a variant resumes with) are pure functions of what the devices report.
"""

from contextlib import contextmanager
from multiprocessing.shared_memory import SharedMemory
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fusionpipe import cuda
from fusionpipe.device import cgroup_cpus, resolve_device
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.cluster import Worker, assign_devices, cluster_device
from fusionpipe.extract.pipeline import default_processes, pin, unpin
from fusionpipe.fuse.align import align_into
from fusionpipe.train.augment import random_crop
from fusionpipe.train.interfaces import Interface
from fusionpipe.train.loop import Variant, check_frames, train_step
from fusionpipe.train.variant import VariantModel, resumed_device_rng
from fusionpipe.train.tasks import build_task

META = torch.device("meta")


# ---- 1. alignment on the device --------------------------------------------------------------------------
@pytest.mark.parametrize("stored, target", [((40, 7, 8), (13, 41)), ((41, 13, 8), (13, 40)), ((9, 3, 4), (5, 30))])
def test_aligning_on_a_device_reads_nothing_back_and_uploads_its_indices_once(host_syncs, stored, target):
    x = torch.randn(stored).to(META)
    out = torch.empty(*target, stored[2], device=META)
    align_into(x, out, accumulate=False)  # the first time: the interpolation's indices are copied up
    with host_syncs() as syncs:
        align_into(x, out, accumulate=False)
        align_into(x, out, accumulate=True)
    assert syncs.calls == []


# ---- 2, 3. pinned slots: the extraction's GPU, portable, and a failure that stays harmless ------------------
@contextmanager
def _buffers(n: int = 2, size: int = 4096):
    shm = [SharedMemory(create=True, size=size) for _ in range(n)]
    try:
        yield shm
    finally:
        for s in shm:
            s.close()
            s.unlink()


def test_slots_are_pinned_for_the_gpu_that_extracts_and_unpinned_there(fake_cuda):
    fake = fake_cuda(3)
    with _buffers() as shm:
        pinned = pin(shm, torch.device("cuda", 2))
        assert [d for _, _, d in fake.registered] == [torch.device("cuda", 2)] * 2 and len(pinned) == 2
        unpin(pinned, torch.device("cuda", 2))
    assert fake.unregistered == [(p, torch.device("cuda", 2)) for p in pinned]


def test_a_slot_that_cannot_be_pinned_warns_and_is_not_unpinned(fake_cuda):
    fake = fake_cuda(1, fail="cudaHostRegister failed: out of memory (cudaError 2)")
    with _buffers() as shm, pytest.warns(UserWarning, match="not pinned.*out of memory.*ulimit -l"):
        pinned = pin(shm, torch.device("cuda", 0))
    assert pinned == [] and len(fake.registered) == 2
    assert pin([], torch.device("cpu")) == []


class _Cudart:
    """torch.cuda.cudart() of a machine whose registrations fail with `err` (0: they succeed)."""

    def __init__(self, err: int, current: list):
        self.err, self.current, self.calls = err, current, []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", self.current[0], flags))
        return self.err

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", self.current[0], None))
        return self.err

    def cudaGetErrorString(self, err):
        return "out of memory"


@pytest.fixture
def cudart(monkeypatch):
    """`cudart(err)`: the runtime calls of fusionpipe.cuda answered here, with the current device followed
    (torch.cuda.device) and a kernel launch (torch.ones on a GPU) that raises the error CUDA kept, once."""
    current, launches = [torch.device("cuda", 0)], []

    @contextmanager
    def device(d):
        saved, current[0] = current[0], torch.device(d)
        try:
            yield
        finally:
            current[0] = saved

    def ones(*shape, device=None, **kw):
        launches.append(torch.device(device))
        if fake.err and len(launches) == 1:
            raise RuntimeError("CUDA error: out of memory")  # what torch's launch check makes of the kept error
        return torch.ones(*shape, **kw)

    def install(err: int) -> _Cudart:
        nonlocal fake
        fake = _Cudart(err, current)
        fake.launches = launches
        monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(cuda.torch, "ones", ones)
        return fake

    fake = None
    return install


def test_host_registration_happens_on_the_slots_gpu_and_is_portable(cudart):
    fake = cudart(0)
    assert cuda.register_host(1234, 4096, torch.device("cuda", 2)) is None
    assert cuda.unregister_host(1234, torch.device("cuda", 2)) is None
    assert fake.calls == [("register", torch.device("cuda", 2), cuda.HOST_REGISTER_PORTABLE),
                          ("unregister", torch.device("cuda", 2), None)]
    assert fake.launches == []  # nothing to take back


def test_a_failed_registration_takes_cudas_error_so_the_next_kernel_does_not_fail(cudart):
    fake = cudart(2)
    why = cuda.register_host(1234, 4096, torch.device("cuda", 1))
    assert why == "cudaHostRegister failed: out of memory (cudaError 2)"
    assert fake.launches == [torch.device("cuda", 1)]  # the launch check read the error here, not at the forward


def test_helpers_default_to_the_usable_cores_not_the_hosts(monkeypatch, tmp_path):
    monkeypatch.setattr("fusionpipe.extract.pipeline.usable_cores", lambda: 4)
    assert default_processes("cuda") == 3 and default_processes("cpu") == 0
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpus(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpus(tmp_path) == 2
    assert cgroup_cpus(tmp_path / "none") is None


# ---- 4, 5. the cluster: each worker its GPU, the kind decided by the workers ---------------------------------
def test_local_cluster_workers_go_round_robin_over_their_gpus_under_auto_and_cuda():
    workers = {f"tcp://h:{40 + i}": Worker(i, "h", 2) for i in range(3)}
    for device in ("auto", "cuda"):
        kind = cluster_device(device, {a: w.gpus for a, w in workers.items()})
        assert assign_devices(kind, workers) == {"tcp://h:40": "cuda:0", "tcp://h:41": "cuda:1",
                                                 "tcp://h:42": "cuda:0"}


def test_dask_workers_named_by_address_spread_over_their_hosts_gpus():
    workers = {"tcp://a:9": Worker("tcp://a:9", "a", 4), "tcp://a:10": Worker("tcp://a:10", "a", 4),
               "tcp://b:9": Worker("tcp://b:9", "b", 1), "tcp://b:10": Worker("tcp://b:10", "b", 1)}
    devices = assign_devices("cuda", workers)
    assert sorted(devices[a] for a in ("tcp://a:9", "tcp://a:10")) == ["cuda:0", "cuda:1"]
    assert devices["tcp://b:9"] == devices["tcp://b:10"] == "cuda:0"  # one GPU there: shared
    assert assign_devices("cuda:1", workers) == dict.fromkeys(workers, "cuda:1")
    with pytest.raises(FusionpipeError, match="worker tcp://c:9 sees no GPU.*--device cpu"):  # a late joiner
        assign_devices("cuda", {"tcp://c:9": Worker("tcp://c:9", "", 0)})


def test_the_workers_gpus_decide_the_device_not_the_clients(fake_cuda):
    fake_cuda(0)  # the client has none
    assert cluster_device("auto", {"w1": 1, "w2": 1}) == "cuda"
    assert cluster_device("cuda", {"w1": 1}) == "cuda"
    assert cluster_device("auto", {"w1": 0, "w2": 0}) == "cpu"
    assert cluster_device("cpu", {"w1": 8}) == "cpu"


@pytest.mark.parametrize("device, gpus, message", [
    ("auto", {"w1": 1, "w2": 0}, "workers w2 see no GPU and the others do.*--device cpu"),
    ("cuda", {"w1": 1, "w2": 0}, "workers w2 see no GPU"),
    ("cuda:1", {"w1": 2, "w2": 1}, "workers w2 see fewer than 2 GPUs.*--device cuda"),
    ("mps", {"w1": 1}, "runs on cpu or cuda"),
    ("gpu", {"w1": 1}, "unknown device"),
])
def test_devices_the_workers_cannot_run_are_refused_with_the_fix(device, gpus, message):
    with pytest.raises(FusionpipeError, match=message):
        cluster_device(device, gpus)


# ---- 6. random states: per variant, per device, whatever GPUs the resume sees -------------------------------
def _variant(device, fake=None) -> Variant:
    model = nn.Linear(2, 2)
    return Variant("v", model, torch.optim.SGD(model.parameters(), lr=0.1), None, torch.device(device))


def test_each_variant_draws_from_its_own_gpu_stream_on_its_gpu(fake_cuda):
    fake = fake_cuda(2)
    gpu = torch.device("cuda", 1)
    a = _variant(gpu)
    fake.states[1] = torch.full((16,), 50, dtype=torch.uint8)  # the next variant's seed
    b = _variant(gpu)
    with a.own_rng():
        fake.draw(gpu)
        fake.draw(gpu)
    with b.own_rng():
        assert fake.get_rng_state(gpu)[0] == 50  # b's stream, untouched by a's draws
        fake.draw(gpu)
    assert a.cuda_rng[0] == 3 and b.cuda_rng[0] == 51 and fake.states[0][0] == 0  # GPU 0 never touched


def test_a_cpu_variant_never_calls_cuda(fake_cuda):
    fake_cuda(0)  # any call for a GPU would raise
    v = _variant("cpu")
    with v.own_rng():
        torch.rand(3)
    assert v.cuda_rng is None and v.state()["cuda_rng"] is None


@pytest.mark.parametrize("saved, device, expected", [
    (None, "cpu", None),                                   # a CPU run keeps no device state
    (torch.full((16,), 7, dtype=torch.uint8), "cpu", None),  # a GPU checkpoint resumed on a CPU
    (None, "cuda:0", "fresh"),                             # a CPU checkpoint resumed on a GPU: its own stream
    (torch.full((16,), 7, dtype=torch.uint8), "cuda:1", 7),
    ([torch.full((16,), 4, dtype=torch.uint8), torch.full((16,), 5, dtype=torch.uint8)], "cuda:1", 5),  # older
    ([torch.full((16,), 4, dtype=torch.uint8)], "cuda:3", "fresh"),  # saved seeing fewer GPUs than cuda:3
])
def test_the_resumed_device_state_is_a_function_of_the_checkpoint_and_the_device(saved, device, expected):
    fresh = torch.full((16,), 99, dtype=torch.uint8)
    got = resumed_device_rng(saved, torch.device(device), fresh)
    if expected is None:
        assert got is None
    else:
        assert torch.equal(got, fresh if expected == "fresh" else torch.full((16,), expected, dtype=torch.uint8))


def test_resuming_with_fewer_gpus_or_from_a_cpu_run_keeps_every_variant_its_own_stream(fake_cuda):
    fake = fake_cuda(1)
    gpu = torch.device("cuda", 0)
    old = {"model": nn.Linear(2, 2).state_dict(), "optimizer": _variant("cpu").optimizer.state_dict(),
           "rng": torch.get_rng_state(), "best": None, "train_seconds": 0.0}
    a, b = _variant(gpu), _variant(gpu)
    a.restore({**old, "cuda_rng": [torch.full((16,), 4, dtype=torch.uint8), torch.full((16,), 5, dtype=torch.uint8)]})
    fake.states[0] = torch.full((16,), 30, dtype=torch.uint8)
    b.restore({**old, "cuda_rng": None})  # checkpointed on a CPU
    with a.own_rng():
        fake.draw(gpu)
    with b.own_rng():
        assert fake.get_rng_state(gpu)[0] == 0  # b's fresh stream (built before the 30), not a's
    assert a.cuda_rng[0] == 5 and b.cuda_rng is not None


# ---- the training step: no host syncs ---------------------------------------------------------------------
@pytest.mark.parametrize("fusion, task", [("hconv", "classify"), ("weighted-sum", "classify"),
                                          ("gumbel", "classify"), pytest.param("hconv", "asr", marks=pytest.mark.slow),
                                          ("single-layer", "multilingual")])
def test_a_training_step_on_a_device_waits_for_nothing(host_syncs, monkeypatch, fusion, task):
    """Crop, SpecAugment, the interface, the head, the loss, backward, clipping and the optimizer, on `meta`.
    torch's ctc_loss has no meta kernel: a stand-in of its shape checks that it gets the lengths on the host,
    where torch's CUDA kernel reads them (its own waits inside are torch's: tasks.ctc_loss)."""
    lengths_seen = []

    def ctc_loss(log_probs, targets, input_lengths, target_lengths, **kw):
        lengths_seen.append((input_lengths.device.type, target_lengths.device.type, targets.device.type))
        return log_probs.sum((0, 2))

    monkeypatch.setattr("torch.nn.functional.ctc_loss", ctc_loss)
    rows = {"label": ["a", "b", "a"], "text": ["AB A", "B", "AA B"], "id": ["u0", "u1", "u2"],
            "language": ["x", "x", "y"]}
    t = build_task(task, rows)
    opts = {"layer": 1} if fusion == "single-layer" else {}
    interface = Interface([8, 6], 4, fusion=fusion, merge="concat", **opts)
    sizes = {"classify": dict(proj=8), "asr": dict(proj=8, hidden=4, layers=2),
             "multilingual": dict(proj=12, d_model=8, heads=2, ffn=8, layers=1)}[task]
    model = VariantModel(interface, t.build_head(interface.out_dim, **sizes)).to(META)
    v = Variant("v", model, torch.optim.Adam(model.parameters()), None, META)
    stacks = [torch.randn(3, 4, 40, d).to(META) for d in (8, 6)]
    lengths = torch.tensor([40, 31, 22])  # on the host, as the loader hands them over
    cfg = SimpleNamespace(steps=10, specaugment=True, grad_clip=1.0)
    with host_syncs() as syncs:
        for step in range(2):
            with v.own_rng():
                x, n = random_crop(stacks, lengths, 12, 30)
                check_frames(n, model.head, [SimpleNamespace(id=i) for i in rows["id"]])
                loss = train_step(v, t, x, n, rows, cfg, step, None)
    assert syncs.calls == [] and loss.device == META and loss.shape == ()
    assert all(seen == ("cpu", "cpu", "meta") for seen in lengths_seen) and len(lengths_seen) == 2 * (task != "classify")


def test_too_short_utterances_are_named_before_the_step():
    head = build_task("multilingual", {"text": ["A"], "language": ["x"]}).build_head(8, proj=12, d_model=8, heads=2,
                                                                                    ffn=8, layers=1)
    with pytest.raises(FusionpipeError, match=r"needs at least 7 frames.*u1 have fewer"):
        check_frames(torch.tensor([9, 6]), head, [SimpleNamespace(id="u0"), SimpleNamespace(id="u1")])


def test_the_device_is_resolved_through_the_seam(fake_cuda):
    fake_cuda(2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    fake_cuda(0)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(FusionpipeError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.slow
def test_the_losses_are_read_back_together_not_every_step(pitch_stores, train_config, logged_losses, tmp_path,
                                                          monkeypatch):
    """The trainer's one host sync: READ_LOSSES_EVERY steps' losses at once (and at evaluations and the end);
    the log still has every step's loss, the same as when each step is read (eval_every=1)."""
    from fusionpipe.train import loop
    reads = []
    read = loop._read_losses
    monkeypatch.setattr(loop, "_read_losses", lambda pending, variants: reads.append(len(pending)) or
                        read(pending, variants))
    steps = loop.READ_LOSSES_EVERY + 5
    loop.train(train_config(pitch_stores, tmp_path / "a", steps=steps, eval_every=steps), progress=False)
    assert reads == [loop.READ_LOSSES_EVERY, 5]
    reads.clear()
    loop.train(train_config(pitch_stores, tmp_path / "b", steps=steps, eval_every=1), progress=False)
    assert reads == [1] * steps
    assert logged_losses(tmp_path / "a", "hconv-concat") == logged_losses(tmp_path / "b", "hconv-concat")


def test_a_gpu_step_is_timed_on_the_device_without_a_wait(monkeypatch):
    """cuda.Stopwatch on a GPU records two events around the work and reads them only when asked (after the
    trainer's one sync); milliseconds between them become seconds."""
    recorded = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            recorded.append(self)

        def elapsed_time(self, end):
            assert recorded == [self, end]  # both recorded, in order, before anything is read
            return 1500.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    watch = cuda.Stopwatch(torch.device("cuda", 0))
    assert len(recorded) == 1
    assert watch.stop().seconds() == 1.5
    cpu = cuda.Stopwatch(torch.device("cpu")).stop()
    assert 0 <= cpu.seconds() < 1 and len(recorded) == 2
