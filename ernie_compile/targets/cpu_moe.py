"""The MoE grouped GEMMs with int8 activations on x86 (AVX-512 VNNI or AVX2), over stacked expert weights in
the "vnni16" layout (ernie_compile/quant.py, leading axis E: each expert's [N, K] is a vnni16 weight
of its own, and expert e's tiles follow expert e−1's).

Same calling convention as cpu_kernels.group_gemm_q: x [M, K] rows sorted by expert, indptr [E+1]
(rows before expert e), expert_ids [M] (not read here), the weight's qweight/qscale/qmin, y [M, N].
The float kernel there runs per output row and row of x (GEMV-shaped: a prefill re-reads an
expert's weights for every one of its rows) on float activations. Here, as in cpu_vnni.linear_q_vnni:

- every row of x is quantized once per call to int8 per block of 32 along K (Q8_0-like,
  cpu_vnni._quantize_rows), and the dot products are cpu_vnni's int8 dots (`vpdpbusd` with VNNI)
  over the expert's 16-row tiles;
- a loaded block of a tile (b vectors at b bits) serves `tokens` rows of the expert
  at once (the remainder in blocks of 4, 2, 1), so a prefill reads each tile once per token block,
  not once per row;
- the parallel loop runs over (tile chunk, expert, tile in chunk) items, empty experts skipped:
  threads split the tiles of *every* chosen expert evenly (decode: k experts × N/16 tiles, both
  threads busy; prefill: the rows of big and small experts alike), and within a chunk a thread
  streams `chunk` consecutive tiles of one expert (one contiguous run of weights to prefetch along).

Stacked, expert e's tile t is tile e·N/16 + t of one [E·N, K] vnni16 weight: a block's arithmetic is
cpu_vnni._block_math's with that tile index.
"""
from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from .cpu_vnni import BLOCK, PREFETCH, TILE, _block_math, _quantize_rows, dot_for

TOKENS = 4  # rows of x per loaded weight block (tuned on the 21B shapes: bench/bench_moe_kernels.py)
CHUNK = 8  # consecutive tiles of one expert per work item run
SERIAL_QUANTIZE_ROWS = 16  # fewer rows than this: quantize them on one thread (no parallel launch)


def _largest_divisor(n: int, at_most: int) -> int:
    return next(d for d in range(min(n, at_most), 0, -1) if n % d == 0)


def group_gemm_q_vnni(num_experts: int, n: int, k: int, spec, dtype: str = "float32", index_dtype: str = "int64",
                      tokens: int = TOKENS, prefetch: int = PREFETCH, chunk: int = CHUNK, int8_dot: str = "vnni"):
    """y[i, :] = dequant(W[e]) · x̃[i, :] for the rows i in expert e's segment [indptr[e], indptr[e+1]),
    x̃ the int8-quantized x. W [E, N, K] in vnni16 (4 or 8 bits; N % 16 == 0, K % 32 == 0, groups of
    32·j). Schedule parameters (TUNABLE): `tokens` rows share each loaded weight block; `prefetch`
    words ahead of the block being read (0: none; never past the item's run of tiles); `chunk`
    tiles per work item (falls back to the largest divisor of N/16 not above it). `int8_dot`: one of
    cpu_vnni.DOTS, "vnni" (vpdpbusd, the CPU needs AVX-512 VNNI), "avx2" (up to 4 bits; vpmaddubsw +
    vpmaddwd) or "portable" (any CPU, slowly); all three compute the same integers."""
    bits, group, sdt = spec.bits, spec.group_size, spec.scale_dtype
    if spec.layout != "vnni16" or bits not in (2, 3, 4, 8) or n % TILE or k % BLOCK or group % BLOCK:
        raise ValueError(f"group_gemm_q_vnni: needs a 2-, 3-, 4- or 8-bit vnni16 spec, N % 16 == 0, K % 32 == 0 and "
                         f"groups of 32·j; got {spec}, N={n}, K={k}")
    if not 1 <= tokens <= 8:
        raise ValueError(f"group_gemm_q_vnni: tokens={tokens}; 1 … 8 (accumulators in registers)")
    words, groups, blocks = spec.words(k), k // group, k // BLOCK
    tiles = n // TILE
    chunk = _largest_divisor(tiles, chunk)
    tile_words = blocks * bits * TILE  # one tile's run in qweight
    quantize_rows = _quantize_rows(k)
    make_update = _block_math(k, spec, dot_for(int8_dot, bits, "group_gemm_q_vnni"))

    def make_tile(tb: int):
        """Rows i0 … i0 + tb − 1 of y's tile t (global tile te) over all K; `end_w`: where the item's
        run of tiles ends in qweight (prefetches stop there: the next item's run is elsewhere)."""
        update = make_update(tb)

        @T.macro
        def tile(qwf, qsf, qmf, xq32, dx, sx, y, te, t, i0, end_w):
            accf = T.decl_buffer((tb, TILE), "float32")  # default scope and < 1 KiB: a stack slot
            for ii in T.unroll(tb):
                accf[ii, T.ramp(0, 1, TILE)] = T.broadcast(T.float32(0), TILE)
            for b in range(blocks):
                if prefetch > 0:  # the block's 64-byte lines and its scales, ahead, inside the item's run
                    if ((te * blocks + b) * bits + bits) * TILE + prefetch <= end_w:
                        for line in T.unroll(bits):
                            T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                                qwf[((te * blocks + b) * bits + line) * TILE + prefetch]),
                                T.int32(0), T.int32(3), T.int32(1)))
                        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                            qsf[(te * groups + b * BLOCK // group) * TILE + prefetch * BLOCK // (bits * group)]),
                            T.int32(0), T.int32(3), T.int32(1)))  # offsets: read only if asymmetric
                update(qwf, qsf, qmf, xq32, dx, sx, accf, te, b, i0)
            for ii in T.unroll(tb):
                for v in T.vectorized(TILE):
                    y[i0 + ii, t * TILE + v] = T.cast(accf[ii, v], dtype)

        return tile

    tile_main = make_tile(tokens)
    rests = [r for r in (4, 2, 1) if r < tokens]  # the remainder (< tokens rows) as blocks of 4, 2, 1
    tile_4, tile_2, tile_1 = (make_tile(r) if r in rests else None for r in (4, 2, 1))

    # Work item w → expressions (not Lets: a Let in a parallel body is reloaded from memory, cpu_kernels.py)
    def E(w):  # the expert
        return w // chunk % num_experts

    def Tl(w):  # the tile within the expert
        return w // (num_experts * chunk) * chunk + w % chunk

    def TE(w):  # the tile within the stacked [E·N, K] weight
        return E(w) * tiles + Tl(w)

    def END_W(w):  # where the item's run of tiles ends in qweight
        return (E(w) * tiles + w // (num_experts * chunk) * chunk + chunk) * tile_words

    @T.prim_func(private=True)
    def cpu_moe_group_gemm_q_vnni(var_x: T.handle, indptr: T.Buffer((num_experts + 1,), index_dtype),
                                  var_expert_ids: T.handle,
                                  qw: T.Buffer((num_experts, n, words), "uint32"),
                                  qs: T.Buffer((num_experts, n, groups), sdt),
                                  qm: T.Buffer((num_experts, n, groups), sdt), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})  # opaque: never fused into
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), dtype)
        y = T.match_buffer(var_y, (m, n), dtype)
        qwf = T.decl_buffer((num_experts * n * words,), "uint32", data=qw.data)
        qsf = T.decl_buffer((num_experts * n * groups,), sdt, data=qs.data)
        qmf = T.decl_buffer((num_experts * n * groups,), sdt, data=qm.data)
        xq8 = T.alloc_buffer((m * k,), "int8")
        xq32 = T.decl_buffer((m * k // 4,), "int32", data=xq8.data)
        dx = T.alloc_buffer((m * blocks,), "float32")
        sx = T.alloc_buffer((m * blocks,), "float32")
        if m < SERIAL_QUANTIZE_ROWS:  # decode (k rows): a parallel launch costs more than the work
            for i in range(m):
                quantize_rows(x, xq8, dx, sx, i)
        else:
            for i in T.parallel(m):
                quantize_rows(x, xq8, dx, sx, i)
        # item w: tile chunk c, expert e, tile t = c·chunk + w % chunk (threads take contiguous items)
        for w in T.parallel(tiles // chunk * num_experts * chunk):
            if indptr[E(w) + 1] > indptr[E(w)]:
                lo = T.cast(indptr[E(w)], "int64")
                cnt = T.cast(indptr[E(w) + 1], "int64") - lo
                for io in range(cnt // tokens):
                    tile_main(qwf, qsf, qmf, xq32, dx, sx, y, TE(w), Tl(w), lo + io * tokens, END_W(w))
                if tile_4 is not None:
                    if cnt % tokens // 4 % 2 == 1:
                        tile_4(qwf, qsf, qmf, xq32, dx, sx, y, TE(w), Tl(w), lo + cnt - cnt % tokens,
                               END_W(w))
                if tile_2 is not None:
                    if cnt % tokens // 2 % 2 == 1:
                        tile_2(qwf, qsf, qmf, xq32, dx, sx, y, TE(w), Tl(w), lo + cnt - cnt % tokens + cnt % tokens // 4 * 4,
                               END_W(w))
                if tile_1 is not None:
                    if cnt % tokens % 2 == 1:
                        tile_1(qwf, qsf, qmf, xq32, dx, sx, y, TE(w), Tl(w), lo + cnt - 1, END_W(w))

    return cpu_moe_group_gemm_q_vnni


def route_rows(tokens: int, top_k: int, num_experts: int, rng) -> np.ndarray:
    """indptr [E+1] of T·k (token, expert) pairs, each token's k experts distinct and drawn at random
    with a skew (some experts popular, some unused), as a router would give them."""
    popularity = rng.gamma(1.0, size=num_experts)
    chosen = np.stack([rng.choice(num_experts, top_k, replace=False, p=popularity / popularity.sum())
                       for _ in range(tokens)])  # [T, k]
    return np.concatenate([[0], np.cumsum(np.bincount(chosen.reshape(-1), minlength=num_experts))])


def _spec(quant: dict):
    from ..quant import QuantSpec

    return QuantSpec(**quant)


def _group_gemm_inputs(key: dict, m: int, rng):
    """The tuner's inputs for m tokens: M = m·top_k rows routed by route_rows, random codes."""
    num_experts, n, k, top_k = key["shape"]
    spec = _spec(key["quant"])
    indptr = route_rows(m, top_k, num_experts, rng)
    rows = int(indptr[-1])
    idx = key.get("index_dtype", "int64")
    groups = k // spec.group_size
    return [rng.standard_normal((rows, k)).astype(key["dtype"]), indptr.astype(idx),
            np.repeat(np.arange(num_experts), np.diff(indptr)).astype(idx),
            rng.integers(0, 2**32, (num_experts, n, spec.words(k)), dtype=np.uint32),
            (rng.random((num_experts, n, groups)) * 0.01).astype(spec.scale_dtype),
            (rng.random((num_experts, n, groups)) * -0.08).astype(spec.scale_dtype),
            np.zeros((rows, n), key["dtype"])]


# Kernels with schedule parameters (compiler/tuning.py; as cpu_kernels.TUNABLE). Key: "shape" is
# [E, N, K, top_k] (top_k: how the tuner's m tokens become rows), "quant" the spec's as_dict(),
# "int8_dot" the target's dot (the kernel a measurement builds must be the one the target runs).
TUNABLE = {
    "moe_group_gemm_q_vnni": {
        "space": {"tokens": [2, 4, 6, 8], "prefetch": [0, 1024, 2048, 4096], "chunk": [4, 8, 16]},
        "default": {"tokens": TOKENS, "prefetch": PREFETCH, "chunk": CHUNK},
        "valid": lambda key, p: key["quant"]["layout"] == "vnni16",
        "build": lambda key, p: group_gemm_q_vnni(*key["shape"][:3], _spec(key["quant"]), key["dtype"],
                                                  key.get("index_dtype", "int64"), int8_dot=key["int8_dot"], **p),
        "inputs": _group_gemm_inputs,
    },
}
