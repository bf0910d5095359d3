"""Quality filter: drop pairs that cannot teach anything, and say how many and why."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cube_ray.data.readers import Pair
from cube_ray.data.text import normalise


@dataclass
class FilterReport:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items())) or "none"
        return f"kept {self.kept}, dropped {sum(self.dropped.values())} ({reasons})"


def quality_filter(pairs: list[Pair], min_chars: int, max_chars: int) -> tuple[list[Pair], FilterReport]:
    """Keep pairs whose texts have words, are within [min_chars, max_chars], and are not repeats.

    `empty`: a text with no letter or digit (e.g. "?!"); `too_short` / `too_long`: by stripped length of either
    text; `duplicate`: the same normalised (question, answer) as an earlier kept pair.
    """
    report = FilterReport()
    seen: set[tuple[str, str]] = set()
    kept: list[Pair] = []
    for p in pairs:
        nq, na = normalise(p.question), normalise(p.answer)
        lengths = (len(p.question.strip()), len(p.answer.strip()))
        if not nq or not na:
            reason = "empty"
        elif min(lengths) < min_chars:
            reason = "too_short"
        elif max(lengths) > max_chars:
            reason = "too_long"
        elif (nq, na) in seen:
            reason = "duplicate"
        else:
            seen.add((nq, na))
            kept.append(p)
            continue
        report.dropped[reason] += 1
    report.kept = len(kept)
    return kept, report
