"""The one place the page's edits run: a job's request through ``workflow.Editor`` on the kept pipeline.

Every way an edit can fail ends in the job's state, never in the server: a bad image, a refused
output, running out of memory (after the pipeline's own retry), a cancellation, or a bug of ours.
"""

from __future__ import annotations

import os
import statistics
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import Cancelled, KontextError
from ..pipeline import KontextPipeline
from ..pipeline_stats import PipelineStats
from ..progress import Progress
from ..workflow import Editor, OutputFilter, Refused
from .gallery import Entry, Gallery
from .jobs import Job


class JobProgress(Progress):
    """Progress printed as the command line prints it, and told to the running job's listeners; the job's
    ``cancel`` event stops its edit at the next sampling step."""

    def __init__(self, quiet: bool = False, device: torch.device | str = "cpu", verbose: bool = False):
        super().__init__(quiet=quiet, device=device, verbose=verbose)
        self.job: Job | None = None

    @contextmanager
    def running(self, job: Job) -> Iterator[None]:
        self.job, self.cancel = job, job.cancel
        try:
            yield
        finally:
            self.job, self.cancel = None, None

    def say(self, message: str) -> None:
        super().say(message)
        if self.job is not None:
            self.job.update(message=message.strip())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.job is not None:
            self.job.update(stage=name)
        with super().stage(name):
            yield

    def step(self, done: int, total: int, seconds: float) -> None:
        if self.job is not None:
            vram = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
            self.job.update(step=done, steps=total, seconds_per_step=seconds, vram_bytes=vram)
        super().step(done, total, seconds)


@dataclass(frozen=True)
class Defaults:
    """The settings an edit gets when its request leaves them out, and the largest output it may ask for."""

    steps: int
    guidance: float
    seed: int
    width: int | None
    height: int | None
    max_pixels: int  # what the memory plan was made for
    loras: dict[str, float] = field(default_factory=dict)  # each LoRA's strength as `serve --lora` gave it


class PageEditor:
    """Runs jobs on one pipeline, writing each result into the gallery through the output filter."""

    def __init__(
        self,
        pipeline: KontextPipeline,
        progress: JobProgress,
        gallery: Gallery,
        defaults: Defaults,
        output_filter: OutputFilter | None = None,
    ):
        self.pipeline = pipeline
        self.progress = progress
        self.gallery = gallery
        self.defaults = defaults
        self.output_filter = output_filter
        # The allocator's cache is given back once the queue is idle (``settle``), not inside every edit,
        # where it would hold up the result and make the next edit map the memory again.
        pipeline.settle_after_edit = False

    def run(self, job: Job) -> None:
        """Run ``job`` to its end: done with a result, cancelled, or failed with one line saying why."""
        parent = self.gallery.get(job.request.image)
        if job.cancel.is_set():
            job.update(status="cancelled")
            return
        if parent is None:
            job.update(status="failed", error=f"no image {job.request.image} in this session")
            return
        try:
            with self.progress.running(job):
                self._edit(job, parent)
        except Cancelled as exc:
            job.update(status="cancelled", message=str(exc))
        except Refused as exc:
            job.update(status="failed", error=str(exc))
        except KontextError as exc:  # out of memory after the retry included: the pipeline freed itself
            job.update(status="failed", error=str(exc))
        except Exception as exc:  # a bug of ours: start the next edit from a freshly loaded pipeline
            if os.environ.get("LOWVRAM_KONTEXT_DEBUG"):
                traceback.print_exc()
            self.pipeline.release()
            job.update(status="failed", error=f"unexpected {type(exc).__name__}: {exc}".splitlines()[0])
        if job.status != "done":  # the allocator gives back what the stopped edit held
            self.pipeline.settle()

    def settle(self) -> None:
        """The queue is idle: the allocator gives back its cached device memory (see ``KontextPipeline.settle``)."""
        self.pipeline.settle()

    def _edit(self, job: Job, parent: Entry) -> None:
        r = job.request
        start = time.perf_counter()
        image = self.gallery.image(parent)
        width, height = self.pipeline.output_size(image, r.width, r.height)
        if width * height > self.defaults.max_pixels:
            raise KontextError(
                f"{width}x{height} is more pixels than this server plans for ({self.defaults.max_pixels}): "
                "choose a smaller size, or restart serve with --width/--height"
            )
        for name, strength in r.loras.items():  # this edit's strengths: one number per adapted layer
            self.pipeline.set_lora_strength(name, strength)
        editor = Editor(self.pipeline, r.steps, r.guidance, r.seed, width, height, self.output_filter)
        self.pipeline.stats = PipelineStats()  # this edit's stages only
        prepared = time.perf_counter()
        result = editor.edit(image, r.prompt)
        edited = time.perf_counter()
        number, path = self.gallery.result_path(r.prompt)
        editor.write(result, path, (*parent.prompts, r.prompt), parent.source)
        written = time.perf_counter()
        settings = {
            "seed": r.seed, "steps": r.steps, "guidance": r.guidance, "width": width, "height": height,
            "loras": r.loras,
        }  # fmt: skip
        entry = self.gallery.add_result(number, path, parent, r.prompt, result, settings)
        stats = self.pipeline.stats
        stages = dict(stats.stage_seconds)
        parts = {"read the input": prepared - start, **stats.parts}
        parts["edit: not in a part"] = edited - prepared - sum(stats.parts.values())
        parts["write the PNG"] = written - edited
        parts["record the result"] = time.perf_counter() - written
        timings = {
            "edit": edited - prepared,
            "write": written - edited,
            "stages": stages,
            "sampling_decode": stages.get("transformer", 0.0) + stages.get("vae_decode", 0.0),
            "parts": parts,  # the job's time on the worker, in order; they add up to it
            "first_step": stats.step_seconds[0] if stats.step_seconds else None,
            "later_steps": statistics.median(stats.step_seconds[1:]) if len(stats.step_seconds) > 1 else None,
        }
        job.update(
            status="done", result=entry.number, timings=timings, message=f"wrote {path.name}", finished_at=time.time()
        )
