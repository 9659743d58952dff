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


def test_our_rope_kernel_matches_tvms():
    """The KV cache's fused_rope slot: ours (targets/cpu_attention.py) against the TVM kernel it
    replaces, on decode and prefill shapes, with RoPE on and off (0.3b heads, theta 500000)."""
    from ernie_compile.compiler.load import load_preset
    from ernie_compile.compiler.lower import _kv_cache_module
    from ernie_compile.targets.cpu_attention import fused_rope

    from tvm.relax.frontend.nn.llm.kv_cache import llama_rope_with_position_map

    from ernie_compile.targets import get_target

    config = load_preset("ernie-4.5-0.3b").model.config
    target = tvm.target.Target("llvm")
    theta = float(config.rope_parameters["rope_theta"])
    ours = fused_rope(16, 2, 128, theta)
    cache = _kv_cache_module(config, "float32", get_target("cpu"), "normal")
    tvm.ir.assert_structural_equal(cache["fused_rope"], ours.with_attr("global_symbol", "fused_rope"))
    tvm_rope = llama_rope_with_position_map(theta, 1, 128, 16, 2, "float32", {"rope_type": "gptj"}, 128)
    rng = np.random.default_rng(0)
    for seq in (1, 7):
        qkv = rng.standard_normal((seq, 20, 128)).astype(np.float32)
        positions = rng.integers(0, 4000, seq).astype(np.int32)
        for apply in (1, 0):
            outs = []
            for func in (tvm_rope, ours):
                lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
                q, k, v = (tvm.runtime.tensor(np.zeros((seq, h, 128), np.float32)) for h in (16, 2, 2))
                lib["main"](tvm.runtime.tensor(qkv), tvm.runtime.tensor(positions), q, k, v, apply)
                outs.append([t.numpy() for t in (q, k, v)])
            for a, b in zip(*outs):
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
            if apply:
                assert np.abs(outs[1][0] - qkv[:, :16]).max() > 0.1  # it did rotate
