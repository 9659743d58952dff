"""Quantize weights group-wise and fuse their dequantization into the kernels that read them.

For every weight input the policy quantizes (ernie_compile/quant.py), the input W becomes three inputs
(packed codes, group scales, group offsets) and each reader of W becomes a kernel that dequantizes
as it goes:

    before:  y = R.matmul(x, R.permute_dims(W))       e = R.take(W, ids, axis=0)       R.call_tir(moe_group_gemm, (x, ptr, ids, W))
    after:   y = call_tir(linear_q, (x, Wq, Ws, Wm))   e = call_tir(take_q, (ids, Wq, Ws, Wm))   call_tir(moe_group_gemm_q, (x, ptr, ids, Wq, Ws, Wm))

Any other reader left after the rewrite is an error: no full-precision copy of a quantized weight
may exist at run time. Each replaced weight's record gains its QuantSpec, so the packager writes
the quantized tensors in the layout the kernels take. The kernels of vnni16 weights (int8
activations, dense and stacked experts alike) are built with the target's int8 dot (Target.int8_dot),
which their names carry.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx

from .kernel_table import KernelTable
from ..quant import QuantPolicy
from . import PassReport, leading_rows, linear_read, rewrite_weight_inputs
from .weight_records import WeightRecord

NAME = "quantize_weights"


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, quantized: dict, kernels: KernelTable, target, schedule):
        super().__init__(mod)
        self.quantized = quantized  # weight Var → (spec, (qw, qs, qm) Vars)
        self.kernels = kernels
        self.target, self.make = target, target.kernels
        self.schedule = schedule  # (kernel name, key fields) → its schedule parameters
        self.sites = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        op = call.op
        if not isinstance(op, tvm.ir.Op):
            return call
        if op.name == "relax.matmul":
            return self._linear(call)
        if op.name == "relax.take":
            return self._take(call)
        if op.name == "relax.call_tir":
            return self._group_gemm(call)
        return call

    def _dot(self, spec) -> dict:
        """The int8 dot kind for a vnni16 weight's kernel (GPU kernels never see vnni16)."""
        return {"int8_dot": self.target.int8_dot} if spec.layout == "vnni16" else {}

    def _layout(self, spec) -> str:
        """The layout in a kernel's name, with the int8 dot of a vnni16 one: two kinds never share a kernel."""
        return f"{spec.layout}_{self.target.int8_dot}" if spec.layout == "vnni16" else spec.layout

    def _weight(self, expr):
        return self.quantized.get(expr) if isinstance(expr, relax.Var) else None

    def _linear(self, call):
        x = call.args[0]
        read = linear_read(self, call)
        entry = self._weight(read.weight) if read is not None else None
        if entry is None:
            return call
        spec, parts = entry
        n, k = (int(d) for d in read.weight.ty.shape)
        lead, m = leading_rows(x)
        # GPU targets schedule M = 1 (decode, a GEMV) and M symbolic (prefill, a GEMM) differently
        static_m = int(m) if self.target.static_m and isinstance(m, (int, tirx.IntImm)) else None
        # the importer may accumulate a float16 linear in float32 (matmul out_dtype): keep its output type
        out = {"out_dtype": call.ty.dtype} if call.ty.dtype != x.ty.dtype else {}
        gv = self.kernels.get(f"linear_q{spec.bits}g{spec.group_size}_{self._layout(spec)}_{n}x{k}_{x.ty.dtype}"
                              + (f"_m{static_m}" if static_m else "") + (f"_{call.ty.dtype}" if out else ""),
                              lambda: self.make.linear_q(n, k, spec, x.ty.dtype, m=static_m, **out, **self._dot(spec)))
        y = relax.call_tir(gv, [self.builder_.emit(relax.op.reshape(x, [m, k])), *parts],
                           relax.TensorType((m, n), call.ty.dtype))
        self.sites += 1
        return relax.op.reshape(self.builder_.emit(y), [*lead, n])

    def _take(self, call):
        entry = self._weight(call.args[0])
        if entry is None:
            return call
        spec, parts = entry
        vocab, dim = (int(d) for d in call.args[0].ty.shape)
        ids = call.args[1]
        shape = [ids.ty.shape[i] for i in range(len(ids.ty.shape))]
        t = 1
        for d in shape:
            t = t * d
        idx = self.target.index_dtype
        flat = self.builder_.emit(relax.op.reshape(relax.op.astype(ids, idx), [t]))
        dtype = call.args[0].ty.dtype
        extra = {"index_dtype": idx} if idx != "int64" else {}
        gv = self.kernels.get(f"take_q{spec.bits}g{spec.group_size}_{spec.layout}_{vocab}x{dim}_{dtype}_{idx}",
                              lambda: self.make.take_q(vocab, dim, spec, dtype, **extra))
        out = self.builder_.emit(relax.call_tir(gv, [flat, *parts], relax.TensorType((t, dim), dtype)))
        self.sites += 1
        return relax.op.reshape(out, [*shape, dim])

    def _group_gemm(self, call):
        callee, args = call.args[0], call.args[1]
        if not (isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint.startswith("moe_group_gemm")):
            return call
        x, indptr, expert_ids, w = args.fields
        entry = self._weight(w)
        if entry is None:
            return call
        spec, parts = entry
        e, n, k = (int(d) for d in w.ty.shape)
        dtype = x.ty.dtype
        idx = expert_ids.ty.dtype
        name = f"moe_group_gemm_q{spec.bits}g{spec.group_size}_{self._layout(spec)}_{e}x{n}x{k}_{dtype}_{idx}"
        # the int8 kernel's tokens / prefetch / chunk: the tuning database's best where it has them
        params = self.schedule("moe_group_gemm_q_vnni", {"shape": [e, n, k], "dtype": str(dtype), "quant": spec.as_dict(),
                                                         "index_dtype": str(idx), **self._dot(spec)}) \
            if spec.layout == "vnni16" else {}
        gv = self.kernels.get(name, lambda: self.make.group_gemm_q(e, n, k, spec, dtype, index_dtype=idx,
                                                                    **self._dot(spec), **params))
        self.sites += 1
        return relax.call_tir(gv, [x, indptr, expert_ids, *parts], call.ty)


def _part_vars(record: WeightRecord) -> tuple[relax.Var, ...]:
    return tuple(relax.Var(t.name, relax.TensorType(list(t.shape), t.dtype)) for t in record.stored)


def run(mod: tvm.IRModule, weights: list[WeightRecord], policy: QuantPolicy, target,
        functions=None, tuner=None, top_k: int = 1) -> tuple[tvm.IRModule, list[WeightRecord], PassReport]:
    """Returns the module, the new weight records (aligned with the step functions' weight inputs),
    and the report: matched = readers rewritten per step function, expected = readers of those
    weights. `target` (targets/base.py) builds the dequantizing kernels and says which layouts they read.
    `tuner` (compiler/tuning.py) gives the schedule parameters of the target's tunable kernels among
    them (the MoE experts' grouped GEMM, whose measurements route `top_k` rows per token)."""
    report = PassReport(NAME)
    kernels = KernelTable()

    def schedule(kernel: str, fields: dict) -> dict:
        if tuner is None or kernel not in target.tunable:  # target.tunable: its kernels' TUNABLE names
            return {}
        fields = dict(fields, shape=[*fields["shape"], top_k])
        return tuner.params(target.kernels.TUNABLE[kernel], {"target": str(target.tvm), "kernel": kernel, **fields})

    def replace(var, w: WeightRecord):
        shape = w.shape
        spec = policy.spec_for(w.weight, shape[-1], shape[-2], target.quant_layouts,
                               target.int8_weight_bits) if len(shape) >= 2 else None
        if spec is None:
            return None
        record = w.replace(quant=spec)
        parts = _part_vars(record)
        return (spec, parts), parts, [record]

    mod, new_weights, report.matched = rewrite_weight_inputs(
        mod, weights, functions, NAME, "float weights", replace,
        lambda m, quantized: _Rewriter(m, quantized, kernels, target, schedule))
    report.expected = report.matched
    kernels.add_to(mod)
    return mod, new_weights, report
