"""MoE ERNIE 4.5 (Ernie4_5_MoeForCausalLM) through the whole pipeline, against transformers eager."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import MOE_CONFIGS, PROMPT_IDS, check_batch_step, eager_greedy, eager_model, rel_error, run_cli
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.passes.fuse_moe_routing import expected_sites
from ernie_compile.runtime import Session

REL_TOL = 1e-4  # fp32; relative to max|logit| of the reference


@pytest.fixture(scope="module", params=list(MOE_CONFIGS))
def compiled(request, moe_checkpoints, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(f"moe-{name}")
    report = compile_model(CompileOptions(output=out, model=str(moe_checkpoints[name]), max_seq_len=128),
                           log=lambda *_: None)
    return name, out, report


def test_every_moe_layer_fused(compiled, moe_checkpoints):
    name, _, report = compiled
    ref = eager_model(moe_checkpoints[name])
    n = expected_sites(ref.config)
    assert n > 0 and report["passes"]["fuse_moe_routing"] == {"matched": n, "expected": n}


def test_prefill_and_decode_logits_match_eager(compiled, moe_checkpoints):
    name, out, _ = compiled
    ref = eager_model(moe_checkpoints[name])
    session = Session(out)
    seq = list(PROMPT_IDS)
    logits = session.forward(seq)
    with torch.no_grad():
        assert rel_error(logits, ref(torch.tensor([seq])).logits[0, -1]) <= REL_TOL
    for token in (3, 700, 12, 512, 99):
        seq.append(token)
        logits = session.forward([token])
        with torch.no_grad():
            assert rel_error(logits, ref(torch.tensor([seq])).logits[0, -1]) <= REL_TOL, f"decode at {len(seq)}"


def test_greedy_32_tokens_python_api(compiled, moe_checkpoints):
    name, out, _ = compiled
    expected = eager_greedy(eager_model(moe_checkpoints[name]), PROMPT_IDS, 32)
    assert Session(out).generate(PROMPT_IDS, 32, stop_at_eos=False).tokens == expected


def test_correction_bias_changes_the_winners(moe_checkpoints):
    """Precondition of the 'bias' case: for this prompt the bias really overrides the softmax ranking."""
    ref = eager_model(moe_checkpoints["e8-k3-bias"])
    gate = ref.model.layers[0].mlp.gate
    with torch.no_grad():
        hidden = ref.model.layers[0].post_attention_layernorm(ref.model.embed_tokens(torch.tensor(PROMPT_IDS)))
        probs = torch.softmax(hidden @ gate.weight.T, -1)
        plain = probs.topk(3).indices.sort(-1).values
        biased = (probs + gate.moe_statics.e_score_correction_bias).topk(3).indices.sort(-1).values
    assert (plain != biased).any()


def test_greedy_32_tokens_cli(moe_checkpoints, tmp_path):
    name = "e16-k6-s2-i1-st1"
    out = tmp_path / "art"
    report = tmp_path / "report.json"
    run_cli("ernie_compile.cli", "--model", str(moe_checkpoints[name]), "-o", str(out), "--max-seq-len", "64",
            "--report", str(report), "-q")
    assert json.loads(report.read_text())["passes"]["fuse_moe_routing"] == {"matched": 2, "expected": 2}
    proc = run_cli("ernie_compile.runtime.cli", str(out), "--prompt-ids", ",".join(map(str, PROMPT_IDS)),
                   "--max-new-tokens", "32", "--ignore-eos", "--json")
    tokens = json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]
    assert tokens == eager_greedy(eager_model(moe_checkpoints[name]), PROMPT_IDS, 32)


def test_batch_step_logits_match_eager(compiled, moe_checkpoints):
    name, out, _ = compiled
    check_batch_step(out, eager_model(moe_checkpoints[name]), REL_TOL)
