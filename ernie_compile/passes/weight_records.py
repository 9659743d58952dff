"""What the artifact stores for each weight input of the step functions, and where its value comes from.

Lowering makes one record per weight a step reads: a transformers parameter, or several
concatenated along axis 0 (fuse_gqa_attention's Wq|Wk|Wv, fuse_gated_mlp's Wg|Wu). The
weight-replacing passes change records, never values: split_large_weights cuts one into row
blocks, quantize_weights gives it a packed layout. The target's `write_weights` then produces every
stored tensor from the checkpoint, one record at a time (compiler/package.py), so no pass and no
phase before packaging holds a weight value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..quant import QuantSpec


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the artifact's weight files."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "float16", "uint32", …


@dataclass(frozen=True)
class WeightRecord:
    """One weight input of the step functions."""

    weight: str  # the logical weight: a transformers name, or the fused weight's new name
    sources: tuple[str, ...]  # transformers state-dict names; several are concatenated along axis 0
    shape: tuple[int, ...]  # the float weight the step reads (after `rows`)
    dtype: str  # its float dtype (the router stays float32 in a float16 model)
    rows: tuple[int, int] | None = None  # rows [a, b) of the (concatenated) sources
    quant: QuantSpec | None = None  # stored as packed codes + group scales + offsets instead
    name: str = ""  # the stored / input name; "" means `weight`

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.weight)

    def replace(self, **changes) -> "WeightRecord":
        return dataclasses.replace(self, **changes)

    @property
    def stored(self) -> list[StoredTensor]:
        """The artifact tensors this record becomes, in the order the step functions take them."""
        if self.quant is None:
            return [StoredTensor(self.name, self.shape, self.dtype)]
        *lead, k = self.shape
        spec, groups = self.quant, k // self.quant.group_size
        return [StoredTensor(f"{self.name}.qweight", (*lead, spec.words(k)), "uint32"),
                StoredTensor(f"{self.name}.qscale", (*lead, groups), spec.scale_dtype),
                StoredTensor(f"{self.name}.qmin", (*lead, groups), spec.scale_dtype)]


def stored_tensors(records: list[WeightRecord]) -> list[StoredTensor]:
    """Every stored tensor, in the order the step functions take them."""
    return [t for r in records for t in r.stored]
