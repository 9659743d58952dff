"""Kernels of TVM's paged KV cache that the CPU target supplies itself: RoPE, decode attention over
the cache's pages, prefill attention over the new tokens and over earlier pages. TVM 0.27's CPU versions are one thread and
scalar, with transcendentals per element.

The two attention kernels walk the keys in blocks (a page, 16 keys): the block's scores are
independent dot products, then one max, one vector exp2 and one rescale of the running output per
block, an online softmax over blocks in base 2. Walking key by key instead needs two exp2 per key
in a serial chain; with libm's exp2f that was ~7% of a 0.3b 4-bit decode step at 100-200 cached
tokens.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .cpu_kernels import LOG2E, exp2, vector_width

BLOCK = 16  # keys per softmax block in prefill; decode's block is the cache's page
KEYS = 4  # keys scored together: one accumulator chain each (acc[KEYS, lanes])


def _attention_macros(block: int, d: int, dtype: str, key, value):
    """TIR macros shared by both attention kernels, for one query row of one head: `start`, then
    `attend_block` per block of up to `block` keys, then `end`. Only where the keys live differs:
    key(buf, base, head, j, c) and value(...) read element c of key / value j of the block at `base`.

    o[d] is the running output, acc[KEYS, lanes] the lanes of KEYS keys' dot products, s[block] the block's scores in
    log2 units (-5e4 where there is no key), then its weights; state = [running max, denominator,
    block max, rescale]."""
    vw = vector_width(d)

    @T.macro
    def start(o, state):
        for lane in T.vectorized(d):
            o[lane] = T.float32(0)
        state[0] = T.float32(-5e4)
        state[1] = T.float32(0)

    def lane_sum(acc, r):  # Σ of acc[r]'s lanes, halving the vector each step (a serial sum of 16 was
        v = acc[r, T.ramp(0, 1, vw)] if vw > 1 else acc[r, 0]  # the decode kernel's longest chain)
        width = vw
        while width > 1:
            width //= 2
            v = (tirx.Shuffle([v], [tirx.IntImm("int32", i) for i in range(width)])
                 + tirx.Shuffle([v], [tirx.IntImm("int32", width + i) for i in range(width)]))
        return v

    def make_scores(keys: int):
        @T.macro
        def scores(acc, s, q, q_row, q_head, kbuf, base, head, j0, sm_scale):  # s[j0 …] of `keys` keys
            for jj in T.unroll(keys):
                for lane in T.vectorized(vw):
                    acc[jj, lane] = T.float32(0)
            for c in range(d // vw):
                for jj in T.unroll(keys):  # independent accumulator chains, one per key
                    for lane in T.vectorized(vw):
                        acc[jj, lane] = acc[jj, lane] + T.cast(q[q_row, q_head, c * vw + lane], "float32") * T.cast(
                            key(kbuf, base, head, j0 + jj, c * vw + lane), "float32")
            for jj in T.unroll(keys):
                s[j0 + jj] = lane_sum(acc, jj) * sm_scale * T.float32(LOG2E)

        return scores

    scores_many, scores_one = make_scores(KEYS), make_scores(1)

    @T.macro
    def attend_block(o, acc, s, state, q, q_row, q_head, kbuf, vbuf, base, head, n, sm_scale):
        for j in T.vectorized(block):
            s[j] = T.float32(-5e4)
        for jo in range(n // KEYS):
            scores_many(acc, s, q, q_row, q_head, kbuf, base, head, jo * KEYS, sm_scale)
        for j in range(n - n % KEYS, n):
            scores_one(acc, s, q, q_row, q_head, kbuf, base, head, j, sm_scale)
        # online softmax over blocks: new max, the keys' weights, the rescale of what came before
        state[2] = state[0]
        for j in range(block):
            state[2] = T.max(state[2], s[j])
        for j in T.vectorized(block):
            s[j] = exp2(s[j] - state[2])
        state[3] = exp2(state[0] - state[2])
        state[1] = state[1] * state[3]
        for j in range(block):
            state[1] = state[1] + s[j]
        state[0] = state[2]
        for lane in T.vectorized(d):
            o[lane] = o[lane] * state[3]
        for j in range(n):
            for lane in T.vectorized(d):
                o[lane] = o[lane] + s[j] * T.cast(value(vbuf, base, head, j, lane), "float32")

    @T.macro
    def end(o, state, output, lse, row, head):
        for lane in T.vectorized(d):
            output[row, head, lane] = T.cast(
                o[lane] / T.if_then_else(state[1] > T.float32(0), state[1], T.float32(1)), dtype)
        lse[row, head] = state[0] + T.log2(T.if_then_else(state[1] > T.float32(0), state[1], T.float32(1)))

    return start, attend_block, end


def fused_rope(num_q_heads: int, num_kv_heads: int, head_dim: int, theta: float, dtype: str = "float32",
               scale: float = 1.0):
    """Split fused q|k|v rows and apply interleaved (GPT-J) RoPE to q and k, for the KV cache's
    `fused_rope` slot: same signature and the same float32 math as TVM's kernel, but each token's
    cos/sin are computed once for all its heads instead of per (head, element), and tokens run in
    parallel. TVM's (one thread, 3 transcendentals per element) took 15 µs per 0.3b decode layer and
    0.5 ms per layer for a 32-token prefill. `scale` multiplies the position (linear RoPE scaling:
    1/factor), as TVM's `rope_scale` does."""
    heads, half = num_q_heads + 2 * num_kv_heads, head_dim // 2

    def rotated(qkv, s, h, p, cs, odd):  # element 2p + odd of head h after the rotation
        if odd:
            return cs[0, p] * qkv[s, h, 2 * p + 1] + cs[1, p] * qkv[s, h, 2 * p]
        return cs[0, p] * qkv[s, h, 2 * p] - cs[1, p] * qkv[s, h, 2 * p + 1]

    @T.macro
    def rope_token(qkv, position_map, q, k, v, apply_rope, s):
        cs = T.decl_buffer((2, half), "float32")  # cos, sin of pair p's angle
        for p in range(half):
            cs[0, p] = T.if_then_else(apply_rope > T.int64(0), T.cos(
                T.Cast("float32", position_map[s]) * T.float32(scale) / T.pow(
                    T.float32(theta), T.Cast("float32", 2 * p) / T.float32(head_dim))), T.float32(1))
            cs[1, p] = T.if_then_else(apply_rope > T.int64(0), T.sin(
                T.Cast("float32", position_map[s]) * T.float32(scale) / T.pow(
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




def _page_macros(page_size: int, d: int, dtype: str):
    """_attention_macros over the cache's pages ([page, 2, kv head, slot, d]: keys then values), a
    softmax block per page, with `attend_pages`: one query row over the first `keys` cached keys of
    a sequence whose pages are values[first …]. Both page kernels (decode, prefill over earlier pages)
    walk a sequence's pages this way."""
    start, attend_block, end = _attention_macros(page_size, d, dtype, lambda pages, page, h, j, c: pages[page, 0, h, j, c],
                                                 lambda pages, page, h, j, c: pages[page, 1, h, j, c])

    @T.macro
    def attend_pages(o, acc, s, state, q, q_row, q_head, pages, values, first, keys, kv_head, sm_scale):
        for pg in range((keys + page_size - 1) // page_size):  # every page full but the last
            attend_block(o, acc, s, state, q, q_row, q_head, pages, pages, values[first + pg], kv_head,
                         T.min(page_size, keys - pg * page_size), sm_scale)

    return start, attend_pages, end


def _cached_keys(page_indptr, last_page_len, b, page_size: int):
    """How many keys sequence b has in the cache: its full pages and its last page's slots."""
    return T.if_then_else(page_indptr[b + 1] > page_indptr[b],
                          (page_indptr[b + 1] - page_indptr[b] - 1) * page_size + last_page_len[b], 0)


def paged_decode_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str = "float32",
                           page_size: int = 16):
    """Decode attention over TVM's paged KV cache, for the cache's `tir_attention_decode_cpu` slot:
    TVM's calling convention (the cache's C++ side calls it), one parallel task per query head, 16
    lanes over head_dim, a softmax block per page. RoPE is already in the cache (our
    RopeMode.NORMAL), so rotary_mode is ignored; no sliding window."""
    group, d, vw = num_qo_heads // num_kv_heads, head_dim, vector_width(head_dim)
    start, attend_pages, end = _page_macros(page_size, d, dtype)

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
            acc = T.decl_buffer((KEYS, vw), "float32")
            s = T.decl_buffer((page_size,), "float32")
            state = T.decl_buffer((4,), "float32")
            start(o, state)
            attend_pages(o, acc, s, state, Q, bh // num_qo_heads, bh % num_qo_heads, pages, page_table_values,
                         page_table_indptr[bh // num_qo_heads],
                         _cached_keys(page_table_indptr, last_page_len, bh // num_qo_heads, page_size),
                         bh % num_qo_heads // group, sm_scale)
            end(o, state, output, lse, bh // num_qo_heads, bh % num_qo_heads)

    return batch_decode_paged_kv


def ragged_prefill_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str = "float32"):
    """Prefill self-attention over the new tokens, for the paged KV cache's ragged-prefill slot:
    TVM's calling convention (its `batch_prefill_ragged_kv` CPU kernel is one thread, scalar,
    quadratic: ~2/3 of a 960-token 0.3b prefill), one parallel task per (token, query head), 16 lanes
    over head_dim, masked keys skipped instead of scored, softmax blocks of BLOCK keys. Writes lse
    (base 2) as TVM's does, for the cache to merge with attention over earlier pages. RoPE is
    already applied."""
    group, d, vw = num_qo_heads // num_kv_heads, head_dim, vector_width(head_dim)
    row = lambda buf, base, h, j, c: buf[base + j, h, c]  # noqa: E731  (keys and values alike)
    start, attend_block, end = _attention_macros(BLOCK, d, dtype, row, row)

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
                acc = T.decl_buffer((KEYS, vw), "float32")
                s = T.decl_buffer((BLOCK,), "float32")
                state = T.decl_buffer((4,), "float32")
                keys = T.decl_buffer((1,), "int32")  # keys the row sees (causal: up to its own position)
                start(o, state)
                keys[0] = T.if_then_else(causal > 0, (kv_indptr[b + 1] - kv_indptr[b])
                                         - (q_indptr[b + 1] - q_indptr[b]) + task // num_qo_heads + 1,
                                         kv_indptr[b + 1] - kv_indptr[b])
                for blk in range((keys[0] + BLOCK - 1) // BLOCK):
                    attend_block(o, acc, s, state, q, q_indptr[b] + task // num_qo_heads, task % num_qo_heads, k, v,
                                 kv_indptr[b] + blk * BLOCK, task % num_qo_heads // group,
                                 T.min(BLOCK, keys[0] - blk * BLOCK), sm_scale)
                end(o, state, output, lse, q_indptr[b] + task // num_qo_heads, task % num_qo_heads)

    return batch_prefill_ragged_kv


def paged_prefill_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str = "float32",
                            page_size: int = 16):
    """Prefill attention of new tokens over a sequence's earlier pages, for the paged KV cache's
    `batch_prefill_paged_kv_cpu` slot: what a prompt continued at an offset (a long prompt's second
    chunk, the server's chunked prefill) and a batch mixing prefills with decodes run. TVM 0.27's
    version is one thread and scalar and walks every row of every page in the cache per query
    (~0.4 s for 32 tokens over 32 cached on the 0.3b, 16 sequences' pages). Here: one parallel task
    per (token, query head) of a sequence, a softmax block per page, only the sequence's pages.
    TVM's calling convention and lse (base 2), for the cache to merge with the ragged kernel's.
    RoPE is already in the cache (RopeMode.NORMAL): rotary_mode is ignored; no sliding window."""
    group, d, vw = num_qo_heads // num_kv_heads, head_dim, vector_width(head_dim)
    start, attend_pages, end = _page_macros(page_size, d, dtype)

    @T.prim_func(private=True)
    def batch_prefill_paged_kv(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
                               var_page_indptr: T.handle, var_page_values: T.handle, var_length_info: T.handle,
                               var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
                               var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                               rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tir.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_offset = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_pos_offset = T.int32()
        q_pos_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, num_qo_heads, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, num_kv_heads, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_pos_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_pos_offset)
        output = T.match_buffer(var_output, (total_len, num_qo_heads, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, num_qo_heads), "float32")
        for b in range(batch_size):
            for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * num_qo_heads):
                o = T.decl_buffer((d,), "float32")
                acc = T.decl_buffer((KEYS, vw), "float32")
                s = T.decl_buffer((page_size,), "float32")
                state = T.decl_buffer((4,), "float32")
                keys = T.decl_buffer((2,), "int32")  # the sequence's cached keys; those the row sees
                start(o, state)
                keys[0] = _cached_keys(page_indptr, last_page_len, b, page_size)
                keys[1] = T.if_then_else(causal > 0, T.min(keys[0], keys[0] - (q_indptr[b + 1] - q_indptr[b])
                                                           + task // num_qo_heads + 1), keys[0])
                attend_pages(o, acc, s, state, q, q_indptr[b] + task // num_qo_heads, task % num_qo_heads, pages,
                             page_values, page_indptr[b], keys[1], task % num_qo_heads // group, sm_scale)
                end(o, state, output, lse, q_indptr[b] + task // num_qo_heads, task % num_qo_heads)

    return batch_prefill_paged_kv


def full_attention(num_heads: int, head_dim: int, dtype: str, scale: float):
    """Non-causal attention of N tokens over themselves (the VL vision tower, one image): q, k, v
    [N, H, D] → [N, H, D]. One parallel task per (token, head), softmax blocks of BLOCK keys as the
    prefill kernel; TVM's default schedule of the same matmul + softmax + matmul is one thread and
    scalar (minutes for a 1024-patch image through 32 blocks)."""
    d = head_dim
    row = lambda buf, base, h, j, c: buf[base + j, h, c]  # noqa: E731  (keys and values alike)
    start, attend_block, _ = _attention_macros(BLOCK, d, dtype, row, row)
    vw = vector_width(d)

    @T.prim_func(private=True)
    def vision_full_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_out: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        n = T.int64()
        q = T.match_buffer(var_q, (n, num_heads, d), dtype)
        k = T.match_buffer(var_k, (n, num_heads, d), dtype)
        v = T.match_buffer(var_v, (n, num_heads, d), dtype)
        out = T.match_buffer(var_out, (n, num_heads, d), dtype)
        for task in T.parallel(n * num_heads):
            o = T.decl_buffer((d,), "float32")
            acc = T.decl_buffer((KEYS, vw), "float32")
            s = T.decl_buffer((BLOCK,), "float32")
            state = T.decl_buffer((4,), "float32")
            start(o, state)
            for blk in range((n + BLOCK - 1) // BLOCK):
                attend_block(o, acc, s, state, q, task // num_heads, task % num_heads, k, v, blk * BLOCK,
                             task % num_heads, T.min(T.int64(BLOCK), n - blk * BLOCK), T.float32(scale))
            for lane in T.vectorized(d):
                out[task // num_heads, task % num_heads, lane] = T.cast(o[lane] / state[1], dtype)

    return vision_full_attention


def kv_cache_overrides(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, page_size: int,
                       rope_theta: float, rope_scale: float = 1.0) -> dict:
    """The kernels of TVM's paged KV cache to replace, by name."""
    heads = (num_kv_heads, num_qo_heads, head_dim, dtype)
    return {"batch_decode_paged_kv_cpu": paged_decode_attention(*heads, page_size),
            "batch_prefill_paged_kv_cpu": paged_prefill_attention(*heads, page_size),
            "batch_prefill_ragged_kv": ragged_prefill_attention(*heads),
            "fused_rope": fused_rope(num_qo_heads, num_kv_heads, head_dim, rope_theta, dtype, rope_scale)}
