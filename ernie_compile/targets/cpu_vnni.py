"""Quantized linears with int8 activations over weights in the "vnni16" layout (ernie_compile/quant.py),
on x86 AVX-512 VNNI (`vpdpbusd`: u8 × s8 → i32, 64 multiply-adds per instruction) or AVX2.

Float dequantize-then-FMA needs ~3 vector instructions per 16 weights; at 4 bits and 2 cores that
cannot keep up with memory (~17 weights per cycle per core). Here the activations are quantized
once per call, per block of 32 along K (symmetric int8, dx = max|x| / 127, as llama.cpp's Q8_0),
and each output row is one lane of a 16-lane accumulator:

    y[i, r] = Σ_b  s[r, g(b)] · dx[i, b] · Σ_c q[r, c] · xq[i, c]  +  m[r, g(b)] · dx[i, b] · Σ_c xq[i, c]

(c over block b), which is exactly x̃ · dequant(W)ᵀ with x̃ = xq · dx the quantized activations.
The integer dot Σ_c q · xq is one of DOTS (the target's `int8_dot`, targets/base.py); the block
arithmetic around it (_block_math) is shared with the MoE grouped GEMM (targets/cpu_moe.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tvm import tirx
from tvm.script import tirx as T

TILE = 16  # output rows per tile: one per lane of an int32x16 accumulator
BLOCK = 32  # activation quantization block along K
PREFETCH = 2048  # words (8 KiB) ahead: best or tied of 0 … 8192 on the 0.3b decode shapes, weights from DRAM


def _dot_vnni(acc, w_u32x16, x_i32):
    """acc[16] += per lane: Σ of 4 u8 weight bytes × 4 s8 activation bytes (x broadcast to all lanes)."""
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                   T.reinterpret("uint8x64", w_u32x16),
                                   T.reinterpret("int8x64", T.broadcast(x_i32, 16)))


def _dot_portable(acc, w_u32x16, x_i32):
    """_dot_vnni in plain int32 vector arithmetic, exactly: per lane, Σ over the 4 bytes c of
    u8(w byte c) × s8(x byte c). Any LLVM target builds it (slowly): the tests run the kernels'
    loops with it on CPUs without the instructions of the others."""
    for c in range(4):
        wc = T.cast(T.bitwise_and(T.shift_right(w_u32x16, T.broadcast(T.uint32(8 * c), TILE)),
                                  T.broadcast(T.uint32(0xFF), TILE)), "int32x16")
        xc = T.shift_right(T.shift_left(x_i32, T.int32(24 - 8 * c)), T.int32(24))  # sign-extends byte c
        acc = acc + wc * T.broadcast(xc, TILE)
    return acc


def _half(v, h: int):  # lanes 8h … 8h + 7 of a 16-lane vector
    return tirx.Shuffle([v], [tirx.IntImm("int32", 8 * h + i) for i in range(8)])


def _pairs_avx2(w_u32x16, x_i32, h: int):
    """AVX2's vpmaddubsw on lanes 8h … 8h + 7: per lane, the two adjacent byte pairs of u8 codes ×
    s8 activations summed, as int16x16 (the caller sums those per lane: _block_math)."""
    return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.reinterpret("uint8x32", _half(w_u32x16, h)),
                                   T.reinterpret("int8x32", T.broadcast(x_i32, 8)))


def _widen_avx2(sums_i16x16):
    """AVX2's vpmaddwd by 1: adjacent int16 lanes summed into int32x8 (one 8-row half's dots)."""
    return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", sums_i16x16, T.broadcast(T.int16(1), 16))


@dataclass(frozen=True)
class Dot:
    """An int8 dot product of the kernels: either `dot` (acc[16] += per lane, Σ of 4 u8 code bytes ×
    4 s8 activation bytes) or `pairs` (int16 pair sums per 8-lane half, summed in int16 per block)
    with `widen` (a half's int16 sums → int32x8, once per block); `bits`: the code widths it is
    exact for."""
    bits: tuple
    dot: Callable | None = None
    pairs: Callable | None = None
    widen: Callable | None = None


# int8 dot kind (Target.int8_dot) → Dot. All compute the same integers; "vnni" needs AVX-512 VNNI
# (vpdpbusd), "avx2" AVX2 (CPUs without VNNI, such as Zen 3), "portable" nothing. AVX2's pairs are
# exact for codes of up to 4 bits: a lane sums 8 pairs per block, at most 8 · 2 · 15 · 127 = 30480
# < 2^15 (|xq| ≤ 127); 8-bit codes would overflow.
DOTS = {"vnni": Dot((2, 3, 4, 8), dot=_dot_vnni), "avx2": Dot((2, 3, 4), pairs=_pairs_avx2, widen=_widen_avx2),
        "portable": Dot((2, 3, 4, 8), dot=_dot_portable)}


def dot_for(int8_dot: str, bits: int, kernel: str) -> Dot:
    """The Dot of kind `int8_dot` for `bits`-bit codes; a ValueError where it is not exact."""
    if int8_dot not in DOTS:
        raise ValueError(f"{kernel}: int8_dot={int8_dot!r}; one of {', '.join(DOTS)}")
    dot = DOTS[int8_dot]
    if bits not in dot.bits:
        raise ValueError(f"{kernel}: int8_dot={int8_dot!r} is exact for {dot.bits}-bit codes only, not {bits}")
    return dot


def _quantize_rows(k: int):
    """A TIR macro: row i of x [M, K] float → xq int8 codes, dx (scale) and sx (dx · Σ xq) per block
    of 32. Rounds half to even (nearbyint), as torch.round and np.rint do."""
    blocks = k // BLOCK

    def code(x, i, b, v, am):  # round(x / dx) as a float, 0 for an all-zero block
        return T.if_then_else(am > T.float32(0), T.nearbyint(x[i, b * BLOCK + v] / (am / T.float32(127))),
                              T.float32(0))

    @T.macro
    def quantize_rows(x, xq8, dx, sx, i):
        for b in range(blocks):
            red = T.decl_buffer((16,), "float32")  # default scope: a stack slot (cpu_kernels.py)
            am = T.decl_buffer((2,), "float32")  # max |x|, Σ codes
            for v in T.vectorized(16):
                red[v] = T.max(T.fabs(x[i, b * BLOCK + v]), T.fabs(x[i, b * BLOCK + 16 + v]))
            am[0] = T.float32(0)
            for v in range(16):
                am[0] = T.max(am[0], red[v])
            dx[i * blocks + b] = am[0] / T.float32(127)
            for v in T.vectorized(BLOCK):
                xq8[(i * blocks + b) * BLOCK + v] = T.cast(code(x, i, b, v, am[0]), "int8")
            for v in T.vectorized(16):
                red[v] = code(x, i, b, v, am[0]) + code(x, i, b, 16 + v, am[0])
            am[1] = T.float32(0)
            for v in range(16):
                am[1] = am[1] + red[v]
            sx[i * blocks + b] = am[1] * (am[0] / T.float32(127))

    return quantize_rows


def _code_parts(bits: int, j):
    """Where the codes of a block's elements 4j … 4j + 3 live (the vnni16 layouts, quant.py), as
    (vector, shift, width, place) parts: bits shift … shift + width − 1 of each byte of the block's
    vector, which are bits place … of the code. `j` a Python int or a TIR expression."""
    if bits == 8:
        return [(j, 0, 8, 0)]
    if bits == 3:  # the low 2 bits as at 2 bits, the high one from vector 2's bit j
        return [(j % 2, 2 * (j // 2), 2, 0), (2, j, 1, 2)]
    return [(j % bits, bits * (j // bits), bits, 0)]  # 4 and 2 bits


def _block_math(k: int, spec, dot: Dot):
    """make_update(tb): a TIR macro adding block b (32 along K) of rows i0 … i0 + tb − 1 into the
    float32 accumulators accf[tb, 16] of the 16-row tile `t` (the tile's index in the whole
    [rows, K] vnni16 weight). Shared by the dense and the MoE kernels' tile loops."""
    bits, group = spec.bits, spec.group_size
    groups, blocks = k // group, k // BLOCK

    def vec(qwf, t, b, v):  # the block's vector v: 16 words, one per row of the tile
        return qwf[T.ramp(((t * blocks + b) * bits + v) * TILE, 1, TILE)]

    def field(raw, shift: int, width: int):  # bits shift … shift + width − 1 of each byte
        return T.bitwise_and(T.shift_right(raw, T.broadcast(T.uint32(shift), TILE)),
                             T.broadcast(T.uint32(((1 << width) - 1) * 0x01010101), TILE))

    def code_vec(qwf, t, b, j):  # codes of elements 4j … 4j + 3 of the block: byte c of lane l
        if bits == 8:
            return vec(qwf, t, b, j)
        out = None
        for v, shift, width, place in _code_parts(bits, j):
            part = field(vec(qwf, t, b, v), shift, width)
            part = T.shift_left(part, T.broadcast(T.uint32(place), TILE)) if place else part
            out = part if out is None else T.bitwise_or(out, part)
        return out

    def x4(xq32, b, i, j):  # activations 4j … 4j + 3 of row i's block b, as one int32
        return xq32[(i * blocks + b) * 8 + j]

    def block_dot(qwf, xq32, t, b, i):  # int32x16: Σ over block b of codes × xq, lane = row
        # two chains of 4 (elements 0–15 and 16–31) to halve the dot's latency chain
        lo = T.broadcast(T.int32(0), TILE)
        hi = T.broadcast(T.int32(0), TILE)
        for j in range(4):
            lo = dot.dot(lo, code_vec(qwf, t, b, j), x4(xq32, b, i, j))
            hi = dot.dot(hi, code_vec(qwf, t, b, j + 4), x4(xq32, b, i, j + 4))
        return lo + hi

    def widen(acc16, r):  # int32x16 from the int16 pair sums of row r's two halves
        return tirx.Shuffle([dot.widen(acc16[2 * r + h, T.ramp(0, 1, 16)]) for h in range(2)],
                            [tirx.IntImm("int32", i) for i in range(TILE)])

    def block_term(qsf, qmf, dx, sx, t, b, i, idot):  # float32x16: block b's share of y[i, tile], idot its integer dot
        idot = T.cast(idot, "float32x16")
        scale = T.cast(qsf[T.ramp((t * groups + b * BLOCK // group) * TILE, 1, TILE)], "float32x16")
        if spec.symmetric:  # the offset is −2^(b−1) · scale exactly: 10% fewer bytes read at 4 bits
            return scale * (idot * T.broadcast(dx[i * blocks + b], TILE)
                            + T.broadcast(sx[i * blocks + b] * T.float32(-(1 << (bits - 1))), TILE))
        return (idot * (scale * T.broadcast(dx[i * blocks + b], TILE))
                + T.cast(qmf[T.ramp((t * groups + b * BLOCK // group) * TILE, 1, TILE)], "float32x16")
                * T.broadcast(sx[i * blocks + b], TILE))

    def make_update(tb: int):
        if dot.pairs is None:
            @T.macro
            def update(qwf, qsf, qmf, xq32, dx, sx, accf, t, b, i0):
                for ii in T.unroll(tb):
                    accf[ii, T.ramp(0, 1, TILE)] = accf[ii, T.ramp(0, 1, TILE)] + block_term(
                        qsf, qmf, dx, sx, t, b, i0 + ii, block_dot(qwf, xq32, t, b, i0 + ii))

            return update

        # Pair sums: one code vector at a time (j outer), into int16 accumulators per row and half
        # (acc16, in registers) widened once per block. In this order the live set is the 2·tb
        # accumulators, tb activation broadcasts and one code vector (16 AVX2 registers at tb = 4);
        # row-outer kept the block's 16 code halves live and spilled them (M = 8 linears on the
        # 0.3b: 1.33× the row-outer vpmaddwd-per-vpmaddubsw kernel, interleaved minima).
        def pair_step(acc16, r, qwf, xq32, t, b, i, j, h: int):  # acc16[r] (row i's half h) after group j
            return T.if_then_else(j == 0, T.broadcast(T.int16(0), 16), acc16[r, T.ramp(0, 1, 16)]) + dot.pairs(
                code_vec(qwf, t, b, j), x4(xq32, b, i, j), h)

        @T.macro
        def update(qwf, qsf, qmf, xq32, dx, sx, accf, t, b, i0):
            acc16 = T.decl_buffer((2 * tb, 16), "int16")  # default scope, 256 B at tb = 4: a stack slot
            for j in T.unroll(8):
                for ii in T.unroll(tb):  # (the halves as two loops: h must be a Python int in pairs)
                    acc16[2 * ii, T.ramp(0, 1, 16)] = pair_step(acc16, 2 * ii, qwf, xq32, t, b, i0 + ii, j, 0)
                for ii in T.unroll(tb):
                    acc16[2 * ii + 1, T.ramp(0, 1, 16)] = pair_step(acc16, 2 * ii + 1, qwf, xq32, t, b, i0 + ii, j, 1)
            for ii in T.unroll(tb):
                accf[ii, T.ramp(0, 1, TILE)] = accf[ii, T.ramp(0, 1, TILE)] + block_term(
                    qsf, qmf, dx, sx, t, b, i0 + ii, widen(acc16, ii))

        return update

    return make_update


def linear_q_vnni(n: int, k: int, spec, dtype: str = "float32", tokens: int = 4, prefetch: int = PREFETCH,
                  int8_dot: str = "vnni"):
    """y[M, N] = x̃[M, K] · dequant(W)ᵀ; W in the vnni16 layout, x̃ the int8-quantized x.

    Parallel over tiles of 16 output rows. Each block of 32 along K: the tile's codes (b vectors at
    b bits) are loaded and split into 8 vectors of byte codes, then used for `tokens` rows of x at a
    time (prefill), each with 8 int8 dots (`int8_dot`, one of DOTS: vpdpbusd for "vnni") into
    int32x16 accumulators that are scaled into the float32x16 one at the block's end. `prefetch`:
    how many uint32 words ahead of the block being read to prefetch (with weights streamed from
    DRAM, 0 → 2048 took 3072×1024 from 26 to 33 GB/s here, median; the hardware prefetcher alone
    lags on the one long stream per thread)."""
    bits, group, sdt = spec.bits, spec.group_size, spec.scale_dtype
    words, groups, blocks = spec.words(k), k // group, k // BLOCK
    tiles = n // TILE
    quantize_rows = _quantize_rows(k)
    make_update = _block_math(k, spec, dot_for(int8_dot, bits, "linear_q_vnni"))

    def make_tile(tb: int):
        update = make_update(tb)

        @T.macro
        def tile(qwf, qsf, qmf, xq32, dx, sx, y, t, i0):
            accf = T.decl_buffer((tb, TILE), "float32")  # default scope and < 1 KiB: a stack slot (cpu_kernels.py)
            for ii in T.unroll(tb):
                accf[ii, T.ramp(0, 1, TILE)] = T.broadcast(T.float32(0), TILE)
            for b in range(blocks):
                for line in T.unroll(bits if prefetch > 0 else 0):  # the block's 64-byte lines, ahead
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        qwf[((t * blocks + b) * bits + line) * TILE + prefetch]), T.int32(0), T.int32(3), T.int32(1)))
                if prefetch > 0:  # the scales, as far ahead in blocks (their offsets are not read)
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        qsf[(t * groups + b * BLOCK // group) * TILE + prefetch * BLOCK // (bits * group)]),
                        T.int32(0), T.int32(3), T.int32(1)))
                update(qwf, qsf, qmf, xq32, dx, sx, accf, t, b, i0)
            for ii in T.unroll(tb):
                for v in T.vectorized(TILE):
                    y[i0 + ii, t * TILE + v] = T.cast(accf[ii, v], dtype)

        return tile

    tile_many, tile_one = make_tile(tokens), make_tile(1)

    @T.prim_func(private=True)
    def cpu_linear_q_vnni(var_x: T.handle, qw: T.Buffer((n, words), "uint32"), qs: T.Buffer((n, groups), sdt),
                          qm: T.Buffer((n, groups), sdt), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})  # opaque: never fused into
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), dtype)
        y = T.match_buffer(var_y, (m, n), dtype)
        qwf = T.decl_buffer((n * words,), "uint32", data=qw.data)
        qsf = T.decl_buffer((n * groups,), sdt, data=qs.data)
        qmf = T.decl_buffer((n * groups,), sdt, data=qm.data)
        xq8 = T.alloc_buffer((m * k,), "int8")
        xq32 = T.decl_buffer((m * k // 4,), "int32", data=xq8.data)
        dx = T.alloc_buffer((m * blocks,), "float32")
        sx = T.alloc_buffer((m * blocks,), "float32")
        if m == 1:
            quantize_rows(x, xq8, dx, sx, 0)
        else:
            for i in T.parallel(m):
                quantize_rows(x, xq8, dx, sx, i)
        for t in T.parallel(tiles):
            for io in range(m // tokens):
                tile_many(qwf, qsf, qmf, xq32, dx, sx, y, t, io * tokens)
            for i in range(m - m % tokens, m):
                tile_one(qwf, qsf, qmf, xq32, dx, sx, y, t, i)

    return cpu_linear_q_vnni


def take_q_vnni(vocab: int, dim: int, spec, dtype: str = "float32"):
    """Embedding lookup from a vnni16 table (the tied lm_head's): out[T, D] = dequant(W[ids[t]]).
    A row is lane l of its tile: element c sits in byte c % 4 of word (tile, c // 32, vector, l)."""
    bits, group, sdt = spec.bits, spec.group_size, spec.scale_dtype
    words, groups, blocks = spec.words(dim), dim // group, dim // BLOCK

    def word(r, c, v):  # the word of row r's vector v in the block of element c
        return ((r // TILE * blocks + c // BLOCK) * bits + v) * TILE + r % TILE

    def field(qwf, r, c, v, shift, width):  # bits shift … of byte c % 4 of that word
        return T.bitwise_and(T.shift_right(qwf[word(r, c, v)], T.cast(c % 4 * 8 + shift, "uint32")),
                             T.uint32((1 << width) - 1))

    def code(qwf, r, c):  # element c of row r
        out = None
        for v, shift, width, place in _code_parts(bits, c % BLOCK // 4):
            part = field(qwf, r, c, v, shift, width)
            part = T.shift_left(part, T.uint32(place)) if place else part
            out = part if out is None else T.bitwise_or(out, part)
        return out

    @T.prim_func(private=True)
    def cpu_take_q_vnni(var_ids: T.handle, qw: T.Buffer((vocab, words), "uint32"),
                        qs: T.Buffer((vocab, groups), sdt), qm: T.Buffer((vocab, groups), sdt), var_out: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})  # opaque: never fused into
        t = T.int64()
        ids = T.match_buffer(var_ids, (t,), "int64")
        out = T.match_buffer(var_out, (t, dim), dtype)
        qwf = T.decl_buffer((vocab * words,), "uint32", data=qw.data)
        qsf = T.decl_buffer((vocab * groups,), sdt, data=qs.data)
        qmf = T.decl_buffer((vocab * groups,), sdt, data=qm.data)
        for i in range(t):
            for c in range(dim):
                out[i, c] = (T.cast(code(qwf, ids[i], c), dtype)
                             * T.cast(qsf[(ids[i] // TILE * groups + c // group) * TILE + ids[i] % TILE], dtype)
                             + T.cast(qmf[(ids[i] // TILE * groups + c // group) * TILE + ids[i] % TILE], dtype))

    return cpu_take_q_vnni
