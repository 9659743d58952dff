"""ernie-tune: schedule search into a tuning database, or an option sweep with a report.

    ernie-tune --model ernie-4.5-0.3b --tuning-db db.jsonl            # search; no artifact kept
    ernie-tune --model ernie-4.5-0.3b --sweep bits=none,8,4 -o sweep/  # compile + measure each combination

Parses and validates arguments, then calls compiler/tuning.py or compiler/sweep.py.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .cli import TARGET_HELP
from .errors import Parser, UserError, run_cli


def _parser() -> Parser:
    p = Parser(prog="ernie-tune", description=__doc__.splitlines()[0],
               epilog="Errors in the input: one line on stderr, exit code 2.")
    p.add_argument("--model", help="checkpoint folder or preset (default: the embedded default)")
    p.add_argument("--target", default="cpu", help=TARGET_HELP)
    p.add_argument("--bits", help="as for ernie-compile (default: none, float weights)")
    p.add_argument("--max-seq-len", type=int, default=512, help="context limit of the compiled artifacts")
    p.add_argument("--tuning-db", type=Path, help="database to search into / sweep with "
                                                  "(default: ~/.cache/ernie-compile/tuning-db.jsonl)")
    p.add_argument("--tune-trials", type=int, help="at most this many measurements (default: no limit)")
    p.add_argument("--tune-minutes", type=float, help="stop measuring after this many minutes (default: no limit)")
    p.add_argument("--sweep", action="append", default=[], metavar="OPTION=V1,V2",
                   help="sweep an option (repeatable): bits, group_size, embed_bits, dtype, target, "
                        "fuse_attention, symmetric; 'none' = unset (default: no sweep, a schedule search)")
    p.add_argument("-o", "--output", type=Path, help="report folder of a sweep (default: none; --sweep needs it)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length a sweep measures")
    p.add_argument("--decode-tokens", type=int, default=16, help="new tokens a sweep measures")
    p.add_argument("--reps", type=int, default=3, help="measurements per combination (the median is reported)")
    return p


def _tune(argv) -> int:
    args = _parser().parse_args(argv)
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


def main(argv=None) -> int:
    return run_cli("ernie-tune", lambda: _tune(argv))


if __name__ == "__main__":
    sys.exit(main())
