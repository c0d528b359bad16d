"""Where a model's components are: explicit files, a diffusers folder, or an all-in-one checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import KontextError, MissingComponent
from .layouts.bundle import bundle_components
from .loading import COMPONENTS


def component_paths(model: Path | None, **given: Path | None) -> dict[str, Path]:
    """The path of each component given explicitly or found in ``model`` (a diffusers folder or an
    all-in-one checkpoint file), checked to exist.

    ``given`` maps component names ("transformer", "t5", "clip", "vae") to explicit paths or None;
    a component neither given nor in a model folder is left out.
    """
    bundled = bundle_components(Path(model)) if model is not None and Path(model).is_file() else None
    if model is not None and not Path(model).is_dir() and not bundled:
        raise KontextError(f"{model}: no such model folder or all-in-one checkpoint file")
    paths: dict[str, Path] = {}
    for name, component in COMPONENTS.items():
        path = given.get(name)
        if path is None and bundled is not None:
            if name not in bundled:
                raise MissingComponent(f"{model}: the checkpoint holds no {component.label}", name)
            path = Path(model)
        elif path is None and model is not None:
            path = Path(model) / component.folder
            if not path.is_dir():
                missing = f"{model}: the model folder has no {component.folder}/ ({component.label})"
                raise MissingComponent(missing, name)
        if path is not None:
            if not Path(path).exists():
                raise KontextError(f"{path}: no such {component.label} file or folder")
            paths[name] = Path(path)
    return paths


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
        paths = component_paths(model, transformer=transformer, t5=t5, clip=clip, vae=vae)
        for name, component in COMPONENTS.items():
            if name not in paths:
                raise MissingComponent(f"no {component.label} given", name)
        if tokenizers is None and (model is None or not Path(model).is_dir()):
            raise MissingComponent("no tokenizers given (a folder with tokenizer/ and tokenizer_2/)", "tokenizers")
        return cls(tokenizers=Path(tokenizers if tokenizers is not None else model), **paths)
