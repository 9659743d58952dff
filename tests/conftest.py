"""Shared fixtures: tiny random ERNIE 4.5 checkpoints written by save_pretrained, and the oracle.

The oracle is transformers eager on the same weights, loaded fresh from the saved folder, so nothing
ernie-compile does to its own copy of the model (attention routing) can reach the reference.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ASSETS = Path(__file__).resolve().parents[1] / "ernie_compile" / "assets"

# Three dense configs: head_dim != hidden/heads, 1 and >1 KV heads, tied and untied embeddings.
# initializer_range 0.1 spreads the logits of random weights so greedy choices are not near-ties.
DENSE_CONFIGS = {
    "gqa-tied-hd48": dict(vocab_size=1024, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=48, tie_word_embeddings=True),
    "mqa-untied": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
    "mha-bias-hd16": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=8, head_dim=16, tie_word_embeddings=True,
                          use_bias=True),
}

# MoE configs over the matrix: experts 4–16, k 1–6, shared experts 0/1/2, interval 1 and 2,
# start index 0 and 1, and one case where e_score_correction_bias changes which experts win.
_MOE_BASE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)
MOE_CONFIGS = {
    "e4-k1-s0-i1-st0": dict(_MOE_BASE, moe_num_experts=4, moe_k=1, moe_num_shared_experts=0, num_hidden_layers=2,
                            moe_layer_interval=1, moe_layer_start_index=0, moe_layer_end_index=1),
    "e8-k2-s1-i2-st1": dict(_MOE_BASE, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, num_hidden_layers=4,
                            moe_layer_interval=2, moe_layer_start_index=1, moe_layer_end_index=3),
    "e16-k6-s2-i1-st1": dict(_MOE_BASE, moe_num_experts=16, moe_k=6, moe_num_shared_experts=2, num_hidden_layers=3,
                             moe_layer_interval=1, moe_layer_start_index=1, moe_layer_end_index=2,
                             tie_word_embeddings=False),
    "e8-k3-bias": dict(_MOE_BASE, moe_num_experts=8, moe_k=3, moe_num_shared_experts=0, num_hidden_layers=2,
                       moe_layer_interval=1, moe_layer_start_index=0, moe_layer_end_index=1),
}
# Per-expert correction bias for "e8-k3-bias": large enough to override the softmax ranking.
CORRECTION_BIAS = [0.0, 0.0, 0.0, 0.6, 0.0, 0.0, 0.6, 0.0]

PROMPT_IDS = [17, 300, 5, 981, 42, 42, 7, 640, 2, 11, 99]


def make_checkpoint(folder: Path, overrides: dict, seed: int = 0, moe: bool = False,
                    correction_bias: list[float] | None = None) -> Path:
    """A save_pretrained folder with random weights and the shipped sentencepiece tokenizer."""
    import transformers

    kind = "Ernie4_5_Moe" if moe else "Ernie4_5"
    config = getattr(transformers, f"{kind}Config")(max_position_embeddings=512, initializer_range=0.1, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    if correction_bias is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    p.copy_(torch.tensor([correction_bias]))
    model.save_pretrained(folder)
    shutil.copyfile(ASSETS / "tokenizer.model", folder / "tokenizer.model")
    return folder


def eager_model(folder: Path):
    """The oracle: transformers' own class, eager attention, fp32, never touched by ernie-compile."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # compare full-length generations
    return model


def rel_error(ours: np.ndarray, ref: torch.Tensor) -> float:
    """max|ours − ref| / max|ref|: the logits tolerance every parity test states."""
    ref = ref.float().numpy()
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def batch_vs_single(artifact, prompts: list[list[int]] | None = None, steps: int = 3) -> float:
    """The largest rel_error between the artifact's compiled batch step advancing all `prompts`
    together (one ragged prefill, then `steps` decode steps) and each prompt run alone (Session):
    the server's continuous batching against single sequences. Decode feeds the single runs' greedy
    tokens to both. Default prompts: three lengths (PROMPT_IDS, 3 tokens, 1)."""
    from ernie_compile.runtime import Session

    prompts = prompts or [PROMPT_IDS, PROMPT_IDS[:3][::-1], [7]]
    single, want = Session(artifact), []
    for p in prompts:
        single.reset()
        logits = [single.forward(p)]
        for _ in range(steps):
            logits.append(single.forward([int(np.argmax(logits[-1]))]))
        want.append(logits)
    # the same loaded engine, its single-sequence cache replaced by a multi-sequence one
    engine, ids = single.engine, list(range(len(prompts)))
    assert engine.batches, f"{artifact}: no compiled batch step"
    engine.open_batch(len(prompts))
    for i in ids:
        engine.add_sequence(i)
    err = 0.0
    for s in range(steps + 1):
        chunks = prompts if s == 0 else [[int(np.argmax(w[s - 1]))] for w in want]
        got = engine.step_many(ids, chunks, [0] * len(ids) if s == 0 else [len(p) + s - 1 for p in prompts])
        err = max(err, *(rel_error(got[i], torch.from_numpy(want[i][s])) for i in ids))
    return err


def eager_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m MODULE ARGS` the way a user runs the console scripts."""
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, cfg, seed=i) for i, (name, cfg) in enumerate(DENSE_CONFIGS.items())}


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: make_checkpoint(root / name, cfg, seed=10 + i, moe=True,
                                  correction_bias=CORRECTION_BIAS if "bias" in name else None)
            for i, (name, cfg) in enumerate(MOE_CONFIGS.items())}


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """The embedded default (ernie-tiny) compiled once per session for the CPU, max_seq_len 64: the
    artifact runtime tests load. Tests that modify an artifact work on a copy of it."""
    from ernie_compile.compiler.options import CompileOptions
    from ernie_compile.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("tiny") / "art"
    compile_model(CompileOptions(output=out, max_seq_len=64), log=lambda *_: None)
    return out


def check_batch_step(artifact: Path, ref, tol: float) -> None:
    """The compiled `batch` step (continuous batching) on a ragged batch of three sequences — one
    prefilling, one decoding, one mid-prompt chunk — gives each sequence's last-token logits as eager
    does for that sequence alone."""
    from ernie_compile.runtime import Session

    engine = Session(artifact).engine
    assert engine.batches
    a, b = PROMPT_IDS, [5, 9, 1000, 3, 77]
    c = list(range(3, 40))
    engine.open_batch(3)
    for sid in range(3):
        engine.add_sequence(sid)
    engine.step_many([1, 2], [b[:4], c[:20]], [0, 0])
    logits = engine.step_many([0, 1, 2], [a, b[4:], c[20:]], [0, 4, 20])  # [3, V]
    with torch.no_grad():
        for row, seq in zip(logits, (a, b, c)):
            assert rel_error(row, ref(torch.tensor([seq])).logits[0, -1]) <= tol
