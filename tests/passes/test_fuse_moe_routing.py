"""fuse_moe_routing: the op's reference is ERNIE's MoE block; the site count follows ERNIE's layer rule."""
from __future__ import annotations

import pytest
import torch

from ernie_compile.passes import fuse_moe_routing


def _moe_config(**kw):
    from transformers import Ernie4_5_MoeConfig

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_num_experts=8, moe_k=2,
                moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=3, moe_layer_interval=1)
    return Ernie4_5_MoeConfig(**{**base, **kw})


@pytest.mark.parametrize("shared", [0, 2])
def test_op_reference_matches_transformers_block(shared):
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    config = _moe_config(moe_num_shared_experts=shared, moe_k=3)
    torch.manual_seed(0)
    block = Ernie4_5_MoeSparseMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 11, 32)
    with torch.no_grad():
        ref = block(x)
        ours = fuse_moe_routing._fused_forward(block)(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_correction_bias_selects_but_does_not_weight():
    """With a bias that changes the winners, the reference still weights by the unbiased softmax."""
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    config = _moe_config(moe_num_shared_experts=0)
    torch.manual_seed(1)
    block = Ernie4_5_MoeSparseMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    bias = block.gate.moe_statics.e_score_correction_bias
    with torch.no_grad():
        bias.zero_()
        bias[0, 5] = bias[0, 6] = 1.0  # experts 5 and 6 always win
        x = torch.randn(1, 9, 32)
        probs = torch.softmax(x[0] @ block.gate.weight.T, -1)
        assert not (probs.topk(2).indices.sort().values == torch.tensor([5, 6])).all(), "bias must change winners"
        ours = torch.ops.ernie.moe(x[0], block.gate.weight, bias, block.experts.gate_up_proj,
                                   block.experts.down_proj, 2, 1e-12)
        torch.testing.assert_close(ours, block(x)[0], rtol=1e-5, atol=1e-6)
        biased_weights = torch.ops.ernie.moe(x[0], block.gate.weight, torch.zeros_like(bias),
                                             block.experts.gate_up_proj, block.experts.down_proj, 2, 1e-12)
        assert not torch.allclose(ours, biased_weights)


@pytest.mark.parametrize("start,end,interval", [(0, 3, 1), (1, 3, 1), (1, 3, 2), (0, 2, 2), (2, -1, 1)])
def test_expected_sites_counts_transformers_moe_layers(start, end, interval):
    from transformers import Ernie4_5_MoeForCausalLM
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    config = _moe_config(moe_layer_start_index=start, moe_layer_end_index=end, moe_layer_interval=interval)
    model = Ernie4_5_MoeForCausalLM(config)
    actual = sum(isinstance(m, Ernie4_5_MoeSparseMoeBlock) for m in model.modules())
    assert fuse_moe_routing.expected_sites(config) == actual
    assert fuse_moe_routing.install(model).matched == actual
