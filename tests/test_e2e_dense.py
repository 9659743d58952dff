"""The whole pipeline on dense ERNIE 4.5 configs, checked against transformers eager."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import (DENSE_CONFIGS, PROMPT_IDS as PROMPT, check_batch_step, eager_greedy, eager_model, rel_error,
                      run_cli)
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.runtime import Session

# fp32 end to end; the only differences are summation order. Relative to max|logit| of the reference.
REL_TOL = 1e-4


@pytest.fixture(scope="module", params=list(DENSE_CONFIGS))
def compiled(request, checkpoints, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(f"art-{name}")
    report = compile_model(CompileOptions(output=out, model=str(checkpoints[name]), max_seq_len=128),
                           log=lambda *_: None)
    return name, out, report


def test_pass_matched_every_layer(compiled):
    name, _, report = compiled
    layers = DENSE_CONFIGS[name]["num_hidden_layers"]
    assert report["passes"]["fuse_gqa_attention"] == {"matched": layers, "expected": layers}
    assert "fuse_moe_routing" not in report["passes"]  # dense: the MoE pass does not apply


def test_prefill_and_decode_logits_match_eager(compiled, checkpoints):
    name, out, _ = compiled
    ref = eager_model(checkpoints[name])
    session = Session(out)
    seq = list(PROMPT)
    logits = session.forward(seq)
    with torch.no_grad():
        full = ref(torch.tensor([seq])).logits[0, -1]
    assert rel_error(logits, full) <= REL_TOL
    rng = np.random.default_rng(0)
    for _ in range(8):  # decode steps, teacher-forced with arbitrary tokens so the cache must be right
        token = int(rng.integers(0, 1024))
        seq.append(token)
        logits = session.forward([token])
        with torch.no_grad():
            full = ref(torch.tensor([seq])).logits[0, -1]
        assert rel_error(logits, full) <= REL_TOL, f"decode step at length {len(seq)}"


def test_greedy_32_tokens_python_api(compiled, checkpoints):
    name, out, _ = compiled
    expected = eager_greedy(eager_model(checkpoints[name]), PROMPT, 32)
    result = Session(out).generate(PROMPT, 32, stop_at_eos=False)
    assert result.tokens == expected


def test_greedy_32_tokens_cli(checkpoints, tmp_path):
    """ernie-compile on a save_pretrained folder, then ernie-run --json, as a user runs them."""
    name = "mqa-untied"
    out = tmp_path / "art"
    run_cli("ernie_compile.cli", "--model", str(checkpoints[name]), "-o", str(out), "--max-seq-len", "64", "-q")
    proc = run_cli("ernie_compile.runtime.cli", str(out), "--prompt-ids", ",".join(map(str, PROMPT)),
                   "--max-new-tokens", "32", "--ignore-eos", "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == eager_greedy(eager_model(checkpoints[name]), PROMPT, 32)
    assert result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0


def test_text_prompt_roundtrip(compiled, checkpoints):
    """--prompt goes through the shipped sentencepiece model exactly as the eager reference's ids."""
    import sentencepiece as spm

    name, out, _ = compiled
    sp = spm.SentencePieceProcessor(model_file=str(checkpoints[name] / "tokenizer.model"))
    text = "Return the number of items in a container."
    session = Session(out)
    ids = session.tokenizer.encode(text)
    assert ids == sp.encode(text)
    result = session.generate(ids, 8, stop_at_eos=False)
    assert result.tokens == eager_greedy(eager_model(checkpoints[name]), ids, 8)
    assert session.tokenizer.decode(result.tokens) == sp.decode(result.tokens)


def test_context_limit_is_enforced(compiled):
    from ernie_compile.errors import UserError

    _, out, _ = compiled
    session = Session(out)
    with pytest.raises(UserError, match="max_seq_len 128"):
        session.forward(list(range(129)))


def test_decode_across_many_kv_pages(compiled, checkpoints):
    """A 70-token prompt spans five 16-token KV pages: decode attention must walk the page table."""
    name, out, _ = compiled
    ref = eager_model(checkpoints[name])
    session = Session(out)
    seq = [int(t) for t in np.random.default_rng(1).integers(0, 1024, 70)]
    session.forward(seq)
    for token in (9, 500, 77):
        seq.append(token)
        logits = session.forward([token])
        with torch.no_grad():
            assert rel_error(logits, ref(torch.tensor([seq])).logits[0, -1]) <= REL_TOL, f"decode at {len(seq)}"


def test_second_prefill_on_a_cached_sequence(compiled, checkpoints):
    """Prefill more tokens onto a sequence already in the cache: the new tokens' attention (ours, with
    its log-sum-exp) is merged with attention over the cached pages, then decode goes on."""
    name, out, _ = compiled
    ref = eager_model(checkpoints[name])
    session = Session(out)
    seq = [int(t) for t in np.random.default_rng(2).integers(0, 1024, 45)]
    session.forward(seq[:20])
    logits = session.forward(seq[20:])
    with torch.no_grad():
        assert rel_error(logits, ref(torch.tensor([seq])).logits[0, -1]) <= REL_TOL
    seq.append(3)
    with torch.no_grad():
        assert rel_error(session.forward([3]), ref(torch.tensor([seq])).logits[0, -1]) <= REL_TOL


def test_batch_step_logits_match_eager(compiled, checkpoints):
    name, out, _ = compiled
    check_batch_step(out, eager_model(checkpoints[name]), REL_TOL)
