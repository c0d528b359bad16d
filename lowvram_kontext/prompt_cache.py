"""Text-encoder outputs kept on disk, so a repeated instruction skips T5 and CLIP entirely.

Each entry is one safetensors file, ``<key>.safetensors``, holding ``txt`` (the T5 states) and
``vec`` (the CLIP pooled state); its metadata records the prompt and the encoder identity so a
person can tell what an entry is. The key is a SHA-256 over the prompt, the compute dtype and the
identity of the text encoders' and tokenizers' files (resolved path, size and modification time of
every file: the contents are never read, the files are gigabytes), so replacing or touching any of
those files leaves stale entries unused.

The folder is ``$LOWVRAM_KONTEXT_PROMPT_CACHE`` when set, else ``prompts/`` inside the package's
cache folder (see ``paths.cache_dir``). It only holds derived data: it may be moved (point the
variable at the new place) or deleted at any time. ``PromptCache.clear`` removes only the entry
files this module writes, nothing else that may share the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import KontextError, WeightFileError
from .paths import cache_dir
from .weights.safetensors_file import SafetensorsFile, save_safetensors

ENV_VAR = "LOWVRAM_KONTEXT_PROMPT_CACHE"
# Part of every key: bump it when what an entry holds changes, and old entries stop matching.
FORMAT = "lowvram_kontext.prompt_embedding.v1"
_ENTRY = re.compile(r"[0-9a-f]{64}\.safetensors")
_PARTIAL = re.compile(r"\.[0-9a-f]{64}\.safetensors\.partial")  # left by a writer killed mid-write


def default_folder() -> Path:
    """Where prompt embeddings are cached: ``$LOWVRAM_KONTEXT_PROMPT_CACHE``, else ``cache_dir()/prompts``."""
    if ENV_VAR in os.environ:
        return Path(os.environ[ENV_VAR])
    return cache_dir() / "prompts"


def _canonical_digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _files_under(folder: Path) -> Iterator[Path]:
    """Every file below ``folder``, following linked folders but never entering one twice."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(root))
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(root, d)) not in seen]
        for name in files:
            yield Path(root, name)


def _stat_record(path: Path) -> list[str | int]:
    resolved = path.resolve()
    st = resolved.stat()
    return [str(resolved), st.st_size, st.st_mtime_ns]


def encoder_identity(paths: Sequence[Path]) -> str:
    """A digest naming these weight files/folders and tokenizer files as they are on disk now.

    Built from each file's resolved path, size and modification time (files inside a folder
    recursively, sorted), so it costs a few ``stat`` calls however large the files are. The order
    of ``paths`` counts: swapping two components gives a different identity.
    """
    records = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise WeightFileError(f"{path}: no such file or folder (needed to identify the text encoders)")
        if path.is_dir():
            files = sorted(_stat_record(f) for f in _files_under(path))
        else:
            files = [_stat_record(path)]
        records.append({"path": str(path.resolve()), "files": files})
    return _canonical_digest(records)


def key(prompt: str, identity: str, dtype: torch.dtype) -> str:
    """The cache key (64 hex digits) of ``prompt`` encoded by the encoders ``identity`` names, in ``dtype``."""
    return _canonical_digest({"format": FORMAT, "prompt": prompt, "encoders": identity, "dtype": str(dtype)})


class PromptCache:
    """Prompt embeddings (``txt`` [1, 512, ctx], ``vec`` [1, pooled]) stored on disk under their key."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else default_folder()

    def path(self, entry_key: str) -> Path:
        """The file that holds (or would hold) the entry ``entry_key``."""
        if not _ENTRY.fullmatch(f"{entry_key}.safetensors"):
            raise KontextError(f"prompt cache key must be 64 lowercase hex digits, got {entry_key!r}")
        return self.folder / f"{entry_key}.safetensors"

    def get(self, entry_key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(txt, vec)`` on the CPU in their stored dtype, or None on a miss.

        An entry that cannot be read back whole and well-formed is a miss: it is deleted, so the
        embedding is computed and stored again.
        """
        path = self.path(entry_key)
        if not path.is_file():
            return None
        try:
            entry = SafetensorsFile(path)
            txt, vec = entry.read("txt"), entry.read("vec")
        except (KeyError, OSError, WeightFileError):
            txt = vec = None
        if txt is None or vec is None or txt.dim() != 3 or vec.dim() != 2 or txt.shape[0] != 1 or vec.shape[0] != 1:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
        return txt, vec

    def put(self, entry_key: str, txt: torch.Tensor, vec: torch.Tensor, prompt: str = "", identity: str = "") -> bool:
        """Store an embedding atomically; ``prompt`` and ``identity`` go into the metadata for people.

        Returns False, with nothing written, when the folder cannot be written (read-only, disk
        full): the cache only saves time, so that is never a reason to fail an edit.
        """
        path = self.path(entry_key)
        tensors = {"txt": txt.detach().to("cpu"), "vec": vec.detach().to("cpu")}
        metadata = {"format": FORMAT, "prompt": prompt, "encoders": identity, "dtype": str(txt.dtype)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_safetensors(tensors, path, metadata)
        except (OSError, SafetensorError):  # the writer reports I/O failures as SafetensorError
            return False
        return True

    def entries(self) -> list[Path]:
        """The entry files now in the folder, sorted by name."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _ENTRY.fullmatch(p.name) and p.is_file())

    def clear(self) -> int:
        """Delete every entry (and any half-written one a killed process left); returns how many entries went."""
        removed = 0
        for path in self.entries():
            path.unlink(missing_ok=True)
            removed += 1
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                if _PARTIAL.fullmatch(path.name):
                    path.unlink(missing_ok=True)
        return removed
