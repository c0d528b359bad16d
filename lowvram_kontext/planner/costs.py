"""The constants and formulas of the planner's memory and time model: calibration, activations, FLOPs.

The terms a stage's peak is made of, and how they add up, are in ``planning``; this module holds
what they rest on. Every constant lives in ``Calibration`` (the dequantization rate of each format
and route is its codec's): they are estimates or single measurements, to be replaced by measurements
on real GPUs. ``card_slowdown`` scales the reference GPU's times to another card; ``route_capability``
says what decides the card's compute routes (``compute.routes``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..compute import routes
from ..gpus import REFERENCE, REFERENCE_CALIBRATED_TFLOPS
from ..hardware import GIB, MIB, Machine
from ..models.clip import CLIPTextConfig
from ..models.flux import FluxConfig
from ..models.t5 import T5Config
from ..weights.formats import codec
from .sizes import COMPUTE_BYTES, AdaptedLayer, flux_parts


@dataclass(frozen=True)
class Calibration:
    """The constants of the memory and time model, with where each comes from."""

    # Peer measurements, one H200, resident bf16 transformer: (tokens, seconds per step).
    peer_steps: tuple[tuple[int, float], ...] = ((8704, 0.366), (2560, 0.092))
    # Seconds of the stages other than sampling on the reference GPU, bf16, full size, 1024x1024
    # (DESIGN.md, "Measuring"); scaled like a step for other cards.
    peer_stage_seconds: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({"clip": 0.005, "t5": 0.025, "vae_encode": 0.048, "vae_decode": 0.087})
    )
    # Caching allocator rounding and splitting, convolution workspaces: applied to activations and
    # scratch. Estimate.
    allocator_overhead: float = 1.05
    # The VAE's allocator peak over vae_tiling's count of live tensors (cuDNN convolution workspaces,
    # allocator rounding): measured on an H200, bf16, 1024x1024, tiled and untiled alike (1.54-1.59
    # decoding, 1.39-1.40 encoding; bench/results/vae_tiling.json).
    vae_decode_overhead: float = 1.58
    vae_encode_overhead: float = 1.40
    # Device memory outside the allocator beyond the bare context: cuBLAS workspaces, loaded Triton and
    # Inductor kernels, allocator slack. Measured on an H200 under an 8 GiB budget: the process total
    # (NVML) exceeded allocator peak + context by up to 0.66 GiB in the transformer stage.
    runtime_reserve_bytes: int = 680 * MIB
    # Pinned host-to-device rate when the machine's was not measured: PCIe 3.0 x16. Estimate.
    assumed_h2d_gbps: float = 12.0
    # Pageable or page-cache bytes copied into a pinned staging buffer by one CPU thread. Estimate.
    host_copy_gbps: float = 8.0
    # Mapped bytes that do not stay in the page cache are read from disk each step (NVMe). Estimate.
    disk_read_gbps: float = 1.5
    # Host RAM left to the system and to this process's own code, torch and CUDA runtime. Estimate.
    host_reserve_bytes: int = int(2.5 * GIB)
    # Pinned memory cannot be paged out: never pin more than this share of RAM.
    pinned_ram_share: float = 0.5
    # A "16 GB" host reports ~15.5 GiB: a profile's ram_gib is met from this share of it.
    ram_size_tolerance: float = 0.9

    # The share of the reference GPU's step bound by memory rather than matmuls (norms, activations,
    # RoPE, residual updates, the attention's reads and writes). Estimate.
    memory_bound_share: float = 0.1
    # The share of the memory bandwidth a LoRA's passes reach (``lora_step_seconds``), compiled, rank 32
    # on every block layer, one H200 at an 8 GiB budget: added into NF4's dequantized weights, +9.4 ms a
    # step (bench/results/bench-8gib-nf4-lora32.json against -nf4-compiled-2.json); as a term on fp8
    # W8A8's activations, +21.1 ms (bench-8gib-fp8-lora32.json against -fp8-nolora.json, one session).
    lora_weight_pass_share: float = 0.83
    lora_activation_pass_share: float = 0.98

    def dequant_rate(self, fmt: str, machine: Machine) -> float:
        """bf16 GB/s of dequantizing ``fmt`` by the machine's route (the format's codec says it for the
        reference GPU), scaled by the card's memory bandwidth."""
        found = codec(fmt)
        rate = found.torch_dequant_gbps if machine.dequant_route == "torch" else found.dequant_gbps
        return rate * (machine.memory_gbps / REFERENCE.memory_gbps if machine.memory_gbps else 1.0)

    def dequant_temp(self, fmt: str, machine: Machine) -> int:
        """Bytes of temporaries per dequantized value by the machine's route (the format's codec says)."""
        found = codec(fmt)
        return found.torch_dequant_temp_bytes if machine.dequant_route == "torch" else found.dequant_temp_bytes

    def compute_model(self) -> tuple[float, float]:
        """(fixed seconds, seconds per FLOP) through the two peer step times on the real model.

        The fixed part is the line's intercept: near zero, and slightly negative with the default
        figures, so predictions are floored at zero for models much smaller than Kontext.
        """
        (tokens1, seconds1), (tokens2, seconds2) = self.peer_steps
        flops1, flops2 = transformer_flops(FluxConfig(), tokens1), transformer_flops(FluxConfig(), tokens2)
        per_flop = (seconds1 - seconds2) / (flops1 - flops2)
        return seconds1 - per_flop * flops1, per_flop


CALIBRATION = Calibration()


def card_slowdown(machine: Machine, cal: Calibration = CALIBRATION) -> float:
    """How many times longer than on the reference GPU (``gpus.REFERENCE``) the machine's card takes
    for a step: the matmuls scale with the achieved matmul rate, the memory-bound rest of the step
    (``Calibration.memory_bound_share``) with the memory bandwidth; 1 for a card of unknown speed."""
    if not machine.matmul_tflops:
        return 1.0
    matmul = REFERENCE_CALIBRATED_TFLOPS / machine.matmul_tflops
    memory = REFERENCE.memory_gbps / machine.memory_gbps if machine.memory_gbps else matmul
    return (1 - cal.memory_bound_share) * matmul + cal.memory_bound_share * memory


def step_tokens(name: str, image_tokens: int, text_tokens: int) -> int:
    """How many tokens the transformer layer ``name`` sees in a sampling step: 0 for the blocks'
    modulations (computed once per edit, before the first step), 1 for the conditioning vector's layers."""
    if name.endswith(routes.WEIGHT_ONLY_LAYERS):
        return 0
    if name.startswith("single_blocks."):
        return image_tokens + text_tokens
    if name.startswith("double_blocks."):
        return image_tokens if ".img_" in name else text_tokens
    if name.startswith(("img_in", "final_layer.linear")):
        return image_tokens
    if name.startswith("txt_in"):
        return text_tokens
    return 1


def lora_step_seconds(
    layers: Iterable[AdaptedLayer],
    image_tokens: int,
    text_tokens: int,
    on_activations: Callable[[str], bool],
    machine: Machine,
    cal: Calibration = CALIBRATION,
) -> float:
    """What the transformer's LoRA updates ``layers`` add to a sampling step on the machine's card.

    A layer that dequantizes its weight into a copy gets each update added into that copy: the copy is
    read and written once more (``in x out`` values). A layer whose matmul uses the stored weight as it
    is (an 8-bit W8A8 matmul, or a weight stored in the compute dtype; ``on_activations``) gets the
    update as a term on its activations: its input is written and read again for the down projection,
    and a product of its output's size written and read again to be added (``tokens x (in + out)``
    values, twice).
    Either pass runs at a share of the card's memory bandwidth (``Calibration``); the low-rank products'
    FLOPs at the card's matmul rate.
    """
    bandwidth = (machine.memory_gbps or REFERENCE.memory_gbps) * 1e9
    matmul = (machine.matmul_tflops or REFERENCE_CALIBRATED_TFLOPS) * 1e12
    seconds = 0.0
    for layer in layers:
        tokens = step_tokens(layer.name, image_tokens, text_tokens)
        if tokens == 0:
            continue
        if on_activations(layer.name):
            values = 2 * tokens * (layer.in_features + layer.out_features)
            share = cal.lora_activation_pass_share
            flops = 2 * tokens * layer.rank * (layer.in_features + layer.out_features)
        else:
            values = 2 * layer.in_features * layer.out_features
            share = cal.lora_weight_pass_share
            flops = 2 * layer.in_features * layer.out_features * layer.rank
        seconds += COMPUTE_BYTES * values / (bandwidth * share) + flops / matmul
    return seconds


def lora_product_bytes(
    layers: Iterable[AdaptedLayer], image_tokens: int, text_tokens: int, on_activations: Callable[[str], bool]
) -> int:
    """The largest low-rank product ``[tokens, out]`` a compiled step holds beside its layer's output
    (updates on the activations only; 0 without any)."""
    sizes = [
        COMPUTE_BYTES * step_tokens(layer.name, image_tokens, text_tokens) * layer.out_features
        for layer in layers
        if on_activations(layer.name)
    ]
    return max(sizes, default=0)


def route_capability(machine: Machine) -> tuple[tuple[int, int] | None, bool]:
    """(compute capability, tensor cores) that decide the card's compute routes; a hypothetical card
    (``--vram-budget`` without a GPU) is taken to have fp8 tensor cores."""
    capability = machine.compute_capability
    if capability is None and machine.supports_fp8:
        capability = routes.HYPOTHETICAL_CAPABILITY
    return capability, machine.tensor_cores


def transformer_activation_bytes(config: FluxConfig, image_tokens: int, text_tokens: int) -> int:
    """Live bytes at the worst moment of a transformer block, plus what lives across blocks.

    ``image_tokens`` counts target and condition tokens. B = 2 bytes, n = all tokens, h = hidden,
    m = MLP width. A double block holds its inputs (B n h), the qkv projections (3 B n h, kept by
    the value views), normed q and k (2 B n h) and the joint q, k, v (3 B n h); then either RoPE
    runs (a rotated q, B n h, and 16 n h of float32 temporaries: a copy, products, their stack) or
    the image MLP (attention output B n h, then per image token the new residual, the modulated
    input, the first linear's output and its GELU: B (2h + 2m)). A single block holds its input,
    the first linear's output (B n (3h + m)) and normed q and k; then RoPE, or the concatenation
    (attention output B n h, GELU B n m, the concatenation B n (h + m)). Across blocks: the RoPE
    table (float32 cos and sin, 4 n head_dim) and the inputs.
    """
    b, h, m = COMPUTE_BYTES, config.hidden_size, config.mlp_hidden_dim
    n = image_tokens + text_tokens
    rope = b * n * h + 16 * n * h
    double_held = b * n * 9 * h
    double = double_held + max(rope, b * n * h + b * image_tokens * (2 * h + 2 * m))
    single_held = b * n * (6 * h + m)
    single = single_held + max(rope, b * n * (2 * h + 2 * m))
    lasting = 4 * n * config.head_dim + b * text_tokens * config.context_in_dim
    lasting += 2 * 4 * image_tokens * config.in_channels  # float32 target tokens and the velocity
    return max(double, single) + lasting


def t5_activation_bytes(config: T5Config, tokens: int) -> int:
    """Live bytes at the worst moment of a T5 block (t tokens, d model width, f feed-forward width).

    Always held: the residual (B t d) and the position bias all blocks share (B heads t^2). Then
    the worst of: the norm (float32 copy and result, 8 t d, and B t d out); attention (normed
    input, q k v, a contiguous copy of the bias for SDPA, the output); the gated feed-forward
    (normed input and four B t f tensors: both projections, the GELU, their product); building
    the bias in block 0 (int64 bucket ids and their temporaries, ~32 t^2).
    """
    b, t, d, f = COMPUTE_BYTES, tokens, config.d_model, config.d_ff
    inner, heads = config.num_heads * config.d_kv, config.num_heads
    bias = b * heads * t * t
    worst = max(
        8 * t * d + b * t * d,
        b * t * d + 4 * b * t * inner + bias,
        b * t * d + 4 * b * t * f,
        32 * t * t,
    )
    return b * t * d + bias + worst


def clip_activation_bytes(config: CLIPTextConfig) -> int:
    """A bound on CLIP's live bytes: a few width-wide and MLP-wide tensors, float32 scores and mask."""
    t = config.max_position_embeddings
    b, d, f = COMPUTE_BYTES, config.hidden_size, config.intermediate_size
    return b * t * (4 * d + 2 * f) + 4 * (config.num_attention_heads + 1) * t * t


def transformer_flops(config: FluxConfig, tokens: int) -> float:
    """FLOPs of one transformer pass as the compute model was fitted: block matmuls (2 x values x
    tokens, the modulations counted as if they saw every token) and attention (4 L^2 h)."""
    values = flux_parts(config).matrix_values(config)
    blocks = config.depth + config.depth_single_blocks
    return 2.0 * values * tokens + 4.0 * tokens * tokens * config.hidden_size * blocks
