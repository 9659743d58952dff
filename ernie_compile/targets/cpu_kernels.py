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

import numpy as np
from tvm.script import tirx as T

SPECIALIZE_STATIC_M = False  # one linear_q kernel serves every M (decode and prefill alike)
QUANT_LAYOUTS = ("vnni16", "lanes16", "row")  # packed-weight layouts the kernels read, preferred first


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
    """Element b·16P + p·16 + v of a "lanes16" row (compiler/quantize.py), dequantized: a 16-lane
    load of word block b, one shift by p, the group's scale and offset broadcast."""
    per, group = spec.per_word, spec.group_size
    g = (b * 16 * per + p * 16) // group
    return (_code(qw, row, b * 16 + v, p, spec.bits, dtype) * T.cast(qs[(*_tuple(row), g)], dtype)
            + T.cast(qm[(*_tuple(row), g)], dtype))


def _word_and_slot(c, spec):
    """Where element c of a row lives: (word, slot in the word), per the spec's layout."""
    per = spec.per_word
    if spec.layout == "lanes16":
        block, rest = c // (16 * per), c % (16 * per)
        return block * 16 + rest % 16, rest // 16
    return c // per, c % per


def linear_q(n: int, k: int, spec, dtype: str = "float32", m: int | None = None):
    """y[M, N] = x[M, K] · dequant(W)ᵀ with W stored as packed codes + group scales/offsets
    (compiler/quantize.py). "vnni16" weights: int8 activations and VNNI dot products
    (targets/cpu_vnni.py). Decode (M = 1, lanes16) dequantizes in registers inside the dot
    product; otherwise each task dequantizes 4 weight rows into a buffer and runs the float GEMM
    tile (_gemm_columns) over all M rows. No full-precision weight matrix exists at any time."""
    if spec.layout == "vnni16":
        from .cpu_vnni import linear_q_vnni

        return linear_q_vnni(n, k, spec)
    bits, per, group = spec.bits, spec.per_word, spec.group_size
    words, groups, sdt = spec.words(k), k // spec.group_size, spec.scale_dtype
    aligned = group % per == 0
    lanes16 = spec.layout == "lanes16"
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
                    acc = T.decl_buffer((16,), dtype)
                    for v in T.vectorized(16):
                        acc[v] = T.cast(0, dtype)
                    for b in range(k // (16 * per)):
                        for p in T.unroll(per):
                            for v in T.vectorized(16):
                                acc[v] = acc[v] + x[0, b * 16 * per + p * 16 + v] * _lanes16(
                                    qw, qs, qm, J(jo, jj), b, p, v, spec, dtype)
                    y[0, J(jo, jj)] = T.cast(0, dtype)
                    for v in range(16):
                        y[0, J(jo, jj)] = y[0, J(jo, jj)] + acc[v]
        else:  # prefill (and row layouts): dequantize jb weight rows once, then the float GEMM tile
            for jo in T.parallel(n // jb):
                rows = T.decl_buffer((jb, words * per), dtype, scope="local")
                for jj in range(jb):
                    if lanes16:
                        for b in range(k // (16 * per)):
                            for p in T.unroll(per):
                                for v in T.vectorized(16):
                                    rows[jj, b * 16 * per + p * 16 + v] = _lanes16(qw, qs, qm, jo * jb + jj, b, p, v,
                                                                                  spec, dtype)
                    elif aligned:  # whole words per group
                        for g in range(groups):
                            for wg in range(group // per):
                                for v in T.vectorized(per):
                                    rows[jj, g * group + wg * per + v] = (
                                        _code(qw, jo * jb + jj, g * (group // per) + wg, v, bits, dtype)
                                        * T.cast(qs[jo * jb + jj, g], dtype) + T.cast(qm[jo * jb + jj, g], dtype))
                    else:  # 3-bit: groups straddle words
                        for wi in range(words):
                            for v in T.vectorized(per):
                                rows[jj, wi * per + v] = (
                                    _code(qw, jo * jb + jj, wi, v, bits, dtype)
                                    * T.cast(qs[jo * jb + jj, T.min((wi * per + v) // group, groups - 1)], dtype)
                                    + T.cast(qm[jo * jb + jj, T.min((wi * per + v) // group, groups - 1)], dtype))
                gemm_columns(x, rows, 0, y, jo * jb, m)

    return cpu_linear_q


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


def group_gemm_q(num_experts: int, n: int, k: int, spec, dtype: str = "float32", index_dtype: str = "int64"):
    """group_gemm over quantized expert weights (compiler/quantize.py, per expert and row). lanes16
    rows are dequantized in registers inside each row's dot product; other layouts dequantize a
    weight row once into a buffer and reuse it for the expert's rows. Experts with empty segments
    are neither read nor dequantized."""
    bits, per, group = spec.bits, spec.per_word, spec.group_size
    words, groups, sdt = spec.words(k), k // spec.group_size, spec.scale_dtype
    vw = vector_width(k)
    aligned = group % per == 0
    lanes16 = spec.layout == "lanes16"

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
                        acc = T.decl_buffer((16,), dtype)
                        for v in T.vectorized(16):
                            acc[v] = T.cast(0, dtype)
                        for b in range(k // (16 * per)):
                            for p in T.unroll(per):
                                for v in T.vectorized(16):
                                    acc[v] = acc[v] + x[i, b * 16 * per + p * 16 + v] * _lanes16(
                                        qw, qs, qm, (e, j), b, p, v, spec, dtype)
                        y[i, j] = T.cast(0, dtype)
                        for v in range(16):
                            y[i, j] = y[i, j] + acc[v]
        else:
            for j in T.parallel(n):
                row = T.decl_buffer((words * per,), dtype, scope="local")
                for e in range(num_experts):
                    if indptr[e + 1] > indptr[e]:
                        if aligned:  # whole words per group
                            for g in range(groups):
                                for wg in range(group // per):
                                    for v in T.vectorized(per):
                                        row[g * group + wg * per + v] = (
                                            _code(qw, (e, j), g * (group // per) + wg, v, bits, dtype)
                                            * T.cast(qs[e, j, g], dtype) + T.cast(qm[e, j, g], dtype))
                        else:  # 3-bit: groups straddle words
                            for wi in range(words):
                                for v in T.vectorized(per):
                                    row[wi * per + v] = (
                                        _code(qw, (e, j), wi, v, bits, dtype)
                                        * T.cast(qs[e, j, T.min((wi * per + v) // group, groups - 1)], dtype)
                                        + T.cast(qm[e, j, T.min((wi * per + v) // group, groups - 1)], dtype))
                        for i in T.serial(indptr[e], indptr[e + 1]):
                            acc = T.decl_buffer((vw,), dtype)
                            for v in T.vectorized(vw):
                                acc[v] = T.cast(0, dtype)
                            for ko in range(k // vw):
                                for v in T.vectorized(vw):
                                    acc[v] = acc[v] + x[i, ko * vw + v] * row[ko * vw + v]
                            y[i, j] = T.cast(0, dtype)
                            for v in range(vw):
                                y[i, j] = y[i, j] + acc[v]

    return moe_group_gemm_q


def fused_rope(num_q_heads: int, num_kv_heads: int, head_dim: int, theta: float, dtype: str = "float32"):
    """Split fused q|k|v rows and apply interleaved (GPT-J) RoPE to q and k, for the KV cache's
    `fused_rope` slot: same signature and the same float32 math as TVM's kernel, but each token's
    cos/sin are computed once for all its heads instead of per (head, element), and tokens run in
    parallel. TVM's (one thread, 3 transcendentals per element) took 15 µs per 0.3b decode layer and
    0.5 ms per layer for a 32-token prefill."""
    heads, half = num_q_heads + 2 * num_kv_heads, head_dim // 2

    def rotated(qkv, s, h, p, cs, odd):  # element 2p + odd of head h after the rotation
        if odd:
            return cs[0, p] * qkv[s, h, 2 * p + 1] + cs[1, p] * qkv[s, h, 2 * p]
        return cs[0, p] * qkv[s, h, 2 * p] - cs[1, p] * qkv[s, h, 2 * p + 1]

    @T.macro
    def rope_token(qkv, position_map, q, k, v, apply_rope, s):
        cs = T.decl_buffer((2, half), "float32")  # cos, sin of pair p's angle
        for p in range(half):
            cs[0, p] = T.if_then_else(apply_rope > T.int64(0), T.cos(T.Cast("float32", position_map[s]) / T.pow(
                T.float32(theta), T.Cast("float32", 2 * p) / T.float32(head_dim))), T.float32(1))
            cs[1, p] = T.if_then_else(apply_rope > T.int64(0), T.sin(T.Cast("float32", position_map[s]) / T.pow(
                T.float32(theta), T.Cast("float32", 2 * p) / T.float32(head_dim))), T.float32(0))
        for h, p in T.grid(num_q_heads, half):
            q[s, h, 2 * p] = rotated(qkv, s, h, p, cs, False)
            q[s, h, 2 * p + 1] = rotated(qkv, s, h, p, cs, True)
        for h, p in T.grid(num_kv_heads, half):
            k[s, h, 2 * p] = rotated(qkv, s, num_q_heads + h, p, cs, False)
            k[s, h, 2 * p + 1] = rotated(qkv, s, num_q_heads + h, p, cs, True)
        for h in range(num_kv_heads):
            for d in T.vectorized(head_dim):
                v[s, h, d] = qkv[s, num_q_heads + num_kv_heads + h, d]

    @T.prim_func(private=True)
    def cpu_fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                       var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tir.noalias": True})
        seq_len = T.int32()
        position_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, heads, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_offset)
        q = T.match_buffer(var_q, (seq_len, num_q_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, num_kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, num_kv_heads, head_dim), dtype)
        if seq_len == 1:  # decode: no parallel launch (~4 µs) for one token's work
            rope_token(qkv, position_map, q, k, v, apply_rope, 0)
        else:
            for s in T.parallel(seq_len):
                rope_token(qkv, position_map, q, k, v, apply_rope, s)

    return cpu_fused_rope


@T.macro
def online_softmax_step(state):
    """One key of an online softmax in base 2, on state = [running max, denominator, this key's
    score (log2 units), …]: sets state[3] = the factor that rescales what was accumulated (< 1 when
    the max grows) and state[4] = this key's weight, both once per key: inside the head_dim-wide
    vector loop each lane would call exp2f (two libm calls per lane per key, ~5% of a decode step)."""
    state[3] = T.exp2(state[0] - T.max(state[0], state[2]))
    state[4] = T.exp2(state[2] - T.max(state[0], state[2]))
    state[1] = state[1] * state[3] + state[4]
    state[0] = T.max(state[0], state[2])


def paged_decode_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str = "float32",
                           page_size: int = 16):
    """Decode attention over TVM's paged KV cache, for the cache's `tir_attention_decode_cpu` slot.

    Same calling convention as TVM's kernel (the cache's C++ side calls it), but parallel over query
    heads and 16-lane over head_dim: TVM 0.27's CPU kernel is one thread and scalar, and measured at
    ~61% of a 0.3b 4-bit decode step at 960 cached tokens. RoPE is already in the cache (our
    RopeMode.NORMAL), so rotary_mode is ignored; no sliding window. Online softmax in base 2.
    """
    import math

    group = num_qo_heads // num_kv_heads
    d = head_dim
    vw = vector_width(d)
    log2e = math.log2(math.e)

    @T.prim_func(private=True)
    def batch_decode_paged_kv(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
                              page_table_values_handle: T.handle, var_length_info: T.handle,
                              k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
                              output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
                              rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tir.noalias": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_pos_offset = T.int32()
        q_pos_offset = T.int32()
        length_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, num_qo_heads, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, num_kv_heads, page_size, d), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=indptr_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_pos_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_pos_offset)
        last_page_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_offset)
        output = T.match_buffer(output_handle, (B, num_qo_heads, d), dtype)
        lse = T.match_buffer(lse_handle, (B, num_qo_heads), "float32")
        for bh in T.parallel(B * num_qo_heads):
            o = T.decl_buffer((d,), "float32")
            s = T.decl_buffer((vw,), "float32")
            state = T.decl_buffer((5,), "float32")  # running max, denominator, score, rescale, weight
            for v in T.vectorized(d):
                o[v] = T.float32(0)
            state[0] = T.float32(-5e4)
            state[1] = T.float32(0)
            for row in range(T.if_then_else(page_table_indptr[bh // num_qo_heads] < page_table_indptr[bh // num_qo_heads + 1],
                                            (page_table_indptr[bh // num_qo_heads + 1] - page_table_indptr[bh // num_qo_heads] - 1)
                                            * page_size + last_page_len[bh // num_qo_heads], 0)):
                for v in T.vectorized(vw):
                    s[v] = T.float32(0)
                for c in range(d // vw):
                    for v in T.vectorized(vw):
                        s[v] = s[v] + T.cast(Q[bh // num_qo_heads, bh % num_qo_heads, c * vw + v], "float32") * T.cast(
                            pages[page_table_values[page_table_indptr[bh // num_qo_heads] + row // page_size], 0,
                                  bh % num_qo_heads // group, row % page_size, c * vw + v], "float32")
                state[2] = T.float32(0)
                for v in range(vw):
                    state[2] = state[2] + s[v]
                state[2] = state[2] * sm_scale * T.float32(log2e)
                online_softmax_step(state)
                # rescale what we have if the max grew, then add this row's value vector
                for v in T.vectorized(d):
                    o[v] = o[v] * state[3] + state[4] * T.cast(
                        pages[page_table_values[page_table_indptr[bh // num_qo_heads] + row // page_size], 1,
                              bh % num_qo_heads // group, row % page_size, v], "float32")
            for v in T.vectorized(d):
                output[bh // num_qo_heads, bh % num_qo_heads, v] = T.cast(
                    o[v] / T.if_then_else(state[1] > T.float32(0), state[1], T.float32(1)), dtype)
            lse[bh // num_qo_heads, bh % num_qo_heads] = state[0] + T.log2(
                T.if_then_else(state[1] > T.float32(0), state[1], T.float32(1)))

    return batch_decode_paged_kv


def ragged_prefill_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str = "float32"):
    """Prefill self-attention over the new tokens, for the paged KV cache's ragged-prefill slot.

    Same calling convention as TVM's `batch_prefill_ragged_kv` CPU kernel (single-threaded, scalar,
    quadratic: ~2/3 of a 960-token 0.3b prefill), but one parallel task per (token, query head),
    16-lane over head_dim, and masked keys skipped instead of scored. Writes lse (base 2) as TVM's
    does, for the cache to merge with attention over earlier pages. RoPE is already applied.
    """
    import math

    group = num_qo_heads // num_kv_heads
    d = head_dim
    vw = vector_width(d)
    log2e = math.log2(math.e)

    @T.prim_func(private=True)
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                                var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                                rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tir.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_offset = T.int32()
        kv_indptr_offset = T.int32()
        q_pos_offset = T.int32()
        k_pos_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, num_qo_heads, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, num_kv_heads, d), dtype)
        v = T.match_buffer(var_v, (kv_len, num_kv_heads, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_pos_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_pos_offset)
        output = T.match_buffer(var_output, (qo_len, num_qo_heads, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, num_qo_heads), "float32")
        for b in range(batch_size):
            for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * num_qo_heads):
                o = T.decl_buffer((d,), "float32")
                s = T.decl_buffer((vw,), "float32")
                state = T.decl_buffer((5,), "float32")  # running max, denominator, score, rescale, weight
                for vv in T.vectorized(d):
                    o[vv] = T.float32(0)
                state[0] = T.float32(-5e4)
                state[1] = T.float32(0)
                # row = task // H, head = task % H; keys visible to the row (causal: up to its own position)
                for col in range(T.if_then_else(causal > 0, (kv_indptr[b + 1] - kv_indptr[b])
                                                - (q_indptr[b + 1] - q_indptr[b]) + task // num_qo_heads + 1,
                                                kv_indptr[b + 1] - kv_indptr[b])):
                    for vv in T.vectorized(vw):
                        s[vv] = T.float32(0)
                    for c in range(d // vw):
                        for vv in T.vectorized(vw):
                            s[vv] = s[vv] + T.cast(q[q_indptr[b] + task // num_qo_heads, task % num_qo_heads, c * vw + vv],
                                                   "float32") * T.cast(
                                k[kv_indptr[b] + col, task % num_qo_heads // group, c * vw + vv], "float32")
                    state[2] = T.float32(0)
                    for vv in range(vw):
                        state[2] = state[2] + s[vv]
                    state[2] = state[2] * sm_scale * T.float32(log2e)
                    online_softmax_step(state)
                    for vv in T.vectorized(d):
                        o[vv] = o[vv] * state[3] + state[4] * T.cast(
                            v[kv_indptr[b] + col, task % num_qo_heads // group, vv], "float32")
                for vv in T.vectorized(d):
                    output[q_indptr[b] + task // num_qo_heads, task % num_qo_heads, vv] = T.cast(
                        o[vv] / T.if_then_else(state[1] > T.float32(0), state[1], T.float32(1)), dtype)
                lse[q_indptr[b] + task // num_qo_heads, task % num_qo_heads] = state[0] + T.log2(
                    T.if_then_else(state[1] > T.float32(0), state[1], T.float32(1)))

    return batch_prefill_ragged_kv


def kv_cache_overrides(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, page_size: int,
                       rope_theta: float) -> dict:
    """Kernels of TVM's paged KV cache to replace: its CPU attention and RoPE kernels are one
    thread, scalar."""
    heads = (num_kv_heads, num_qo_heads, head_dim, dtype)
    return {"batch_decode_paged_kv_cpu": paged_decode_attention(*heads, page_size),
            "batch_prefill_ragged_kv": ragged_prefill_attention(*heads),
            "fused_rope": fused_rope(num_qo_heads, num_kv_heads, head_dim, rope_theta, dtype)}


def _linear_inputs(key: dict, m: int, rng):
    n, k = key["shape"]
    return [rng.standard_normal((m, k)).astype(key["dtype"]), rng.standard_normal((n, k)).astype(key["dtype"]),
            np.zeros((m, n), key["dtype"])]


# Kernels with schedule parameters (compiler/tuning.py): space, default, validity, build, inputs.
TUNABLE = {
    "linear": {
        "space": {"ib": [2, 4, 6], "jb": [1, 2, 4, 8]},
        "default": {"ib": 4, "jb": 4},
        "valid": lambda key, p: key["shape"][0] % p["jb"] == 0 and p["ib"] * p["jb"] <= 24,  # accumulators in registers
        "build": lambda key, p: linear(*key["shape"], key["dtype"], **p),
        "inputs": _linear_inputs,
    },
}
