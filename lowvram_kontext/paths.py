"""Where the program keeps the files it makes itself (tiny demo model, link speed, prompt embeddings)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where generated files live: $LOWVRAM_KONTEXT_CACHE, else the user's cache folder."""
    if "LOWVRAM_KONTEXT_CACHE" in os.environ:
        return Path(os.environ["LOWVRAM_KONTEXT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "lowvram_kontext"
