"""WebGPU / Vulkan artifacts on this machine's software GPUs against the CPU artifact, same weights.

    python bench/bench_webgpu.py                                  # embedded default, float32
    python bench/bench_webgpu.py --preset ernie-4.5-0.3b --bits 4 --prompt 32 --decode 16
    python bench/bench_webgpu.py --browser                        # + the page in headless Chromium

Rows: ours --target cpu, --target webgpu run by our Python runtime over wgpu (lavapipe: Vulkan on the
CPU), and with --browser the same artifact's page in headless Chromium (SwiftShader WebGPU). All of it
runs on this CPU, so the ratio says what a software GPU costs against our CPU kernels — nothing about
real GPUs. Medians of --reps after a warm-up, one fresh process per row.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
from common import print_table, run_artifact  # noqa: E402

from ernie_compile.compiler.options import CompileOptions  # noqa: E402
from ernie_compile.compiler.pipeline import compile_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ernie-tiny")
    ap.add_argument("--bits", default=None, help="weight bits (default: float)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--browser", action="store_true", help="also run the page in headless Chromium")
    args = ap.parse_args()
    prompt = [(17 * i + 3) % 1000 + 1 for i in range(args.prompt)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in ("cpu", "webgpu"):
            out = Path(tmp) / target
            report = compile_model(CompileOptions(output=out, model=args.preset, target=target, bits=args.bits,
                                                  max_seq_len=512), log=lambda *_: None)
            speed = run_artifact(out, prompt, args.decode, args.reps)
            rows.append({"config": f"ours --target {target}" + (f" --bits {args.bits}" if args.bits else ""),
                         "runs on": "CPU kernels" if target == "cpu" else "wgpu → lavapipe (Vulkan on the CPU)",
                         "compile s": sum(v for k, v in report["stages"].items() if k != "accuracy"),
                         "artifact MiB": report["artifact_bytes"] / 2**20,
                         "prefill tok/s": speed["prefill_tok_s"], "decode tok/s": speed["decode_tok_s"]})
        if args.browser:
            import browser

            runs = [browser.run_page(Path(tmp) / "webgpu", {"ids": ",".join(map(str, prompt)), "n": args.decode + 1},
                                     timeout=600) for _ in range(args.reps)]
            if any("error" in r for r in runs):
                raise SystemExit(f"browser run failed: {runs[0].get('error')}")
            rows.append({"config": "ours --target webgpu, index.html", "runs on": f"Chromium → {runs[0]['adapter']}",
                         "prefill tok/s": statistics.median(1000 * args.prompt / r["prefill_ms"] for r in runs),
                         "decode tok/s": statistics.median(r["decode_tok_s"] for r in runs)})
    base = rows[0]["decode tok/s"]
    for r in rows:
        r["decode vs cpu"] = r["decode tok/s"] / base
    print(f"preset {args.preset}, prompt {args.prompt}, decode {args.decode}, medians of {args.reps}")
    print_table(rows)


if __name__ == "__main__":
    main()
