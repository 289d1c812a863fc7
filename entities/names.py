"""Weak names from captions: speaker tags, a cast list (gazetteer) with tolerant matching, optional NER.

Every name token ends up as a class of the vocabulary ``cast + ["Unknown"]``: a token that matches a cast member
(exactly, case-insensitively, through an alias, without accents or a possessive "'s", or within a small edit
distance) maps to that member; every other person name maps to "Unknown", as in the paper.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

UNKNOWN = "Unknown"
_WORD = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ][\w'’-]*")


def _fold(token: str) -> str:
    """Lower case, no accents, no possessive, no surrounding punctuation."""
    token = unicodedata.normalize("NFKD", token).encode("ascii", "ignore").decode()
    token = token.strip(" .,;:!?\"'()[]{}-").lower()
    return re.sub(r"['’]s$", "", token)


class Gazetteer:
    """Map name tokens to cast members.

    Args:
        cast: canonical names of the main people (the classes besides "Unknown").
        aliases: extra spellings per cast member, e.g. ``{"Rachel": ["Rach"]}``.
        min_similarity: ``difflib`` ratio from which a misspelt token (e.g. "Pheobe") still matches; 1.0
            turns fuzzy matching off. Tokens shorter than 4 letters only match exactly.
        exact: the official rule (case-sensitive equality with a cast name, nothing else); used to score the
            published SC-Friends names exactly as the paper did.
    """

    def __init__(
        self,
        cast: Sequence[str],
        aliases: dict[str, list[str]] | None = None,
        min_similarity: float = 0.8,
        exact: bool = False,
    ) -> None:
        cast = [str(name).strip() for name in cast]
        if not cast or any(not name for name in cast):
            raise ValueError("the cast list must hold at least one non-empty name")
        if len(set(cast)) != len(cast):
            raise ValueError(
                f"the cast list has duplicates: {sorted(n for n, c in Counter(cast).items() if c > 1)}"
            )
        if UNKNOWN in cast:
            raise ValueError(
                f"{UNKNOWN!r} is added to the vocabulary automatically; leave it out of the cast"
            )
        self.cast = cast
        self.classes = [*cast, UNKNOWN]
        self.unknown_id = len(cast)
        self.exact = exact
        self.min_similarity = min_similarity
        self._lookup: dict[str, str] = {}
        for name in cast:
            self._lookup[_fold(name)] = name
            for part in name.split():
                self._lookup.setdefault(_fold(part), name)
        for name, spellings in (aliases or {}).items():
            if name not in cast:
                raise ValueError(f"alias given for {name!r}, which is not in the cast {cast}")
            for spelling in spellings:
                self._lookup[_fold(spelling)] = name
        self._keys = sorted(self._lookup)
        self._fuzzy: dict[str, str | None] = {}
        self._matched: dict[str, str | None] = {}  # tokens repeat across thousands of faces
        self._class_index = {name: i for i, name in enumerate(self.classes)}

    def match(self, token: str) -> str | None:
        """The cast member ``token`` refers to, or ``None``."""
        if token not in self._matched:
            self._matched[token] = self._match(token)
        return self._matched[token]

    def _match(self, token: str) -> str | None:
        if self.exact:
            return token if token in self.cast else None
        key = _fold(token)
        if not key:
            return None
        if key in self._lookup:
            return self._lookup[key]
        if len(key) < 4 or self.min_similarity >= 1.0:
            return None
        if key not in self._fuzzy:
            close = difflib.get_close_matches(key, self._keys, n=1, cutoff=self.min_similarity)
            self._fuzzy[key] = self._lookup[close[0]] if close else None
        return self._fuzzy[key]

    def to_class(self, token: str) -> str:
        """The class of a name token: a cast member or "Unknown"."""
        return self.match(token) or UNKNOWN

    def class_ids(self, tokens: Iterable[str]) -> list[int]:
        """Class ids of ``tokens``; duplicates stay (they carry more weight, as in the paper)."""
        return [self._class_index[self.to_class(token)] for token in tokens]


def caption_names(
    text: str,
    speaker: str | None,
    gazetteer: Gazetteer,
    ner: Callable[[str], list[str]] | None = None,
) -> list[str]:
    """Person-name tokens of one caption line: the speaker tag, cast mentions and NER persons.

    Without NER, only the speaker tag and words that match the cast count as names (other capitalised words
    are too often not names); with NER, its PERSON spans are added and may name people outside the cast.
    """
    names: list[str] = []
    if speaker:
        names.append(speaker)
    mentioned = [word for word in _WORD.findall(text) if gazetteer.match(word) and word[:1].isupper()]
    if ner is not None:
        persons = [part for span in ner(text) for part in span.split()]
        names.extend(persons)
        mentioned = [word for word in mentioned if word not in persons]
    names.extend(mentioned)
    return names


def report_out_of_cast(weak_names: Sequence[Sequence[str]], gazetteer: Gazetteer, source: str = "") -> int:
    """Warn once with the number of name tokens outside the cast (they become "Unknown"); returns that number."""
    outside = Counter(token for names in weak_names for token in names if gazetteer.match(token) is None)
    total = sum(outside.values())
    if total:
        common = ", ".join(f"{name!r} x{count}" for name, count in outside.most_common(5))
        where = f"{source}: " if source else ""
        warnings.warn(
            f"{where}{total} name tokens ({len(outside)} distinct) are not in the cast and count as "
            f"{UNKNOWN!r}; most frequent: {common}",
            stacklevel=2,
        )
    return total
