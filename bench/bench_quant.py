"""Quantized decode on the CPU: tok/s per bit width and group size, bytes per token, the memory
bandwidth bound, runtime peak RSS, against transformers eager (fp32) and llama.cpp Q4_0 on the
same random weights when its peer script is available (../shared/tools/llamacpp_peer.sh).

    python bench/bench_quant.py                               # 0.3b preset: fp32, 8-bit, 4-bit g32/64/128
    python bench/bench_quant.py --configs 4:32 --llamacpp     # + llama.cpp Q4_0 (builds it once, ~5 min)
    python bench/bench_quant.py --configs 4:32:8 4:32:none    # int8 vs float32 activations (--act-bits)
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
from ernie_compile.compiler.load import load_preset  # noqa: E402
from ernie_compile.compiler.options import CompileOptions  # noqa: E402
from ernie_compile.compiler.pipeline import compile_model  # noqa: E402
from common import decode_bytes, kv_bytes_per_token, llamacpp_peer, print_table, run_artifact  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ernie-4.5-0.3b")
    ap.add_argument("--configs", nargs="+", default=["float", "8:32", "4:32", "4:64", "4:128"],
                    help="float or BITS:GROUP[:ACT] (ACT: --act-bits 8 or none; default auto)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llamacpp", action="store_true", help="also run llama.cpp Q4_0 on the same weights")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    prompt = [int(x) for x in np.random.default_rng(0).integers(3, 1000, args.prompt)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in args.configs:
            bits, group, act = (None, 32, "auto") if cfg == "float" else (cfg.split(":") + ["auto"])[:3]
            out = Path(tmp) / cfg.replace(":", "_")
            report = compile_model(CompileOptions(output=out, model=args.preset, max_seq_len=512, bits=bits,
                                                  group_size=int(group), act_bits=act), log=lambda *_: None)
            manifest = json.loads((out / "manifest.json").read_text())
            nbytes = decode_bytes(out, args.prompt + args.decode / 2)  # weights + KV at the mean context
            speed = run_artifact(out, prompt, args.decode, args.reps, nbytes)
            acc = manifest.get("accuracy") or {}
            rows.append({"config": cfg, "act_bits": manifest["options"]["act_bits"], "reads_MiB": nbytes / 2**20,
                         **speed,
                         "compile_s": sum(report["stages"].values()),
                         "kl_mean": acc.get("kl_mean"), "top1": acc.get("top1_agreement")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        model = load_preset(args.preset).model
        p = llamacpp_peer(model, Path(tmp) / "hf", args.prompt, args.decode) if args.llamacpp else None
        if p:  # its file, and its f16 KV cache at the mean context
            reads = p["size_bytes"] + kv_bytes_per_token(model.config.to_dict(), 2) * (args.prompt + args.decode / 2)
            rows.append({"config": "llama.cpp Q4_0", "reads_MiB": reads / 2**20,
                         "prefill_tok_s": p["prefill_tok_s_median"], "decode_tok_s": p["decode_tok_s_median"],
                         "read_GBps": p["read_GBps"], "bound_tok_s": p["read_GBps"] * 1e9 / reads})
            rows[-1]["of_bound"] = rows[-1]["decode_tok_s"] / rows[-1]["bound_tok_s"]
    print(f"\n{args.preset}, 2 threads; prompt {args.prompt}, decode {args.decode}, medians of {args.reps}; "
          f"read_GBps: measured before and after each decode (bench/membw.py)\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
