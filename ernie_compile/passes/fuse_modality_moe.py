"""The VL model's MoE blocks: modality-isolated experts (text and vision, each with its own router)
as one op, lowered like fuse_moe_routing's (only the chosen experts of each router run).

transformers' `Ernie4_5_VLMoeMoeBlock` branches on `token_types.any()` and splits the tokens with
boolean masks (data-dependent sizes torch.export cannot keep). This pass swaps the block's two routed
MoEs for `torch.ops.ernie.modality_moe`, keeping transformers' own shared-experts MLP module:

    before:  if types.any(): out[~v] = text_moe(x[~v]); out[v] = vision_moe(x[v])  else: out = text_moe(x)
             → + shared(x)
    after:   ernie.modality_moe(x, types?, text router/experts, vision router/experts, k, norm_min) + shared(x)

`types` is None in the text steps (prefill of a text prompt, decode: generated tokens are always
text), whose graphs then hold no vision expert at all. In the mixed prefill each token takes its
modality's output. Lowered, both routed MoEs run on every token of a mixed prefill and a select
keeps each token's own (the vision experts are the narrow ones: 512 wide against 1536 at 28B-A3B).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import PassReport, swap_forwards
from .fuse_moe_routing import emit_moe, moe

NAME = "fuse_modality_moe"
OP_NAME = "modality_moe.default"


@torch.library.custom_op("ernie::modality_moe", mutates_args=())
def modality_moe(x: torch.Tensor, types: Optional[torch.Tensor], text_gate: torch.Tensor, text_bias: torch.Tensor,
                 text_gate_up: torch.Tensor, text_down: torch.Tensor, vision_gate: torch.Tensor,
                 vision_bias: torch.Tensor, vision_gate_up: torch.Tensor, vision_down: torch.Tensor, top_k: int,
                 norm_min: float) -> torch.Tensor:
    """Eager reference. x [T, H]; types [T] (0 text, else vision) or None (all text) → [T, H]."""
    text = moe(x, text_gate, text_bias, text_gate_up, text_down, top_k, norm_min)
    if types is None:
        return text
    vision = moe(x, vision_gate, vision_bias, vision_gate_up, vision_down, top_k, norm_min)
    return torch.where(types.reshape(-1, 1) != 0, vision, text)


@modality_moe.register_fake
def _(x, types, *args):
    return torch.empty_like(x)


def _fused_forward(block):
    def forward(hidden_states: torch.Tensor, moe_mm_token_type_ids: torch.Tensor | None = None):
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [T, H]
        types = moe_mm_token_type_ids.reshape(-1) if moe_mm_token_type_ids is not None else None
        text, vision = block.text_moe, block.vision_moe
        params = [p for m in (text, vision) for p in (m.gate.weight, m.gate.moe_statics.e_score_correction_bias,
                                                      m.experts.gate_up_proj, m.experts.down_proj)]
        out = torch.ops.ernie.modality_moe(x, types, *params, text.gate.top_k, float(text.gate.norm_min))
        if block.shared_experts is not None:
            out = out + block.shared_experts(x)
        return out.reshape(b, t, h), None

    return forward


def expected_sites(config) -> int:
    if config.model_type != "ernie4_5_vl_moe":
        return 0
    return sum(1 for kind in config.get_text_config().mlp_layer_types if kind == "sparse")


def install(model) -> PassReport:
    """Swap every VL MoE block's forward for the fused op (in place, on this model instance)."""
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeMoeBlock

    return swap_forwards(model, Ernie4_5_VLMoeMoeBlock, _fused_forward,
                         PassReport(NAME, expected=expected_sites(model.config)))


def converter(report: PassReport, ctx):
    """A `custom_convert_map` entry: `ernie.modality_moe` → one or two routed MoEs (+ a select)."""
    from tvm import relax

    def convert(node, importer):
        bb = importer.block_builder
        env = importer.env
        x = env[node.args[0]]
        text = [env[a] for a in node.args[2:6]]
        vision = [env[a] for a in node.args[6:10]]
        top_k, norm_min = int(node.args[10]), float(node.args[11])
        report.matched += 1
        out = emit_moe(bb, ctx, x, *text, top_k, norm_min)
        if node.args[1] is None:
            return out
        types = env[node.args[1]]
        other = emit_moe(bb, ctx, x, *vision, top_k, norm_min)
        is_vision = relax.op.expand_dims(relax.op.not_equal(types, relax.const(0, types.ty.dtype)), 1)  # [T, 1]
        return bb.emit(relax.op.where(is_vision, other, out))

    return convert
