"""Keyword phrases of a caption, as LinCIR's self-masking projection needs them.

LinCIR masks the *keyword phrases* of a caption: maximal runs of tokens whose coarse part of speech is a noun,
a proper noun, an adjective or a determiner (``"a man riding a brown horse"`` -> ``"a man"``,
``"a brown horse"``). The authors tag with spaCy's ``en_core_web_sm``. spaCy is an optional dependency and no
model can be downloaded on an offline machine, so two taggers produce the same ``(text, pos, start, end)``
tokens and one function turns them into runs:

- :class:`SpacyKeywordExtractor`: spaCy's coarse ``pos_`` tags (used when spaCy and an English pipeline are
  installed: ``pip install spacy && python -m spacy download en_core_web_sm``).
- :class:`RuleBasedKeywordExtractor`, the built-in fallback. Its rule, in order, for each word:

  1. punctuation -> ``PUNCT``; a number (digits or a number word up to "twenty") -> ``NUM``;
  2. a determiner from :data:`DETERMINERS` (``a, an, the, this, these, ...``) -> ``DET``;
  3. a closed-class word -> ``X``: prepositions, pronouns (including possessives and ``that``/``which``),
     auxiliaries and modals, conjunctions, a few adverbs/particles (``not, very, ...``), and a short list of
     verbs that are frequent in captions (``sits, holds, wears, make, change, ...``);
  4. a word of 5+ letters ending in ``-ing`` or ``-ed`` is taken for a verb form -> ``VERB``;
  5. every remaining word is an open-class noun/adjective -> ``NOUN``.

  So runs of remaining words (with their determiners) are the noun/adjective phrases. Known limits:
  adjectives ending in ``-ed``/``-ing`` (``striped``, ``amazing``) break a phrase, verbs outside the list join
  one. Both only change which words get masked, not the training objective.

:func:`load_keyword_extractor` picks spaCy when it can and says which one it picked.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# LinCIR's keyword parts of speech (spaCy's universal coarse tags).
KEYWORD_POS = ("NOUN", "PROPN", "ADJ", "DET")

DETERMINERS = frozenset(
    "a an the this these those some any each every no another either neither both all several "
    "many few much more most other such".split()
)
_PREPOSITIONS = (
    "about above across after against along alongside amid among amongst around as at atop before behind below "
    "beneath beside besides between beyond by despite down during except for from in inside into like near "
    "next of off on onto opposite out outside over past per since than through throughout till to toward "
    "towards under underneath unlike until up upon via with within without"
)
_PRONOUNS = (
    "i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its "
    "itself we us our ours ourselves they them their theirs themselves who whom whose which what that there "
    "here something someone somebody anything anyone anybody everything everyone everybody nothing nobody "
    "none one's"
)
_AUXILIARIES = (
    "be am is are was were been being have has had having do does did done will would shall should can "
    "could may might must 's 're 've 'd 'll isn't aren't wasn't weren't doesn't don't didn't can't won't"
)
_CONJUNCTIONS = "and or but nor so yet if because while although though when where whether then whereas"
_ADVERBS_AND_PARTICLES = "not n't very too also just only again still even now how why almost quite rather"
# Frequent verbs of captions and modification texts that no suffix rule catches.
_COMMON_VERBS = (
    "sit sits sat stand stands stood lie lies lay look looks hold holds held wear wears wore make makes made "
    "take takes took get gets got go goes went walk walks run runs ride rides rode play plays eat eats ate fly "
    "flies swim swims show shows shown change changes add adds remove removes replace replaces turn turns put "
    "puts keep keeps let lets become becomes see sees seen contain contains"
)
CLOSED_CLASS_WORDS = frozenset(
    " ".join([_PREPOSITIONS, _PRONOUNS, _AUXILIARIES, _CONJUNCTIONS, _ADVERBS_AND_PARTICLES, _COMMON_VERBS]).split()
)
NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split()
)

# Words (with inner apostrophes or hyphens), numbers, or single punctuation characters.
_WORD_PATTERN = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*|\d+(?:[.,]\d+)*|\S")


@dataclass(frozen=True)
class TaggedToken:
    """A token of a caption: its text, coarse part of speech and character span ``[start, end)``."""

    text: str
    pos: str
    start: int
    end: int


def keyword_spans(tokens: Sequence[TaggedToken], keyword_pos: Iterable[str] = KEYWORD_POS) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the maximal runs of tokens whose ``pos`` is in ``keyword_pos``.

    A run made only of determiners (``"all"`` before a verb) names nothing and is not a keyword.
    """
    keyword_pos = frozenset(keyword_pos)
    spans, run = [], []
    for token in list(tokens) + [None]:
        if token is not None and token.pos in keyword_pos:
            run.append(token)
            continue
        if run and any(member.pos != "DET" for member in run):
            spans.append((run[0].start, run[-1].end))
        run = []
    return spans


class RuleBasedKeywordExtractor:
    """The built-in keyword extractor (no model needed); see the module docstring for its rule.

    Example:
        >>> from diffusers_cir.text.keywords import RuleBasedKeywordExtractor
        >>> RuleBasedKeywordExtractor()("a man riding a brown horse on the beach")
        ['a man', 'a brown horse', 'the beach']
    """

    name = "builtin"

    def tag(self, caption: str) -> list[TaggedToken]:
        tokens = []
        for match in _WORD_PATTERN.finditer(caption):
            word = match.group(0)
            lower = word.lower().replace("’", "'")
            if not any(character.isalnum() for character in word):
                pos = "PUNCT"
            elif lower[0].isdigit() or lower in NUMBER_WORDS:
                pos = "NUM"
            elif lower in DETERMINERS:
                pos = "DET"
            elif lower in CLOSED_CLASS_WORDS:
                pos = "X"
            elif len(lower) >= 5 and lower.endswith(("ing", "ed")):
                pos = "VERB"
            else:
                pos = "NOUN"
            tokens.append(TaggedToken(word, pos, match.start(), match.end()))
        return tokens

    def spans(self, caption: str) -> list[tuple[int, int]]:
        return keyword_spans(self.tag(caption))

    def __call__(self, caption: str) -> list[str]:
        return [caption[start:end] for start, end in self.spans(caption)]


class SpacyKeywordExtractor:
    """Keyword phrases from a spaCy pipeline's coarse part-of-speech tags (LinCIR's own extractor).

    Args:
        nlp: a loaded spaCy ``Language`` (anything that maps a string to tokens with ``text``, ``pos_``,
            ``idx``), or the name of an installed spaCy pipeline such as ``"en_core_web_sm"``.
    """

    name = "spacy"

    def __init__(self, nlp="en_core_web_sm"):
        if isinstance(nlp, str):
            import spacy

            # Only the tagger matters; the parser and NER would slow the data loader down for nothing.
            nlp = spacy.load(nlp, disable=["parser", "ner", "lemmatizer"])
        self.nlp = nlp

    def tag(self, caption: str) -> list[TaggedToken]:
        return [TaggedToken(token.text, token.pos_, token.idx, token.idx + len(token.text)) for token in self.nlp(caption)]

    def spans(self, caption: str) -> list[tuple[int, int]]:
        return keyword_spans(self.tag(caption))

    def __call__(self, caption: str) -> list[str]:
        return [caption[start:end] for start, end in self.spans(caption)]


def load_keyword_extractor(kind: str = "auto", spacy_model: str = "en_core_web_sm"):
    """The keyword extractor to use.

    Args:
        kind: ``"spacy"`` (fail if spaCy or the model is missing), ``"builtin"``, or ``"auto"`` (spaCy when
            ``spacy_model`` is installed, otherwise the built-in rule; the choice is logged).
        spacy_model: the spaCy pipeline to load.
    """
    if kind not in ("auto", "spacy", "builtin"):
        raise ValueError(f"`kind` must be 'auto', 'spacy' or 'builtin', got {kind!r}.")
    if kind == "builtin":
        return RuleBasedKeywordExtractor()
    try:
        extractor = SpacyKeywordExtractor(spacy_model)
    except (ImportError, OSError) as error:
        if kind == "spacy":
            raise RuntimeError(
                f"spaCy keyword extraction needs `spacy` and the `{spacy_model}` pipeline "
                f"(`pip install spacy && python -m spacy download {spacy_model}`): {error}"
            ) from error
        logger.warning(
            "spaCy pipeline %r is not available (%s); using the built-in rule-based keyword extractor.",
            spacy_model,
            error,
        )
        return RuleBasedKeywordExtractor()
    logger.info("Keyword extraction with spaCy pipeline %r.", spacy_model)
    return extractor
