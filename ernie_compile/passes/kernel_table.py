"""TIR kernels that Relax functions call by name: one GlobalVar per kernel, however many call it."""
from __future__ import annotations

import tvm
from tvm import relax


class KernelTable:
    """Kernels keyed by a name that encodes their shapes (same name, same kernel)."""

    def __init__(self):
        self._kernels: dict[str, tuple[tvm.ir.GlobalVar, tvm.tirx.PrimFunc]] = {}

    def get(self, name: str, make) -> tvm.ir.GlobalVar:
        """The GlobalVar of kernel `name`, built by make() the first time."""
        if name not in self._kernels:
            func = make()
            # a GlobalVar typed like its function (call_tir checks the callee's type)
            self._kernels[name] = (relax.BlockBuilder().add_func(func, name), func)
        return self._kernels[name][0]

    def add_to(self, mod: tvm.IRModule) -> None:
        for gv, func in self._kernels.values():
            mod[gv] = func
