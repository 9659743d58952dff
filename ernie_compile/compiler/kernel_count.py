"""Facts about a Relax module for reports: how many kernels a step launches."""
from __future__ import annotations

import tvm
from tvm import relax


def count_kernels(mod: tvm.IRModule, function: str) -> dict:
    """Kernel launches of one call of `function` after TVM's operator fusion: TIR kernels
    (`call_tir`) and calls into runtime builtins (the paged KV cache's attention, each of which runs
    its own RoPE/append/attention kernels)."""
    seq = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR(),
                                    relax.transform.RewriteDataflowReshape(),  # reshapes are views
                                    relax.transform.DeadCodeElimination([function])])
    fused = seq(tvm.IRModule({gv: f for gv, f in mod.functions_items()}))
    counts = {"tir": 0, "builtin": 0}

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            if expr.op.name == "relax.call_tir":
                counts["tir"] += 1
            elif expr.op.name in ("relax.call_dps_packed", "relax.call_pure_packed", "relax.call_packed"):
                counts["builtin"] += 1

    relax.analysis.post_order_visit(fused[function], visit)
    return counts
