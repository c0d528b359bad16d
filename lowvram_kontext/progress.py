"""What the user sees while work runs: one line per stage, one per sampling step."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import Cancelled


def _vram_note(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f", VRAM {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB"


class Progress:
    """Prints progress to stderr unless ``quiet`` (details only when ``verbose``); stdout stays free for results.

    It is also where a running edit can be stopped: once ``cancel`` is set, the next sampling step
    reported raises ``Cancelled``. Steps end between two whole transformer passes, so the pipeline
    is left in a state the next edit can use.
    """

    def __init__(
        self,
        quiet: bool = False,
        device: torch.device | str = "cpu",
        verbose: bool = False,
        cancel: threading.Event | None = None,
    ):
        self.quiet = quiet
        self.verbose = verbose and not quiet
        self.device = torch.device(device)
        self.cancel = cancel

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def detail(self, message: str) -> None:
        """What only a ``--verbose`` run shows: the plan, per-stage peaks."""
        if self.verbose:
            print(message, file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage and report it when it ends."""
        start = time.perf_counter()
        yield
        self.say(f"{name}: {time.perf_counter() - start:.2f} s{_vram_note(self.device)}")

    def step(self, done: int, total: int, seconds: float) -> None:
        """Report sampling step ``done`` of ``total``, which took ``seconds`` (the caller measures it);
        raises ``Cancelled`` when the edit's cancellation was asked for."""
        self.say(f"  step {done}/{total}: {seconds:.2f} s/step{_vram_note(self.device)}")
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"cancelled after step {done}/{total}")
