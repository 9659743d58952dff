"""Fuse each attention layer: one QKV projection, RoPE and the cache append inside TVM's paged KV
cache, one attention kernel per step (prefill and decode variants, causal, GQA without repeat_kv).

Capture side (torch): each attention module's forward is swapped for one that hands the layer's
input and its own q/k/v weights to `torch.ops.ernie.rope_gqa_attention` and keeps its own o_proj:

    before:  q=q_proj(x) k=k_proj(x) v=v_proj(x) → transpose → RoPE (fp32, interleaved) → repeat_kv → softmax(qkᵀ·s)v → o_proj
    after:   ernie.rope_gqa_attention(x, Wq, Wk, Wv, bq?, bk?, bv?, cos, sin, layer, s) → o_proj

The op's eager reference uses transformers' own `apply_rotary_pos_emb` and causal attention.

Lower side (Relax): Wq|Wk|Wv become one weight, concatenated once at package time (the artifact's
`qkv_proj.weight`), so the step runs one GEMM/GEMV for q, k and v. The paged KV cache, created in
RopeMode.NORMAL with ERNIE's interleaved (GPT-J) rotation, applies RoPE to q and k in fp32 from
the sequence positions it tracks, appends k/v and attends:

    after:   qkv = x @ Wqkvᵀ (+ b) → vm.builtin.attention_kv_cache_attention_with_fused_qkv(cache, layer, s, qkv)

On a target with a contiguous KV cache (WebGPU, compiler/lower.py) the same qkv goes to our kernels
instead, RoPE from transformers' own cos/sin tables:

    after:   qkv = x @ Wqkvᵀ (+ b) → kv_append(qkv, cos, sin, positions, k_cache, v_cache) → attention(q, …)

cos/sin are inputs only for the eager reference; the lowering ignores them and Relax drops their
computation as dead code.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import PassReport, swap_each

NAME = "fuse_gqa_attention"
OP_NAME = "rope_gqa_attention.default"
ROPE_MODE = "normal"  # the KV cache applies RoPE (see lower.py)


@torch.library.custom_op("ernie::rope_gqa_attention", mutates_args=())
def rope_gqa_attention(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
                       bq: Optional[torch.Tensor], bk: Optional[torch.Tensor], bv: Optional[torch.Tensor],
                       cos: torch.Tensor, sin: torch.Tensor, layer: int, scale: float, head_dim: int) -> torch.Tensor:
    """Eager reference. x [B, T, C] → attention output [B, T, Hq·D] (before o_proj), no past."""
    from transformers.models.ernie4_5.modeling_ernie4_5 import apply_rotary_pos_emb

    from .route_attention_to_kv_cache import kv_attention

    b, t, _ = x.shape
    q, k, v = (torch.nn.functional.linear(x, w, bias).view(b, t, -1, head_dim).transpose(1, 2)
               for w, bias in ((wq, bq), (wk, bk), (wv, bv)))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return kv_attention(q, k, v, layer, scale).reshape(b, t, -1)


@rope_gqa_attention.register_fake
def _(x, wq, wk, wv, bq, bk, bv, cos, sin, layer, scale, head_dim):
    return x.new_empty(x.shape[0], x.shape[1], wq.shape[0])


def _bias(linear):
    return linear.bias if linear.bias is not None else None


def _fused_forward(attn):
    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cos, sin = position_embeddings
        out = torch.ops.ernie.rope_gqa_attention(
            hidden_states, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, _bias(attn.q_proj),
            _bias(attn.k_proj), _bias(attn.v_proj), cos, sin, attn.layer_idx, float(attn.scaling), attn.head_dim)
        return attn.o_proj(out), None

    return forward


def _attention_modules(model):
    return [m for m in model.modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))]


def expected_sites(config) -> int:
    return config.get_text_config().num_hidden_layers


def _never_called(module, *args, **kwargs):
    raise AssertionError("fused attention modules do not call transformers' attention interface")


def install(model) -> PassReport:
    from transformers import AttentionInterface

    # An attention implementation without a mask function: transformers then builds no attention
    # mask (its mask graph would otherwise stay in the capture, unused).
    AttentionInterface.register(NAME, _never_called)
    model.set_attn_implementation(NAME)
    return swap_each(_attention_modules(model), _fused_forward, PassReport(NAME, expected=expected_sites(model.config)))


def converter(report: PassReport, ctx):
    """A `custom_convert_map` entry: `ernie.rope_gqa_attention` → one QKV matmul + one cache call."""
    from tvm import relax

    def convert(node, importer):
        bb = importer.block_builder
        op = relax.op
        env = importer.env
        x, wq, wk, wv = (env[a] for a in node.args[:4])
        biases = [env[a] if a is not None else None for a in node.args[4:7]]
        layer, scale, head_dim = int(node.args[9]), float(node.args[10]), int(node.args[11])
        b, t, _ = x.ty.shape
        hq = int(wq.ty.shape[0]) // head_dim
        h_all = (int(wq.ty.shape[0]) + int(wk.ty.shape[0]) + int(wv.ty.shape[0])) // head_dim
        w = ctx.concat_params(f"model.layers.{layer}.self_attn.qkv_proj.weight", [wq, wk, wv])
        qkv = op.matmul(x, op.permute_dims(w))  # [B, T, (Hq + 2·Hkv)·D]
        if biases[0] is not None:
            qkv = op.add(qkv, ctx.concat_params(f"model.layers.{layer}.self_attn.qkv_proj.bias", biases))
        qkv = bb.emit(op.reshape(qkv, [b * t, h_all, head_dim]))
        out = ctx.attend(bb, importer, layer, scale, qkv, hq, cos=env[node.args[7]], sin=env[node.args[8]])
        report.matched += 1
        return bb.emit(op.reshape(out, [b, t, hq * head_dim]))

    return convert
