"""Small tokenizer folders in the real file formats, for the demo model and the tests.

``write_tiny_clip_tokenizer`` writes what the Kontext repository keeps in ``tokenizer/`` (a byte-level
BPE: vocab.json, merges.txt and the two JSON side files); ``write_tiny_t5_tokenizer`` writes what it keeps
in ``tokenizer_2/`` (a SentencePiece unigram model as spiece.model and as tokenizer.json). Both learn
from a short built-in English text, so the pieces are real English fragments, and both write the same
bytes on every run.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import sentencepiece
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from .tokenizers import CLIP_END, CLIP_START, T5_EOS, T5_PAD, T5_UNK, spm_precompiled_charsmap

CORPUS = """\
Add a small red hat to the cat and keep everything else the same.
Change the color of the car to a deep blue with a glossy finish.
Make the sky look like a warm sunset over the mountains.
Remove the person standing on the left side of the picture.
Turn the photo into a watercolor painting with soft edges.
Replace the text on the sign with the words open all night.
Put a pair of round glasses on the old man and make him smile.
Change the season from summer to winter, with snow on the trees.
The dog is sitting on a wooden bench in the middle of a green park.
A woman in a yellow dress is walking along the beach at night.
Make the house look older, with broken windows and a dark roof.
Add a bright moon and a few stars to the night sky above the city.
Turn the drawing into a realistic photograph of the same scene.
The children are playing with a ball near the water in the morning.
Give the bird long blue feathers and a golden crown on its head.
Change the background to a busy street in a large city at noon.
Keep the face of the girl but change her hair to short and black.
Make the flowers in the garden pink and white instead of orange.
Add heavy rain and grey clouds, and make the ground wet and shiny.
The train is crossing an old stone bridge over a quiet river.
Put the cup of coffee on the table next to the open book.
Make the boat larger and paint it with red and white stripes.
Replace the horse with a zebra that stands in the same place.
Change the style to an oil painting from the nineteenth century.
Make the light softer and the shadows longer, as in the evening.
Add a little girl holding a balloon in front of the shop window.
The mountain has snow at the top and a forest at the bottom.
Turn the apple into an orange and keep the plate and the knife.
Make the room brighter and add a lamp in the corner near the chair.
Remove the cars from the road and add people riding bicycles.
"""

_LOWER_WORD = re.compile(r"[a-z]+")


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255, in vocabulary order.

    Bytes that are printable on their own stand for themselves and come first; the others are mapped,
    in byte order, to the code points from 256 upwards.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _learn_merges(words: Counter[str], count: int) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (end-of-word marked with ``</w>``), most frequent pair first, ties by name."""
    spelled = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in spelled.items():
            for pair in zip(symbols[:-1], symbols[1:], strict=True):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in spelled.items():
            joined: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    joined.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    joined.append(symbols[i])
                    i += 1
            spelled[word] = joined
    return merges


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_clip_tokenizer(folder: Path, merges: int = 300) -> int:
    """Write a CLIP-format BPE tokenizer (``tokenizer/``) into ``folder``; returns its vocabulary size.

    Vocabulary order follows CLIP: the 256 byte symbols, the same with ``</w>``, one entry per merge,
    then start-of-text and end-of-text, so end-of-text has the highest id.
    """
    folder.mkdir(parents=True, exist_ok=True)
    learned = _learn_merges(Counter(_LOWER_WORD.findall(CORPUS.lower())), merges)
    tokens = byte_symbols()
    tokens += [symbol + "</w>" for symbol in tokens]
    for merge in learned:
        if "".join(merge) not in tokens:
            tokens.append("".join(merge))
    tokens += [CLIP_START, CLIP_END]
    vocab = {token: i for i, token in enumerate(tokens)}

    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learned), encoding="utf-8")
    special = {"content": "", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    _write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": {**special, "content": CLIP_START},
            "eos_token": {**special, "content": CLIP_END},
            "pad_token": CLIP_END,
            "unk_token": {**special, "content": CLIP_END},
        },
    )
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(vocab[token]): {**special, "content": token, "special": True} for token in (CLIP_START, CLIP_END)
            },
            "bos_token": CLIP_START,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": CLIP_END,
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": CLIP_END,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": CLIP_END,
        },
    )
    return len(vocab)


def _train_unigram(pieces: int) -> bytes:
    """A serialized SentencePiece unigram model learned from ``CORPUS`` with T5's special ids."""
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(0)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=pieces,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def write_tiny_t5_tokenizer(folder: Path, pieces: int = 200, extra_ids: int = 100) -> int:
    """Write a T5-format tokenizer (``tokenizer_2/``) into ``folder``; returns its vocabulary size.

    ``spiece.model`` holds ``pieces`` unigram pieces (pad 0, eos 1, unk 2); ``tokenizer.json`` holds the
    same pieces followed by the ``extra_ids`` sentinels in T5's order (``<extra_id_0>`` last).
    """
    folder.mkdir(parents=True, exist_ok=True)
    model = _train_unigram(pieces)
    (folder / "spiece.model").write_bytes(model)

    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    vocab += [(token, 0.0) for token in reversed(sentinels)]
    backend = Tokenizer(Unigram(vocab, unk_id=processor.unk_id(), byte_fallback=False))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(spm_precompiled_charsmap(model)), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, processor.eos_id())]
    )
    backend.add_special_tokens([AddedToken(token, normalized=False) for token in (T5_PAD, T5_EOS, T5_UNK)])
    backend.add_special_tokens([AddedToken(token, normalized=False) for token in reversed(sentinels)])
    (folder / "tokenizer.json").write_text(backend.to_str(pretty=True) + "\n", encoding="utf-8")

    _write_json(
        folder / "special_tokens_map.json",
        {
            "additional_special_tokens": sentinels,
            "eos_token": T5_EOS,
            "pad_token": T5_PAD,
            "unk_token": T5_UNK,
        },
    )
    _write_json(
        folder / "tokenizer_config.json",
        {
            "additional_special_tokens": sentinels,
            "clean_up_tokenization_spaces": True,
            "eos_token": T5_EOS,
            "extra_ids": extra_ids,
            "legacy": True,
            "model_max_length": 512,
            "pad_token": T5_PAD,
            "tokenizer_class": "T5Tokenizer",
            "unk_token": T5_UNK,
        },
    )
    return backend.get_vocab_size(with_added_tokens=True)
