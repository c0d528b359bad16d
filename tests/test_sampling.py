"""Sampling conventions against diffusers' Kontext pipeline and flow-match scheduler."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS, calculate_shift

from lowvram_kontext import sampling


@pytest.mark.parametrize("steps,tokens", [(1, 256), (4, 1024), (28, 4096), (30, 3996), (10, 64)])
def test_schedule_equals_diffusers_dynamic_shift(steps: int, tokens: int) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = torch.tensor(sampling.schedule(steps, tokens), dtype=torch.float64)
    assert ours.shape == scheduler.sigmas.shape
    torch.testing.assert_close(ours, scheduler.sigmas.double(), rtol=1e-6, atol=1e-6)
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_preferred_resolutions_match_the_reference_list() -> None:
    assert list(sampling.PREFERRED_RESOLUTIONS) == list(PREFERRED_KONTEXT_RESOLUTIONS)
    for width, height in [(640, 480), (480, 640), (1000, 1000), (3000, 1000), (1, 5000)]:
        aspect = width / height
        _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        assert sampling.preferred_resolution(width, height) == (w, h)


def test_pack_matches_diffusers_and_unpack_inverts() -> None:
    latent = torch.randn(1, 16, 6, 10)
    packed = sampling.pack(latent)
    torch.testing.assert_close(packed, FluxKontextPipeline._pack_latents(latent, 1, 16, 6, 10), rtol=0, atol=0)
    assert torch.equal(sampling.unpack(packed, 6, 10), latent)


def test_position_ids_match_diffusers() -> None:
    ours = sampling.position_ids(6, 10, first_axis=1)[0]
    theirs = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    theirs[..., 0] = 1
    assert torch.equal(ours, theirs)
    assert torch.equal(sampling.position_ids(6, 10, 0)[0, :, 0], torch.zeros(15))


def test_initial_noise_follows_the_reference_convention() -> None:
    noise = sampling.initial_noise(seed=42, height=1024, width=688, channels=16)
    assert noise.shape == (1, 16, 128, 86) and noise.dtype == torch.bfloat16
    expected = torch.randn(1, 16, 128, 86, generator=torch.Generator("cpu").manual_seed(42), dtype=torch.bfloat16)
    assert torch.equal(noise, expected)


def test_euler_integrates_a_constant_velocity_exactly() -> None:
    times = sampling.schedule(5, 1024)
    x0 = torch.ones(1, 4, 8)
    steps = []
    out = sampling.euler(lambda x, t: torch.full_like(x, 2.0), x0, times, on_step=lambda i, n: steps.append((i, n)))
    torch.testing.assert_close(out, x0 + 2.0 * (times[-1] - times[0]))
    assert steps == [(i, 5) for i in range(1, 6)]
