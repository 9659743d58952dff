"""Stage 4: captured programs → one Relax IRModule with `prefill`, `decode` and `create_kv`.

Each Relax step function takes (input_ids, position_ids, paged_kv_cache, *weights); the weights stay
function inputs (not constants) so the library is separate from the weight file and the runtime
can load them in the layout the compiled code expects.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache
from tvm.relax.frontend.torch import from_exported_program

from ..errors import InternalError
from ..passes import PassReport, all_passes
from .capture import Captured

KV_CACHE_ARGS = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window")


def _select_int(node, importer):
    """`aten.select.int` with a negative index (x[:, -1]).

    The stock converter passes the index to `take` unnormalised, which reads out of bounds (garbage,
    no error) in TVM 0.27. Normalise against the (possibly symbolic) dimension and slice instead.
    """
    bb = importer.block_builder
    x = importer.env[node.args[0]]
    dim = node.args[1] % len(x.ty.shape)
    index = node.args[2]
    if isinstance(index, int) and index < 0:
        index = x.ty.shape[dim] + index
    y = bb.emit(relax.op.strided_slice(x, axes=[dim], begin=[index], end=[index + 1]))
    return bb.emit(relax.op.squeeze(y, [dim]))


class LoweringContext:
    """What converters share: the KV-cache variable of the step being imported, and the TIR kernels
    they call, one GlobalVar per kernel name for the whole module (prefill and decode share kernels)."""

    def __init__(self):
        self.kernels: dict[str, tuple[tvm.ir.GlobalVar, tirx.PrimFunc]] = {}
        self.kv_cache = None

    def kernel(self, name: str, make) -> tvm.ir.GlobalVar:
        """The GlobalVar of kernel `name`, built by make() the first time. Name a kernel by its shapes."""
        if name not in self.kernels:
            func = make()
            # a GlobalVar typed like its function (call_tir checks the callee's type)
            self.kernels[name] = (relax.BlockBuilder().add_func(func, name), func)
        return self.kernels[name][0]


def _import_step(ep, name: str, reports: list[PassReport], passes, ctx: LoweringContext) -> relax.Function:
    """One ExportedProgram → the Relax step function `name` (kernels it calls land in ctx)."""
    kv_cache = ctx.kv_cache = relax.Var("paged_kv_cache", relax.ObjectType())
    convert_map = {p.OP_NAME: p.converter(r, ctx) for p, r in zip(passes, reports)}
    convert_map["select.int"] = _select_int
    mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True,
                                custom_convert_map=convert_map)
    f = mod["main"]
    n_in = int(f.attrs["num_input"])
    params = [*f.params[:n_in], kv_cache, *f.params[n_in:]]
    func = relax.Function(params, f.body, f.ret_ty, f.is_pure, f.attrs)
    # The importer attaches a copy of the weights as an attribute; the artifact carries them instead.
    return func.without_attr("params").with_attrs({"num_input": n_in + 1, "global_symbol": name})


def _kv_cache_module(config, dtype: str, target: tvm.target.Target) -> tvm.IRModule:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    class KVCache(nn.Module):
        def create_kv(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var, prefill_chunk_size: tirx.Var,
                      page_size: tirx.Var, support_sliding_window: tirx.Var):
            return TIRPagedKVCache(
                attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size, page_size=page_size,
                support_sliding_window=support_sliding_window,
                layer_partition=relax.ShapeExpr([0, config.num_hidden_layers]),
                num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                num_key_value_heads=config.num_key_value_heads, qk_head_dim=head_dim, v_head_dim=head_dim,
                mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                rope_mode=RopeMode.NONE, rope_scale=1, rope_theta=int(config.rope_parameters["rope_theta"]),
                rope_scaling={}, rope_ext_factors=relax.prim_value(0), rotary_dim=head_dim,
                enable_disaggregation=False, dtype=dtype, target=target)

    spec = {name: int for name in KV_CACHE_ARGS}
    spec["$"] = {"param_mode": "none", "effect_mode": "none"}
    with target:
        mod, _ = KVCache().export_tvm(spec={"create_kv": spec})
    return mod


def lower(captured: Captured, config, target: tvm.target.Target, dtype: str = "float32"):
    """Returns (IRModule, pass reports). Each pass must match its expected sites in each function."""
    passes = [p for p in all_passes() if p.expected_sites(config)]
    mod = _kv_cache_module(config, dtype, target)
    ctx = LoweringContext()
    for name in ("prefill", "decode"):
        reports = [PassReport(p.NAME, expected=p.expected_sites(config)) for p in passes]
        mod[name] = _import_step(getattr(captured, name), name, reports, passes, ctx)
        for r in reports:
            try:
                r.check()
            except InternalError as e:
                raise InternalError(f"lowering {name}: {e}") from None
    for gv, func in ctx.kernels.values():
        mod[gv] = func
    return mod, reports
