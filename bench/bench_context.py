"""Decode step time against context length: how much attention costs as the KV cache grows.

    python bench/bench_context.py                       # 0.3b preset, 4-bit, contexts 16..960
    python bench/bench_context.py --bits none --contexts 16 512
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ernie_compile.compiler.options import CompileOptions  # noqa: E402
from ernie_compile.compiler.pipeline import compile_model  # noqa: E402
from ernie_compile.runtime import Session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ernie-4.5-0.3b")
    ap.add_argument("--bits", default="4", help="'none' for float32")
    ap.add_argument("--contexts", type=int, nargs="+", default=[16, 256, 512, 960])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "art"
        compile_model(CompileOptions(output=out, model=args.preset, max_seq_len=max(args.contexts) + args.steps + 1,
                                     bits=None if args.bits == "none" else args.bits), log=lambda *_: None)
        session = Session(out)
        print(f"{args.preset}, bits={args.bits}, {args.steps} decode steps, median of {args.reps}\n")
        print("| context | decode ms/step | tok/s |\n|---|---|---|")
        for ctx in args.contexts:
            rates = [session.generate(list(range(5, 5 + ctx)), args.steps + 1, stop_at_eos=False).decode_tok_s
                     for _ in range(args.reps)]
            rate = statistics.median(rates)
            print(f"| {ctx} | {1e3 / rate:.1f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
