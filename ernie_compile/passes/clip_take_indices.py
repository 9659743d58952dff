"""Every Relax `take` (row gathers: the embedding lookup, the MoE routing's row and weight gathers)
reads with clipped indices instead of TVM's default "fast" mode.

    before:  e = R.take(W, ids, axis=0)                   # mode="fast"
    after:   e = R.take(W, ids, axis=0, mode="clip")      # index min(max(i, 0), n − 1)

"fast" trusts the indices (an out-of-range token id reads outside the buffer, or segfaults), and TVM
says so on stderr each time it lowers one ("Fast mode segfaults when there are out-of-bounds
indices"), four lines on every compile. Our indices are in range by construction (the runtime
refuses token ids outside the vocabulary; the MoE gathers index what the sort produced), so the clip
changes no result; it costs a compare per gathered row, and it makes an out-of-range index a wrong
row rather than a crash. Runs last among the Relax passes, after every pass that emits a take.
"""
from __future__ import annotations

import tvm
from tvm import relax

NAME = "clip_take_indices"


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.sites = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take" and call.attrs.mode == "fast":
            self.sites += 1
            return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
        return call


def run(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """→ (the module with every fast take clipped, how many were)."""
    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get(), rewriter.sites
