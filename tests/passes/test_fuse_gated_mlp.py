"""fuse_gated_mlp: the op reproduces transformers' MLP; it matches every dense layer and every MoE
block's shared experts (the routed experts keep their own route); the artifact holds one gate|up
weight per layer."""
from __future__ import annotations

import json

import pytest
import torch

from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.passes import fuse_gated_mlp as pass_


def test_fused_forward_matches_transformers_mlp():
    from transformers import Ernie4_5Config
    from transformers.models.ernie4_5.modeling_ernie4_5 import Ernie4_5MLP

    config = Ernie4_5Config(hidden_size=64, intermediate_size=96)
    torch.manual_seed(0)
    mlp = Ernie4_5MLP(config).eval()
    x = torch.randn(1, 7, 64)
    with torch.no_grad():
        ref = mlp(x)
        ours = pass_._fused_forward(mlp, "model.layers.0.mlp.gate_up_proj.weight", config.hidden_act)(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("start,end,interval,shared", [(1, 3, 1, 1), (0, 3, 2, 1), (2, 2, 1, 2), (1, 3, 1, 0)])
def test_expected_sites_are_transformers_dense_layers_and_shared_experts(start, end, interval, shared):
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    config = Ernie4_5_MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                moe_num_experts=4, moe_k=2, moe_num_shared_experts=shared, moe_layer_start_index=start,
                                moe_layer_end_index=end, moe_layer_interval=interval)
    model = Ernie4_5_MoeForCausalLM(config)
    dense = sum(1 for layer in model.model.layers if type(layer.mlp).__name__.endswith("MLP"))
    with_shared = sum(1 for layer in model.model.layers if getattr(layer.mlp, "shared_experts", None) is not None)
    assert with_shared == (4 - dense if shared else 0)
    report = pass_.install(model)
    assert report.matched == report.expected == dense + with_shared


def test_artifact_holds_one_gate_up_weight_per_layer(tmp_path):
    compile_model(CompileOptions(output=tmp_path, max_seq_len=32), log=lambda *_: None)  # the embedded default
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    names = manifest["weights"]["order"]
    layers = manifest["passes"]["fuse_gated_mlp"]["expected"]
    assert manifest["passes"]["fuse_gated_mlp"]["matched"] == layers > 0
    assert [n for n in names if n.endswith("gate_up_proj.weight")] == \
        [f"model.layers.{i}.mlp.gate_up_proj.weight" for i in range(layers)]
    assert not any(".mlp.gate_proj." in n or ".mlp.up_proj." in n for n in names)
