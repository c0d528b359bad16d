"""What the machine has: the GPU and its free memory, host RAM, disk, and the host-to-device link speed.

``detect()`` reads it once; the planner only ever sees the resulting ``Machine``. NVML (the
``pynvml`` module of the ``nvidia-ml-py`` package) is optional: it is imported lazily and, when
missing, the CUDA context size falls back to a documented default and the process's device total
is unknown. ``Machine.with_budget`` makes a big card look like a small one (``--vram-budget``), and
``cap_allocator`` makes PyTorch's allocator enforce that budget so a plan that overflows fails loudly.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import psutil
import torch

from .card_speed import cached_matmul_tflops, cached_measurement
from .errors import KontextError
from .gpus import REFERENCE_EFFICIENCY, GpuSpec, known_gpu
from .paths import cache_dir
from .weights.formats.fused import TRITON_CAPABILITY, kernels_choice, route_for

GIB = 1 << 30
MIB = 1 << 20

# The CUDA context (driver state, kernels of torch and its libraries) lives outside the caching
# allocator. About 300-600 MiB on recent drivers and torch builds with lazy module loading; this is
# used when NVML cannot measure it.
DEFAULT_CUDA_CONTEXT_BYTES = 500 * MIB

# The link speed is measured with one pinned copy of this size, repeated, timed with CUDA events.
LINK_PROBE_BYTES = 256 * MIB
LINK_PROBE_REPEATS = 4
LINK_CACHE_NAME = "link_speed.json"


@dataclass(frozen=True)
class Machine:
    """Facts about the machine a plan is made for. Sizes are in bytes.

    ``vram_free`` is what this process may use on the GPU in all, its own CUDA context included
    (the driver's free memory plus what the process already holds). ``h2d_gbps`` is the pinned
    host-to-device copy rate in GB/s (None when not measured). ``disk_free`` is None when unknown.
    """

    gpu_name: str | None
    vram_total: int
    vram_free: int
    compute_capability: tuple[int, int] | None
    supports_bf16: bool
    supports_fp8: bool
    cuda_context_bytes: int
    cuda_context_measured: bool
    ram_total: int
    ram_available: int
    disk_free: int | None
    h2d_gbps: float | None
    # Achieved dense fp16/bf16 matmul rate (calibrated, or a table card's specification at the
    # reference's efficiency), memory bandwidth (table cards), the dequantization route. None: unknown,
    # and the planner assumes the GPU its time model was measured on.
    matmul_tflops: float | None = None
    memory_gbps: float | None = None
    dequant_route: str = "triton"
    card_link_gbps: float | None = None  # the card's own PCIe link (table cards), when not measured
    tensor_cores: bool = True  # False for GTX 16xx and older (table cards): no int8 tensor-core matmuls

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None

    @classmethod
    def cpu_only(cls, ram_total: int, ram_available: int, disk_free: int | None = None) -> Machine:
        """A machine without a CUDA GPU."""
        return cls(
            gpu_name=None,
            vram_total=0,
            vram_free=0,
            compute_capability=None,
            supports_bf16=False,
            supports_fp8=False,
            cuda_context_bytes=0,
            cuda_context_measured=False,
            ram_total=ram_total,
            ram_available=ram_available,
            disk_free=disk_free,
            h2d_gbps=None,
        )

    def with_budget(self, vram_bytes: int) -> Machine:
        """The machine as an otherwise idle card of ``vram_bytes`` would look.

        On a real GPU the budget cannot exceed what is free there. Without a GPU the card is
        hypothetical: it gets the default CUDA context size and bf16/fp8 support is assumed.
        """
        if vram_bytes <= 0:
            raise KontextError(f"the VRAM budget must be positive (got {vram_bytes} bytes)")
        if self.has_gpu:
            return replace(self, vram_total=vram_bytes, vram_free=min(vram_bytes, self.vram_free))
        return replace(
            self,
            vram_total=vram_bytes,
            vram_free=vram_bytes,
            supports_bf16=True,
            supports_fp8=True,
            cuda_context_bytes=DEFAULT_CUDA_CONTEXT_BYTES,
        )

    def with_card(self, spec: GpuSpec) -> Machine:
        """This host with ``spec``'s card instead of its own GPU: an idle card of the table, its speeds
        from the specification (``plan --gpu``)."""
        pascal = spec.capability < TRITON_CAPABILITY
        return replace(
            self,
            gpu_name=f"{spec.name} (from the GPU table)",
            vram_total=int(spec.vram_gib * GIB),
            vram_free=int(spec.vram_gib * GIB),
            compute_capability=spec.capability,
            supports_bf16=spec.bf16,
            supports_fp8=spec.fp8,
            cuda_context_bytes=DEFAULT_CUDA_CONTEXT_BYTES,
            cuda_context_measured=False,
            h2d_gbps=None,
            card_link_gbps=spec.link_gbps,
            matmul_tflops=spec.tflops * REFERENCE_EFFICIENCY,
            memory_gbps=spec.memory_gbps,
            dequant_route="torch" if pascal or kernels_choice() == "torch" else "triton",
            tensor_cores=spec.tensor_cores,
        )

    def with_ram(self, ram_bytes: int) -> Machine:
        """The machine as a host with ``ram_bytes`` of RAM would look (available capped to it)."""
        if ram_bytes <= 0:
            raise KontextError(f"the RAM size must be positive (got {ram_bytes} bytes)")
        return replace(self, ram_total=ram_bytes, ram_available=min(ram_bytes, self.ram_available))

    def describe(self) -> str:
        """One line: the GPU (or its absence), VRAM, RAM and link."""
        ram = f"RAM {self.ram_total / GIB:.1f} GiB ({self.ram_available / GIB:.1f} available)"
        if self.vram_total == 0:
            return f"no CUDA GPU, {ram}"
        gpu = self.gpu_name or "no CUDA GPU: a hypothetical card"
        link = f"{self.h2d_gbps:.1f} GB/s pinned" if self.h2d_gbps else "link not measured"
        return f"{gpu}, VRAM {self.vram_free / GIB:.1f} of {self.vram_total / GIB:.1f} GiB usable, {ram}, {link}"


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", re.IGNORECASE)
# Memory is sold in binary units whatever the label says: a card sold as "8 GB" and a 16 GB stick of
# RAM hold 8 and 16 GiB. So GB, G and GiB all mean 2**30 bytes here (likewise K, M, T).
_UNITS = {
    "": GIB,
    "b": 1,
    **{unit: 1 << (10 * i) for i, p in enumerate(("k", "m", "g", "t"), start=1) for unit in (p, f"{p}b", f"{p}ib")},
}
MAX_SIZE = 1 << 50  # 1 PiB: far above any machine, low enough that byte counts stay exact integers


def parse_size(text: str) -> int:
    """Bytes of a memory size such as ``8GiB``, ``8GB``, ``7.5G``, ``6000MiB`` or ``8`` (a plain number is GiB).

    Units are binary as memory is sold (``8GB`` = ``8GiB`` = 8 * 2**30 bytes); case is ignored.
    """
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise KontextError(
            f"cannot read the size {text!r}: expected a number with an optional unit, "
            "e.g. 8GB, 7.5G, 6000MB or 8 (GB; units are binary: 8GB = 8GiB)"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise KontextError(f"the size {text!r} must be more than zero")
    if size > MAX_SIZE:
        raise KontextError(f"the size {text!r} is more than any machine holds (at most 1 PiB)")
    return size


def format_size(nbytes: int) -> str:
    """A byte count as people read memory and file sizes: ``8.00 GiB``, ``512.00 MiB``, ``3.50 KiB``, ``12 B``."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


@functools.cache
def cpu_threads() -> int:
    """Threads for CPU compute: the cores this process may use that other processes are not busy on.

    More threads than free cores is much slower, not a little: every parallel region waits for its
    slowest thread, and a thread that shares its core waits for the other process's time slice
    (the demo, 2 cores, one of them busy: 26-57 s with 2 threads, 7 s with one). Decided once per
    process, so that repeated runs in one process compute alike.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(psutil.cpu_count(logical=False) or usable, usable, _cgroup_cpus() or usable)
    busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, cores - busy)


def use_cpu_threads() -> None:
    """Run torch's CPU work on ``cpu_threads()`` threads, unless $OMP_NUM_THREADS says how many."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads())


def _cgroup_cpus() -> int | None:
    """The CPUs a container's quota allows (cgroup v2 ``cpu.max``), or None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, int(quota) // int(period))


def _nvml() -> ModuleType | None:
    """The initialised NVML module, or None when it is not installed or finds no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def _nvml_process_bytes(device: torch.device) -> int | None:
    """Device memory NVML charges to this process (context included), or None when it cannot tell."""
    nvml = _nvml()
    if nvml is None:
        return None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        return None
    # In a container with its own PID namespace NVML's PIDs are the host's: no match, no answer.
    used = [p.usedGpuMemory for p in processes if p.pid == os.getpid() and p.usedGpuMemory]
    return used[0] if used else None


def process_vram_bytes(device: torch.device | str | int | None = None) -> int | None:
    """This process's total device memory as NVML sees it (CUDA context included); None without NVML."""
    if not torch.cuda.is_available():
        return None
    return _nvml_process_bytes(_cuda_device(device))


def _cuda_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise KontextError(f"{device} is not a CUDA device")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def cuda_context_bytes(device: torch.device | str | int | None = None) -> tuple[int, bool]:
    """(bytes of this process's CUDA context, whether measured) on ``device``, creating the context.

    Measured as NVML's figure for the process minus what the caching allocator has reserved; the
    documented default when NVML cannot tell.
    """
    device = _cuda_device(device)
    torch.cuda.init()
    total = _nvml_process_bytes(device)
    if total is None:
        return DEFAULT_CUDA_CONTEXT_BYTES, False
    return max(0, total - torch.cuda.memory_reserved(device)), True


def measure_h2d_gbps(device: torch.device | str | int | None = None) -> float:
    """Pinned host-to-device copy rate in GB/s: a 256 MiB copy, warmed up, timed with CUDA events."""
    device = _cuda_device(device)
    with torch.cuda.device(device):
        source = torch.empty(LINK_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
        target = torch.empty(LINK_PROBE_BYTES, dtype=torch.uint8, device=device)
        target.copy_(source, non_blocking=True)  # warm-up: first-touch and driver set-up
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(LINK_PROBE_REPEATS):
            target.copy_(source, non_blocking=True)
        stop.record()
        stop.synchronize()
        seconds = start.elapsed_time(stop) / 1000
        del source, target
        torch.cuda.empty_cache()
    return LINK_PROBE_BYTES * LINK_PROBE_REPEATS / seconds / 1e9


def cached_link_speed(gpu_name: str, measure: Callable[[], float], cache: Path | None = None) -> float:
    """The link speed for ``gpu_name`` from the JSON cache, else ``measure()``d once and stored there."""
    return cached_measurement(cache if cache is not None else cache_dir() / LINK_CACHE_NAME, gpu_name, measure)


def _disk_free(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def detect(weights_path: Path | str | None = None, measure_link: bool = True) -> Machine:
    """Read this machine: the current CUDA GPU (if any), RAM, and free disk where ``weights_path`` is.

    ``disk_free`` is for ``weights_path``, by default the cache folder (where converted weights go).
    The link speed and the matmul rate are measured once per GPU model and cached under the cache
    folder (``measure_link`` False: neither is measured). Missing NVML, Triton or a failing probe
    leave figures unknown; they never stop detection.
    """
    memory = psutil.virtual_memory()
    disk = _disk_free(Path(weights_path) if weights_path is not None else cache_dir())
    if not torch.cuda.is_available():
        return Machine.cpu_only(memory.total, memory.available, disk)
    device = _cuda_device(None)
    props = torch.cuda.get_device_properties(device)
    context, measured = cuda_context_bytes(device)
    free, total = torch.cuda.mem_get_info(device)
    capability = (props.major, props.minor)
    link = cached_link_speed(props.name, lambda: measure_h2d_gbps(device)) if measure_link else None
    dtype = torch.bfloat16 if capability >= (8, 0) else torch.float16
    tflops = cached_matmul_tflops(props.name, device, dtype) if measure_link else None
    spec = known_gpu(props.name)
    return Machine(
        gpu_name=props.name,
        vram_total=total,
        vram_free=min(total, free + context + torch.cuda.memory_reserved(device)),
        compute_capability=capability,
        supports_bf16=capability >= (8, 0),
        supports_fp8=capability >= (8, 9),
        cuda_context_bytes=context,
        cuda_context_measured=measured,
        ram_total=memory.total,
        ram_available=memory.available,
        disk_free=disk,
        h2d_gbps=link,
        matmul_tflops=tflops,
        memory_gbps=spec.memory_gbps if spec else None,
        dequant_route=route_for(capability)[0],
        card_link_gbps=spec.link_gbps if spec else None,
        tensor_cores=spec.tensor_cores if spec else True,
    )


def usable_now(machine: Machine, device: torch.device | str | int | None = None) -> Machine:
    """``machine`` as its GPU stands now: what this process still holds (memory the plan did not count on)
    and what other processes took since are no longer free for a plan. Unchanged without CUDA."""
    if not machine.has_gpu or not torch.cuda.is_available():
        return machine
    device = _cuda_device(device)
    device_free, _ = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_allocated(device)
    spare = torch.cuda.memory_reserved(device) - held
    usable = min(machine.vram_free - held, device_free + spare + machine.cuda_context_bytes)
    return replace(machine, vram_free=max(usable, 0))


def cap_allocator(device: torch.device | str | int | None, budget_bytes: int, context_bytes: int | None = None) -> int:
    """Cap PyTorch's allocator on ``device`` so this process stays within ``budget_bytes`` in all.

    The CUDA context is outside the allocator, so the cap is the budget minus the context
    (measured when ``context_bytes`` is not given). Returns the allocator's cap in bytes; an
    allocation beyond it raises an out-of-memory error instead of passing by luck.
    """
    if not torch.cuda.is_available():
        raise KontextError("a VRAM budget can only be enforced on a CUDA GPU, and none is available")
    device = _cuda_device(device)
    if context_bytes is None:
        context_bytes, _ = cuda_context_bytes(device)
    total = torch.cuda.get_device_properties(device).total_memory
    cap = min(budget_bytes - context_bytes, total)
    if cap <= 0:
        raise KontextError(
            f"VRAM budget {budget_bytes / GIB:.2f} GiB is not more than the CUDA context alone "
            f"({context_bytes / GIB:.2f} GiB)"
        )
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    return cap
