"""WebGPU / Vulkan artifacts run on a software GPU (lavapipe through wgpu's Vulkan backend; Chromium's
SwiftShader WebGPU for the browser page) and match transformers eager.

Tests that need a software device skip only when it is truly absent, and never in CI: `.ci/run`
installs the devices and sets ERNIE_REQUIRE_DEVICES, which turns such a skip into a failure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PROMPT_IDS, eager_greedy, eager_model, rel_error
from test_quantize import fake_quant
from test_runtime import NO_TORCH
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.quant import QuantPolicy
from ernie_compile.runtime import Session
from ernie_compile.runtime.webgpu_engine import adapter_problem
from ernie_compile.targets import webgpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import browser  # noqa: E402  (tests/browser.py)

REQUIRED = set(filter(None, os.environ.get("ERNIE_REQUIRE_DEVICES", "").split(",")))


def _need(device: str, problem: str | None) -> None:
    if problem is None:
        return
    if device in REQUIRED:
        pytest.fail(f"{device} is required here (ERNIE_REQUIRE_DEVICES) but absent: {problem}")
    pytest.skip(f"no {device}: {problem}")


@pytest.fixture(autouse=True)
def _wgpu_adapter():
    _need("webgpu", adapter_problem())


def _compile(out: Path, **options) -> dict:
    return compile_model(CompileOptions(output=out, target="webgpu", max_seq_len=64, **options), log=lambda *_: None)


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> Path:
    """The embedded default (what the README runs), for WebGPU."""
    problem = adapter_problem()
    if problem:
        _need("webgpu", problem)
    out = tmp_path_factory.mktemp("webgpu") / "tiny"
    _compile(out)
    return out


@pytest.fixture(scope="module")
def default_reference():
    """transformers eager on the embedded default's weights: logits after PROMPT_IDS, 16 greedy tokens."""
    from ernie_compile.compiler.load import load_preset

    ref = load_preset("ernie-tiny").model
    ref.set_attn_implementation("eager")
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        logits = ref(torch.tensor([PROMPT_IDS])).logits[0, -1]
    return logits, eager_greedy(ref, PROMPT_IDS, 16)


def test_default_matches_eager(default, default_reference):
    logits, tokens = default_reference
    session = Session(default)
    assert rel_error(session.forward(PROMPT_IDS), logits) < 1e-4
    assert session.generate(PROMPT_IDS, 16, stop_at_eos=False).tokens == tokens


def test_ernie_run_json_without_torch(default, default_reference):
    """`ernie-run OUT --json` runs a WebGPU artifact as it runs a CPU one, with no torch in the process."""
    ids = ",".join(map(str, PROMPT_IDS))
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(default), "--prompt-ids", ids, "--max-new-tokens",
                           "16", "--json", "--ignore-eos"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result, loaded = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert loaded == {"loaded": []}
    assert result["tokens"] == default_reference[1]


def test_browser_page_generates_the_same_tokens(default, default_reference):
    """The artifact's own index.html + ernie-webgpu.js in headless Chromium (SwiftShader WebGPU)."""
    _need("chromium", browser.chromium_available())
    result = browser.run_page(default, {"ids": ",".join(map(str, PROMPT_IDS)), "n": 16}, timeout=240)
    assert "error" not in result, result.get("error")
    assert result["tokens"] == default_reference[1]
    # the page's text comes from vocab.json; SentencePiece itself decodes the same ids
    tokenizer = Session(default).tokenizer
    assert result["text"] == tokenizer.decode(result["tokens"])
    assert result["prompt_text"] == tokenizer.decode(PROMPT_IDS)


def test_browser_runs_4bit_weights(tmp_path):
    """4-bit weights (float32 scales: SwiftShader has no shader-f16) in the page, against transformers
    eager on the dequantized weights."""
    _need("chromium", browser.chromium_available())
    from ernie_compile.compiler.load import load_preset

    out = tmp_path / "q4"
    _compile(out, bits="4")
    ref = fake_quant(load_preset("ernie-tiny").model, QuantPolicy.parse("4", scale_dtype="float32"))
    ref.set_attn_implementation("eager")
    ref.generation_config.eos_token_id = None
    result = browser.run_page(out, {"ids": ",".join(map(str, PROMPT_IDS)), "n": 12}, timeout=240)
    assert "error" not in result, result.get("error")
    assert result["tokens"] == eager_greedy(ref, PROMPT_IDS, 12)


def test_browser_chunked_prefill(checkpoints, tmp_path, monkeypatch):
    """A prompt longer than the plan's largest T runs as consecutive prefill calls in JS too."""
    _need("chromium", browser.chromium_available())
    monkeypatch.setattr(webgpu, "PREFILL_CHUNK", 4)
    out = tmp_path / "out"
    _compile(out, model=str(checkpoints["gqa-tied-hd48"]))
    result = browser.run_page(out, {"ids": ",".join(map(str, PROMPT_IDS)), "n": 8}, timeout=240)
    assert "error" not in result, result.get("error")
    assert result["tokens"] == eager_greedy(eager_model(checkpoints["gqa-tied-hd48"]), PROMPT_IDS, 8)


def test_artifact_layout(default):
    """What docs/webgpu-artifact.md promises a host: every kernel's WGSL, no 64-bit integers, weight
    tensors at 256-byte offsets inside their shards, hashes for every file, the page and runtime."""
    manifest = json.loads((default / "manifest.json").read_text())
    plan = json.loads((default / "plan.json").read_text())
    assert manifest["backend"] == "webgpu" and manifest["library"] == "plan.json"
    assert {"index.html", "ernie-webgpu.js", "plan.json"} <= set(manifest["files"])
    for name, kernel in plan["kernels"].items():
        wgsl = (default / kernel["wgsl"]).read_text()
        assert f"fn {name}(" in wgsl and "i64" not in wgsl and kernel["wgsl"] in manifest["files"]
    weights = [b for b in plan["buffers"] if b["kind"] == "weight"]
    assert all(b["offset"] % 256 == 0 for b in weights)
    for i, shard in enumerate(plan["shards"]):
        assert (default / shard["file"]).stat().st_size == shard["bytes"]
        assert max(b["offset"] + b["bytes"] for b in weights if b["shard"] == i) == shard["bytes"]
    config = manifest["model"]["config"]
    assert sum(b["kind"] == "kv" for b in plan["buffers"]) == 2 * config["num_hidden_layers"]
    launched = {launch["kernel"] for f in plan["functions"].values() for launch in f["launches"]}
    assert launched == set(plan["kernels"])
    # intermediates share scratch buffers once their last reader has run
    scratch = sum(b["kind"] == "scratch" for b in plan["buffers"])
    assert 3 * scratch < len(plan["functions"]["decode"]["launches"])


def test_tampered_shard_is_refused(default, tmp_path):
    import shutil

    from ernie_compile.errors import UserError

    copy = tmp_path / "copy"
    shutil.copytree(default, copy)
    shard = copy / "weights-00000.bin"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its sha256"):
        Session(copy)


@pytest.mark.parametrize("config", ["mha-bias-hd16", "mqa-untied"])
def test_dense_configs_match_eager(config, checkpoints, tmp_path, monkeypatch):
    """Biases, head_dim 16, MQA, untied embeddings; prefill in chunks of 4 tokens (the prompt is
    longer), so chunked prefill over the cache is checked too."""
    monkeypatch.setattr(webgpu, "PREFILL_CHUNK", 4)
    out = tmp_path / "out"
    _compile(out, model=str(checkpoints[config]))
    assert json.loads((out / "plan.json").read_text())["vars"]["T"] == [1, 4]
    model = eager_model(checkpoints[config])
    session = Session(out)
    with torch.no_grad():
        assert rel_error(session.forward(PROMPT_IDS), model(torch.tensor([PROMPT_IDS])).logits[0, -1]) < 1e-4
    assert session.generate(PROMPT_IDS, 12, stop_at_eos=False).tokens == eager_greedy(model, PROMPT_IDS, 12)


MOE_CASES = {  # name: (config, dtype, bits, logits tolerance)
    "moe-bias-fp32": ("e8-k3-bias", "float32", None, 1e-4),
    "moe-k6-shared2-fp32": ("e16-k6-s2-i1-st1", "float32", None, 1e-4),
    "moe-q4": ("e8-k2-s1-i2-st1", "float32", "4", 1e-4),
    "moe-fp16": ("e4-k1-s0-i1-st0", "float16", None, 2e-2),
}


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_matches_eager(case, moe_checkpoints, tmp_path):
    """Routing by our kernel (the correction bias changes which experts win in "moe-bias"), grouped
    GEMMs over the chosen experts only; 4-bit experts against the fake-quant reference; float16
    (shader-f16) against transformers' own float16 load."""
    config, dtype, bits, tol = MOE_CASES[case]
    folder = moe_checkpoints[config]
    out = tmp_path / "out"
    report = _compile(out, model=str(folder), dtype=dtype, bits=bits)
    assert report["passes"]["fuse_moe_routing"]["matched"] > 0
    if dtype == "float32":
        model = eager_model(folder)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, attn_implementation="eager").eval()
        model.generation_config.eos_token_id = None
        assert "shader-f16" in json.loads((out / "plan.json").read_text())["features"]
    if bits:
        model = fake_quant(model, QuantPolicy.parse(bits, scale_dtype=webgpu.WebGpuTarget.from_spec(None).scale_dtypes[dtype]))
    session = Session(out)
    with torch.no_grad():
        err = rel_error(session.forward(PROMPT_IDS), model(torch.tensor([PROMPT_IDS])).logits[0, -1])
    assert err < tol, f"{case}: prefill logits off by {err:.2e} (tolerance {tol})"
    assert session.generate(PROMPT_IDS, 12, stop_at_eos=False).tokens == eager_greedy(model, PROMPT_IDS, 12)


def test_vulkan_target_runs_on_a_vulkan_adapter(checkpoints, tmp_path):
    """`--target vulkan`: the same WGSL artifact, run by wgpu's Vulkan backend (lavapipe here)."""
    _need("vulkan", adapter_problem("vulkan"))
    out = tmp_path / "vk"
    compile_model(CompileOptions(output=out, model=str(checkpoints["gqa-tied-hd48"]), target="vulkan",
                                 max_seq_len=64), log=lambda *_: None)
    session = Session(out)
    assert "Vulkan" in session._engine.adapter
    model = eager_model(checkpoints["gqa-tied-hd48"])
    assert session.generate(PROMPT_IDS, 8, stop_at_eos=False).tokens == eager_greedy(model, PROMPT_IDS, 8)


def test_missing_device_is_a_one_line_error(default, monkeypatch, tmp_path):
    """On a machine without a WebGPU adapter, ernie-run says so (one line, exit 2)."""
    env = dict(os.environ, WGPU_BACKEND_TYPE="D3D12")  # no such backend on Linux: no adapter
    proc = subprocess.run([sys.executable, "-m", "ernie_compile.runtime.cli", str(default), "--prompt-ids", "1,2"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "adapter" in proc.stderr.strip().splitlines()[-1]


def test_plan_expressions_follow_tir_semantics():
    """Launch expressions from TIR (floor division, min/max, if_then_else) evaluate as TIR does."""
    from tvm import tirx

    from ernie_compile.runtime.webgpu_engine import evaluate, fold_grid
    from ernie_compile.targets.webgpu_plan import to_expr

    t = tirx.Var("t", "int64")
    env = {t.__hash__(): "T"}
    exprs = [(t + 31) // 32, tirx.floormod(t * 3, 7), tirx.min(t, 5) - tirx.max(t - 9, 0),
             tirx.if_then_else(t < 4, t * 2 - 1, t - 1)]
    for e in exprs:
        plan_expr = to_expr(e, env)
        for value in (1, 4, 9, 33, 100):
            assert evaluate(plan_expr, {"T": value}) == int(tvm_eval(e, t, value)), (e, value)
    x, y, z = fold_grid(103424 * 2, 3)
    assert x < 65536 and y == 3 and x * z >= 103424 * 2


def tvm_eval(expr, var, value):
    """TVM's own evaluation: its arithmetic analyzer with `var` bound to `value`."""
    from tvm.sym import Analyzer

    analyzer = Analyzer()
    analyzer.bind(var, value)
    return analyzer.simplify(expr).value


@pytest.mark.parametrize("bits, limit", [(None, 64 << 10), ("4", 16 << 10)])
def test_weights_over_the_binding_limit_are_split(bits, limit, checkpoints, tmp_path, monkeypatch):
    """A tiny binding limit splits the tied embedding / lm_head (and the larger linears) into
    row blocks: the embedding lookup and the logits span every block and still match eager (4-bit:
    each block quantized, against the fake-quant reference)."""
    import dataclasses

    from ernie_compile import targets

    def small(detail):
        return dataclasses.replace(webgpu.WebGpuTarget.from_spec(detail), spec="webgpu-small", max_binding_bytes=limit)

    monkeypatch.setitem(targets.TARGETS, "webgpu-small", small)
    folder = checkpoints["gqa-tied-hd48"]
    out = tmp_path / "out"
    report = compile_model(CompileOptions(output=out, model=str(folder), target="webgpu-small", bits=bits,
                                          max_seq_len=64), log=lambda *_: None)
    assert report["passes"]["split_large_weights"]["matched"] >= 2  # the lookup and the logits
    plan = json.loads((out / "plan.json").read_text())
    assert max(b["bytes"] for b in plan["buffers"] if b["kind"] == "weight") <= limit
    model = eager_model(folder)
    if bits:
        model = fake_quant(model, QuantPolicy.parse(bits, scale_dtype="float32"))
    session = Session(out)
    prompt = [1000, 3, 517, 260, 1023, 42]  # ids in the first, middle and last blocks
    with torch.no_grad():
        assert rel_error(session.forward(prompt), model(torch.tensor([prompt])).logits[0, -1]) < 1e-4
    assert session.generate(prompt, 8, stop_at_eos=False).tokens == eager_greedy(model, prompt, 8)
