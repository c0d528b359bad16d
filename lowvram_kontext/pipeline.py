"""The stages of one Kontext edit, in order: the sampling loop and what feeds it.

tokenize -> CLIP and T5 -> VAE encode of the condition image -> transformer sampling -> VAE decode.
Each stage takes its component from ``Components`` (see ``components``: loading, the device, parking,
streaming engines, the dequantization scratch) and hands it back when done. A stage is a method here
that runs between ``components.acquire(name, stage)`` and ``components.done_with(name)`` inside
``self._stage(stage)`` (its time and device peak), with its planned peak in the plan under the same name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from . import images, sampling
from .components import Components
from .compute import compiled, routes
from .errors import KontextError
from .gpus import known_gpu
from .lora import Lora, LoraSpec, LoraStack
from .lora import apply as lora_apply
from .lora import attach as attach_lora
from .models.autoencoder import AutoEncoderConfig
from .offload.streaming import model_blocks
from .paths import cache_dir as default_cache_dir
from .pipeline_stats import PipelineStats
from .planner import Plan
from .progress import Progress
from .prompt_cache import PromptCache, encoder_identity
from .prompt_cache import key as cache_key
from .tokenizers import load_tokenizers
from .vae_tiling import decode_tiled, encode_tiled
from .weights.compressed_linear import CompressedLinear
from .weights.loading import COMPONENTS, open_component
from .weights.model_paths import ModelPaths

DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 2.5
DECODE_OVERLAP = 8  # latent pixels shared by neighbouring VAE tiles (at most a quarter of a tile)
ENCODE_OVERLAP = 64  # image pixels, likewise


def _overlap(tile: int, preferred: int, multiple: int = 1) -> int:
    """The overlap for ``tile``: ``preferred``, or a quarter of small tiles, a multiple of ``multiple``."""
    return min(preferred, tile // 4) // multiple * multiple


@dataclass(frozen=True)
class PromptEmbedding:
    txt: torch.Tensor  # [1, 512, context] T5 states
    vec: torch.Tensor  # [1, pooled] CLIP pooled state


@dataclass(frozen=True)
class Reference:
    """A reference image beside the main one, encoded: its packed tokens and their grid."""

    tokens: torch.Tensor  # [1, rows * cols, channels]
    rows: int
    cols: int


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synchronize_compute(device: torch.device) -> None:
    """Wait for the compute stream only: copies a streaming engine issued on its side stream go on."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class KontextPipeline:
    """Runs edits with the components read from ``paths``.

    Without a plan every component is loaded whole onto ``device`` (weights the file holds
    compressed stay compressed). With a plan (see ``planner``) each component is held and streamed as
    the plan's profile says: storage format, resident blocks, prefetch, host tier, VAE tiles.
    """

    def __init__(
        self,
        paths: ModelPaths,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: Progress | None = None,
        plan: Plan | None = None,
        cache_dir: Path | None = None,
        replan: Callable[[str], Plan] | None = None,
        keep_weights: bool = False,
        prompt_cache: PromptCache | None = None,
        loras: LoraStack | None = None,
        compute: str = "auto",
        compile: str = "auto",
    ):
        """``replan(profile_name)`` gives the plan of another profile: the fallback after running out of memory.

        With ``keep_weights`` every component stays loaded between edits: what a stage no longer
        needs on the device goes back to host memory instead of being dropped, so the next edit
        reads nothing from disk (successive edits, sessions, batches); under a plan a component
        stays on the device after its stage until a later stage's planned peak needs its room (see
        ``Components``). Without it the text encoders and, under a plan, the transformer are dropped
        once used, which keeps host memory lowest.
        With a ``prompt_cache`` a prompt seen before with the same text encoders skips them entirely.
        ``loras`` are applied to each component as it is loaded; ``add_lora``, ``remove_lora`` and
        ``set_lora_strength`` change them between edits without loading anything again.
        ``compute`` is the transformer's route (``compute.routes.CHOICES``); ``compile`` ("auto", "on",
        "off") whether the transformer's and T5's blocks run compiled (``compute.compiled``).
        """
        self.paths = paths
        self.device = torch.device(device)
        self.dtype = dtype
        self.progress = progress or Progress(quiet=True)
        self.replan = replan
        self.keep_weights = keep_weights
        self.prompt_cache = prompt_cache
        self.loras = loras if loras is not None else LoraStack.of_files((), paths.transformer, paths.clip, paths.t5)
        self._encoder_identity: str | None = None
        self.stats = PipelineStats()
        self.compute = compute
        self.compiles, why = compiled.resolve(compile, self.device)
        self._compile_folder = (cache_dir or default_cache_dir()) / "compiled"
        if self.compiles:
            compiled.use_cache(self._compile_folder)
        elif compile == "auto" and self.device.type == "cuda":
            self.progress.say(f"compile: off ({why})")
        self._compiled: dict[str, compiled.Compiled] = {}
        self.tokenizers = load_tokenizers(paths.tokenizers)  # CLIP's and T5's
        self._vae_config = vae_config(paths.vae)
        files = {name: getattr(paths, name) for name in COMPONENTS}
        self.components = Components(
            files, self.device, dtype, self.progress, plan, keep_weights, cache_dir, on_load=self._loaded,
            adapt=lambda name, model, layers: self.loras.apply(name, model, self.dtype, layers),
            after_load=self._prepare, moving=lambda what: self.stats.part(what),
        )  # fmt: skip
        # After an edit the allocator gives back its cached device memory (see ``settle``); a caller that
        # settles at a better time (the page, once its queue is idle) turns this off.
        self.settle_after_edit = True

    @property
    def plan(self) -> Plan | None:
        """The memory plan the edits run under (a smaller one after running out of memory); None: all whole."""
        return self.components.plan

    @property
    def on_device(self) -> list[str]:
        """The components whose weights are on the device now (kept there between stages or edits)."""
        return self.components.on_device

    def _loaded(self, name: str, seconds: float) -> None:
        self.stats.load_seconds[name] = seconds
        self.stats.add_part(f"load {name}", seconds)

    def _prepare(self, name: str, model: nn.Module) -> None:
        """A component just loaded (its LoRAs on): the transformer's compute route, compiled blocks."""
        if name == "transformer":
            route = self.route(model)
            counts = routes.apply(model, route)
            self.stats.route = route.name
            layers = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))
            self.progress.say(
                f"transformer compute: {route.name} ({route.reason})" + (f"; layers: {layers}" if layers else "")
            )
        if name in ("transformer", "t5") and self.compiles:
            self._compiled[name] = compiled.compile_blocks(model_blocks(model), self.progress.say, self._compile_folder)

    def route(self, model: nn.Module) -> routes.Route:
        """The transformer's route: ``--compute``, its blocks' storage format and this GPU's tensor cores."""
        formats = [m.format for m in model.modules() if isinstance(m, CompressedLinear)]
        storage = max(set(formats), key=formats.count) if formats else "bf16"
        capability, tensor_cores = None, True
        if self.device.type == "cuda":
            capability = torch.cuda.get_device_capability(self.device)
            card = known_gpu(torch.cuda.get_device_name(self.device))
            tensor_cores = card.tensor_cores if card is not None else True
        route = routes.choose(self.compute, storage, capability, self.compiles, tensor_cores)
        if route.w8a8 and self.device.type == "cuda" and self.dtype not in routes.W8A8_DTYPES:
            fallback = "fp16" if self.dtype == torch.float16 else "bf16"
            return routes.Route(fallback, f"{route.name} W8A8 computes in bfloat16 or float16 only")
        return route

    def add_lora(self, spec: LoraSpec) -> Lora:
        """Read the LoRA of ``spec`` and apply it from the next edit on; loaded weights stay as they are."""
        lora = self.loras.read(spec)
        self.loras.add(lora)
        for component in lora.updates:
            self.components.change(component, lambda model, c=component: attach_lora(lora, c, model, self.dtype))
        self._replan_for_loras()
        return lora

    def remove_lora(self, name: str) -> Lora:
        """Stop applying the LoRA ``name``; loaded weights stay as they are."""
        lora = self.loras.get(name)
        self.loras.remove(lora)
        for component in lora.updates:
            self.components.change(component, lambda model: lora_apply.detach(model, lora.key))
        self._replan_for_loras()
        return lora

    def set_lora_strength(self, name: str, strength: float) -> Lora:
        """Re-weight the LoRA ``name``: one number per adapted layer, nothing moves."""
        lora = self.loras.get(name)
        lora.strength = strength
        for component in lora.updates:
            model = self.components.held(component)
            if model is not None:
                lora_apply.set_strength(model, lora.key, strength)
        return lora

    def _replan_for_loras(self) -> None:
        """The same profile planned again, counting the LoRAs now in use (its formats, hence the loaded
        weights, stay; the components the change touched are packed again for their next stage)."""
        if self.plan is not None and self.replan is not None:
            self.components.plan = self.replan(self.plan.profile.name)

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Run a stage: its time and its device peak go to ``stats`` and the progress line."""
        self.stats.stage_kept_bytes[name] = self.components.kept_bytes(name)
        with self.stats.part(f"wait for the device before {name}"):  # earlier work; side-stream uploads go on
            _synchronize_compute(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with self.progress.stage(name):
            yield
            _synchronize(self.device)
        self.stats.stage_seconds[name] = time.perf_counter() - start
        self.stats.add_part(name, self.stats.stage_seconds[name])
        if self.device.type == "cuda":
            self.stats.stage_peak_bytes[name] = torch.cuda.max_memory_allocated(self.device)

    def _vae_tile(self, stage: str) -> int | None:
        """The plan's VAE tile side for ``stage`` in image pixels; None to run whole."""
        return None if self.plan is None else self.plan.stage(stage).tile

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> PromptEmbedding:
        """Run CLIP and T5 on the prompt (or take their output from the cache); both give their device
        memory back before returning unless the pipeline keeps weights under a plan."""
        with self.stats.part("prompt cache"):
            cache_key = self._prompt_key(prompt)
            cached = self.prompt_cache.get(cache_key) if cache_key is not None else None
            if cached is not None:
                self.progress.say("prompt embedding: from the cache, text encoders skipped")
                txt, vec = (t.to(self.device, self.dtype) for t in cached)
                return PromptEmbedding(txt=txt, vec=vec)
        with self.stats.part("tokenize"):
            clip_tokens, t5_tokens = (t.as_tensor(prompt).to(self.device) for t in self.tokenizers)
        clip = self.components.acquire("clip", "clip")
        with self._stage("clip"):
            vec = clip(clip_tokens)
        self.components.done_with("clip")
        t5 = self.components.acquire("t5", "t5")
        with self._stage("t5"):
            txt = t5(t5_tokens)
        self.components.done_with("t5")
        with self.stats.part("prompt cache"):
            written = cache_key is None or self.prompt_cache.put(cache_key, txt.cpu(), vec.cpu(), prompt=prompt)
        if not written:
            self.progress.say(f"prompt embedding: could not write the cache in {self.prompt_cache.folder}")
        return PromptEmbedding(txt=txt, vec=vec)

    def _prompt_key(self, prompt: str) -> str | None:
        """The cache key of ``prompt`` with these text encoders and tokenizers; None without a cache."""
        if self.prompt_cache is None:
            return None
        if self._encoder_identity is None:
            tokenizers = [self.paths.tokenizers / "tokenizer", self.paths.tokenizers / "tokenizer_2"]
            self._encoder_identity = encoder_identity([self.paths.t5, self.paths.clip, *tokenizers])
        loras = self.loras.text_identity()  # "" without LoRAs on the text encoders: keys as before
        return cache_key(prompt, f"{self._encoder_identity}|{loras}" if loras else self._encoder_identity, self.dtype)

    def output_size(self, image: Image.Image, width: int | None, height: int | None) -> tuple[int, int]:
        """The (width, height) to edit ``image`` at (see ``output_size``)."""
        return sampling.output_size(image, width, height, self.vae_grid)

    @property
    def vae_grid(self) -> int:
        """Image sides must be multiples of this (see ``vae_grid``)."""
        return sampling.vae_grid(self._vae_config)

    @torch.inference_mode()
    def encode_condition(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """The condition image, resized and VAE-encoded, as packed tokens."""
        with self.stats.part("prepare the image"):
            pixels = images.to_tensor(images.resize(image, width, height)).to(self.device, self.dtype)
        vae = self.components.acquire("vae", "vae_encode")
        tile = self._vae_tile("vae_encode")
        with self._stage("vae_encode"):
            if tile is None:
                latent = vae.encode(pixels)
            else:
                factor = vae.config.downsample_factor
                latent = encode_tiled(vae, pixels, tile, _overlap(tile, ENCODE_OVERLAP, factor))
            return sampling.pack(latent)

    def encode_reference(self, image: Image.Image, width: int, height: int) -> Reference:
        """A reference image encoded like the condition, at the edit's pixel area in its own aspect ratio."""
        grid = self.vae_grid
        ref_width, ref_height = sampling.reference_size(width, height, image.width, image.height, grid)
        return Reference(self.encode_condition(image, ref_width, ref_height), ref_height // grid, ref_width // grid)

    @torch.inference_mode()
    def sample(
        self,
        prompt: PromptEmbedding,
        condition: torch.Tensor,
        noise: torch.Tensor,
        steps: int,
        guidance: float,
        references: Sequence[Reference] = (),
    ) -> torch.Tensor:
        """Euler sampling from ``noise`` ([1, C, h, w]) given the condition tokens (and those of any
        reference images, appended after them); returns the latent."""
        latent_h, latent_w = noise.shape[-2:]
        with self.stats.part("prepare sampling"):
            target = sampling.pack(noise.float())
            # The condition is encoded at the target's size, so both share one grid of positions.
            grids = [(latent_h // sampling.PACK, latent_w // sampling.PACK), *((r.rows, r.cols) for r in references)]
            ids = torch.cat([sampling.position_ids(latent_h, latent_w, 0), sampling.condition_ids(grids)], dim=1)
            ids = ids.to(self.device, self.dtype)
            if references:
                condition = torch.cat([condition, *(r.tokens for r in references)], dim=1)
            txt_ids = torch.zeros(1, prompt.txt.shape[1], 3, device=self.device, dtype=self.dtype)
            guidance_vec = torch.full((1,), guidance, device=self.device, dtype=self.dtype)
            n_target = target.shape[1]
        transformer = self.components.acquire("transformer", "transformer")
        engine = self.components.engine("transformer")
        streamed_before = engine.bytes_streamed if engine is not None else 0
        # Counted without waiting for the copies: the resident blocks' uploads go on beside the first step.
        copies_before = engine.copies_issued() if engine is not None else 0

        times = sampling.schedule(steps, n_target)
        modulations: dict[float, torch.Tensor] = {}  # each step's, by its time

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            img = torch.cat([x.to(self.dtype), condition], dim=1)
            t_vec = torch.full((1,), t, device=self.device, dtype=self.dtype)
            mod = modulations[t].to(self.device, non_blocking=True)
            out = transformer(img, ids, prompt.txt, txt_ids, t_vec, prompt.vec, guidance_vec, modulations=mod)
            return out[:, :n_target]

        step_ends: list[float] = []

        def on_step(done: int, total: int) -> None:
            _synchronize(self.device)  # device work is asynchronous: a step ends when its kernels have
            step_ends.append(time.perf_counter())
            self.progress.step(done, total, step_ends[-1] - step_ends[-2])

        with_refs = f" ({len(references)} reference images)" if references else ""
        self.progress.say(
            f"sampling {steps} steps, {n_target} target + {condition.shape[1]} condition tokens{with_refs}"
        )
        with self._stage("transformer"):
            # Every block's modulation at every step, in one pass over the modulation weights (lent to the
            # device one module at a time when they stream), kept on the host.
            t = torch.tensor(times[:-1], device=self.device, dtype=self.dtype)
            vec = transformer.vector(t, prompt.vec.to(self.dtype).expand(len(t), -1), guidance_vec.expand(len(t)))
            rows = transformer.modulations(vec, engine.lent if engine is not None else None).cpu()
            modulations.update(zip(times[:-1], rows.split(1), strict=True))
            step_ends.append(time.perf_counter())
            tokens = sampling.euler(velocity, target.to(self.device), times, on_step=on_step)
        step_seconds = [end - start for start, end in zip(step_ends[:-1], step_ends[1:], strict=True)]
        self.stats.step_seconds = step_seconds
        blocks = self._compiled.get("transformer")
        if blocks is not None:
            self.stats.compile_seconds = blocks.seconds
            self.stats.compile_cache_hits = sum(k.cache_hits for k in blocks.kinds)
        if engine is not None:
            with self.stats.part("sampling statistics"):  # waits for the next forward's first loads
                self.stats.bytes_streamed_per_step = (engine.bytes_streamed - streamed_before) // steps
                copies = engine.copy_times()[copies_before:]
                seconds = sum(c.seconds for c in copies)
                self.stats.h2d_gbps = sum(c.nbytes for c in copies) / seconds / 1e9 if seconds > 0 else None
        return sampling.unpack(tokens, latent_h, latent_w)

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> Image.Image:
        # The plan gives the decoder the memory the transformer held; without one everything stays whole.
        self.components.done_with("transformer", stay=self.plan is None)
        vae = self.components.acquire("vae", "vae_decode")
        tile = self._vae_tile("vae_decode")
        with self._stage("vae_decode"):
            z = latent.to(self.device, self.dtype)
            if tile is None:
                pixels = vae.decode(z)
            else:
                latent_tile = tile // vae.config.downsample_factor
                pixels = decode_tiled(vae, z, latent_tile, _overlap(latent_tile, DECODE_OVERLAP))
        with self.stats.part("to image"):
            return images.to_image(pixels)

    def release(self) -> None:
        """Free everything the pipeline holds, on the device and on the host."""
        self.components.release()

    def edit(
        self,
        image: Image.Image,
        prompt: str,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        references: Sequence[Image.Image] = (),
    ) -> Image.Image:
        """One whole edit of ``image`` following ``prompt``, with ``references`` beside it; ``stats`` then
        describe this edit.

        Running out of GPU memory in any stage frees everything and retries the edit once with the
        next smaller plan (the profile predicted to need less memory) instead of failing.
        """
        if steps < 1:
            raise KontextError(f"an edit needs at least 1 step (got {steps})")
        width, height = self.output_size(image, width, height)
        retried = False
        while True:
            self.stats = PipelineStats()
            try:
                return self._edit(image, prompt, steps, guidance, seed, width, height, references)
            except torch.OutOfMemoryError as exc:
                self.components.release()
                failed = self.plan.profile.name if self.plan is not None else "everything resident"
                if retried:
                    raise KontextError(f"out of GPU memory again with profile {failed}") from None
                smaller = self._smaller_plan()
                if smaller is None:
                    detail = str(exc).split("\n")[0]
                    raise KontextError(
                        f"out of GPU memory ({failed}: {detail}) and no smaller plan to fall back to: "
                        "plan for a smaller budget or choose a smaller profile"
                    ) from None
            self.progress.say(f"out of GPU memory with profile {failed}: retrying once with {smaller.profile.name}")
            self.components.plan = smaller
            retried = True

    def _smaller_plan(self) -> Plan | None:
        """The plan of the profile predicted to need the most memory below the current plan's peak."""
        if self.plan is None or self.replan is None:
            return None
        lower = [c for c in self.plan.candidates if c.peak_bytes < self.plan.peak_bytes]
        if not lower:
            return None
        return self.replan(max(lower, key=lambda c: (c.fits, c.peak_bytes)).name)

    def _edit(
        self,
        image: Image.Image,
        prompt: str,
        steps: int,
        guidance: float,
        seed: int,
        width: int,
        height: int,
        references: Sequence[Image.Image],
    ) -> Image.Image:
        embedding = self.encode_prompt(prompt)
        condition = self.encode_condition(image, width, height)
        encoded = [self.encode_reference(reference, width, height) for reference in references]
        config = self._vae_config
        with self.stats.part("prepare sampling"):
            noise = sampling.initial_noise(seed, height, width, config.z_channels, config.downsample_factor)
        latent = self.sample(embedding, condition, noise, steps, guidance, encoded)
        with self.stats.part("check the latent"):
            self.stats.latent_finite = bool(latent.isfinite().all())  # the decoded image would hide it
        result = self.decode(latent)
        if self.settle_after_edit:
            with self.stats.part("settle"):
                self.settle()
        return result

    def settle(self) -> None:
        """After an edit: the allocator gives its cached device memory back, so that between edits the
        process holds only the components kept on the device (a session may wait long for its next line)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def vae_config(path: Path) -> AutoEncoderConfig:
    """The configuration of the VAE at ``path``, read without loading its weights."""
    return open_component(COMPONENTS["vae"], path)[0]
