"""ernie-tune: schedule search into a tuning database, or an option sweep with a report.

    ernie-tune --model ernie-4.5-0.3b --tuning-db db.jsonl            # search; no artifact kept
    ernie-tune --model ernie-4.5-0.3b --sweep bits=none,8,4 -o sweep/  # compile + measure each combination

Parses and validates arguments, then calls compiler/tuning.py or compiler/sweep.py.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .errors import USER_ERROR_EXIT, UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie-tune", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or preset (default: the embedded default)")
    p.add_argument("--target", default="cpu")
    p.add_argument("--bits", help="as for ernie-compile")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--tuning-db", type=Path, help="database to search into / sweep with "
                                                  "(default: ~/.cache/ernie-compile/tuning-db.jsonl)")
    p.add_argument("--tune-trials", type=int, help="at most this many measurements")
    p.add_argument("--tune-minutes", type=float, help="stop measuring after this many minutes")
    p.add_argument("--sweep", action="append", default=[], metavar="OPTION=V1,V2",
                   help="sweep an option (repeatable): bits, group_size, embed_bits, dtype, target, "
                        "fuse_attention, symmetric; 'none' = unset")
    p.add_argument("-o", "--output", type=Path, help="report folder of a sweep")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        from .compiler.options import CompileOptions

        base = CompileOptions(output=Path("unused"), model=args.model, target=args.target, bits=args.bits,
                              max_seq_len=args.max_seq_len, tuning_db=args.tuning_db,
                              tune_trials=args.tune_trials, tune_minutes=args.tune_minutes)
        if args.sweep:
            from .compiler import sweep

            if args.output is None:
                raise UserError("--sweep writes a report: give -o FOLDER")
            rows = sweep.run(base, sweep.parse_axes(args.sweep), args.output, args.prompt_tokens,
                             args.decode_tokens, args.reps)
            print((args.output / "sweep.md").read_text(), end="")
            plots = ", ".join(sorted(p.name for p in args.output.glob("sweep_*.png")))
            print(f"wrote {args.output}/: sweep.csv, sweep.md, {plots} ({len(rows)} combinations)")
            return 0
        import dataclasses

        from .compiler.pipeline import compile_model

        with tempfile.TemporaryDirectory() as tmp:
            report = compile_model(dataclasses.replace(base, output=Path(tmp) / "a", tune=True), log=print)
        print(f"tuning: {report['tuning']}")
        return 0
    except UserError as e:
        print(f"ernie-tune: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
