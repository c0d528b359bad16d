"""The queue of edits: one at a time on the one pipeline, in the order asked, each one's state told as it changes.

A job's state is published whole (a snapshot) on every change, to every listener: a page that
connects late, or misses a change, is up to date with the next one.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FINISHED = ("done", "failed", "cancelled")
IDLE_SECONDS = 10.0  # with nothing queued this long after an edit, the queue is idle (see JobQueue)
KEEP_FINISHED = 200  # finished jobs remembered for late listeners; older ones are forgotten
LISTENER_BACKLOG = 1000  # events a listener may fall behind before it is dropped (a page reconnects)


@dataclass(frozen=True)
class EditRequest:
    """What one edit asks for: the image (a gallery number), the instruction, the sampling settings and the
    strength of every LoRA the server holds (by name; 0: not applied)."""

    image: int
    prompt: str
    seed: int
    steps: int
    guidance: float
    width: int | None = None
    height: int | None = None
    loras: dict[str, float] = field(default_factory=dict)


class Events:
    """Fan-out of events to listeners, each with its own bounded queue; None tells a listener to stop."""

    def __init__(self) -> None:
        self._listeners: set[queue.Queue] = set()
        self._lock = threading.Lock()

    def listen(self) -> queue.Queue:
        listener: queue.Queue = queue.Queue(LISTENER_BACKLOG)
        with self._lock:
            self._listeners.add(listener)
        return listener

    def forget(self, listener: queue.Queue) -> None:
        with self._lock:
            self._listeners.discard(listener)

    def publish(self, event: dict[str, Any] | None) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener.put_nowait(event)
            except queue.Full:  # a listener that stopped reading: drop it rather than hold memory for it
                self.forget(listener)

    def close(self) -> None:
        """Tell every listener that no more events come."""
        self.publish(None)


class Job:
    """One edit's request and its state: queued, running (stage, step, speed, memory), then finished."""

    def __init__(self, number: int, request: EditRequest, publish: Callable[[dict[str, Any]], None]):
        self.id = number
        self.request = request
        self.cancel = threading.Event()  # set to stop the edit at its next sampling step
        self._publish = publish
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {
            "status": "queued",
            "ahead": None,  # jobs before this one (the running one included) while it waits
            "stage": None,
            "step": 0,
            "steps": request.steps,
            "seconds_per_step": None,
            "vram_bytes": None,
            "message": None,
            "result": None,  # the gallery number of the result
            "error": None,
            "timings": {},
            "queued_at": time.time(),
        }

    @property
    def status(self) -> str:
        with self._lock:
            return self._state["status"]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def update(self, **changes: Any) -> None:
        """Change the state and tell every listener; a finished job changes no more.

        The snapshot is published under the job's lock, so that listeners get a job's states in order.
        """
        with self._lock:
            if self._state["status"] in FINISHED:
                return
            self._state.update(changes)
            self._publish(self._snapshot())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        r = self.request
        request = {
            "image": r.image, "prompt": r.prompt, "seed": r.seed, "steps": r.steps,
            "guidance": r.guidance, "width": r.width, "height": r.height, "loras": r.loras,
        }  # fmt: skip
        return {"id": self.id, "request": request, **self._state}


class JobQueue:
    """Runs jobs one at a time on a worker thread with ``run(job)``, which reports through ``job.update``.

    ``run`` sets the job's final status itself; should it raise all the same, the job fails with
    the exception's first line and the worker goes on with the next job. ``on_idle()`` runs on the
    worker once nothing has been queued for ``idle_seconds`` after a job: edits asked for in a row
    do not wait for it.
    """

    def __init__(
        self,
        run: Callable[[Job], None],
        events: Events,
        on_idle: Callable[[], None] = lambda: None,
        idle_seconds: float = IDLE_SECONDS,
    ):
        self._run = run
        self._on_idle = on_idle
        self.idle_seconds = idle_seconds
        self.events = events
        self._jobs: dict[int, Job] = {}
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._last = 0
        self._stopping = False
        self._changed = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="edit-worker", daemon=True)

    def start(self) -> None:
        self._worker.start()

    def _publish(self, snapshot: dict[str, Any]) -> None:
        self.events.publish({"type": "job", "job": snapshot})

    def submit(self, request: EditRequest) -> Job:
        with self._changed:
            if self._stopping:
                raise RuntimeError("the server is stopping")
            self._last += 1
            job = Job(self._last, request, self._publish)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._forget_old()
            self._changed.notify_all()
        self._tell_positions()
        return job

    def get(self, number: int) -> Job | None:
        with self._changed:
            return self._jobs.get(number)

    def active(self) -> list[Job]:
        """The running job and the waiting ones, in order."""
        with self._changed:
            return ([self._running] if self._running is not None else []) + list(self._waiting)

    def cancel(self, job: Job) -> None:
        """A waiting job leaves the queue now; a running one stops at its next sampling step."""
        with self._changed:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
            job.cancel.set()
        if waiting:
            job.update(status="cancelled", ahead=None, message="cancelled before it started")
            self._tell_positions()

    def _tell_positions(self) -> None:
        with self._changed:
            busy = 1 if self._running is not None else 0
            waiting = list(enumerate(self._waiting))
        for index, job in waiting:
            job.update(ahead=busy + index)

    def _forget_old(self) -> None:
        finished = [n for n, job in self._jobs.items() if job.finished]
        for number in finished[: max(len(finished) - KEEP_FINISHED, 0)]:
            del self._jobs[number]

    def _work(self) -> None:
        idle = True  # on_idle has run since the last job
        while True:
            with self._changed:
                busy = self._changed.wait_for(
                    lambda: bool(self._waiting) or self._stopping, timeout=None if idle else self.idle_seconds
                )
                if self._stopping:
                    return
                if busy:
                    job = self._running = self._waiting.popleft()
            if not busy:
                self._on_idle()
                idle = True
                continue
            idle = False
            job.update(status="running", ahead=None, started_at=time.time())
            self._tell_positions()
            try:
                self._run(job)
            except Exception as exc:  # a bug of ours: this job fails, the server goes on
                job.update(status="failed", error=f"unexpected {type(exc).__name__}: {exc}".splitlines()[0])
            with self._changed:
                self._running = None
            self._tell_positions()

    def stop(self) -> None:
        """Cancel what waits, stop the running edit at its next step, and wait for the worker to end."""
        with self._changed:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self._running is not None:
                self._running.cancel.set()
            self._changed.notify_all()
        for job in waiting:
            job.cancel.set()
            job.update(status="cancelled", ahead=None, message="the server stopped")
        if self._worker.is_alive():
            self._worker.join()
