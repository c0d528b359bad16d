"""LoRAs: every public layout against diffusers' ``load_lora_weights``, strengths, compressed and streamed
weights, session changes without reloading, the prompt cache, the planner's count, bad files."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lowvram_kontext import cli, sampling
from lowvram_kontext.demo import demo_image
from lowvram_kontext.errors import KontextError
from lowvram_kontext.hardware import Machine
from lowvram_kontext.lora import LoraSpec, LoraStack, apply, model_layers
from lowvram_kontext.models.flux import FluxTransformer
from lowvram_kontext.offload import StreamSettings, stream_model
from lowvram_kontext.pipeline import KontextPipeline
from lowvram_kontext.planner import ModelSizes, Streaming, VaeSettings, load_profiles, plan
from lowvram_kontext.prompt_cache import PromptCache
from lowvram_kontext.tiny import TINY_FLUX
from lowvram_kontext.tokenizers import load_tokenizers
from lowvram_kontext.weights.compressed_linear import CompressedLinear
from lowvram_kontext.weights.flux_layout import diffusers_linears
from lowvram_kontext.weights.formats import quantize
from lowvram_kontext.weights.loading import load_component
from lowvram_kontext.weights.model_paths import ModelPaths
from lowvram_kontext.weights.safetensors_file import save_safetensors

RANK = 4
PROMPT = "Make the snowman wear a red hat"
GIB = 2**30


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------ LoRA files in each layout


def _factors(rows: int, columns: int, g: torch.Generator, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair whose update is about a third of a layer's own weights (~1/sqrt(inputs))."""
    down = torch.randn(rank, columns, generator=g) / math.sqrt(columns)
    up = torch.randn(rows, rank, generator=g) * 0.35 / math.sqrt(rank)
    return down, up


def _flux_linears() -> dict[str, tuple[int, int]]:
    with torch.device("meta"):
        model = FluxTransformer(TINY_FLUX)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _clip_linears(clip_config) -> dict[str, tuple[int, int]]:  # noqa: ANN001
    from lowvram_kontext.models.clip import CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(clip_config)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def kohya(clip_config, g: torch.Generator, comfy: bool = False) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """sd-scripts names (or ComfyUI's ``diffusion_model.`` spelling) on every block layer but the single
    blocks' ``linear1`` (diffusers converts that one for the full-size model only: see the test of fused
    layers), alpha = rank / 2. diffusers' conversion drops kohya LoRAs outside the blocks (embedders, final
    layer), so those are tested in the PEFT layout, which it reads.
    """
    sd = {}
    for name, (rows, columns) in _flux_linears().items():
        if name.endswith("linear1") or not name.startswith(("double_blocks.", "single_blocks.")):
            continue
        key = f"diffusion_model.{name}" if comfy else "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _factors(rows, columns, g)
        sd[f"{key}.alpha"] = torch.tensor(float(RANK / 2))
    for name, (rows, columns) in _clip_linears(clip_config).items():
        key = "lora_te1_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _factors(rows, columns, g)
        sd[f"{key}.alpha"] = torch.tensor(float(RANK / 2))
    return sd


def peft(clip_config, g: torch.Generator) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """diffusers / PEFT names (ai-toolkit writes these): split q, k, v and proj_mlp, norm_out; no alpha."""
    sd = {}
    for name, part in diffusers_linears(TINY_FLUX).items():
        columns = _flux_linears()[part.bfl][1]
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = _factors(
            part.rows, columns, g
        )
    for name, (rows, columns) in _clip_linears(clip_config).items():
        sd[f"text_encoder.{name}.lora_A.weight"], sd[f"text_encoder.{name}.lora_B.weight"] = _factors(rows, columns, g)
    return sd


def xlabs(g: torch.Generator) -> dict[str, torch.Tensor]:
    """XLabs' processor names: attention qkv and proj of both streams, the single blocks' qkv rows."""
    h = TINY_FLUX.hidden_size
    sd = {}
    for i in range(TINY_FLUX.depth):
        for stream in ("1", "2"):
            for kind, rows in (("qkv", 3 * h), ("proj", h)):
                key = f"double_blocks.{i}.processor.{kind}_lora{stream}"
                sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = _factors(rows, h, g)
    for i in range(TINY_FLUX.depth_single_blocks):
        key = f"single_blocks.{i}.processor.qkv_lora"
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = _factors(3 * h, h, g)
    return sd


def mixture(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Kohya-style names over diffusers modules (``lora_transformer_``), with alphas: the layers diffusers'
    conversion of this layout knows (attention in the blocks, the layers outside them)."""
    sd = {}
    for name, part in diffusers_linears(TINY_FLUX).items():
        if name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and ".attn." not in name:
            continue
        columns = _flux_linears()[part.bfl][1]
        key = "lora_transformer_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _factors(part.rows, columns, g)
        sd[f"{key}.alpha"] = torch.tensor(float(RANK / 2))
    return sd


def bfl_peft(g: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """BFL names with PEFT's lora_A / lora_B (as ComfyUI saves them), and the same weights as kohya names."""
    ours, reference = {}, {}
    for name, (rows, columns) in _flux_linears().items():
        if name.endswith("linear1") or not name.startswith(("double_blocks.", "single_blocks.")):
            continue  # what diffusers reads of kohya names, see ``kohya``
        down, up = _factors(rows, columns, g)
        ours[f"diffusion_model.{name}.lora_A.weight"], ours[f"diffusion_model.{name}.lora_B.weight"] = down, up
        key = "lora_unet_" + name.replace(".", "_")
        reference[f"{key}.lora_down.weight"], reference[f"{key}.lora_up.weight"] = down, up
    return ours, reference


# ------------------------------------------------------------------ running both sides


@pytest.fixture(scope="module")
def tiny(tiny_files):  # noqa: ANN001, ANN201
    root, weights = tiny_files
    return root, weights


@pytest.fixture(scope="module")
def reference_pipe(tiny):  # noqa: ANN001, ANN201
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(str(tiny[0] / "diffusers"), dtype=torch.float32)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(6, 3).float()
    return {
        "img": torch.randn(1, 6, TINY_FLUX.in_channels, generator=g),
        "img_ids": img_ids,
        "txt": torch.randn(1, 5, TINY_FLUX.context_in_dim, generator=g),
        "txt_ids": torch.zeros(5, 3),
        "t": torch.tensor([0.6]),
        "y": torch.randn(1, TINY_FLUX.vec_in_dim, generator=g),
        "guidance": torch.tensor([2.5]),
    }


def run_transformer(model: nn.Module) -> torch.Tensor:
    x = _inputs()
    with torch.inference_mode():
        return model(x["img"], x["img_ids"][None], x["txt"], x["txt_ids"][None], x["t"], x["y"], x["guidance"])


def clip_ids(root: Path) -> torch.Tensor:
    return load_tokenizers(root / "diffusers")[0].as_tensor(PROMPT)


def ours(
    root: Path, lora: Path | None, strength: float = 1.0, storage: str = "file"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(transformer output, CLIP pooled output) of our models loaded with ``lora`` applied."""
    paths = ModelPaths.resolve(model=root / "diffusers")
    specs = [] if lora is None else [LoraSpec(lora, strength)]
    stack = LoraStack.of_files(specs, paths.transformer, paths.clip, paths.t5)
    transformer = load_component("transformer", paths.transformer, torch.float32, "cpu", storage)
    clip = load_component("clip", paths.clip, torch.float32)
    stack.apply("transformer", transformer, torch.float32)
    stack.apply("clip", clip, torch.float32)
    with torch.inference_mode():
        return run_transformer(transformer), clip(clip_ids(root))


def theirs(pipe, root: Path, lora: dict[str, torch.Tensor], strength: float) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The same from diffusers' pipeline after ``load_lora_weights`` at ``strength``."""
    pipe.load_lora_weights({k: v.clone() for k, v in lora.items()}, adapter_name="test")
    try:
        pipe.set_adapters(["test"], adapter_weights=[strength])
        x = _inputs()
        with torch.inference_mode():
            out = pipe.transformer(
                hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                timestep=x["t"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                return_dict=False,
            )[0]  # fmt: skip
            pooled = pipe.text_encoder(input_ids=clip_ids(root)).pooler_output
    finally:
        pipe.delete_adapters("test")
    return out, pooled


def _write(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "style.safetensors") -> Path:
    path = tmp_path / name
    save_safetensors(sd, path)
    return path


LAYOUTS = ["kohya", "peft", "comfy", "xlabs", "mixture"]


def _layout(name: str, clip_config) -> dict[str, torch.Tensor]:  # noqa: ANN001
    g = torch.Generator().manual_seed(LAYOUTS.index(name))
    return {
        "kohya": lambda: kohya(clip_config, g),
        "peft": lambda: peft(clip_config, g),
        "comfy": lambda: kohya(clip_config, g, comfy=True),
        "xlabs": lambda: xlabs(g),
        "mixture": lambda: mixture(g),
    }[name]()


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_equals_diffusers_load_lora_weights(tiny, reference_pipe, tmp_path, layout, strength) -> None:  # noqa: ANN001
    root, weights = tiny
    sd = _layout(layout, weights.clip_config)
    path = _write(tmp_path, sd)
    base_out, base_pooled = ours(root, None)
    got_out, got_pooled = ours(root, path, strength)
    want_out, want_pooled = theirs(reference_pipe, root, sd, strength)
    assert rel_err(got_out - base_out, base_out) > 0.05, "the LoRA must change the output noticeably"
    assert rel_err(got_out, want_out) < 1e-4
    assert rel_err(got_pooled, want_pooled) < 1e-4
    if layout in ("kohya", "peft", "comfy"):
        assert rel_err(got_pooled - base_pooled, base_pooled) > 0.01


def test_kohya_fused_layers_equal_their_split_form(tiny, reference_pipe, tmp_path) -> None:  # noqa: ANN001
    """A kohya LoRA on the fused ``linear1`` and ``qkv`` equals, in diffusers, its split form: the same down
    matrix for each of q, k, v (and the MLP), the up matrix cut by rows, as diffusers converts full-size files."""
    root, _ = tiny
    g = torch.Generator().manual_seed(11)
    h, mlp = TINY_FLUX.hidden_size, TINY_FLUX.mlp_hidden_dim
    ours_sd, split = {}, {}
    fused = {
        "single_blocks.1.linear1": (
            "single_transformer_blocks.1",
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            (h, h, h, mlp),
        ),
        "double_blocks.0.txt_attn.qkv": (
            "transformer_blocks.0",
            ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            (h, h, h),
        ),
    }
    for name, (block, parts, rows) in fused.items():
        down, up = _factors(sum(rows), h, g)
        key = "lora_unet_" + name.replace(".", "_")
        ours_sd[f"{key}.lora_down.weight"], ours_sd[f"{key}.lora_up.weight"] = down, up
        ours_sd[f"{key}.alpha"] = torch.tensor(float(RANK))
        for part, piece in zip(parts, up.split(rows), strict=True):
            split[f"transformer.{block}.{part}.lora_A.weight"] = down
            split[f"transformer.{block}.{part}.lora_B.weight"] = piece
    got, _ = ours(root, _write(tmp_path, ours_sd))
    want, _ = theirs(reference_pipe, root, split, 1.0)
    assert rel_err(got, want) < 1e-4


def test_bfl_names_with_lora_a_b_equal_diffusers(tiny, reference_pipe, tmp_path) -> None:  # noqa: ANN001
    """ComfyUI's ``diffusion_model.`` names with PEFT's lora_A / lora_B equal diffusers given them as kohya names."""
    root, _ = tiny
    sd, reference = bfl_peft(torch.Generator().manual_seed(9))
    got, _ = ours(root, _write(tmp_path, sd))
    want, _ = theirs(reference_pipe, root, reference, 1.0)
    assert rel_err(got, want) < 1e-4


def test_strength_zero_is_exactly_no_lora_and_strength_scales(tiny, tmp_path) -> None:  # noqa: ANN001
    root, weights = tiny
    path = _write(tmp_path, _layout("kohya", weights.clip_config))
    base = ours(root, None)
    zero = ours(root, path, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(base, zero, strict=True))
    # A single layer's update is linear in the strength.
    layer = CompressedLinear(quantize(torch.randn(32, 16), "f32"))
    down, up = torch.randn(RANK, 16), torch.randn(32, RANK)
    x = torch.randn(3, 16)
    plain = layer(x)
    layer.adapters["a"] = apply.LowRank(down, up, 0.5)
    half = layer(x) - plain
    layer.adapters["a"].strength = 1.0
    assert torch.allclose(layer(x) - plain, 2 * half, atol=1e-5)
    assert torch.allclose(layer(x) - plain, x @ down.T @ up.T, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "Q8_0"])
def test_compressed_weights_get_the_same_update(fmt: str) -> None:
    """The LoRA adds the same term beside a compressed weight as beside a plain one: nothing is requantized."""
    weight = torch.randn(256, 64) / 8
    down, up = torch.randn(RANK, 64) / 8, torch.randn(256, RANK) / 100  # a small update, smaller than NF4's step
    x = torch.randn(5, 64)
    deltas = []
    for storage in ("f32", fmt):
        layer = CompressedLinear(quantize(weight, storage))
        before = layer(x)
        apply_to = nn.Module()
        apply_to.layer = layer
        apply.attach(apply_to, "a", {"layer": _update(down, up)}, 1.0, torch.float32)
        deltas.append(apply_to.layer(x) - before)
        assert apply_to.layer.weight.format == storage
    # The update goes into each layer's own float32 copy of its weight: equal up to float32 rounding.
    assert torch.allclose(deltas[0], deltas[1], rtol=1e-4, atol=1e-5)
    assert deltas[1].abs().max() > 0


def _update(down: torch.Tensor, up: torch.Tensor):  # noqa: ANN202
    from lowvram_kontext.lora.layouts import Update

    return Update(down, up)


@pytest.mark.parametrize("fmt", ["nf4", "Q8_0"])
def test_lora_on_compressed_model_is_the_float_lora_delta(tiny, tmp_path, fmt: str) -> None:  # noqa: ANN001
    root, weights = tiny
    path = _write(tmp_path, _layout("kohya", weights.clip_config))
    base_f, _ = ours(root, None)
    lora_f, _ = ours(root, path)
    base_q, _ = ours(root, None, storage=fmt)
    lora_q, _ = ours(root, path, storage=fmt)
    # The same update, seen through the quantized model: the difference is of the order of its own error.
    assert rel_err(lora_q - base_q, lora_f - base_f) < 3 * rel_err(base_q, base_f)


@pytest.mark.parametrize("fmt", ["nf4", "Q8_0"])
def test_streamed_lora_equals_resident_bit_for_bit(tiny, tmp_path, fmt: str) -> None:  # noqa: ANN001
    root, weights = tiny
    path = _write(tmp_path, _layout("peft", weights.clip_config))
    paths = ModelPaths.resolve(model=root / "diffusers")
    stack = LoraStack.of_files([LoraSpec(path, 0.7)], paths.transformer, paths.clip, paths.t5)

    def loaded() -> nn.Module:
        model = load_component("transformer", paths.transformer, torch.float32, "cpu", fmt)
        stack.apply("transformer", model, torch.float32)
        return model

    expected = run_transformer(loaded())
    for host in ("pageable", "mmap"):
        model = loaded()
        engine = stream_model(model, "cpu", StreamSettings(resident=1, prefetch=1, host=host, cache_dir=tmp_path))
        # The factors were packed with their blocks: streamed blocks hold views of one slot.
        streamed = model.double_blocks[1].img_attn.qkv.adapters["lora1"].down
        assert streamed.untyped_storage().data_ptr() != 0
        for _ in range(2):
            assert torch.equal(run_transformer(model), expected)
        engine.detach()


# ------------------------------------------------------------------ the pipeline and the session


SIZE = 48


def _plan(root: Path, name: str = "streamed", stack: LoraStack | None = None):  # noqa: ANN202
    profiles = load_profiles()
    streamed = Streaming(format="nf4", resident_blocks=1, prefetch=1, host="pageable")
    profiles[name] = replace(
        profiles["nf4-stream"], name=name, transformer=streamed, t5=streamed, vae=VaeSettings("never")
    )
    paths = ModelPaths.resolve(model=root / "diffusers")
    sizes = ModelSizes.from_files(transformer=paths.transformer, t5=paths.t5, clip=paths.clip, vae=paths.vae)
    machine = Machine.cpu_only(ram_total=64 * GIB, ram_available=48 * GIB).with_budget(8 * GIB)

    def replan(profile: str | None):  # noqa: ANN202
        adapters = stack.adapter_bytes() if stack is not None else {}
        return plan(machine, profiles, SIZE, SIZE, replace(sizes, adapters=adapters), profile, keep_weights=True)

    return replan


def _pipeline(root: Path, specs: list[LoraSpec]) -> KontextPipeline:
    paths = ModelPaths.resolve(model=root / "diffusers")
    stack = LoraStack.of_files(specs, paths.transformer, paths.clip, paths.t5)
    replan = _plan(root, stack=stack)
    return KontextPipeline(paths, plan=replan("streamed"), replan=replan, keep_weights=True, loras=stack)


def _edit(pipe: KontextPipeline) -> np.ndarray:
    return np.asarray(pipe.edit(demo_image(SIZE), PROMPT, steps=2, seed=3, width=SIZE, height=SIZE))


def test_session_adds_reweights_and_removes_without_reloading(tiny, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from lowvram_kontext import components as components_module

    root, weights = tiny
    path = _write(tmp_path, _layout("kohya", weights.clip_config))
    with_lora = _edit(_pipeline(root, [LoraSpec(path, 0.8)]))

    loads: list[str] = []
    real_load = components_module.ComponentReader
    monkeypatch.setattr(
        components_module, "ComponentReader", lambda name, *a, **k: loads.append(name) or real_load(name, *a, **k)
    )
    session = _pipeline(root, [])
    assert session.plan.stage("transformer").streamed_blocks == 4
    plain = _edit(session)
    lora = session.add_lora(LoraSpec(path, 0.8))
    assert np.array_equal(_edit(session), with_lora)
    assert not np.array_equal(with_lora, plain)
    session.set_lora_strength(lora.name, 0.0)
    assert np.array_equal(_edit(session), plain)
    session.set_lora_strength(lora.name, 0.8)
    assert np.array_equal(_edit(session), with_lora)
    session.remove_lora(lora.name)
    assert np.array_equal(_edit(session), plain)
    assert sorted(loads) == ["clip", "t5", "transformer", "vae"]  # each read from disk once
    session.release()


def test_planner_counts_the_lora_bytes_with_their_blocks(tiny, tmp_path) -> None:  # noqa: ANN001
    root, weights = tiny
    paths = ModelPaths.resolve(model=root / "diffusers")
    without = _plan(root)("streamed")
    kohya_file = _write(tmp_path, _layout("kohya", weights.clip_config), "kohya.safetensors")
    stack = LoraStack.of_files([LoraSpec(kohya_file)], paths.transformer, paths.clip, paths.t5)
    with_lora = _plan(root, stack=stack)("streamed")
    blocks = stack.adapter_bytes()["transformer"].blocks
    # rank 4 on a double block's ten layers, 2 bytes a value: 4 x (in + out) values per layer
    assert blocks[0] == 2 * RANK * sum(
        i + o for n, (o, i) in _flux_linears().items() if n.startswith("double_blocks.0.")
    )
    assert len(blocks) == 5 and blocks[-1] > 0
    # Each update is priced in the step: rank 4 on every layer the file adapts, with its shape.
    layers = stack.adapter_bytes()["transformer"].layers
    shapes = _flux_linears()
    assert {(a.name, a.rank, (a.out_features, a.in_features)) for a in layers} == {
        (name, RANK, shapes[name]) for name in stack.get("kohya").updates["transformer"]
    }
    assert without.lora_seconds == 0 < with_lora.lora_seconds
    assert with_lora.seconds_per_step > without.seconds_per_step
    t_without, t_with = without.stage("transformer"), with_lora.stage("transformer")
    assert t_with.slot_bytes == t_without.slot_bytes + max(blocks[1:])  # streamed with their blocks
    assert t_with.terms["resident blocks"] == t_without.terms["resident blocks"] + blocks[0]
    # Layers outside the blocks (PEFT names reach them) and CLIP's are resident.
    peft_file = _write(tmp_path, _layout("peft", weights.clip_config), "peft.safetensors")
    stack = LoraStack.of_files([LoraSpec(peft_file)], paths.transformer, paths.clip, paths.t5)
    with_lora, adapters = _plan(root, stack=stack)("streamed"), stack.adapter_bytes()
    assert with_lora.stage("transformer").terms["LoRAs outside the blocks"] == adapters["transformer"].rest > 0
    assert with_lora.stage("clip").terms["weights"] == without.stage("clip").terms["weights"] + adapters["clip"].rest


def test_prompt_cache_is_keyed_by_the_clip_loras(tiny, tmp_path) -> None:  # noqa: ANN001
    root, weights = tiny
    clip_only = {k: v for k, v in _layout("kohya", weights.clip_config).items() if k.startswith("lora_te1_")}
    unet_only = {k: v for k, v in _layout("kohya", weights.clip_config).items() if k.startswith("lora_unet_")}
    clip_path, unet_path = (
        _write(tmp_path, clip_only, "clip.safetensors"),
        _write(tmp_path, unet_only, "unet.safetensors"),
    )
    pipe = KontextPipeline(
        ModelPaths.resolve(model=root / "diffusers"), prompt_cache=PromptCache(tmp_path / "cache"), keep_weights=True
    )
    plain_key = pipe._prompt_key(PROMPT)
    pipe.add_lora(LoraSpec(unet_path))
    assert pipe._prompt_key(PROMPT) == plain_key  # the transformer's LoRA does not change the text embedding
    lora = pipe.add_lora(LoraSpec(clip_path, 0.5))
    half = pipe._prompt_key(PROMPT)
    assert half != plain_key
    first = pipe.encode_prompt(PROMPT)
    pipe.set_lora_strength(lora.name, 1.0)
    assert pipe._prompt_key(PROMPT) not in (plain_key, half)
    assert not torch.equal(pipe.encode_prompt(PROMPT).vec, first.vec)
    pipe.set_lora_strength(lora.name, 0.5)
    assert torch.equal(pipe.encode_prompt(PROMPT).vec, first.vec)
    pipe.set_lora_strength(lora.name, 0.0)
    assert pipe._prompt_key(PROMPT) == plain_key
    pipe.release()


def test_t5_lora_equals_merged_weights(tiny, tmp_path) -> None:  # noqa: ANN001
    """sd-scripts' ``lora_te3_`` T5 LoRA: the model with it equals the model with W + scale x up @ down merged."""
    root, _ = tiny
    paths = ModelPaths.resolve(model=root / "diffusers")
    g = torch.Generator().manual_seed(5)
    t5 = load_component("t5", paths.t5, torch.float32)
    merged = load_component("t5", paths.t5, torch.float32)
    sd = {}
    for name, module in t5.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("encoder.block."):
            down, up = _factors(*module.weight.shape, g)
            key = "lora_te3_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(2.0)
            merged.get_submodule(name).weight.data += 0.5 * 2.0 / RANK * up @ down
    stack = LoraStack.of_files([LoraSpec(_write(tmp_path, sd), 0.5)], paths.transformer, paths.clip, paths.t5)
    stack.apply("t5", t5, torch.float32)
    ids = load_tokenizers(root / "diffusers")[1].as_tensor(PROMPT)
    with torch.inference_mode():
        assert rel_err(t5(ids), merged(ids)) < 1e-5


# ------------------------------------------------------------------ the command line


EDIT_STEPS = 4
SEED = 7


def _run_edit(tmp_path: Path, *args: str) -> tuple[int, Path]:
    out = tmp_path / "out.png"
    code = cli.main([
        "edit", "--out", str(out), "--steps", str(EDIT_STEPS), "--seed", str(SEED), "--dtype", "float32",
        "--device", "cpu", "--width", "64", "--height", "64", "--quiet", "--no-prompt-cache", *args,
    ])  # fmt: skip
    return code, out


def test_edit_with_a_lora_equals_diffusers_pipeline(tiny, reference_pipe, tmp_path) -> None:  # noqa: ANN001
    root, weights = tiny
    sd = _layout("kohya", weights.clip_config)
    path = _write(tmp_path, sd)
    image = tmp_path / "snowman.png"
    demo_image(64).save(image)
    code, out = _run_edit(
        tmp_path, "--model", str(root / "diffusers"), "--image", str(image), "--prompt", PROMPT, "--lora", f"{path}:0.5"
    )
    assert code == 0
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
    assert "style.safetensors" in Image.open(out).text["loras"]
    reference_pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="edit")
    try:
        reference_pipe.set_adapters(["edit"], adapter_weights=[0.5])
        result = reference_pipe(
            image=Image.open(image).convert("RGB"), prompt=PROMPT, height=64, width=64, max_area=64 * 64,
            _auto_resize=False, num_inference_steps=EDIT_STEPS, guidance_scale=2.5,
            latents=sampling.pack(sampling.initial_noise(SEED, 64, 64, channels=16).float()),
            max_sequence_length=512, output_type="np",
        ).images[0]  # fmt: skip
    finally:
        reference_pipe.delete_adapters("edit")
    want = np.round(result.astype(np.float64) * 255)
    assert got.std() > 5
    assert np.abs(got - want).mean() < 1.0


def _bad_file(kind: str, tmp_path: Path, clip_config) -> Path:  # noqa: ANN001
    good = _layout("kohya", clip_config)
    path = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        save_safetensors(good, path)
        path.write_bytes(path.read_bytes()[:-1000])
    elif kind == "sdxl":
        down, up = torch.randn(4, 320), torch.randn(320, 4)
        save_safetensors({
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
        }, path)  # fmt: skip
    elif kind == "ranks":
        good["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = torch.randn(256, RANK + 1)
        save_safetensors(good, path)
    elif kind == "shapes":  # a LoRA for a wider model
        good["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.randn(RANK, 3072)
        save_safetensors(good, path)
    elif kind == "dora":
        good["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.ones(1, 256)
        save_safetensors(good, path)
    elif kind == "lokr":
        save_safetensors({"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.ones(4, 4)}, path)
    elif kind == "not-safetensors":
        path = tmp_path / "style.ckpt"
        path.write_bytes(b"\x80\x02}q\x00.")
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "truncated"),
        ("sdxl", "match no layer of this model"),
        ("ranks", "ranks disagree"),
        ("shapes", "do not fit"),
        ("dora", "DoRA adapter"),
        ("lokr", "LoKr adapter"),
        ("not-safetensors", "read as .safetensors only"),
        ("missing", "no such LoRA file"),
    ],
)
def test_bad_lora_files_fail_in_one_line_with_nothing_written(tiny, tmp_path, capsys, kind, message) -> None:  # noqa: ANN001
    root, weights = tiny
    path = _bad_file(kind, tmp_path, weights.clip_config)
    image = tmp_path / "in.png"
    demo_image(64).save(image)
    code, out = _run_edit(
        tmp_path, "--model", str(root / "diffusers"), "--image", str(image), "--prompt", "x", "--lora", str(path)
    )
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_unmatched_keys_are_named(tiny) -> None:  # noqa: ANN001
    root, _ = tiny
    layers = model_layers(root / "flux1-kontext-dev.safetensors")
    from lowvram_kontext.lora.files import Pair

    pairs = [Pair(f"lora_unet_input_blocks_{i}_proj", torch.ones(1, 4), torch.ones(4, 1), None) for i in range(5)]
    with pytest.raises(
        KontextError, match=r"5 of its 5 LoRA layers .* e\.g\. lora_unet_input_blocks_0_proj, .* and 2 more"
    ):
        layers.resolve(pairs, "x.safetensors")


@pytest.mark.parametrize(
    ("text", "path", "strength"),
    [
        ("style.safetensors", "style.safetensors", 1.0),
        ("style.safetensors:0.6", "style.safetensors", 0.6),
        ("C:\\loras\\style.safetensors:-0.5", "C:\\loras\\style.safetensors", -0.5),
        ("C:\\loras\\style.safetensors", "C:\\loras\\style.safetensors", 1.0),
        ("odd:name.safetensors", "odd:name.safetensors", 1.0),
    ],
)
def test_lora_spec_parsing(text: str, path: str, strength: float) -> None:
    assert LoraSpec.parse(text) == LoraSpec(Path(path), strength)


def test_session_lora_commands(tiny, tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    import io

    root, weights = tiny
    path = _write(tmp_path, _layout("kohya", weights.clip_config))
    image = tmp_path / "in.png"
    demo_image(64).save(image)
    (tmp_path / "out").mkdir()
    lines = [f"lora add {path}:0.5", "lora", "a red hat", "lora set style 0", "lora set style x", "lora rm nope",
             "lora rm style", "lora", "quit"]  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code = cli.main([
        "session", "--model", str(root / "diffusers"), "--image", str(image), "--out-dir", str(tmp_path / "out"),
        "--steps", "1", "--width", "32", "--height", "32", "--device", "cpu", "--no-prompt-cache",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "LoRA added: style: strength 0.5, rank 4" in err
    assert "LoRA style: strength 0" in err
    assert "error: lora set: 'x' is not a strength" in err
    assert "error: no LoRA named 'nope' (LoRAs: style)" in err
    assert "LoRA removed: style" in err and err.rstrip().endswith("no LoRAs")
    written = list((tmp_path / "out").iterdir())
    assert len(written) == 1 and "style.safetensors" in Image.open(written[0]).text["loras"]


def _layer_with_two_loras(fmt: str, g: torch.Generator) -> CompressedLinear:
    layer = CompressedLinear(quantize(torch.randn(64, 96, generator=g) / 10, fmt), torch.randn(64, generator=g))
    for key, strength in (("a", 0.8), ("b", -0.5)):
        down, up = _factors(64, 96, g)
        layer.adapters[key] = apply.LowRank(down, up, strength)
    return layer


def _compiled(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.fx.Node]]:
    """``layer(x)`` compiled whole, and the nodes of the graphs the compiler was given."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(layer, backend=capture, fullgraph=True)(x)
    return out, [node for gm in graphs for node in gm.graph.nodes]


@pytest.mark.parametrize("route", ["fp8", "int8"])
def test_a_compiled_w8a8_layer_adds_its_loras_to_the_output_once(route: str) -> None:
    """An 8-bit matmul has no dequantized weight: the update goes on its output. Compiled, as a product
    added to the output (no addmm, which would copy the output into a new buffer first)."""
    g = torch.Generator().manual_seed(5)
    layer = _layer_with_two_loras({"fp8": "fp8_e4m3", "int8": "int8"}[route], g)
    layer.route = route
    x = torch.randn(3, 8, 96, generator=g)
    with torch.no_grad():
        eager = layer(x.clone())
    compiled, nodes = _compiled(layer, x.clone())
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert not [node for node in nodes if "addmm" in str(node.target)]
    assert not [node for node in nodes if node.op == "call_method" and str(node.target).endswith("_")]


@pytest.mark.parametrize("fmt", ["nf4", "Q8_0", "fp8_e4m3"])
def test_a_compiled_layer_adds_its_loras_into_the_dequantized_weight(fmt: str) -> None:
    """Compiled, the updates go into the dequantized weight (inside one custom op for the formats that
    dequantize through one): the same output as the eager layer, which adds them into its scratch copy."""
    g = torch.Generator().manual_seed(3)
    layer = _layer_with_two_loras(fmt, g)
    x = torch.randn(3, 5, 96, generator=g)
    plain = CompressedLinear(layer.weight, layer.bias)
    with torch.no_grad():
        eager, without = layer(x), plain(x)
    compiled, nodes = _compiled(layer, x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert rel_err(eager, without) > 0.05  # the LoRAs change the output
    calls = [node for node in nodes if node.op == "call_function"]
    dequantizing = [node for node in calls if str(node.target) == "lowvram_kontext.dequantize.default"]
    # fp8 is traced (its addmm fused by the compiler); the others' op takes both pairs of factors.
    assert [len(node.args[6]) for node in dequantizing] == ([] if fmt == "fp8_e4m3" else [2])
