"""The VL mixed prefill's image features put in place of the image placeholder tokens, as one op.

transformers places them with `inputs_embeds.masked_scatter(ids == image_token_id, features)` after a
data-dependent count check. The mixed prefill step (compiler/capture.py) embeds the ids with the
model's own embedding and calls this op instead:

    before:  embeds.masked_scatter(mask, features)
    after:   ernie.place_image_features(embeds, ids, features, image_token_id)

Its eager reference is that masked_scatter. Lowered (Relax): the i-th placeholder takes feature row i,
a running count over the mask, gathered and selected (the runtime checks the counts agree).
"""
from __future__ import annotations

import torch

from . import PassReport

NAME = "place_image_features"
OP_NAME = "place_image_features.default"
FUNCTIONS = ("prefill_mm",)


@torch.library.custom_op("ernie::place_image_features", mutates_args=())
def place_image_features(embeds: torch.Tensor, ids: torch.Tensor, features: torch.Tensor, token_id: int) -> torch.Tensor:
    """Eager reference. embeds [1, T, H], ids [1, T], features [F, H] (F = placeholders) → [1, T, H]."""
    mask = (ids == token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))


@place_image_features.register_fake
def _(embeds, ids, features, token_id):
    return torch.empty_like(embeds)


def expected_sites(config) -> int:
    return 1 if config.model_type == "ernie4_5_vl_moe" else 0


def install(model) -> PassReport:
    """Nothing to swap: the mixed prefill step calls the op itself (compiler/capture.py)."""
    return PassReport(NAME, matched=expected_sites(model.config), expected=expected_sites(model.config))


def converter(report: PassReport, ctx):
    from tvm import relax

    def convert(node, importer):
        bb, op, env = importer.block_builder, relax.op, importer.env
        embeds, ids, feats = (env[a] for a in node.args[:3])
        token_id = int(node.args[3])
        _, t, h = embeds.ty.shape
        mask = bb.emit(op.equal(op.reshape(ids, [t]), relax.const(token_id, ids.ty.dtype)))  # [T]
        idx_dtype = ctx.index_dtype
        row = bb.emit(op.subtract(op.cumsum(op.astype(mask, idx_dtype), axis=0), relax.const(1, idx_dtype)))
        row = bb.emit(op.maximum(row, relax.const(0, idx_dtype)))  # [T]: the feature row of each placeholder
        placed = bb.emit(op.take(op.astype(feats, embeds.ty.dtype), row, axis=0))  # [T, H]
        report.matched += 1
        return bb.emit(op.where(op.reshape(mask, [1, t, 1]), op.reshape(placed, [1, t, h]), embeds))

    return convert
