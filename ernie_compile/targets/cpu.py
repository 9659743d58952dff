"""CPU through LLVM: the host by default, or any LLVM triple for a cross build (`cpu:TRIPLE`).

Host builds are a shared library the runtime loads directly. Cross builds (aarch64-linux-android,
arm64-apple-ios, …) cannot be linked here without that platform's linker, so they ship the object
files in a tar (`lib.tar`), as MLC-LLM does for iOS: the app links them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tvm

from ..errors import UserError
from . import cpu_kernels


@dataclass(frozen=True)
class CpuTarget:
    name = "cpu"
    dtypes = ("float32",)  # activation / float-weight dtypes, the default first
    device = "cpu"  # the runtime device type for artifacts of this target
    kernels = cpu_kernels  # the kernels our passes call (linear, dequantizing, MoE, attention)
    triple: str | None = None  # None: this machine
    mcpu: str | None = None

    @classmethod
    def from_spec(cls, triple: str | None) -> "CpuTarget":
        if triple is None:
            return cls(None, tvm.target.codegen.llvm_get_system_cpu())
        return cls(triple)

    @property
    def spec(self) -> str:
        return self.name + (f":{self.triple}" if self.triple else "")

    @property
    def runnable_here(self) -> bool:
        return self.triple is None

    @property
    def library_name(self) -> str:
        return "lib.so" if self.runnable_here else "lib.tar"

    def tvm_target(self) -> tvm.target.Target:
        desc = {"kind": "llvm"}
        if self.triple:
            desc["mtriple"] = self.triple
        if self.mcpu:
            desc["mcpu"] = self.mcpu
        try:
            return tvm.target.Target(desc)
        except Exception as e:  # TVM reports unknown triples as generic errors
            raise UserError(f"target {self.spec!r}: LLVM does not accept it ({str(e).splitlines()[0]})") from None

    @property
    def int8_dot(self) -> bool:
        """Whether the CPU has AVX-512 VNNI, which the int8-activation kernels (cpu_vnni.py) need."""
        return bool(tvm.target.codegen.target_has_features("avx512vnni", self.tvm_target()))

    def passes(self, mod: tvm.IRModule, tuner=None):
        """Target-specific Relax passes before the build: linears onto our scheduled kernels, with
        the schedule parameters `tuner` (compiler/tuning.py) picks, else the defaults."""
        from ..passes import lower_linear_to_kernel

        tunable, target = cpu_kernels.TUNABLE["linear"], str(self.tvm_target())

        def make(n, k, dtype):
            key = {"target": target, "kernel": "linear", "shape": [n, k], "dtype": str(dtype), "quant": None}
            params = tuner.params(tunable, key) if tuner else tunable["default"]
            return cpu_kernels.linear(n, k, dtype, **params)

        mod, report = lower_linear_to_kernel.run(mod, make)
        return mod, [report]

    def build(self, mod: tvm.IRModule, out_dir: Path) -> tuple[Path, dict]:
        """Compile with TVM's default CPU pipeline; write the library into out_dir."""
        target = self.tvm_target()
        executable = tvm.compile(mod, target=target)
        path = out_dir / self.library_name
        executable.export_library(str(path))
        return path, {}
