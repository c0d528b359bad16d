"""The on-disk prompt-embedding cache: keys, exact round trips, atomic writes, damaged entries."""

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lowvram_kontext import prompt_cache
from lowvram_kontext.errors import KontextError, WeightFileError
from lowvram_kontext.paths import cache_dir
from lowvram_kontext.prompt_cache import PromptCache, encoder_identity, key


def embedding(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 512, 64, generator=g).to(dtype), torch.randn(1, 32, generator=g).to(dtype)


@pytest.fixture
def encoders(tmp_path: Path) -> list[Path]:
    """A T5 folder of two shards, a CLIP file and a tokenizer folder with a nested file."""
    t5, tok = tmp_path / "enc" / "text_encoder_2", tmp_path / "enc" / "tokenizers" / "tokenizer_2"
    t5.mkdir(parents=True)
    tok.mkdir(parents=True)
    for path, data in (
        (t5 / "model-00001-of-00002.safetensors", b"a" * 100),
        (t5 / "model-00002-of-00002.safetensors", b"b" * 50),
        (tmp_path / "enc" / "clip_l.safetensors", b"c" * 70),
        (tok / "spiece.model", b"d" * 10),
    ):
        path.write_bytes(data)
    return [t5, tmp_path / "enc" / "clip_l.safetensors", tmp_path / "enc" / "tokenizers"]


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    cache = PromptCache(tmp_path / "cache")
    txt, vec = embedding(dtype)
    k = key("make it snow", "enc", dtype)
    assert cache.get(k) is None
    assert not cache.folder.exists()  # nothing is created until the first put
    assert cache.put(k, txt, vec, prompt="make it snow", identity="enc")
    got_txt, got_vec = cache.get(k)
    assert got_txt.dtype == dtype and got_vec.dtype == dtype
    assert got_txt.device.type == "cpu" and got_vec.device.type == "cpu"
    assert torch.equal(got_txt.view(torch.uint8), txt.view(torch.uint8))
    assert torch.equal(got_vec.view(torch.uint8), vec.view(torch.uint8))
    assert cache.entries() == [tmp_path / "cache" / f"{k}.safetensors"]
    with safetensors.safe_open(cache.entries()[0], "pt") as f:
        meta = f.metadata()
    assert meta["prompt"] == "make it snow" and meta["encoders"] == "enc" and meta["dtype"] == str(dtype)


def test_key_depends_on_prompt_identity_and_dtype() -> None:
    base = key("add a hat", "abc", torch.bfloat16)
    assert len(base) == 64 and int(base, 16) >= 0
    assert base == key("add a hat", "abc", torch.bfloat16)
    others = {
        key("add a hat ", "abc", torch.bfloat16),
        key("add a scarf", "abc", torch.bfloat16),
        key("add a hat", "abd", torch.bfloat16),
        key("add a hat", "abc", torch.float16),
    }
    assert base not in others and len(others) == 4


def test_identity_changes_with_any_encoder_file(encoders: list[Path]) -> None:
    first = encoder_identity(encoders)
    assert first == encoder_identity(encoders)
    assert first == encoder_identity([p.parent / ".." / p.parent.name / p.name for p in encoders])  # resolved

    seen = {first}
    shard = encoders[0] / "model-00002-of-00002.safetensors"
    bump_mtime(shard)  # same bytes, touched
    seen.add(encoder_identity(encoders))
    bump_mtime(encoders[1])
    seen.add(encoder_identity(encoders))
    nested = encoders[2] / "tokenizer_2" / "spiece.model"
    nested.write_bytes(b"d" * 11)  # size change deep in a folder
    seen.add(encoder_identity(encoders))
    (encoders[2] / "tokenizer_2" / "added_tokens.json").write_bytes(b"{}")  # a new file
    seen.add(encoder_identity(encoders))
    seen.add(encoder_identity(encoders[::-1]))  # components swapped
    assert len(seen) == 6


def test_identity_follows_linked_folders_once(encoders: list[Path], tmp_path: Path) -> None:
    before = encoder_identity(encoders)
    (encoders[2] / "tokenizer_2" / "loop").symlink_to(encoders[2], target_is_directory=True)
    assert encoder_identity(encoders) == before  # the loop ends and adds no file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "vocab.json").write_bytes(b"{}")
    (encoders[2] / "tokenizer").symlink_to(elsewhere, target_is_directory=True)
    assert encoder_identity(encoders) != before  # a linked folder's files count


def test_identity_of_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(WeightFileError, match="nowhere.safetensors: no such file"):
        encoder_identity([tmp_path / "nowhere.safetensors"])


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage", "empty", "wrong_tensors"])
def test_damaged_entry_is_a_miss_and_removed(tmp_path: Path, damage: str) -> None:
    cache = PromptCache(tmp_path)
    k = key("p", "i", torch.bfloat16)
    assert cache.put(k, *embedding())
    path = cache.path(k)
    data = path.read_bytes()
    if damage == "truncate_data":
        path.write_bytes(data[: len(data) - 1000])
    elif damage == "truncate_header":
        path.write_bytes(data[:20])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        safetensors.torch.save_file({"txt": torch.zeros(512, 64)}, str(path))  # no vec, txt of wrong rank
    assert cache.get(k) is None
    assert not path.exists()
    assert cache.put(k, *embedding()) and cache.get(k) is not None  # recomputed and stored again


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_write_failing_midway_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    real = safetensors.torch.save_file

    def half_then_fail(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:4096])
        raise failure

    cache = PromptCache(tmp_path / "cache")
    k = key("p", "i", torch.bfloat16)
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    if isinstance(failure, OSError):
        assert cache.put(k, *embedding()) is False  # a full disk costs the cache entry, not the edit
    else:
        with pytest.raises(KeyboardInterrupt):
            cache.put(k, *embedding())
    assert list(cache.folder.iterdir()) == []
    assert cache.get(k) is None


def test_unwritable_folder_is_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    cache = PromptCache(tmp_path / "file" / "cache")  # a parent that is a file: mkdir fails
    assert cache.put(key("p", "i", torch.float32), *embedding(torch.float32)) is False


def test_clear_removes_only_entries(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path)
    keys = [key(f"prompt {i}", "i", torch.bfloat16) for i in range(3)]
    for i, k in enumerate(keys):
        assert cache.put(k, *embedding(seed=i))
    stale = tmp_path / f".{keys[0]}.safetensors.partial"  # what a killed writer leaves
    stale.write_bytes(b"half")
    (tmp_path / "model.safetensors").write_bytes(b"not ours")
    (tmp_path / "notes.txt").write_bytes(b"not ours")
    assert cache.entries() == sorted(cache.path(k) for k in keys)
    assert cache.clear() == 3
    assert cache.entries() == [] and all(cache.get(k) is None for k in keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.txt"]
    assert PromptCache(tmp_path / "never-made").clear() == 0


def test_default_folder_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(prompt_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("LOWVRAM_KONTEXT_CACHE", str(tmp_path / "base"))
    assert PromptCache().folder == cache_dir() / "prompts" == tmp_path / "base" / "prompts"
    monkeypatch.setenv(prompt_cache.ENV_VAR, str(tmp_path / "moved"))
    cache = PromptCache()
    assert cache.folder == tmp_path / "moved"
    k = key("p", "i", torch.bfloat16)
    assert cache.put(k, *embedding())
    assert (tmp_path / "moved" / f"{k}.safetensors").is_file()
    assert not (tmp_path / "base").exists()


def test_malformed_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KontextError, match="64 lowercase hex"):
        PromptCache(tmp_path).get("../../etc/passwd")
