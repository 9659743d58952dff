"""GPU targets compute x² as x · x: on an H200 the CUDA kernel for RMSNorm's power(x, 2) returned NaN
for finite input, and WGSL's and Metal's pow are undefined below 0."""
import tvm
from tvm.script import relax as R

from ernie_compile.targets.gpu_build import square_as_product


def test_power_two_becomes_a_product_and_other_powers_stay():
    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4,), "float32")):
            with R.dataflow():
                y = R.power(x, R.const(2.0, "float32"))
                z = R.power(x, R.const(3.0, "float32"))
                w = R.add(y, z)
                R.output(w)
            return w

    @tvm.script.ir_module
    class After:
        @R.function
        def main(x: R.Tensor((4,), "float32")):
            with R.dataflow():
                y = R.multiply(x, x)
                z = R.power(x, R.const(3.0, "float32"))
                w = R.add(y, z)
                R.output(w)
            return w

    tvm.ir.assert_structural_equal(square_as_product(Before), After)
