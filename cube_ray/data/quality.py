"""Quality filter: drop pairs that cannot teach anything, cut overlong texts, and say how many and why."""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field

from cube_ray.data.readers import Pair
from cube_ray.data.text import normalise

log = logging.getLogger(__name__)


@dataclass
class FilterReport:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0  # kept pairs with a text cut to max_chars

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items())) or "none"
        cut = f" ({self.truncated} truncated to max_chars)" if self.truncated else ""
        return f"kept {self.kept}{cut}, dropped {sum(self.dropped.values())} ({reasons})"


def quality_filter(pairs: list[Pair], min_chars: int, max_chars: int, source: str = "") -> tuple[list[Pair], FilterReport]:
    """Keep pairs whose texts have words, are at least min_chars long, and are not repeats; cut longer texts.

    `empty`: a text with no letter or digit (e.g. "?!"); `too_short`: by stripped length of either text;
    `duplicate`: the same normalised (question, answer) as an earlier kept pair. A text over `max_chars` (a pasted
    document, a 1 MB log line) is cut to its first max_chars characters with a warning: teachers read only their
    first max_length tokens anyway, and the pair is worth keeping.
    """
    report = FilterReport()
    seen: set[tuple[str, str]] = set()
    kept: list[Pair] = []
    where = f"{source}: " if source else ""
    for p in pairs:
        longest = max(len(p.question), len(p.answer))
        if longest > max_chars:
            if report.truncated < 3:
                log.warning("%spair %r: a text of %d characters was truncated to max_chars=%d", where, p.id, longest,
                            max_chars)
            report.truncated += 1
            p = dataclasses.replace(p, question=p.question[:max_chars], answer=p.answer[:max_chars])
        nq, na = normalise(p.question), normalise(p.answer)
        if not nq or not na:
            reason = "empty"
        elif min(len(p.question.strip()), len(p.answer.strip())) < min_chars:
            reason = "too_short"
        elif (nq, na) in seen:
            reason = "duplicate"
        else:
            seen.add((nq, na))
            kept.append(p)
            continue
        report.dropped[reason] += 1
    report.kept = len(kept)
    if report.truncated > 3:
        log.warning("%s%d pairs had a text over max_chars=%d and were truncated", where, report.truncated, max_chars)
    return kept, report
