"""100,000 pairs through the store and one epoch of Ray Train with bounded memory (benchmarks/scale.py, run as its
own process so its peak RSS is the driver's alone). Figures go to $CUBE_RAY_BENCH_SCALE when set
(scripts/reliability.py sets results/bench_scale.json), else to a temporary file."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAIRS = 100_000


def test_100k_pairs_stream_through_the_store_with_bounded_memory(tmp_path, reliability):
    reliability(scenario="scale", done=f"{PAIRS:,} synthetic pairs (precomputed 384-d embeddings in the store), "
                                       "one epoch on 2 Ray Train workers")
    out = Path(os.environ.get("CUBE_RAY_BENCH_SCALE", tmp_path / "bench_scale.json"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--pairs", str(PAIRS), "--json", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    store_mb = figures["store_bytes"] / 2**20
    assert figures["epochs"] == 1 and figures["train_pairs"] >= 0.8 * PAIRS
    assert store_mb > 250  # the store is big enough to notice if someone loaded it
    # the driver never holds the store: what fit adds to it stays well below the embeddings' size
    assert figures["driver_growth_mb"] < 0.5 * store_mb, figures
    workers = figures["worker_peak_rss_mb"]
    assert len(workers) == 2
    # each worker holds its own half of the train split as tensors (~150 MB here), not the store
    assert max(workers) < 2048, figures
    reliability(outcome=f"1 epoch of {figures['train_pairs']:,} pairs in {figures['fit_s']:.0f} s "
                        f"({figures['samples_per_s']:.0f} samples/s); store {store_mb:.0f} MB; driver peak "
                        f"{figures['driver_peak_rss_mb']:.0f} MB (+{figures['driver_growth_mb']:.0f} MB during fit); "
                        f"workers {', '.join(f'{w:.0f}' for w in workers)} MB", lost="none")
