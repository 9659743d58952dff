"""Split weights larger than a target's storage-binding limit into row blocks, and their readers with them.

WebGPU binds each buffer whole and most adapters (phones, lavapipe) bind at most 128 MiB; the 0.3b
tied embedding is 404 MiB in float32. Rows are independent for both readers, so:

    before:  y = R.matmul(x, R.permute_dims(W))       e = R.take(W, ids, axis=0)
    after:   y = concat([x @ W0ᵀ, x @ W1ᵀ, …], -1)   e = Σᵢ where(aᵢ ≤ ids < bᵢ, take(Wᵢ, clip(ids − aᵢ)), 0)

Runs before quantize_weights, which then quantizes each block as an ordinary weight; the size that
must fit is the stored one (the policy's packed size for a quantized weight). Each block is a
weight record of its own, with `rows` [a, b) and a stored name of its own: the packager writes
rows [a, b) of the weight under that name. Any other reader of a split weight is an error.
"""
from __future__ import annotations

import math

import tvm
from tvm import relax

from ..errors import InternalError
from . import PassReport, linear_read, rewrite_weight_inputs

NAME = "split_large_weights"


def stored_bytes(name: str, shape: list[int], dtype: str, policy, layouts) -> int:
    """Bytes of weight `name` as the artifact stores it: packed if the policy quantizes it."""
    n, k = shape
    spec = policy.spec_for(name, k, n, layouts) if policy else None
    if spec is None:
        return n * k * tvm.DataType(dtype).bits // 8
    scale = tvm.DataType(spec.scale_dtype).bits // 8
    return n * (4 * spec.words(k) + 2 * scale * (k // spec.group_size))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, blocks: dict):
        super().__init__(mod)
        self.blocks = blocks  # weight Var → [(a, b, block Var), …]
        self.sites = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul":
            return self._linear(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take":
            return self._take(call)
        return call

    def _linear(self, call):
        op, emit = relax.op, self.builder_.emit
        x = call.args[0]
        read = linear_read(self, call)
        if read is None or read.weight not in self.blocks:
            return call
        inner, outer = read.inner, read.outer
        outs = []
        for _, _, block in self.blocks[read.weight]:
            w = op.astype(block, inner.attrs.dtype) if inner is not None else block
            w = op.permute_dims(w)
            w = op.astype(w, outer.attrs.dtype) if outer is not None else w
            outs.append(emit(op.matmul(x, emit(w), out_dtype=call.attrs.out_dtype)))
        self.sites += 1
        return op.concat(outs, axis=-1)

    def _take(self, call):
        op, emit = relax.op, self.builder_.emit
        weight, ids = call.args
        if weight not in self.blocks or int(call.attrs.axis) != 0:
            return call
        total = None
        for a, b, block in self.blocks[weight]:
            const = lambda v: relax.const(v, ids.ty.dtype)  # noqa: E731
            local = emit(op.clip(op.subtract(ids, const(a)), relax.prim_value(0), relax.prim_value(b - a - 1)))
            rows = emit(op.take(block, local, axis=0))
            inside = op.logical_and(op.greater_equal(ids, const(a)), op.less(ids, const(b)))
            part = emit(op.where(op.expand_dims(inside, -1), rows, op.zeros_like(rows)))
            total = part if total is None else emit(op.add(total, part))
        self.sites += 1
        return total


def run(mod: tvm.IRModule, weights: list, limit: int, policy, layouts,
        functions=None) -> tuple[tvm.IRModule, list, PassReport]:
    """Returns the module, the new weight list and the report (matched = readers rewritten)."""
    report = PassReport(NAME)

    def replace(var, w):
        shape = list(w.shape)
        size = stored_bytes(w.weight, shape, w.dtype, policy, layouts) if len(shape) == 2 else 0
        if size <= limit:
            return None
        per = limit // math.ceil(size / shape[0])  # rows per block (each row's share rounded up)
        if per < 1:
            raise InternalError(f"{NAME}: one row of {w.weight} exceeds the binding limit {limit}")
        per = math.ceil(shape[0] / math.ceil(shape[0] / per))  # the same blocks, evened out
        blocks, records = [], []
        for a in range(0, shape[0], per):
            b = min(a + per, shape[0])
            store = f"{w.weight}.rows{a}-{b}"
            blocks.append((a, b, relax.Var(store, relax.TensorType([b - a, shape[1]], var.ty.dtype))))
            records.append(w.replace(rows=(a, b), name=store, shape=(b - a, shape[1])))
        return blocks, [block for _, _, block in blocks], records

    mod, new_weights, report.matched = rewrite_weight_inputs(mod, weights, functions, NAME, "the whole of",
                                                             replace, _Rewriter)
    report.expected = report.matched
    return mod, new_weights, report
