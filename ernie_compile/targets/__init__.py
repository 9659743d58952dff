"""Targets: one file each, one line in TARGETS. `--target NAME[:TRIPLE]` picks one."""
from __future__ import annotations

from ..errors import UserError
from .cpu import CpuTarget

TARGETS = {"cpu": CpuTarget}


def get_target(spec: str):
    """'cpu' or 'cpu:aarch64-linux-android' → a target object."""
    name, _, triple = spec.partition(":")
    if name not in TARGETS:
        raise UserError(f"unknown target {spec!r}; targets: {', '.join(TARGETS)}")
    return TARGETS[name].from_spec(triple or None)
