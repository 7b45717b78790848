# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Stage 1: keyword caption triplets, as SynthTriplets18M made 30M of them.

1. Object terms of the captions come from a part-of-speech tagger (the paper: spaCy). The tagger is pluggable: the
   keyword extractors of :mod:`diffusers_cir.text.keywords` (spaCy's pipeline when installed, a dependency-free rule
   otherwise) tag tokens, and an object term is the last noun of each run of nouns (the head of "fire truck" is
   "truck"). Terms seen fewer than ``min_term_count`` times are dropped (the paper's frequency filter).
2. Every term's replacements are the terms whose CLIP text features have a cosine similarity inside the band
   (paper: 0.5-0.7 with CLIP ViT-L/14), the ``max_candidates`` most similar first.
3. For a caption, one of its object terms with replacements is drawn, then a replacement, then one of the 47 templates
   (:mod:`.templates`); the target caption is the caption with the term replaced (and "a"/"an" before it fixed).

Everything random is drawn from a ``numpy.random.Generator`` the caller seeds per item.

Example:
    >>> import numpy as np
    >>> from diffusers_cir.generation.keyword_triplets import KeywordVocabulary, make_keyword_triplet
    >>> from diffusers_cir.text.keywords import RuleBasedKeywordExtractor
    >>> vocabulary = KeywordVocabulary(terms=["cup", "apple"], counts=[3, 2],
    ...                                candidates={"cup": [("apple", 0.6)], "apple": [("cup", 0.6)]})
    >>> triplet = make_keyword_triplet("a cup on a table", RuleBasedKeywordExtractor(), vocabulary,
    ...                                np.random.default_rng(0))
    >>> triplet.target_caption, triplet.source_keyword, triplet.target_keyword
    ('an apple on a table', 'cup', 'apple')
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .records import CaptionTriplet
from .templates import KEYWORD_TEMPLATES, draw_instruction

OBJECT_POS = ("NOUN", "PROPN")
_VOWELS = "aeiou"


def load_tagger(kind: str = "auto", spacy_model: str = "en_core_web_sm"):
    """The part-of-speech tagger: one of :mod:`diffusers_cir.text.keywords`' extractors (anything with
    ``tag(caption) -> [TaggedToken]`` will do)."""
    from ..text.keywords import load_keyword_extractor

    return load_keyword_extractor(kind, spacy_model)


def object_terms(tokens: Sequence) -> list[tuple[str, int, int]]:
    """``(term, start, end)`` of each object term: the last token of every run of noun / proper-noun tokens
    (``TaggedToken`` s with ``text``, ``pos``, ``start``, ``end``). Terms are lower-cased; spans index the caption."""
    terms, run = [], []
    for token in list(tokens) + [None]:
        if token is not None and token.pos in OBJECT_POS and any(c.isalpha() for c in token.text):
            run.append(token)
            continue
        if run:
            head = run[-1]
            terms.append((head.text.lower(), head.start, head.end))
        run = []
    return terms


def count_object_terms(captions: Iterable[str], tagger, progress: bool = False) -> Counter:
    """How often each object term occurs in ``captions``."""
    from tqdm.auto import tqdm

    counts: Counter = Counter()
    for caption in tqdm(captions, desc="tagging captions", unit="caption", disable=not progress):
        counts.update(term for term, _, _ in object_terms(tagger.tag(caption)))
    return counts


@dataclass
class KeywordVocabulary:
    """Object terms, their counts, and each term's replacements ``[(term, CLIP similarity)]`` (most similar first)."""

    terms: list[str]
    counts: list[int]
    candidates: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    def replacements(self, term: str) -> list[tuple[str, float]]:
        return self.candidates.get(term, [])

    def save(self, path: str) -> None:
        """Write a Parquet file (term, count, candidates, similarities): 586k terms x 64 candidates stay compact."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "term": self.terms,
            "count": pa.array(self.counts, type=pa.int64()),
            "candidates": [[c for c, _ in self.replacements(t)] for t in self.terms],
            "similarities": pa.array([[s for _, s in self.replacements(t)] for t in self.terms],
                                     type=pa.list_(pa.float32())),
        })
        temporary = f"{path}.partial"
        pq.write_table(table, temporary)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str) -> "KeywordVocabulary":
        import pyarrow.parquet as pq

        columns = pq.read_table(path).to_pydict()
        candidates = {
            term: [(c, float(s)) for c, s in zip(names, sims)]
            for term, names, sims in zip(columns["term"], columns["candidates"], columns["similarities"])
            if names
        }
        return cls(terms=list(columns["term"]), counts=list(columns["count"]), candidates=candidates)


def encode_terms(clip_model, processor, terms: Sequence[str], batch_size: int = 256, device=None, progress=False):
    """L2-normalised CLIP text features ``[N, D]`` (float32) of ``terms``."""
    from .filters import encode_texts

    return encode_texts(clip_model, processor, list(terms), batch_size=batch_size, device=device, progress=progress,
                        description="encoding terms")


def band_candidates(
    terms: Sequence[str],
    embeddings,
    band: tuple[float, float] = (0.5, 0.7),
    max_candidates: int = 64,
    chunk_size: int = 1024,
) -> dict[str, list[tuple[str, float]]]:
    """Each term's replacements: the other terms whose cosine similarity lies in ``band`` (inclusive), at most
    ``max_candidates`` of them, most similar first (ties: vocabulary order). Similarities are computed ``chunk_size``
    rows at a time on the embeddings' device, so 586k terms never need a full similarity matrix."""
    import torch

    low, high = band
    count = len(terms)
    k = min(max_candidates, max(count - 1, 1))
    result: dict[str, list[tuple[str, float]]] = {}
    for start in range(0, count, chunk_size):
        rows = embeddings[start : start + chunk_size]
        similarity = rows @ embeddings.T
        inside = (similarity >= low) & (similarity <= high)
        own = torch.arange(start, start + rows.shape[0], device=similarity.device)
        inside[torch.arange(rows.shape[0], device=similarity.device), own] = False
        scores = torch.where(inside, similarity, torch.full_like(similarity, float("-inf")))
        values, indices = torch.topk(scores, k=min(k, count), dim=1, sorted=True)
        for row, (row_values, row_indices) in enumerate(zip(values.tolist(), indices.tolist())):
            chosen = [(terms[i], float(v)) for v, i in zip(row_values, row_indices) if v != float("-inf")]
            if chosen:
                result[terms[start + row]] = chosen
    return result


def build_keyword_vocabulary(
    captions: Iterable[str],
    tagger,
    clip_model,
    processor,
    band: tuple[float, float] = (0.5, 0.7),
    min_term_count: int = 1,
    max_candidates: int = 64,
    batch_size: int = 256,
    device=None,
    progress: bool = False,
) -> KeywordVocabulary:
    """Tag ``captions``, keep the terms seen at least ``min_term_count`` times (sorted, so the vocabulary does not
    depend on caption order), and find every term's replacements in the CLIP band."""
    counts = count_object_terms(captions, tagger, progress=progress)
    terms = sorted(term for term, count in counts.items() if count >= min_term_count)
    if not terms:
        return KeywordVocabulary(terms=[], counts=[], candidates={})
    embeddings = encode_terms(clip_model, processor, terms, batch_size=batch_size, device=device, progress=progress)
    candidates = band_candidates(terms, embeddings, band, max_candidates)
    return KeywordVocabulary(terms=terms, counts=[counts[t] for t in terms], candidates=candidates)


def replace_span(caption: str, start: int, end: int, replacement: str) -> str:
    """``caption`` with ``[start, end)`` replaced, and an "a"/"an" right before it made to fit the replacement."""
    before = caption[:start]
    stripped = before.rstrip()
    words = stripped.rsplit(None, 1)
    if words and words[-1].lower() in ("a", "an"):
        article = "an" if replacement[:1].lower() in _VOWELS else "a"
        if words[-1][0].isupper():
            article = article.capitalize()
        before = stripped[: len(stripped) - len(words[-1])] + article + before[len(stripped):]
    return before + replacement + caption[end:]


def make_keyword_triplet(
    caption: str,
    tagger,
    vocabulary: KeywordVocabulary,
    rng: np.random.Generator,
    templates: Sequence[str] = KEYWORD_TEMPLATES,
) -> CaptionTriplet | None:
    """A keyword triplet of ``caption``, or None when none of its object terms has a replacement."""
    terms = [(t, s, e) for t, s, e in object_terms(tagger.tag(caption)) if vocabulary.replacements(t)]
    if not terms:
        return None
    term, start, end = terms[int(rng.integers(len(terms)))]
    replacements = vocabulary.replacements(term)
    replacement = replacements[int(rng.integers(len(replacements)))][0]
    instruction, template_index = draw_instruction(term, replacement, rng, templates)
    return CaptionTriplet(
        reference_caption=caption,
        modification_text=instruction,
        target_caption=replace_span(caption, start, end, replacement),
        method="keyword",
        source_keyword=term,
        target_keyword=replacement,
        template_index=template_index,
    )
