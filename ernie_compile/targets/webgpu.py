"""Browsers and any wgpu adapter (Vulkan, Metal, D3D12) through TVM's WebGPU codegen (WGSL).

Nothing in the TVM wheel can launch WGSL, and a browser cannot run TVM's VM, so this target flattens
each step function into a launch plan a small host runs (targets/webgpu_plan.py; the format is
docs/webgpu-artifact.md): our Python runtime over wgpu (runtime/webgpu_engine.py) and the JS runtime
copied into every artifact (web/). Attention uses our contiguous KV-cache kernels
(targets/webgpu_kernels.py) instead of TVM's paged cache, a C++ object.

`--target vulkan` builds the same artifact: this wheel has no SPIR-V codegen, and wgpu translates
WGSL to SPIR-V for the Vulkan driver at load — the runtime then asks wgpu for a Vulkan adapter.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from ..errors import InternalError, UserError
from . import gpu_build, webgpu_kernels

WEB = Path(__file__).resolve().parents[1] / "web"  # index.html + ernie-webgpu.js, copied into artifacts
PLAN = "plan.json"
_CONSTANTS = "constants.npz"  # between build and finish only
PREFILL_CHUNK = 128  # largest T a prefill call takes (hosts split longer prompts): sizes scratch buffers
SHARD_BYTES = 64 << 20  # weight file size (a tensor larger than this gets a shard of its own)
ALIGN = 256  # WebGPU's minStorageBufferOffsetAlignment: a host may bind one buffer per shard
DEFAULT_BINDING_LIMIT = 128 << 20  # maxStorageBufferBindingSize every WebGPU adapter grants


@dataclass(frozen=True)
class WebGpuTarget:
    name = "webgpu"
    device = "webgpu"
    backend = "webgpu"  # manifest backend: the runtime's WebGPU engine, not TVM's VM
    dtypes = ("float32", "float16")  # float16 needs the adapter's shader-f16
    kernels = webgpu_kernels
    library_name = PLAN
    adapter: str = "any"  # "vulkan" for --target vulkan: the backend the runtime asks wgpu for
    # weights over this are stored as row blocks (passes/split_large_weights.py): every WebGPU
    # adapter grants 128 MiB bindings, many (phones, lavapipe) no more
    max_binding_bytes: int = DEFAULT_BINDING_LIMIT

    @staticmethod
    def scale_dtype(dtype: str) -> str:
        """Group scales of quantized weights: float16 only where the kernels compute in float16
        anyway — a float16 scale needs shader-f16, which many adapters lack (SwiftShader, older phones)."""
        return "float16" if dtype == "float16" else "float32"

    @classmethod
    def from_spec(cls, detail: str | None) -> "WebGpuTarget":
        if detail:
            raise UserError(f"--target {cls.name}:{detail}: this target takes no detail")
        return cls()

    @property
    def spec(self) -> str:
        return self.name

    @property
    def runnable_here(self) -> bool:
        from ..runtime.webgpu_engine import adapter_problem

        return adapter_problem(self.adapter) is None

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "webgpu", "max_num_threads": 256}, host="llvm")

    def passes(self, mod: tvm.IRModule, tuner=None):
        return mod, []  # linears stay Relax matmuls: dlight's GEMV / Matmul rules schedule them

    def build(self, mod: tvm.IRModule, out_dir: Path, max_seq_len: int = 0) -> tuple[Path, dict]:
        """Kernels (kernels/*.wgsl) and the plan (plan.json); weights are placed by `finish`."""
        from . import webgpu_plan

        target = self.tvm_target()
        mod, report = gpu_build.schedule(mod, target)
        if report.unscheduled:
            gpu_build.lower_and_build(mod, target, report)  # raises, naming the kernels
        chunk = min(PREFILL_CHUNK, max_seq_len)
        plan, sources, constants = webgpu_plan.build(mod, target, {"T": (1, chunk)}, max_seq_len)
        plan["adapter"] = self.adapter
        plan["features"] = ["shader-f16"] if any("f16" in w for w in sources.values()) else []
        (out_dir / "kernels").mkdir()
        for name, wgsl in sources.items():
            (out_dir / plan["kernels"][name]["wgsl"]).write_text(wgsl)
        np.savez(out_dir / _CONSTANTS, *constants)
        (out_dir / PLAN).write_text(json.dumps(plan, indent=1) + "\n")
        for f in ("index.html", "ernie-webgpu.js"):
            shutil.copyfile(WEB / f, out_dir / f)
        return out_dir / PLAN, {**report.as_dict(), "launches": {f: len(p["launches"])
                                                                  for f, p in plan["functions"].items()}}

    def finish(self, out_dir: Path, weights_file: Path, order: list[str], tokenizer: dict) -> dict:
        """Move the weights (safetensors, in `order`) and the plan's constants into raw shards at
        256-byte-aligned offsets; name and place every weight buffer in the plan. → manifest "weights"
        (with a "warning" when a tensor exceeds the binding size every adapter grants)."""
        from safetensors.numpy import load_file

        plan = json.loads((out_dir / PLAN).read_text())
        arrays = load_file(str(weights_file))
        with np.load(out_dir / _CONSTANTS) as f:
            constants = [f[f"arr_{i}"] for i in range(len(f.files))]
        shards, current, offset = [], None, 0
        for b in plan["buffers"]:
            if b["kind"] != "weight":
                continue
            if "param" in b:
                b["name"] = order[b.pop("param")]
                data = np.ascontiguousarray(arrays[b["name"]]).view(np.uint8).reshape(-1)
            else:
                data = np.ascontiguousarray(constants[b.pop("constant")]).view(np.uint8).reshape(-1)
            if data.nbytes != b["bytes"]:
                raise InternalError(f"webgpu: weight {b['name']} has {data.nbytes} bytes, the plan expects {b['bytes']}")
            if current is None or (offset and offset + data.nbytes > SHARD_BYTES):
                if current:
                    current.close()
                shards.append({"file": f"weights-{len(shards):05d}.bin", "bytes": 0})
                current, offset = open(out_dir / shards[-1]["file"], "wb"), 0
            current.write(b"\0" * (-offset % ALIGN))
            offset += -offset % ALIGN
            b["shard"], b["offset"] = len(shards) - 1, offset
            current.write(data.tobytes())
            offset += data.nbytes
            shards[-1]["bytes"] = offset
        if current:
            current.close()
        plan["shards"] = shards
        (out_dir / PLAN).write_text(json.dumps(plan, indent=1) + "\n")
        weights_file.unlink()
        (out_dir / _CONSTANTS).unlink()
        _write_vocab(out_dir, tokenizer)
        stored = {"shards": [s["file"] for s in shards], "tensors": sum(1 for b in plan["buffers"] if b["kind"] == "weight")}
        largest = max((b for b in plan["buffers"] if b["kind"] == "weight"), key=lambda b: b["bytes"])
        if largest["bytes"] > DEFAULT_BINDING_LIMIT:
            stored["warning"] = (
                f"webgpu: {largest['name']} is {largest['bytes'] / 2**20:.0f} MiB, over WebGPU's default storage-binding "
                f"limit ({DEFAULT_BINDING_LIMIT >> 20} MiB); adapters at the default (phones, lavapipe) will refuse this "
                "artifact — fewer --bits make it smaller")
        return stored


def _write_vocab(out_dir: Path, tokenizer: dict) -> None:
    """vocab.json (pieces by id) for hosts without a SentencePiece library (the JS runtime decodes
    with it); `tokenizer` (the manifest's entry) learns its name. SentencePiece tokenizers only."""
    from ..runtime.tokenizer import Tokenizer

    pieces = Tokenizer(out_dir, tokenizer).pieces
    if pieces is not None:
        (out_dir / "vocab.json").write_text(json.dumps(pieces, ensure_ascii=False))
        tokenizer.update(vocab="vocab.json", strip_leading_space=True)  # as SentencePiece's decode does


@dataclass(frozen=True)
class VulkanTarget(WebGpuTarget):
    name = "vulkan"
    adapter: str = "vulkan"
