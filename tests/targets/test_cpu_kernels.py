"""The CPU kernels' own math against numpy: exp2 (attention softmax, SiLU) and silu_mul."""
import numpy as np
import tvm
from tvm.script import tirx as T

from ernie_compile.targets.cpu_kernels import exp2, silu_mul

TARGET = tvm.target.Target({"kind": "llvm"})


def test_exp2_matches_numpy():
    """Over the range a softmax feeds it: scores minus their running max, from 0 down past float32's
    smallest normal; and SiLU's positive side up to the clamp."""
    n = 4096

    @T.prim_func
    def main(x: T.Buffer((n,), "float32"), y: T.Buffer((n,), "float32")):
        for i in T.vectorized(n):
            y[i] = exp2(x[i])

    lib = tvm.compile(tvm.IRModule({"main": main}), target=TARGET)
    x = np.concatenate([np.linspace(-130, 126, n - 8), [-5e4, -126, -125.5, -0.5, -1.5, -1e-4, 0, -30.5]])
    x = x.astype(np.float32)
    y = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    got, ref = y.numpy().astype(np.float64), np.exp2(x.astype(np.float64))
    normal = x >= -126
    assert np.max(np.abs(got[normal] - ref[normal]) / ref[normal]) < 5e-7
    assert np.all(got[~normal] == 0)  # below float32's normals: the scores' -5e4 padding weighs nothing


def test_silu_mul_matches_numpy():
    inter = 48
    lib = tvm.compile(tvm.IRModule({"main": silu_mul(inter).with_attr("global_symbol", "main")}), target=TARGET)
    rng = np.random.default_rng(0)
    for rows in (1, 5):  # decode's serial path and prefill's parallel one
        h = (rng.standard_normal((rows, 2 * inter)) * 8).astype(np.float32)
        h[0, :3] = [-100, 100, 0]  # exp overflow and underflow sides
        out = tvm.runtime.tensor(np.zeros((rows, inter), np.float32))
        lib["main"](tvm.runtime.tensor(h), out)
        g, u = h[:, :inter].astype(np.float64), h[:, inter:].astype(np.float64)
        np.testing.assert_allclose(out.numpy(), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
