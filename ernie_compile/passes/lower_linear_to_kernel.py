"""Replace every linear layer (a matmul by a transposed weight input) with a target's own kernel.

    before:  y = R.matmul(x, R.permute_dims(W))                       x [..., K], W [N, K] a weight input
    after:   y = R.reshape(R.call_tir(kernel_NxK, (R.reshape(x, [M, K]), W)), [..., N])

Runs on the Relax module before the target's build pipeline; the target supplies `kernel(n, k, dtype)`
(targets/cpu_kernels.py for the CPU). Weight inputs are what the step functions take after their
`num_input` runtime inputs, so activations × activations matmuls are never touched.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from ..errors import InternalError
from . import PassReport, leading_rows
from .kernel_table import KernelTable

NAME = "lower_linear_to_kernel"


def run(mod: tvm.IRModule, make_kernel, functions=None) -> tuple[tvm.IRModule, PassReport]:
    report = PassReport(NAME)
    counts = {}
    kernels = KernelTable()
    x_pat, w_pat = wildcard(), wildcard()
    pattern = is_op("relax.matmul")(x_pat, is_op("relax.permute_dims")(w_pat))
    mod = tvm.IRModule(dict(mod.functions_items()))
    from . import step_functions

    for name in functions or step_functions(mod):
        func = mod[name]
        weights = set(func.params[int(func.attrs["num_input"]):])
        sites = [0]

        def rewrite(expr, matches):
            x, w = matches[x_pat], matches[w_pat]
            if w not in weights or len(w.ty.shape) != 2 or x.ty.dtype != w.ty.dtype:
                return expr
            n, k = (int(d) for d in w.ty.shape)
            gv = kernels.get(f"linear_{n}x{k}_{w.ty.dtype}", lambda: make_kernel(n, k, w.ty.dtype))
            lead, m = leading_rows(x)
            x2 = relax.op.reshape(x, [m, k])
            y = relax.call_tir(gv, [x2, w], relax.TensorType((m, n), w.ty.dtype))
            sites[0] += 1
            return relax.op.reshape(y, [*lead, n])

        mod[name] = rewrite_call(pattern, rewrite, func)
        counts[name] = sites[0]
    kernels.add_to(mod)
    # per step function, like the other passes; the text steps have the same linears (the VL model's
    # mixed prefill has its vision routers too, its image encoder the vision tower's)
    text = {n: c for n, c in counts.items() if n in ("prefill", "decode", "batch")} or counts
    if len(set(text.values())) != 1:
        raise InternalError(f"{NAME}: step functions matched different numbers of linears: {counts}")
    report.matched = report.expected = next(iter(text.values()))
    return mod, report
