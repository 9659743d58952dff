"""The CPU attention kernels' exp2 (targets/cpu_attention.py) against numpy's, over the range a
softmax feeds it: scores minus their running max, from 0 down past float32's smallest normal."""
import numpy as np
import tvm
from tvm.script import tirx as T

from ernie_compile.targets.cpu_attention import exp2


def test_exp2_matches_numpy():
    n = 4096

    @T.prim_func
    def main(x: T.Buffer((n,), "float32"), y: T.Buffer((n,), "float32")):
        for i in T.vectorized(n):
            y[i] = exp2(x[i])

    lib = tvm.compile(tvm.IRModule({"main": main}), target=tvm.target.Target({"kind": "llvm"}))
    x = np.concatenate([np.linspace(-130, 0, n - 8), [-5e4, -126, -125.5, -0.5, -1.5, -1e-4, 0, -30.5]])
    x = x.astype(np.float32)
    y = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    got, ref = y.numpy().astype(np.float64), np.exp2(x.astype(np.float64))
    normal = x >= -126
    assert np.max(np.abs(got[normal] - ref[normal]) / ref[normal]) < 5e-7
    assert np.all(got[~normal] == 0)  # below float32's normals: the scores' -5e4 padding weighs nothing
