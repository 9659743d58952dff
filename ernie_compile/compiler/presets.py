"""Built-in model configs: the embedded default and the real ERNIE 4.5 architectures.

Presets build transformers' own model class with deterministic random weights, so benchmarks run on
the real layer shapes without any download. The numbers are those of Baidu's published config.json
files for each checkpoint.
"""
from __future__ import annotations

DEFAULT_PRESET = "ernie-tiny"

# Shared by every ERNIE 4.5 text model.
_COMMON = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu", rms_norm_eps=1e-5,
               rope_theta=500000.0, use_bias=False, max_position_embeddings=131072)

PRESETS: dict[str, dict] = {
    # The embedded default: small enough to compile in seconds, still with the traits that matter:
    # head_dim (64) != hidden/heads (32), grouped-query attention 8/2, tied embeddings. Its vocabulary is
    # the shipped tokenizer's (assets/tokenizer.model).
    "ernie-tiny": dict(_COMMON, model_type="ernie4_5", vocab_size=1024, hidden_size=256, intermediate_size=768,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                       tie_word_embeddings=True, max_position_embeddings=4096, initializer_range=0.06),
    "ernie-4.5-0.3b": dict(_COMMON, model_type="ernie4_5", vocab_size=103424, hidden_size=1024,
                           intermediate_size=3072, num_hidden_layers=18, num_attention_heads=16,
                           num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
    "ernie-4.5-21b-a3b": dict(_COMMON, model_type="ernie4_5_moe", vocab_size=103424, hidden_size=2560,
                              intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=28,
                              num_attention_heads=20, num_key_value_heads=4, head_dim=128,
                              moe_num_experts=64, moe_k=6, moe_num_shared_experts=2, moe_layer_start_index=1,
                              moe_layer_end_index=27, moe_layer_interval=1, moe_norm_min=1e-12,
                              tie_word_embeddings=True),
    "ernie-4.5-300b-a47b": dict(_COMMON, model_type="ernie4_5_moe", vocab_size=103424, hidden_size=8192,
                                intermediate_size=28672, moe_intermediate_size=3584, num_hidden_layers=54,
                                num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                                moe_num_experts=64, moe_k=8, moe_num_shared_experts=0, moe_layer_start_index=3,
                                moe_layer_end_index=53, moe_layer_interval=1, moe_norm_min=1e-12,
                                tie_word_embeddings=False),
}
