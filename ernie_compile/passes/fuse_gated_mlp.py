"""Fuse the gate and up projections of each dense MLP, and of each MoE layer's shared experts, into
one matmul over one weight.

Capture side (torch): each dense layer's MLP forward, and each MoE block's `shared_experts` MLP
(transformers' same gated MLP class, run by the block beside the routed experts), is swapped for one
that hands its input and its own gate/up weights to `torch.ops.ernie.gated_mlp` and keeps its own
down_proj:

    before:  down_proj(act(gate_proj(x)) * up_proj(x))
    after:   down_proj(ernie.gated_mlp(x, Wg, Wu, name, act))      name: the fused weight's

The op's eager reference uses transformers' own activation table (ACT2FN).

Lower side (Relax): Wg|Wu become one weight, concatenated once at package time (the artifact's
`mlp.gate_up_proj.weight`, `mlp.shared_experts.gate_up_proj.weight`), so a decode step streams one
[2I, C] matrix in one kernel launch instead of two [I, C] ones (and quantizes the activations once):

    after:   h = x @ Wgate_upᵀ → silu(h[..., :I]) * h[..., I:]

The routed experts keep their own route (fuse_moe_routing.py, fuse_modality_moe.py); so do MLPs
with biases or an activation other than SiLU, which no ERNIE 4.5 config has.
"""
from __future__ import annotations

import torch

from . import PassReport, decoder_layers, leading_rows

NAME = "fuse_gated_mlp"
OP_NAME = "gated_mlp.default"


@torch.library.custom_op("ernie::gated_mlp", mutates_args=())
def gated_mlp(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, name: str, act: str) -> torch.Tensor:
    """Eager reference. x [B, T, C] → act(x·Wgᵀ) · (x·Wuᵀ) [B, T, I]."""
    from transformers.activations import ACT2FN

    return ACT2FN[act](torch.nn.functional.linear(x, wg)) * torch.nn.functional.linear(x, wu)


@gated_mlp.register_fake
def _(x, wg, wu, name, act):
    return x.new_empty(*x.shape[:-1], wg.shape[0])


def _gated(mlp) -> bool:
    return all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")) and \
        mlp.gate_proj.bias is None and mlp.up_proj.bias is None


def _gated_mlps(model) -> list[tuple[str, torch.nn.Module]]:
    """(fused weight name, MLP) of every decoder layer's MLP that is a plain gated one without
    biases, and of every MoE block's shared experts that are."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if _gated(mlp):
            out.append((f"model.layers.{i}.mlp.gate_up_proj.weight", mlp))
        elif _gated(getattr(mlp, "shared_experts", None)):
            out.append((f"model.layers.{i}.mlp.shared_experts.gate_up_proj.weight", mlp.shared_experts))
    return out


def _dense_layers(config) -> int:
    """How many decoder layers of `config` have a dense MLP: transformers' Ernie4_5_MoeDecoderLayer
    makes layer i a MoE block when (i + 1) % moe_layer_interval == 0 and start <= i <= end."""
    if getattr(config, "mlp_layer_types", None) is not None:  # the VL text model lists them
        return sum(1 for kind in config.mlp_layer_types if kind == "dense")
    if not getattr(config, "moe_num_experts", 0):
        return config.num_hidden_layers
    start, end, interval = config.moe_layer_start_index, config.moe_layer_end_index, config.moe_layer_interval
    return sum(1 for i in range(config.num_hidden_layers) if not ((i + 1) % interval == 0 and start <= i <= end))


def expected_sites(config) -> int:
    """Dense layers, plus the MoE layers when the config gives them shared experts."""
    config = config.get_text_config()
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "use_bias", False):
        return 0
    dense = _dense_layers(config)
    shared = getattr(config, "moe_num_shared_experts", 0) or 0
    return dense + (config.num_hidden_layers - dense if shared else 0)


def _fused_forward(mlp, name: str, act: str):
    def forward(x):
        return mlp.down_proj(torch.ops.ernie.gated_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, name, act))

    return forward


def install(model) -> PassReport:
    act = model.config.get_text_config().hidden_act
    report = PassReport(NAME, expected=expected_sites(model.config))
    for name, mlp in _gated_mlps(model):
        mlp.forward = _fused_forward(mlp, name, act)
        report.matched += 1
    return report


def converter(report: PassReport, ctx):
    """A `custom_convert_map` entry: `ernie.gated_mlp` → one matmul over the concatenated weight,
    then SiLU of its first half times its second half: the target's `silu_mul` kernel where it has
    one (the CPU), else Relax ops for its own fusion to take."""
    from tvm import relax

    def convert(node, importer):
        bb, op = importer.block_builder, relax.op
        x, wg, wu = (importer.env[a] for a in node.args[:3])
        name, inter = str(node.args[3]), int(wg.ty.shape[0])
        w = ctx.concat_params(name, [wg, wu])
        h = bb.emit(op.matmul(x, op.permute_dims(w)))  # [B, T, 2I]
        report.matched += 1
        if "silu_mul" in ctx.target.native_ops:
            make = ctx.target_kernels.silu_mul
            lead, rows = leading_rows(h)
            dtype = h.ty.dtype
            gv = ctx.kernel(f"silu_mul_{inter}_{dtype}", lambda: make(inter, dtype))
            out = bb.emit(relax.call_tir(gv, [bb.emit(op.reshape(h, [rows, 2 * inter]))],
                                         relax.TensorType([rows, inter], dtype)))
            return bb.emit(op.reshape(out, [*lead, inter]))
        axis = len(x.ty.shape) - 1
        gate = op.strided_slice(h, axes=[axis], begin=[0], end=[inter])
        up = op.strided_slice(h, axes=[axis], begin=[inter], end=[2 * inter])
        return bb.emit(op.multiply(op.nn.silu(gate), up))

    return convert
