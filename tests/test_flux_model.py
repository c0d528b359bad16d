"""The Flux transformer against diffusers' FluxTransformer2DModel, and the diffusers <-> BFL key mapping."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from lowvram_kontext.errors import KontextError, WeightFileError
from lowvram_kontext.models.flux import FluxConfig, FluxTransformer
from lowvram_kontext.weights.flux_layout import (
    flux_config_from_diffusers,
    flux_config_from_shapes,
    flux_config_to_diffusers,
    flux_from_diffusers,
    flux_to_diffusers,
)
from lowvram_kontext.weights.source import TensorRef, from_tensors

TINY = FluxConfig(
    in_channels=64,
    hidden_size=64,
    num_heads=2,
    mlp_ratio=4.0,
    depth=2,
    depth_single_blocks=2,
    context_in_dim=32,
    vec_in_dim=32,
    axes_dim=(4, 14, 14),
)


def random_state_dict(config: FluxConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every tensor: weights ~ 1/sqrt(fan_in), biases small, norm scales around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in FluxTransformer(config).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if name.endswith(".scale"):
            out[name] = 1.0 + 0.3 * noise
        elif len(shape) == 2:
            out[name] = noise / shape[1] ** 0.5
        else:
            out[name] = 0.1 * noise
    return out


def tiny_model(seed: int = 0) -> tuple[FluxTransformer, dict[str, torch.Tensor]]:
    sd = random_state_dict(TINY, seed)
    model = FluxTransformer(TINY).eval()
    model.load_state_dict(sd, strict=True)
    return model, sd


def grid_ids(first: float, rows: int, cols: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.full_like(r, first), r, c], dim=-1).reshape(-1, 3).float()


def kontext_inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """A 2x3 target grid with ids (0, r, c), a 3x2 condition grid with ids (1, r, c), 8 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    img_ids = torch.cat([grid_ids(0, 2, 3), grid_ids(1, 3, 2)])
    txt_ids = torch.zeros(8, 3)
    return {
        "img": torch.randn(batch, img_ids.shape[0], TINY.in_channels, generator=gen),
        "img_ids": img_ids,
        "txt": torch.randn(batch, 8, TINY.context_in_dim, generator=gen),
        "txt_ids": txt_ids,
        "timesteps": torch.full((batch,), 0.7),
        "y": torch.randn(batch, TINY.vec_in_dim, generator=gen),
        "guidance": torch.full((batch,), 2.5),
    }


def run_ours(model: FluxTransformer, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    batch = inp["img"].shape[0]
    with torch.no_grad():
        return model(
            img=inp["img"],
            img_ids=inp["img_ids"].expand(batch, -1, -1),
            txt=inp["txt"],
            txt_ids=inp["txt_ids"].expand(batch, -1, -1),
            timesteps=inp["timesteps"],
            y=inp["y"],
            guidance=inp["guidance"],
        )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def diffusers_model(sd: dict[str, torch.Tensor]) -> FluxTransformer2DModel:
    kwargs = flux_config_to_diffusers(TINY)
    assert kwargs.pop("_class_name") == "FluxTransformer2DModel"
    ref = FluxTransformer2DModel(**kwargs).eval()
    ref.load_state_dict(flux_to_diffusers(sd, TINY), strict=True)
    return ref


def test_matches_diffusers() -> None:
    torch.manual_seed(0)
    model, sd = tiny_model()
    ref = diffusers_model(sd)
    inp = kontext_inputs()
    with torch.no_grad():
        expected = ref(
            hidden_states=inp["img"],
            encoder_hidden_states=inp["txt"],
            pooled_projections=inp["y"],
            timestep=inp["timesteps"],
            img_ids=inp["img_ids"],
            txt_ids=inp["txt_ids"],
            guidance=inp["guidance"],
            return_dict=False,
        )[0]
    ours = run_ours(model, inp)
    assert ours.shape == expected.shape == inp["img"].shape
    assert expected.norm() > 1.0  # a real signal, not a near-zero output
    assert rel_err(ours, expected) < 1e-4
    # the two batch items differ and neither is a copy of the other's result
    assert rel_err(ours[0], ours[1]) > 0.1


def test_bf16_follows_float32() -> None:
    model, _ = tiny_model()
    inp = kontext_inputs()
    expected = run_ours(model, inp)
    inp16 = {k: v.bfloat16() if k in ("img", "txt", "y") else v for k, v in inp.items()}
    out = run_ours(model.bfloat16(), inp16)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) < 3e-2


def half_inputs(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if k in ("img", "txt", "y") else v for k, v in inp.items()}


def test_float16_follows_float32() -> None:
    model, _ = tiny_model()
    inp = kontext_inputs()
    expected = run_ours(model, inp)
    out = run_ours(model.half(), half_inputs(inp))
    assert out.dtype == torch.float16
    assert rel_err(out, expected) < 5e-3  # closer than bf16 (its mantissa is 3 bits longer)


def test_float16_guard_keeps_overflowing_residuals_finite() -> None:
    """MLP and linear2 outputs scaled so that the residual streams pass fp16's largest value (65504)."""
    _, sd = tiny_model()
    scaled = {k: v * 20000 if k.endswith(("img_mlp.2.weight", "txt_mlp.2.weight", "linear2.weight")) else v
              for k, v in sd.items()}  # fmt: skip
    model = FluxTransformer(TINY).eval()
    model.load_state_dict(scaled)
    largest: list[float] = []
    for block in (*model.double_blocks, *model.single_blocks):
        block.register_forward_hook(lambda _m, _a, out: largest.append(max(t.abs().max().item() for t in out)))
    inp = kontext_inputs()
    expected = run_ours(model, inp)
    assert max(largest) > 2 * torch.finfo(torch.float16).max and expected.isfinite().all()
    model.half()
    guarded = run_ours(model, half_inputs(inp))
    model.float16_residual_in_float32 = False
    unguarded = run_ours(model, half_inputs(inp))
    assert not unguarded.isfinite().all()
    assert guarded.dtype == torch.float16 and guarded.isfinite().all()
    assert rel_err(guarded, expected) < 5e-3


def test_diffusers_round_trip_is_exact() -> None:
    _, sd = tiny_model()
    back = flux_from_diffusers(from_tensors(flux_to_diffusers(sd, TINY)), TINY)
    assert list(back) == list(sd)
    for name, tensor in sd.items():
        assert back[name].shape == tuple(tensor.shape)
        assert torch.equal(back[name].load(), tensor), name


def test_diffusers_mapping_is_lazy_and_checks_names() -> None:
    _, sd = tiny_model()
    diffusers_sd = flux_to_diffusers(sd, TINY)
    source = from_tensors(diffusers_sd)
    reads: list[str] = []
    for name, ref in source.items():
        source[name] = TensorRef(ref.shape, ref.dtype, lambda n=name, r=ref: reads.append(n) or r.read(), name)
    mapped = flux_from_diffusers(source, TINY)
    assert reads == []
    mapped["single_blocks.1.linear1.weight"].load()
    assert reads == [
        f"single_transformer_blocks.1.{p}.weight" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    ]

    missing = dict(source)
    del missing["transformer_blocks.1.attn.add_k_proj.bias"]
    with pytest.raises(WeightFileError, match=r"transformer_blocks\.1\.attn\.add_k_proj\.bias"):
        flux_from_diffusers(missing, TINY)
    extra = dict(source, **{"transformer_blocks.2.attn.to_q.weight": source["x_embedder.weight"]})
    with pytest.raises(WeightFileError, match=r"unexpected tensor transformer_blocks\.2\.attn\.to_q\.weight"):
        flux_from_diffusers(extra, TINY)


def test_state_dict_has_bfl_names() -> None:
    with torch.device("meta"):
        names = set(FluxTransformer(TINY).state_dict())
    linears = ["img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    linears += [f"{e}.{layer}" for e in ("time_in", "vector_in", "guidance_in") for layer in ("in_layer", "out_layer")]
    scales = []
    for i in range(TINY.depth):
        for s in ("img", "txt"):
            linears += [f"double_blocks.{i}.{s}_{m}" for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
            scales += [f"double_blocks.{i}.{s}_attn.norm.{n}_norm.scale" for n in ("query", "key")]
    for i in range(TINY.depth_single_blocks):
        linears += [f"single_blocks.{i}.{m}" for m in ("linear1", "linear2", "modulation.lin")]
        scales += [f"single_blocks.{i}.norm.{n}_norm.scale" for n in ("query", "key")]
    expected = {f"{m}.{p}" for m in linears for p in ("weight", "bias")} | set(scales)
    assert names == expected


def test_linears_are_plain_and_blocks_are_module_lists() -> None:
    with torch.device("meta"):
        model = FluxTransformer(TINY)
    linear_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weight_owners = {n.rsplit(".", 1)[0] for n in model.state_dict() if n.endswith(".weight")}
    assert linear_names == weight_owners
    assert isinstance(model.double_blocks, torch.nn.ModuleList)
    assert isinstance(model.single_blocks, torch.nn.ModuleList)


def test_config_from_shapes() -> None:
    _, sd = tiny_model()
    shapes = {name: tuple(t.shape) for name, t in sd.items()}
    assert flux_config_from_shapes(shapes) == TINY
    no_guidance = {k: v for k, v in shapes.items() if not k.startswith("guidance_in.")}
    assert flux_config_from_shapes(no_guidance) == FluxConfig(**{**TINY.__dict__, "guidance_embed": False})

    bad_head = dict(shapes)
    bad_head["double_blocks.0.img_attn.norm.query_norm.scale"] = (16,)  # 2 + 7 + 7 = 16, but 7 is odd
    with pytest.raises(KontextError, match="RoPE axes"):
        flux_config_from_shapes(bad_head)
    with pytest.raises(WeightFileError, match="txt_in.weight"):
        flux_config_from_shapes({k: v for k, v in shapes.items() if not k.startswith("txt_in.")})
    gap = {k: v for k, v in shapes.items() if not k.startswith("single_blocks.0.")}
    with pytest.raises(WeightFileError, match=r"single_blocks\.0"):
        flux_config_from_shapes(gap)


def test_default_config_rope_rule_and_size() -> None:
    default = FluxConfig()
    with torch.device("meta"):
        model = FluxTransformer(default)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == 11_901_408_320
    assert len(params) == 780
    assert sum(p.ndim == 1 for p in params) == 466
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert flux_config_from_shapes(shapes) == default
    assert default.axes_dim == (16, 56, 56) and default.head_dim == 128 and default.mlp_hidden_dim == 12288


def test_diffusers_config_round_trip() -> None:
    for config in (TINY, FluxConfig()):
        assert flux_config_from_diffusers(flux_config_to_diffusers(config)) == config
    # the config diffusers itself records for the tiny model
    kwargs = flux_config_to_diffusers(TINY)
    kwargs.pop("_class_name")
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**kwargs)
    assert flux_config_from_diffusers(dict(ref.config)) == TINY
    with pytest.raises(KontextError, match="num_layers"):
        flux_config_from_diffusers({k: v for k, v in kwargs.items() if k != "num_layers"})


def test_block_hooks_fire_in_order() -> None:
    model, _ = tiny_model()
    order: list[str] = []
    for kind, blocks in (("double", model.double_blocks), ("single", model.single_blocks)):
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda module, args, tag=f"{kind}.{i}": order.append(tag))
    run_ours(model, kontext_inputs())
    assert order == ["double.0", "double.1", "single.0", "single.1"]


def test_guidance_required() -> None:
    model, _ = tiny_model()
    inp = kontext_inputs()
    inp["guidance"] = None
    with pytest.raises(KontextError, match="guidance"):
        run_ours(model, inp)


def test_modulations_of_every_step_at_once_equal_each_steps_own() -> None:
    """Sampling computes all steps' modulations in one batch before the steps; each step's output with
    its row equals the output that computes its modulation itself."""
    model, _ = tiny_model()
    inp = kontext_inputs(batch=1)
    times = torch.tensor([1.0, 0.62, 0.25])
    with torch.no_grad():
        vec = model.vector(times, inp["y"].expand(3, -1), inp["guidance"].expand(3))
        table = model.modulations(vec)
        assert table.shape == (3, (12 * TINY.depth + 3 * TINY.depth_single_blocks) * TINY.hidden_size)
        for row, t in zip(table.split(1), times, strict=True):
            step = {**inp, "timesteps": t[None]}
            own = run_ours(model, step)
            given = model(
                step["img"], step["img_ids"][None], step["txt"], step["txt_ids"][None], step["timesteps"],
                step["y"], step["guidance"], modulations=row,
            )  # fmt: skip
            torch.testing.assert_close(given, own, rtol=1e-5, atol=1e-5)  # a batched matmul may round otherwise
        assert not torch.equal(table[0], table[1])  # each step has its own


def test_modulations_run_inside_what_lends_them() -> None:
    model, _ = tiny_model()
    lent: list[nn.Module] = []

    @contextmanager
    def lend(module: nn.Module) -> Iterator[None]:
        lent.append(module)
        yield

    with torch.no_grad():
        model.modulations(model.vector(torch.tensor([0.5]), torch.zeros(1, TINY.vec_in_dim), torch.tensor([2.5])), lend)
    assert lent == model.prepass_modules()
    assert lent == [m for b in model.double_blocks for m in (b.img_mod, b.txt_mod)] + [
        b.modulation for b in model.single_blocks
    ]
