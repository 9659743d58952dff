"""Apple GPUs (macOS, iOS) through TVM's Metal codegen, cross-built on Linux.

The kernels are Metal Shading Language *source*: the Metal framework on every Mac and iPhone compiles
it when the library is loaded (no developer tools needed there). The host code is an arm64 Mach-O
object for `arm64-apple-macos` (`metal`) or `arm64-apple-ios` (`metal:ios`); without an Apple linker
here the artifact ships the objects in `lib.tar` for the app (or `clang -shared` on a Mac) to link,
as MLC-LLM does for iOS.

What Linux can verify: every kernel is scheduled (an unscheduled kernel is refused), the objects
are arm64 Mach-O, and the MSL passes a C++ syntax check against a shim of the Metal standard library
(targets/metal_shim.h) — gross errors only. Compiling the MSL for real, and running it, needs a Mac:
bench/device_check.sh is where that happens.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tvm

from ..errors import UserError
from . import gpu_build, gpu_kernels
from .base import Built, Target

TRIPLES = {"macos": "arm64-apple-macos", "ios": "arm64-apple-ios"}
SHIM = Path(__file__).resolve().parents[1] / "assets" / "metal_shim"
MSL = "kernels.metal"  # the MSL source, for inspection (the library embeds the same text)


@dataclass(frozen=True)
class MetalTarget(Target):
    os: str = "macos"

    @classmethod
    def from_spec(cls, os: str | None) -> "MetalTarget":
        if os and os not in TRIPLES:
            raise UserError(f"--target metal:{os}: one of {', '.join(TRIPLES)}")
        os = os or "macos"
        target = tvm.target.Target({"kind": "metal", "max_threads_per_block": 1024, "thread_warp_size": 32,
                                    "max_shared_memory_per_block": 32768},
                                   host={"kind": "llvm", "mtriple": TRIPLES[os]})
        return cls(
            spec=f"metal:{os}", device="metal", backend="tvm", tvm=target, dtypes=("float16", "float32"),
            scale_dtypes={"float16": "float16", "float32": "float16"}, kernels=gpu_kernels, kv_cache="paged",
            index_dtype="int64", quant_layouts=gpu_kernels.QUANT_LAYOUTS, static_m=True, int8_dot=None,
            int8_weight_bits=(), max_binding_bytes=None, native_ops=frozenset(), tunable=(), library_name="lib.tar",
            batch_step=False, cross=True,  # arm64 Mach-O objects for an app to link; no Apple GPU is attached to this Linux build
            os=os)

    def runs_here(self) -> bool:
        return False

    def schedule_target(self) -> tvm.target.Target:
        """dlight's Matmul rule crashes under a metal target in this TVM wheel (tensorization), and its
        CUDA-style schedules (vectorized shared-memory loads) fail Metal's vector type rewrite: schedule
        with WebGPU's conservative rules (256 threads, scalar loads), which Metal builds."""
        return tvm.target.Target({"kind": "webgpu", "max_num_threads": 256}, host="llvm")

    def passes(self, mod: tvm.IRModule, tuner):
        return mod, []  # linears stay Relax matmuls: dlight's GEMV / Matmul rules schedule them

    def build(self, mod: tvm.IRModule, out_dir: Path, max_seq_len: int) -> Built:
        mod, kernels = gpu_build.schedule(mod, self.schedule_target())
        executable = gpu_build.lower_and_build(mod, self.tvm, kernels)
        source = gpu_build.device_source(executable.mod, "metal")
        (out_dir / MSL).write_text(source)
        path = out_dir / self.library_name
        executable.export_library(str(path))
        return Built(path, {**kernels.as_dict(), "msl": MSL, "host_triple": TRIPLES[self.os],
                            "msl_syntax_check": msl_syntax_check(source)})


def msl_syntax_check(source: str) -> str:
    """'passed', 'failed: FIRST ERROR' or 'skipped: …'. TVM's MSL is one translation unit per kernel
    ("// Function: NAME" sections); each goes into its own C++ namespace and g++ parses them all
    against the shim (assets/metal_shim/metal_stdlib)."""
    gxx = shutil.which("g++")
    if gxx is None:
        return "skipped: no g++ on the PATH"
    units = [u for u in re.split(r"(?m)^// Function: ", source) if u.strip()]
    text = "\n".join(f"namespace tu{i} {{\n// Function: {u}\n}}" for i, u in enumerate(units))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.cc"
        path.write_text(text)
        proc = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", "-Wno-attributes", f"-I{SHIM}",
                               "-include", "metal_stdlib", "-x", "c++", str(path)], capture_output=True, text=True)
    if proc.returncode == 0:
        return "passed"
    first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
    return "failed: " + first.split("error: ", 1)[-1]
