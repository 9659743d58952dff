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
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from ..errors import InternalError, UserError
from . import gpu_build, gpu_kernels, webgpu_kernels, webgpu_plan
from ..passes.weight_records import StoredTensor
from .base import Built, Target

WEB = Path(__file__).resolve().parents[1] / "web"  # index.html + ernie-webgpu.js, copied into artifacts
PLAN = "plan.json"
PREFILL_CHUNK = 128  # largest T a prefill call takes (hosts split longer prompts): sizes scratch buffers
SHARD_BYTES = 64 << 20  # weight file size (a tensor larger than this gets a shard of its own)
DEFAULT_BINDING_LIMIT = 128 << 20  # maxStorageBufferBindingSize every WebGPU adapter grants


@dataclass(frozen=True)
class WebGpuTarget(Target):
    adapter: str = "any"  # "vulkan" for --target vulkan: the backend the runtime asks wgpu for

    @classmethod
    def from_spec(cls, detail: str | None, name: str = "webgpu", adapter: str = "any") -> "WebGpuTarget":
        if detail:
            raise UserError(f"--target {name}:{detail}: this target takes no detail")
        return cls(
            spec=name, device="webgpu", backend="webgpu",  # the runtime's WebGPU engine, not TVM's VM
            tvm=tvm.target.Target({"kind": "webgpu", "max_num_threads": 256}, host="llvm"),
            dtypes=("float32", "float16"),  # float16 needs the adapter's shader-f16
            # a float16 scale needs shader-f16, which many adapters lack (SwiftShader, older phones):
            # float16 scales only where the kernels compute in float16 anyway
            scale_dtypes={"float32": "float32", "float16": "float16"},
            kernels=webgpu_kernels, kv_cache="contiguous",  # no C++ runtime objects on a browser's host
            index_dtype="int32",  # WGSL has no 64-bit integers
            quant_layouts=gpu_kernels.QUANT_LAYOUTS, static_m=True, int8_dot=None, int8_weight_bits=(),
            # weights over this are stored as row blocks (passes/split_large_weights.py): every WebGPU
            # adapter grants 128 MiB bindings, many (phones, lavapipe) no more
            max_binding_bytes=DEFAULT_BINDING_LIMIT,
            native_ops=frozenset({"moe_route"}),  # no GPU sort it can run: routing by our kernel
            tunable=(), library_name=PLAN, batch_step=False, cross=False, adapter=adapter)

    def runs_here(self) -> bool:
        from ..runtime.webgpu_engine import adapter_problem

        return adapter_problem(self.adapter) is None

    def passes(self, mod: tvm.IRModule, tuner):
        return mod, []  # linears stay Relax matmuls: dlight's GEMV / Matmul rules schedule them

    def build(self, mod: tvm.IRModule, out_dir: Path, max_seq_len: int) -> Built:
        """Kernels (kernels/*.wgsl) and the launch plan; `write_weights` places the weights in it and
        writes plan.json."""
        from . import webgpu_plan

        mod, report = gpu_build.schedule(mod, self.tvm)
        if report.unscheduled:
            gpu_build.lower_and_build(mod, self.tvm, report)  # raises, naming the kernels
        chunk = min(PREFILL_CHUNK, max_seq_len)
        plan, sources, constants = webgpu_plan.build(mod, self.tvm, {"T": (1, chunk)}, max_seq_len)
        plan["adapter"] = self.adapter
        plan["features"] = ["shader-f16"] if any("f16" in w for w in sources.values()) else []
        (out_dir / "kernels").mkdir()
        for name, wgsl in sources.items():
            (out_dir / plan["kernels"][name]["wgsl"]).write_text(wgsl)
        for f in ("index.html", "ernie-webgpu.js"):
            shutil.copyfile(WEB / f, out_dir / f)
        launches = {f: len(p["launches"]) for f, p in plan["functions"].items()}
        return Built(out_dir / PLAN, {**report.as_dict(), "launches": launches},
                     {"plan": plan, "constants": constants})

    def write_weights(self, out_dir: Path, records, source, built: Built, log):
        """Every weight buffer of the plan as raw bytes in shards of about SHARD_BYTES, at 256-byte
        aligned offsets (a host may bind one buffer per shard): each buffer is given its shard and
        offset first, then the records are produced chunk by chunk into place. The plan learns each
        buffer's name, shard and offset and is written."""
        from ..compiler import package
        from ..passes.weight_records import stored_tensors

        plan, constants = built.state["plan"], built.state["constants"]
        stored = stored_tensors(records)
        buffers = [b for b in plan["buffers"] if b["kind"] == "weight"]
        for b in buffers:
            if "param" in b:
                b["name"] = stored[b.pop("param")].name
        by_name = {b["name"]: b for b in buffers if "constant" not in b}
        shards, offset = [], 0
        for b in buffers:
            if not shards or (offset and offset + b["bytes"] > SHARD_BYTES):
                shards.append({"file": f"weights-{len(shards):05d}.bin", "bytes": 0})
                offset = 0
            offset += -offset % webgpu_plan.ALIGN
            b["shard"], b["offset"] = len(shards) - 1, offset
            offset += b["bytes"]
            shards[-1]["bytes"] = offset
        errors = {}
        writer = package.RegionWriter(sum(b["bytes"] for b in buffers))
        try:
            for s in shards:
                writer.open(out_dir / s["file"])
                os.truncate(out_dir / s["file"], s["bytes"])

            def put(b, t, first, data):
                if math.prod(t.shape) * np.dtype(t.dtype).itemsize != b["bytes"]:
                    raise InternalError(f"webgpu: weight {t.name} is {t.shape} {t.dtype}, the plan expects {b['bytes']} bytes")
                writer.write(out_dir / shards[b["shard"]]["file"], b["offset"], t, first, data)

            for record in records:
                for t, first, data in package.produce(record, source, errors):
                    if t.name in by_name:  # a weight no kernel reads (dead after fusion) is not stored
                        put(by_name[t.name], t, first, data)
            for b in buffers:
                if "constant" in b:
                    data = np.ascontiguousarray(constants[b.pop("constant")]).reshape(-1)
                    put(b, StoredTensor(b["name"], data.shape, data.dtype.name), 0, data)
        finally:
            writer.close()
        plan["shards"] = shards
        (out_dir / PLAN).write_text(json.dumps(plan, indent=1) + "\n")
        largest = max(buffers, key=lambda b: b["bytes"])
        if largest["bytes"] > DEFAULT_BINDING_LIMIT:
            log(f"  webgpu: {largest['name']} is {largest['bytes'] / 2**20:.0f} MiB, over WebGPU's default storage-binding "
                f"limit ({DEFAULT_BINDING_LIMIT >> 20} MiB); adapters at the default (phones, lavapipe) will refuse this "
                "artifact — fewer --bits make it smaller")
        return {"shards": [s["file"] for s in shards], "tensors": len(buffers)}, errors

    def write_host_files(self, out_dir: Path, tokenizer: dict) -> None:
        _write_vocab(out_dir, tokenizer)


def _write_vocab(out_dir: Path, tokenizer: dict) -> None:
    """vocab.json (pieces by id) for hosts without a SentencePiece library (the JS runtime decodes
    with it); `tokenizer` (the manifest's entry) learns its name. SentencePiece tokenizers only."""
    from ..runtime.tokenizer import Tokenizer

    pieces = Tokenizer(out_dir, tokenizer).pieces
    if pieces is not None:
        (out_dir / "vocab.json").write_text(json.dumps(pieces, ensure_ascii=False))
        tokenizer.update(vocab="vocab.json", strip_leading_space=True)  # as SentencePiece's decode does


def vulkan_from_spec(detail: str | None) -> WebGpuTarget:
    """`--target vulkan`: the WebGPU artifact, run by wgpu's Vulkan backend."""
    return WebGpuTarget.from_spec(detail, name="vulkan", adapter="vulkan")
