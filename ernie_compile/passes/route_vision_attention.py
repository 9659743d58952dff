"""The VL vision tower's attention as one op: one image per call, so one full non-causal segment.

transformers' `Ernie4_5_VLMoeVisionAttention` splits packed images by `cu_seqlens.tolist()` (outside
flash attention), which torch.export cannot trace. The compiled vision step (`encode_image`) takes one
image, so its attention is a single segment; each attention module's forward is swapped for one that
hands its input and its own qkv weights to `torch.ops.ernie.vision_attention` and keeps its own proj:

    before:  qkv(x) → split by cu_seqlens.tolist() → RoPE (split halves, fp32) → softmax(qkᵀ·s)v per image → proj
    after:   ernie.vision_attention(x, Wqkv, bqkv, cos, sin, heads, s) → proj

The op's eager reference uses transformers' own `apply_rotary_pos_emb_vision`. Lowered (Relax): one
QKV matmul, the rotation from transformers' cos/sin (computed in the graph from the patch positions),
and attention over all N patches: the target's own kernel where it has one (`vision_attention` in
its native_ops: targets/cpu_attention.full_attention), else batched matmuls and a softmax (dlight
schedules them on GPUs).
"""
from __future__ import annotations

import torch

from . import PassReport, swap_forwards

NAME = "route_vision_attention"
OP_NAME = "vision_attention.default"
FUNCTIONS = ("encode_image",)  # the step functions it applies to (compiler/lower.py)


@torch.library.custom_op("ernie::vision_attention", mutates_args=())
def vision_attention(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     num_heads: int, scale: float) -> torch.Tensor:
    """Eager reference. x [N, C] (one image's patches) → attention output [N, C] (before proj)."""
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import apply_rotary_pos_emb_vision

    n = x.shape[0]
    q, k, v = torch.nn.functional.linear(x, w_qkv, b_qkv).reshape(n, 3, num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [N, H, D]
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           scale=scale)  # [H, N, D]
    return out.transpose(0, 1).reshape(n, -1)


@vision_attention.register_fake
def _(x, w_qkv, b_qkv, cos, sin, num_heads, scale):
    return x.new_empty(x.shape[0], w_qkv.shape[0] // 3)


def _forward(attn):
    def forward(hidden_states, cu_seqlens=None, position_embeddings=None, **kwargs):
        cos, sin = position_embeddings
        out = torch.ops.ernie.vision_attention(hidden_states, attn.qkv.weight, attn.qkv.bias, cos, sin,
                                               attn.num_heads, float(attn.scaling))
        return attn.proj(out)

    return forward


def expected_sites(config) -> int:
    return config.vision_config.depth if config.model_type == "ernie4_5_vl_moe" else 0


def install(model) -> PassReport:
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeVisionAttention

    return swap_forwards(model, Ernie4_5_VLMoeVisionAttention, _forward,
                         PassReport(NAME, expected=expected_sites(model.config)))


def converter(report: PassReport, ctx):
    """A `custom_convert_map` entry: `ernie.vision_attention` → QKV matmul, RoPE, softmax attention."""
    from tvm import relax

    def convert(node, importer):
        bb, op, env = importer.block_builder, relax.op, importer.env
        x, w, b, cos, sin = (env[a] for a in node.args[:5])
        heads, scale = int(node.args[5]), float(node.args[6])
        n, c = x.ty.shape
        d = int(c) // heads
        dtype = x.ty.dtype
        qkv = bb.emit(op.reshape(op.add(op.matmul(x, op.permute_dims(w)), b), [n, 3, heads, d]))  # [N, 3, H, D]
        parts = bb.emit(op.split(qkv, 3, axis=1))
        q, k, v = (bb.emit(op.squeeze(relax.TupleGetItem(parts, i), [1])) for i in range(3))  # [N, H, D]
        cos_, sin_ = (bb.emit(op.expand_dims(op.astype(t, "float32"), 1)) for t in (cos, sin))  # [N, 1, D]

        def rotate(t):  # transformers' rotate_half: [-x2, x1] of the two halves, in fp32
            t = op.astype(t, "float32")
            halves = bb.emit(op.split(t, 2, axis=-1))
            turned = op.concat([op.negative(relax.TupleGetItem(halves, 1)), relax.TupleGetItem(halves, 0)], axis=-1)
            return bb.emit(op.astype(op.add(op.multiply(t, cos_), op.multiply(turned, sin_)), dtype))

        q, k = rotate(q), rotate(k)
        report.matched += 1
        if "vision_attention" in ctx.target.native_ops:  # the target's own kernel (CPU)
            f = ctx.kernel(f"vision_attention_{heads}x{d}_{dtype}_s{scale:.6g}",
                           lambda: ctx.target_kernels.full_attention(heads, d, dtype, scale))
            out = bb.emit(relax.call_tir(f, [q, k, v], relax.TensorType((n, heads, d), dtype)))
            return bb.emit(op.reshape(out, [n, c]))
        q, k, v = (bb.emit(op.permute_dims(t, [1, 0, 2])) for t in (q, k, v))  # [H, N, D]
        scores = bb.emit(op.multiply(op.matmul(q, op.permute_dims(k, [0, 2, 1])), relax.const(scale, dtype)))
        probs = bb.emit(op.astype(op.nn.softmax(op.astype(scores, "float32"), axis=-1), dtype))  # [H, N, N]
        out = bb.emit(op.matmul(probs, v))  # [H, N, D]
        return bb.emit(op.reshape(op.permute_dims(out, [1, 0, 2]), [n, c]))

    return convert
