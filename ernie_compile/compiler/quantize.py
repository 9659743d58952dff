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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

BITS = (2, 3, 4, 8)
LANES = 16  # SIMD lanes of the "lanes16" layout
CATEGORIES = ("attn", "mlp", "experts", "embed")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    symmetric: bool = True
    scale_dtype: str = "float16"
    layout: str = "row"  # or "lanes16"

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    def words(self, k: int) -> int:
        return -(-k // self.per_word)

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "scale_dtype": self.scale_dtype, "layout": self.layout}


@dataclass(frozen=True)
class QuantPolicy:
    """Bits per weight category; None: that category stays float32."""

    bits: tuple[tuple[str, int | None], ...]
    group_size: int = 32
    symmetric: bool = True
    scale_dtype: str = "float16"

    @classmethod
    def parse(cls, text: str | None, embed_bits: int | None = None, group_size: int = 32,
              symmetric: bool = True, scale_dtype: str = "float16") -> "QuantPolicy | None":
        """'4' → every category at 4 bits; 'experts=2,attn=4,embed=8' → per category (others float)."""
        if text is None and embed_bits is None:
            return None
        table: dict[str, int | None] = dict.fromkeys(CATEGORIES)
        if text is not None:
            if "=" not in text:
                table = dict.fromkeys(CATEGORIES, _bits(text))
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
        return cls(tuple(table.items()), group_size, symmetric, scale_dtype)

    def spec_for(self, weight_name: str, k: int, layouts=("lanes16", "row")) -> QuantSpec | None:
        """The spec for a weight by its transformers name, or None to keep it float. `layouts`: those
        the target's kernels read, preferred first ("row" always works)."""
        category = category_of(weight_name)
        bits = dict(self.bits).get(category) if category else None
        if bits is None:
            return None
        group = self.group_size
        while k % group:  # the largest power of two ≤ group_size dividing K
            group //= 2
        per = 32 // bits
        lanes = "lanes16" in layouts and k % (LANES * per) == 0 and group % LANES == 0
        return QuantSpec(bits, group, self.symmetric, self.scale_dtype, "lanes16" if lanes else "row")

    def as_dict(self) -> dict:
        return {"bits": dict(self.bits), "group_size": self.group_size, "symmetric": self.symmetric,
                "scale_dtype": self.scale_dtype}


def _bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        bits = -1
    if bits not in BITS:
        raise UserError(f"--bits: {text!r} is not one of {', '.join(map(str, BITS))}")
    return bits


def category_of(name: str) -> str | None:
    """Which policy category a weight belongs to. Norms, biases and the fp32 MoE router never quantize."""
    if not name.endswith(("weight", "gate_up_proj", "down_proj")) or "norm" in name or name.endswith("mlp.gate.weight"):
        return None
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
    """W [..., N, K] float → {"qweight": uint32 [..., N, words], "qscale", "qmin": [..., N, K/G]}."""
    *lead, k = w.shape
    g = spec.group_size
    grouped = w.astype(np.float64).reshape(*lead, k // g, g)
    top = (1 << spec.bits) - 1
    if spec.symmetric:
        half = 1 << (spec.bits - 1)
        scale = np.abs(grouped).max(-1) / (half - 1)
        scale = np.where(scale == 0, 1.0, scale).astype(spec.scale_dtype).astype(np.float64)
        offset = -half * scale
    else:
        lo, hi = grouped.min(-1), grouped.max(-1)
        scale = np.where(hi > lo, (hi - lo) / top, 1.0).astype(spec.scale_dtype).astype(np.float64)
        offset = lo.astype(spec.scale_dtype).astype(np.float64)
    codes = np.clip(np.rint((grouped - offset[..., None]) / scale[..., None]), 0, top).astype(np.uint32)
    return {"qweight": pack(codes.reshape(*lead, k), spec.bits, spec.layout),
            "qscale": scale.astype(spec.scale_dtype), "qmin": offset.astype(spec.scale_dtype)}


def _lanes16(codes: np.ndarray, per: int, inverse: bool = False) -> np.ndarray:
    """Reorder a row's elements into (inverse: out of) "lanes16" packing order."""
    *lead, k = codes.shape
    if inverse:
        return codes.reshape(*lead, k // (LANES * per), LANES, per).swapaxes(-1, -2).reshape(*lead, k)
    return codes.reshape(*lead, k // (LANES * per), per, LANES).swapaxes(-1, -2).reshape(*lead, k)


def pack(codes: np.ndarray, bits: int, layout: str = "row") -> np.ndarray:
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
    w = codes * parts["qscale"].astype(np.float32)[..., None] + parts["qmin"].astype(np.float32)[..., None]
    return w.reshape(*lead, k)


def packed_bytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    *lead, k = shape
    rows = math.prod(lead)
    scale_bytes = np.dtype(spec.scale_dtype).itemsize
    return rows * (spec.words(k) * 4 + 2 * (k // spec.group_size) * scale_bytes)
