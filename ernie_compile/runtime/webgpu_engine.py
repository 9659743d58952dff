"""The WebGPU backend's engine: runs a launch plan (docs/webgpu-artifact.md) on any wgpu adapter —
Vulkan, Metal, D3D12, or lavapipe (Vulkan on the CPU) on a machine without a GPU.

Everything is created once at load: one GPU buffer per plan buffer (weights uploaded from the
shards, KV caches zero-filled), one pipeline per kernel, and per launch its bind group and uniform
buffer. A step then writes the token ids, positions and each launch's scalars, records every
launch into one compute pass, and reads back the logits. Prompts longer than the plan's largest T
run as consecutive prefill chunks (the cache row of a token is its position, so chunks need no
bookkeeping). No torch, no TVM.
"""
from __future__ import annotations

import functools
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UserError

_PY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
       "floordiv": lambda a, b: a // b, "floormod": lambda a, b: a % b, "min": min, "max": max,
       "lt": lambda a, b: int(a < b), "le": lambda a, b: int(a <= b), "gt": lambda a, b: int(a > b),
       "ge": lambda a, b: int(a >= b), "eq": lambda a, b: int(a == b), "ne": lambda a, b: int(a != b)}
_PACK = {"i32": "i", "u32": "I", "f32": "f"}
_LIMITS = {"maxStorageBufferBindingSize": "max-storage-buffer-binding-size",
           "maxStorageBuffersPerShaderStage": "max-storage-buffers-per-shader-stage",
           "maxComputeWorkgroupStorageSize": "max-compute-workgroup-storage-size",
           "maxComputeInvocationsPerWorkgroup": "max-compute-invocations-per-workgroup"}


def evaluate(expr, env: dict[str, int]) -> int:
    """A plan expression: an int, a variable name, [op, a, b] or ["select", c, a, b]."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, str):
        return env[expr]
    if expr[0] == "select":
        return evaluate(expr[2], env) if evaluate(expr[1], env) else evaluate(expr[3], env)
    return _PY[expr[0]](evaluate(expr[1], env), evaluate(expr[2], env))


def fold_grid(x: int, y: int) -> tuple[int, int, int]:
    """TVM's web runtime: more than 65535 workgroups in x are spread over z."""
    z = 1
    while x >= 1 << 16:
        x, z = (x + 1) // 2, z * 2
    return x, y, z


@functools.cache
def _adapter(kind: str):
    if not os.environ.get("XDG_RUNTIME_DIR"):  # Mesa's Vulkan loader complains on stderr without one
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="ernie-xdg-")
    import wgpu

    adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    if adapter is None:
        return None
    if kind == "vulkan" and adapter.info.get("backend_type", "").lower() != "vulkan":
        return None
    return adapter


def adapter_problem(kind: str = "any") -> str | None:
    """Why no wgpu adapter of `kind` ("any" or "vulkan") is usable here, or None if one is."""
    try:
        import wgpu  # noqa: F401
    except ImportError:
        return "the wgpu package is not installed (pip install 'ernie-compile[webgpu]')"
    try:
        adapter = _adapter(kind)
    except Exception as e:  # wgpu raises its own error types when no driver loads
        return f"wgpu found no adapter ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if adapter is None:
        return f"wgpu found no {'Vulkan ' if kind == 'vulkan' else ''}adapter (install a driver, e.g. mesa-vulkan-drivers)"
    return None


def adapter_description(kind: str = "any") -> str:
    info = _adapter(kind).info
    return f"{info.get('device', '?')} via {info.get('backend_type', '?')}"


class WebGpuEngine:
    def __init__(self, folder: Path, manifest: dict):
        import wgpu

        self._wgpu = wgpu
        plan = self.plan = json.loads((folder / manifest["library"]).read_text())
        problem = adapter_problem(plan.get("adapter", "any"))
        if problem:
            raise UserError(f"{folder}: cannot run a {manifest['target']['spec']} artifact: {problem}")
        adapter = _adapter(plan.get("adapter", "any"))
        self.adapter = adapter_description(plan.get("adapter", "any"))
        missing = [f for f in plan.get("features", []) if f not in adapter.features]
        if missing:
            raise UserError(f"{folder}: the adapter ({self.adapter}) lacks {', '.join(missing)}")
        for name, key in _LIMITS.items():
            need, have = plan["limits"].get(name, 0), adapter.limits[key]
            if need > have:
                raise UserError(f"{folder}: the artifact needs {name} {need}; the adapter ({self.adapter}) has {have}")
        # ask for what the adapter has (a plan's needs are checked above; buffers are bound whole)
        self.device = device = adapter.request_device_sync(
            required_features=plan.get("features", []),
            required_limits={key: adapter.limits[key] for key in (*_LIMITS.values(), "max-buffer-size")})
        usage = wgpu.BufferUsage
        self.buffers = []
        shards = {}
        for b in plan["buffers"]:
            size = max(4, (b["bytes"] + 3) // 4 * 4)
            buf = device.create_buffer(size=size, usage=usage.STORAGE | usage.COPY_DST | usage.COPY_SRC)
            if b["kind"] == "weight":
                if b["shard"] not in shards:
                    shards[b["shard"]] = np.memmap(folder / plan["shards"][b["shard"]]["file"], dtype=np.uint8, mode="r")
                data = np.zeros(size, np.uint8)
                data[:b["bytes"]] = shards[b["shard"]][b["offset"]:b["offset"] + b["bytes"]]
                device.queue.write_buffer(buf, 0, data)
            self.buffers.append(buf)
        self.pipelines = {name: self._pipeline(name, k, folder) for name, k in plan["kernels"].items()}
        self.functions = {name: self._prepare(f) for name, f in plan["functions"].items()}
        self.max_t = plan["vars"]["T"][1]

    def _pipeline(self, name: str, kernel: dict, folder: Path):
        wgpu = self._wgpu
        entries = [{"binding": i, "visibility": wgpu.ShaderStage.COMPUTE,
                    "buffer": {"type": wgpu.BufferBindingType.storage if a == "read_write"
                               else wgpu.BufferBindingType.read_only_storage}}
                   for i, a in enumerate(kernel["buffers"])]
        entries.append({"binding": len(kernel["buffers"]), "visibility": wgpu.ShaderStage.COMPUTE,
                        "buffer": {"type": wgpu.BufferBindingType.uniform}})
        layout = self.device.create_bind_group_layout(entries=entries)
        module = self.device.create_shader_module(code=(folder / kernel["wgsl"]).read_text())
        pipeline = self.device.create_compute_pipeline(
            layout=self.device.create_pipeline_layout(bind_group_layouts=[layout]),
            compute={"module": module, "entry_point": name})
        return pipeline, layout, kernel

    def _prepare(self, fn: dict) -> list:
        """Per launch: pipeline, bind group over its buffers and its own uniform buffer."""
        usage = self._wgpu.BufferUsage
        launches = []
        for launch in fn["launches"]:
            pipeline, layout, kernel = self.pipelines[launch["kernel"]]
            nbytes = (len(kernel["scalars"]) + 1) * 4
            uniform = self.device.create_buffer(size=(nbytes + 15) // 16 * 16, usage=usage.UNIFORM | usage.COPY_DST)
            entries = [{"binding": i, "resource": {"buffer": self.buffers[b], "offset": 0,
                                                   "size": self.buffers[b].size}}
                       for i, b in enumerate(launch["buffers"])]
            entries.append({"binding": len(entries), "resource": {"buffer": uniform, "offset": 0, "size": nbytes}})
            group = self.device.create_bind_group(layout=layout, entries=entries)
            fmt = "<" + "".join(_PACK[s] for s in kernel["scalars"]) + "I"
            launches.append((pipeline, group, uniform, fmt, launch["scalars"], launch["grid"]))
        return launches

    def reset(self) -> None:
        """Nothing to clear: a new sequence starts at position 0 and overwrites the cache rows it reads."""

    def step(self, ids: list[int], start: int) -> np.ndarray:
        logits = None
        for at in range(0, len(ids), self.max_t):
            chunk = ids[at:at + self.max_t]
            logits = self._run("decode" if len(chunk) == 1 else "prefill", chunk, start + at)
        return logits

    def _run(self, name: str, ids: list[int], start: int) -> np.ndarray:
        fn, spec = self.functions[name], self.plan["functions"][name]
        n = len(ids)
        queue = self.device.queue
        queue.write_buffer(self.buffers[spec["inputs"]["input_ids"]], 0, np.asarray(ids, np.int32))
        queue.write_buffer(self.buffers[spec["inputs"]["position_ids"]], 0, np.arange(start, start + n, dtype=np.int32))
        env = {"T": n}
        encoder = self.device.create_command_encoder()
        compute = encoder.begin_compute_pass()
        for pipeline, group, uniform, fmt, scalars, grid in fn:
            x, y = (evaluate(g, env) for g in grid)
            queue.write_buffer(uniform, 0, struct.pack(fmt, *(evaluate(s, env) for s in scalars), x))
            compute.set_pipeline(pipeline)
            compute.set_bind_group(0, group)
            compute.dispatch_workgroups(*fold_grid(x, y))
        compute.end()
        queue.submit([encoder.finish()])
        out = spec["output"]
        dtype = np.dtype(out["dtype"])
        count = evaluate(out["count"], env)
        raw = queue.read_buffer(self.buffers[out["buffer"]], 0, (count * dtype.itemsize + 3) // 4 * 4)
        return np.frombuffer(raw, dtype=dtype, count=count).astype(np.float32)
