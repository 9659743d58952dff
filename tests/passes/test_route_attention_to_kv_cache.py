"""The attention op's eager reference is transformers' own attention; routing covers every layer."""
from __future__ import annotations

import torch

from ernie_compile.passes import route_attention_to_kv_cache as pass_


def test_reference_matches_transformers_eager_attention():
    from transformers import Ernie4_5Config
    from transformers.models.ernie4_5.modeling_ernie4_5 import Ernie4_5Attention, eager_attention_forward

    config = Ernie4_5Config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=24)
    module = Ernie4_5Attention(config, layer_idx=0).eval()
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 9, 24), torch.randn(1, 2, 9, 24), torch.randn(1, 2, 9, 24)
    causal = torch.full((9, 9), float("-inf")).triu(1)[None, None]
    ref, _ = eager_attention_forward(module, q, k, v, causal, scaling=module.scaling)  # [1, T, H, D]
    ours = torch.ops.ernie.kv_attention(q, k, v, 0, module.scaling)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_export_keeps_one_op_per_layer():
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    from ernie_compile.compiler.capture import capture

    config = Ernie4_5Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    captured = capture(Ernie4_5ForCausalLM(config).eval(), max_seq_len=32, passes=[pass_])
    for ep in (captured.prefill, captured.decode):
        ops = [n for n in ep.graph.nodes if n.op == "call_function" and n.target == torch.ops.ernie.kv_attention.default]
        assert [n.args[3] for n in ops] == [0, 1, 2]  # layer ids, in order
        # no attention-mask construction left in the graph
        assert not any("cumsum" in str(n.target) or "tril" in str(n.target) for n in ep.graph.nodes)
