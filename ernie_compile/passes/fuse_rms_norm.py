"""Fuse each decoder RMSNorm (every layer's two, and the final one) into one op.

Capture side (torch): transformers' RMSNorm modules of the decoder (Ernie4_5RMSNorm and its MoE /
VL twins, one forward) are swapped for one that hands its input, weight and epsilon to
`torch.ops.ernie.rms_norm`:

    before:  w · (x · rsqrt(mean(x², -1) + eps))       (in float32, cast back to x's dtype)
    after:   ernie.rms_norm(x, w, eps)

Lower side (Relax): the target's `rms_norm` kernel where it has one (the CPU: one call per norm
where the importer made six — power, mean, add, rsqrt and two products — each a VM call with its own
output to allocate; a 0.3b batch step makes 1,898 VM calls instead of 2,420), else the same Relax
ops the importer made, for the target's own fusion to take.
"""
from __future__ import annotations

import torch

from . import PassReport, decoder_layers, leading_rows, swap_each, text_decoder

NAME = "fuse_rms_norm"
OP_NAME = "rms_norm.default"


@torch.library.custom_op("ernie::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Eager reference, transformers' RMSNorm forward. x [..., C], w [C] → [..., C]."""
    xf = x.to(torch.float32)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@rms_norm.register_fake
def _(x, w, eps):
    return torch.empty_like(x)


def _norms(model) -> list[torch.nn.Module]:
    """The decoder's RMSNorms: each layer's input and post-attention norms, then the final norm."""
    found = [getattr(layer, a) for layer in decoder_layers(model) for a in ("input_layernorm", "post_attention_layernorm")]
    found.append(text_decoder(model).norm)
    return [m for m in found if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")]


def expected_sites(config) -> int:
    return 2 * config.get_text_config().num_hidden_layers + 1


def _fused_forward(norm):
    def forward(x):
        return torch.ops.ernie.rms_norm(x, norm.weight, float(norm.variance_epsilon))

    return forward


def install(model) -> PassReport:
    return swap_each(_norms(model), _fused_forward, PassReport(NAME, expected=expected_sites(model.config)))


def converter(report: PassReport, ctx):
    """A `custom_convert_map` entry: `ernie.rms_norm` → the target's kernel over [rows, C], or the
    importer's own ops (float32 inside, as transformers computes it)."""
    from tvm import relax

    def convert(node, importer):
        bb, op = importer.block_builder, relax.op
        x, w = importer.env[node.args[0]], importer.env[node.args[1]]
        eps = float(node.args[2])
        report.matched += 1
        lead, rows = leading_rows(x)
        c = x.ty.shape[len(lead)]
        dtype, hidden = x.ty.dtype, int(c)
        if "rms_norm" in ctx.target.native_ops:
            make = ctx.target_kernels.rms_norm
            gv = ctx.kernel(f"rms_norm_{hidden}_{dtype}_{w.ty.dtype}_e{eps:.6g}", lambda: make(hidden, eps, dtype, w.ty.dtype))
            out = bb.emit(relax.call_tir(gv, [bb.emit(op.reshape(x, [rows, c])), w], relax.TensorType([rows, c], dtype)))
            return bb.emit(op.reshape(out, [*lead, c]))
        xf = x if dtype == "float32" else bb.emit(op.astype(x, "float32"))
        var = bb.emit(op.mean(op.power(xf, relax.const(2.0, "float32")), axis=[len(lead)], keepdims=True))
        y = bb.emit(op.multiply(xf, op.rsqrt(op.add(var, relax.const(eps, "float32")))))
        y = y if dtype == "float32" else bb.emit(op.astype(y, dtype))
        return bb.emit(op.multiply(w, y))

    return convert
