"""A real CLIP tokenizer built offline.

OpenAI's CLIP BPE vocabulary ships inside ``open_clip_torch`` (``bpe_simple_vocab_16e6.txt.gz``). From it
we rebuild the ``vocab`` and ``merges`` that transformers' ``CLIPTokenizer`` expects, so tests and demos
tokenise exactly like ``openai/clip-vit-large-patch14`` without touching the Hub.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from functools import lru_cache

# CLIP's vocabulary: 256 byte tokens, their 256 end-of-word forms, 48,894 merges, 2 special tokens.
_NUM_MERGES = 49152 - 256 - 2


def clip_bpe_vocabulary_path() -> str:
    """Path of the BPE file bundled with ``open_clip_torch``; a clear error if that is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The offline CLIP tokenizer needs the BPE vocabulary bundled with `open_clip_torch`: "
            "`pip install 'diffusers-cir[open_clip]'`."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"open_clip_torch is installed but {path} is missing.")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable character table.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    with gzip.open(clip_bpe_vocabulary_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # the first line is a version header
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_offline_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """Return a ``transformers.CLIPTokenizer`` equal to OpenAI CLIP's, built without network access.

    ``pad_token`` defaults to the end-of-text token as in ``openai/clip-vit-large-patch14``; the
    LAION/open_clip bigG checkpoints pad with ``"!"`` (id 0), pass ``pad_token="!"`` for those.

    Example:
        >>> from diffusers_cir.utils import build_offline_clip_tokenizer
        >>> tokenizer = build_offline_clip_tokenizer()
        >>> tokenizer("a photo of a cat")["input_ids"]
        [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(merge.split()) for merge in merges],
        model_max_length=model_max_length,
        pad_token=pad_token,
    )


def _bpe_merges_of(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's byte-pair encoding applies to one lower-cased word, in order."""
    byte_encoder = _bytes_to_unicode()
    symbols = [byte_encoder[byte] for byte in word.encode("utf-8")]
    symbols[-1] += "</w>"
    applied = []
    while len(symbols) > 1:
        pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        applied.append(best)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return applied


def build_clip_tokenizer_for_words(words, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A ``transformers.CLIPTokenizer`` with CLIP's byte-pair encoding restricted to ``words``.

    It keeps CLIP's 512 byte tokens and only the merges that CLIP's own encoding applies to ``words`` (in CLIP's
    order), so each of those words becomes the same tokens as with CLIP (ids differ: the vocabulary is renumbered)
    and any other text still tokenises, into smaller pieces. A text tower over it needs a few hundred embedding rows
    instead of 49,408: what makes the package's small demo encoders small.

    Example:
        >>> from diffusers_cir.utils.tokenizer import build_clip_tokenizer_for_words
        >>> tokenizer = build_clip_tokenizer_for_words(["a", "photo", "of", "cat"])
        >>> tokenizer.convert_ids_to_tokens(tokenizer("a photo of a cat")["input_ids"])
        ['<|startoftext|>', 'a</w>', 'photo</w>', 'of</w>', 'a</w>', 'cat</w>', '<|endoftext|>']
    """
    from transformers import CLIPTokenizer

    _, merges = _vocab_and_merges()
    ranks = {tuple(merge.split()): rank for rank, merge in enumerate(merges)}
    used = set()
    for word in words:
        if word:
            used.update(_bpe_merges_of(word.lower(), ranks))
    kept = sorted(used, key=ranks.__getitem__)
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens] + ["".join(pair) for pair in kept]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=kept,
        model_max_length=model_max_length,
        pad_token=pad_token,
    )
