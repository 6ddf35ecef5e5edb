"""Map free-text VLM answers ("Two cats.", "it's a golden retriever") to class indices.

Answers of chat VLMs and labelling services are text, not class indices. The mapping is
deliberately simple and predictable, so that its mistakes can be read off the report:

1. Normalise: Unicode NFKC, case-fold, every non-alphanumeric character becomes a space,
   the articles ``a``, ``an``, ``the`` are dropped.
2. Tokens match when their plural/singular keys intersect (``cats``/``cat``,
   ``buses``/``bus``, ``puppies``/``puppy``, ``houses``/``house``): both sides are expanded to
   a small key set, so the rules need no dictionary and work in both directions.
3. An answer that is exactly a class name or one of its synonyms maps to that class.
   Otherwise every class name or synonym that occurs in the answer as a whole-word phrase is
   found; phrases inside a longer found phrase are dropped ("sea lion" beats "lion"). One
   class left: that class; none: ``no_match``; several: ``ambiguous``.

Anything that cannot be mapped is returned as ``None`` with the reason; only a non-text
answer or a bad synonym table raises (a :class:`CoregError`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coreg.errors import CoregError

ARTICLES = frozenset({"a", "an", "the"})
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
MATCH_REASONS = ("exact", "phrase", "empty", "no_match", "ambiguous")


def normalise(text: str) -> list[str]:
    """Lower-case word tokens of ``text`` without punctuation or articles."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return [t for t in _NON_WORD.sub(" ", folded).split() if t not in ARTICLES]


def _singular(token: str) -> str:
    if len(token) <= 3:
        return token
    if token.endswith("ies") and len(token) > 4:
        return token[:-3] + "y"
    if token.endswith("es") and token[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return token[:-2]
    if token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


def token_keys(token: str) -> frozenset[str]:
    """Keys a token is known by: itself, its singular guess and the singular guess of its plural."""
    if len(token) <= 2:
        return frozenset({token})
    return frozenset({token, _singular(token), _singular(token + "s"), _singular(token + "es")})


@dataclass(frozen=True)
class Match:
    """The class index (``None`` when unmapped) and why: one of :data:`MATCH_REASONS`."""

    label: int | None
    reason: str


class AnswerMapper:
    """Maps answers to class indices by class names plus optional synonyms (see module doc)."""

    def __init__(
        self, class_names: Sequence[str], synonyms: Mapping[str, Sequence[str]] | None = None, field: str = "synonyms"
    ) -> None:
        index = {name: i for i, name in enumerate(class_names)}
        forms: list[tuple[int, tuple[frozenset[str], ...]]] = []
        for i, name in enumerate(class_names):
            forms.append((i, tuple(token_keys(t) for t in normalise(str(name)))))
        for name, words in (synonyms or {}).items():
            if name not in index:
                raise CoregError(f"{field}: {name!r} is not a class name")
            if isinstance(words, str) or not isinstance(words, Sequence):
                raise CoregError(f"{field}.{name}: expected a list of strings")
            for word in words:
                if not isinstance(word, str):
                    raise CoregError(f"{field}.{name}: synonym {word!r} is not a string")
                forms.append((index[name], tuple(token_keys(t) for t in normalise(word))))
        self.num_classes = len(class_names)
        # first-token key -> forms starting with it, so a lookup touches only plausible forms.
        self._by_first: dict[str, list[tuple[int, tuple[frozenset[str], ...]]]] = {}
        for label, form in forms:
            if not form:
                continue  # a name made only of punctuation or articles cannot be matched by text
            for key in form[0]:
                self._by_first.setdefault(key, []).append((label, form))

    def match(self, answer: object) -> Match:
        """The class an answer names, or ``None`` with the reason. Non-text answers raise CoregError."""
        if not isinstance(answer, str):
            raise CoregError(f"answer must be text, got {type(answer).__name__}")
        tokens = normalise(answer)
        if not tokens:
            return Match(None, "empty")
        keys = [token_keys(t) for t in tokens]
        spans: list[tuple[int, int, int]] = []  # (start, end, label)
        for start, first in enumerate(keys):
            seen: set[int] = set()
            for key in first:
                for label, form in self._by_first.get(key, ()):
                    if id(form) in seen:
                        continue
                    seen.add(id(form))
                    end = start + len(form)
                    if end <= len(keys) and all(f & k for f, k in zip(form, keys[start:end], strict=True)):
                        spans.append((start, end, label))
        exact = {label for s, e, label in spans if s == 0 and e == len(keys)}
        if len(exact) == 1:
            return Match(exact.pop(), "exact")
        if len(exact) > 1:
            return Match(None, "ambiguous")
        kept = {
            label
            for s, e, label in spans
            if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)
        }
        if not kept:
            return Match(None, "no_match")
        if len(kept) > 1:
            return Match(None, "ambiguous")
        return Match(kept.pop(), "phrase")

    def map(self, answer: object) -> int | None:
        """Class index of ``answer`` or ``None``."""
        return self.match(answer).label
