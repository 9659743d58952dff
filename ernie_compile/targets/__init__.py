"""Targets: one file each (a `Target` subclass, targets/base.py), one line in TARGETS.
`--target NAME[:DETAIL]` picks one: the detail is an LLVM triple for cpu (cross builds), the GPU
architectures for cuda (sm_80,sm_90), macos or ios for metal; webgpu and vulkan take none."""
from __future__ import annotations

from ..errors import UserError
from .base import Built, Target  # noqa: F401
from .cpu import CpuTarget
from .cuda import CudaTarget
from .metal import MetalTarget
from .webgpu import WebGpuTarget, vulkan_from_spec

# name → the function that makes the target from the text after "NAME:" (None when there is none)
TARGETS = {"cpu": CpuTarget.from_spec, "cuda": CudaTarget.from_spec, "metal": MetalTarget.from_spec,
           "webgpu": WebGpuTarget.from_spec, "vulkan": vulkan_from_spec}


def get_target(spec: str) -> Target:
    """'cpu', 'cpu:aarch64-linux-android', 'cuda:sm_90' … → a target."""
    name, _, detail = spec.partition(":")
    if name not in TARGETS:
        raise UserError(f"unknown target {spec!r}; targets: {', '.join(TARGETS)}")
    return TARGETS[name](detail or None)
