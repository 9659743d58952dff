"""Weight quantization: packing, the float reference, and artifacts against a fake-quant eager model.

The reference is transformers eager with every quantized weight replaced by dequantize(quantize(W))
(the issue's "eager fake-quant reference"): the artifact must match it to float tolerance. With
int8 activations (--act-bits 8) the reference also quantizes each such linear's (and MoE expert
weight's) input per block of 32 exactly as the kernels do (quantize_activations below).
"""
from __future__ import annotations

import json
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

from conftest import DENSE_CONFIGS, MOE_CONFIGS, PROMPT_IDS, eager_greedy, eager_model, make_checkpoint, rel_error
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.quant import BITS, QuantPolicy, QuantSpec, dequantize, pack, quantize, unpack
from ernie_compile.errors import UserError
from ernie_compile.runtime import Session
from ernie_compile.targets.cpu import CpuTarget

REL_TOL = 1e-4
HOST = CpuTarget.from_spec(None)  # its int8_dot: "vnni", "avx2" (4-bit weights only) or None


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,layout", [(64, "row"), (37, "row"), (480, "lanes16")])  # 37: a partial last word
def test_pack_unpack_roundtrip(bits, k, layout):
    if layout == "lanes16":
        k = 16 * (32 // bits) * 3
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (3, 5, k)).astype(np.uint32)
    packed = pack(codes, bits, layout)
    assert packed.dtype == np.uint32 and packed.shape == (3, 5, -(-k // (32 // bits)))
    np.testing.assert_array_equal(unpack(packed, bits, k, layout), codes)


def test_lanes16_puts_16_consecutive_elements_in_one_slot_of_16_words():
    codes = np.arange(128, dtype=np.uint32) % 16  # 4-bit, one block of 16 words
    words = pack(codes[None], 4, "lanes16")[0]
    for slot in range(8):
        np.testing.assert_array_equal((words >> (4 * slot)) & 15, codes[16 * slot:16 * slot + 16])


@pytest.mark.parametrize("kernels", ["cpu", "gpu"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [96, 640])  # row layout; lanes16 for every bit width (640 = 16·40)
def test_kernels_match_numpy_dequant(bits, k, kernels):
    """linear_q, take_q and the quantized MoE group GEMM compute with exactly dequantize(W): the CPU
    kernels as built, the GPU kernels' compute definitions (run here on the CPU, unscheduled)."""
    import importlib

    import tvm

    from ernie_compile.targets import get_target

    module = importlib.import_module(f"ernie_compile.targets.{kernels}_kernels")
    facts = get_target({"cpu": "cpu", "gpu": "cuda"}[kernels])  # the layouts and M = 1 kernels it declares
    linear_q, take_q = module.linear_q, module.take_q
    group_gemm_q = module.group_gemm_q if kernels == "cpu" else partial(module.group_gemm_q, schedule=False)
    spec = QuantPolicy.parse(str(bits), symmetric=False).spec_for("model.layers.0.mlp.up_proj.weight", k,
                                                                  layouts=facts.quant_layouts)
    lanes16 = k == 640 and k % (16 * spec.per_word) == 0 and "lanes16" in facts.quant_layouts
    assert spec.layout == ("lanes16" if lanes16 else "row")
    rng = np.random.default_rng(bits)
    n, m, experts = 12, 5, 3
    w = rng.standard_normal((experts, n, k)).astype(np.float32)
    parts = quantize(w, spec)
    wd = dequantize(parts, spec, k)
    x = rng.standard_normal((m, k)).astype(np.float32)

    def run(prim, *args, out_shape):
        lib = tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}), target="llvm")
        out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
        lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
        return out.numpy()

    q0 = [np.ascontiguousarray(parts[p][0]) for p in ("qweight", "qscale", "qmin")]
    for rows in (1, m):  # decode (M = 1) and prefill take different paths
        static = rows if facts.static_m and rows == 1 else None
        np.testing.assert_allclose(run(linear_q(n, k, spec, m=static), x[:rows], *q0, out_shape=(rows, n)),
                                   x[:rows] @ wd[0].T, rtol=1e-4, atol=1e-4)
    ids = np.array([3, 0, 11, 3], np.int64)
    np.testing.assert_array_equal(run(take_q(n, k, spec), ids, *q0, out_shape=(4, k)), wd[0][ids])
    indptr = np.array([0, 2, 2, m], np.int64)  # expert 1 gets no rows
    expert_of = [0, 0, 2, 2, 2]
    ref = np.stack([wd[e] @ x[i] for i, e in enumerate(expert_of)])
    got = run(group_gemm_q(experts, n, k, spec), x, indptr, np.array(expert_of, np.int64), parts["qweight"],
              parts["qscale"], parts["qmin"], out_shape=(m, n))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantization_error_is_at_most_half_a_step(bits, symmetric):
    spec = QuantSpec(bits, 32, symmetric, "float32")
    w = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    parts = quantize(w, spec)
    err = np.abs(dequantize(parts, spec, 128) - w).reshape(16, 4, 32).max(-1)
    assert (err <= parts["qscale"] / 2 * (1 + 1e-5) + 1e-6).all()


def test_policy_parsing():
    p = QuantPolicy.parse("experts=2,attn=4,embed=8")
    assert p.spec_for("model.layers.1.mlp.experts.gate_up_proj", 64).bits == 2
    assert p.spec_for("model.layers.0.self_attn.qkv_proj.weight", 64).bits == 4
    assert p.spec_for("lm_head.weight", 64).bits == 8
    assert p.spec_for("model.layers.0.mlp.up_proj.weight", 64) is None  # mlp not named: float
    assert p.spec_for("model.layers.1.mlp.gate.weight", 64) is None  # the router stays fp32
    assert p.spec_for("model.norm.weight", 64) is None
    assert QuantPolicy.parse("4", embed_bits=8).spec_for("model.embed_tokens.weight", 48).group_size == 16
    for bad in ("5", "experts=4,moe=2", "x"):
        with pytest.raises(UserError):
            QuantPolicy.parse(bad)


def _spec(policy: QuantPolicy, name: str, shape) -> QuantSpec | None:
    """As passes/quantize_weights.py asks for it, for this host's CPU target."""
    return policy.spec_for(name, shape[-1], shape[-2], HOST.quant_layouts, HOST.int8_weight_bits) \
        if len(shape) >= 2 else None


def _act8(policy: QuantPolicy, name: str, shape) -> bool:
    spec = _spec(policy, name, shape)
    return spec is not None and spec.layout == "vnni16"


def fake_quant(model, policy: QuantPolicy):
    """The float model the quantized artifact must equal: each weight it quantizes, dequantized;
    with policy.act_bits 8, also the inputs of the linears and stacked experts whose weights take
    the vnni16 layout on this host."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            spec = _spec(policy, name, p.shape)
            if spec is not None:
                w = p.detach().numpy()
                p.copy_(torch.from_numpy(dequantize(quantize(w, spec), spec, w.shape[-1])))
    hooked = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _act8(policy, name + ".weight", module.weight.shape):
            module.register_forward_pre_hook(lambda _, args: (quantize_activations(args[0]),))
            hooked += 1
        if isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):  # stacked experts [E, N, K]
            act8 = [_act8(policy, f"{name}.{p}", getattr(module, p).shape) for p in ("gate_up_proj", "down_proj")]
            if any(act8):
                module.forward = partial(_experts_act8, module, *act8)
                hooked += 1
    int8 = policy.act_bits == 8 and set(dict(policy.bits).values()) & set(HOST.int8_weight_bits)
    assert hooked > 0 or not int8
    return model


def _experts_act8(experts, act8_gate_up: bool, act8_down: bool, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop (Ernie4_5_MoeExperts.forward) with the input of each expert
    weight in vnni16 quantized as targets/cpu_moe.py does; any dtype (its grouped-mm default takes
    no float64). hidden_states [T, H], top_k_index and top_k_weights [T, k]."""
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique().tolist():
        tok, pos = torch.where(top_k_index == e)
        x = hidden_states[tok]  # [rows, H]
        gate, up = torch.nn.functional.linear(quantize_activations(x) if act8_gate_up else x,
                                              experts.gate_up_proj[e]).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up  # [rows, I]
        y = torch.nn.functional.linear(quantize_activations(h) if act8_down else h, experts.down_proj[e])
        out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] → x̃: symmetric int8 per block of 32 along K, dx = max|x| / 127, round half to even;
    the same float32 operations as targets/cpu_vnni.py."""
    xb = x.reshape(*x.shape[:-1], -1, 32)
    dx = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(dx > 0, torch.round(xb / torch.where(dx > 0, dx, 1)), 0)
    return (q * dx).reshape(x.shape)


def _check_artifact(folder, ref):
    session = Session(folder)
    seq = list(PROMPT_IDS)
    with torch.no_grad():
        assert rel_error(session.forward(seq), ref(torch.tensor([seq])).logits[0, -1]) <= REL_TOL
        for t in (4, 800, 77):
            seq.append(t)
            assert rel_error(session.forward([t]), ref(torch.tensor([seq])).logits[0, -1]) <= REL_TOL
    assert session.generate(PROMPT_IDS, 32, stop_at_eos=False).tokens == eager_greedy(ref, PROMPT_IDS, 32)


@pytest.mark.parametrize("bits", BITS)
def test_dense_artifact_matches_fake_quant_eager(bits, checkpoints, tmp_path):
    name = "gqa-tied-hd48"
    policy = QuantPolicy.parse(str(bits), symmetric=bits != 3)
    report = compile_model(CompileOptions(output=tmp_path / "q", model=str(checkpoints[name]), max_seq_len=64,
                                          bits=str(bits), symmetric=bits != 3, act_bits="none"), log=lambda *_: None)
    layers = DENSE_CONFIGS[name]["num_hidden_layers"]
    # every linear (qkv, o, gate|up, down per layer), the tied lm_head and the embedding lookup
    assert report["passes"]["quantize_weights"]["matched"] == 4 * layers + 2
    _check_artifact(tmp_path / "q", fake_quant(eager_model(checkpoints[name]), policy))


def test_lanes16_dense_artifact_matches_fake_quant_eager(checkpoints, tmp_path):
    """hidden 128 and intermediate 256: the 4-bit weights take the lanes16 layout."""
    name = "mqa-untied"
    compile_model(CompileOptions(output=tmp_path / "q", model=str(checkpoints[name]), max_seq_len=64, bits="4",
                                 act_bits="none"), log=lambda *_: None)
    layouts = {q["layout"] for q in json.loads((tmp_path / "q" / "manifest.json").read_text())["weights"]
               ["quantized"].values()}
    assert layouts == {"lanes16"}
    _check_artifact(tmp_path / "q", fake_quant(eager_model(checkpoints[name]), QuantPolicy.parse("4")))


def test_moe_mixed_policy_matches_fake_quant_eager(moe_checkpoints, tmp_path):
    name = "e8-k2-s1-i2-st1"
    text = "experts=2,attn=4,mlp=8,embed=8"
    compile_model(CompileOptions(output=tmp_path / "q", model=str(moe_checkpoints[name]), max_seq_len=64,
                                 bits=text, symmetric=False, act_bits="none"), log=lambda *_: None)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    quantized = manifest["weights"]["quantized"]
    assert {q["bits"] for n, q in quantized.items() if ".experts." in n and "shared" not in n} == {2}
    assert not any(n.endswith("experts.gate_up_proj") for n in manifest["weights"]["order"])  # no float copy
    _check_artifact(tmp_path / "q", fake_quant(eager_model(moe_checkpoints[name]), QuantPolicy.parse(text, symmetric=False)))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_artifact_size_follows_bits(bits, tmp_path):
    """weights.safetensors ≈ quantized params × bits / 8 + scales/offsets + float norms (within 10%)."""
    from ernie_compile.compiler.load import load_preset

    compile_model(CompileOptions(output=tmp_path / "q", max_seq_len=64, bits=str(bits)), log=lambda *_: None)
    model = load_preset("ernie-tiny").model
    expected = 0
    for n, p in model.named_parameters():
        if n == "lm_head.weight":
            continue  # tied: stored once
        if p.dim() >= 2:
            expected += p.numel() * bits / 8 + 2 * 2 * p.numel() / 32  # codes + fp16 scale and offset per 32
        else:
            expected += p.numel() * 4
    actual = (tmp_path / "q" / "weights.safetensors").stat().st_size
    assert abs(actual - expected) / expected < 0.10, (actual, expected)


def test_accuracy_report_in_manifest(checkpoints, tmp_path):
    """KL / top-1 against the float model are recorded, and shrink as bits grow."""
    name = "mqa-untied"
    acc = {}
    for bits in (8, 2):
        out = tmp_path / f"q{bits}"
        report = compile_model(CompileOptions(output=out, model=str(checkpoints[name]), max_seq_len=64,
                                              bits=str(bits)), log=lambda *_: None)
        acc[bits] = json.loads((out / "manifest.json").read_text())["accuracy"]
        assert report["accuracy"] == acc[bits]
        assert 0 <= acc[bits]["top1_agreement"] <= 1 and acc[bits]["kl_mean"] >= 0
        assert all(0 < e < 1 for e in acc[bits]["weight_rel_error"].values())
    assert acc[8]["kl_mean"] < acc[2]["kl_mean"] and acc[8]["top1_agreement"] > acc[2]["top1_agreement"]
    assert max(acc[8]["weight_rel_error"].values()) < min(acc[2]["weight_rel_error"].values())


def test_accuracy_metric_is_zero_for_a_float_artifact(checkpoints, tmp_path):
    """The measurement itself: a float artifact against its own float model gives KL ≈ 0, top-1 = 1."""
    from ernie_compile.compiler.accuracy import measure

    name = "gqa-tied-hd48"
    compile_model(CompileOptions(output=tmp_path / "f", model=str(checkpoints[name]), max_seq_len=64),
                  log=lambda *_: None)
    result = measure(eager_model(checkpoints[name]), tmp_path / "f", 1024)
    assert result["kl_max"] < 1e-8 and result["top1_agreement"] == 1.0


# --- int8 activations (--act-bits 8): the vnni16 layout and targets/cpu_vnni.py ------------------

needs_int8_dot = pytest.mark.skipif(HOST.int8_dot is None, reason="this CPU has no int8 dot (AVX-512 VNNI or AVX2)")
# the dots whose kernels run here: the portable one everywhere, and the host's (a VNNI CPU has AVX2 too)
HOST_DOTS = ["portable"] + {"vnni": ["vnni", "avx2"], "avx2": ["avx2"], None: []}[HOST.int8_dot]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_vnni16_pack_roundtrip_and_tile_order(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (2, 32, 96)).astype(np.uint32)
    packed = pack(codes, bits, "vnni16")
    assert packed.shape == (2, 32, 96 * bits // 32)  # densely packed, 3 bits too
    np.testing.assert_array_equal(unpack(packed, bits, 96, "vnni16"), codes)
    # tile 1, block 2: its `bits` 64-byte vectors; lane l's 4 bytes belong to row 16 + l, and element
    # 64 + 4j + c to byte c at the place the module docstring gives
    vecs = packed[0].reshape(-1)[(1 * 3 + 2) * bits * 16:][:bits * 16].astype("<u4").view(np.uint8).reshape(bits, 16, 4)
    for j in range(8):
        at = {8: lambda: vecs[j], 4: lambda: vecs[j % 4] >> 4 * (j // 4) & 15,
              2: lambda: vecs[j % 2] >> 2 * (j // 2) & 3,
              3: lambda: (vecs[j % 2] >> 2 * (j // 2) & 3) | (vecs[2] >> j & 1) << 2}[bits]()
        np.testing.assert_array_equal(at, codes[0, 16:32, 64 + 4 * j:68 + 4 * j])


def test_act8_policy_picks_vnni16_only_where_the_kernels_apply():
    p = QuantPolicy.parse("experts=4,attn=4,mlp=2,embed=8", act_bits=8)
    assert p.spec_for("model.layers.0.self_attn.qkv_proj.weight", 64, 48).layout == "vnni16"
    assert p.spec_for("lm_head.weight", 64, 1024).layout == "vnni16"
    assert p.spec_for("model.layers.0.self_attn.o_proj.weight", 64, 40).layout != "vnni16"  # 40 rows: no tiles
    assert p.spec_for("model.layers.0.self_attn.o_proj.weight", 48, 64).layout != "vnni16"  # K not in 32-blocks
    # stacked experts [E, N, K] as dense weights, by each expert's N and K
    assert p.spec_for("model.layers.1.mlp.experts.gate_up_proj", 64, 96).layout == "vnni16"
    assert p.spec_for("model.layers.1.mlp.experts.down_proj", 48, 64).layout != "vnni16"  # K = 48
    assert p.spec_for("model.layers.1.mlp.experts.gate_up_proj", 64).layout != "vnni16"  # rows unknown
    assert p.spec_for("model.layers.0.mlp.up_proj.weight", 64, 64).layout == "vnni16"  # 2 bits
    assert QuantPolicy.parse("3", act_bits=8).spec_for("model.layers.0.mlp.up_proj.weight", 64, 64).layout == "vnni16"
    assert QuantPolicy.parse("4").spec_for("lm_head.weight", 128, 1024).layout == "lanes16"  # act_bits None
    # an AVX2 target's dot takes codes of up to 4 bits: 8-bit weights keep float activations
    assert p.spec_for("lm_head.weight", 64, 1024, int8_bits=(2, 3, 4)).layout == "lanes16"
    assert p.spec_for("model.layers.1.mlp.experts.gate_up_proj", 64, 96, int8_bits=(2, 3, 4)).layout == "vnni16"
    assert p.spec_for("lm_head.weight", 64, 1024, int8_bits=()).layout == "lanes16"  # no int8 dot


def test_target_declares_its_int8_dot():
    """vnni (AVX-512 VNNI) before avx2; a cross triple names no CPU features: no int8 dot."""
    import tvm

    from ernie_compile.targets.cpu import int8_dot

    assert int8_dot(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})) == "vnni"
    assert int8_dot(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})) == "avx2"
    assert int8_dot(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})) is None
    cross = CpuTarget.from_spec("aarch64-linux-android")
    assert cross.int8_dot is None and cross.int8_weight_bits == ()
    assert HOST.int8_weight_bits == {"vnni": (2, 3, 4, 8), "avx2": (2, 3, 4), None: ()}[HOST.int8_dot]


def _run(prim, *args, out_shape, target=None):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}), target=target or HOST.tvm)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize("int8_dot", HOST_DOTS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False)])
def test_vnni_kernels_match_numpy_reference(bits, group, symmetric, int8_dot):
    """linear_q_vnni = quantize_activations(x) · dequantize(W)ᵀ (1e-5 relative), for decode (M = 1)
    and prefill (blocks of 4 rows plus a remainder), with each int8 dot this CPU runs (the portable
    one: the same integers in plain vector arithmetic); take_q_vnni = dequantize(W) rows exactly."""
    from ernie_compile.targets.cpu_vnni import DOTS, linear_q_vnni, take_q_vnni

    if bits not in DOTS[int8_dot].bits:
        pytest.skip(f"the {int8_dot} dot is exact for {DOTS[int8_dot].bits}-bit codes only")
    n, k = 48, 192
    spec = QuantPolicy.parse(str(bits), group_size=group, symmetric=symmetric, act_bits=8).spec_for(
        "model.layers.0.mlp.up_proj.weight", k, n)
    assert spec.layout == "vnni16" and spec.group_size == group
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((n, k)).astype(np.float32)
    parts = quantize(w, spec)
    wd = dequantize(parts, spec, k)
    # the same values as the row layout's: the tile-transposed codes and scales were read back in order
    np.testing.assert_array_equal(wd, dequantize(quantize(w, replace(spec, layout="row")), replace(spec, layout="row"), k))
    q = [parts[p] for p in ("qweight", "qscale", "qmin")]
    x = rng.standard_normal((9, k)).astype(np.float32)
    x[2, 32:64] = 0  # an all-zero block: dx = 0
    x[3, 5] = 40.0  # an outlier: its block's other values round to few levels
    xq = quantize_activations(torch.from_numpy(x)).numpy().astype(np.float64)
    for rows in (1, 9):
        ref = xq[:rows] @ wd.T.astype(np.float64)
        got = _run(linear_q_vnni(n, k, spec, int8_dot=int8_dot), x[:rows], *q, out_shape=(rows, n))
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
        # and the float-activation result differs: the kernel really quantized x
        assert np.abs(got - x[:rows] @ wd.T).max() > 1e-4 * np.abs(ref).max()
    ids = np.array([3, 0, 47, 17, 3], np.int64)
    np.testing.assert_array_equal(_run(take_q_vnni(n, k, spec), ids, *q, out_shape=(5, k)), wd[ids])


@pytest.mark.parametrize("int8_dot,bits,mcpu,instruction", [("vnni", 4, "znver4", r"vpdpbusd\s[^\n]*%zmm"),
                                                             ("vnni", 8, "znver4", r"vpdpbusd\s[^\n]*%zmm"),
                                                             ("avx2", 4, "znver3", r"vpmaddubsw\s[^\n]*%ymm")])
def test_dense_int8_kernel_builds_with_its_dot(int8_dot, bits, mcpu, instruction):
    """The dense kernel's dot is the kind asked for, whatever CPU the tests run on (built for one that
    has it: Zen 4 AVX-512 VNNI, Zen 3 AVX2 alone), and the avx2 dot refuses 8-bit codes (its int16
    pairs would saturate)."""
    import re

    import tvm

    from ernie_compile.targets.cpu_vnni import linear_q_vnni

    spec = QuantSpec(bits, 32, True, "float16", "vnni16")
    prim = linear_q_vnni(64, 256, spec, int8_dot=int8_dot).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": prim}), target=tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    assert re.search(instruction, lib.mod.inspect_source("asm"))
    with pytest.raises(ValueError, match="exact for"):
        linear_q_vnni(64, 256, QuantSpec(8, 32, True, "float16", "vnni16"), int8_dot="avx2")


@needs_int8_dot
@pytest.mark.parametrize("name,bits", [("gqa-tied-hd48", "4"), ("mqa-untied", "8")])
def test_act8_dense_artifact_matches_fake_quant_eager(name, bits, checkpoints, tmp_path):
    """Every linear (and the tied embedding) whose bits the host's int8 dot takes in vnni16, against
    the activation-quantizing reference; on an AVX2 host 8-bit weights keep float activations."""
    compile_model(CompileOptions(output=tmp_path / "q", model=str(checkpoints[name]), max_seq_len=64, bits=bits,
                                 act_bits="8"), log=lambda *_: None)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    int8 = int(bits) in HOST.int8_weight_bits
    assert manifest["options"]["act_bits"] == "8" and manifest["quantization"]["act_bits"] == 8
    assert manifest["quantization"]["int8_dot"] == (HOST.int8_dot if int8 else None)
    layouts = {q["layout"] for q in manifest["weights"]["quantized"].values()}
    assert layouts == {"vnni16"} if int8 else not layouts & {"vnni16"}
    policy = QuantPolicy.parse(bits, act_bits=8)
    _check_artifact(tmp_path / "q", _act8_reference(eager_model(checkpoints[name]), policy))
    if int8:  # the float-activation reference is far outside the tolerance: the check can tell the two apart
        with torch.no_grad():
            float_act = fake_quant(eager_model(checkpoints[name]), QuantPolicy.parse(bits))
            assert rel_error(Session(tmp_path / "q").forward(list(PROMPT_IDS)),
                             float_act(torch.tensor([PROMPT_IDS])).logits[0, -1]) > 10 * REL_TOL


def _act8_reference(model, policy):
    """The activation-quantizing fake-quant model, in float64. Rounding x / dx to int8 is
    discontinuous: in float32 the eager model itself lands on the other side of a .5 now and then
    (mqa-untied at 8 bits: its float32 and float64 logits differ by 9e-3 · max), while the artifact
    agrees with the float64 model to ~3e-7 in every case here."""
    return fake_quant(model, policy).double()


@needs_int8_dot
@pytest.mark.parametrize("moe_inter", [48, 64])
def test_act8_moe_experts_take_int8_activations(moe_inter, tmp_path):
    """Stacked experts in vnni16 (group_gemm_q → cpu_moe.group_gemm_q_vnni with the host's dot) as
    dense weights: moe_intermediate_size 64 puts both gate_up [E, 128, 64] and down [E, 64, 64] there,
    48 only gate_up (down's K = 48 is no multiple of 32: float activations, row layout)."""
    folder = make_checkpoint(tmp_path / "ckpt", dict(MOE_CONFIGS["e8-k2-s1-i2-st1"], moe_intermediate_size=moe_inter),
                             moe=True)
    report = compile_model(CompileOptions(output=tmp_path / "q", model=str(folder), max_seq_len=64, bits="4",
                                          act_bits="8"), log=lambda *_: None)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    quantized = manifest["weights"]["quantized"]
    assert manifest["quantization"]["int8_dot"] == HOST.int8_dot
    assert {q["layout"] for n, q in quantized.items() if n.endswith("experts.gate_up_proj")} == {"vnni16"}
    assert {q["layout"] for n, q in quantized.items() if n.endswith("experts.down_proj")} == \
        {"vnni16" if moe_inter == 64 else "row"}
    assert quantized["model.layers.1.mlp.shared_experts.gate_up_proj.weight"]["layout"] == "vnni16"  # fused
    assert report["passes"]["quantize_weights"]["matched"] > 0
    policy = QuantPolicy.parse("4", act_bits=8)
    _check_artifact(tmp_path / "q", _act8_reference(eager_model(folder), policy))
    with torch.no_grad():  # float activations into the experts are far outside the tolerance
        float_experts = _act8_reference(eager_model(folder), policy)
        for module in float_experts.modules():
            if isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
                module.forward = partial(_experts_act8, module, False, False)
        assert rel_error(Session(tmp_path / "q").forward(list(PROMPT_IDS)),
                         float_experts(torch.tensor([PROMPT_IDS])).logits[0, -1]) > 10 * REL_TOL


@needs_int8_dot
@pytest.mark.parametrize("experts_bits", [2, 3])
def test_act8_low_bit_experts_match_fake_quant_eager(experts_bits, tmp_path):
    """The 300B recipe's 2- and 3-bit experts (`experts=2,attn=4`) on the int8 path too: the stacked
    experts at 2 or 3 bits, attention and the dense / shared MLPs at 4, all in vnni16, against the
    activation-quantizing reference (3 bits asymmetric: the offsets are read)."""
    folder = make_checkpoint(tmp_path / "ckpt", dict(MOE_CONFIGS["e8-k2-s1-i2-st1"], moe_intermediate_size=64),
                             moe=True)
    text = f"experts={experts_bits},attn=4,mlp=4"
    symmetric = experts_bits != 3
    compile_model(CompileOptions(output=tmp_path / "q", model=str(folder), max_seq_len=64, bits=text,
                                 symmetric=symmetric, act_bits="8"), log=lambda *_: None)
    quantized = json.loads((tmp_path / "q" / "manifest.json").read_text())["weights"]["quantized"]
    experts = {n: q for n, q in quantized.items() if ".experts." in n}
    assert experts and {(q["bits"], q["layout"]) for q in experts.values()} == {(experts_bits, "vnni16")}
    assert {(q["bits"], q["layout"]) for n, q in quantized.items() if ".experts." not in n} == {(4, "vnni16")}
    policy = QuantPolicy.parse(text, symmetric=symmetric, act_bits=8)
    _check_artifact(tmp_path / "q", _act8_reference(eager_model(folder), policy))


def test_act_bits_resolution(tmp_path):
    """auto follows the target; 8 on a target without an int8 dot is a user error; float weights: none."""
    with pytest.raises(UserError, match="no int8 dot product"):
        compile_model(CompileOptions(output=tmp_path / "x", target="cpu:aarch64-linux-android", bits="4",
                                     act_bits="8"), log=lambda *_: None)
    with pytest.raises(UserError, match="auto, 8 or none"):
        compile_model(CompileOptions(output=tmp_path / "x", bits="4", act_bits="16"), log=lambda *_: None)
