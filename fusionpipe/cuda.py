"""Every call fusionpipe makes into torch.cuda, in one place, so that a test can stand in a fake GPU.

The logic around these calls (which GPU a worker takes, which RNG state a variant keeps, which device a
pinned buffer belongs to) is written as plain functions of what they return, and tested on a machine
without a GPU by replacing them (tests/conftest.py `fake_cuda`). Callers name the module
(`cuda.device_count()`), never import a function from it, so that the replacement is seen everywhere.
Nothing here initialises CUDA unless a GPU is asked for: `--device cpu` on a GPU machine stays off it.
"""

from __future__ import annotations

import time

import torch

HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every GPU, not only the current one


def available() -> bool:
    return torch.cuda.is_available()


def device_count() -> int:
    """GPUs visible to this process (CUDA_VISIBLE_DEVICES applied); 0 without a driver."""
    return torch.cuda.device_count()


def synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def set_device(device: torch.device) -> None:
    torch.cuda.set_device(device)


def free_memory(device: torch.device) -> int:
    """Bytes free on the GPU `device` (what a head's parameters must fit in, `tasks.check_head`)."""
    return torch.cuda.mem_get_info(device)[0]


def empty_cache() -> None:
    torch.cuda.empty_cache()


def get_rng_state(device: torch.device) -> torch.Tensor:
    """The random state of `device`'s generator (a CPU byte tensor)."""
    return torch.cuda.get_rng_state(device)


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    torch.cuda.set_rng_state(state, device)


def register_host(ptr: int, size: int, device: torch.device) -> str | None:
    """Pin `size` bytes at `ptr` (memory torch did not allocate: shared-memory slots) for copies to and
    from `device`; None on success, else why not.

    Under `device` as the current device, so that the CUDA context used is that GPU's, not GPU 0's, and
    portable, so the pages count as pinned for every GPU's copies.
    """
    with torch.cuda.device(device):
        return _checked("cudaHostRegister", torch.cuda.cudart().cudaHostRegister(ptr, size, HOST_REGISTER_PORTABLE),
                        device)


def unregister_host(ptr: int, device: torch.device) -> str | None:
    with torch.cuda.device(device):
        return _checked("cudaHostUnregister", torch.cuda.cudart().cudaHostUnregister(ptr), device)


def _checked(call: str, err, device: torch.device) -> str | None:
    """None if the runtime call returned success, else its error, taken out of CUDA's per-thread "last error".

    A failed runtime call leaves its error there until someone reads it, and torch reads it after its next
    kernel launch (C10_CUDA_KERNEL_LAUNCH_CHECK): the run would fail at the next forward with an error that
    names the kernel, not the call. One tiny kernel launched here makes torch's check read (and so clear) it.
    """
    if int(err) == 0:
        return None
    why = f"{call} failed: {torch.cuda.cudart().cudaGetErrorString(err)} (cudaError {int(err)})"
    try:
        torch.ones(1, device=device)  # a fill kernel, then torch's launch check
    except RuntimeError:  # the error just returned, read back by the launch check: cleared now
        pass
    return why


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (small, on the host: lengths, masks, indices) on `device`, without making the host wait.

    A plain .to(device) waits for the copy, and so for everything queued before it; a non-blocking copy from
    pageable memory may still wait for the stream while the driver stages it. Copied from pinned memory
    (torch's caching host allocator keeps the block until the copy is done) it does neither.
    """
    if t.device.type != "cpu" or device.type == "cpu":
        return t.to(device)  # nothing to upload (a non-blocking copy to the host could be read before it lands)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class Stopwatch:
    """The seconds a stretch of work takes on `device`, measured without waiting for it: on a GPU two CUDA
    events around the work, read (`seconds`) only once the host has waited for the device anyway; on a CPU,
    where the work is done when the call returns, the wall clock."""

    def __init__(self, device: torch.device):
        self.gpu = device.type == "cuda"
        if self.gpu:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> Stopwatch:
        if self.gpu:
            self._end.record()
        else:
            self._elapsed = time.perf_counter() - self._t0
        return self

    def seconds(self) -> float:
        return self._start.elapsed_time(self._end) / 1000 if self.gpu else self._elapsed
