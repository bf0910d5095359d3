"""Where a run's wall time goes: wall-clock stamps and summed seconds in `<out>/timing.json`.

    {"trial": {"start": t, "fit_start": t, "fit_end": t},            written by a search's trial driver
     "worker": {"process_start": t, "start": t, "data_done": t, "model_done": t, "kernel_done": t, "setup_done": t,
                "first_report": t, "last_report": t, "score_s": s, "checkpoint_s": s, "reports": n}}
                                                                      written by rank 0 at every report

The search report turns them into the trial-cost breakdown (report.trial_cost)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from cube_ray.fsutil import atomic_write_text

TIMING = "timing.json"


def read_timing(out: Path) -> dict:
    path = Path(out) / TIMING
    return json.loads(path.read_text()) if path.exists() else {}


def stamp(out: Path, part: str, **values: float) -> None:
    """Merge `values` into part `part` of out/timing.json (`now()` stamps the current time)."""
    timing = read_timing(out)
    timing.setdefault(part, {}).update(values)
    atomic_write_text(Path(out) / TIMING, json.dumps(timing))


def now() -> float:
    return time.time()
