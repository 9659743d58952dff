"""The inductor backend's engine (compiler/inductor.py): two AOTInductor programs and a static KV
cache of torch tensors that both write into. The only part of the runtime that imports torch (and,
for programs that call a custom op implemented in Python, the module that registers it: transformers
for MoE models)."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from ..errors import UserError


class InductorEngine:
    def __init__(self, folder: Path, manifest: dict):
        m = manifest
        # Idle OpenMP threads spin by default; the programs' kernels and torch's matmuls then take turns
        # on threads that compete with spinning ones, and on a loaded machine a 0.3b decode step took 5x
        # longer, at random. Read when torch's OpenMP runtime loads: must precede `import torch` (a
        # process that imported torch earlier keeps its setting); setdefault keeps a user's own choice.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        needs = {"torch": "torch"} | {module: op for op, module in m.get("python_ops", {}).items()}
        for module, why in needs.items():
            try:
                importlib.import_module(module)
            except ImportError:
                raise UserError(f"{folder}: an artifact of --backend inductor needs {module.split('.')[0]} "
                                f"installed (for {why}); pip install -e '.[compile]'") from None
        import torch
        import torch._inductor
        from safetensors.torch import load_file

        self._torch = torch
        stored = load_file(str(folder / m["weights"]["file"]))
        # held here for the programs' lifetime: user-managed constants are not copied (nor owned) by them
        self._constants = constants = {fqn: stored[name] for fqn, name in m["weights"]["constants"].items()}
        self._programs = {}
        for name, file in m["programs"].items():
            program = torch._inductor.aoti_load_package(str(folder / file))
            # user_managed: the program reads these tensors in place, so both share one copy of the weights
            program.load_constants({k: constants[k] for k in program.get_constant_fqns()},
                                   check_full_update=True, user_managed=True)
            self._programs[name] = program
        self._kv = [torch.zeros(shape, dtype=torch.float32) for shape in m["kv_cache"]["shapes"]]

    def reset(self) -> None:
        """Empty the cache. (Positions past the sequence are masked anyway; zeros keep stale values out.)"""
        for t in self._kv:
            t.zero_()

    def step(self, ids: list[int], start: int) -> np.ndarray:
        """Run `ids` at positions start, start+1, …; the logits after the last one, [V] float32."""
        torch = self._torch
        n = len(ids)
        program = self._programs["decode" if n == 1 else "prefill"]
        tokens = torch.tensor([ids], dtype=torch.int64)  # [1, n]
        positions = torch.arange(start, start + n, dtype=torch.int64)[None]  # [1, n]
        with torch.no_grad():
            logits = program(tokens, positions, self._kv)  # [1, V]; writes k/v at the positions into _kv
        return logits[0].numpy()
