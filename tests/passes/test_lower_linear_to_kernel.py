"""lower_linear_to_kernel + the CPU linear kernel: same numbers as numpy, every weight linear matched."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

from ernie_compile.passes import lower_linear_to_kernel
from ernie_compile.targets import cpu_kernels


@pytest.mark.parametrize("n,k", [(12, 48), (7, 20), (64, 33)])  # vector widths 16, 4, 1; n not /4
@pytest.mark.parametrize("m", [1, 3, 4, 9])  # decode, tail only, one block, blocks + tail
def test_cpu_linear_kernel_matches_numpy(m, n, k):
    lib = tvm.compile(tvm.IRModule({"main": cpu_kernels.linear(n, k).with_attr("global_symbol", "main")}),
                      target="llvm")
    rng = np.random.default_rng(m * 100 + n)
    x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    np.testing.assert_allclose(y.numpy(), x @ w.T, rtol=1e-5, atol=1e-5)


def _step_module():
    @tvm.script.ir_module
    class Mod:
        @R.function
        def decode(x: R.Tensor((1, 1, 16), "float32"), a: R.Tensor((16, 16), "float32"),
                   w1: R.Tensor((8, 16), "float32"), w2: R.Tensor((16, 8), "float32")):
            R.func_attr({"num_input": 2})
            with R.dataflow():
                h = R.matmul(x, R.permute_dims(w1))  # a linear: matched
                y = R.matmul(h, R.permute_dims(w2))  # matched
                z = R.matmul(x, R.permute_dims(a))  # `a` is a runtime input, not a weight: left alone
                out = (y, z)
                R.output(out)
            return out

    return Mod


def test_rewrites_weight_linears_only():
    mod, report = lower_linear_to_kernel.run(_step_module(), cpu_kernels.linear, functions=("decode",))
    assert (report.matched, report.expected) == (2, 2)
    calls = []
    relax.analysis.post_order_visit(mod["decode"], lambda e: calls.append(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    assert calls.count("relax.call_tir") == 2 and calls.count("relax.matmul") == 1
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s, dtype=np.float32) for s in ((1, 1, 16), (16, 16), (8, 16), (16, 8))]
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    y, z = vm["decode"](*[tvm.runtime.tensor(a) for a in args])
    x, a, w1, w2 = args
    np.testing.assert_allclose(y.numpy(), x @ w1.T @ w2.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z.numpy(), x @ a.T, rtol=1e-5, atol=1e-5)
