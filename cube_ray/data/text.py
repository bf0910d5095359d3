"""Text normalisation shared by the quality filter and the contamination check.

Two texts are "the same" when they are equal after folding case, punctuation and whitespace: "What is X?" and
"what is x" collide. Token sets feed the near-duplicate (Jaccard) check.
"""
from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[^\w\s]+")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def tokens(text: str) -> frozenset[str]:
    return frozenset(normalise(text).split())
