"""Hand-scheduled TIR kernels for the CPU target (LLVM): linear layers, quantized linears and
embedding lookups, and the MoE grouped GEMMs (float and quantized).

TVM's default CPU pipeline leaves legalized matmuls unscheduled: one thread, scalar loops (a 0.3B
prefill of 32 tokens took ~50 s). These kernels parallelise over output rows and keep vector
accumulators over the reduction axis, so LLVM emits wide FMAs (AVX-512 on this machine).

Small scratch buffers (accumulators, softmax state) are declared in the default scope, not "local":
on the CPU, TVM 0.27 turns every "local" buffer, and every other one of 1 KiB or more, into a
TVMBackendAllocWorkspace/FreeWorkspace pair where it is declared (per task of a parallel loop, per
row…), ~37,000 pairs per 0.3b decode step; one under 1 KiB is a stack slot, which LLVM keeps in
registers. The `disable_lower_builtin` annotation that would also do it is dropped in 0.27.
"""
from __future__ import annotations

import math

import numpy as np
from tvm.script import tirx as T

from .cpu_moe import TUNABLE as MOE_TUNABLE, group_gemm_q_vnni

LOG2E = math.log2(math.e)
# 2**f on |f| <= 1/2: 1 + f·P(f), P's coefficients highest power first (Cephes' exp2f)
EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
             2.402264791363012e-1, 6.931472028550421e-1)

def exp2(x):
    """2**x in float32 without libm, which LLVM would call lane by lane: 2**n from the exponent bits
    (n = x rounded) times the polynomial for 2**(x - n). Relative error ~2e-7; 0 below -126 (the
    attention scores' padding is -5e4), 2**127 above 127."""
    xc = T.min(T.max(x, T.float32(-126)), T.float32(127))
    n = T.floor(xc + T.float32(0.5))
    f = xc - n
    p = T.float32(EXP2_POLY[0])
    for c in EXP2_POLY[1:]:
        p = p * f + T.float32(c)
    two_n = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return T.if_then_else(x < T.float32(-126), T.float32(0), (p * f + T.float32(1)) * two_n)

def vector_width(k: int) -> int:
    """Lanes of the accumulators: the widest of 16/8/4/1 that divides the reduction length."""
    return next(v for v in (16, 8, 4, 1) if k % v == 0)

def _gemm_columns(k: int, jb: int, dtype: str, ib: int = 4):
    """A TIR macro: y[:, col:col+jb] = x[M, K] · w[wrow:wrow+jb, K]ᵀ. Blocks of ib rows of x × jb weight
    rows share their loads (ib×jb 16-lane accumulators); leftover rows (and decode) go one at a time."""
    vw = vector_width(k)
    kv = k // vw

    @T.macro
    def gemm_columns(x, w, wrow, y, col, m):
        for io in range(m // ib):
            acc = T.decl_buffer((ib, jb, vw), dtype, scope="local")
            for ii, jj in T.grid(ib, jb):
                for v in T.vectorized(vw):
                    acc[ii, jj, v] = T.cast(0, dtype)
            for ko in range(kv):
                for ii in T.unroll(ib):
                    for jj in T.unroll(jb):
                        for v in T.vectorized(vw):
                            acc[ii, jj, v] = acc[ii, jj, v] + (x[io * ib + ii, ko * vw + v]
                                                               * w[wrow + jj, ko * vw + v])
            for ii, jj in T.grid(ib, jb):
                y[io * ib + ii, col + jj] = T.cast(0, dtype)
                for v in range(vw):
                    y[io * ib + ii, col + jj] = y[io * ib + ii, col + jj] + acc[ii, jj, v]
        for i in range(m - m % ib, m):
            acc1 = T.decl_buffer((jb, vw), dtype, scope="local")
            for jj in range(jb):
                for v in T.vectorized(vw):
                    acc1[jj, v] = T.cast(0, dtype)
            for ko in range(kv):
                for jj in T.unroll(jb):
                    for v in T.vectorized(vw):
                        acc1[jj, v] = acc1[jj, v] + x[i, ko * vw + v] * w[wrow + jj, ko * vw + v]
            for jj in range(jb):
                y[i, col + jj] = T.cast(0, dtype)
                for v in range(vw):
                    y[i, col + jj] = y[i, col + jj] + acc1[jj, v]

    return gemm_columns

def linear(n: int, k: int, dtype: str = "float32", ib: int = 4, jb: int = 4):
    """y[M, N] = x[M, K] · w[N, K]ᵀ, M symbolic, parallel over blocks of jb output columns
    (_gemm_columns, ib rows of x at a time); decode (M = 1) streams each weight row once.
    ib and jb are schedule parameters (TUNABLE); jb falls back to 1 where it does not divide N."""
    jb = jb if n % jb == 0 else 1
    gemm_columns = _gemm_columns(k, jb, dtype, ib)

    @T.prim_func(private=True)
    def cpu_linear(var_x: T.handle, w: T.Buffer((n, k), dtype), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})  # opaque: never fused into
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), dtype)
        y = T.match_buffer(var_y, (m, n), dtype)
        for jo in T.parallel(n // jb):
            gemm_columns(x, w, jo * jb, y, jo * jb, m)

    return cpu_linear

def _code(qw, row, word, v, bits: int, dtype: str):
    """The v-th code of packed word qw[*row, word], as a float. `row` indexes all leading axes."""
    return T.cast(T.bitwise_and(T.shift_right(qw[(*_tuple(row), word)], T.cast(v * bits, "uint32")),
                                T.uint32((1 << bits) - 1)), dtype)

def _tuple(row):
    return row if isinstance(row, tuple) else (row,)

def _lanes16(qw, qs, qm, row, b, p, v, spec, dtype: str):
    """Element b·16P + p·16 + v of a "lanes16" row (ernie_compile/quant.py), dequantized: a 16-lane
    load of word block b, one shift by p, the group's scale and offset broadcast."""
    per, group = spec.per_word, spec.group_size
    g = (b * 16 * per + p * 16) // group
    return (_code(qw, row, b * 16 + v, p, spec.bits, dtype) * T.cast(qs[(*_tuple(row), g)], dtype)
            + T.cast(qm[(*_tuple(row), g)], dtype))

def _dequant_macros(k: int, spec, dtype: str):
    """The two ways our kernels read a quantized weight row `row` (an index of every leading axis):
    `dot` dequantizes a lanes16 row in registers straight into y[i, j] = x[i, :] · W[row], and
    `to_rows` dequantizes any layout into rows[r, :] once, for a float GEMM tile to reuse."""
    bits, per, group = spec.bits, spec.per_word, spec.group_size
    words, groups = spec.words(k), k // group
    aligned = group % per == 0

    @T.macro
    def dot(x, i, qw, qs, qm, row, y, j):
        acc = T.decl_buffer((16,), dtype)
        for v in T.vectorized(16):
            acc[v] = T.cast(0, dtype)
        for b in range(k // (16 * per)):
            for p in T.unroll(per):
                for v in T.vectorized(16):
                    acc[v] = acc[v] + x[i, b * 16 * per + p * 16 + v] * _lanes16(qw, qs, qm, row, b, p, v, spec, dtype)
        y[i, j] = T.cast(0, dtype)
        for v in range(16):
            y[i, j] = y[i, j] + acc[v]

    @T.macro
    def to_rows(qw, qs, qm, row, rows, r):
        if spec.layout == "lanes16":
            for b in range(k // (16 * per)):
                for p in T.unroll(per):
                    for v in T.vectorized(16):
                        rows[r, b * 16 * per + p * 16 + v] = _lanes16(qw, qs, qm, row, b, p, v, spec, dtype)
        elif aligned:  # whole words per group
            for g in range(groups):
                for wg in range(group // per):
                    for v in T.vectorized(per):
                        rows[r, g * group + wg * per + v] = (
                            _code(qw, row, g * (group // per) + wg, v, bits, dtype)
                            * T.cast(qs[(*_tuple(row), g)], dtype) + T.cast(qm[(*_tuple(row), g)], dtype))
        else:  # 3-bit: groups straddle words
            for wi in range(words):
                for v in T.vectorized(per):
                    rows[r, wi * per + v] = (
                        _code(qw, row, wi, v, bits, dtype)
                        * T.cast(qs[(*_tuple(row), T.min((wi * per + v) // group, groups - 1))], dtype)
                        + T.cast(qm[(*_tuple(row), T.min((wi * per + v) // group, groups - 1))], dtype))

    return dot, to_rows


def _word_and_slot(c, spec):
    """Where element c of a row lives: (word, slot in the word), per the spec's layout."""
    per = spec.per_word
    if spec.layout == "lanes16":
        block, rest = c // (16 * per), c % (16 * per)
        return block * 16 + rest % 16, rest // 16
    return c // per, c % per

def linear_q(n: int, k: int, spec, dtype: str = "float32", m: int | None = None, int8_dot: str | None = None):
    """y[M, N] = x[M, K] · dequant(W)ᵀ with W stored as packed codes + group scales/offsets
    (ernie_compile/quant.py). "vnni16" weights: int8 activations and the `int8_dot` kind of int8
    dot products (targets/cpu_vnni.py; the target's int8_dot). Decode (M = 1, lanes16) dequantizes
    in registers inside the dot product; otherwise each task dequantizes 4 weight rows into a buffer
    and runs the float GEMM tile (_gemm_columns) over all M rows. No full-precision weight matrix
    exists at any time."""
    if spec.layout == "vnni16":
        from .cpu_vnni import linear_q_vnni

        return linear_q_vnni(n, k, spec, dtype, int8_dot=_needs_dot(int8_dot, "linear_q"))
    per, words, groups, sdt = spec.per_word, spec.words(k), k // spec.group_size, spec.scale_dtype
    lanes16 = spec.layout == "lanes16"
    dot, to_rows = _dequant_macros(k, spec, dtype)
    rows_per_task = next(r for r in (16, 8, 4, 2, 1) if n % r == 0)
    jb = 4 if n % 4 == 0 else 1
    gemm_columns = _gemm_columns(k, jb, dtype)

    def J(jo, jj):  # the weight row; an expression, not a Let (a Let here is reloaded from memory)
        return jo * rows_per_task + jj

    @T.prim_func(private=True)
    def cpu_linear_q(var_x: T.handle, qw: T.Buffer((n, words), "uint32"), qs: T.Buffer((n, groups), sdt),
                     qm: T.Buffer((n, groups), sdt), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})  # opaque: never fused into
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), dtype)
        y = T.match_buffer(var_y, (m, n), dtype)
        if lanes16 and m == 1:  # decode: dequantize in registers, straight into the dot product
            for jo in T.parallel(n // rows_per_task):
                for jj in range(rows_per_task):
                    dot(x, 0, qw, qs, qm, J(jo, jj), y, J(jo, jj))
        else:  # prefill (and row layouts): dequantize jb weight rows once, then the float GEMM tile
            for jo in T.parallel(n // jb):
                rows = T.decl_buffer((jb, words * per), dtype, scope="local")
                for jj in range(jb):
                    to_rows(qw, qs, qm, jo * jb + jj, rows, jj)
                gemm_columns(x, rows, 0, y, jo * jb, m)

    return cpu_linear_q

def _needs_dot(int8_dot: str | None, kernel: str) -> str:
    if int8_dot is None:  # the caller passes the target's int8_dot with every vnni16 spec
        raise ValueError(f"{kernel}: a vnni16 weight needs an int8_dot kind (targets/cpu_vnni.DOTS)")
    return int8_dot

def take_q(vocab: int, dim: int, spec, dtype: str = "float32"):
    """Embedding lookup from a quantized table: out[T, D] = dequant(W[ids[t]])."""
    if spec.layout == "vnni16":
        from .cpu_vnni import take_q_vnni

        return take_q_vnni(vocab, dim, spec)
    bits, group = spec.bits, spec.group_size
    words, groups, sdt = spec.words(dim), dim // spec.group_size, spec.scale_dtype

    @T.prim_func(private=True)
    def cpu_take_q(var_ids: T.handle, qw: T.Buffer((vocab, words), "uint32"), qs: T.Buffer((vocab, groups), sdt),
                   qm: T.Buffer((vocab, groups), sdt), var_out: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})  # opaque: never fused into
        t = T.int64()
        ids = T.match_buffer(var_ids, (t,), "int64")
        out = T.match_buffer(var_out, (t, dim), dtype)
        for i in range(t):
            for c in range(dim):
                out[i, c] = (_code(qw, ids[i], _word_and_slot(c, spec)[0], _word_and_slot(c, spec)[1], bits, dtype)
                             * T.cast(qs[ids[i], c // group], dtype) + T.cast(qm[ids[i], c // group], dtype))

    return cpu_take_q

def group_gemm(num_experts: int, n: int, k: int, dtype: str, index_dtype: str = "int64"):
    """y[i, :] = w[e] @ x[i, :] for the rows i in expert e's segment [indptr[e], indptr[e+1]).

    x [M, K] rows sorted by expert, indptr [E+1], w [E, N, K] → y [M, N]. (The rows' expert ids, the
    GPU kernels' view of the same segments, are passed too and not read here.) Empty segments cost nothing,
    so a step reads only the chosen experts' weights. Parallel over output columns, vector
    accumulators over K (as targets/cpu_kernels.linear).
    """
    vw = vector_width(k)

    @T.prim_func(private=True)
    def moe_group_gemm(var_x: T.handle, indptr: T.Buffer((num_experts + 1,), "int64"), var_expert_ids: T.handle,
                       w: T.Buffer((num_experts, n, k), dtype), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})  # opaque: never fused into
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), dtype)
        y = T.match_buffer(var_y, (m, n), dtype)
        for j in T.parallel(n):  # one parallel region for all experts; empty segments are skipped
            for e in range(num_experts):
                for i in T.serial(indptr[e], indptr[e + 1]):
                    acc = T.decl_buffer((vw,), dtype)
                    for v in T.vectorized(vw):
                        acc[v] = T.cast(0, dtype)
                    for ko in range(k // vw):
                        for v in T.vectorized(vw):
                            acc[v] = acc[v] + x[i, ko * vw + v] * w[e, j, ko * vw + v]
                    y[i, j] = T.cast(0, dtype)
                    for v in range(vw):
                        y[i, j] = y[i, j] + acc[v]

    return moe_group_gemm

def group_gemm_q(num_experts: int, n: int, k: int, spec, dtype: str = "float32", index_dtype: str = "int64",
                 int8_dot: str | None = None, **schedule):
    """group_gemm over quantized expert weights (ernie_compile/quant.py, per expert and row). lanes16
    rows are dequantized in registers inside each row's dot product; other layouts dequantize a
    weight row once into a buffer and reuse it for the expert's rows. Experts with empty segments
    are neither read nor dequantized. "vnni16" weights: int8 activations and `int8_dot` dot products
    (targets/cpu_moe.py, with its `schedule` parameters: TUNABLE), as linear_q."""
    if spec.layout == "vnni16":
        return group_gemm_q_vnni(num_experts, n, k, spec, dtype, index_dtype,
                                 int8_dot=_needs_dot(int8_dot, "group_gemm_q"), **schedule)
    per, words, groups, sdt = spec.per_word, spec.words(k), k // spec.group_size, spec.scale_dtype
    vw = vector_width(k)
    lanes16 = spec.layout == "lanes16"
    dot, to_rows = _dequant_macros(k, spec, dtype)

    @T.prim_func(private=True)
    def moe_group_gemm_q(var_x: T.handle, indptr: T.Buffer((num_experts + 1,), "int64"), var_expert_ids: T.handle,
                         qw: T.Buffer((num_experts, n, words), "uint32"), qs: T.Buffer((num_experts, n, groups), sdt),
                         qm: T.Buffer((num_experts, n, groups), sdt), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})  # opaque: never fused into
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), dtype)
        y = T.match_buffer(var_y, (m, n), dtype)
        if lanes16:  # dequantize in registers straight into each row's dot product (no row buffer)
            for j in T.parallel(n):
                for e in range(num_experts):
                    for i in T.serial(indptr[e], indptr[e + 1]):
                        dot(x, i, qw, qs, qm, (e, j), y, j)
        else:
            for j in T.parallel(n):
                row = T.decl_buffer((1, words * per), dtype, scope="local")
                for e in range(num_experts):
                    if indptr[e + 1] > indptr[e]:
                        to_rows(qw, qs, qm, (e, j), row, 0)
                        for i in T.serial(indptr[e], indptr[e + 1]):
                            acc = T.decl_buffer((vw,), dtype)
                            for v in T.vectorized(vw):
                                acc[v] = T.cast(0, dtype)
                            for ko in range(k // vw):
                                for v in T.vectorized(vw):
                                    acc[v] = acc[v] + x[i, ko * vw + v] * row[0, ko * vw + v]
                            y[i, j] = T.cast(0, dtype)
                            for v in range(vw):
                                y[i, j] = y[i, j] + acc[v]

    return moe_group_gemm_q

def silu_mul(inter: int, dtype: str = "float32"):
    """out[M, I] = silu(h[:, :I]) · h[:, I:], h the gate|up projection (passes/fuse_gated_mlp.py):
    one vectorised kernel with our exp2 where the generic graph had two slices, a sigmoid (libm's
    expf per element) and two products; rows in parallel in prefill."""
    vw = vector_width(inter)

    @T.macro
    def row(h, out, i):
        for c in range(inter // vw):
            for v in T.vectorized(vw):
                out[i, c * vw + v] = T.cast(
                    T.cast(h[i, c * vw + v], "float32")
                    / (T.float32(1) + exp2(T.cast(h[i, c * vw + v], "float32") * T.float32(-LOG2E)))
                    * T.cast(h[i, inter + c * vw + v], "float32"), dtype)

    @T.prim_func(private=True, s_tir=True)
    def cpu_silu_mul(var_h: T.handle, var_out: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        m = T.int64()
        h = T.match_buffer(var_h, (m, 2 * inter), dtype)
        out = T.match_buffer(var_out, (m, inter), dtype)
        with T.sblock("root"):  # Relax's reshape detection (RewriteDataflowReshape) reads a root block
            if m == 1:
                row(h, out, 0)
            else:
                for i in T.parallel(m):
                    row(h, out, i)

    return cpu_silu_mul

def rms_norm(hidden: int, eps: float, dtype: str = "float32", w_dtype: str = "float32"):
    """out[M, C] = w · x · rsqrt(mean(x²) + eps) per row, in float32 (passes/fuse_rms_norm.py): one
    call where the generic graph had six kernels, each a VM call with an output to allocate; the sum
    of squares in 4 accumulator vectors; rows in parallel in prefill."""
    vw = vector_width(hidden)
    chains = next(a for a in (4, 2, 1) if hidden % (vw * a) == 0)

    @T.macro
    def row(x, w, out, i):
        acc = T.decl_buffer((chains, vw), "float32")
        ss = T.decl_buffer((1,), "float32")
        for a in T.unroll(chains):
            for v in T.vectorized(vw):
                acc[a, v] = T.float32(0)
        for c in range(hidden // (vw * chains)):
            for a in T.unroll(chains):
                for v in T.vectorized(vw):
                    acc[a, v] = acc[a, v] + T.cast(x[i, (c * chains + a) * vw + v], "float32") * T.cast(
                        x[i, (c * chains + a) * vw + v], "float32")
        ss[0] = T.float32(0)
        for a in range(chains):
            for v in range(vw):
                ss[0] = ss[0] + acc[a, v]
        ss[0] = T.float32(1) / T.sqrt(ss[0] / T.float32(hidden) + T.float32(eps))
        for c in range(hidden // vw):
            for v in T.vectorized(vw):
                out[i, c * vw + v] = T.cast(w[c * vw + v], dtype) * T.cast(
                    T.cast(x[i, c * vw + v], "float32") * ss[0], dtype)

    @T.prim_func(private=True, s_tir=True)
    def cpu_rms_norm(var_x: T.handle, w: T.Buffer((hidden,), w_dtype), var_out: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        m = T.int64()
        x = T.match_buffer(var_x, (m, hidden), dtype)
        out = T.match_buffer(var_out, (m, hidden), dtype)
        with T.sblock("root"):  # Relax's reshape detection (RewriteDataflowReshape) reads a root block
            if m == 1:
                row(x, w, out, 0)
            else:
                for i in T.parallel(m):
                    row(x, w, out, i)

    return cpu_rms_norm

def full_attention(*args):
    """Non-causal attention for the VL vision tower (targets/cpu_attention.py)."""
    from .cpu_attention import full_attention as kernel

    return kernel(*args)


def kv_cache_overrides(*args) -> dict:
    """The kernels of TVM's paged KV cache to replace (targets/cpu_attention.py, which builds on this
    file's helpers)."""
    from .cpu_attention import kv_cache_overrides as overrides

    return overrides(*args)

def _linear_inputs(key: dict, m: int, rng):
    n, k = key["shape"]
    return [rng.standard_normal((m, k)).astype(key["dtype"]), rng.standard_normal((n, k)).astype(key["dtype"]),
            np.zeros((m, n), key["dtype"])]

# Kernels with schedule parameters (compiler/tuning.py): space, default, validity, build, inputs;
# and the MoE experts' int8 grouped GEMM, whose entry is targets/cpu_moe.py's.
TUNABLE = {
    "linear": {
        "space": {"ib": [2, 4, 6], "jb": [1, 2, 4, 8]},
        "default": {"ib": 4, "jb": 4},
        "valid": lambda key, p: key["shape"][0] % p["jb"] == 0 and p["ib"] * p["jb"] <= 24,  # accumulators in registers
        "build": lambda key, p: linear(*key["shape"], key["dtype"], **p),
        "inputs": _linear_inputs,
    },
    **MOE_TUNABLE,
}
