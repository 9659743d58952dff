"""Group-wise weight-only quantization: the policy, the packing, and the float reference.

A weight W [..., N, K] is cut along K into groups of G values. Each group keeps a scale s and an
offset m, and each value an unsigned code q in [0, 2^b − 1]:  W ≈ q · s + m.
- symmetric: m = −2^(b−1) · s (stored too, so every kernel dequantizes the same way), s = max|W| / (2^(b−1) − 1)
- asymmetric: m = min(W), s = (max(W) − min(W)) / (2^b − 1)
Codes are packed little-end-first into uint32 words, ⌊32 / b⌋ per word (8 → 4, 4 → 8, 3 → 10, 2 → 16),
row by row; a row is padded to whole words. Scales and offsets are stored as `scale_dtype`.

Layouts of a row's words:
- "row": word w holds elements w·P … w·P + P − 1 (P = codes per word).
- "lanes16": rows whose length is a multiple of 16·P are cut into blocks of 16 words; word l of
  block b holds elements b·16P + p·16 + l for p = 0 … P − 1. One 16-lane vector load of a block and
  one shift by p·b then yields 16 *consecutive* elements: SIMD dequantization without gathers.
- "vnni16" (2, 3, 4 and 8 bits; N % 16 == 0, K % 32 == 0, groups of 32·j): for int8-activation
  kernels (targets/cpu_vnni.py). Rows are cut into tiles of 16 and K into blocks of 32; a tile's
  block is one run of b vectors of 64 bytes (16·32·b/8 bytes, codes densely packed: K·b/32 words per
  row, 3 bits included) in which byte 4·l + c belongs to row l of the tile (lane l). Within a block,
  element 4j + c (j = 0…7) sits in byte c of lane l at: 8 bits: vector j. 4 bits: vector j % 4,
  bits 4·(j // 4) (low nibbles j < 4, high ones j ≥ 4). 2 bits: vector j % 2, bits 2·(j // 2).
  3 bits: its low 2 bits as the 2-bit layout in vectors 0 and 1, its high bit in vector 2, bit j
  (llama.cpp's Q3_K splits its codes the same way). Scales and offsets are stored
  tile-transposed, [N/16, groups, 16] in the same [N, groups] array, so 16 lanes load at once.
  The arrays keep the shapes of the other layouts: only the order inside each 16-row tile differs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError

BITS = (2, 3, 4, 8)
LANES = 16  # SIMD lanes of the "lanes16" layout
CATEGORIES = ("attn", "mlp", "experts", "embed", "vision")
TEXT_CATEGORIES = CATEGORIES[:4]  # what a single number (--bits 4) covers: the VL vision tower stays float


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    symmetric: bool = True
    scale_dtype: str = "float16"
    layout: str = "row"  # or "lanes16", "vnni16" (the last: kernels quantize activations to int8)

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    def words(self, k: int) -> int:
        if self.layout == "vnni16":  # codes densely packed, K % 32 == 0: 3 bits too
            return k * self.bits // 32
        return -(-k // self.per_word)

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "scale_dtype": self.scale_dtype, "layout": self.layout}


@dataclass(frozen=True)
class QuantPolicy:
    """Bits per weight category; None: that category stays float32. act_bits 8: linears and MoE
    experts over weights of the bits the target's int8 dot takes (2, 3, 4 and 8 with VNNI, 2, 3 and 4
    with AVX2) quantize their input activations to int8 per block of 32 (the vnni16 layout and kernels);
    None: activations stay float32."""

    bits: tuple[tuple[str, int | None], ...]
    group_size: int = 32
    symmetric: bool = True
    scale_dtype: str = "float16"
    act_bits: int | None = None

    @classmethod
    def parse(cls, text: str | None, embed_bits: int | None = None, group_size: int = 32,
              symmetric: bool = True, scale_dtype: str = "float16",
              act_bits: int | None = None) -> "QuantPolicy | None":
        """'4' → every text category at 4 bits; 'experts=2,attn=4,embed=8' → per category (others float).
        The VL model's vision tower and resampler ("vision") quantize only when named."""
        if text is None and embed_bits is None:
            return None
        table: dict[str, int | None] = dict.fromkeys(CATEGORIES)
        if text is not None:
            if "=" not in text:
                table.update(dict.fromkeys(TEXT_CATEGORIES, _bits(text)))
            else:
                for item in text.split(","):
                    key, _, value = item.partition("=")
                    if key.strip() not in CATEGORIES:
                        raise UserError(f"--bits {text!r}: unknown category {key.strip()!r}; "
                                        f"categories: {', '.join(CATEGORIES)}")
                    table[key.strip()] = _bits(value)
        if embed_bits is not None:
            table["embed"] = _bits(str(embed_bits))
        if group_size < 8 or group_size & (group_size - 1):
            raise UserError(f"--group-size {group_size}: must be a power of two, at least 8")
        if scale_dtype not in ("float16", "float32"):
            raise UserError(f"--scale-dtype {scale_dtype}: float16 or float32")
        return cls(tuple(table.items()), group_size, symmetric, scale_dtype, act_bits)

    def spec_for(self, weight_name: str, k: int, n: int | None = None,
                 layouts=("vnni16", "lanes16", "row"), int8_bits=(2, 3, 4, 8)) -> QuantSpec | None:
        """The spec for a weight [..., n, k] by its transformers name, or None to keep it float. n: its
        rows (each expert's, for stacked [E, n, k] expert weights; None: unknown, never vnni16).
        `layouts`: those the target's kernels read, preferred first ("row" always works); `int8_bits`:
        the weight bits its int8 dot is exact for (Target.int8_weight_bits). With act_bits 8, weights
        of those bits whose shapes tile (n % 16, k % 32, groups of 32·j) take vnni16: int8 activations."""
        category = category_of(weight_name)
        bits = dict(self.bits).get(category) if category else None
        if bits is None:
            return None
        group = self.group_size
        while k % group:  # the largest power of two ≤ group_size dividing K
            group //= 2
        if (self.act_bits == 8 and "vnni16" in layouts and bits in int8_bits and n is not None and n % LANES == 0
                and k % 32 == 0 and group % 32 == 0):
            return QuantSpec(bits, group, self.symmetric, self.scale_dtype, "vnni16")
        per = 32 // bits
        lanes = "lanes16" in layouts and k % (LANES * per) == 0 and group % LANES == 0
        return QuantSpec(bits, group, self.symmetric, self.scale_dtype, "lanes16" if lanes else "row")

    def as_dict(self) -> dict:
        return {"bits": dict(self.bits), "group_size": self.group_size, "symmetric": self.symmetric,
                "scale_dtype": self.scale_dtype, "act_bits": self.act_bits}


def _bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        bits = -1
    if bits not in BITS:
        raise UserError(f"--bits: {text!r} is not one of {', '.join(map(str, BITS))}")
    return bits


def category_of(name: str) -> str | None:
    """Which policy category a weight belongs to. Norms, biases and the fp32 MoE routers (`mlp.gate`, the
    VL model's `mlp.text_moe.gate` / `vision_moe.gate`) never quantize."""
    if not name.endswith(("weight", "gate_up_proj", "down_proj")) or "norm" in name or name.endswith(".gate.weight"):
        return None
    if "vision_tower." in name or "resampler_model." in name:
        return "vision"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embed"
    if ".experts." in name and "shared_experts" not in name:
        return "experts"
    if "self_attn" in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    return None


def quantize(w: np.ndarray, spec: QuantSpec) -> dict[str, np.ndarray]:
    """W [..., N, K] float → {"qweight": uint32 [..., N, words], "qscale", "qmin": [..., N, K/G]}.
    Scales are derived in float64 (one per group, cheap); the codes, one per weight, in float32 in
    place (a 21B compile quantizes 22 billion of them: float64 temporaries tripled its time)."""
    *lead, k = w.shape
    g = spec.group_size
    grouped = np.asarray(w, np.float32).reshape(*lead, k // g, g)  # a view of a float32 input
    top = (1 << spec.bits) - 1
    hi, lo = grouped.max(-1).astype(np.float64), grouped.min(-1).astype(np.float64)
    if spec.symmetric:
        half = 1 << (spec.bits - 1)
        scale = np.maximum(hi, -lo) / (half - 1)
        scale = np.where(scale == 0, 1.0, scale).astype(spec.scale_dtype).astype(np.float64)
        offset = -half * scale
    else:
        scale = np.where(hi > lo, (hi - lo) / top, 1.0).astype(spec.scale_dtype).astype(np.float64)
        offset = lo.astype(spec.scale_dtype).astype(np.float64)
    t = grouped - offset.astype(np.float32)[..., None]
    t *= (1.0 / scale).astype(np.float32)[..., None]
    np.rint(t, out=t)
    np.clip(t, 0, top, out=t)
    codes = t.astype(np.uint8 if top < 256 else np.uint32)
    scale, offset = scale.astype(spec.scale_dtype), offset.astype(spec.scale_dtype)
    if spec.layout == "vnni16":
        scale, offset = _tile_major(scale), _tile_major(offset)
    return {"qweight": pack(codes.reshape(*lead, k), spec.bits, spec.layout), "qscale": scale, "qmin": offset}


def _tile_major(a: np.ndarray, inverse: bool = False) -> np.ndarray:
    """[..., N, G] ↔ the vnni16 order [..., N/16, G, 16] (same shape, tile-transposed)."""
    *lead, n, g = a.shape
    if inverse:
        return a.reshape(*lead, n // LANES, g, LANES).swapaxes(-1, -2).reshape(*lead, n, g)
    return a.reshape(*lead, n // LANES, LANES, g).swapaxes(-1, -2).reshape(*lead, n, g)


def _vnni16(codes: np.ndarray, bits: int, inverse: bool = False) -> np.ndarray:
    """Codes [..., N, K] ↔ the vnni16 packed words [..., N, K·bits/32] (see the module docstring)."""
    if inverse:
        *lead, n, words = codes.shape
        k = words * 32 // bits
        v = codes.astype("<u4").view(np.uint8).reshape(*lead, n // LANES, k // 32, bits, LANES, 4)
        v = np.moveaxis(v, -2, -4)  # [.., t, l, b, vector, c]
        return _from_vectors(v, bits).reshape(*lead, n, k).astype(np.uint32)
    *lead, n, k = codes.shape
    c = codes.astype(np.uint8).reshape(*lead, n // LANES, LANES, k // 32, 8, 4)  # [.., t, l, b, j, c]
    v = _to_vectors(c, bits)  # [.., t, l, b, vector, c]
    v = np.ascontiguousarray(np.moveaxis(v, -4, -2))  # [.., t, b, vector, l, c]
    return v.reshape(*lead, n, -1).view("<u4").astype(np.uint32)


def _to_vectors(c: np.ndarray, bits: int) -> np.ndarray:
    """A block's codes [..., j (8), c (4)] → its vectors' bytes [..., bits, 4]."""
    if bits == 8:
        return c
    if bits == 3:
        high = np.bitwise_or.reduce((c >> 2) << np.arange(8, dtype=np.uint8)[:, None], axis=-2)  # bit j
        return np.concatenate([_to_vectors(c & 3, 2), high[..., None, :]], axis=-2)
    per = 8 // bits  # codes per byte: 4 bits → j = 4h + v, 2 bits → j = 2h + v; h the shift
    c = c.reshape(*c.shape[:-2], per, bits, 4)  # [..., h, v, c]
    return np.bitwise_or.reduce(c << (bits * np.arange(per, dtype=np.uint8))[:, None, None], axis=-3)


def _from_vectors(v: np.ndarray, bits: int) -> np.ndarray:
    """_to_vectors' inverse: [..., bits, 4] bytes → codes [..., 8, 4]."""
    if bits == 8:
        return v
    if bits == 3:
        high = (v[..., 2:3, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [..., 8, 4]
        return _from_vectors(v[..., :2, :], 2) | (high << 2)
    per = 8 // bits
    c = (v[..., None, :, :] >> (bits * np.arange(per, dtype=np.uint8))[:, None, None]) & ((1 << bits) - 1)
    return c.reshape(*v.shape[:-2], 8, 4)  # [..., h, v, c] → j = h·bits + v


def _lanes16(codes: np.ndarray, per: int, inverse: bool = False) -> np.ndarray:
    """Reorder a row's elements into (inverse: out of) "lanes16" packing order."""
    *lead, k = codes.shape
    if inverse:
        return codes.reshape(*lead, k // (LANES * per), LANES, per).swapaxes(-1, -2).reshape(*lead, k)
    return codes.reshape(*lead, k // (LANES * per), per, LANES).swapaxes(-1, -2).reshape(*lead, k)


def pack(codes: np.ndarray, bits: int, layout: str = "row") -> np.ndarray:
    if layout == "vnni16":
        return _vnni16(codes, bits)
    per = 32 // bits
    if layout == "lanes16":
        codes = _lanes16(codes, per)
    *lead, k = codes.shape
    words = -(-k // per)
    padded = np.zeros((*lead, words * per), np.uint32)
    padded[..., :k] = codes
    padded = padded.reshape(*lead, words, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(padded << shifts, axis=-1).astype(np.uint32)


def unpack(packed: np.ndarray, bits: int, k: int, layout: str = "row") -> np.ndarray:
    if layout == "vnni16":
        return _vnni16(packed, bits, inverse=True)
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * bits
    codes = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], -1)[..., :k]
    return _lanes16(codes, per, inverse=True) if layout == "lanes16" else codes


def dequantize(parts: dict[str, np.ndarray], spec: QuantSpec, k: int) -> np.ndarray:
    """The float32 weight the kernels compute with: q · s + m, group by group."""
    codes = unpack(parts["qweight"], spec.bits, k, spec.layout).astype(np.float32)
    *lead, _ = codes.shape
    g = spec.group_size
    codes = codes.reshape(*lead, k // g, g)
    scale, offset = parts["qscale"], parts["qmin"]
    if spec.layout == "vnni16":
        scale, offset = _tile_major(scale, inverse=True), _tile_major(offset, inverse=True)
    w = codes * scale.astype(np.float32)[..., None] + offset.astype(np.float32)[..., None]
    return w.reshape(*lead, k)
