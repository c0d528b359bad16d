"""Shared fixtures: one tiny random-weight model written in every layout, once per test session."""

from pathlib import Path

import pytest

from lowvram_kontext.hardware import use_cpu_threads
from lowvram_kontext.tiny import TinyWeights, write_tiny_checkpoints

use_cpu_threads()  # as the commands do: no more threads than free cores


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep whatever the commands cache (prompt embeddings, block files) out of the user's cache folder."""
    monkeypatch.setenv("LOWVRAM_KONTEXT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("LOWVRAM_KONTEXT_PROMPT_CACHE", raising=False)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyWeights]:
    root = tmp_path_factory.mktemp("tiny")
    weights = write_tiny_checkpoints(root, seed=0)
    return root, weights


@pytest.fixture(scope="session")
def tiny_root(tiny_files: tuple[Path, TinyWeights]) -> Path:
    return tiny_files[0]
