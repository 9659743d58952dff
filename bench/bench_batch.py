"""The compiled `batch` step alone (no server, no HTTP): milliseconds per decode step and tokens per
second with 1, 2, 4, 8, 16 sequences advancing together through the paged KV cache — the ceiling
ernie-serve's continuous batching works under (bench/bench_serve.py measures through the server).

Each sequence first gets a 32-token prompt; then rounds of --steps decode steps per batch size, the
sizes interleaved round by round (this machine's speed swings from minute to minute: interleaving
sets every size against the same swings). Medians over all rounds, and the minima.

    ernie-compile --model ernie-4.5-0.3b --bits 4 -o /tmp/03b
    python bench/bench_batch.py /tmp/03b --rounds 8
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import print_table  # noqa: E402
from ernie_compile.runtime import Session  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact", type=Path)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="decode steps per size per round")
    args = p.parse_args()
    engine = Session(args.artifact).engine  # as ernie-serve drives it
    if not getattr(engine, "batches", False):
        sys.exit(f"{args.artifact}: no compiled batch step (a CPU artifact has one)")
    rng = np.random.default_rng(0)
    most = max(args.sizes)
    engine.open_batch(most)
    for sid in range(most):
        engine.add_sequence(sid)
    engine.step_many(list(range(most)), [list(rng.integers(100, 5000, 32)) for _ in range(most)], [0] * most)
    fed = [32] * most
    times = {b: [] for b in args.sizes}
    for _ in range(args.rounds):
        for b in args.sizes:
            for _ in range(args.steps):
                ids = [[int(t)] for t in rng.integers(100, 5000, b)]
                start = time.perf_counter()
                engine.step_many(list(range(b)), ids, fed[:b])
                times[b].append(time.perf_counter() - start)
                fed[:b] = [f + 1 for f in fed[:b]]
    one = np.median(times[min(args.sizes)])
    rows = []
    for b in args.sizes:
        med, low = float(np.median(times[b])), min(times[b])
        rows.append({"sequences": b, "step_ms_median": round(med * 1e3, 2), "step_ms_min": round(low * 1e3, 2),
                     "tok_s_median": round(b / med, 1), "vs_smallest": f"{b / med / (min(args.sizes) / one):.2f}x"})
    print_table(rows)


if __name__ == "__main__":
    main()
