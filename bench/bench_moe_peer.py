"""Ours against llama.cpp on one MoE checkpoint folder (e.g. a real-shape 21B-A3B slice), in alternating rounds.

    python ../shared/tools/make_ernie21b_slice.py /tmp/e21b-4 TOKENIZER_DIR 4     # once
    python bench/bench_moe_peer.py /tmp/e21b-4 --bits 4 --prompt 128 --decode 64 --rounds 2
    python bench/bench_moe_peer.py /tmp/e21b-4 --bits 4 experts=3,attn=4 experts=2,attn=4 \
        --tuning-db /tmp/moe-db.jsonl --kl

Compiles the folder once per `--bits` configuration (this CPU's defaults: int8 activations where it
has an int8 dot) — with `--tuning-db`, the first one also with `--tune` against that database (the
MoE grouped GEMM's tokens / prefetch / chunk and the float linears, searched where the database lacks
them): the tuned-vs-default row. Then per round runs each of ours in a fresh runtime process
(bench/common.run_artifact: medians of 3 after a warm-up, decode against the active-parameter
bandwidth bound) and llama.cpp Q4_0 on the same weights (../shared/tools/llamacpp_peer.sh: medians of
5), same threads (2), prompt and decode lengths. Alternating rounds, because this machine's bandwidth
and neighbours change by the minute. `--kl`: each artifact's KL divergence and top-1 agreement
against the float32 transformers model of the folder (compiler/accuracy.py's prompts, teacher-forced;
the float model must fit in memory: ~4 bytes per parameter). Keep it out of CI: the peer builds once
(~5 min) and converts the folder once.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import clean_env, decode_bytes, print_table, run_artifact  # noqa: E402

PEER = ROOT.parent / "shared" / "tools" / "llamacpp_peer.sh"


def compile_folder(folder: Path, out: Path, bits: str, max_seq_len: int, tuning_db: Path | None) -> float:
    """Seconds to compile `folder` into `out`."""
    cmd = [sys.executable, "-m", "ernie_compile.cli", "--model", str(folder), "--bits", bits, "-q",
           "--max-seq-len", str(max_seq_len), "-o", str(out)]
    if tuning_db:
        cmd += ["--tune", "--tuning-db", str(tuning_db)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=clean_env())
    return time.perf_counter() - t


def kl_rows(folder: Path, artifacts: dict[str, Path]) -> dict[str, dict]:
    """compiler/accuracy.py's KL / top-1 of each artifact against the folder's float32 model."""
    import torch
    import transformers

    from ernie_compile.compiler import accuracy

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    return {name: accuracy.measure(model, out, vocab) for name, out in artifacts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="an Ernie4_5_Moe Hugging Face folder with tokenizer.model")
    p.add_argument("--bits", nargs="+", default=["4"], help="our configurations (ernie-compile --bits)")
    p.add_argument("--tuning-db", type=Path, help="also: the first configuration tuned with this database")
    p.add_argument("--kl", action="store_true", help="KL / top-1 against the float32 model of the folder")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, default=Path("/tmp/bench-moe-peer"), help="our artifacts' parent")
    args = p.parse_args()
    max_seq_len = max(2048, args.prompt + args.decode + 1)
    configs = {f"ours --bits {b}": (b, None) for b in args.bits}
    if args.tuning_db:
        configs[f"ours --bits {args.bits[0]} tuned"] = (args.bits[0], args.tuning_db)
    outs, compile_s = {}, {}
    for i, (name, (bits, db)) in enumerate(configs.items()):
        outs[name] = args.output / f"c{i}"
        compile_s[name] = compile_folder(args.folder, outs[name], bits, max_seq_len, db)
        print(f"{name}: compiled in {compile_s[name]:.0f} s", flush=True)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 1000, args.prompt)]
    ours, peer = {name: [] for name in configs}, []
    for _ in range(args.rounds):
        for name, out in outs.items():
            ours[name].append(run_artifact(out, prompt, args.decode, 3,
                                           decode_bytes(out, args.prompt + args.decode / 2)))
        out = subprocess.run(["bash", str(PEER), str(args.folder), "Q4_0", "2", str(args.prompt), str(args.decode)],
                             capture_output=True, text=True, env=clean_env(), check=True)
        peer.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps({**{n: r[-1] for n, r in ours.items()}, "llama.cpp": peer[-1]}), flush=True)
    kl = kl_rows(args.folder, outs) if args.kl else {}
    med = statistics.median
    lp = med(r["prefill_tok_s_median"] for r in peer)
    ld = med(r["decode_tok_s_median"] for r in peer)
    rows = []
    for name, runs in ours.items():
        pre, dec = med(r["prefill_tok_s"] for r in runs), med(r["decode_tok_s"] for r in runs)
        rows.append({"config": name, "compile s": compile_s[name], "prefill tok/s": pre, "× llama.cpp prefill": pre / lp,
                     "decode tok/s": dec, "× llama.cpp decode": dec / ld,
                     "of bound": med(r["of_bound"] for r in runs)})
        if name in kl:
            rows[-1].update({"KL": kl[name]["kl_mean"], "top-1": kl[name]["top1_agreement"]})
    rows.append({"config": "llama.cpp Q4_0", "prefill tok/s": lp, "decode tok/s": ld})
    print(f"{args.folder.name}: prompt {args.prompt}, decode {args.decode}, 2 threads, {args.rounds} rounds (medians)")
    print_table(rows)


if __name__ == "__main__":
    main()
