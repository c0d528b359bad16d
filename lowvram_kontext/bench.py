"""The benchmark: each profile's measured speed and memory on synthetic weights, against its plan.

For each profile, the model's files are written once in the formats it asks for (random weights of
the real shapes, see ``synthetic``), the planner makes its plan for the card (or for the VRAM
budget, which also caps the allocator), and one whole edit runs through the pipeline: CLIP, T5, VAE
encode, warm-up and timed transformer steps, VAE decode. Everything is released before the next
profile. A streamed profile brings its resident twin (the same transformer format with every block
resident) into the same run, so each row says how far streaming is from keeping everything on the
card, and from the physical floor: the slower of the resident compute and the streamed bytes over
the measured host-to-device rate.

Measured peaks are the allocator's (``max_memory_allocated`` per stage, without the CUDA context);
predicted peaks are compared on the same footing (the plan's stage peak minus the terms that live
outside the allocator: the CUDA context and the runtime reserve). The process's whole device memory
(NVML, context included) is sampled at each stage's end and after each sampling step, and compared
with the plan's whole stage peak. Without CUDA everything runs on the CPU and GPU-only fields are null.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image

from . import __version__
from .bench_report import BenchReport, Row, error_pct, less_kept, size_text
from .compute import compiled
from .demo import demo_image
from .devices import COMPUTE_DTYPES, compute_dtype
from .errors import KontextError
from .hardware import GIB, Machine, cap_allocator, detect, process_vram_bytes
from .lora import LoraSpec, LoraStack
from .pipeline import KontextPipeline
from .planner import ModelSizes, Plan, Profile, load_profiles, plan, resolve_profile
from .progress import Progress
from .prompt_cache import PromptCache
from .synthetic import stored_format, synthetic_lora, synthetic_model
from .weights.formats import fused
from .weights.model_paths import ModelPaths

PROMPT = "Add a small red hat to the cat"
SESSION_PROMPT = "Make it a snowy night"  # the session's second edit; its third repeats it
GUIDANCE = 2.5
SEED = 0
STAGES = ("clip", "t5", "vae_encode", "transformer", "vae_decode")
OUTSIDE_ALLOCATOR = ("CUDA context", "runtime reserve")  # the plan's terms for memory the allocator does not see
RSS_INTERVAL_S = 0.01


@dataclass(frozen=True)
class BenchSettings:
    """What to run: ``profiles`` (empty: all), a VRAM budget (None: the whole card), the edit's size."""

    profiles: tuple[str, ...]
    budget_bytes: int | None
    cache_dir: Path
    width: int = 1024
    height: int = 1024
    steps: int = 4
    warmup: int = 1
    small: bool = False
    session: bool = False  # after the measured edit, two more on the same pipeline (new prompt, repeated prompt)
    references: int = 0  # reference images beside the input (--ref), each at the edit's size
    lora_rank: int = 0  # a random LoRA of this rank on every layer of every transformer block (0: none)
    dtypes: tuple[str, ...] = ("auto",)  # compute dtypes, each profile runs in each (see devices.compute_dtype)
    compute: str = "auto"  # the transformer's route (compute.routes.CHOICES)
    compile: str = "auto"  # compiled blocks: auto, on, off
    beside: tuple[str, ...] = ()  # profiles run as references beside the others (e.g. resident-bf16)
    resident_references: bool = True  # run a streamed profile's resident twin first, as its reference


class _PeakRss:
    """The process's peak resident host memory while the block runs, sampled by a thread."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak = 0

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._process.memory_info().rss)
            if self._stop.wait(RSS_INTERVAL_S):
                return

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Probe(Progress):
    """Silent progress that samples the process's device memory when a stage ends and after each step."""

    def __init__(self, device: torch.device, read: Callable[[], int | None]) -> None:
        super().__init__(quiet=True, device=device)
        self.read = read
        self.stage_end: dict[str, int | None] = {}
        self.steps: list[int | None] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with super().stage(name):
            yield
        self.stage_end[name] = self.read()

    def step(self, done: int, total: int, seconds: float) -> None:
        super().step(done, total, seconds)
        self.steps.append(self.read())


def _vram_reader(device: torch.device) -> tuple[Callable[[], int | None], str | None]:
    """How the process's device memory is read, and what it measures.

    NVML's figure for this process when it answers; inside a container whose process ids NVML does
    not see, the device's used memory (every process on it) instead. Nothing on a CPU.
    """
    if device.type != "cuda":
        return (lambda: None), None
    if process_vram_bytes(device) is not None:
        return (lambda: process_vram_bytes(device)), "nvml process total"

    def used() -> int:
        free, total = torch.cuda.mem_get_info(device)
        return total - free

    return used, "device used (NVML could not see this process)"


def _driver_version() -> str | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
    except pynvml.NVMLError:
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def resident_twin(profiles: dict[str, Profile], name: str) -> str | None:
    """The profile keeping every block of ``name``'s transformer format resident (``resident-FORMAT`` first)."""
    fmt = stored_format("transformer", profiles[name].transformer.format)
    twins = sorted(
        n for n, p in profiles.items()
        if p.transformer.resident_blocks == "all" and stored_format("transformer", p.transformer.format) == fmt
    )  # fmt: skip
    preferred = f"resident-{fmt}"
    return preferred if preferred in twins else (twins[0] if twins else None)


class _Bench:
    """One bench run: the machine, the profiles, and the rows measured so far."""

    def __init__(self, settings: BenchSettings, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.say = say
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        if self.device.type == "cpu" and not settings.small:
            raise KontextError("without a CUDA GPU the bench runs only the tiny model (small settings)")
        self.cuda = self.device.type == "cuda"
        dtypes = (compute_dtype(name, self.device, settings.compute) for name in settings.dtypes)
        self.dtypes = tuple(dict.fromkeys(dtypes))
        self.images: dict[tuple[str, bool, torch.dtype], torch.Tensor] = {}  # each row's output, for dtype errors
        self.profiles = load_profiles()
        settings = replace(
            settings,
            profiles=tuple(resolve_profile(self.profiles, n) for n in settings.profiles),
            beside=tuple(resolve_profile(self.profiles, n) for n in settings.beside),
        )
        self.settings = settings
        self.machine = detect(settings.cache_dir)
        self.read_vram, self.vram_source = _vram_reader(self.device)
        self.notes: list[str] = []

    def card(self, profile: Profile, budget: int | None) -> tuple[Machine, int | None]:
        """(the machine to plan for, the budget to enforce): the budget's card, else the whole GPU.

        Without a GPU a card is hypothetical: the budget's, else the size the profile is meant for.
        The tiny model (``small``) needs none of the host RAM a profile is meant for, so the host is
        taken to have it.
        """
        machine = self.machine
        if self.settings.small:
            machine = machine.with_ram(max(machine.ram_total, int(profile.ram_gib * GIB)))
        if budget is None and not self.cuda:
            budget = int(profile.vram_gib * GIB)
        return (machine if budget is None else machine.with_budget(budget)), budget

    def schedule(self) -> list[tuple[str, bool]]:
        """(profile, is a reference) in run order: the resident twins and the profiles to run beside the
        others first, then the profiles asked for."""
        names = list(self.settings.profiles or sorted(self.profiles))
        twins: list[str] = [name for name in self.settings.beside if name not in names]
        for name in names:
            twin = resident_twin(self.profiles, name)
            streams = self.profiles[name].transformer.resident_blocks != "all"
            if self.settings.resident_references and streams and twin and twin not in names + twins:
                twins.append(twin)
                self.notes.append(f"{twin} added as the resident reference of {name}")
        return [(t, True) for t in twins] + [(n, False) for n in names]

    def run(self) -> BenchReport:
        runs = [(name, reference, dtype) for dtype in self.dtypes for name, reference in self.schedule()]
        rows = [self.run_profile(*run) for run in runs]
        self.compare(rows)
        s = self.settings
        settings = {
            "profiles": [r.profile for r in rows], "budget_bytes": s.budget_bytes, "width": s.width,
            "height": s.height, "steps": s.steps, "warmup": s.warmup, "small": s.small, "lora_rank": s.lora_rank,
            "references": s.references,
            "synthetic_dir": str(s.cache_dir), "prompt": PROMPT, "guidance": GUIDANCE, "seed": SEED,
            "compute": s.compute, "compile": s.compile, "version": __version__,
        }  # fmt: skip
        return BenchReport(self.machine_facts(), settings, rows, self.notes)

    def machine_facts(self) -> dict[str, Any]:
        m = self.machine
        return {
            "gpu": m.gpu_name, "driver": _driver_version() if self.cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda if self.cuda else None, "device": str(self.device),
            "dtypes": [_dtype_name(d) for d in self.dtypes], "vram_total_bytes": m.vram_total or None,
            "cuda_context_bytes": m.cuda_context_bytes if self.cuda else None,
            "h2d_gbps": m.h2d_gbps, "ram_total_bytes": m.ram_total, "process_vram_source": self.vram_source,
        }  # fmt: skip

    def plan_for(self, name: str, reference: bool, sizes: ModelSizes) -> tuple[Plan, int | None, bool]:
        """(plan, budget enforced, lifted): a reference that does not fit the budget runs on the card."""
        s, profile = self.settings, self.profiles[name]
        machine, budget = self.card(profile, s.budget_bytes)
        result = self._plan(machine, sizes, name)
        if not (reference and not result.fits and s.budget_bytes is not None):
            return result, budget, False
        machine, budget = self.card(profile, None)
        lifted = self._plan(machine, sizes, name)
        where = "the whole card" if budget is None else f"a {size_text(budget)} card"
        outcome = f"as a reference it runs on {where}" if lifted.fits else f"nor does it fit {where}"
        self.notes.append(f"{name} does not fit the {size_text(s.budget_bytes)} budget; {outcome}")
        return lifted, budget, True

    def _plan(self, machine: Machine, sizes: ModelSizes, name: str) -> Plan:
        s = self.settings
        compiles = compiled.resolve(s.compile, self.device)[0]
        return plan(
            machine, self.profiles, s.width, s.height, sizes, name, keep_weights=s.session,
            references=s.references, compute=s.compute, compiled=compiles,
        )  # fmt: skip

    def run_profile(self, name: str, reference: bool, dtype: torch.dtype) -> Row:
        s, profile = self.settings, self.profiles[name]
        try:
            paths = synthetic_model(
                s.cache_dir, profile.transformer.format, profile.t5.format, s.small,
                on_write=lambda path: self.say(f"writing synthetic weights {path} (once)"),
            )  # fmt: skip
        except OSError as err:
            raise KontextError(f"{s.cache_dir}: cannot write the synthetic weights ({err.strerror or err})") from None
        sizes = ModelSizes.from_files(paths.transformer, paths.t5, paths.clip, paths.vae)
        loras = self.loras(paths)
        sizes = replace(sizes, adapters=loras.adapter_bytes())
        result, budget, lifted = self.plan_for(name, reference, sizes)
        transformer = result.stage("transformer")
        row = Row(
            profile=name, format=transformer.format, t5_format=result.stage("t5").format, reference=reference,
            dtype=_dtype_name(dtype),
            budget_bytes=budget, budget_lifted=lifted, width=s.width, height=s.height,
            tokens={"text": result.text_tokens, "image": result.image_tokens},
            resident_blocks=transformer.resident_blocks, streamed_blocks=transformer.streamed_blocks,
            predicted_peak_bytes={st.name: st.peak_bytes for st in result.stages},
            predicted_allocator_bytes={
                st.name: st.peak_bytes - sum(st.terms.get(term, 0) for term in OUTSIDE_ALLOCATOR)
                for st in result.stages
            },
            predicted_seconds_per_step=result.seconds_per_step,
            predicted_streamed_bytes_per_step=transformer.streamed_bytes,
        )  # fmt: skip
        if not result.fits:
            row.error = "the plan does not fit: " + "; ".join(result.why_not())
        else:
            self.measure(row, result, paths, budget, dtype, loras)
        outcome = f"{row.seconds_per_step:.3f} s/step" if row.completed else f"failed: {row.error}"
        self.say(f"{name} ({row.dtype}): {outcome}")
        return row

    def loras(self, paths: ModelPaths) -> LoraStack:
        """The synthetic LoRA of ``lora_rank`` (none at 0), read for the model at ``paths``."""
        s = self.settings
        specs = []
        if s.lora_rank:
            self.say(f"synthetic rank-{s.lora_rank} LoRA on every transformer block layer")
            specs.append(LoraSpec(synthetic_lora(s.cache_dir, s.lora_rank, s.small)))
        return LoraStack.of_files(specs, paths.transformer, paths.clip, paths.t5)

    def measure(
        self, row: Row, result: Plan, paths: ModelPaths, budget: int | None, dtype: torch.dtype, loras: LoraStack
    ) -> None:
        """Run one edit under ``result`` and fill ``row``; running out of memory is recorded, not raised."""
        s = self.settings
        probe = _Probe(self.device, self.read_vram)
        rss = _PeakRss()
        pipeline: KontextPipeline | None = None
        try:
            if self.cuda and budget is not None:
                cap_allocator(self.device, budget, self.machine.cuda_context_bytes)
            with rss:
                cache = PromptCache(s.cache_dir / "prompts") if s.session else None
                pipeline = KontextPipeline(
                    paths, self.device, dtype, probe, plan=result, cache_dir=s.cache_dir,
                    keep_weights=s.session, prompt_cache=cache, loras=loras, compute=s.compute, compile=s.compile,
                )  # fmt: skip
                if cache is not None:
                    cache.clear()  # the first edit runs the text encoders, as a fresh run's would
                image = _edit(pipeline, s)
                row.output_finite = pipeline.stats.latent_finite
                self.images[(row.profile, row.reference, dtype)] = torch.from_numpy(np.asarray(image, dtype=np.float32))
                row.dequant_route = fused.device_route(self.device) if self.cuda else None
                first = pipeline.stats  # each edit makes its own
                if s.session:
                    self.session_edits(row, pipeline)
                pipeline.stats = first
            row.completed = True
        except KontextError as exc:  # running out of GPU memory included
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            stats = pipeline.stats if pipeline is not None else None
            if pipeline is not None:
                pipeline.release()
            del pipeline
            self.release()
        row.host_ram_peak_bytes = rss.peak
        if stats is None:
            return
        row.warmup_seconds = stats.step_seconds[: s.warmup]
        row.step_seconds = stats.step_seconds[s.warmup :]
        if row.completed and row.step_seconds:
            row.seconds_per_step = statistics.median(row.step_seconds)
        row.stage_seconds, row.load_seconds = dict(stats.stage_seconds), dict(stats.load_seconds)
        row.bytes_streamed_per_step, row.h2d_gbps = stats.bytes_streamed_per_step, stats.h2d_gbps
        row.route, row.compile_seconds, row.compile_cache_hits = (
            stats.route,
            stats.compile_seconds,
            stats.compile_cache_hits,
        )
        # Device figures: none on a CPU, where the pipeline records no peaks and the probe reads nothing.
        peaks = {name: stats.stage_peak_bytes.get(name) for name in STAGES}
        row.measured_peak_bytes = peaks
        row.process_vram_bytes = {name: probe.stage_end.get(name) for name in STAGES}
        steps = [b for b in probe.steps if b is not None]
        row.process_vram_bytes["transformer"] = max(steps, default=row.process_vram_bytes["transformer"])
        row.kept_bytes = {name: stats.stage_kept_bytes.get(name, 0) for name in STAGES}
        own = row.own_peak_bytes
        row.peak_error_pct = {name: error_pct(row.predicted_allocator_bytes[name], own[name]) for name in STAGES}
        row.peak_error_pct["peak"] = error_pct(row.predicted_peak, row.measured_peak)
        row.process_error_pct = {
            name: error_pct(predicted, less_kept(row.process_vram_bytes[name], row.kept_bytes[name]))
            for name, predicted in row.predicted_peak_bytes.items()
        }

    def session_edits(self, row: Row, pipeline: KontextPipeline) -> None:
        """Two more edits on the pipeline that made the first: what a session's later edits cost."""
        for prompt in (SESSION_PROMPT, SESSION_PROMPT):
            start = time.perf_counter()
            _edit(pipeline, self.settings, prompt)
            row.session_edit_seconds.append(time.perf_counter() - start)
            seconds = pipeline.stats.stage_seconds
            row.session_sampling_decode_seconds.append(seconds["transformer"] + seconds["vae_decode"])
            row.session_text_encoders_ran.append("t5" in seconds)
            row.session_ratios.append(row.session_edit_seconds[-1] / row.session_sampling_decode_seconds[-1])
            row.session_kept_on_device.append(pipeline.on_device)

    def release(self) -> None:
        """Leave the device as the next profile should find it: empty, uncapped, peaks reset."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def compare(self, rows: list[Row]) -> None:
        """Fill each row's ratios to its resident twin and to the physical floor."""
        done = {(r.profile, r.dtype): r for r in rows if r.completed and r.seconds_per_step}
        link = self.machine.h2d_gbps
        for row in rows:
            bf16 = self.images.get((row.profile, row.reference, torch.bfloat16))
            mine = self.images.get((row.profile, row.reference, COMPUTE_DTYPES[row.dtype]))
            if row.dtype != "bfloat16" and bf16 is not None and mine is not None:
                row.image_difference_vs_bfloat16 = float((mine - bf16).abs().mean())
            row.resident_profile = resident_twin(self.profiles, row.profile)
            twin = done.get((row.resident_profile or "", row.dtype))
            if row.seconds_per_step is None or twin is None:
                continue
            resident = twin.seconds_per_step
            row.ratio_to_resident = row.seconds_per_step / resident
            streamed = row.bytes_streamed_per_step or 0
            if streamed and not link:
                continue
            row.floor_seconds_per_step = max(resident, streamed / (link * 1e9) if streamed else 0.0)
            row.ratio_to_floor = row.seconds_per_step / row.floor_seconds_per_step


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _edit(pipeline: KontextPipeline, s: BenchSettings, prompt: str = PROMPT) -> Image.Image:
    """One whole edit of the demo image (with ``s.references`` copies of it as references) through the
    pipeline's own ``edit``, with ``s.warmup`` + ``s.steps`` sampling steps; its figures are then in
    ``pipeline.stats``."""
    references = [demo_image()] * s.references
    return pipeline.edit(demo_image(), prompt, s.warmup + s.steps, GUIDANCE, SEED, s.width, s.height, references)


def run_bench(settings: BenchSettings, say: Callable[[str], None] = lambda _: None) -> BenchReport:
    """Measure every profile of ``settings``; ``say`` gets one line per file written and per profile."""
    return _Bench(settings, say).run()
