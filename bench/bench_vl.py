"""The VL model on this machine: compile cost and image encode / prefill / decode speeds.

    python bench/bench_vl.py                                   # VL-28B-A3B real shapes, 2 text layers, 4-bit
    python bench/bench_vl.py --layers 4 --image-size 448 --bits experts=4,attn=4,mlp=4,embed=8,vision=8

Compiles the preset (`--preset-override num_hidden_layers=N`: the vision tower and resampler stay
whole, 32 ViT blocks at 28B-A3B) in a process of its own under /usr/bin/time -v, then a fresh runtime
process (as ernie-run) encodes one random image of --image-size² pixels, prefills a prompt holding it
and --text tokens, and decodes --decode tokens; medians of --reps after a warm-up. Keep it out of CI.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_scale import timed  # noqa: E402
from common import clean_env, print_table  # noqa: E402

RUN = """
import json, statistics, sys, time
import numpy as np
sys.path[:0] = [{root!r}]
from PIL import Image
from ernie_compile.runtime import Session, vision
from ernie_compile.runtime.artifact import load_manifest
from ernie_compile.runtime.tvm_engine import import_runtime_only_tvm
manifest = load_manifest({folder!r})
import_runtime_only_tvm(manifest)
s = Session(manifest)
spec = vision.VisionSpec.from_json(s.vision)
pixels = np.random.default_rng(0).integers(0, 256, ({size}, {size}, 3), dtype=np.uint8)
patches, grid = vision.preprocess(Image.fromarray(pixels), spec)
n = vision.image_token_count(grid, spec.merge_size)
ids = [5, spec.image_start_token_id] + [spec.image_token_id] * n + [spec.image_end_token_id] + list(range(10, 10 + {text}))
enc, pre, dec = [], [], []
for rep in range({reps} + 1):
    t = time.perf_counter()
    s.engine.encode_image(patches, vision.vision_positions(grid, spec.merge_size), spec.merge_size ** 2)
    e = time.perf_counter() - t
    r = s.generate(ids, {decode} + 1, stop_at_eos=False, images=[(patches, grid)])
    if rep:
        enc.append(e); pre.append(len(ids) / (r.prefill_seconds - e)); dec.append(r.decode_tok_s)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"patches": int(patches.shape[0]), "image_tokens": n, "prompt_tokens": len(ids),
                  "encode_s": statistics.median(enc), "prefill_tok_s": statistics.median(pre),
                  "decode_tok_s": statistics.median(dec), "run_peak_rss_GiB": int(hwm) / 2**20}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ernie-4.5-vl-28b-a3b")
    p.add_argument("--layers", type=int, default=2, help="text layers kept (num_hidden_layers)")
    p.add_argument("--bits", default="4")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--text", type=int, default=32, help="text tokens after the image")
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, help="keep the artifact here")
    args = p.parse_args()
    out = args.output or Path(tempfile.mkdtemp(prefix="bench-vl-")) / "a"
    try:
        cmd = [sys.executable, "-m", "ernie_compile.cli", "--model", args.model, "--bits", args.bits,
               "--preset-override", f"num_hidden_layers={args.layers}", "--max-seq-len", "2048", "-o", str(out)]
        proc, seconds, rss = timed(cmd)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit("compile failed")
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**30
        code = RUN.format(root=str(ROOT), folder=str(out), size=args.image_size, text=args.text, reps=args.reps,
                          decode=args.decode)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env())
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        row = {"model": f"{args.model} ({args.layers} text layers)", "bits": args.bits,
               "compile s": round(seconds, 1), "compile peak RSS GiB": round(rss, 2), "artifact GiB": round(size, 2),
               **json.loads(run.stdout.strip().splitlines()[-1])}
        print(json.dumps(row), flush=True)
        print_table([row])
    finally:
        if args.output is None:
            shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
