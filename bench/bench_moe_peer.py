"""Ours against llama.cpp on one MoE checkpoint folder (e.g. a real-shape 21B-A3B slice), in alternating rounds.

    python ../shared/tools/make_ernie21b_slice.py /tmp/e21b-4 TOKENIZER_DIR 4     # once
    python bench/bench_moe_peer.py /tmp/e21b-4 --bits 4 --prompt 128 --decode 64 --rounds 2

Compiles the folder (`--bits`, this CPU's defaults: int8 activations where it has an int8 dot), then
per round runs ours in a fresh runtime process (bench/common.run_artifact: medians of 3 after a
warm-up, decode against the active-parameter bandwidth bound) and llama.cpp Q4_0 on the same weights
(../shared/tools/llamacpp_peer.sh: medians of 5), same threads (2), prompt and decode lengths.
Alternating rounds, because this machine's bandwidth and neighbours change by the minute. Keep it
out of CI: the peer builds once (~5 min) and converts the folder once.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import clean_env, decode_bytes, print_table, run_artifact  # noqa: E402

PEER = ROOT.parent / "shared" / "tools" / "llamacpp_peer.sh"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="an Ernie4_5_Moe Hugging Face folder with tokenizer.model")
    p.add_argument("--bits", default="4")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, default=Path("/tmp/bench-moe-peer"), help="our artifact")
    args = p.parse_args()
    cmd = [sys.executable, "-m", "ernie_compile.cli", "--model", str(args.folder), "--bits", args.bits, "-q",
           "--max-seq-len", str(max(2048, args.prompt + args.decode + 1)), "-o", str(args.output)]
    subprocess.run(cmd, check=True, env=clean_env())
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 1000, args.prompt)]
    nbytes = decode_bytes(args.output, args.prompt + args.decode / 2)
    ours, peer = [], []
    for _ in range(args.rounds):
        ours.append(run_artifact(args.output, prompt, args.decode, 3, nbytes))
        out = subprocess.run(["bash", str(PEER), str(args.folder), "Q4_0", "2", str(args.prompt), str(args.decode)],
                             capture_output=True, text=True, env=clean_env(), check=True)
        peer.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps({"ours": ours[-1], "llama.cpp": peer[-1]}), flush=True)
    med = statistics.median
    rows = [{"config": f"ours --bits {args.bits}", "prefill tok/s": med(r["prefill_tok_s"] for r in ours),
             "decode tok/s": med(r["decode_tok_s"] for r in ours), "bound tok/s": med(r["bound_tok_s"] for r in ours)},
            {"config": "llama.cpp Q4_0", "prefill tok/s": med(r["prefill_tok_s_median"] for r in peer),
             "decode tok/s": med(r["decode_tok_s_median"] for r in peer)}]
    rows.append({"config": "ours / llama.cpp", "prefill tok/s": rows[0]["prefill tok/s"] / rows[1]["prefill tok/s"],
                 "decode tok/s": rows[0]["decode tok/s"] / rows[1]["decode tok/s"]})
    print(f"{args.folder.name}: prompt {args.prompt}, decode {args.decode}, 2 threads, {args.rounds} rounds (medians)")
    print_table(rows)


if __name__ == "__main__":
    main()
