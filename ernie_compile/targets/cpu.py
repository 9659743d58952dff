"""CPU through LLVM: the host by default, or any LLVM triple for a cross build (`cpu:TRIPLE`).

Host builds are a shared library the runtime loads directly. Cross builds (aarch64-linux-android,
arm64-apple-ios, …) cannot be linked here without that platform's linker, so they ship the object
files in a tar (`lib.tar`), as MLC-LLM does for iOS: the app links them.

TVM's default CPU pipeline leaves matmuls scalar and single-threaded, so every linear layer is
first replaced by a kernel of ours (passes/lower_linear_to_kernel.py, cpu_kernels.py), and the
paged KV cache's attention and RoPE kernels by ours (cpu_attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tvm

from ..errors import UserError
from . import cpu_kernels, cpu_vnni
from .base import Built, Target


# LLVM triple architectures spelled otherwise than LLVM's target names (llvm_get_targets)
_ARCH_ALIASES = [(r"arm64(e)?", "aarch64"), (r"arm64_32", "aarch64_32"),
                 (r"(arm|armeb|thumb|thumbeb)v[0-9][0-9a-z.]*", None), (r"i[3-9]86", "i386"), (r"amd64|x86_64h", "x86_64"), (r"(riscv32|riscv64)[a-z0-9_]*", None),
                 (r"ppc64le", "powerpc64le"), (r"ppc64", "powerpc64"), (r"ppc", "powerpc")]


def _check_triple(triple: str, spec: str) -> None:
    """The triple's architecture must be one this LLVM has a backend for: TVM hands an unknown one to
    LLVM, which crashes the process (a segfault, not an error) the first time the target is used."""
    import re

    parts = triple.split("-")
    if not all(parts):
        raise UserError(f"target {spec!r}: an LLVM triple looks like ARCH-VENDOR-OS[-ENV], "
                        "e.g. aarch64-linux-android, arm64-apple-ios, x86_64-pc-windows-msvc")
    arch = parts[0]
    known = set(tvm.target.codegen.llvm_get_targets())
    for pattern, name in _ARCH_ALIASES:
        m = re.fullmatch(pattern, arch)
        if m:
            arch = name or m.group(1)
            break
    if arch not in known:
        raise UserError(f"target {spec!r}: architecture {parts[0]!r} is not one this LLVM builds for "
                        f"({', '.join(sorted(known))})")


def _llvm(triple: str | None, mcpu: str | None, spec: str) -> tvm.target.Target:
    if triple:
        _check_triple(triple, spec)
    desc = {"kind": "llvm"}
    if triple:
        desc["mtriple"] = triple
    if mcpu:
        desc["mcpu"] = mcpu
    try:
        return tvm.target.Target(desc)
    except Exception as e:  # TVM reports unknown triples as generic errors
        raise UserError(f"target {spec!r}: LLVM does not accept it ({str(e).splitlines()[0]})") from None


def int8_dot(target: tvm.target.Target) -> str | None:
    """The int8 dot product the int8-activation kernels (cpu_vnni.DOTS) can use on the target's CPU,
    from its LLVM features: "vnni" with AVX-512 VNNI, else "avx2" with AVX2, else None (a cross
    triple names no CPU, so has no features: None)."""
    def has(feature):
        return bool(tvm.target.codegen.target_has_features(feature, target))

    return "vnni" if has("avx512vnni") else "avx2" if has("avx2") else None


@dataclass(frozen=True)
class CpuTarget(Target):
    @classmethod
    def from_spec(cls, triple: str | None) -> "CpuTarget":
        spec = "cpu" + (f":{triple}" if triple else "")
        target = _llvm(triple, None if triple else tvm.target.codegen.llvm_get_system_cpu(), spec)
        dot = int8_dot(target)
        return cls(
            spec=spec, device="cpu", backend="tvm", tvm=target, dtypes=("float32",),
            scale_dtypes={"float32": "float16"}, kernels=cpu_kernels, kv_cache="paged", index_dtype="int64",
            quant_layouts=("vnni16", "lanes16", "row"), static_m=False,  # one linear_q serves every M
            int8_dot=dot, int8_weight_bits=cpu_vnni.DOTS[dot].bits if dot else (),
            max_binding_bytes=None, native_ops=frozenset({"silu_mul", "rms_norm", "vision_attention"}), tunable=tuple(cpu_kernels.TUNABLE),
            library_name="lib.tar" if triple else "lib.so", batch_step=True, cross=triple is not None)

    def runs_here(self) -> bool:
        return not self.cross

    def passes(self, mod: tvm.IRModule, tuner):
        """Linears onto our scheduled kernels, with the schedule parameters `tuner`
        (compiler/tuning.py) picks, else the defaults."""
        from ..passes import lower_linear_to_kernel

        tunable, target = cpu_kernels.TUNABLE["linear"], str(self.tvm)

        def make(n, k, dtype):
            key = {"target": target, "kernel": "linear", "shape": [n, k], "dtype": str(dtype), "quant": None}
            params = tuner.params(tunable, key) if tuner else tunable["default"]
            return cpu_kernels.linear(n, k, dtype, **params)

        mod, report = lower_linear_to_kernel.run(mod, make)
        return mod, [report]

    def build(self, mod: tvm.IRModule, out_dir: Path, max_seq_len: int) -> Built:
        """Compile with TVM's default CPU pipeline; write the library into out_dir."""
        executable = tvm.compile(mod, target=self.tvm)
        path = out_dir / self.library_name
        executable.export_library(str(path))
        return Built(path, {})
