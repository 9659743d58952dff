"""End-to-end benchmark: compile time per stage, artifact size, decode kernels, prefill/decode tok/s,
against transformers eager on the same weights, the unfused pipeline and the inductor backend
(torch.export + AOTInductor with a static KV cache, our in-house baseline), in one run.

Medians of --reps runs after a warm-up. Prints a markdown table; --json FILE writes the rows.

    python bench/bench_e2e.py                                   # embedded default + the 0.3b preset
    python bench/bench_e2e.py --presets ernie-4.5-21b-a3b --layers 2 --experts 8 64 --variants fused
    python bench/bench_e2e.py --presets ernie-tiny --variants fused inductor
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# What the inductor runtime sets before it imports torch (runtime/inductor_engine.py): this process
# imports torch first, so set it here, for eager too: every row runs under the same OpenMP setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ernie_compile.compiler.load import load_preset  # noqa: E402
from ernie_compile.compiler.options import CompileOptions  # noqa: E402
from ernie_compile.compiler.pipeline import compile_model  # noqa: E402
from ernie_compile.runtime import Session  # noqa: E402
from common import print_table  # noqa: E402  (bench/common.py)

VARIANTS = {"fused": dict(fuse_attention=True), "unfused": dict(fuse_attention=False),
            "inductor": dict(backend="inductor")}


def eager_speed(model, prompt: list[int], decode: int, reps: int) -> tuple[float, float]:
    """transformers eager (sdpa) with its own DynamicCache: prefill tok/s, decode tok/s."""
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


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: all dense weights, the k chosen of E experts."""
    total = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            n = n * model.config.moe_k // model.config.moe_num_experts
        total += n
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["ernie-tiny", "ernie-4.5-0.3b"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--layers", type=int, help="override num_hidden_layers (real shapes, fewer layers)")
    ap.add_argument("--experts", type=int, nargs="+", help="override moe_num_experts (one row each)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=16, help="decode steps per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    prompt = [int(x) for x in np.random.default_rng(0).integers(3, 1000, args.prompt)]
    for preset in args.presets:
        for experts in args.experts or [None]:
            overrides = {}
            if args.layers:
                overrides["num_hidden_layers"] = args.layers
            if experts:
                overrides["moe_num_experts"] = experts
            label = preset + "".join(f" {k}={v}" for k, v in overrides.items())
            eager = (float("nan"), float("nan"))
            if not args.no_eager:
                model = load_preset(preset, overrides=overrides).model
                eager = eager_speed(model, prompt, args.decode, args.reps)
                wbytes = weight_bytes_per_token(model)
                del model
                gc.collect()
            for variant in args.variants:
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "art"
                    report = compile_model(CompileOptions(output=out, model=preset, max_seq_len=args.max_seq_len,
                                                          preset_overrides=tuple(overrides.items()),
                                                          **VARIANTS[variant]), log=lambda *_: None)
                    gc.collect()
                    ours = ours_speed(out, prompt, args.decode, args.reps)
                kernels = report["decode_kernels"] or {}  # TVM only
                row = {"model": label, "variant": variant,
                       **{f"{k}_s": v for k, v in report["stages"].items()},
                       "compile_s": sum(report["stages"].values()),
                       "artifact_MiB": report["artifact_bytes"] / 2**20,
                       "decode_tir_kernels": kernels.get("tir", ""),
                       "decode_builtin_calls": kernels.get("builtin", ""),
                       "prefill_tok_s": ours[0], "decode_tok_s": ours[1], "decode_ms": 1e3 / ours[1],
                       "eager_prefill_tok_s": eager[0], "eager_decode_tok_s": eager[1],
                       "prefill_vs_eager": ours[0] / eager[0], "decode_vs_eager": ours[1] / eager[1]}
                if not args.no_eager:
                    row["weight_MB_per_token"] = wbytes / 1e6
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\nthreads={torch.get_num_threads()} prompt={args.prompt} decode={args.decode} reps={args.reps} "
          f"(medians; fp32)\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
