"""Importer fixes in compiler/lower.py, checked against torch on the same inputs."""
from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm.relax.frontend.torch import from_exported_program
from tvm.runtime.vm import VirtualMachine

from ernie_compile.compiler.lower import _select_int


class LastRow(torch.nn.Module):
    def forward(self, x):
        return x[:, -1] * 2  # aten.select.int with a negative index


def test_negative_select_with_symbolic_length():
    seq = torch.export.Dim("seq", min=1, max=64)
    ep = torch.export.export(LastRow(), (torch.randn(2, 5, 3),), dynamic_shapes=({1: seq},))
    mod = from_exported_program(ep, custom_convert_map={"select.int": _select_int})
    vm = VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    for t in (1, 7):
        x = torch.randn(2, t, 3)
        out = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
        np.testing.assert_array_equal(out, LastRow()(x).numpy())
