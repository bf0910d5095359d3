"""Run the reliability suite and write its table to results/reliability.md.

    python scripts/reliability.py [pytest args...]

Runs `pytest -m reliability` (every test that describes itself with the `reliability` fixture: faults on a real
local Ray cluster, bad inputs, scale), reads what each test recorded (scenario, what was done, outcome, data lost)
from the JUnit XML, and writes one row per test with its pass/fail status and time. The scale test writes its
figures to results/bench_scale.json. Exit status: pytest's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["node loss", "worker kill", "driver kill", "kill during checkpoint save", "corrupt checkpoint", "bad input", "scale"]


def rows_from_junit(path: Path) -> list[dict]:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        result = "failed" if failed is not None else "skipped" if skipped is not None else "passed"
        outcome = props.get("outcome", "")
        if failed is not None:
            outcome = f"FAILED: {(failed.get('message') or '').splitlines()[0][:150]}"
        elif skipped is not None:
            outcome = f"skipped: {(skipped.get('message') or '')[:150]}"
        rows.append({"scenario": props.get("scenario", case.get("name")), "done": props.get("done", ""),
                     "outcome": outcome, "lost": props.get("lost", "?" if result != "passed" else ""),
                     "result": result, "seconds": float(case.get("time", 0)), "test": f"{case.get('classname')}::{case.get('name')}"})
    rank = lambda r: next((i for i, k in enumerate(ORDER) if r["scenario"].startswith(k)), len(ORDER))  # noqa: E731
    return sorted(rows, key=lambda r: (rank(r), r["scenario"]))


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_table(rows: list[dict], out: Path, seconds: float, commit: str) -> None:
    passed = sum(r["result"] == "passed" for r in rows)
    lines = ["# Reliability suite", "",
             f"`python scripts/reliability.py` (runs `pytest -m reliability`) on commit `{commit}`, "
             f"{time.strftime('%Y-%m-%d')}: **{passed} of {len(rows)} passed** in {seconds / 60:.1f} min "
             f"(2 CPU cores). Each row is one test; it asserts the outcome and the data lost that it states.", "",
             "| scenario | what was done | outcome | data lost | result | s |", "|---|---|---|---|---|---|"]
    lines += [f"| {cell(r['scenario'])} | {cell(r['done'])} | {cell(r['outcome'])} | {cell(r['lost'])} | {r['result']} | "
              f"{r['seconds']:.0f} |" for r in rows]
    lines += ["", "Tests: " + ", ".join(sorted({r["test"].split("::")[0] for r in rows})) + "."]
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, "CUBE_RAY_BENCH_SCALE": str(ROOT / "results" / "bench_scale.json")}
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "pytest", "-m", "reliability", "-o", "junit_family=xunit1",
                                f"--junitxml={junit}", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], cwd=ROOT, env=env)
        seconds = time.perf_counter() - start
        rows = rows_from_junit(junit)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = ROOT / "results" / "reliability.md"
    write_table(rows, out, seconds, commit)
    print(f"\n{out}: {sum(r['result'] == 'passed' for r in rows)} of {len(rows)} scenarios passed")
    return code


if __name__ == "__main__":
    sys.exit(main())
