"""The pipeline driven by a plan: streaming equals resident, stages free their models, VAE tiles, OOM retry."""

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowvram_kontext import components as components_module
from lowvram_kontext.demo import demo_image
from lowvram_kontext.errors import KontextError
from lowvram_kontext.hardware import Machine
from lowvram_kontext.pipeline import KontextPipeline
from lowvram_kontext.planner import ModelSizes, Plan, Streaming, VaeSettings, load_profiles, plan
from lowvram_kontext.progress import Progress
from lowvram_kontext.weights.compressed_linear import ScratchPool
from lowvram_kontext.weights.model_paths import ModelPaths

SIZE = 48
GIB = 2**30


def _paths(root: Path) -> ModelPaths:
    return ModelPaths.resolve(model=root / "diffusers")


def _plan(
    root: Path, *, resident: int | str, tile: int | str = "never", name: str = "streamed", fmt: str = "file"
) -> tuple[Plan, dict]:
    profiles = load_profiles()
    streamed = Streaming(format=fmt, resident_blocks=resident, prefetch=1, host="pageable")
    profiles[name] = replace(
        profiles["nf4-stream"], name=name, transformer=streamed, t5=streamed, vae=VaeSettings(tile)
    )
    paths = _paths(root)
    sizes = ModelSizes.from_files(transformer=paths.transformer, t5=paths.t5, clip=paths.clip, vae=paths.vae)
    machine = Machine.cpu_only(ram_total=64 * GIB, ram_available=48 * GIB).with_budget(8 * GIB)
    return plan(machine, profiles, SIZE, SIZE, sizes, name), {"machine": machine, "profiles": profiles, "sizes": sizes}


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The components the pipeline reads from disk, in order."""
    names: list[str] = []
    real_reader = components_module.ComponentReader

    def counting_reader(name, *args, **kwargs):  # noqa: ANN001, ANN202
        names.append(name)
        return real_reader(name, *args, **kwargs)

    monkeypatch.setattr(components_module, "ComponentReader", counting_reader)
    return names


def _edit(pipe: KontextPipeline, seed: int = 3) -> np.ndarray:
    return np.asarray(pipe.edit(demo_image(SIZE), "a red hat", steps=2, seed=seed, width=SIZE, height=SIZE))


def test_streamed_plan_gives_the_resident_image_bit_for_bit(tiny_root: Path) -> None:
    resident_plan, _ = _plan(tiny_root, resident="all", name="resident")
    assert resident_plan.stage("transformer").streamed_blocks == 0
    resident = _edit(KontextPipeline(_paths(tiny_root), plan=resident_plan))
    streamed_plan, _ = _plan(tiny_root, resident=1)
    assert streamed_plan.stage("transformer").streamed_blocks == 4  # 5 blocks, 1 resident
    assert streamed_plan.stage("t5").streamed_blocks == 1
    pipe = KontextPipeline(_paths(tiny_root), plan=streamed_plan)
    assert np.array_equal(_edit(pipe), resident)
    assert pipe.stats.bytes_streamed_per_step > 0
    assert set(pipe.stats.stage_seconds) == {"clip", "t5", "vae_encode", "transformer", "vae_decode"}
    assert len(pipe.stats.step_seconds) == 2 and set(pipe.stats.load_seconds) == {"clip", "t5", "vae", "transformer"}


def test_text_encoders_and_transformer_are_freed_after_their_stages(tiny_root: Path, monkeypatch) -> None:  # noqa: ANN001
    loaded: dict[str, weakref.ref] = {}
    real_reader = components_module.ComponentReader

    def tracking_reader(name, *args, **kwargs):  # noqa: ANN001, ANN202
        reader = real_reader(name, *args, **kwargs)
        loaded[name] = weakref.ref(reader.model)
        return reader

    monkeypatch.setattr(components_module, "ComponentReader", tracking_reader)
    pipe = KontextPipeline(_paths(tiny_root), plan=_plan(tiny_root, resident=1)[0])
    pipe.encode_prompt("a red hat")
    for name in ("clip", "t5"):
        model = loaded[name]()
        assert model is None or all(t.is_meta for t in list(model.parameters()) + list(model.buffers())), name
    _edit(pipe)
    transformer = loaded["transformer"]()
    assert transformer is None or all(p.is_meta for p in transformer.parameters())
    assert "transformer" not in pipe.components.loaded  # the plan gives the decoder the transformer's memory


def test_kept_weights_are_read_from_disk_once_over_several_edits(
    tiny_root: Path, loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engines: list[str] = []
    real_stream_model = components_module.stream_model

    def counting_stream_model(model, device, settings, **kwargs):  # noqa: ANN001, ANN003, ANN202
        engines.append(f"{type(model).__name__}, keep_host={settings.keep_host}")
        return real_stream_model(model, device, settings, **kwargs)

    monkeypatch.setattr(components_module, "stream_model", counting_stream_model)
    streamed_plan, _ = _plan(tiny_root, resident=1)
    pipe = KontextPipeline(_paths(tiny_root), plan=streamed_plan, keep_weights=True)
    images = [_edit(pipe, seed) for seed in (1, 2, 3)]
    assert sorted(loads) == ["clip", "t5", "transformer", "vae"]
    # Each packed once, then parked and attached again.
    assert engines == ["T5Encoder, keep_host=True", "FluxTransformer, keep_host=True"]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    again = KontextPipeline(_paths(tiny_root), plan=streamed_plan)
    assert np.array_equal(_edit(again, 3), images[2])  # kept weights change nothing


def test_kept_components_stay_on_the_device_until_a_stage_needs_the_room(tiny_root: Path) -> None:
    roomy, _ = _plan(tiny_root, resident=1)
    pipe = KontextPipeline(_paths(tiny_root), plan=roomy, keep_weights=True)
    first = _edit(pipe)
    assert pipe.on_device == ["clip", "t5", "transformer", "vae"]  # 8 GiB holds the tiny model whole
    assert np.array_equal(_edit(pipe), first)
    kept = pipe.stats.stage_kept_bytes  # what the stages' plans do not count
    assert set(kept) == {"clip", "t5", "vae_encode", "transformer", "vae_decode"} and all(kept.values())

    tight = KontextPipeline(_paths(tiny_root), plan=replace(roomy, budget_bytes=0), keep_weights=True)
    tight.encode_prompt("a red hat")
    assert tight.on_device == ["t5"]  # T5's stage took CLIP's room
    assert np.array_equal(_edit(tight), first)
    assert tight.on_device == ["vae"]  # the decode took the transformer's
    assert set(tight.stats.stage_kept_bytes.values()) == {0}
    assert np.array_equal(_edit(KontextPipeline(_paths(tiny_root), plan=roomy)), first)


class _ScratchWatch(Progress):
    """Notes the dequantization scratch a pipeline holds as each stage starts and after each sampling step;
    with ``interrupt_at`` a step is interrupted as Ctrl-C would."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        super().__init__(quiet=True)
        self.pool = ScratchPool()
        self.interrupt_at = interrupt_at
        self.at_start: list[tuple[str, int]] = []
        self.in_steps: list[int] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.at_start.append((name, self.pool.nbytes))
        with super().stage(name):
            yield

    def step(self, done: int, total: int, seconds: float) -> None:
        self.in_steps.append(self.pool.nbytes)
        if done == self.interrupt_at:
            raise KeyboardInterrupt


def test_dequantization_scratch_does_not_outlive_its_stages(tiny_root: Path) -> None:
    """The scratch compressed layers dequantize into is not in the VAE stages' plan: it must be gone
    before the decode, between edits and after a release, even with every weight kept on the device."""
    compressed, _ = _plan(tiny_root, resident=1, fmt="int8")
    watch = _ScratchWatch()
    pipe = KontextPipeline(_paths(tiny_root), progress=watch, plan=compressed, keep_weights=True)
    watch.pool = pipe.components.pool
    first = _edit(pipe)
    assert watch.in_steps and all(watch.in_steps)  # sampling dequantizes into it
    assert pipe.on_device == ["clip", "t5", "transformer", "vae"]  # the weights stay; their scratch does not
    assert dict(watch.at_start)["vae_decode"] == 0 and pipe.components.pool.nbytes == 0
    watch.at_start.clear()
    assert np.array_equal(_edit(pipe), first)
    assert [stage for stage, held in watch.at_start if held] == []  # nothing carried into the next edit

    interrupted = _ScratchWatch(interrupt_at=1)
    pipe = KontextPipeline(_paths(tiny_root), progress=interrupted, plan=compressed)
    interrupted.pool = pipe.components.pool
    with pytest.raises(KeyboardInterrupt):
        _edit(pipe)
    assert pipe.components.pool.nbytes > 0  # Ctrl-C in the middle of sampling
    pipe.release()
    assert pipe.components.pool.nbytes == 0 and pipe.components.loaded == []


def test_tiled_vae_plan_runs_and_stays_close_to_untiled(tiny_root: Path) -> None:
    untiled = _edit(KontextPipeline(_paths(tiny_root))).astype(float)
    tiled_plan, _ = _plan(tiny_root, resident=1, tile=32)
    assert tiled_plan.stage("vae_decode").tile == 32
    tiled = _edit(KontextPipeline(_paths(tiny_root), plan=tiled_plan)).astype(float)
    assert tiled.shape == untiled.shape
    assert np.abs(tiled - untiled).mean() < 40  # per-tile GroupNorm statistics on random weights: close, not equal


def test_out_of_memory_retries_once_with_a_smaller_plan(tiny_root: Path, monkeypatch) -> None:  # noqa: ANN001
    big, context = _plan(tiny_root, resident=5, name="big")
    small_plan, _ = _plan(tiny_root, resident=1, name="small")
    context["profiles"]["small"] = small_plan.profile

    def replan(name: str) -> Plan:
        return plan(context["machine"], context["profiles"], SIZE, SIZE, context["sizes"], name)

    big = replan("big")
    assert any(c.name == "small" and c.peak_bytes < big.peak_bytes for c in big.candidates)
    calls = {"n": 0}
    real_sample = KontextPipeline.sample

    def sample_failing_once(self, *args, **kwargs):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(KontextPipeline, "sample", sample_failing_once)
    messages: list[str] = []
    pipe = KontextPipeline(_paths(tiny_root), plan=big, replan=replan)
    monkeypatch.setattr(pipe.progress, "say", messages.append)
    result = _edit(pipe)
    assert calls["n"] == 2 and result.shape == (SIZE, SIZE, 3)
    assert pipe.plan.peak_bytes < big.peak_bytes
    assert any("retrying once with" in m for m in messages)


def test_out_of_memory_without_a_fallback_is_one_clear_error(tiny_root: Path, monkeypatch) -> None:  # noqa: ANN001
    def always_out_of_memory(self, *args, **kwargs):  # noqa: ANN001, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(KontextPipeline, "sample", always_out_of_memory)
    with pytest.raises(KontextError, match="out of GPU memory"):
        _edit(KontextPipeline(_paths(tiny_root)))


def test_image_is_valid(tiny_root: Path) -> None:
    image = Image.fromarray(_edit(KontextPipeline(_paths(tiny_root))))
    assert image.size == (SIZE, SIZE)


def test_a_repeated_prompt_skips_the_text_encoders(tiny_root: Path, tmp_path: Path, loads: list[str]) -> None:
    from lowvram_kontext.prompt_cache import PromptCache

    first = KontextPipeline(_paths(tiny_root), prompt_cache=PromptCache(tmp_path / "prompts"))
    fresh = first.encode_prompt("a red hat")
    assert sorted(loads) == ["clip", "t5"] and len(first.prompt_cache.entries()) == 1
    loads.clear()
    # A new pipeline (a later run) with the same files: no encoder is loaded, the embedding is identical.
    second = KontextPipeline(_paths(tiny_root), prompt_cache=PromptCache(tmp_path / "prompts"))
    cached = second.encode_prompt("a red hat")
    assert loads == []
    assert torch.equal(cached.txt, fresh.txt) and torch.equal(cached.vec, fresh.vec)
    second.encode_prompt("a blue hat")
    assert sorted(loads) == ["clip", "t5"]
