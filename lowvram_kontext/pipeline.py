"""The stages of one Kontext edit, in order, each loading what it needs and freeing what it no longer does.

tokenize -> CLIP and T5 (freed after) -> VAE encode of the condition image -> transformer sampling
-> VAE decode. Components are loaded from whatever files the user has (see ``weights.loading``).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from . import images, sampling
from .errors import KontextError
from .progress import Progress
from .tokenizers import load_tokenizers
from .weights.loading import COMPONENTS, load_component

DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 2.5


@dataclass(frozen=True)
class ModelPaths:
    """Where each component's weights and the tokenizers are."""

    transformer: Path
    t5: Path
    clip: Path
    vae: Path
    tokenizers: Path

    @classmethod
    def resolve(
        cls,
        model: Path | None = None,
        transformer: Path | None = None,
        t5: Path | None = None,
        clip: Path | None = None,
        vae: Path | None = None,
        tokenizers: Path | None = None,
    ) -> ModelPaths:
        """Fill each path from the explicit option, else from the model folder; say what is missing."""
        if model is not None and not Path(model).is_dir():
            raise KontextError(f"{model}: no such model folder")
        given = {"transformer": transformer, "t5": t5, "clip": clip, "vae": vae}
        paths: dict[str, Path] = {}
        for name, path in given.items():
            if path is not None:
                paths[name] = Path(path)
            elif model is not None:
                folder = Path(model) / COMPONENTS[name].folder
                if not folder.is_dir():
                    raise KontextError(
                        f"{model}: the model folder has no {COMPONENTS[name].folder}/ "
                        f"({COMPONENTS[name].label}); pass --{name} FILE"
                    )
                paths[name] = folder
            else:
                raise KontextError(f"no {COMPONENTS[name].label} given: pass --model DIR or --{name} FILE")
            if not paths[name].exists():
                raise KontextError(f"{paths[name]}: no such {COMPONENTS[name].label} file or folder")
        if tokenizers is None and model is None:
            raise KontextError(
                "no tokenizers given: pass --tokenizers DIR (with tokenizer/ and tokenizer_2/)"
            )
        return cls(tokenizers=Path(tokenizers if tokenizers is not None else model), **paths)


@dataclass(frozen=True)
class PromptEmbedding:
    txt: torch.Tensor  # [1, 512, context] T5 states
    vec: torch.Tensor  # [1, pooled] CLIP pooled state


def release(*modules: nn.Module) -> None:
    """Drop what a finished stage held on the device."""
    for module in modules:
        module.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class KontextPipeline:
    """Loads components on demand from ``paths`` and runs edits with them."""

    def __init__(
        self,
        paths: ModelPaths,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: Progress | None = None,
    ):
        self.paths = paths
        self.device = torch.device(device)
        self.dtype = dtype
        self.progress = progress or Progress(quiet=True)
        self._tokenizers = load_tokenizers(paths.tokenizers)
        self._transformer: nn.Module | None = None
        self._vae: nn.Module | None = None

    def _load(self, name: str) -> nn.Module:
        with self.progress.stage(f"load {COMPONENTS[name].label}"):
            return load_component(name, getattr(self.paths, name), self.dtype, self.device)

    @property
    def transformer(self) -> nn.Module:
        if self._transformer is None:
            self._transformer = self._load("transformer")
        return self._transformer

    @property
    def vae(self) -> nn.Module:
        if self._vae is None:
            self._vae = self._load("vae")
        return self._vae

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> PromptEmbedding:
        """Run CLIP and T5 on the prompt; both encoders are freed before returning."""
        clip_tokens, t5_tokens = (t.as_tensor(prompt).to(self.device) for t in self._tokenizers)
        clip = self._load("clip")
        with self.progress.stage("CLIP"):
            vec = clip(clip_tokens)
        release(clip)
        t5 = self._load("t5")
        with self.progress.stage("T5"):
            txt = t5(t5_tokens)
        release(t5)
        return PromptEmbedding(txt=txt, vec=vec)

    def output_size(self, image: Image.Image, width: int | None, height: int | None) -> tuple[int, int]:
        """The (width, height) to edit at: the user's, rounded to the model's grid, else the preferred one."""
        grid = self.vae_grid
        if width is None and height is None:
            return sampling.preferred_resolution(*image.size)
        width = width or round(height * image.width / image.height)  # type: ignore[operator]
        height = height or round(width * image.height / image.width)
        if width < grid or height < grid:
            raise KontextError(f"--width/--height must be at least {grid} pixels")
        return width // grid * grid, height // grid * grid

    @property
    def vae_grid(self) -> int:
        """Image sides must be multiples of this: VAE downsampling times the 2x2 packing."""
        return self.vae.config.downsample_factor * sampling.PACK

    @torch.inference_mode()
    def encode_condition(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """The condition image, resized and VAE-encoded, as packed tokens."""
        pixels = images.to_tensor(images.resize(image, width, height)).to(self.device, self.dtype)
        with self.progress.stage("VAE encode"):
            return sampling.pack(self.vae.encode(pixels))

    @torch.inference_mode()
    def sample(
        self,
        prompt: PromptEmbedding,
        condition: torch.Tensor,
        noise: torch.Tensor,
        steps: int,
        guidance: float,
    ) -> torch.Tensor:
        """Euler sampling from ``noise`` ([1, C, h, w]) given the condition tokens; returns the latent."""
        latent_h, latent_w = noise.shape[-2:]
        target = sampling.pack(noise.float())
        # The condition is encoded at the target's size, so both share one grid of positions.
        ids = torch.cat(
            [sampling.position_ids(latent_h, latent_w, 0), sampling.position_ids(latent_h, latent_w, 1)],
            dim=1,
        ).to(self.device, self.dtype)
        txt_ids = torch.zeros(1, prompt.txt.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance_vec = torch.full((1,), guidance, device=self.device, dtype=self.dtype)
        n_target = target.shape[1]
        transformer = self.transformer

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            img = torch.cat([x.to(self.dtype), condition], dim=1)
            t_vec = torch.full((1,), t, device=self.device, dtype=self.dtype)
            out = transformer(img, ids, prompt.txt, txt_ids, t_vec, prompt.vec, guidance_vec)
            return out[:, :n_target]

        times = sampling.schedule(steps, n_target)
        self.progress.say(
            f"sampling {steps} steps, {n_target} target + {condition.shape[1]} condition tokens"
        )
        self.progress.start_steps()
        tokens = sampling.euler(velocity, target.to(self.device), times, on_step=self.progress.step)
        return sampling.unpack(tokens, latent_h, latent_w)

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> Image.Image:
        with self.progress.stage("VAE decode"):
            pixels = self.vae.decode(latent.to(self.device, self.dtype))
        return images.to_image(pixels)

    def edit(
        self,
        image: Image.Image,
        prompt: str,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
    ) -> Image.Image:
        """One whole edit of ``image`` following ``prompt``."""
        if steps < 1:
            raise KontextError(f"--steps must be at least 1 (got {steps})")
        width, height = self.output_size(image, width, height)
        embedding = self.encode_prompt(prompt)
        condition = self.encode_condition(image, width, height)
        config = self.vae.config
        noise = sampling.initial_noise(seed, height, width, config.z_channels, config.downsample_factor)
        latent = self.sample(embedding, condition, noise, steps, guidance)
        return self.decode(latent)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (as the reference runs), float32 on a CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KontextError("--device cuda: no CUDA GPU is available to this process")
    return torch.device(name)
