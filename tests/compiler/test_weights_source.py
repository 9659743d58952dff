"""WeightSource: a checkpoint read one tensor at a time equals what transformers' from_pretrained loads.

The oracle is `from_pretrained(folder, dtype=torch.float32).state_dict()` on tiny random dense and MoE
checkpoints written by save_pretrained (float32, bfloat16, sharded with an index). Presets are
checked for determinism and for slicing, and both kinds of source for what one expert costs.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import transformers

from conftest import DENSE_CONFIGS, MOE_CONFIGS
from ernie_compile.compiler import weights as weights_mod
from ernie_compile.compiler.load import load
from ernie_compile.compiler.presets import PRESETS, PresetSource
from ernie_compile.compiler.weights import CheckpointSource, fake_parameters, meta_model
from ernie_compile.errors import UserError


def _save(folder, overrides, moe=False, dtype=torch.float32, shard=None, seed=0, extra=None):
    """save_pretrained of a random model; `extra` adds checkpoint tensors transformers does not use."""
    kind = "Ernie4_5_Moe" if moe else "Ernie4_5"
    config = getattr(transformers, f"{kind}Config")(max_position_embeddings=128, initializer_range=0.1, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():  # non-trivial values where transformers initialises constants
        for name, p in model.named_parameters():
            if "norm" in name or "e_score_correction_bias" in name:
                p.copy_(torch.randn_like(p))
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if extra:
        from safetensors.torch import save_file

        save_file(extra, str(folder / "extra.safetensors"), metadata={"format": "pt"})
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"].update({k: "extra.safetensors" for k in extra})
            index.write_text(json.dumps(data))
    return folder


def _oracle(folder):
    cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(transformers.AutoConfig.from_pretrained(folder))]
    return cls.from_pretrained(folder, dtype=torch.float32)


def _assert_equals_from_pretrained(folder):
    ref_model = _oracle(folder)
    ref = ref_model.state_dict()
    src = CheckpointSource(folder)
    tied = set(getattr(ref_model, "all_tied_weights_keys", {}))
    assert src.names() == [n for n in ref if n not in tied]
    for name in ref:  # tied names included: get() answers for them too
        value = src.get(name)
        assert value.dtype == np.float32 and src.shape(name) == tuple(ref[name].shape), name
        np.testing.assert_array_equal(value, ref[name].numpy(), err_msg=name)
        if src.stacked(name):
            for e in range(value.shape[0]):
                np.testing.assert_array_equal(src.get(name, index=e), value[e], err_msg=f"{name}[{e}]")
    # materialize: a meta model filled from the source is from_pretrained's model, config included
    model = meta_model(src.config)
    src.materialize(model)
    assert model.config.to_diff_dict() == ref_model.config.to_diff_dict()
    mine = model.state_dict()
    assert list(mine) == list(ref) and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert all(torch.equal(b, dict(ref_model.named_buffers())[n]) for n, b in model.named_buffers())
    ids = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=0, atol=0)
    return src


def test_dense_fp32_tied(tmp_path):
    src = _assert_equals_from_pretrained(_save(tmp_path / "d", DENSE_CONFIGS["gqa-tied-hd48"]))
    assert "lm_head.weight" not in src.names() and src.dtype("model.norm.weight") == "float32"


def test_dense_untied_bf16_with_bias(tmp_path):
    cfg = dict(DENSE_CONFIGS["mha-bias-hd16"], tie_word_embeddings=False)
    src = _assert_equals_from_pretrained(_save(tmp_path / "d", cfg, dtype=torch.bfloat16))
    assert "lm_head.weight" in src.names() and src.dtype("lm_head.weight") == "bfloat16"


@pytest.mark.parametrize("config", ["e16-k6-s2-i1-st1", "e8-k2-s1-i2-st1"])
def test_moe_bf16_sharded(tmp_path, config):
    folder = _save(tmp_path / "m", MOE_CONFIGS[config], moe=True, dtype=torch.bfloat16, shard="40KB")
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(folder.glob("*.safetensors"))) > 2
    src = _assert_equals_from_pretrained(folder)
    stacked = [n for n in src.names() if src.stacked(n)]
    assert stacked and all(".mlp.experts." in n for n in stacked)
    assert src.dtype(stacked[0]) == "bfloat16"


def test_moe_fp32_single_file(tmp_path):
    _assert_equals_from_pretrained(_save(tmp_path / "m", MOE_CONFIGS["e4-k1-s0-i1-st0"], moe=True))


def test_mtp_tensors_are_skipped_and_listed(tmp_path):
    hidden = MOE_CONFIGS["e4-k1-s0-i1-st0"]["hidden_size"]
    extra = {"model.mtp_linear_proj.0.weight": torch.randn(hidden, 2 * hidden),
             "model.mtp_block.0.input_layernorm.weight": torch.ones(hidden)}
    folder = _save(tmp_path / "m", MOE_CONFIGS["e4-k1-s0-i1-st0"], moe=True, shard="40KB", extra=extra)
    src = _assert_equals_from_pretrained(folder)
    assert sorted(src.skipped) == sorted(extra)


def test_expert_slice_reads_only_that_expert(tmp_path, monkeypatch):
    """The memory bound of a 21B compile: one expert of a stacked tensor reads that expert's tensors."""
    folder = _save(tmp_path / "m", MOE_CONFIGS["e8-k3-bias"], moe=True, dtype=torch.bfloat16, shard="40KB")
    src = CheckpointSource(folder)
    reads = []
    real = weights_mod.Shard.read
    monkeypatch.setattr(weights_mod.Shard, "read", lambda self, key, rows=None: reads.append(key) or real(self, key, rows))
    value = src.get("model.layers.0.mlp.experts.gate_up_proj", index=5)  # [2I, H]
    assert sorted(reads) == ["model.layers.0.mlp.experts.5.gate_proj.weight",
                             "model.layers.0.mlp.experts.5.up_proj.weight"]
    reads.clear()
    src.get("model.layers.1.mlp.experts.down_proj", index=7)
    assert reads == ["model.layers.1.mlp.experts.7.down_proj.weight"]
    cfg = MOE_CONFIGS["e8-k3-bias"]
    assert value.shape == (2 * cfg["moe_intermediate_size"], cfg["hidden_size"])


def test_stacked_on_disk_reads_only_its_rows(tmp_path, monkeypatch):
    """A checkpoint that already stores experts stacked (transformers' own layout) is read by rows."""
    from safetensors.torch import save_file

    folder = _save(tmp_path / "m", MOE_CONFIGS["e4-k1-s0-i1-st0"], moe=True)
    model = _oracle(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    src = CheckpointSource(folder)
    rows = []
    real = weights_mod.Shard.read
    monkeypatch.setattr(weights_mod.Shard, "read", lambda self, key, r=None: rows.append(r) or real(self, key, r))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    np.testing.assert_array_equal(src.get(name, index=2), state[name][2].numpy())
    assert rows == [(2, 3)]


def test_missing_shard_is_a_user_error(tmp_path):
    folder = _save(tmp_path / "m", MOE_CONFIGS["e4-k1-s0-i1-st0"], moe=True, shard="40KB")
    victim = sorted(folder.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(UserError, match=f"shard {victim.name} is named in model.safetensors.index.json but missing"):
        CheckpointSource(folder)


def _rewrite(folder, edit):
    """Rewrite the one-file checkpoint with `edit(tensors)` applied."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_wrong_shape_is_a_user_error(tmp_path):
    folder = _save(tmp_path / "m", MOE_CONFIGS["e4-k1-s0-i1-st0"], moe=True)
    name = "model.layers.0.mlp.experts.2.up_proj.weight"
    _rewrite(folder, lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(UserError, match="weights missing or of the wrong shape: model.layers.0.mlp.experts.gate_up_proj"):
        CheckpointSource(folder)


def test_missing_expert_and_missing_weight_are_user_errors(tmp_path):
    folder = _save(tmp_path / "m", MOE_CONFIGS["e4-k1-s0-i1-st0"], moe=True)
    _rewrite(folder, lambda t: [t.pop("model.layers.1.mlp.experts.3.down_proj.weight"), t.pop("model.norm.weight")])
    with pytest.raises(UserError, match="weights missing or of the wrong shape") as err:
        CheckpointSource(folder)
    assert "model.norm.weight" in str(err.value)
    assert "model.layers.1.mlp.experts.down_proj (checkpoint [3, " in str(err.value)


def test_non_float_tensor_is_a_user_error(tmp_path):
    folder = _save(tmp_path / "d", DENSE_CONFIGS["gqa-tied-hd48"])
    _rewrite(folder, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(UserError, match="model.norm.weight is I32; weights must be float"):
        CheckpointSource(folder)


def test_truncated_shard_is_a_user_error(tmp_path):
    folder = _save(tmp_path / "m", MOE_CONFIGS["e4-k1-s0-i1-st0"], moe=True, shard="40KB")
    victim = sorted(folder.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])  # the header is intact; the last tensor is not
    with pytest.raises(UserError, match=f"{victim.name}: not a readable safetensors file .*truncated"):
        CheckpointSource(folder)


def test_preset_is_deterministic_and_sliceable():
    small = dict(num_hidden_layers=2, moe_layer_end_index=1, vocab_size=512, hidden_size=64, intermediate_size=96,
                 moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config = transformers.AutoConfig.for_model(**dict(PRESETS["ernie-4.5-21b-a3b"], **small))
    a, b, c = PresetSource(config, 0), PresetSource(config, 0), PresetSource(config, 1)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        np.testing.assert_array_equal(a.get(name), b.get(name))
        assert not np.array_equal(a.get(name), c.get(name))
    experts = "model.layers.1.mlp.experts.down_proj"
    assert a.stacked(experts) and a.shape(experts) == (64, 64, 32)  # [E, H, I]
    for e in (0, 17, 63):
        np.testing.assert_array_equal(a.get(experts, index=e), a.get(experts)[e])
    assert not np.array_equal(a.get(experts, index=0), a.get(experts, index=1))
    np.testing.assert_array_equal(a.get("model.norm.weight"), np.ones(64, np.float32))
    np.testing.assert_array_equal(a.get("model.layers.1.mlp.gate.moe_statics.e_score_correction_bias"),
                                  np.zeros((1, 64), np.float32))
    emb = a.get("model.embed_tokens.weight")
    assert not emb[config.pad_token_id].any() and abs(emb[1:].std() - config.initializer_range) < 2e-3


@pytest.mark.parametrize("preset", ["ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b"])
def test_full_size_preset_costs_no_memory(preset):
    transformers.Ernie4_5_MoeForCausalLM  # noqa: B018  the class's lazy import is not what is measured
    start = time.perf_counter()
    loaded = load(preset, materialize=False)
    src = loaded.weights
    shapes = {n: src.shape(n) for n in src.names()}
    assert time.perf_counter() - start < 1.0
    assert all(p.is_meta for p in loaded.model.parameters())
    params = sum(int(np.prod(s)) for s in shapes.values())
    assert params == sum(p.numel() for p in loaded.model.parameters())  # tied parameters counted once
    assert params > (20e9 if "21b" in preset else 290e9)


def test_load_keeps_its_contract():
    """load() still returns a real float32 model (the existing callers), now with its source."""
    loaded = load(None)
    sd = loaded.model.state_dict()
    assert all(t.dtype == torch.float32 and not t.is_meta for t in sd.values())
    for name in loaded.weights.names():
        np.testing.assert_array_equal(sd[name].numpy(), loaded.weights.get(name))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_weightless_capture_is_the_real_capture():
    """The existing capture on a meta model with fake parameters records the same graphs, the same
    parameters, as on the materialized model: what a streaming compile needs from capture."""
    from ernie_compile.compiler.capture import capture
    from ernie_compile.passes import select_passes
    from torch._subclasses.fake_tensor import FakeTensor

    small = dict(num_hidden_layers=2, moe_layer_end_index=1, vocab_size=256, hidden_size=32, intermediate_size=48,
                 moe_intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_num_experts=4, moe_k=2)
    real = load("ernie-4.5-21b-a3b", overrides=small).model
    weightless = load("ernie-4.5-21b-a3b", overrides=small, materialize=False).model
    with fake_parameters(weightless):
        fake = capture(weightless, 16, select_passes(weightless.config))
    ref = capture(real, 16, select_passes(real.config))
    assert fake.param_names == ref.param_names
    for step in ("prefill", "decode"):
        assert getattr(fake, step).graph_module.code == getattr(ref, step).graph_module.code
    assert all(isinstance(t, FakeTensor) for t in fake.prefill.state_dict.values())  # nothing allocated
