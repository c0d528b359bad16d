"""Planning: a profile applied to a machine and a resolution gives a ``Plan``; ``plan`` picks the profile.

A stage's predicted peak on the device is the sum of these terms (``StagePlan.terms``):

- CUDA context: ``Machine.cuda_context_bytes`` (measured with NVML, else 500 MiB).
- runtime reserve: cuBLAS workspaces and allocator rounding (``Calibration.runtime_reserve_bytes``).
- weights: every ``nn.Linear`` matrix in the storage format (``sizes.storage_bytes``: bf16 2 B per
  value; fp8 1 B + a float32 per row; int8 1 B + a float32 per row; nf4 0.5 B + a float32 per 64;
  GGUF blocks of 32 or 256 values in 18-210 B), everything else (biases, norms, embeddings,
  convolutions) in bf16. A matrix the format cannot hold (wrong shape) stays bf16. The components
  are built on the meta device once to list their tensors, so any model size is counted exactly.
- resident blocks: the leading ``resident_blocks`` blocks; non-block weights are always resident.
- streaming slots: ``(prefetch + 1) x`` the largest streamed block, when anything streams.
- dequant scratch: the largest compressed matrix in bf16 (one reused buffer) plus the float32
  temporaries of dequantizing one chunk of ``CHUNK_ELEMENTS`` values (``Calibration.dequant_temp``).
- activations: the live tensors at the worst moment of a block, from the model's tensor sizes (see
  ``transformer_activation_bytes`` and ``t5_activation_bytes``), times ``allocator_overhead``.
  Attention runs through SDPA's flash / memory-efficient kernels: no tokens^2 term for the
  transformer. The VAE stages take ``vae_tiling``'s model of the network's live tensors, for the
  whole image or one tile.
- the transformer stage also holds the VAE (the pipeline keeps it loaded from encode to decode).

Host, as the streaming engine (``offload``) places blocks: pinned in run order while they fit
``pinned_cap_gib`` (the rest pageable), all pageable, or all in memory-mapped files the engine
writes to the cache folder (so as much disk). Pageable and mapped blocks pass through a small ring
of pinned staging buffers; mapped pages stay cached only while they all fit in free RAM, else every
step reads them from disk. Stages run one after another, so the host's needs are the largest stage's.

Time per transformer step = max(compute, streamed bytes / link rate) + dequantization, where
compute = a + s * FLOPs(tokens) is fitted through the two resident bf16 peer measurements (a fixed
cost and seconds per FLOP; FLOPs = 2 x block matrix values x tokens + 4 x tokens^2 x hidden x blocks,
so the fit is a + b L + c L^2 with b:c set by the model), and dequantization = every compressed
value's bf16 bytes / the format's rate by the card's route (its codec's, scaled by
``Calibration.dequant_rate``). On another card than the reference GPU the compute scales by
``card_slowdown``, and by the transformer's compute route (``compute.routes.speed_factor``: compiled
blocks, fp8 / int8 W8A8, measured on the reference GPU; W8A8 layers skip dequantization). All other
constants live in ``costs.Calibration``.

Sizes come from ``sizes``, the constants and activation formulas from ``costs``, and the host
placement from the streaming engine's own ``plan_tiers``. The words (tables, JSON) are the ``plan``
command's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from ..compute import routes
from ..errors import KontextError
from ..hardware import GIB, Machine
from ..offload.host import HOST_TIERS, plan_tiers
from ..offload.settings import STAGING_BUFFERS, STAGING_CHUNK_BYTES
from ..sampling import PACK
from ..vae_tiling import choose_tile, decode_peak_bytes, encode_peak_bytes
from ..weights.formats import codec
from ..weights.formats.base import CHUNK_ELEMENTS
from ..weights.formats.plain import PlainCodec
from .costs import (
    CALIBRATION,
    Calibration,
    card_slowdown,
    clip_activation_bytes,
    lora_product_bytes,
    lora_step_seconds,
    route_capability,
    t5_activation_bytes,
    transformer_activation_bytes,
    transformer_flops,
)
from .plans import BudgetTooSmall, Candidate, HostUse, Plan, StagePlan, compute_dtype, gib_text
from .profiles import FILE_FORMAT, Profile, Streaming, resolve_profile
from .sizes import (
    COMPUTE_BYTES,
    AdapterBytes,
    FileWeights,
    ModelSizes,
    Part,
    clip_part,
    flux_parts,
    t5_parts,
    vae_part,
)


@dataclass(frozen=True)
class _Context:
    """What every stage of one profile's plan needs."""

    profile: Profile
    machine: Machine
    model: ModelSizes
    width: int
    height: int
    budget: int
    cal: Calibration
    keep_weights: bool = False
    references: int = 0  # reference images beside the main one, each at most the edit's pixel area
    compute: str = "auto"  # the transformer's route asked for (compute.routes.CHOICES)
    compiled: bool = False  # whether the blocks run compiled

    @property
    def base_terms(self) -> dict[str, int]:
        return {"CUDA context": self.machine.cuda_context_bytes, "runtime reserve": self.cal.runtime_reserve_bytes}

    @property
    def link_gbps(self) -> float:
        return self.machine.h2d_gbps or self.machine.card_link_gbps or self.cal.assumed_h2d_gbps

    def overhead(self, nbytes: float) -> int:
        return int(nbytes * self.cal.allocator_overhead)

    def cost_format(self, fmt: str) -> str:
        """The format whose dequantization costs what ``fmt``'s does in the machine's compute dtype: on a
        card without bf16 (float16 compute), bf16 weights are cast as fp16 ones are elsewhere, and fp16
        ones are used as stored."""
        if self.machine.supports_bf16 or fmt not in ("bf16", "fp16"):
            return fmt
        return "fp16" if fmt == "bf16" else "bf16"

    def scratch(self, parts: Sequence[Part], fmt: str) -> int:
        """One bf16 buffer of the largest compressed matrix, plus one chunk's dequantize temporaries."""
        fmt = self.cost_format(fmt)
        largest = max(part.largest_compressed(fmt) for part in parts)
        if largest == 0:
            return 0
        temporaries = min(CHUNK_ELEMENTS, largest) * self.cal.dequant_temp(fmt, self.machine)
        return self.overhead(COMPUTE_BYTES * largest + temporaries)


def _held(block_bytes: Sequence[int], resident: int, prefetch: int) -> int:
    """Device bytes of ``resident`` leading blocks plus the slots for the rest."""
    streamed = block_bytes[resident:]
    return sum(block_bytes[:resident]) + ((prefetch + 1) * max(streamed) if streamed else 0)


def _residency(setting: int | str, block_bytes: Sequence[int], prefetch: int, room: int, whole_extra: int) -> int:
    """Resident blocks for ``setting``: with "auto" the most that fit ``room``, all of them only if
    ``whole_extra`` (what a component held whole brings besides its blocks) fits too."""
    n = len(block_bytes)
    if setting == "all":
        return n
    if isinstance(setting, int):
        return min(setting, n)
    held = lambda r: _held(block_bytes, r, prefetch) + (whole_extra if r == n else 0)  # noqa: E731
    return next((r for r in range(n, -1, -1) if held(r) <= room), 0)


def _host_and_transfer(
    ctx: _Context, settings: Streaming, streamed: Sequence[int], lent: Sequence[int]
) -> tuple[HostUse, float]:
    """Where the streamed blocks and the ``lent`` modules live on the host (as the engine places them)
    and one pass's copy time (the blocks'; the lent modules are copied once per edit)."""
    if not streamed and not lent:
        return HostUse(), 0.0
    tiers = plan_tiers([*streamed, *lent], settings.host, ctx.profile.pinned_cap_bytes, can_pin=True)

    def by_tier(sizes: Sequence[int]) -> dict[str, int]:
        return {tier: sum(b for b, t in zip(sizes, tiers, strict=False) if t == tier) for tier in HOST_TIERS}

    held, everything = by_tier(streamed), by_tier([*streamed, *lent])
    staging = STAGING_BUFFERS * STAGING_CHUNK_BYTES if held["pageable"] or held["mmap"] else 0
    link = ctx.link_gbps * 1e9
    staged = min(ctx.link_gbps, ctx.cal.host_copy_gbps) * 1e9  # through the pinned staging ring
    # Mapped pages stay in the page cache only if they all fit: a bigger sweep evicts itself.
    cache_room = ctx.machine.ram_available - ctx.cal.host_reserve_bytes - everything["pinned"] - everything["pageable"]
    cached = everything["mmap"] <= cache_room - staging
    mapped = staged if cached else min(ctx.link_gbps, ctx.cal.disk_read_gbps) * 1e9
    seconds = held["pinned"] / link + held["pageable"] / staged + held["mmap"] / mapped
    host = HostUse(everything["pinned"] + staging, everything["pageable"], everything["mmap"], disk=everything["mmap"])
    return host, seconds


def _stage_format(requested: str, file: FileWeights) -> str:
    """The storage format a profile's ``requested`` format means for a component held in ``file``."""
    return file.format if requested == FILE_FORMAT else requested


def _streamed_stage(
    ctx: _Context,
    name: str,
    settings: Streaming,
    file: FileWeights,
    blocks: Sequence[Part],
    rest: Part,
    fixed: Mapping[str, int],
    lent: Sequence[Part] = (),
) -> StagePlan:
    """A component whose blocks may stream. ``lent`` are the parts run once per edit (the transformer's
    modulations): on the device with the blocks when every block is resident and nothing is kept
    between edits (no streaming engine then), else in host memory, copied in for their one pass."""
    fmt = _stage_format(settings.format, file)
    if settings.format == FILE_FORMAT and file.block_bytes:
        block_bytes = list(file.block_bytes)
        lent_bytes = [file.modulation_bytes] if file.modulation_bytes else []
    else:
        sizes = {part: part.nbytes(fmt) for part in {*blocks, *lent}}
        block_bytes = [sizes[part] for part in blocks]
        lent_bytes = [sizes[part] for part in lent]
    adapters = ctx.model.adapters.get(name, AdapterBytes())
    block_bytes = adapters.added_to(block_bytes)
    terms = {**ctx.base_terms, **fixed, "dequant scratch": ctx.scratch([*blocks, *lent, rest], fmt)}
    if adapters.rest:
        terms["LoRAs outside the blocks"] = adapters.rest
    room = ctx.budget - sum(terms.values())
    whole = 0 if ctx.keep_weights else sum(lent_bytes)
    resident = _residency(settings.resident_blocks, block_bytes, settings.prefetch, room, whole)
    streamed = block_bytes[resident:]
    slot = max(streamed, default=0)
    terms["resident blocks"] = sum(block_bytes[:resident])
    terms["streaming slots"] = (settings.prefetch + 1) * slot
    if lent_bytes and not streamed and not ctx.keep_weights:
        terms["modulations"], lent_bytes = sum(lent_bytes), []
    host, seconds = _host_and_transfer(ctx, settings, streamed, lent_bytes)
    return StagePlan(
        name=name,
        format=fmt,
        terms=terms,
        fits=sum(terms.values()) <= ctx.budget,
        blocks=len(block_bytes),
        resident_blocks=resident,
        prefetch=settings.prefetch,
        slot_bytes=slot,
        streamed_bytes=sum(streamed),
        lent_bytes=sum(lent_bytes),
        transfer_seconds=seconds,
        host=host,
        host_tier=settings.host,
        pinned_cap_bytes=ctx.profile.pinned_cap_bytes,
    )


def _vae_stage(ctx: _Context, name: str, decode: bool) -> StagePlan:
    """Encode or decode, untiled or in the profile's tiles; the peaks are ``vae_tiling``'s model."""
    config, width, height = ctx.model.vae, ctx.width, ctx.height
    factor = config.downsample_factor
    weights = vae_part(config).nbytes("bf16")

    def terms(tile: int | None) -> dict[str, int]:
        if decode:
            rows, cols = (PACK * math.ceil(side / (factor * PACK)) for side in (height, width))
            peak = decode_peak_bytes(config, rows, cols, torch.bfloat16, None if tile is None else tile // factor)
        else:
            peak = encode_peak_bytes(config, height, width, torch.bfloat16, tile)
        overhead = ctx.cal.vae_decode_overhead if decode else ctx.cal.vae_encode_overhead
        return {**ctx.base_terms, "weights": weights, "activations": int((peak - weights) * overhead)}

    setting = ctx.profile.vae.tile
    if setting == "never":
        tile = None
    elif isinstance(setting, int):
        tile = setting if setting < max(width, height) else None
    else:
        tile = choose_tile(lambda t: sum(terms(t).values()), width, height, ctx.budget)
    chosen = terms(tile)
    return StagePlan(name=name, format="bf16", terms=chosen, fits=sum(chosen.values()) <= ctx.budget, tile=tile)


def _profile_plan(ctx: _Context) -> Plan:
    profile, model, machine, cal = ctx.profile, ctx.model, ctx.machine, ctx.cal
    text_tokens = model.t5_tokens
    # target, condition and each reference (encoded at no more than the edit's pixel area)
    image_tokens = (2 + ctx.references) * model.image_tokens(ctx.width, ctx.height)

    clip_fmt = _stage_format(profile.clip.format, model.clip_file)
    clip = clip_part(model.clip)
    clip_terms = {
        **ctx.base_terms,
        "weights": clip.nbytes(clip_fmt) + model.adapters.get("clip", AdapterBytes()).rest,
        "dequant scratch": ctx.scratch([clip], clip_fmt),
        "activations": ctx.overhead(clip_activation_bytes(model.clip)),
    }
    clip_stage = StagePlan("clip", clip_fmt, clip_terms, sum(clip_terms.values()) <= ctx.budget)

    first, other, t5_rest = t5_parts(model.t5)
    t5_stage = _streamed_stage(
        ctx, "t5", profile.t5, model.t5_file, [first, *[other] * (model.t5.num_layers - 1)], t5_rest,
        {
            "embedding and final norm": t5_rest.nbytes("bf16"),
            "activations": ctx.overhead(t5_activation_bytes(model.t5, text_tokens)),
        },
    )  # fmt: skip

    parts = flux_parts(model.flux)
    double, single, flux_rest = parts.double, parts.single, parts.rest
    flux_format = _stage_format(profile.transformer.format, model.transformer_file)
    capability, tensor_cores = route_capability(machine)
    route = routes.choose(ctx.compute, flux_format, capability, ctx.compiled, tensor_cores)
    dtype = getattr(torch, compute_dtype(machine, route))

    def lora_on_activations(name: str) -> bool:
        """Whether the layer's matmul takes its weight as stored (else it dequantizes a copy), as
        ``CompressedLinear`` decides: an 8-bit route, or plain values already in the compute dtype."""
        in_blocks = name.startswith(("double_blocks.", "single_blocks."))
        if in_blocks and routes.takes_route(name, route.name):
            return True
        stored = codec(flux_format if in_blocks else "bf16")  # the layers outside the blocks stay bf16
        return isinstance(stored, PlainCodec) and stored.dtype == dtype

    adapted = model.adapters.get("transformer", AdapterBytes()).layers
    # Compiled, a LoRA on the activations writes its product beside the layer's output (eager adds in place).
    products = lora_product_bytes(adapted, image_tokens, text_tokens, lora_on_activations) if ctx.compiled else 0
    flux_blocks = [double] * model.flux.depth + [single] * model.flux.depth_single_blocks
    modulations = [parts.double_modulations] * model.flux.depth
    modulations += [parts.single_modulation] * model.flux.depth_single_blocks
    transformer = _streamed_stage(
        ctx, "transformer", profile.transformer, model.transformer_file, flux_blocks, flux_rest,
        {
            "non-block weights": flux_rest.nbytes("bf16"),
            "VAE (kept loaded)": vae_part(model.vae).nbytes("bf16"),
            "activations": ctx.overhead(transformer_activation_bytes(model.flux, image_tokens, text_tokens) + products),
        },
        modulations,
    )  # fmt: skip

    encode, decode = _vae_stage(ctx, "vae_encode", False), _vae_stage(ctx, "vae_decode", True)
    stages = (clip_stage, t5_stage, encode, transformer, decode)
    uses = [s.host for s in stages]
    if ctx.keep_weights:
        by_tier: Counter[str] = Counter()  # the kept copies follow each component's host tier
        for stage, settings, rest in ((transformer, profile.transformer, flux_rest), (t5_stage, profile.t5, t5_rest)):
            by_tier[settings.host] += stage.terms["resident blocks"] + stage.streamed_bytes + stage.lent_bytes
            by_tier[settings.host] += rest.nbytes("bf16")
        uses.append(_kept_host_use(ctx, by_tier, clip_stage.terms["weights"] + vae_part(model.vae).nbytes("bf16")))
    host = HostUse(
        pinned=max(u.pinned for u in uses),
        pageable=max(u.pageable for u in uses),
        mapped=max(u.mapped for u in uses),
        disk=max(u.disk for u in uses),
    )
    problems = [
        f"{stage.name} format {stage.format} cannot be made from a {file.format} file"
        for stage, file in ((transformer, model.transformer_file), (t5_stage, model.t5_file))
        if stage.format != file.format and not codec(stage.format).writable
    ]
    problems += _host_problems(ctx, host)
    overhead, per_flop = cal.compute_model()
    flux_fmt = ctx.cost_format(transformer.format)
    compressed = double.compressed_values(flux_fmt) * model.flux.depth
    compressed += single.compressed_values(flux_fmt) * model.flux.depth_single_blocks
    dequant = COMPUTE_BYTES * compressed / (cal.dequant_rate(flux_fmt, machine) * 1e9) if compressed else 0.0
    slowdown = card_slowdown(machine, cal)
    compute = max(0.0, overhead + per_flop * transformer_flops(model.flux, text_tokens + image_tokens))
    lora = lora_step_seconds(adapted, image_tokens, text_tokens, lora_on_activations, machine, cal)
    return Plan(
        profile=profile,
        machine=machine,
        width=ctx.width,
        height=ctx.height,
        text_tokens=text_tokens,
        image_tokens=image_tokens,
        budget_bytes=ctx.budget,
        stages=stages,
        # The reference GPU's step in the route (eager bf16 scaled by the route's measured gain) on this card.
        compute_seconds=compute * routes.speed_factor(route.name, capability, ctx.compiled) * slowdown,
        transfer_seconds=transformer.transfer_seconds,
        dequant_seconds=dequant * routes.weight_only_share(route.name, model.flux),
        link_gbps=ctx.link_gbps,
        link_measured=machine.h2d_gbps is not None,
        other_stage_seconds=_other_stage_seconds(ctx, stages, slowdown),
        host=host,
        problems=tuple(problems),
        keeps_weights=ctx.keep_weights,
        route=route,
        compiled=ctx.compiled,
        routes_available=routes.available(capability, tensor_cores),
        lora_seconds=lora,
    )


def _other_stage_seconds(ctx: _Context, stages: Sequence[StagePlan], slowdown: float) -> float:
    """One edit's time outside the sampling steps: the reference GPU's stage times on this card, the
    VAE's longer in tiles (x1.15 measured at 544 px), plus T5's streamed bytes and the modulations'
    one pass over the link."""
    seconds = 0.0
    for stage in stages:
        peer = ctx.cal.peer_stage_seconds.get(stage.name, 0.0) * slowdown
        seconds += peer * (1.15 if stage.tile else 1.0) + (stage.transfer_seconds if stage.name == "t5" else 0.0)
        seconds += stage.lent_bytes / (ctx.link_gbps * 1e9)  # the modulations' one pass per edit
    return seconds


def _kept_host_use(ctx: _Context, block_parts: Mapping[str, int], whole: int) -> HostUse:
    """Host memory of a pipeline that keeps every component between edits (see ``KontextPipeline``).

    ``block_parts`` are the transformer's and T5's bytes by host tier; they are packed as their
    engines place them, pinned while the profile's cap allows. CLIP and the VAE (``whole``) wait in
    pageable memory.
    """
    wanted = block_parts.get("pinned", 0)
    pinned = min(wanted, ctx.profile.pinned_cap_bytes)
    mapped = block_parts.get("mmap", 0)
    pageable = whole + block_parts.get("pageable", 0) + wanted - pinned
    return HostUse(pinned=pinned, pageable=pageable, mapped=mapped, disk=mapped)


def _host_problems(ctx: _Context, host: HostUse) -> list[str]:
    machine, cal, profile = ctx.machine, ctx.cal, ctx.profile
    problems = []
    if machine.ram_total < profile.ram_gib * GIB * cal.ram_size_tolerance:
        problems.append(f"meant for hosts with {profile.ram_gib:g} GiB of RAM")
    if host.pinned > cal.pinned_ram_share * machine.ram_total:
        problems.append(f"would pin {gib_text(host.pinned)}, over {cal.pinned_ram_share:.0%} of RAM")
    room = machine.ram_available - cal.host_reserve_bytes
    if host.pinned + host.pageable > room:
        problems.append(f"needs {gib_text(host.pinned + host.pageable)} of host RAM, {gib_text(max(0, room))} to spare")
    if host.disk and machine.disk_free is not None and host.disk > machine.disk_free:
        problems.append(f"a converted copy needs {gib_text(host.disk)} of disk, {gib_text(machine.disk_free)} free")
    return problems


def _candidate(p: Plan) -> Candidate:
    return Candidate(p.profile.name, p.fits, p.peak_bytes, p.seconds_per_step, p.why_not())


def _preference(p: Plan) -> tuple:
    """Fitting first, then faster (to the millisecond), then the profile meant for the closest card size."""
    card = abs(p.profile.vram_gib * GIB - p.machine.vram_total)
    return (not p.fits, round(p.seconds_per_step, 3), card, p.profile.name)


def plan(
    machine: Machine,
    profiles: Mapping[str, Profile],
    width: int,
    height: int,
    model: ModelSizes | None = None,
    profile_name: str | None = None,
    calibration: Calibration = CALIBRATION,
    keep_weights: bool = False,
    references: int = 0,
    compute: str = "auto",
    compiled: bool = False,
) -> Plan:
    """The plan of ``profile_name`` (fitting or not), else of the fastest profile that fits.

    ``keep_weights``: plan for successive edits, where the whole model stays in host memory.
    ``references``: reference images beside the main one; their tokens lengthen the sequence.
    ``compute``: the transformer's route (``compute.routes.CHOICES``); fp8 and int8 store every
    profile's transformer blocks in their 8-bit format. ``compiled``: whether blocks run compiled.

    Raises ``BudgetTooSmall`` (a KontextError) with the smallest VRAM budget that would work when no
    profile fits the card, and a KontextError when none suits the host whatever the card.
    """
    if width <= 0 or height <= 0:
        raise KontextError(f"the image size must be positive, got {width}x{height}")
    if machine.vram_free <= 0:
        raise KontextError("no CUDA GPU here: plan for a card of a given size (a VRAM budget) instead")
    if not profiles:
        raise KontextError("no profiles to choose from")
    if profile_name is not None:
        profile_name = resolve_profile(profiles, profile_name)
    model = model or ModelSizes()
    storage = routes.storage_for(compute)
    if storage is not None:
        profiles = {n: replace(p, transformer=replace(p.transformer, format=storage)) for n, p in profiles.items()}

    def plan_for(profile: Profile, on: Machine) -> Plan:
        budget = on.vram_free - profile.margin_bytes
        context = _Context(
            profile, on, model, width, height, budget, calibration, keep_weights, references, compute, compiled
        )
        return _profile_plan(context)

    plans = {name: plan_for(profile, machine) for name, profile in profiles.items()}
    ranked = sorted(plans.values(), key=_preference)
    candidates = tuple(map(_candidate, ranked))
    if profile_name is not None:
        return replace(plans[profile_name], explicit=True, candidates=candidates)
    if ranked[0].fits:
        return replace(ranked[0], candidates=candidates)

    # The smallest card (in steps of 0.1 GiB) on which each profile fits; fitting only grows with it.
    step = GIB // 10
    smallest: dict[str, int] = {}
    for name, profile in profiles.items():

        def fits(tenths: int, profile: Profile = profile) -> bool:
            card = replace(machine, vram_total=tenths * step, vram_free=tenths * step)
            return plan_for(profile, card).fits

        low, high = 1, 10 * 1024  # 0.1 GiB .. 1 TiB
        if not fits(high):
            continue
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(middle) else (middle + 1, high)
        smallest[name] = low * step
    if not smallest:
        fewest = min(plans.values(), key=lambda p: p.profile.ram_gib)
        raise KontextError(
            f"no profile suits this host ({gib_text(machine.ram_total)} RAM, "
            f"{gib_text(machine.ram_available)} available) at {width}x{height}: "
            f"{fewest.profile.name} {'; '.join(fewest.problems) or 'does not fit'}"
        )
    best = min(smallest, key=lambda name: (smallest[name], name))
    raise BudgetTooSmall(
        f"no profile fits {gib_text(machine.vram_free)} of VRAM at {width}x{height}: the smallest budget "
        f"that would work is {smallest[best] / GIB:.1f} GiB (profile {best})",
        smallest[best],
    )
