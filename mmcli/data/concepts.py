"""Key concepts of a caption, found offline: objects, attributes and relations.

The graph reasoner (``mmcli.models.graph.layers``) needs the things a caption talks about as nodes.
``extract_concepts`` finds them with a small lexicon and a few word-shape rules, so that it
runs anywhere without downloading a parser or tagger model:

* words are lower-cased runs of letters (an ``'s`` stays attached) or of digits; punctuation
  other than hyphens and apostrophes ends a phrase;
* relation phrases are matched first, longest first ("to the left of" before "left of");
* function words (articles, pronouns, auxiliaries, conjunctions, other prepositions) are dropped;
* a run of adjectives (colours, sizes, materials, numbers, common ones) followed by nouns is one
  object concept ("small red circle", head "circle"); each adjective is also kept as an
  attribute concept; an adjective with no noun after it ("the sky is blue") is an attribute;
* a word that is not in the lexicon is a noun, except: ``-ly`` words are adverbs (dropped),
  ``-ing``/``-ed`` words not right after an article or adjective are verbs, and verbs are
  relation concepts ("a dog sitting next to a chair" relates dog and chair through both).
  A word right after a known adjective or an article is a noun whatever its suffix
  ("a tall building", "the ceiling").

Where it falls short: no lemmatisation ("cats" stays "cats"); an unknown adjective reads as part
of a compound noun ("a fluorescent lamp" is one object without an attribute); words that are
both a colour and a noun read as colours ("an orange" is an attribute); third-person verbs
outside the small verb list read as nouns; comparatives, negation ("no red circle") and
coordination ("red and blue circles": "red" is a lone attribute) are not analysed. It is meant
for short, descriptive captions like those of the built-in shapes dataset and COCO-style data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

ConceptKind = Literal["object", "attribute", "relation"]

_STOPWORDS = frozenset(
    """a an the this that these those some any each every all both either neither no not
    and or but nor so yet than then too also just very quite rather really only even
    is are was were be been being am do does did has have had having will would can could
    shall should may might must it its it's they them their theirs he him his she her hers
    we us our ours you your yours i me my mine there there's here which who whom whose what
    where when why how while as of to for at by from into onto about against through during
    up down out off again once such own same other another""".split()
)
_DETERMINERS = frozenset("a an the this that these those some any each every his her its their my your our".split())

_COLOURS = """red green blue yellow orange purple pink brown black white gray grey cyan magenta
    violet silver gold golden beige teal"""
_SIZES = "big small large little tiny huge giant tall short long wide narrow thick thin"
_MATERIALS = "wooden metal metallic plastic rubber leather woolen cotton"
_NUMBERS = "one two three four five six seven eight nine ten several many few"
_COMMON = """old new young dark light bright pale shiny matte striped spotted empty full open
    closed wet dry hot cold clean dirty beautiful pretty happy sad fluffy furry soft hard heavy
    round flat curly ugly friendly lovely lonely busy crowded sunny snowy left right"""
_ADJECTIVES = frozenset(f"{_COLOURS} {_SIZES} {_MATERIALS} {_NUMBERS} {_COMMON}".split())

# Common nouns that the -ly adverb rule would otherwise drop.
_LY_NOUNS = frozenset("family fly butterfly dragonfly lily jelly belly dolly rally".split())
_VERBS = frozenset(
    """sits stands holds rides eats wears carries lies plays looks walks runs touches contains
    covers faces follows hangs sit stand hold ride eat wear carry lie play look walk run""".split()
)

_SPATIAL_WORDS = "above below under underneath beneath behind near beside over inside between on in"
# Relation phrases and their head word; matched longest first.
_RELATIONS: dict[tuple[str, ...], str] = {
    ("to", "the", "left", "of"): "left",
    ("to", "the", "right", "of"): "right",
    ("on", "the", "left", "of"): "left",
    ("on", "the", "right", "of"): "right",
    ("in", "front", "of"): "front",
    ("on", "top", "of"): "top",
    ("left", "of"): "left",
    ("right", "of"): "right",
    ("next", "to"): "next",
    ("close", "to"): "close",
    **{(word,): word for word in _SPATIAL_WORDS.split()},
}
_MAX_RELATION_WORDS = max(len(phrase) for phrase in _RELATIONS)

# Captions often open with "a photo of ..."; the filler noun never names a region.
_FILLERS = frozenset("photo picture image photograph".split())

# Letters (an apostrophe suffix stays attached, as the BPE tokenizer keeps "'s" together),
# digit runs, and separately any punctuation that ends a phrase.
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+")
_BREAK = re.compile(r"[^\w\s'\-]")


@dataclass(frozen=True)
class Concept:
    """One key concept of a caption.

    ``span`` is ``(start_word, end_word)``, end exclusive, in the word list of the caption
    (every word, function words included); ``head`` is the word the concept is about: the last
    noun of an object, the adjective itself for an attribute, the content word of a relation.
    """

    text: str
    kind: ConceptKind
    span: tuple[int, int]
    head: str

    @property
    def grounded(self) -> bool:
        """Whether one image region can show it: an object or an attribute, not a relation (which
        holds between regions)."""
        return self.kind != "relation"


@dataclass(frozen=True)
class _Word:
    text: str
    start: int  # character offsets in the original text
    end: int
    break_before: bool  # punctuation between this word and the previous one


def extract_concepts(text: str) -> list[Concept]:
    """The object, attribute and relation concepts of ``text``, ordered by position.

    An object comes before its own attributes: ``"a red circle left of a blue square"`` gives
    ``red circle`` (object), ``red`` (attribute), ``left of`` (relation), ``blue square``,
    ``blue``. See the module docstring for the rules and their limits.
    """
    words = _words(text)
    concepts: list[Concept] = []
    i = 0
    while i < len(words):
        relation = _match_relation(words, i)
        if relation is not None:
            length, head = relation
            concepts.append(_concept(words, i, i + length, "relation", head))
            i += length
        elif (role := _role(words, i)) in ("adjective", "noun"):
            group, i = _noun_group(words, i)
            concepts.extend(group)
        elif role == "verb":
            concepts.append(_concept(words, i, i + 1, "relation", words[i].text))
            i += 1
        else:
            i += 1
    return concepts


def concept_token_spans(
    text: str, tokenizer: Any = None, concepts: list[Concept] | None = None
) -> list[tuple[int, int]]:
    """Token positions ``(start, end)`` (end exclusive) of each concept of ``text`` in the
    output of open_clip's BPE ``tokenizer`` (``[sot] + BPE tokens + [eot] + padding``).

    ``tokenizer`` needs ``encode`` (open_clip's ``SimpleTokenizer``, which
    ``open_clip.get_tokenizer("ViT-B-32")`` returns); ``None`` builds one. ``concepts`` defaults
    to ``extract_concepts(text)``. Pool the text encoder's token states over a span to get a
    concept feature. Spans past the tokenizer's context window are clipped to it, so a concept
    that was truncated away entirely gets an empty span (``start == end``).
    """
    tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
    concepts = extract_concepts(text) if concepts is None else concepts
    word_tokens = _word_token_ranges(text, tokenizer)
    # The last position of a full window holds [eot], so content ends one before it.
    limit = (getattr(tokenizer, "context_length", None) or 77) - 1
    spans = []
    for concept in concepts:
        start, end = word_tokens[concept.span[0]][0], word_tokens[concept.span[1] - 1][1]
        spans.append((min(start, limit), min(end, limit)))
    return spans


def _words(text: str) -> list[_Word]:
    """The words of ``text`` with their character offsets and phrase breaks."""
    words, previous_end = [], 0
    for match in _WORD.finditer(text):
        gap = text[previous_end : match.start()]
        words.append(_Word(match.group().lower(), match.start(), match.end(), bool(_BREAK.search(gap))))
        previous_end = match.end()
    return words


def _match_relation(words: list[_Word], i: int) -> tuple[int, str] | None:
    """``(length, head)`` of the longest relation phrase starting at word ``i``, if any."""
    for length in range(min(_MAX_RELATION_WORDS, len(words) - i), 0, -1):
        if any(word.break_before for word in words[i + 1 : i + length]):
            continue
        head = _RELATIONS.get(tuple(word.text for word in words[i : i + length]))
        if head is not None:
            return length, head
    return None


def _role(words: list[_Word], i: int) -> str:
    """The part of speech the heuristic gives word ``i``: stop, adjective, noun, verb, adverb."""
    word = words[i].text
    previous = words[i - 1].text if i > 0 and not words[i].break_before else ""
    if word in _FILLERS and i + 1 < len(words) and words[i + 1].text == "of":
        return "stop"
    if word in _STOPWORDS:
        return "stop"
    if _is_adjective(word):
        return "adjective"
    if _is_adjective(previous) or previous in _DETERMINERS:
        return "noun"  # "a tall building", "the ceiling": the slot says noun whatever the suffix
    if word in _VERBS or _looks_like_verb(word):
        return "verb"
    if word.endswith("ly") and len(word) > 3 and word not in _LY_NOUNS:
        return "adverb"
    return "noun"


def _is_adjective(word: str) -> bool:
    """A lexicon adjective or a numeral (counts modify nouns like adjectives do)."""
    return word in _ADJECTIVES or word.isdigit()


def _looks_like_verb(word: str) -> bool:
    """A participle: ``-ing``/``-ed`` on a stem with a vowel ("sitting", "parked", not "king")."""
    for suffix in ("ing", "ed"):
        stem = word[: -len(suffix)]
        if word.endswith(suffix) and len(word) >= 5 and re.search(r"[aeiouy]", stem):
            return True
    return False


def _noun_group(words: list[_Word], i: int) -> tuple[list[Concept], int]:
    """The concepts of the adjective-noun group starting at word ``i``, and the index after it.

    Adjectives followed by nouns give one object concept plus one attribute concept per
    adjective; adjectives with no noun after them give attribute concepts only.
    """
    start = i
    while i < len(words) and _continues(words, i, start) and _role(words, i) == "adjective":
        i += 1
    adjectives_end = i
    while i < len(words) and _continues(words, i, start) and _role(words, i) == "noun":
        i += 1
    attributes = [_concept(words, j, j + 1, "attribute", words[j].text) for j in range(start, adjectives_end)]
    if i == adjectives_end:
        return attributes, i
    return [_concept(words, start, i, "object", words[i - 1].text), *attributes], i


def _continues(words: list[_Word], i: int, start: int) -> bool:
    """Whether word ``i`` can extend a group that began at ``start``."""
    return i == start or (not words[i].break_before and _match_relation(words, i) is None)


def _concept(words: list[_Word], start: int, end: int, kind: ConceptKind, head: str) -> Concept:
    """A concept over words ``start:end``."""
    return Concept(" ".join(word.text for word in words[start:end]), kind, (start, end), head)


def _word_token_ranges(text: str, tokenizer: Any) -> list[tuple[int, int]]:
    """Token positions (after [sot]) of every word of ``text``.

    Each word and each gap between words is encoded on its own and the lengths accumulated; the
    BPE pre-tokenizer never joins a letter run with what surrounds it, so the pieces add up to
    the encoding of the whole text, which is checked.
    """
    ranges, position, previous_end, pieces = [], 1, 0, []
    for word in _words(text):
        gap = tokenizer.encode(text[previous_end : word.start])
        tokens = tokenizer.encode(text[word.start : word.end])
        position += len(gap)
        ranges.append((position, position + len(tokens)))
        position += len(tokens)
        pieces += gap + tokens
        previous_end = word.end
    pieces += tokenizer.encode(text[previous_end:])
    if pieces != tokenizer.encode(text):
        raise ValueError(f"the tokenizer splits {text!r} across word boundaries, so concept spans would be wrong")
    return ranges


@lru_cache(maxsize=1)
def _default_tokenizer() -> Any:
    """open_clip's BPE tokenizer (imported lazily: it loads a vocabulary file)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()
