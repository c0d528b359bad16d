"""Prompt tokenizers for CLIP and T5, read from local files only.

Both are built on the ``tokenizers`` library and produce fixed-length id lists the way the Kontext
pipeline feeds its encoders: CLIP gets ``<|startoftext|> ... <|endoftext|>`` padded to 77 ids, T5 gets
the prompt's pieces, ``</s>``, then pad id 0 up to 512 ids. Longer prompts are cut so that the closing
token always survives.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sentencepiece
import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE, Unigram

from .errors import KontextError

CLIP_START = "<|startoftext|>"
CLIP_END = "<|endoftext|>"
CLIP_LENGTH = 77
T5_PAD = "<pad>"
T5_EOS = "</s>"
T5_UNK = "<unk>"
T5_LENGTH = 512

# CLIP's word split: its two special tokens, English contractions, runs of letters, single digits,
# runs of anything else that is not whitespace. Whitespace itself is dropped.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class _FixedLengthTokenizer:
    """Encodes a prompt as ``prefix + pieces + suffix``, cut and padded to exactly ``length`` ids."""

    def __init__(self, backend: Tokenizer, prefix: list[int], suffix: list[int], pad_id: int, length: int):
        self._backend = backend
        self._prefix = prefix
        self._suffix = suffix
        self._pad_id = pad_id
        self.length = length

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (special tokens included)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def room(self) -> int:
        """How many of the prompt's tokens fit; the rest are cut."""
        return self.length - len(self._prefix) - len(self._suffix)

    def count(self, text: str) -> int:
        """How many tokens ``text`` has before cutting."""
        return len(self._backend.encode(text, add_special_tokens=False).ids)

    def __call__(self, text: str) -> list[int]:
        """The ``length`` ids of ``text``."""
        pieces = self._backend.encode(text, add_special_tokens=False).ids[: self.room]
        ids = self._prefix + pieces + self._suffix
        return ids + [self._pad_id] * (self.length - len(ids))

    def as_tensor(self, text: str) -> torch.Tensor:
        """The ids of ``text`` as a LongTensor of shape [1, length]."""
        return torch.tensor([self(text)], dtype=torch.long)


def _token_id(backend: Tokenizer, token: str, where: Path) -> int:
    """Id of ``token`` in the model's own vocabulary (special tokens added later do not count)."""
    token_id = backend.model.token_to_id(token)
    if token_id is None:
        raise KontextError(f"{where}: the vocabulary has no {token!r} token")
    return token_id


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KontextError(f"{path}: cannot read it as JSON ({error})") from error
    if not isinstance(value, dict):
        raise KontextError(f"{path}: expected a JSON object")
    return value


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn any failure to parse ``path`` into a one-line KontextError."""
    try:
        yield
    except KontextError:
        raise
    except Exception as error:  # tokenizers and sentencepiece report bad data as plain exceptions
        raise KontextError(f"{path}: cannot read it as {what} ({' '.join(str(error).split())})") from error


def _token_content(value: object) -> str | None:
    """A token as the side files write it: a plain string or an object with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ClipTokenizer(_FixedLengthTokenizer):
    """CLIP's byte-level BPE: NFC, whitespace runs to one space, lower case, ``</w>`` ends each word."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad_token: str = CLIP_END,
        normalized: frozenset[str] = frozenset(),
        where: Path = Path("memory"),
    ):
        """``normalized``: the special tokens recognised in the normalised (lower-cased) text rather than
        in the raw text, as the side files mark them."""
        backend = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                unk_token=CLIP_END,
                end_of_word_suffix="</w>",
                continuing_subword_prefix="",
                fuse_unk=False,
            )
        )
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # As in transformers, the pad token is special too: a pad token such as "!" is cut out of the text.
        backend.add_special_tokens(
            [AddedToken(token, normalized=token in normalized) for token in (CLIP_START, CLIP_END, pad_token)]
        )
        super().__init__(
            backend,
            prefix=[_token_id(backend, CLIP_START, where)],
            suffix=[_token_id(backend, CLIP_END, where)],
            pad_id=_token_id(backend, pad_token, where),
            length=CLIP_LENGTH,
        )

    @classmethod
    def from_dir(cls, folder: Path) -> ClipTokenizer:
        """Read ``vocab.json`` and ``merges.txt`` (and the pad token from the side files, if present)."""
        vocab = _read_json(folder / "vocab.json")
        try:
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise KontextError(f"{folder / 'merges.txt'}: cannot read it ({error})") from error
        merges = []
        for number, line in enumerate(lines, start=1):
            if not line or (number == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise KontextError(f"{folder / 'merges.txt'}: line {number} is not two symbols")
            merges.append((pair[0], pair[1]))
        pad_token, normalized = CLIP_END, set()
        for side_file in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / side_file).is_file():
                config = _read_json(folder / side_file)
                pad_token = _token_content(config.get("pad_token")) or pad_token
                marked = [*config.values(), *(config.get("added_tokens_decoder") or {}).values()]
                normalized |= {
                    t["content"]
                    for t in marked
                    if isinstance(t, dict) and t.get("normalized") and isinstance(t.get("content"), str)
                }
        with _reading(folder, "a BPE vocabulary (vocab.json and merges.txt)"):
            return cls(vocab, merges, pad_token, frozenset(normalized), where=folder)


def _proto_fields(data: bytes) -> Iterator[tuple[int, bytes | int]]:
    """(field number, value) pairs of one serialized protobuf message; nested messages stay bytes."""
    position = 0

    def varint() -> int:
        nonlocal position
        value = shift = 0
        while True:
            if position >= len(data):
                raise ValueError("the data ends inside a number")
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while position < len(data):
        key = varint()
        wire_type = key & 7
        if wire_type == 0:
            yield key >> 3, varint()
            continue
        size = {1: 8, 5: 4}.get(wire_type)
        if wire_type == 2:
            size = varint()
        if size is None or position + size > len(data):
            raise ValueError("not a valid protobuf message")
        yield key >> 3, data[position : position + size]
        position += size


def spm_precompiled_charsmap(model: bytes) -> bytes:
    """The normalisation table of a serialized SentencePiece model (its ``precompiled_charsmap``)."""
    for field, spec in _proto_fields(model):
        if field == 3 and isinstance(spec, bytes):
            for inner, value in _proto_fields(spec):
                if inner == 2 and isinstance(value, bytes):
                    return value
    return b""


class T5Tokenizer(_FixedLengthTokenizer):
    """T5's SentencePiece unigram: the model's character normalisation, words split on whitespace, each
    word prefixed with ``▁``, then ``</s>``. Padding uses ``<pad>`` (id 0 in T5)."""

    def __init__(
        self,
        pieces: list[tuple[str, float]],
        unk_id: int,
        charsmap: bytes,
        special_tokens: list[str],
        where: Path = Path("memory"),
    ):
        backend = Tokenizer(Unigram(pieces, unk_id=unk_id, byte_fallback=False))
        if charsmap:
            backend.normalizer = normalizers.Precompiled(charsmap)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            ]
        )
        backend.add_special_tokens([AddedToken(token, normalized=False) for token in special_tokens])
        super().__init__(
            backend,
            prefix=[],
            suffix=[_token_id(backend, T5_EOS, where)],
            pad_id=_token_id(backend, T5_PAD, where),
            length=T5_LENGTH,
        )

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> T5Tokenizer:
        """Read a unigram ``tokenizer.json``: its pieces, unknown id, normalisation table, special tokens."""
        spec = _read_json(path)
        model = spec.get("model") or {}
        if model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
            raise KontextError(f"{path}: expected a Unigram model with a vocab list")
        with _reading(path, "a Unigram tokenizer.json"):
            pieces = [(str(piece), float(score)) for piece, score in model["vocab"]]
            charsmap = b""
            normalizer = spec.get("normalizer") or {}
            for step in normalizer.get("normalizers", [normalizer]):
                if step.get("type") == "Precompiled" and step.get("precompiled_charsmap"):
                    charsmap = base64.b64decode(step["precompiled_charsmap"])
            added = sorted(spec.get("added_tokens") or [], key=lambda token: token["id"])
            specials = [token["content"] for token in added if token.get("special")]
            return cls(pieces, int(model.get("unk_id") or 0), charsmap, specials, where=path)

    @classmethod
    def from_spiece(cls, path: Path, extra_ids: int = 100) -> T5Tokenizer:
        """Read a SentencePiece ``spiece.model``; T5's ``extra_ids`` sentinels follow its pieces."""
        with _reading(path, "a SentencePiece model"):
            model = path.read_bytes()
            processor = sentencepiece.SentencePieceProcessor(model_proto=model)
            pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
            sentinels = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
            pieces += [(token, 0.0) for token in sentinels]
            specials = [T5_PAD, T5_EOS, T5_UNK, *sentinels]
            return cls(pieces, processor.unk_id(), spm_precompiled_charsmap(model), specials, where=path)

    @classmethod
    def from_dir(cls, folder: Path) -> T5Tokenizer:
        """Read ``tokenizer.json`` if present, else ``spiece.model`` (``extra_ids`` from the config)."""
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json")
        extra_ids = 100
        if (folder / "tokenizer_config.json").is_file():
            extra_ids = int(_read_json(folder / "tokenizer_config.json").get("extra_ids", extra_ids))
        return cls.from_spiece(folder / "spiece.model", extra_ids)


def load_tokenizers(root: Path) -> tuple[ClipTokenizer, T5Tokenizer]:
    """The CLIP (``root/tokenizer``) and T5 (``root/tokenizer_2``) tokenizers of a Kontext model folder."""
    clip_dir, t5_dir = root / "tokenizer", root / "tokenizer_2"
    if not all((clip_dir / name).is_file() for name in ("vocab.json", "merges.txt")):
        raise KontextError(f"CLIP tokenizer not found: looked for vocab.json and merges.txt in {clip_dir}")
    if not any((t5_dir / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise KontextError(f"T5 tokenizer not found: looked for tokenizer.json or spiece.model in {t5_dir}")
    return ClipTokenizer.from_dir(clip_dir), T5Tokenizer.from_dir(t5_dir)
