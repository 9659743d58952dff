"""Route every attention layer through one op of ours, then map that op onto TVM's paged KV cache.

Capture side (torch): transformers' attention registry gets an implementation named
`ernie_kv_cache` that calls `torch.ops.ernie.kv_attention`, a custom op with an eager reference and
a fake kernel, so torch.export keeps it whole. With a registered implementation that has no mask
function, transformers builds no attention mask at all: no mask-construction graph to import.

    before:  q,k,v (RoPE applied) → repeat_kv → q@kᵀ·s + mask → softmax → @v           (per layer)
    after:   q,k,v (RoPE applied) → ernie.kv_attention(q, k, v, layer, s)

Lower side (Relax): each `kv_attention` becomes one call into the paged KV cache, which appends
k/v for the current tokens and attends over everything cached for the sequence (causal, GQA with
each K/V head read once per query group):

    after:   qkv = concat(q, k, v) → vm.builtin.attention_kv_cache_attention_with_fused_qkv(cache, layer, s, qkv)

The cache is created by a `create_kv` function built into the same library (lower.py), with
RopeMode.NONE because RoPE was already applied in the captured graph.
"""
from __future__ import annotations

import torch

from . import PassReport

NAME = "route_attention_to_kv_cache"
ROPE_MODE = "none"  # RoPE stays in the captured graph
ATTN_IMPLEMENTATION = "ernie_kv_cache"
OP_NAME = "kv_attention.default"  # how the importer names torch.ops.ernie.kv_attention


@torch.library.custom_op("ernie::kv_attention", mutates_args=())
def kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """Causal GQA attention of a whole sequence with no past (the eager reference).

    q [B, Hq, T, D], k/v [B, Hkv, T, D] → [B, T, Hq, D]. Compiled, the op also sees the cached past.
    """
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(1, 2).contiguous()


@kv_attention.register_fake
def _(q, k, v, layer, scale):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return torch.ops.ernie.kv_attention(query, key, value, module.layer_idx, float(scaling)), None


def expected_sites(config) -> int:
    return config.get_text_config().num_hidden_layers


def install(model) -> PassReport:
    """Make `model` use our attention op (transformers' AttentionInterface registry)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    return PassReport(NAME, matched=len(layers), expected=expected_sites(model.config))


def converter(report: PassReport, ctx):
    """A `custom_convert_map` entry: `ernie.kv_attention` → one paged-KV-cache attention call."""
    from tvm import relax

    def convert(node, importer):
        bb = importer.block_builder
        q, k, v = (importer.env[a] for a in node.args[:3])
        layer, scale = node.args[3], node.args[4]
        b, hq, t, d = q.ty.shape
        qkv = bb.emit(relax.op.concat([relax.op.permute_dims(x, [0, 2, 1, 3]) for x in (q, k, v)], axis=2))
        h_all = qkv.ty.shape[2]
        qkv = bb.emit(relax.op.reshape(qkv, [b * t, h_all, d]))  # [B·T, Hq+2·Hkv, D]
        out = ctx.attend(bb, importer, int(layer), float(scale), qkv, int(hq))
        report.matched += 1
        return bb.emit(relax.op.reshape(out, [b, t, hq, d]))  # [B, T, Hq, D]

    return convert
