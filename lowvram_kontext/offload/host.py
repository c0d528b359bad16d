"""Host memory for streamed blocks: pinned RAM, pageable RAM, or a memory-mapped file on disk.

Pinned buffers are anonymous memory maps registered with CUDA (``cudaHostRegister``): exactly the
bytes asked for, page aligned, where PyTorch's pinned allocator would round each one up to a power
of two. Unregistering leaves them valid as pageable memory, so tensors viewing them outlive it.
Memory-mapped buffers are shared maps of files in a cache folder, unlinked once mapped (where the
system allows) so nothing stays on disk after the process ends; the kernel pages them in on use
and may drop them again under memory pressure.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import tempfile
import weakref
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

import torch

from ..errors import KontextError

HOST_TIERS = ("pinned", "pageable", "mmap")


class TierChoice:
    """The host tier (one of ``HOST_TIERS``) of blocks given one at a time, in order.

    With ``host`` "pinned", blocks are pinned in order while the total stays within
    ``pinned_cap_bytes`` (no cap when None); the others, and all of them when pinning is not
    possible (no CUDA device), are pageable. Otherwise every block gets ``host``. A block's tier
    depends only on the blocks before it, so blocks can be placed as they come.
    """

    def __init__(self, host: str, pinned_cap_bytes: int | None, can_pin: bool) -> None:
        self.host = host
        self.pinned_cap_bytes = pinned_cap_bytes
        self.can_pin = can_pin
        self.pinned_bytes = 0

    def next(self, nbytes: int) -> str:
        """The tier of the next block, of ``nbytes`` bytes."""
        if self.host != "pinned":
            return self.host
        cap = self.pinned_cap_bytes
        if not (self.can_pin and (cap is None or self.pinned_bytes + nbytes <= cap)):
            return "pageable"
        self.pinned_bytes += nbytes
        return "pinned"


def plan_tiers(block_bytes: Sequence[int], host: str, pinned_cap_bytes: int | None, can_pin: bool) -> list[str]:
    """The host tier of each block of ``block_bytes`` bytes, in order (see ``TierChoice``)."""
    choice = TierChoice(host, pinned_cap_bytes, can_pin)
    return [choice.next(nbytes) for nbytes in block_bytes]


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other C libraries lack it
    except OSError:
        return None


_MALLOC_TRIM = _find_malloc_trim()


def trim_heap() -> None:
    """Give the C heap's free memory back to the system.

    glibc's malloc raises its mmap threshold once a large block is freed, and then keeps freed
    blocks below it in the heap: loading a model tensor by tensor and packing it into our own
    buffers would leave a model's worth of freed memory in the process (6 GiB for the NF4
    transformer). Does nothing without glibc.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _unregister(buffers: list[torch.Tensor]) -> None:
    for buffer in buffers:
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
    buffers.clear()


class HostMemory:
    """Allocates flat ``uint8`` host buffers in a tier; ``release`` unpins what it pinned."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.cache_dir = cache_dir
        self.pinned_bytes = 0
        self._pinned: list[torch.Tensor] = []
        self.release = weakref.finalize(self, _unregister, self._pinned)
        self.release.atexit = False  # the process's end releases pinned memory anyway

    def allocate(self, tier: str, nbytes: int) -> torch.Tensor:
        if tier == "pageable":
            return torch.empty(nbytes, dtype=torch.uint8)
        if tier == "pinned":
            return self._pinned_buffer(nbytes)
        return self._mapped_buffer(nbytes)

    def _pinned_buffer(self, nbytes: int) -> torch.Tensor:
        buffer = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
        error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
        if error:
            raise KontextError(
                f"pinning {nbytes} bytes of host memory failed (CUDA error {error}); "
                f"{self.pinned_bytes} bytes are pinned already: lower the pinned memory cap"
            )
        self._pinned.append(buffer)
        self.pinned_bytes += nbytes
        return buffer

    def _mapped_buffer(self, nbytes: int) -> torch.Tensor:
        if self.cache_dir is None:
            raise KontextError("the mmap host tier needs a cache folder for its block files")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="kontext-block-", suffix=".bin", dir=self.cache_dir)
        try:
            os.ftruncate(handle, nbytes)
        finally:
            os.close(handle)
        buffer = torch.from_file(name, shared=True, size=nbytes, dtype=torch.uint8)
        with suppress(OSError):  # Windows keeps a mapped file; elsewhere it is gone from the folder now
            os.unlink(name)
        return buffer
