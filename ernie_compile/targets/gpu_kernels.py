"""TIR kernels for the GPU targets (CUDA, Metal): the ops our passes emit, written as plain compute
definitions (sblocks) and scheduled for threads.

The dequantizing linear is two sblocks — dequantize W, then the matmul — the shape TVM's dlight
GEMV (M = 1, decode) and Matmul (M symbolic, prefill) rules recognise: they inline the dequantization
into the matmul, so no float copy of W is ever written to memory. The MoE grouped GEMMs read their
weight through the row's expert id (an indirect index no dlight rule takes), so they carry their own
schedule (`_schedule_gemv`): a warp per output row, lanes across K, a cross-thread reduction.
Compute definitions are target independent; tests run them on the CPU against numpy.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.script import tirx as T

QUANT_LAYOUTS = ("row",)  # dlight's GEMV rule does not take the lanes16 index arithmetic


def _i64(*values: int):
    """Shapes and extents as int64, like the symbolic lengths Relax passes (dlight's Matmul rule
    rejects a mix of int64 variables and int32 constants)."""
    return tuple(tirx.IntImm("int64", int(v)) for v in values)


def kv_cache_overrides(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, page_size: int,
                       rope_theta: float, rope_scale: float = 1.0) -> dict:
    """TVM's paged KV cache brings scheduled GPU attention kernels: nothing to replace."""
    return {}


def _code(qw, lead: tuple, c, spec):
    """Code of element c of the packed row qw[*lead, :] (layouts in ernie_compile/quant.py), as uint32."""
    per, bits = spec.per_word, spec.bits
    if spec.layout == "lanes16":
        word, slot = c // (16 * per) * 16 + c % 16, c % (16 * per) // 16
    else:
        word, slot = c // per, c % per
    return T.bitwise_and(T.shift_right(qw[(*lead, word)], T.cast(slot * bits, "uint32")), T.uint32((1 << bits) - 1))


def _dequant(qw, qs, qm, lead: tuple, c, spec, dtype: str):
    g = c // spec.group_size
    return (T.cast(_code(qw, lead, c, spec), dtype) * T.cast(qs[(*lead, g)], dtype)
            + T.cast(qm[(*lead, g)], dtype))


def linear_q(n: int, k: int, spec, dtype: str = "float32", m: int | None = None, out_dtype: str | None = None):
    """y[M, N] = x[M, K] · dequant(W)ᵀ; M = `m` if static (decode), else symbolic; accumulated and
    returned in `out_dtype` (default: dtype). Left to dlight."""
    out_dtype = out_dtype or dtype
    n, k, words, groups = _i64(n, k, spec.words(k), k // spec.group_size)
    sdt = spec.scale_dtype
    rows = tirx.Var("m", "int64") if m is None else _i64(m)[0]

    @T.prim_func(private=True, s_tir=True)
    def gpu_linear_q(var_x: T.handle, qw: T.Buffer((n, words), "uint32"), qs: T.Buffer((n, groups), sdt),
                     qm: T.Buffer((n, groups), sdt), var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        x = T.match_buffer(var_x, (rows, k), dtype)
        y = T.match_buffer(var_y, (rows, n), out_dtype)
        w = T.sblock_alloc_buffer((n, k), dtype)
        for j, c in T.grid(n, k):
            with T.sblock("dequantize"):
                vj, vc = T.axis.remap("SS", [j, c])
                w[vj, vc] = _dequant(qw, qs, qm, (vj,), vc, spec, dtype)
        for i, j, c in T.grid(rows, n, k):
            with T.sblock("matmul"):
                vi, vj, vc = T.axis.remap("SSR", [i, j, c])
                with T.init():
                    y[vi, vj] = T.cast(0, out_dtype)
                y[vi, vj] = y[vi, vj] + T.cast(x[vi, vc], out_dtype) * T.cast(w[vj, vc], out_dtype)

    return gpu_linear_q


def take_q(vocab: int, dim: int, spec, dtype: str = "float32", index_dtype: str = "int64"):
    """Embedding lookup from a quantized table: out[T, D] = dequant(W[ids[t]]). Injective: dlight's
    fallback rule spreads it over threads."""
    vocab, dim, words, groups = _i64(vocab, dim, spec.words(dim), dim // spec.group_size)
    sdt = spec.scale_dtype

    @T.prim_func(private=True, s_tir=True)
    def gpu_take_q(var_ids: T.handle, qw: T.Buffer((vocab, words), "uint32"), qs: T.Buffer((vocab, groups), sdt),
                   qm: T.Buffer((vocab, groups), sdt), var_out: T.handle):
        T.func_attr({"tir.noalias": True})
        t = T.int64()
        ids = T.match_buffer(var_ids, (t,), index_dtype)
        out = T.match_buffer(var_out, (t, dim), dtype)
        for i, c in T.grid(t, dim):
            with T.sblock("take"):
                vi, vc = T.axis.remap("SS", [i, c])
                out[vi, vc] = _dequant(qw, qs, qm, (ids[vi],), vc, spec, dtype)

    return gpu_take_q


def _schedule_gemv(func, block: str, lanes: int = 32, rows_per_block: int = 4):
    """y[i, j] = Σ_c …: blockIdx.y = i, blockIdx.x · rows_per_block + threadIdx.y = j, threadIdx.x =
    lanes across c (coalesced loads), partial sums combined by a cross-thread reduction."""
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock(block)
    i, j, c = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, rows_per_block])
    co, ci = sch.split(c, [None, lanes])
    sch.reorder(i, jo, ji, ci, co)
    sch.bind(i, "blockIdx.y")
    sch.bind(jo, "blockIdx.x")
    sch.bind(ji, "threadIdx.y")
    sch.bind(ci, "threadIdx.x")
    # scheduled by hand: dlight must leave it alone, and fusion must not merge it into a new function
    # (op_pattern 8, opaque: TVM's FuseTIR also mishandles our symbolic-shape kernels when fusing)
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


def group_gemm(num_experts: int, n: int, k: int, dtype: str, schedule: bool = True, index_dtype: str = "int64"):
    """y[i, :] = w[expert_ids[i]] @ x[i, :]: rows sorted by expert (fuse_moe_routing), so a step
    reads only the chosen experts' weights. `indptr` is the CPU kernel's view of the same segments."""
    e1, n, k = _i64(num_experts + 1, n, k)
    num_experts = e1 - 1
    @T.prim_func(private=True, s_tir=True)
    def moe_group_gemm(var_x: T.handle, indptr: T.Buffer((e1,), index_dtype), var_expert_ids: T.handle,
                       w: T.Buffer((num_experts, n, k), dtype), var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), dtype)
        expert_ids = T.match_buffer(var_expert_ids, (m,), index_dtype)
        y = T.match_buffer(var_y, (m, n), dtype)
        for i, j, c in T.grid(m, n, k):
            with T.sblock("gemm"):
                vi, vj, vc = T.axis.remap("SSR", [i, j, c])
                with T.init():
                    y[vi, vj] = T.cast(0, dtype)
                y[vi, vj] = y[vi, vj] + x[vi, vc] * w[expert_ids[vi], vj, vc]

    return _schedule_gemv(moe_group_gemm, "gemm") if schedule else moe_group_gemm.with_attr("op_pattern", 8)


def group_gemm_q(num_experts: int, n: int, k: int, spec, dtype: str = "float32", schedule: bool = True,
                 index_dtype: str = "int64"):
    """group_gemm over quantized expert weights, dequantized as they are loaded."""
    e1, n, k, words, groups = _i64(num_experts + 1, n, k, spec.words(k), k // spec.group_size)
    num_experts, sdt = e1 - 1, spec.scale_dtype

    @T.prim_func(private=True, s_tir=True)
    def moe_group_gemm_q(var_x: T.handle, indptr: T.Buffer((e1,), index_dtype), var_expert_ids: T.handle,
                         qw: T.Buffer((num_experts, n, words), "uint32"), qs: T.Buffer((num_experts, n, groups), sdt),
                         qm: T.Buffer((num_experts, n, groups), sdt), var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), dtype)
        expert_ids = T.match_buffer(var_expert_ids, (m,), index_dtype)
        y = T.match_buffer(var_y, (m, n), dtype)
        for i, j, c in T.grid(m, n, k):
            with T.sblock("gemm"):
                vi, vj, vc = T.axis.remap("SSR", [i, j, c])
                with T.init():
                    y[vi, vj] = T.cast(0, dtype)
                y[vi, vj] = y[vi, vj] + x[vi, vc] * _dequant(qw, qs, qm, (expert_ids[vi], vj), vc, spec, dtype)

    return _schedule_gemv(moe_group_gemm_q, "gemm") if schedule else moe_group_gemm_q.with_attr("op_pattern", 8)

