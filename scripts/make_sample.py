"""Regenerate the bundled sample: whole SQuAD v1.1 articles, about 3,000 train and 600 eval pairs.

    python scripts/make_sample.py ../shared/data/squad-v1.1-sentences cube_ray/data/sample

Articles are drawn with a fixed seed; eval articles come from SQuAD's dev split, which shares no article with
train. gzip is written with mtime 0 so the files are byte-identical on every run.
"""
import gzip
import json
import random
import sys
from collections import defaultdict
from pathlib import Path


def pick(path: Path, target: int, seed: int) -> list[dict]:
    docs = defaultdict(list)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            docs[row["doc_id"]].append(row)
    names = sorted(docs)
    random.Random(seed).shuffle(names)
    rows: list[dict] = []
    for name in names:
        if len(rows) + len(docs[name]) > target * 1.1:
            continue  # keep whole articles only, and stay near the target
        rows.extend(docs[name])
        if len(rows) >= target * 0.95:
            break
    return rows


def write(rows: list[dict], path: Path) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


if __name__ == "__main__":
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    for name, out, target in (("train.jsonl.gz", "train.jsonl.gz", 3000), ("dev.jsonl.gz", "eval.jsonl.gz", 600)):
        rows = pick(src / name, target, seed=247)
        write(rows, dst / out)
        print(f"{out}: {len(rows)} pairs from {len({r['doc_id'] for r in rows})} articles")
