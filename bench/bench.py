"""One benchmark command: a preset on the CPU, ours against every peer, in one run.

    python bench/bench.py                                   # 0.3b preset, float32 and 4-bit
    python bench/bench.py --preset ernie-tiny --bits none   # quick
    python bench/bench.py --llamacpp --json out.json         # + llama.cpp Q4_0 (builds it once, ~5 min)
    python bench/bench.py --tuning-db db.jsonl               # + ours float32 with tuned schedules

Rows: ours (TVM backend) per --bits, the inductor backend (AOTInductor, float32), transformers eager
(float32, sdpa, its own KV cache), llama.cpp Q4_0 when asked. Columns: compile time per stage,
artifact size, runtime peak RSS (VmHWM of a fresh process), prefill tok/s over --prompt tokens (128),
first-token latency (= that prefill), decode tok/s over --decode steps (64), medians of --reps after a
warm-up; and the memory-bandwidth bound of decode (bytes read per token: weights, and the KV cache at
the mean context of the timed steps; / read bandwidth) with the share of it reached. The read bandwidth of this machine swings 30-70 GB/s within seconds, so it is
measured right before and right after every timed decode (bench/membw.py) and each decode is set
against the mean of its two probes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_e2e import eager_speed  # noqa: E402
from common import decode_bytes, kv_bytes_per_token, llamacpp_peer, print_table, run_artifact  # noqa: E402

from ernie_compile.compiler.load import load_preset  # noqa: E402
from ernie_compile.compiler.options import CompileOptions  # noqa: E402
from ernie_compile.compiler.pipeline import compile_model  # noqa: E402


def ours(preset: str, out: Path, prompt, args, label: str, **opts) -> dict:
    report = compile_model(CompileOptions(output=out, model=preset, max_seq_len=512, **opts), log=lambda *_: None)
    context = len(prompt) + args.decode / 2  # the mean over the timed decode steps
    nbytes = decode_bytes(out, context) if (out / "weights.safetensors").exists() else None
    speed = run_artifact(out, prompt, args.decode, args.reps, nbytes)
    row = {"config": label, **{f"{k} s": v for k, v in report["stages"].items() if k not in ("accuracy", "load")},
           "artifact MiB": report["artifact_bytes"] / 2**20, "peak RSS MiB": speed["peak_rss_MiB"],
           "prefill tok/s": speed["prefill_tok_s"], "first token ms": 1000 * len(prompt) / speed["prefill_tok_s"],
           "decode tok/s": speed["decode_tok_s"]}
    if nbytes:
        row.update({"read GB/s": speed["read_GBps"], "bound tok/s": speed["bound_tok_s"],
                    "of bound": speed["of_bound"]})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ernie-4.5-0.3b")
    ap.add_argument("--bits", nargs="*", default=["none", "4"], help="our configurations: none (float32) or bits")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tuning-db", type=Path, help="also: ours float32 with this database's schedules "
                                                   "(searched first where it lacks them)")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--llamacpp", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    prompt = [int(x) for x in np.random.default_rng(0).integers(3, 1000, args.prompt)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            label = "ours float32" if bits == "none" else f"ours {bits}-bit g32"
            rows.append(ours(args.preset, Path(tmp) / f"tvm-{bits}", prompt, args, label,
                             bits=None if bits == "none" else bits))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.tuning_db:
            rows.append(ours(args.preset, Path(tmp) / "tvm-tuned", prompt, args, "ours float32 tuned",
                             tune=True, tuning_db=args.tuning_db))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if not args.no_inductor:
            rows.append(ours(args.preset, Path(tmp) / "inductor", prompt, args, "inductor float32",
                             backend="inductor"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        model = load_preset(args.preset).model
        pre, dec = eager_speed(model, prompt, args.decode, args.reps)
        rows.append({"config": "transformers eager float32", "prefill tok/s": pre,
                     "first token ms": 1000 * len(prompt) / pre, "decode tok/s": dec})
        p = llamacpp_peer(model, Path(tmp) / "hf", args.prompt, args.decode) if args.llamacpp else None
        if p:
            kv = kv_bytes_per_token(model.config.to_dict(), 2) * (args.prompt + args.decode / 2)  # f16 cache
            bound = p["read_GBps"] * 1e9 / (p["size_bytes"] + kv)
            rows.append({"config": "llama.cpp Q4_0", "artifact MiB": p["size_bytes"] / 2**20,
                         "prefill tok/s": p["prefill_tok_s_median"],
                         "first token ms": 1000 * args.prompt / p["prefill_tok_s_median"],
                         "decode tok/s": p["decode_tok_s_median"], "read GB/s": p["read_GBps"],
                         "bound tok/s": bound,
                         "of bound": p["decode_tok_s_median"] / bound})
    print(f"\n{args.preset} on the CPU (2 threads); prompt {args.prompt}, decode {args.decode}, medians of "
          f"{args.reps}; read GB/s measured right before and after each decode, which 'of bound' is set "
          f"against (bench/membw.py)\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
