"""The memory planner: machine facts, profiles and a resolution in, a ``Plan`` out. No GPU calls.

- ``profiles``: the TOML profile schema and its strict reading (a new profile key goes there).
- ``sizes``: what the models weigh in each storage format, counted on the meta device.
- ``costs``: the model's calibration constants, activation bytes and FLOPs.
- ``planning``: the per-stage memory and time model, and the choice of profile (``plan``).
- ``plans``: what a plan says (``Plan``, ``StagePlan``), for the pipeline and the commands.

The plan's words (the table and JSON of ``plan``, also shown by ``edit --verbose`` and ``serve``) are in
``commands.plan``.
"""

from .costs import CALIBRATION, Calibration, card_slowdown, transformer_activation_bytes, transformer_flops
from .planning import plan
from .plans import DEFAULT_EDIT_STEPS, BudgetTooSmall, Candidate, HostUse, Plan, StagePlan, gib_text
from .profiles import (
    PROFILES_DIR,
    PROFILES_ENV,
    Profile,
    Streaming,
    VaeSettings,
    load_profile_file,
    load_profiles,
    resolve_profile,
)
from .sizes import (
    AdaptedLayer,
    AdapterBytes,
    FileWeights,
    ModelSizes,
    clip_part,
    flux_parts,
    storage_bytes,
    t5_parts,
    vae_part,
)

__all__ = [
    "CALIBRATION",
    "DEFAULT_EDIT_STEPS",
    "PROFILES_DIR",
    "PROFILES_ENV",
    "AdaptedLayer",
    "AdapterBytes",
    "BudgetTooSmall",
    "Calibration",
    "Candidate",
    "FileWeights",
    "HostUse",
    "ModelSizes",
    "Plan",
    "Profile",
    "StagePlan",
    "Streaming",
    "VaeSettings",
    "card_slowdown",
    "clip_part",
    "flux_parts",
    "gib_text",
    "load_profile_file",
    "load_profiles",
    "plan",
    "resolve_profile",
    "storage_bytes",
    "t5_parts",
    "transformer_activation_bytes",
    "transformer_flops",
    "vae_part",
]
