"""Built-in model configs: the embedded default and the real ERNIE 4.5 architectures.

Presets give transformers' own model class deterministic random weights, so benchmarks run on the
real layer shapes without any download. The numbers are those of Baidu's published config.json
files for each checkpoint. The weights come from a `PresetSource`: each tensor is drawn when asked
for, so a 300B preset costs no memory until a compile writes its weights one at a time.
"""
from __future__ import annotations

import zlib

import numpy as np

from .weights import WeightSource, meta_model

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
    # The vision-language model: a text MoE with modality-isolated experts (text and vision, each with
    # its own router) and 3-D RoPE, a ViT vision tower and a resampler. Unset text fields take
    # transformers' defaults, which are the published VL-28B-A3B's.
    "ernie-4.5-vl-28b-a3b": dict(
        model_type="ernie4_5_vl_moe", tie_word_embeddings=True,
        text_config=dict(_COMMON, vocab_size=103424, hidden_size=2560, intermediate_size=12288,
                         num_hidden_layers=28, num_attention_heads=20, num_key_value_heads=4, head_dim=128,
                         moe_intermediate_size=[1536, 512], moe_num_experts=64, moe_k=6, moe_num_shared_experts=2,
                         moe_norm_min=1e-12, rope_parameters=dict(rope_type="default", rope_theta=500000.0,
                                                                  mrope_section=[22, 22, 20]),
                         tie_word_embeddings=True),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=5120, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_merge_size=2, rms_norm_eps=1e-6),
        image_token_id=100295, image_start_token_id=101304, image_end_token_id=101305, video_token_id=103367,
        video_start_token_id=101306, video_end_token_id=101307),
    # The embedded VL model for tests: layer 0 dense, layer 1 MoE with both expert kinds (4 text experts
    # of 64, 4 vision experts of 32, top-2, one shared), odd head dims (text 40 with M-RoPE sections
    # 8/8/4, vision 24). Its image/video tokens are ids 1024-1029, past the shipped tokenizer's 1024.
    "ernie-vl-tiny": dict(
        model_type="ernie4_5_vl_moe", tie_word_embeddings=True,
        text_config=dict(_COMMON, vocab_size=1040, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=40, moe_intermediate_size=[64, 32],
                         moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_norm_min=1e-12,
                         mlp_layer_types=["dense", "sparse"], max_position_embeddings=4096, initializer_range=0.06,
                         rope_parameters=dict(rope_type="default", rope_theta=500000.0, mrope_section=[8, 8, 4]),
                         tie_word_embeddings=True),
        vision_config=dict(depth=2, hidden_size=96, intermediate_size=192, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_merge_size=2, rms_norm_eps=1e-6, initializer_range=0.06),
        image_token_id=1024, image_start_token_id=1025, image_end_token_id=1026, video_token_id=1027,
        video_start_token_id=1028, video_end_token_id=1029),
}


ROW_BLOCK = 4096  # rows of a 2-D preset weight drawn from one seed (get_rows draws only the blocks it needs)


class PresetSource(WeightSource):
    """Random weights generated on demand, seeded per tensor and, for stacked MoE tensors [E, …], per
    expert, so `get(name, index=e)` draws expert e alone and equals `get(name)[e]`. Values follow
    transformers' _init_weights for these classes: norm weights ones, biases and the router's
    e_score_correction_bias zeros, the embedding's padding row zeros, every other weight
    normal(0, config.initializer_range)."""

    def __init__(self, config, seed: int = 0, model=None):
        super().__init__(model if model is not None else meta_model(config))
        self.seed = seed
        self._std = float(config.get_text_config().initializer_range)

    def dtype(self, name: str) -> str:
        return "float32"

    def stacked(self, name: str) -> bool:
        return len(self.shape(name)) == 3  # the experts' gate_up_proj [E, 2I, H] and down_proj [E, H, I]

    def get(self, name: str, index: int | None = None) -> np.ndarray:
        name = self._resolve(name)
        shape = self._shapes[name]
        if not self.stacked(name):
            value = self.get_rows(name, 0, shape[0]) if shape else self._draw(name, shape, 0)
            return value if index is None else np.ascontiguousarray(value[index])
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{name}: index {index} outside [0, {shape[0]})")
            return self._draw(name, shape[1:], index + 1)
        return np.stack([self._draw(name, shape[1:], e + 1) for e in range(shape[0])])  # [E, …]

    def get_rows(self, name: str, first: int, end: int) -> np.ndarray:
        """Rows of a 2-D (or 1-D) tensor, drawn in blocks of ROW_BLOCK rows seeded per block, so a
        range costs only its blocks and get() is the same blocks end to end."""
        name = self._resolve(name)
        shape = self._shapes[name]
        if self.stacked(name):
            return np.ascontiguousarray(self.get(name)[first:end])
        lo, hi = first // ROW_BLOCK, -(-end // ROW_BLOCK)
        blocks = [self._draw(name, (min(ROW_BLOCK, shape[0] - b * ROW_BLOCK), *shape[1:]), -(b + 1), row0=b * ROW_BLOCK)
                  for b in range(lo, hi)]
        value = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return np.ascontiguousarray(value[first - lo * ROW_BLOCK:end - lo * ROW_BLOCK])

    def _draw(self, name: str, shape: tuple[int, ...], stream: int, row0: int = 0) -> np.ndarray:
        import torch

        owner, _, leaf = name.rpartition(".")
        module = self._meta.get_submodule(owner)
        kind = type(module).__name__
        if "RMSNorm" in kind or "LayerNorm" in kind:
            return np.full(shape, 1.0 if leaf == "weight" else 0.0, np.float32)
        if leaf == "bias" or leaf == "e_score_correction_bias":
            return np.zeros(shape, np.float32)
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode()), stream % (1 << 32)])
        value = rng.standard_normal(shape, dtype=np.float32)
        value *= np.float32(self._std)
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None and \
                row0 <= module.padding_idx < row0 + shape[0]:
            value[module.padding_idx - row0] = 0.0  # as nn.Embedding's init (and transformers') leaves it
        return value
