"""TIR kernels for the WebGPU target: the GPU kernels (targets/gpu_kernels.py) plus attention over a
contiguous KV cache, which replaces TVM's paged cache (a C++ runtime object no browser can run).

Each layer owns two cache tensors, k and v [max_seq_len, Hkv, D], inputs of the step functions that
these kernels update in place (Relax call_tir_inplace). A token's cache row is its position, so
the position_ids input says both where to write and how far back to attend: there is no length
bookkeeping on the host, and a new sequence simply starts at position 0 again.

    kv_append  qkv [T, Hq+2·Hkv, D], cos/sin [1, T, D], pos [1, T] → q [T, Hq, D] (RoPE'd);
               k (RoPE'd) and v written to row pos[t] of the layer's caches
    attention  q, pos, k/v caches → out [T, Hq, D]: query t attends to rows 0 … pos[t] (causal)

Both are scheduled by hand (thread bindings written out), so dlight leaves them alone, and are
opaque to fusion (op_pattern 8).
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from .gpu_kernels import (group_gemm, group_gemm_q,  # noqa: F401
                          kv_cache_overrides, linear_q, take_q)

THREADS = 256  # per workgroup for kv_append (WebGPU guarantees 256 invocations per workgroup)
KEY_LANES = 16  # threads per (token, head) in attention, each over every 16th key


def _opaque(func):
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8, "tir.noalias": True})


def kv_append(num_q_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int, dtype: str,
              rope_dtype: str = "float32", pos_dtype: str = "int32"):
    """One thread per (token, head, rotation pair). ERNIE's RoPE is interleaved (GPT-J): pair p of a
    head is elements (2p, 2p+1), rotated by the angle whose cos/sin transformers stores at index p
    (its rotate_half on x[0::2], x[1::2]), computed in fp32 like transformers."""
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim
    h_all, half = hq + 2 * hkv, head_dim // 2

    def rot(qkv, t, h, p, cos, sin, odd):
        x0 = T.cast(qkv[t, h, 2 * p], "float32")
        x1 = T.cast(qkv[t, h, 2 * p + 1], "float32")
        c = T.cast(cos[0, t, p], "float32")
        s = T.cast(sin[0, t, p], "float32")
        return T.cast(x1 * c + x0 * s, dtype) if odd else T.cast(x0 * c - x1 * s, dtype)

    @T.prim_func(private=True)
    def kv_append(var_qkv: T.handle, var_cos: T.handle, var_sin: T.handle, var_pos: T.handle,
                  k_cache: T.Buffer((max_seq_len, hkv, d), dtype), v_cache: T.Buffer((max_seq_len, hkv, d), dtype),
                  var_q: T.handle):
        t = T.int64()
        qkv = T.match_buffer(var_qkv, (t, h_all, d), dtype)
        cos = T.match_buffer(var_cos, (1, t, d), rope_dtype)
        sin = T.match_buffer(var_sin, (1, t, d), rope_dtype)
        pos = T.match_buffer(var_pos, (1, t), pos_dtype)
        q = T.match_buffer(var_q, (t, hq, d), dtype)
        with T.launch_thread("blockIdx.x", (t * (h_all * half) + (THREADS - 1)) // THREADS) as bx:
            with T.launch_thread("threadIdx.x", THREADS) as tx:
                if bx * THREADS + tx < t * (h_all * half):
                    # int32 lets: locals become buffers, and narrowing to WGSL refuses int64 ones
                    i = T.Cast("int32", bx * THREADS + tx)
                    ti = i // (h_all * half)
                    h = i % (h_all * half) // half
                    p = i % half
                    if h < hq:
                        q[ti, h, 2 * p] = rot(qkv, ti, h, p, cos, sin, 0)
                        q[ti, h, 2 * p + 1] = rot(qkv, ti, h, p, cos, sin, 1)
                    elif h < hq + hkv:
                        k_cache[pos[0, ti], h - hq, 2 * p] = rot(qkv, ti, h, p, cos, sin, 0)
                        k_cache[pos[0, ti], h - hq, 2 * p + 1] = rot(qkv, ti, h, p, cos, sin, 1)
                    else:
                        v_cache[pos[0, ti], h - hq - hkv, 2 * p] = qkv[ti, h, 2 * p]
                        v_cache[pos[0, ti], h - hq - hkv, 2 * p + 1] = qkv[ti, h, 2 * p + 1]

    return _opaque(kv_append)


def attention(num_q_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int, dtype: str, scale: float,
              pos_dtype: str = "int32"):
    """One workgroup per (token, query head), KEY_LANES threads splitting the keys 0 … pos[t]: each
    keeps an online softmax (running max m, denominator l, weighted sum o[D], base 2) over its keys,
    then the lanes merge through workgroup memory. GQA: query head h reads KV head h // (Hq/Hkv)."""
    hq, hkv, d, lanes = num_q_heads, num_kv_heads, head_dim, KEY_LANES
    group = hq // hkv
    qk_scale = scale * math.log2(math.e)

    @T.prim_func(private=True)
    def attention(var_q: T.handle, var_pos: T.handle, k_cache: T.Buffer((max_seq_len, hkv, d), dtype),
                  v_cache: T.Buffer((max_seq_len, hkv, d), dtype), var_out: T.handle):
        t = T.int64()
        q = T.match_buffer(var_q, (t, hq, d), dtype)
        pos = T.match_buffer(var_pos, (1, t), pos_dtype)
        out = T.match_buffer(var_out, (t, hq, d), dtype)
        with T.launch_thread("blockIdx.x", t * hq) as bx:
            o_part = T.alloc_shared((lanes, d), "float32")
            m_part = T.alloc_shared((lanes,), "float32")
            l_part = T.alloc_shared((lanes,), "float32")
            o = T.alloc_local((d,), "float32")
            st = T.alloc_local((3,), "float32")  # m, l, score
            with T.launch_thread("threadIdx.x", lanes) as tx:
                ti = T.Cast("int32", bx // hq)
                h = T.Cast("int32", bx % hq)
                for c in range(d):
                    o[c] = T.float32(0)
                st[0] = T.float32(-1e30)
                st[1] = T.float32(0)
                for jj in range((pos[0, ti] + lanes - tx) // lanes):
                    st[2] = T.float32(0)
                    for c in range(d):
                        st[2] = st[2] + T.cast(q[ti, h, c], "float32") * T.cast(
                            k_cache[jj * lanes + tx, h // group, c], "float32")
                    st[2] = st[2] * T.float32(qk_scale)
                    for c in range(d):
                        o[c] = o[c] * T.exp2(st[0] - T.max(st[0], st[2])) + T.exp2(st[2] - T.max(st[0], st[2])) * T.cast(
                            v_cache[jj * lanes + tx, h // group, c], "float32")
                    st[1] = st[1] * T.exp2(st[0] - T.max(st[0], st[2])) + T.exp2(st[2] - T.max(st[0], st[2]))
                    st[0] = T.max(st[0], st[2])
                m_part[tx] = st[0]
                l_part[tx] = st[1]
                for c in range(d):
                    o_part[tx, c] = o[c]
                T.tvm_storage_sync("shared")
                # every lane: the overall max and denominator; then lane tx finishes dims tx, tx+lanes, …
                st[0] = T.float32(-1e30)
                for r in range(lanes):
                    st[0] = T.max(st[0], m_part[r])
                st[1] = T.float32(0)
                for r in range(lanes):
                    st[1] = st[1] + l_part[r] * T.exp2(m_part[r] - st[0])
                for cc in range((d + lanes - 1 - tx) // lanes):
                    st[2] = T.float32(0)
                    for r in range(lanes):
                        st[2] = st[2] + o_part[r, cc * lanes + tx] * T.exp2(m_part[r] - st[0])
                    out[ti, h, cc * lanes + tx] = T.cast(st[2] / st[1], dtype)

    return _opaque(attention)


def moe_route(num_experts: int, top_k: int, norm_min: float, index_dtype: str = "int32"):
    """ERNIE's MoE routing for one token per thread, in place of TVM's GPU top-k and sort (their
    kernels use blockIdx.z and host loops, which no WebGPU plan can express): the k experts with the
    largest probs + bias (the bias only selects; the first index wins a tie, as torch.topk does), their
    unbiased probs divided by max(sum, norm_min). Rows stay in (token, slot) order: the GPU grouped
    GEMMs read each row's expert id, so nothing needs sorting."""
    e_n, k = num_experts, top_k

    @T.prim_func(private=True)
    def moe_route(var_probs: T.handle, bias: T.Buffer((1, e_n), "float32"), var_ids: T.handle, var_w: T.handle):
        t = T.int64()
        probs = T.match_buffer(var_probs, (t, e_n), "float32")
        ids = T.match_buffer(var_ids, (t, k), index_dtype)
        w = T.match_buffer(var_w, (t, k), "float32")
        with T.launch_thread("blockIdx.x", (t + 63) // 64) as bx:
            with T.launch_thread("threadIdx.x", 64) as tx:
                best = T.alloc_local((2,), "float32")  # best score, sum of chosen probs
                pick = T.alloc_local((2,), "int32")  # best expert, "already chosen" flag
                if bx * 64 + tx < t:
                    best[1] = T.float32(0)
                    for s in range(k):
                        best[0] = T.float32(-3.0e38)
                        pick[0] = 0
                        for e in range(e_n):
                            pick[1] = 0
                            for s2 in range(s):
                                if T.Cast("int32", ids[bx * 64 + tx, s2]) == e:
                                    pick[1] = 1
                            if pick[1] == 0 and probs[bx * 64 + tx, e] + bias[0, e] > best[0]:
                                best[0] = probs[bx * 64 + tx, e] + bias[0, e]
                                pick[0] = e
                        ids[bx * 64 + tx, s] = T.Cast(index_dtype, pick[0])
                        w[bx * 64 + tx, s] = probs[bx * 64 + tx, pick[0]]
                        best[1] = best[1] + probs[bx * 64 + tx, pick[0]]
                    for s in range(k):
                        w[bx * 64 + tx, s] = w[bx * 64 + tx, s] / T.max(best[1], T.float32(norm_min))

    return _opaque(moe_route)
