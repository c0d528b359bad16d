"""Compiled blocks: one graph per block kind, shared by every block, device slot and step, cached on disk.

A model's blocks of one kind (same class, same tensors, same storage formats and routes) share one
compiled forward: the block's weights are inputs of the graph, not constants, so streamed blocks
whose tensors are views of reused device slots, resident blocks and every step run the same graph
without recompiling. Each kind gets its own code object, so its graph never counts against another
kind's recompile limit. Forward hooks (the streaming engine's) stay outside the compiled region:
``nn.Module.__call__`` runs them around the compiled ``forward``.

Inductor's caches (FX graphs, compiled kernels) live under the cache folder, so a later run of the
same configuration loads its graphs instead of compiling them; where the installed torch has them,
the portable cache artefacts are saved there too and loaded at start.
"""

from __future__ import annotations

import os
import time
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch
from torch import nn

from ..errors import KontextError
from ..weights.formats.fused import TRITON_CAPABILITY, triton_problem

CHOICES = ("auto", "on", "off")
# The torch.compile backend (tests on the CPU use "aot_eager": the same graph capture, no code generation).
BACKEND = "inductor"
ARTIFACTS = "artifacts.bin"


def resolve(requested: str, device: torch.device) -> tuple[bool, str]:
    """(compile?, why) for ``--compile requested`` on ``device``: ``auto`` compiles on a CUDA GPU where
    Triton is installed and supports the GPU."""
    problem = None if device.type == "cuda" else "no CUDA GPU"
    if requested == "auto" and problem is None and BACKEND == "inductor":
        problem = triton_problem(torch.cuda.get_device_capability(device))
        if problem is not None and find_spec("triton") is None:
            problem += " (pip install triton)"
    return _decide(requested, problem)


def resolve_for_card(requested: str, capability: tuple[int, int] | None) -> tuple[bool, str]:
    """(compile?, why) for a card planned for rather than this machine's (``plan --gpu``, or a
    hypothetical card of ``--vram-budget``: ``capability`` None), where Triton is taken to be installed,
    as ``Machine.with_card`` takes it for dequantization."""
    below = capability is not None and tuple(capability) < TRITON_CAPABILITY
    return _decide(requested, triton_problem(capability) if below else None)


def _decide(requested: str, problem: str | None) -> tuple[bool, str]:
    if requested not in CHOICES:
        raise KontextError(f"unknown --compile {requested!r}: choose one of {', '.join(CHOICES)}")
    if requested == "off":
        return False, "--compile off"
    if requested == "on":
        return True, "--compile on"
    if problem is not None:
        return False, f"{problem}: blocks run eagerly"
    return True, "a CUDA GPU and Triton are present"


def use_cache(folder: Path) -> None:
    """Keep the compiler's caches under ``folder`` (unless the environment names another) and load the
    saved artefacts; a cache that cannot be read is ignored (everything is compiled again)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    saved = folder / ARTIFACTS
    load = getattr(torch.compiler, "load_cache_artifacts", None)
    if load is not None and saved.is_file():
        try:
            load(saved.read_bytes())
        except Exception as error:  # a stale or foreign cache only costs a compile
            warnings.warn(f"compile cache {saved} not loaded ({error}); compiling again", RuntimeWarning, stacklevel=2)


def save_cache(folder: Path) -> None:
    """Write the compiler's portable artefacts of this process to ``folder`` (where torch has them)."""
    save = getattr(torch.compiler, "save_cache_artifacts", None)
    if save is None:
        return
    saved = save()
    if saved is not None:
        tmp = folder / (ARTIFACTS + ".tmp")
        tmp.write_bytes(saved[0])
        tmp.replace(folder / ARTIFACTS)


@dataclass
class Kind:
    """One block kind: its compiled forward, and what compiling it cost."""

    label: str
    forward: Callable[..., object]
    graphs: int = 0  # graphs the backend compiled for it (1 when nothing recompiled)
    seconds: float | None = None  # its first call: compiling (or loading from the cache) and one run
    cache_hits: int = 0  # FX graphs the first call found in the on-disk cache
    failed: str | None = None  # why it runs eagerly after compiling failed


_kinds: dict[tuple, Kind] = {}


def _key(block: nn.Module) -> tuple:
    """What makes two blocks share a graph: class, tensor names and dtypes, layer formats and routes."""
    tensors = tuple((n, t.dtype) for n, t in [*block.named_parameters(), *block.named_buffers()])
    layers = tuple(
        (n, getattr(m, "format", None), getattr(m, "route", None))
        for n, m in block.named_modules()
        if hasattr(m, "format")
    )
    return type(block), tensors, layers


def _kind(block: nn.Module) -> Kind:
    key = _key(block)
    found = _kinds.get(key)
    if found is None:
        cls = type(block)
        label = f"{cls.__name__}_{sum(1 for k in _kinds if k[0] is cls)}"
        template = cls.forward
        # Dynamo keeps compiled graphs (and the recompile limit) per code object: one per kind.
        code = template.__code__.replace(co_name=f"forward_{label}")
        function = types.FunctionType(
            code, template.__globals__, code.co_name, template.__defaults__, template.__closure__
        )
        backend = torch._dynamo.lookup_backend(BACKEND)

        def counting(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            found.graphs += 1
            return backend(gm, example_inputs)

        found = _kinds[key] = Kind(label, torch.compile(function, backend=counting, fullgraph=True))
    return found


@dataclass
class Compiled:
    """The kinds of one model's blocks; ``say`` reports each kind's first (compiling) call."""

    kinds: list[Kind] = field(default_factory=list)
    say: Callable[[str], None] = lambda _: None
    folder: Path | None = None

    @property
    def seconds(self) -> float:
        return sum(k.seconds or 0.0 for k in self.kinds)

    @property
    def graphs(self) -> int:
        return sum(k.graphs for k in self.kinds)


def compile_blocks(blocks: Iterable[nn.Module], say: Callable[[str], None], folder: Path | None) -> Compiled:
    """Give every block of ``blocks`` its kind's compiled forward (compiled at its first call)."""
    result = Compiled(say=say, folder=folder)
    for block in blocks:
        kind = _kind(block)
        if kind not in result.kinds:
            result.kinds.append(kind)
        block.forward = _bound(block, kind, result)
    return result


def restore(blocks: Iterable[nn.Module]) -> None:
    """Give ``blocks`` back their eager forward."""
    for block in blocks:
        block.__dict__.pop("forward", None)


def _bound(block: nn.Module, kind: Kind, owner: Compiled) -> Callable[..., object]:
    eager = type(block).forward

    def forward(*args: object, **kwargs: object) -> object:
        if kind.failed is not None:
            return eager(block, *args, **kwargs)
        if kind.seconds is None:
            return _first_call(block, kind, owner, args, kwargs)
        return kind.forward(block, *args, **kwargs)

    return forward


def _first_call(block: nn.Module, kind: Kind, owner: Compiled, args: tuple, kwargs: dict) -> object:
    """Compile (or load) ``kind`` on its first call, saying so and how long it took."""
    where = f"; later runs load it from {owner.folder}" if owner.folder is not None else ""
    owner.say(f"compiling {kind.label} (first run of this configuration{where})")
    hits = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]
    start = time.perf_counter()
    try:
        out = kind.forward(block, *args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # whatever a compiler raises, the eager forward still works
        kind.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        owner.say(f"compiling {kind.label} failed ({kind.failed}): it runs eagerly")
        return type(block).forward(block, *args, **kwargs)
    if isinstance(out, torch.Tensor | tuple) and torch.cuda.is_available():
        torch.cuda.synchronize()
    kind.seconds = time.perf_counter() - start
    kind.cache_hits = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"] - hits
    source = "loaded from the compile cache" if kind.cache_hits else "compiled"
    owner.say(f"{kind.label}: {source} in {kind.seconds:.1f} s")
    if owner.folder is not None and not kind.cache_hits:
        save_cache(owner.folder)
    return out
