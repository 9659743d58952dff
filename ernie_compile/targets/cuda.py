"""NVIDIA GPUs through TVM's CUDA codegen, compiled with nvcc at build time.

In this TVM wheel a CUDA library carries CUDA *source*: when it is loaded, TVM's runtime hands the
source to a compile hook (`tvm_callback_cuda_compile`, NVRTC by default), so a deployed runtime would
need a CUDA compiler. We compile at build time instead: `nvcc --fatbin` with SASS for every
requested architecture plus PTX for the newest (a newer GPU's driver JITs that; no toolkit needed),
written next to the library as `kernels.fatbin` with the sha256 of the source it was made from. The
runtime (runtime/session.py) answers the load-time hook with that fatbin, after checking the source
hash, so nothing is compiled on the user's machine.
`--target cuda:sm_80,sm_90` (or `--cuda-arch`) picks the architectures; the default is DEFAULT_ARCHS.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tvm

from ..errors import UserError
from . import gpu_build, gpu_kernels
from .base import Built, Target

DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")  # A100, RTX 30xx/A10, L4/RTX 40xx, H100
FATBIN = "kernels.fatbin"
SOURCE = "kernels.cu"  # the CUDA source the fatbin was built from, for inspection (the library embeds it)
SCHEDULE_ARCH = "sm_60"


def _parse_archs(text: str) -> tuple[str, ...]:
    archs = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in archs if not re.fullmatch(r"sm_\d{2,3}[af]?", a)]
    if not archs or bad:
        raise UserError(f"--target cuda:{text}: architectures look like sm_80,sm_90 (got {', '.join(bad) or 'none'})")
    known = nvcc_archs()
    if known is not None:
        unknown = [a for a in archs if re.sub(r"[af]$", "", a).replace("sm_", "compute_") not in known]
        if unknown:
            raise UserError(f"--target cuda:{text}: this nvcc does not build for {', '.join(unknown)} "
                            f"(it builds for {', '.join(k.replace('compute_', 'sm_') for k in known)})")
    return archs


_NVCC_ARCHS: list = []


def nvcc_archs() -> tuple[str, ...] | None:
    """The virtual architectures (compute_80, …) `nvcc --list-gpu-arch` names; None without nvcc (the
    build then says nvcc is missing) or where it cannot list them (an old nvcc)."""
    if not _NVCC_ARCHS:
        nvcc, found = shutil.which("nvcc"), None
        if nvcc:
            try:
                proc = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
                listed = tuple(re.findall(r"compute_\d+[a-z]?", proc.stdout))
                found = listed if proc.returncode == 0 and listed else None
            except (OSError, subprocess.SubprocessError):
                found = None
        _NVCC_ARCHS.append(found)
    return _NVCC_ARCHS[0]


def nvcc_fatbin(code: str, archs: tuple[str, ...]) -> bytes:
    """CUDA source → a fatbin with SASS for each arch and PTX for the last."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise UserError("--target cuda needs nvcc on the PATH to compile the kernels at build time")
    flags = [f"-gencode=arch=compute_{a[3:]},code=sm_{a[3:]}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1][3:]},code=compute_{archs[-1][3:]}")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        proc = subprocess.run([nvcc, "--fatbin", "-O3", *flags, "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nvcc failed:\n{proc.stderr[-4000:]}")
        return out.read_bytes()


def _cuda(arch: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152,
                              "max_threads_per_block": 1024, "thread_warp_size": 32}, host="llvm")


@dataclass(frozen=True)
class CudaTarget(Target):
    archs: tuple[str, ...] = DEFAULT_ARCHS

    @classmethod
    def from_spec(cls, archs: str | None) -> "CudaTarget":
        archs = _parse_archs(archs) if archs else DEFAULT_ARCHS
        return cls(
            spec=f"cuda:{','.join(archs)}", device="cuda", backend="tvm", tvm=_cuda(archs[0]),
            dtypes=("float16", "float32"), scale_dtypes={"float16": "float16", "float32": "float16"},
            kernels=gpu_kernels, kv_cache="paged", index_dtype="int64", quant_layouts=gpu_kernels.QUANT_LAYOUTS,
            static_m=True,  # decode (M = 1) gets a GEMV, prefill a GEMM
            int8_dot=None, int8_weight_bits=(), max_binding_bytes=None, native_ops=frozenset(), tunable=(),
            library_name="lib.so",
            # the server's batch step: its graph's numerics are checked on the CPU (ragged batches
            # against single sequences, tests/targets/test_gpu_graph_on_cpu.py) and on a GPU by
            # bench/device_check.sh; the paged KV cache's GPU attention kernels are TVM's own
            batch_step=True,
            cross=False, archs=archs)

    def runs_here(self) -> bool:
        return _has_cuda_device()

    def passes(self, mod: tvm.IRModule, tuner):
        return mod, []  # linears stay Relax matmuls: dlight's GEMV / Matmul rules schedule them

    def build(self, mod: tvm.IRModule, out_dir: Path, max_seq_len: int) -> Built:
        # dlight's Matmul rule picks tensor-core tensorization for float16 from sm_70 on, and that
        # path crashes in this TVM wheel: schedule as for sm_60 (SIMT matmuls), build for the archs.
        mod, kernels = gpu_build.schedule(mod, _cuda(SCHEDULE_ARCH))
        executable = gpu_build.lower_and_build(mod, self.tvm, kernels)
        source = gpu_build.device_source(executable.mod, "cuda")
        (out_dir / FATBIN).write_bytes(nvcc_fatbin(source, self.archs))
        (out_dir / SOURCE).write_text(source)
        path = out_dir / self.library_name
        executable.export_library(str(path))
        return Built(path, {**kernels.as_dict(), "archs": list(self.archs), "fatbin": FATBIN, "source": SOURCE,
                            "source_sha256": hashlib.sha256(source.encode()).hexdigest()})


def fatbin_entries(data: bytes) -> list[tuple[str, int]]:
    """(kind, sm) of each image in a fatbin: kind "sass" (a cubin) or "ptx". The container header
    (magic 0xBA55ED50) and each image header's kind/size/arch fields are read; payloads are not."""
    magic, _, header, size = struct.unpack_from("<IHHQ", data, 0)
    if magic != 0xBA55ED50:
        raise ValueError("not a fatbin")
    entries, off = [], header
    while off < header + size:
        kind, _, entry_header, padded = struct.unpack_from("<HHIQ", data, off)
        entries.append(({1: "ptx", 2: "sass"}.get(kind, str(kind)), struct.unpack_from("<I", data, off + 28)[0]))
        off += entry_header + padded
    return entries


def _has_cuda_device() -> bool:
    try:
        return bool(tvm.runtime.device("cuda", 0).exist)
    except Exception:
        return False
