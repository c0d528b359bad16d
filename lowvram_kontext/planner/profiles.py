"""Memory profiles: one TOML file each, read strictly into a ``Profile``.

The built-in profiles are the repository's ``profiles/NAME.toml``; more come from
``$LOWVRAM_KONTEXT_PROFILES`` (a list of folders separated like ``PATH``) or ``--profile FILE``.

The schema is the dataclasses below and nothing else: each field marked ``key(check)`` is a key of
the file, each field marked ``table(Class)`` a ``[table]`` of ``Class``'s keys, in the order the
fields are declared. ``check`` turns the TOML value into the field's value or raises a ValueError
saying why it cannot; a key whose field has a default may be left out, every other key is
required, and an unknown key is an error. Every error names the file and the key. A new key is one
field here (with a default, the existing profile files stay valid).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import KontextError
from ..hardware import GIB
from ..offload.host import HOST_TIERS
from ..weights.formats import formats

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# A source checkout has the profiles in the repository's profiles/ folder; an installed wheel
# carries them inside the package (the build maps that folder to lowvram_kontext/profiles/).
_PACKAGE = Path(__file__).resolve().parent.parent
PROFILES_DIR = _PACKAGE / "profiles" if (_PACKAGE / "profiles").is_dir() else _PACKAGE.parent / "profiles"
PROFILES_ENV = "LOWVRAM_KONTEXT_PROFILES"
FILE_FORMAT = "file"
MIN_TILE = 64
TILE_MULTIPLE = 16  # a tile must cover whole packed latent cells: 8 pixels per latent cell, 2x2 cells


def resolve_format(name: str) -> str:
    """The registered format ``name`` denotes (GGUF names in any case: ``q8_0`` is ``Q8_0``)."""
    known = formats()
    if name in known:
        return name
    matches = [f for f in known if f.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"unknown format {name!r}; expected {FILE_FORMAT!r} or one of {', '.join(known)}")


# ---- value checks: a TOML value in, the field's value out, or a ValueError saying why not -----------


def _shown(value: object) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {_shown(value)}")
    return value


def _gib(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"expected a number of GiB >= 0, got {_shown(value)}")
    return float(value)


def _positive_gib(value: object) -> float:
    gib = _gib(value)
    if gib == 0:
        raise ValueError("expected a number of GiB > 0, got 0")
    return gib


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number >= 0, got {_shown(value)}")
    return value


def _format(value: object) -> str:
    name = _text(value)
    return name if name == FILE_FORMAT else resolve_format(name)


def _resident(value: object) -> int | str:
    if isinstance(value, str):
        if value not in ("auto", "all"):
            raise ValueError(f'expected a number, "auto" or "all", got {value!r}')
        return value
    return _count(value)


def _host(value: object) -> str:
    if value not in HOST_TIERS:
        raise ValueError(f"expected one of {', '.join(HOST_TIERS)}, got {_shown(value)}")
    return str(value)


def _tile(value: object) -> int | str:
    if isinstance(value, str):
        if value not in ("auto", "never"):
            raise ValueError(f'expected "auto", "never" or a side in pixels, got {value!r}')
        return value
    side = _count(value)
    if side < MIN_TILE or side % TILE_MULTIPLE:
        raise ValueError(f"a tile side must be a multiple of {TILE_MULTIPLE} of at least {MIN_TILE}, got {side}")
    return side


def _names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
        raise ValueError(f"expected a list of names, got {_shown(value)}")
    return tuple(value)


def key(check: Callable[[object], Any], **default: Any) -> Any:
    """A field that is a key of the file, its value made by ``check``; ``default=VALUE`` makes it optional."""
    return field(metadata={"check": check}, **default)


def table(kind: type) -> Any:
    """A field that is a ``[table]`` of the file, holding the keys of the dataclass ``kind``."""
    return field(metadata={"table": kind})


# ---- the schema ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Streaming:
    """How a block-streamed component (``[transformer]``, ``[t5]``) is held."""

    # A storage format (bf16, fp16, fp8_e4m3, int8, nf4, Q8_0, Q4_K...), or "file": keep whatever the
    # weight file holds (GGUF, fp8 files).
    format: str = key(_format)
    # Leading blocks kept on the GPU: a number, "auto" (as many as fit) or "all".
    resident_blocks: int | str = key(_resident)
    prefetch: int = key(_count)  # blocks copied ahead; prefetch + 1 device slots of the largest block
    host: str = key(_host)  # where streamed blocks live: pinned | pageable | mmap


@dataclass(frozen=True)
class ClipSettings:
    """``[clip]``: CLIP is small, always resident."""

    format: str = key(_format)


@dataclass(frozen=True)
class VaeSettings:
    """``[vae]``."""

    # "auto" (tile only when the untiled pass would not fit), "never", or the most output pixels per
    # side decoded at once.
    tile: int | str = key(_tile)


@dataclass(frozen=True)
class MemorySettings:
    """``[memory]``."""

    pinned_cap_gib: float = key(_gib)  # most pinned host memory for weights (staging buffers come on top)
    margin_gib: float = key(_gib)  # VRAM kept free


@dataclass(frozen=True)
class Profile:
    """One profile as its TOML file says."""

    name: str = key(_text)  # must equal the file stem
    description: str = key(_text)  # one line for people
    vram_gib: float = key(_positive_gib)  # the card size it is meant for (documentation and ordering)
    ram_gib: float = key(_gib)  # the least host RAM it is meant for (a host below 90% of it is refused)
    transformer: Streaming = table(Streaming)
    t5: Streaming = table(Streaming)  # T5's 24 blocks
    clip: ClipSettings = table(ClipSettings)
    vae: VaeSettings = table(VaeSettings)
    memory: MemorySettings = table(MemorySettings)
    # Optional: other names that select it (a renamed profile's old names), e.g. aliases = ["8gb"].
    aliases: tuple[str, ...] = key(_names, default=())
    source: Path | None = None  # the file it was read from (not a key)

    @property
    def margin_bytes(self) -> int:
        return int(self.memory.margin_gib * GIB)

    @property
    def pinned_cap_bytes(self) -> int:
        return int(self.memory.pinned_cap_gib * GIB)


# ---- reading ---------------------------------------------------------------------------------------


def parse_table(path: Path, values: Mapping[str, Any], kind: type, where: str = "") -> Any:
    """``kind`` made from the TOML table ``values``; a KontextError naming ``path`` and the key."""
    keys = {f.name: f for f in fields(kind) if f.metadata}
    for name in values:
        if name not in keys:
            raise KontextError(f"{path}: unknown key {where}{name} (expected {', '.join(keys)})")
    made: dict[str, Any] = {}
    for name, spec in keys.items():
        if name not in values:
            if spec.default is MISSING:
                raise KontextError(f"{path}: missing key {where}{name}")
            continue
        value = values[name]
        if "table" in spec.metadata:
            if not isinstance(value, Mapping):
                raise KontextError(f"{path}: {where}{name} must be a [{name}] table, got {_shown(value)}")
            made[name] = parse_table(path, value, spec.metadata["table"], f"{where}{name}.")
            continue
        try:
            made[name] = spec.metadata["check"](value)
        except ValueError as err:
            raise KontextError(f"{path}: {where}{name}: {err}") from None
    return kind(**made)


def load_profile_file(path: Path | str) -> Profile:
    """One profile from its TOML file, validated."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise KontextError(f"{path}: cannot read the profile ({err.strerror})") from None
    except UnicodeDecodeError:
        raise KontextError(f"{path}: not a text file") from None
    except tomllib.TOMLDecodeError as err:
        raise KontextError(f"{path}: not valid TOML ({err})") from None
    profile = parse_table(path, data, Profile)
    if profile.name != path.stem:
        raise KontextError(f"{path}: name {profile.name!r} must equal the file name {path.stem!r}")
    return replace(profile, source=path)


def load_profiles(extra_dirs: Sequence[Path | str] = ()) -> dict[str, Profile]:
    """The built-in profiles, then those of ``$LOWVRAM_KONTEXT_PROFILES``, then ``extra_dirs``.

    A later folder's profile replaces an earlier one of the same name.
    """
    env = [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    profiles: dict[str, Profile] = {}
    for folder in (PROFILES_DIR, *env, *(Path(d) for d in extra_dirs)):
        if not folder.is_dir():
            raise KontextError(f"{folder}: no such profiles folder")
        for path in sorted(folder.glob("*.toml")):
            profile = load_profile_file(path)
            profiles[profile.name] = profile
    return profiles


def resolve_profile(profiles: Mapping[str, Profile], name: str) -> str:
    """The profile ``name`` selects: its own name or one of its aliases; a KontextError when none."""
    if name in profiles:
        return name
    owners = [p.name for p in profiles.values() if name in p.aliases]
    if owners:
        return owners[-1]  # a profile loaded later (a user's folder) wins, as with names
    raise KontextError(f"unknown profile {name!r}; known profiles: {', '.join(sorted(profiles))}")
