"""fuse_gqa_attention: the op reproduces transformers' attention layer; lowering fuses QKV and RoPE."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DENSE_CONFIGS, PROMPT_IDS
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.passes import fuse_gqa_attention as pass_
from ernie_compile.runtime import Session


@pytest.mark.parametrize("use_bias", [False, True])
def test_fused_forward_matches_transformers_attention(use_bias):
    from transformers import Ernie4_5Config
    from transformers.models.ernie4_5.modeling_ernie4_5 import Ernie4_5Attention, Ernie4_5RotaryEmbedding

    config = Ernie4_5Config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=24,
                            use_bias=use_bias)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = Ernie4_5Attention(config, layer_idx=0).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 9, 64)
    pos = torch.arange(3, 12)[None]  # not starting at 0: RoPE positions must be honoured
    cos_sin = Ernie4_5RotaryEmbedding(config)(x, pos)
    causal = torch.full((9, 9), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ref, _ = attn(x, position_embeddings=cos_sin, attention_mask=causal)
        ours, _ = pass_._fused_forward(attn)(x, position_embeddings=cos_sin)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_export_keeps_one_op_per_layer_and_no_mask():
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    from ernie_compile.compiler.capture import capture

    config = Ernie4_5Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    captured = capture(Ernie4_5ForCausalLM(config).eval(), max_seq_len=32, passes=[pass_])
    for ep in (captured.prefill, captured.decode):
        ops = [n for n in ep.graph.nodes if n.target == torch.ops.ernie.rope_gqa_attention.default]
        assert [n.args[9] for n in ops] == [0, 1, 2]
        assert not any("cumsum" in str(n.target) or "tril" in str(n.target) for n in ep.graph.nodes)


@pytest.fixture(scope="module")
def both(checkpoints, tmp_path_factory):
    """The same checkpoint compiled fused (default) and unfused."""
    ckpt = checkpoints["gqa-tied-hd48"]
    out = {}
    for fuse in (True, False):
        folder = tmp_path_factory.mktemp(f"fuse{fuse}")
        out[fuse] = (folder, compile_model(CompileOptions(output=folder, model=str(ckpt), max_seq_len=64,
                                                          fuse_attention=fuse), log=lambda *_: None))
    return out


def test_one_qkv_weight_per_layer(both):
    from safetensors.numpy import load_file

    folder, report = both[True]
    manifest = json.loads((folder / "manifest.json").read_text())
    layers = DENSE_CONFIGS["gqa-tied-hd48"]["num_hidden_layers"]
    assert report["passes"][pass_.NAME] == {"matched": layers, "expected": layers}
    fused = {n: parts for n, parts in manifest["weights"]["fused"].items() if n.endswith(".qkv_proj.weight")}
    assert len(fused) == layers
    assert not any(n.endswith((".q_proj.weight", ".k_proj.weight", ".v_proj.weight")) for n in manifest["weights"]["order"])
    # the fused weight is exactly the transformers weights stacked (checked against the unfused artifact)
    fused_w = load_file(str(folder / "weights.safetensors"))
    plain_w = load_file(str(both[False][0] / "weights.safetensors"))
    for name, parts in fused.items():
        np.testing.assert_array_equal(fused_w[name], np.concatenate([plain_w[p] for p in parts]))


def test_fused_and_unfused_agree(both):
    a, b = Session(both[True][0]), Session(both[False][0])
    np.testing.assert_allclose(a.forward(PROMPT_IDS), b.forward(PROMPT_IDS), rtol=0, atol=1e-4)
    for t in (5, 600, 31):
        np.testing.assert_allclose(a.forward([t]), b.forward([t]), rtol=0, atol=1e-4)
