"""The int8-activation MoE grouped GEMM (targets/cpu_moe.py) against numpy.

Weights: a random stacked [E, N, K] weight quantized by ernie_compile/quant.py into the vnni16 layout,
dequantized for the reference. Activations: the reference quantizes them as the kernel does (int8 per
block of 32, dx = max|x| / 127 in float32, round half to even), so kernel and reference differ only
in summation order (1e-5 of max|y|); a looser check against the float activations bounds what the
quantization costs. The kernel's loops run with each int8 dot this CPU has (cpu_vnni.DOTS) and the
portable one (same integers, plain vector arithmetic); the vpdpbusd build is checked in assembly.
"""
import re

import numpy as np
import pytest
import tvm

from ernie_compile.quant import QuantSpec, dequantize, quantize
from ernie_compile.targets.cpu import CpuTarget
from ernie_compile.targets.cpu_moe import TUNABLE, group_gemm_q_vnni, route_rows

HOST = CpuTarget.from_spec(None)
# the portable dot everywhere; "vnni" and "avx2" where this CPU has them (a VNNI CPU has AVX2 too)
DOTS = ["portable"] + {"vnni": ["vnni", "avx2"], "avx2": ["avx2"], None: []}[HOST.int8_dot]
VNNI_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})  # any CPU with AVX-512 VNNI
FLOAT_ACT_TOL = 2e-2  # of max|y|: the int8 activations' cost on Gaussian x (seen: ~5e-3 at 4 and 8 bits)


def _build(prim, target=None):
    return tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}),
                       target=target or HOST.tvm)


def _run(lib, x, indptr, parts, index_dtype):
    m, n = x.shape[0], parts["qweight"].shape[1]
    expert_ids = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(indptr.astype(index_dtype)),
                tvm.runtime.tensor(expert_ids.astype(index_dtype)),
                *[tvm.runtime.tensor(parts[p]) for p in ("qweight", "qscale", "qmin")], y)
    return y.numpy()


def quantize_rows(x: np.ndarray) -> np.ndarray:
    """x̃: x [M, K] through int8 per block of 32 with the kernel's float32 operations."""
    xb = x.reshape(x.shape[0], -1, 32)
    dx = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    q = np.where(dx > 0, np.rint(xb / np.where(dx > 0, dx, 1)), 0)
    return (q * dx).reshape(x.shape)


def reference(x, indptr, wd):
    """y[i] = x[i] · wd[e]ᵀ for the rows of expert e, in float64."""
    y = np.zeros((x.shape[0], wd.shape[1]))
    for e in range(len(indptr) - 1):
        lo, hi = indptr[e], indptr[e + 1]
        y[lo:hi] = x[lo:hi].astype(np.float64) @ wd[e].T.astype(np.float64)
    return y


def _weights(num_experts, n, k, spec, rng):
    parts = quantize(rng.standard_normal((num_experts, n, k)).astype(np.float32), spec)
    return parts, dequantize(parts, spec, k)


def _check(got, x, indptr, wd):
    ref = reference(quantize_rows(x), indptr, wd)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-5 * scale
    # against float x, rows without an outlier (one squeezes its block's others into few levels)
    plain = np.abs(x).max(1) < 10
    float_err = np.abs(got - reference(x, indptr, wd))[plain].max()
    assert 1e-4 * scale < float_err <= FLOAT_ACT_TOL * scale  # it did quantize x, and not badly
    return float_err / scale


# decode: k = 6 distinct experts of 8, one row each; prefill: uneven segments, some empty, with
# segments of 11 (a block of 8 (or 4s) + 2 + 1), 7 (4 + 2 + 1), 4, 3, 1 rows
DECODE = np.array([0, 1, 2, 2, 3, 4, 4, 5, 6])
PREFILL = np.concatenate([[0], np.cumsum([0, 11, 3, 0, 1, 7, 0, 4])])


@pytest.mark.parametrize("int8_dot", DOTS)
@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (8, 32, True), (4, 64, False), (8, 64, False),
                                                (2, 32, True), (3, 64, False)])
def test_group_gemm_q_vnni_matches_numpy(bits, group, symmetric, index_dtype, int8_dot):
    if int8_dot == "avx2" and bits == 8:
        pytest.skip("the avx2 dot is exact for codes of up to 4 bits (and refuses 8)")
    num_experts, n, k = 8, 48, 192  # 3 tiles: the chunk falls back to 3
    spec = QuantSpec(bits, group, symmetric, "float16", "vnni16")
    rng = np.random.default_rng(bits * 100 + group)
    parts, wd = _weights(num_experts, n, k, spec, rng)
    lib = _build(group_gemm_q_vnni(num_experts, n, k, spec, index_dtype=index_dtype, int8_dot=int8_dot))
    for indptr in (DECODE, PREFILL):
        x = rng.standard_normal((int(indptr[-1]), k)).astype(np.float32)
        x[0, 32:64] = 0  # an all-zero block: dx = 0
        x[-1, 5] = 40.0  # an outlier: its block's other values round to few levels
        _check(_run(lib, x, indptr, parts, index_dtype), x, indptr, wd)


@pytest.mark.parametrize("tokens,chunk", [(1, 8), (3, 2), (8, 1), (6, 16)])
def test_token_blocks_and_chunks(tokens, chunk):
    """Every row-block cascade (tokens, then 4, 2, 1) and chunk (tiles per work item) gives the same y."""
    num_experts, n, k = 8, 64, 96
    spec = QuantSpec(4, 32, True, "float16", "vnni16")
    rng = np.random.default_rng(tokens)
    parts, wd = _weights(num_experts, n, k, spec, rng)
    lib = _build(group_gemm_q_vnni(num_experts, n, k, spec, tokens=tokens, chunk=chunk, int8_dot="portable"))
    indptr = route_rows(40, 3, num_experts, rng)
    x = rng.standard_normal((int(indptr[-1]), k)).astype(np.float32)
    _check(_run(lib, x, indptr, parts, "int64"), x, indptr, wd)


def test_only_experts_with_rows_are_read():
    """NaN scales in every expert without rows: a kernel that read them would return NaN."""
    num_experts, n, k = 8, 32, 64
    spec = QuantSpec(4, 32, True, "float16", "vnni16")
    rng = np.random.default_rng(1)
    parts, wd = _weights(num_experts, n, k, spec, rng)
    empty = np.diff(PREFILL) == 0
    parts["qscale"][empty] = np.nan
    parts["qmin"][empty] = np.nan
    lib = _build(group_gemm_q_vnni(num_experts, n, k, spec, prefetch=0, int8_dot="portable"))
    x = rng.standard_normal((int(PREFILL[-1]), k)).astype(np.float32)
    _check(_run(lib, x, PREFILL, parts, "int64"), x, PREFILL, np.where(empty[:, None, None], 0, wd))


@pytest.mark.parametrize("bits", [4, 8])
def test_vnni_build_uses_vpdpbusd(bits):
    """The vnni kernel builds for an AVX-512 VNNI CPU (wherever the tests run) and its dot products
    are vpdpbusd on 512-bit registers."""
    spec = QuantSpec(bits, 32, True, "float16", "vnni16")
    asm = _build(group_gemm_q_vnni(8, 64, 256, spec), VNNI_TARGET).mod.inspect_source("asm")
    assert re.search(r"vpdpbusd\s[^\n]*%zmm", asm)


def test_tunable_entry_builds_and_feeds_the_kernel():
    """cpu_moe.TUNABLE as compiler/tuning.py uses it: build(key, params) and inputs(key, m, rng); and
    one real measurement on this host, as a compile's --tune makes it (the key's int8 dot is the
    target's: a VNNI kernel measured on an AVX2 host had aborted LLVM)."""
    from ernie_compile.compiler.tuning import measure

    tunable = TUNABLE["moe_group_gemm_q_vnni"]
    spec = QuantSpec(4, 32, True, "float16", "vnni16")
    key = {"target": str(HOST.tvm), "kernel": "moe_group_gemm_q_vnni", "shape": [8, 32, 64, 2],
           "dtype": "float32", "quant": spec.as_dict(), "int8_dot": "portable"}
    assert tunable["valid"](key, tunable["default"])
    lib = _build(tunable["build"](key, tunable["default"]))
    args = tunable["inputs"](key, 5, np.random.default_rng(0))
    assert args[0].shape == (10, 64) and args[1][-1] == 10
    lib["main"](*[tvm.runtime.tensor(a) for a in args])
    if HOST.int8_dot:
        assert measure(tunable, {**key, "int8_dot": HOST.int8_dot}, tunable["default"]) > 0
