"""Real-size models on this machine: what the streaming compile and the runtime cost.

    python bench/bench_scale.py --model ernie-4.5-21b-a3b --bits 4 --run          # full depth, preset
    python bench/bench_scale.py --model DIR1 --model DIR2 --bits 4                # HF folders (e.g. slices)
    python bench/bench_scale.py --model ernie-4.5-300b-a47b --bits 2 --plan       # size and memory only

Each model is compiled in a process of its own under /usr/bin/time -v (peak RSS = its maximum
resident set, the toolchain included); with --run, a fresh runtime process (as ernie-run) then
prefills --prompt random tokens and decodes --decode steps, and its decode is set against the
active-parameter bandwidth bound (bench/common.py: decode_bytes — the routed experts at top_k /
num_experts), with read-bandwidth probes right before and after each timed decode. Artifacts go to
-o (default: a temporary folder, deleted); real-shape HF folders come from
../shared/tools/make_ernie21b_slice.py. Keep this out of CI: a full 21B-A3B compile takes minutes.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import clean_env, decode_bytes, print_table, run_artifact  # noqa: E402


def timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run under /usr/bin/time -v → (process, wall seconds, peak RSS GiB)."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=clean_env())
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.group(1).split(":")))) if wall else float("nan")
    return proc, seconds, int(rss.group(1)) / 2**20 if rss else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="preset or HF folder (repeatable)")
    p.add_argument("--bits", default="4")
    p.add_argument("--preset-override", action="append", default=[])
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--plan", action="store_true", help="only ernie-compile --plan")
    p.add_argument("--run", action="store_true", help="also run each artifact (prefill + decode)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, help="keep the artifacts here")
    args = p.parse_args()
    out_root = args.output or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    try:
        for i, model in enumerate(args.model):
            out = out_root / f"a{i}"
            cmd = [sys.executable, "-m", "ernie_compile.cli", "--model", model, "--bits", args.bits, "-o", str(out),
                   "--max-seq-len", str(args.max_seq_len), "--report", str(out_root / f"a{i}.json")]
            for o in args.preset_override:
                cmd += ["--preset-override", o]
            if args.plan:
                cmd.append("--plan")
            proc, seconds, rss = timed(cmd)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"compile of {model} failed")
            report = json.loads((out_root / f"a{i}.json").read_text())
            row = {"model": Path(model).name + "".join(f" {o}" for o in args.preset_override), "bits": args.bits,
                   "compile s": round(seconds, 1), "compile peak RSS GiB": round(rss, 2)}
            if args.plan:
                plan = report["plan"]
                row.update({"weights GiB": plan["weight_bytes"] / 2**30, "to run GiB": plan["run_bytes"] / 2**30,
                            "planned compile peak GiB": plan["compile_peak_bytes"] / 2**30})
            else:
                row.update({"stages s": {k: round(v) for k, v in report["stages"].items()},
                            "artifact GiB": report["artifact_bytes"] / 2**30})
            if args.run and not args.plan:
                prompt = [int(t) for t in np.random.default_rng(0).integers(3, 1000, args.prompt)]
                nbytes = decode_bytes(out, args.prompt + args.decode / 2)
                r = run_artifact(out, prompt, args.decode, args.reps, nbytes)
                row.update({"run peak RSS GiB": r["peak_rss_MiB"] / 1024, "prefill tok/s": r["prefill_tok_s"],
                            "decode tok/s": r["decode_tok_s"], "active GB/token": nbytes / 1e9,
                            "bound tok/s": r.get("bound_tok_s"), "of bound": r.get("of_bound")})
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if args.output is None:
            shutil.rmtree(out_root, ignore_errors=True)
    print_table(rows)


if __name__ == "__main__":
    main()
