"""On a machine with an NVIDIA GPU: CUDA artifacts against transformers eager, then their speed.

    bash bench/device_check.sh                     # parity + benchmark, arch detected from the GPU
    python bench/device_check.py --compile-only    # the compile half, anywhere nvcc exists

Parity (prints PASS/FAIL per case, exit 1 on any FAIL): the embedded default at float32, float16 and
4 bits, and a small random MoE at 4 bits; prefill logits within the stated tolerance of transformers
eager (on the GPU when torch sees one, else on the CPU) and 16 greedy tokens identical — the eager
reference of a quantized artifact is transformers on the dequantized weights; and the server's batch
step (ragged prompts prefilled together, then decode steps) within the same tolerance of each
sequence run alone.
Speed: the 0.3b preset (real shapes, random weights) at float16 and 4 bits, prefill of 128 tokens
and 64 decode steps, medians of --reps, next to transformers eager on the same GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
from conftest import MOE_CONFIGS, PROMPT_IDS, batch_vs_single, eager_greedy, make_checkpoint, rel_error  # noqa: E402
from common import print_table  # noqa: E402
from test_quantize import fake_quant  # noqa: E402

from ernie_compile.compiler.options import CompileOptions  # noqa: E402
from ernie_compile.compiler.pipeline import compile_model  # noqa: E402
from ernie_compile.quant import QuantPolicy  # noqa: E402

# name: (model: None = embedded default, "moe" = a small random MoE), dtype, bits, logits tolerance
CASES = {"tiny-fp32": (None, "float32", None, 1e-3), "tiny-fp16": (None, "float16", None, 2e-2),
         "tiny-q4": (None, "float16", "4", 2e-2), "moe-q4": ("moe", "float16", "4", 2e-2)}


def detect_arch() -> str:
    import tvm

    dev = tvm.runtime.device("cuda", 0)
    if not dev.exist:
        sys.exit("device_check: no CUDA device visible to TVM")
    return "sm_" + dev.compute_version.replace(".", "")


def eager_reference(folder, dtype: str, bits: str | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), attn_implementation="eager")
    model.generation_config.eos_token_id = None
    if bits:
        model = fake_quant(model, QuantPolicy.parse(bits))
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def parity(root: Path, arch: str, compile_only: bool) -> bool:
    from ernie_compile.compiler.load import load_preset
    from ernie_compile.runtime import Session

    ckpt = {None: root / "tiny-ckpt", "moe": root / "moe-ckpt"}
    load_preset("ernie-tiny", 0).model.save_pretrained(ckpt[None])
    (ckpt[None] / "tokenizer.model").write_bytes((ROOT / "ernie_compile/assets/tokenizer.model").read_bytes())
    make_checkpoint(ckpt["moe"], MOE_CONFIGS["e8-k2-s1-i2-st1"], seed=2, moe=True)
    ok = True
    for name, (model, dtype, bits, tol) in CASES.items():
        out = root / name
        compile_model(CompileOptions(output=out, model=str(ckpt[model]), target=f"cuda:{arch}", dtype=dtype,
                                     bits=bits, max_seq_len=256), log=lambda *_: None)
        if compile_only:
            print(f"built {name}: {out}")
            continue
        ref = eager_reference(ckpt[model], dtype, bits)
        session = Session(out)
        with torch.no_grad():
            err = rel_error(session.forward(PROMPT_IDS), ref(torch.tensor([PROMPT_IDS], device=ref.device)).logits[0, -1].cpu())
        want = eager_greedy(ref.cpu() if ref.device.type != "cpu" else ref, PROMPT_IDS, 16)
        same = session.generate(PROMPT_IDS, 16, stop_at_eos=False).tokens == want
        # the server's batch step on the GPU: ragged prompts together, then decode, against each alone
        batch_err = batch_vs_single(out)
        good = err <= tol and same and batch_err <= tol
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {name}: logits rel. error {err:.2e} (tolerance {tol}), "
              f"16 greedy tokens {'identical' if same else 'DIFFER'}, batch step vs single sequences "
              f"{batch_err:.2e}")
    return ok


def speed(root: Path, arch: str, reps: int) -> list[dict]:
    from ernie_compile.compiler.load import load_preset
    from ernie_compile.runtime import Session

    prompt = [(i * 7919) % 100000 + 3 for i in range(128)]
    rows = []
    for label, bits in (("float16", None), ("4-bit g32", "4")):
        out = root / f"03b-{label}"
        report = compile_model(CompileOptions(output=out, model="ernie-4.5-0.3b", target=f"cuda:{arch}",
                                              bits=bits, max_seq_len=512), log=lambda *_: None)
        session = Session(out)
        runs = [session.generate(prompt, 65, stop_at_eos=False) for _ in range(reps + 1)][1:]
        rows.append({"config": f"ours cuda {label}", "compile s": round(sum(report["stages"].values()), 1),
                     "prefill tok/s": round(statistics.median(r.prefill_tok_s for r in runs), 1),
                     "decode tok/s": round(statistics.median(r.decode_tok_s for r in runs), 1),
                     "first token ms": round(1000 * statistics.median(r.prefill_seconds for r in runs), 1)})
    if torch.cuda.is_available():
        from transformers import DynamicCache

        model = load_preset("ernie-4.5-0.3b", 0).model.to("cuda", torch.float16).eval()
        pre, dec = [], []
        with torch.no_grad():
            for _ in range(reps + 1):
                cache = DynamicCache(config=model.config)
                torch.cuda.synchronize()
                t = time.perf_counter()
                tok = model(torch.tensor([prompt], device="cuda"), past_key_values=cache, use_cache=True,
                            logits_to_keep=1).logits[0, -1].argmax().view(1, 1)
                torch.cuda.synchronize()
                pre.append(time.perf_counter() - t)
                t = time.perf_counter()
                for _ in range(64):
                    tok = model(tok, past_key_values=cache, use_cache=True).logits[0, -1].argmax().view(1, 1)
                torch.cuda.synchronize()
                dec.append(64 / (time.perf_counter() - t))
        rows.append({"config": "transformers eager cuda float16", "compile s": "–",
                     "prefill tok/s": round(len(prompt) / statistics.median(pre[1:]), 1),
                     "decode tok/s": round(statistics.median(dec[1:]), 1),
                     "first token ms": round(1000 * statistics.median(pre[1:]), 1)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda-arch", help="default: the visible GPU's")
    ap.add_argument("--compile-only", action="store_true", help="build the parity artifacts, run nothing")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the benchmark rows here")
    args = ap.parse_args()
    arch = args.cuda_arch or ("sm_80" if args.compile_only else detect_arch())
    with tempfile.TemporaryDirectory() as tmp:
        ok = parity(Path(tmp), arch, args.compile_only)
        if args.compile_only:
            return 0
        rows = speed(Path(tmp), arch, args.reps)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"arch": arch, "parity_ok": ok, "rows": rows}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
