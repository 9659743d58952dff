"""What a target declares: the facts the compiler lowers by, and the hooks it builds through.

Every target file defines one subclass of `Target` and a `from_spec` that fills in every field
(there are no defaults, so a new target cannot forget one), and registers it in targets/__init__.py.
The compiler reads these fields and calls these hooks; it never asks a target what it has.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import tvm

from ..passes.weight_records import WeightRecord


@dataclass(frozen=True)
class Built:
    """What `build` made: the library file, facts for the manifest and report, and anything the
    target's own `write_weights` needs from the build (WebGPU: its launch plan)."""

    library: Path
    info: dict
    state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Target(ABC):
    spec: str  # as the user wrote it, completed: "cpu", "cpu:aarch64-linux-android", "cuda:sm_80,sm_90"
    device: str  # the runtime's device type ("cpu", "cuda", "metal", "webgpu")
    backend: str  # manifest "backend": the runtime engine that runs it ("tvm", "webgpu")
    tvm: tvm.target.Target
    dtypes: tuple[str, ...]  # activation / float-weight dtypes, the default first
    # group-scale dtype of quantized weights, per activation dtype
    scale_dtypes: dict
    kernels: ModuleType  # the kernel builders the passes call (linear_q, take_q, group_gemm, …)
    kv_cache: str  # "paged": TVM's PagedKVCache (create_kv); "contiguous": per-layer tensors, our kernels
    index_dtype: str  # of token ids, positions and indices the graph makes ("int32": WGSL has no int64)
    quant_layouts: tuple[str, ...]  # packed-weight layouts the kernels read, preferred first (ernie_compile/quant.py)
    static_m: bool  # quantized linears with M = 1 (decode) get a kernel of their own (GEMV vs GEMM)
    # the int8 dot product of the int8-activation kernels (targets/cpu_vnni.DOTS), with which linears may
    # quantize their activations to int8: "vnni" (AVX-512 VNNI), "avx2" (AVX2 without VNNI), None: none
    int8_dot: str | None
    int8_weight_bits: tuple[int, ...]  # weight bits that dot is exact for: (2, 3, 4, 8) "vnni", (2, 3, 4) "avx2", () None
    max_binding_bytes: int | None  # largest weight buffer a kernel can bind; larger ones are split
    native_ops: frozenset  # fused ops with a kernel of the target's own: "silu_mul", "rms_norm", "moe_route", "vision_attention"
    tunable: tuple[str, ...]  # kernels with schedule parameters (kernels.TUNABLE, compiler/tuning.py)
    library_name: str
    # compile the `batch` step (compiler/capture.py: logits at chosen rows of a ragged batch) that the
    # server's continuous batching runs; without it a server serves one sequence per call
    batch_step: bool
    cross: bool  # built for another machine than this one (another CPU/OS): the runtime refuses it on a host

    @property
    def name(self) -> str:
        return self.spec.partition(":")[0]

    @abstractmethod
    def runs_here(self) -> bool:
        """Whether this machine can execute the artifact (the accuracy report, tuning)."""

    @abstractmethod
    def passes(self, mod: tvm.IRModule, tuner) -> tuple[tvm.IRModule, list]:
        """Target-specific Relax passes before the build → (module, their PassReports)."""

    @abstractmethod
    def build(self, mod: tvm.IRModule, out_dir: Path, max_seq_len: int) -> Built:
        """Compile `mod` into out_dir (the library and the target's own files)."""

    def write_weights(self, out_dir: Path, records: list[WeightRecord], source, built: Built,
                      log) -> tuple[dict, dict[str, float]]:
        """Write every weight the library takes, in its layout, produced from `source` one record at a
        time → (the manifest's "weights" entry, each quantized weight's relative reconstruction
        error). Default: safetensors, which the runtime reads tensor by tensor (compiler/package.py)."""
        from ..compiler import package

        return package.write_safetensors(out_dir, records, source, log)

    def write_host_files(self, out_dir: Path, tokenizer: dict) -> None:
        """Files a host of this target needs beyond library, weights and tokenizer (none by default)."""
