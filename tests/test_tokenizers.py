"""Tokenizers: ids equal transformers' on the same files (tiny and real-size CLIP vocabularies)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch
import transformers

from lowvram_kontext.errors import KontextError
from lowvram_kontext.tiny_tokenizers import byte_symbols, write_tiny_clip_tokenizer, write_tiny_t5_tokenizer
from lowvram_kontext.tokenizers import ClipTokenizer, T5Tokenizer, load_tokenizers

PROMPTS = [
    "Add a small red hat to the cat",
    "Make the SKY look like a Sunset, please!!",
    "   extra    spaces\tand\ttabs \n and newlines   ",
    "don't change it's shape; we'll see... (really?) [ok] {no} #1 @home",
    "Turn it into a café at 3:45pm on 2024-05-17, costs $19.99 or 100%",
    "Émile's naïve façade, Ünïcödé ½ ﬁ ＡＢＣ",
    "emoji 😀🎨🐈 and ✨ sparkles",
    "a cat <|endoftext|> and </s> inside, <|ENDOFTEXT|>x<|startoftext|>y <extra_id_3>",
    "",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 12),
    "supercalifragilisticexpialidocious" * 40,
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kontext")
    write_tiny_clip_tokenizer(root / "tokenizer")
    write_tiny_t5_tokenizer(root / "tokenizer_2")
    return root


def _clip_reference(folder: Path, class_name: str) -> list[list[int]]:
    tokenizer = getattr(transformers, class_name).from_pretrained(str(folder))
    return [tokenizer(p, padding="max_length", max_length=77, truncation=True)["input_ids"] for p in PROMPTS]


def _t5_reference(folder: Path) -> list[list[int]]:
    tokenizer = transformers.T5TokenizerFast.from_pretrained(str(folder))
    return [tokenizer(p, padding="max_length", max_length=512, truncation=True)["input_ids"] for p in PROMPTS]


def test_tiny_writers_are_deterministic(tmp_path: Path) -> None:
    sizes = [
        (
            write_tiny_clip_tokenizer(tmp_path / run / "tokenizer"),
            write_tiny_t5_tokenizer(tmp_path / run / "tokenizer_2"),
        )
        for run in ("a", "b")
    ]
    assert sizes[0] == sizes[1] == (814, 300)
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(n) for n in names] == [
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
    ]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    vocab = json.loads((tmp_path / "a/tokenizer/vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 814 and vocab["<|endoftext|>"] == 813 and vocab["<|startoftext|>"] == 812
    assert list(vocab)[:512] == byte_symbols() + [s + "</w>" for s in byte_symbols()]
    assert len(set(byte_symbols())) == 256


@pytest.mark.parametrize("class_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_clip_matches_transformers(folders: Path, class_name: str) -> None:
    ours = ClipTokenizer.from_dir(folders / "tokenizer")
    assert [ours(p) for p in PROMPTS] == _clip_reference(folders / "tokenizer", class_name)
    ids = ours("Add a small red hat to the cat")
    assert len(ids) == 77 and ids[0] == 812 and ours.vocab_size == 814
    assert ids[ids.index(813) :] == [813] * (77 - ids.index(813))  # end-of-text, then padding (also end-of-text)
    long = ours(PROMPTS[-2])
    assert len(long) == 77 and long[-1] == 813 and 813 not in long[:-1]


def test_clip_reads_pad_token_from_side_files(folders: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tokenizer"
    shutil.copytree(folders / "tokenizer", folder)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        config = json.loads((folder / name).read_text(encoding="utf-8"))
        config["pad_token"] = "!"
        (folder / name).write_text(json.dumps(config), encoding="utf-8")
    ours = ClipTokenizer.from_dir(folder)
    assert ours("a cat")[-1] == 0
    assert [ours(p) for p in PROMPTS] == _clip_reference(folder, "CLIPTokenizer")


@pytest.mark.parametrize("class_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_clip_real_vocabulary_matches_transformers(tmp_path: Path, class_name: str) -> None:
    """The full 49408-token CLIP vocabulary, built from the merges list the CLIP package ships."""
    spec = importlib.util.find_spec("clip")  # finds the package without running its imports
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the clip package (clip-anytorch) is not installed")
    merges_file = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not merges_file.is_file():
        pytest.skip(f"{merges_file} is missing")
    merges = gzip.open(merges_file, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    ours = ClipTokenizer.from_dir(tmp_path)
    assert ours.vocab_size == 49408
    assert ours("a photo of a cat")[:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert [ours(p) for p in PROMPTS] == _clip_reference(tmp_path, class_name)


@pytest.mark.parametrize(
    "files",
    [
        ("tokenizer.json", "spiece.model", "special_tokens_map.json", "tokenizer_config.json"),
        ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"),
        ("spiece.model", "special_tokens_map.json", "tokenizer_config.json"),
    ],
)
def test_t5_matches_transformers(folders: Path, tmp_path: Path, files: tuple[str, ...]) -> None:
    for name in files:
        shutil.copy(folders / "tokenizer_2" / name, tmp_path / name)
    ours = T5Tokenizer.from_dir(tmp_path)
    assert ours.vocab_size == 300
    assert [ours(p) for p in PROMPTS] == _t5_reference(tmp_path)
    long = ours(PROMPTS[-1])
    assert len(long) == 512 and long[-1] == 1 and 0 not in long and 1 not in long[:-1]


def test_t5_agrees_with_sentencepiece(folders: Path) -> None:
    """Ordinary prompts: the pieces SentencePiece itself gives, then </s>, then pad id 0."""
    ours = T5Tokenizer.from_dir(folders / "tokenizer_2")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folders / "tokenizer_2" / "spiece.model"))
    for prompt in PROMPTS[:6]:
        pieces = processor.encode(prompt)
        assert ours(prompt) == pieces + [1] + [0] * (511 - len(pieces)), prompt


def test_load_tokenizers_and_tensors(folders: Path) -> None:
    clip, t5 = load_tokenizers(folders)
    clip_ids, t5_ids = clip.as_tensor("Add a hat"), t5.as_tensor("Add a hat")
    assert clip_ids.dtype == t5_ids.dtype == torch.long
    assert clip_ids.shape == (1, 77) and t5_ids.shape == (1, 512)
    assert clip_ids[0].tolist() == clip("Add a hat") and t5_ids[0].tolist() == t5("Add a hat")


def test_missing_files_are_named(folders: Path, tmp_path: Path) -> None:
    with pytest.raises(KontextError, match=r"vocab\.json and merges\.txt in .*tokenizer$") as error:
        load_tokenizers(tmp_path)
    assert "\n" not in str(error.value)
    shutil.copytree(folders / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(KontextError, match=r"tokenizer\.json or spiece\.model in .*tokenizer_2$"):
        load_tokenizers(tmp_path)


def test_bad_files_raise_kontext_errors(folders: Path, tmp_path: Path) -> None:
    shutil.copytree(folders / "tokenizer", tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(KontextError, match=r"vocab\.json: cannot read it as JSON"):
        ClipTokenizer.from_dir(tmp_path / "tokenizer")
    vocab = json.loads((folders / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    del vocab["<|startoftext|>"]
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(KontextError, match=re.escape("has no '<|startoftext|>' token")):
        ClipTokenizer.from_dir(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}), encoding="utf-8")
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\nq z\n", encoding="utf-8")
    with pytest.raises(KontextError, match=r"tokenizer: cannot read it as a BPE vocabulary"):
        ClipTokenizer.from_dir(tmp_path / "tokenizer")
    (tmp_path / "spiece.model").write_bytes(b"\x00garbage")
    with pytest.raises(KontextError, match=r"spiece\.model: cannot read it as a SentencePiece model"):
        T5Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": [["a"]]}}))
    with pytest.raises(KontextError, match=r"tokenizer\.json: cannot read it as a Unigram tokenizer\.json"):
        T5Tokenizer.from_dir(tmp_path)
