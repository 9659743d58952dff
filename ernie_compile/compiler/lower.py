"""Captured programs → one Relax IRModule with `prefill`, `decode`, `create_kv` (and `batch` if captured).

Each Relax step function takes (input_ids, position_ids, paged_kv_cache, *weights); the weights stay
function inputs (not constants) so the library is separate from the weight file and the runtime
can load them in the layout the compiled code expects.

A target with `kv_cache = "contiguous"` (WebGPU: no C++ runtime objects on the host)
gets no `create_kv`; its step functions take (input_ids, position_ids, k_cache_0, v_cache_0, …,
*weights) instead, caches the attention kernels update in place (targets/webgpu_kernels.py).
"""
from __future__ import annotations

import contextlib

import tvm
from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache
from tvm.relax.frontend.torch import from_exported_program

from ..errors import InternalError
from ..passes import PassReport, applies_to
from ..passes.kernel_table import KernelTable
from ..passes.weight_records import WeightRecord
# tokens per KV-cache page, baked into the library's kernels; the runtime's schema requires it
from ..runtime.schema import KV_PAGE_SIZE as PAGE_SIZE
from . import validate
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


def _slice(node, importer):
    """`aten.slice.Tensor` from a negative start to the end (transformers' `logits_to_keep`: x[:, -1:]).

    The stock converter slices to INT64_MAX and Relax cannot simplify the resulting length
    min(INT64_MAX, T) − min(max(T − 1, 0), T) to 1: the symbolic length reaches kernels as an extra
    argument, and no int32 can hold the constant (WebGPU). Slice [T − n, T) instead; other slices
    take the stock converter."""
    import sys

    x = importer.env[node.args[0]]
    dim, start, end = (list(node.args[1:4]) + [None] * 3)[:3]
    step = node.args[4] if len(node.args) > 4 else 1
    if isinstance(start, int) and start < 0 and (end is None or (isinstance(end, int) and end >= sys.maxsize)) \
            and step == 1:
        dim %= len(x.ty.shape)
        size = x.ty.shape[dim]
        return importer.block_builder.emit(relax.op.strided_slice(x, axes=[dim], begin=[size + start], end=[size]))
    return importer._slice(node)


def _linear_in_input_dtype(node, importer):
    """`aten.linear` / `mm` / `addmm` / `matmul` as torch computes them: the result in the input's dtype.
    The stock converters return float32 for float16 inputs and let it flow on, which a LayerNorm
    reading it with float16 weights refuses (the VL vision tower on float16 targets), as does the
    KV-cache route's concat of q, k (cast back after RoPE) with v. Accumulation stays in float32, then
    one cast; float32 graphs are unchanged."""
    bb = importer.block_builder
    args = importer.retrieve_args(node)
    x, w = args[0], args[1]
    if "linear" in str(node.target):
        y = bb.emit(relax.op.linear(x, w, args[2] if len(args) > 2 else None, "float32"))
    elif "addmm" in str(node.target):  # addmm(bias, x, w)
        bias, x, w = args[0], args[1], args[2]
        y = bb.emit(relax.op.add(relax.op.matmul(x, w, out_dtype="float32"), relax.op.astype(bias, "float32")))
    else:
        y = bb.emit(relax.op.matmul(x, w, out_dtype="float32"))
    return y if x.ty.dtype == "float32" else bb.emit(relax.op.astype(y, x.ty.dtype))


class LoweringContext:
    """What converters share: the target (its declared facts and kernel builders), the KV cache of
    the step being imported, and the TIR kernels they call, one GlobalVar per kernel name for the
    whole module (prefill and decode share kernels)."""

    def __init__(self, target, config=None, max_seq_len: int = 0, dtype: str = "float32"):
        self.target = target  # targets/base.py
        self.target_kernels = target.kernels  # its kernel builders (targets/cpu_kernels.py, …)
        self.contiguous = target.kv_cache == "contiguous"
        self.index_dtype = target.index_dtype  # of indices the graph makes
        self.config, self.max_seq_len, self.dtype = config, max_seq_len, dtype
        self.kernels = KernelTable()
        self.kv_cache = None
        self.caches: dict[int, tuple[relax.Var, relax.Var]] = {}
        self.concats: dict[str, tuple[relax.Var, list[relax.Var]]] = {}

    def begin_step(self) -> None:
        """New variables for the next step function (Relax variables belong to one function)."""
        self.kv_cache = relax.Var("paged_kv_cache", relax.ObjectType())
        self.caches, self.concats = {}, {}

    def cache_params(self) -> list[relax.Var]:
        if not self.contiguous:
            return [self.kv_cache]
        return [v for layer in sorted(self.caches) for v in self.caches[layer]]

    def attend(self, bb, importer, layer: int, scale: float, qkv, num_q_heads: int, cos=None, sin=None):
        """Causal GQA attention of qkv [B·T, Hq+2·Hkv, D] over the cached past plus these tokens →
        [B·T, Hq, D]. `cos`/`sin` (transformers' [1, T, D] rotary tables) are given when RoPE is still
        to be applied to q and k; the paged cache computes its own from the positions it tracks."""
        bt, h_all, d = qkv.ty.shape
        dtype = qkv.ty.dtype
        out_ty = relax.TensorType((bt, num_q_heads, d), dtype)
        if not self.contiguous:
            return bb.emit(relax.call_dps_packed(
                "vm.builtin.attention_kv_cache_attention_with_fused_qkv",
                [self.kv_cache, relax.prim_value(layer), relax.prim_value(scale), qkv], out_ty=out_ty))
        if cos is None:
            raise InternalError("a contiguous KV cache needs the rotary tables (fuse_gqa_attention)")
        hq, d = num_q_heads, int(d)
        hkv = (int(h_all) - hq) // 2
        cache_ty = relax.TensorType((self.max_seq_len, hkv, d), dtype)
        k, v = self.caches[layer] = (relax.Var(f"k_cache_{layer}", cache_ty), relax.Var(f"v_cache_{layer}", cache_ty))
        pos = _input(importer, "position_ids")
        kern = self.target_kernels
        idx = pos.ty.dtype
        f_append = self.kernel(f"kv_append_{hq}x{hkv}x{d}_{self.max_seq_len}_{dtype}_{cos.ty.dtype}_{idx}",
                               lambda: kern.kv_append(hq, hkv, d, self.max_seq_len, dtype, cos.ty.dtype, idx))
        f_attn = self.kernel(f"attention_{hq}x{hkv}x{d}_{self.max_seq_len}_{dtype}_s{scale:.6g}_{idx}",
                             lambda: kern.attention(hq, hkv, d, self.max_seq_len, dtype, scale, idx))
        res = bb.emit(relax.call_tir_inplace(f_append, [qkv, cos, sin, pos, k, v], [4, 5, -1],
                                             [cache_ty, cache_ty, out_ty]))  # caches updated, q RoPE'd
        q = bb.emit(relax.TupleGetItem(res, 2))
        k2, v2 = bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))
        return bb.emit(relax.call_tir(f_attn, [q, pos, k2, v2], out_ty))

    def concat_params(self, name: str, parts: list[relax.Var]) -> relax.Var:
        """A new weight input `name` = concat(parts, axis 0), computed once at package time instead
        of at every step. The parts stop being inputs if nothing else uses them."""
        rows = sum(int(p.ty.shape[0]) for p in parts)
        rest = [parts[0].ty.shape[i] for i in range(1, len(parts[0].ty.shape))]
        var = relax.Var(name, relax.TensorType([rows, *rest], parts[0].ty.dtype))
        self.concats[name] = (var, parts)
        return var

    def kernel(self, name: str, make) -> tvm.ir.GlobalVar:
        """The GlobalVar of kernel `name`, built by make() the first time. Name a kernel by its shapes."""
        return self.kernels.get(name, make)


@contextlib.contextmanager
def _weightless_params():
    """The importer converts every parameter to a TVM tensor for a "params" attribute we drop
    (the artifact carries the weights). A streaming compile captures parameters as fake tensors,
    which hold no data: they become empty placeholders instead of views of nothing."""
    from torch._subclasses.fake_tensor import FakeTensor
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    convert = ExportedProgramImporter.__dict__["_convert_pytorch_tensor_to_tvm"]

    def placeholder(tensor):
        if isinstance(tensor, FakeTensor) or tensor.is_meta:
            return tvm.runtime.empty((0,), str(tensor.dtype).removeprefix("torch."))
        return convert.__func__(tensor)

    ExportedProgramImporter._convert_pytorch_tensor_to_tvm = staticmethod(placeholder)
    try:
        yield
    finally:
        ExportedProgramImporter._convert_pytorch_tensor_to_tvm = convert


def _import_step(ep, name: str, reports: list[PassReport], passes, ctx: LoweringContext,
                 param_names: dict[str, str]) -> tuple[relax.Function, list[WeightRecord]]:
    """One ExportedProgram → (the Relax step function `name`, the weights it takes, in order).
    Kernels the converters call land in ctx."""
    ctx.begin_step()
    convert_map = {p.OP_NAME: p.converter(r, ctx) for p, r in zip(passes, reports)}
    convert_map["select.int"] = _select_int
    convert_map["slice.Tensor"] = _slice
    for op_name in ("linear.default", "mm.default", "matmul.default", "addmm.default"):
        convert_map[op_name] = _linear_in_input_dtype
    with _weightless_params():
        mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True,
                                    custom_convert_map=convert_map)
    f = mod["main"]
    n_in = int(f.attrs["num_input"])
    used = {str(v) for v in relax.analysis.free_vars(f.body)}
    weights, weight_vars = [], []

    def record(weight: str, sources: list[str], var) -> WeightRecord:
        return WeightRecord(weight, tuple(sources), tuple(int(d) for d in var.ty.shape), str(var.ty.dtype))

    for v in f.params[n_in:]:
        if str(v) in used:
            weights.append(record(param_names[str(v)], [param_names[str(v)]], v))
            weight_vars.append(v)
    for new_name, (var, parts) in ctx.concats.items():
        weights.append(record(new_name, [param_names[str(p)] for p in parts], var))
        weight_vars.append(var)
    caches = [v for v in ctx.cache_params() if str(v) in used]  # none in a step without attention (encode_image)
    params = [*f.params[:n_in], *caches, *weight_vars]
    func = relax.Function(params, f.body, f.ret_ty, f.is_pure, f.attrs)
    # The importer attaches a copy of the weights as an attribute; the artifact carries them instead.
    func = func.without_attr("params").with_attrs({"num_input": n_in + len(caches), "global_symbol": name})
    return func, weights


def _kv_cache_module(config, dtype: str, target, rope_mode: str) -> tvm.IRModule:
    """`create_kv`: TVM's paged KV cache with TIR kernels for `target` (ours; it may replace some of
    TVM's kernels with its own). rope_mode "normal": the cache applies ERNIE's interleaved (GPT-J)
    RoPE to q/k itself, at position × scale (the config's RoPE type, validate.rope: 1 by default,
    1/factor for "linear"); "none": the graph already did."""
    theta, scale = validate.rope(config)
    tvm_target = target.tvm
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
                rope_mode=RopeMode.NORMAL if rope_mode == "normal" else RopeMode.NONE, rope_scale=scale,
                rope_theta=theta,
                rope_scaling={"rope_type": "gptj"}, rope_ext_factors=relax.prim_value(0), rotary_dim=head_dim,
                enable_disaggregation=False, dtype=dtype, target=tvm_target)

    spec = {name: int for name in KV_CACHE_ARGS}
    spec["$"] = {"param_mode": "none", "effect_mode": "none"}
    with tvm_target:
        mod, _ = KVCache().export_tvm(spec={"create_kv": spec})
    heads = (config.num_key_value_heads, config.num_attention_heads, head_dim, dtype, PAGE_SIZE)
    for name, kernel in target.kernels.kv_cache_overrides(*heads, theta, scale).items():
        mod[mod.get_global_var(name)] = kernel.with_attr("global_symbol", name)
    return mod


def _input(importer, name: str):
    """The Relax variable of the captured program's input `name`."""
    for node, value in importer.env.items():
        if getattr(node, "op", None) == "placeholder" and node.name == name:
            return value
    raise InternalError(f"the captured program has no input {name!r}")


def lower(captured: Captured, config, target, passes: list, dtype: str = "float32", max_seq_len: int = 0):
    """`target` is ours (targets/): its TVM target and the kernels it supplies. Returns (IRModule, pass
    reports, weights in the order the step functions take them). Each pass must match its expected
    sites in each step function it applies to (passes.applies_to). Every step function takes the same
    weights, the union of what the steps read (the VL model's text steps take the vision tower's
    weights unread): the runtime binds one list. `max_seq_len` sizes contiguous KV caches."""
    rope_modes = {getattr(p, "ROPE_MODE") for p in passes if hasattr(p, "ROPE_MODE")}
    if len(rope_modes) != 1:
        raise InternalError(f"exactly one attention pass must run, got {[p.NAME for p in passes]}")
    text_config = config.get_text_config()
    ctx = LoweringContext(target, text_config, max_seq_len, dtype)
    mod = tvm.IRModule() if ctx.contiguous else _kv_cache_module(text_config, dtype, target, rope_modes.pop())
    funcs, step_weights, all_reports = {}, {}, {}
    for name, program in captured.programs().items():
        reports = [PassReport(p.NAME, expected=p.expected_sites(config) if applies_to(p, name) else 0)
                   for p in passes]
        funcs[name], step_weights[name] = _import_step(program, name, reports, passes, ctx, captured.param_names)
        for p, r in zip(passes, reports):
            try:
                r.check()
            except InternalError as e:
                raise InternalError(f"lowering {name}: {e}") from None
            if not applies_to(p, name) and r.matched:
                raise InternalError(f"lowering {name}: pass {p.NAME} matched {r.matched} sites in a step it "
                                    "does not apply to")
        all_reports[name] = reports
    union: dict[str, WeightRecord] = {}
    for weights in step_weights.values():
        for w in weights:
            if union.setdefault(w.name, w) != w:
                raise InternalError(f"the steps take weight {w.name} in different forms")
    order = list(union.values())
    for name, func in funcs.items():
        mod[name] = _take_weights(func, step_weights[name], order)
    ctx.kernels.add_to(mod)
    # the report of each pass: decode's, or for a pass of the image steps alone, that step's
    shown = [n for n in ("decode", "prefill_mm", "encode_image") if n in all_reports]
    reports = [next((all_reports[n][i] for n in shown if applies_to(p, n)), all_reports["decode"][i])
               for i, p in enumerate(passes)]
    return mod, reports, order


def _take_weights(func: relax.Function, weights: list[WeightRecord], order: list[WeightRecord]) -> relax.Function:
    """`func` with its weight parameters in `order`, a fresh unread parameter for each it does not read."""
    n_in = int(func.attrs["num_input"])
    mine = {w.name: v for w, v in zip(weights, func.params[n_in:])}
    if len(mine) != len(weights):
        raise InternalError(f"{func.attrs['global_symbol']}: weight records and parameters disagree")
    params = list(func.params[:n_in]) + [mine[w.name] if w.name in mine else
                                         relax.Var(w.name, relax.TensorType(w.shape, w.dtype)) for w in order]
    return relax.Function(params, func.body, func.ret_ty, func.is_pure, func.attrs)
