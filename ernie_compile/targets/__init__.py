"""Targets: one file each, one line in TARGETS. `--target NAME[:DETAIL]` picks one: the detail is an
LLVM triple for cpu (cross builds), the GPU architectures for cuda (sm_80,sm_90),
macos or ios for metal; webgpu and vulkan take none."""
from __future__ import annotations

from ..errors import UserError
from .cpu import CpuTarget
from .cuda import CudaTarget
from .metal import MetalTarget
from .webgpu import VulkanTarget, WebGpuTarget

TARGETS = {"cpu": CpuTarget, "cuda": CudaTarget, "metal": MetalTarget, "webgpu": WebGpuTarget, "vulkan": VulkanTarget}


def get_target(spec: str):
    """'cpu', 'cpu:aarch64-linux-android', 'cuda:sm_90' … → a target object."""
    name, _, triple = spec.partition(":")
    if name not in TARGETS:
        raise UserError(f"unknown target {spec!r}; targets: {', '.join(TARGETS)}")
    return TARGETS[name].from_spec(triple or None)
