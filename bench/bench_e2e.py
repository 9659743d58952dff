"""End-to-end baseline: compile time per stage, artifact size, prefill/decode tok/s vs transformers eager.

Same weights, same process, same threads. Medians of --reps runs. Prints a markdown table and, with
--json FILE, writes the rows.

    python bench/bench_e2e.py                              # embedded default + the 0.3b preset
    python bench/bench_e2e.py --presets ernie-4.5-0.3b --prompt 32 --decode 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ernie_compile.compiler.load import load_preset  # noqa: E402
from ernie_compile.compiler.options import CompileOptions  # noqa: E402
from ernie_compile.compiler.pipeline import compile_model  # noqa: E402
from ernie_compile.runtime import Session  # noqa: E402


def eager_speed(model, prompt: list[int], decode: int, reps: int) -> tuple[float, float]:
    """transformers eager (sdpa), with its own DynamicCache: prefill tok/s, decode tok/s."""
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    pre, dec = [], []
    with torch.no_grad():
        for _ in range(reps + 1):
            cache = DynamicCache(config=model.config)
            t = time.perf_counter()
            out = model(torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1)
            t_pre = time.perf_counter() - t
            token = out.logits[0, -1].argmax().view(1, 1)
            t = time.perf_counter()
            for _ in range(decode):
                out = model(token, cache=cache, use_cache=True)
                token = out.logits[0, -1].argmax().view(1, 1)
            pre.append(len(prompt) / t_pre)
            dec.append(decode / (time.perf_counter() - t))
    return statistics.median(pre[1:]), statistics.median(dec[1:])


def ours_speed(folder: Path, prompt: list[int], decode: int, reps: int) -> tuple[float, float]:
    session = Session(folder)
    pre, dec = [], []
    for _ in range(reps + 1):
        r = session.generate(prompt, decode + 1, stop_at_eos=False)
        pre.append(r.prefill_tok_s)
        dec.append(r.decode_tok_s)
    return statistics.median(pre[1:]), statistics.median(dec[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["ernie-tiny", "ernie-4.5-0.3b"])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=16, help="decode steps per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    prompt = [int(x) for x in np.random.default_rng(0).integers(3, 1000, args.prompt)]
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "art"
            report = compile_model(CompileOptions(output=out, model=preset, max_seq_len=args.max_seq_len),
                                   log=lambda *_: None)
            ours = ours_speed(out, prompt, args.decode, args.reps)
        eager = eager_speed(load_preset(preset).model, prompt, args.decode, args.reps)
        rows.append({"preset": preset, **{f"{k}_s": v for k, v in report["stages"].items()},
                     "artifact_MiB": report["artifact_bytes"] / 2**20,
                     "prefill_tok_s": ours[0], "decode_tok_s": ours[1],
                     "eager_prefill_tok_s": eager[0], "eager_decode_tok_s": eager[1],
                     "prefill_vs_eager": ours[0] / eager[0], "decode_vs_eager": ours[1] / eager[1]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    cols = list(rows[0])
    print(f"\nthreads={torch.get_num_threads()} prompt={args.prompt} decode={args.decode} reps={args.reps} (medians)\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
