"""The MoE grouped GEMM kernels alone, on the ERNIE-4.5-21B-A3B expert shapes: the int8-activation
kernel (targets/cpu_moe.group_gemm_q_vnni, vnni16 weights) against the float-activation one
(targets/cpu_kernels.group_gemm_q, lanes16 weights: what --bits gives the experts today).

    python bench/bench_moe_kernels.py                   # 4-bit, gate_up and down, decode and prefill
    python bench/bench_moe_kernels.py --bits 4 8 --reps 7
    python bench/bench_moe_kernels.py --int8-dot avx2   # the int8 kernel with the AVX2 dot (CPUs without VNNI)

Shapes: E = 64 experts, top-6; gate_up N = 3072 (2·1536), K = 2560; down N = 2560, K = 1536.
decode: M = 6 rows, 6 distinct experts; prefill: T = 128 tokens → M = 768 rows spread over the experts
by a skewed random router (cpu_moe.route_rows). Weights are random codes and scales (speed does not
depend on their values), 6 expert sets per decode round in rotation so that a call streams its
experts from DRAM, not from the last call's cache.

Columns: µs per call (median of --reps rounds), MB of expert weights the call reads (codes, and the
scales and offsets it loads: the symmetric int8 kernel skips the offsets), GB/s of those bytes, and
for decode the read bandwidth of a 2-thread streaming probe (bench/membw.py) right before and after
the round and the kernel's share of it: this machine's bandwidth swings 30-70 GB/s, so each decode
round is set against its own probes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import tvm  # noqa: E402
from common import print_table  # noqa: E402
from membw import ReadBandwidth  # noqa: E402

from ernie_compile.quant import QuantSpec  # noqa: E402
from ernie_compile.runtime.tvm_engine import pin_thread_count  # noqa: E402
from ernie_compile.targets import cpu_kernels, cpu_moe, cpu_vnni  # noqa: E402
from ernie_compile.targets.cpu import CpuTarget  # noqa: E402

EXPERTS, TOP_K, HIDDEN, INTER = 64, 6, 2560, 1536
SHAPES = {"gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}  # N, K


def weights(n: int, k: int, spec: QuantSpec, rng) -> list[np.ndarray]:
    groups = k // spec.group_size
    scale = (rng.random((EXPERTS, n, groups)) * 0.01 + 0.001).astype(spec.scale_dtype)
    return [rng.integers(0, 2**32, (EXPERTS, n, spec.words(k)), dtype=np.uint32), scale,
            (scale.astype(np.float32) * -(1 << (spec.bits - 1))).astype(spec.scale_dtype)]


def bytes_read(indptr: np.ndarray, n: int, k: int, spec: QuantSpec, offsets: bool) -> int:
    used = int((np.diff(indptr) > 0).sum())
    scale_bytes = np.dtype(spec.scale_dtype).itemsize * (2 if offsets else 1)
    return used * n * (spec.words(k) * 4 + k // spec.group_size * scale_bytes)


def decode_sets(rng, rounds: int) -> list[np.ndarray]:
    """indptrs of `rounds` disjoint sets of TOP_K experts, one row each."""
    order = rng.permutation(EXPERTS)
    sets = []
    for r in range(rounds):
        hit = np.zeros(EXPERTS, np.int64)
        hit[order[r * TOP_K:(r + 1) * TOP_K]] = 1
        sets.append(np.concatenate([[0], np.cumsum(hit)]))
    return sets


def time_round(f, calls: list[list]) -> float:
    """Seconds per call over one round (every call once)."""
    start = time.perf_counter()
    for args in calls:
        f(*args)
    return (time.perf_counter() - start) / len(calls)


def build(prim, target):
    return tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}), target=target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4], choices=[4, 8])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--prompt", type=int, default=128, help="prefill tokens T (M = T·6 rows)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--int8-dot", choices=list(cpu_vnni.DOTS),
                    help="default: this CPU's (CpuTarget.int8_dot) where exact for the bits, else portable")
    ap.add_argument("--no-float", action="store_true", help="skip the float-activation kernel")
    ap.add_argument("--tokens", type=int, default=cpu_moe.TOKENS)
    ap.add_argument("--prefetch", type=int, default=cpu_moe.PREFETCH)
    ap.add_argument("--chunk", type=int, default=cpu_moe.CHUNK)
    args = ap.parse_args()
    pin_thread_count(tvm)  # one thread per core, as ernie-run runs (runtime/tvm_engine.py)
    host = CpuTarget.from_spec(None)
    target = host.tvm
    rng = np.random.default_rng(0)
    probe = ReadBandwidth()
    sets = decode_sets(rng, EXPERTS // TOP_K)
    prefill = cpu_moe.route_rows(args.prompt, TOP_K, EXPERTS, rng)
    rows = []
    for bits in args.bits:
        for shape in args.shapes:
            n, k = SHAPES[shape]
            dot = args.int8_dot or (host.int8_dot if bits in host.int8_weight_bits else "portable")
            kernels = [(f"int8 act ({dot}), vnni16", QuantSpec(bits, 32, True, "float16", "vnni16"),
                        lambda s: cpu_moe.group_gemm_q_vnni(EXPERTS, n, k, s, tokens=args.tokens, prefetch=args.prefetch,
                                                            chunk=args.chunk, int8_dot=dot), False)]
            if not args.no_float:
                kernels.append(("float act, lanes16 (cpu_kernels)", QuantSpec(bits, 32, True, "float16", "lanes16"),
                                lambda s: cpu_kernels.group_gemm_q(EXPERTS, n, k, s), True))
            for label, spec, make, offsets in kernels:
                lib = build(make(spec), target)
                w = [tvm.runtime.tensor(a) for a in weights(n, k, spec, rng)]
                for phase, indptrs in (("decode", sets), ("prefill", [prefill])):
                    calls = []
                    for indptr in indptrs:
                        m = int(indptr[-1])
                        calls.append([tvm.runtime.tensor(rng.standard_normal((m, k)).astype(np.float32)),
                                      tvm.runtime.tensor(indptr.astype(np.int64)),
                                      tvm.runtime.tensor(np.repeat(np.arange(EXPERTS), np.diff(indptr))), *w,
                                      tvm.runtime.tensor(np.zeros((m, n), np.float32))])
                    nbytes = statistics.mean(bytes_read(p, n, k, spec, offsets) for p in indptrs)
                    reps = args.reps if phase == "decode" else max(2, args.reps // 2)
                    time_round(lib["main"], calls)  # warm-up
                    secs, probes, shares = [], [], []
                    for _ in range(reps):  # a probe before and after every round
                        before = probe.probe()
                        t = time_round(lib["main"], calls)
                        after = probe.probe()
                        secs.append(t)
                        probes.append((before + after) / 2)
                        shares.append(nbytes / t / 1e9 / probes[-1])
                    t = statistics.median(secs)
                    row = {"bits": bits, "proj": f"{shape} {n}x{k}", "phase": f"{phase} M={int(indptrs[0][-1])}",
                           "kernel": label, "us/call": t * 1e6, "MB read": nbytes / 1e6, "GB/s": nbytes / t / 1e9,
                           "probe GB/s": statistics.median(probes)}
                    if phase == "decode":
                        row["of probe"] = statistics.median(shares)
                    rows.append(row)
                    print(rows[-1], file=sys.stderr, flush=True)
    print(f"\nMoE grouped GEMMs, 21B-A3B shapes (E={EXPERTS}, top-{TOP_K}), {os.environ.get('TVM_NUM_THREADS', '?')} threads, "
          f"medians of {args.reps} decode rounds ({len(sets)} expert sets each) / {max(2, args.reps // 2)} prefills; "
          f"int8 kernel: tokens={args.tokens} prefetch={args.prefetch} chunk={args.chunk}\n")
    print_table(rows)


if __name__ == "__main__":
    main()
