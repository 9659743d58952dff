"""fuse_rms_norm: the op reproduces transformers' RMSNorm exactly; it matches every decoder norm (two
per layer and the final one) of a MoE model (the dense and VL models' compiles check their own
counts: a shortfall fails the compile, tests/test_e2e_*); the CPU's kernel equals numpy's RMSNorm."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from ernie_compile.passes import fuse_rms_norm as pass_
from ernie_compile.targets.cpu import CpuTarget


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_matches_transformers_norm(dtype):
    from transformers.models.ernie4_5.modeling_ernie4_5 import Ernie4_5RMSNorm

    torch.manual_seed(0)
    norm = Ernie4_5RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(2, 7, 64) * 3).to(dtype)
    with torch.no_grad():
        ref = norm(x)
        ours = pass_._fused_forward(norm)(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_expected_sites_are_every_decoder_norm():
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    config = Ernie4_5_MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                moe_num_experts=4, moe_k=2, moe_layer_start_index=1)
    model = Ernie4_5_MoeForCausalLM(config)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    report = pass_.install(model)
    assert report.matched == report.expected == len(norms) == 7


@pytest.mark.parametrize("rows,hidden", [(1, 1024), (5, 96), (3, 40)])
def test_cpu_kernel_matches_numpy(rows, hidden):
    from ernie_compile.targets.cpu_kernels import rms_norm

    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, hidden)) * 4).astype(np.float32)
    w = rng.standard_normal(hidden).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"main": rms_norm(hidden, 1e-6).with_attr("global_symbol", "main")}),
                      target=CpuTarget.from_spec(None).tvm)
    out = tvm.runtime.tensor(np.full_like(x, np.nan))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    ref = w * (x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6))
    np.testing.assert_allclose(out.numpy(), ref, rtol=2e-6, atol=1e-6)
