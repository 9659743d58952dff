"""Replace each ERNIE MoE block's router + experts with one op, lowered so only chosen experts run.

transformers' `Ernie4_5_MoeSparseMoeBlock` routes with a data-dependent loop over experts (one_hot /
nonzero) that torch.export cannot capture. This pass swaps the block's router + experts for
`torch.ops.ernie.moe`, keeping transformers' own shared-experts MLP module:

    before:  gate (fp32 linear) → softmax → topk(+bias) → gather → /clamp(sum) → for e in hit: … → + shared(x)
    after:   ernie.moe(x, gate.weight, e_score_correction_bias, gate_up_proj, down_proj, k, norm_min) + shared(x)

ERNIE's routing, exactly: fp32 gate linear → softmax → top-k chosen by softmax + e_score_correction_bias
(the bias only selects) → weights are the unbiased softmax values of the chosen experts → divided by
clamp(sum, moe_norm_min) → each chosen expert's SwiGLU MLP → weighted sum.

Lowered (Relax), the T·k (token, expert) pairs are sorted by expert and each expert's rows run as one
segment of a grouped GEMM (the target's `group_gemm`, e.g. targets/cpu_kernels.py): decode reads only the k chosen
experts' weights; prefill reads each chosen expert once for all its tokens. A target that lowers
`moe_route` natively (WebGPU: no GPU sort it can run) routes with that kernel and keeps the pairs in
(token, slot) order; its grouped GEMMs read each row's expert id.
"""
from __future__ import annotations

import numpy as np
import torch

from . import PassReport, swap_forwards

NAME = "fuse_moe_routing"
OP_NAME = "moe.default"  # how the importer names torch.ops.ernie.moe


@torch.library.custom_op("ernie::moe", mutates_args=())
def moe(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor, top_k: int, norm_min: float) -> torch.Tensor:
    """Eager reference. x [T, H]; gate_weight [E, H]; bias [1, E]; gate_up_proj [E, 2I, H];
    down_proj [E, H, I] → [T, H]."""
    probs = torch.softmax(torch.nn.functional.linear(x.float(), gate_weight.float()), dim=1)  # [T, E]
    _, chosen = torch.topk(probs + bias.reshape(-1), top_k, dim=-1)  # [T, k], the bias only selects
    weights = probs.gather(-1, chosen)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=norm_min)  # [T, k]
    out = torch.zeros_like(x)
    for e in chosen.unique().tolist():
        tok, slot = torch.where(chosen == e)
        gate, up = torch.nn.functional.linear(x[tok], gate_up_proj[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down_proj[e])
        out.index_add_(0, tok, y * weights[tok, slot, None].to(x.dtype))
    return out


@moe.register_fake
def _(x, gate_weight, bias, gate_up_proj, down_proj, top_k, norm_min):
    return torch.empty_like(x)


def _fused_forward(block):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [T, H]
        gate, experts = block.gate, block.experts
        out = torch.ops.ernie.moe(x, gate.weight, gate.moe_statics.e_score_correction_bias, experts.gate_up_proj,
                                  experts.down_proj, gate.top_k, float(gate.norm_min))
        if block.shared_experts is not None:
            out = out + block.shared_experts(x)
        return out.reshape(b, t, h)

    return forward


def expected_sites(config) -> int:
    """How many layers ERNIE makes MoE: moe_layer_start_index ≤ i ≤ end, (i + 1) % interval == 0."""
    if config.model_type != "ernie4_5_moe":  # a dense config may still carry moe_* keys
        return 0
    end = config.moe_layer_end_index if config.moe_layer_end_index >= 0 else config.num_hidden_layers - 1
    return sum(1 for i in range(config.num_hidden_layers)
               if (i + 1) % config.moe_layer_interval == 0 and config.moe_layer_start_index <= i <= end)


def install(model) -> PassReport:
    """Swap every MoE block's forward for the fused op (in place, on this model instance)."""
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    return swap_forwards(model, Ernie4_5_MoeSparseMoeBlock, _fused_forward,
                         PassReport(NAME, expected=expected_sites(model.config)))


def emit_moe(bb, ctx, x, gate_w, bias, gate_up, down, top_k: int, norm_min: float):
    """Relax for one routed MoE (no shared experts): x [T, H] → [T, H]; the chosen experts alone run."""
    from tvm import relax

    op = relax.op
    t = x.ty.shape[0]
    num_experts, two_i, h = (int(d) for d in gate_up.ty.shape)
    inter = two_i // 2
    dtype = x.ty.dtype
    idx = ctx.index_dtype  # of expert ids and row orders: int32 where the target has no int64
    emit = bb.emit
    # routing, fp32
    probs = emit(op.nn.softmax(op.matmul(op.astype(x, "float32"), op.permute_dims(gate_w)), axis=-1))  # [T, E]
    group_gemm = ctx.target_kernels.group_gemm
    f_up = ctx.kernel(f"moe_group_gemm_{num_experts}x{two_i}x{h}_{dtype}_{idx}",
                      lambda: group_gemm(num_experts, two_i, h, dtype, index_dtype=idx))
    f_down = ctx.kernel(f"moe_group_gemm_{num_experts}x{h}x{inter}_{dtype}_{idx}",
                        lambda: group_gemm(num_experts, h, inter, dtype, index_dtype=idx))
    m = t * top_k

    def experts(rows, indptr, expert_ids):  # [M, H] rows, each through its expert's SwiGLU MLP
        gu = emit(relax.call_tir(f_up, [rows, indptr, expert_ids, gate_up], relax.TensorType((m, two_i), dtype)))
        halves = emit(op.split(gu, 2, axis=1))
        act = emit(op.multiply(op.nn.silu(relax.TupleGetItem(halves, 0)), relax.TupleGetItem(halves, 1)))  # [M, I]
        return emit(relax.call_tir(f_down, [act, indptr, expert_ids, down], relax.TensorType((m, h), dtype)))

    if "moe_route" in ctx.target.native_ops:  # no sort on the target (WebGPU): see its kernel
        route = ctx.target_kernels.moe_route
        f_route = ctx.kernel(f"moe_route_{num_experts}x{top_k}_n{norm_min:g}_{idx}".replace("-", "m").replace(".", "p"),
                             lambda: route(num_experts, top_k, norm_min, idx))
        routed = emit(relax.call_tir(f_route, [probs, bias], [relax.TensorType((t, top_k), idx),
                                                              relax.TensorType((t, top_k), "float32")]))
        flat = emit(op.reshape(relax.TupleGetItem(routed, 0), [m]))  # [M] expert of (token, slot)
        rows = emit(op.take(x, op.floor_divide(op.arange(0, m, dtype=idx), relax.const(top_k, idx)), axis=0))
        unused = relax.const(np.zeros(num_experts + 1, idx))  # indptr: only the CPU kernels read it
        y = experts(rows, unused, flat)
        y = emit(op.multiply(y, op.expand_dims(op.astype(op.reshape(relax.TupleGetItem(routed, 1), [m]), dtype), 1)))
        return emit(op.sum(op.reshape(y, [t, top_k, h]), axis=1))  # [T, H]
    chosen = emit(op.topk(op.add(probs, op.reshape(bias, [num_experts])), top_k, axis=-1,
                          ret_type="indices", dtype=idx))  # [T, k]
    weights = emit(op.gather_elements(probs, chosen, axis=1))
    weights = emit(op.divide(weights, op.maximum(op.sum(weights, axis=-1, keepdims=True),
                                                 relax.const(norm_min, "float32"))))  # [T, k]
    # sort the T·k (token, expert) pairs by expert
    flat = emit(op.reshape(chosen, [m]))
    order = emit(op.argsort(flat, dtype=idx))  # [M]
    sorted_e = emit(op.take(flat, order))
    rows = emit(op.take(x, op.floor_divide(order, relax.const(top_k, idx)), axis=0))  # [M, H]
    bounds = op.arange(0, num_experts + 1, dtype=idx)
    indptr = emit(op.sum(op.astype(op.less(op.expand_dims(sorted_e, 0), op.expand_dims(bounds, 1)), idx),
                         axis=1))  # [E+1]: rows before expert e
    y = experts(rows, indptr, sorted_e)
    y = emit(op.multiply(y, op.expand_dims(op.astype(op.take(op.reshape(weights, [m]), order), dtype), 1)))
    y = emit(op.take(y, op.argsort(order, dtype=idx), axis=0))  # back to (token, slot) order
    return emit(op.sum(op.reshape(y, [t, top_k, h]), axis=1))  # [T, H]


def converter(report: PassReport, ctx):
    """A `custom_convert_map` entry: `ernie.moe` → routing ops + two grouped GEMMs (Relax)."""

    def convert(node, importer):
        x, gate_w, bias, gate_up, down = (importer.env[a] for a in node.args[:5])
        report.matched += 1
        return emit_moe(importer.block_builder, ctx, x, gate_w, bias, gate_up, down, int(node.args[5]),
                        float(node.args[6]))

    return convert
