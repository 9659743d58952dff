"""Shared fixtures: tiny random ERNIE 4.5 checkpoints written by save_pretrained, and the oracle.

The oracle is transformers eager on the same weights, loaded fresh from the saved folder, so nothing
ernie-compile does to its own copy of the model (attention routing) can reach the reference.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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

PROMPT_IDS = [17, 300, 5, 981, 42, 42, 7, 640, 2, 11, 99]


def make_checkpoint(folder: Path, overrides: dict, seed: int = 0) -> Path:
    """A save_pretrained folder with random weights and the shipped sentencepiece tokenizer."""
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    config = Ernie4_5Config(max_position_embeddings=512, initializer_range=0.1, **overrides)
    torch.manual_seed(seed)
    model = Ernie4_5ForCausalLM(config).eval()
    model.save_pretrained(folder)
    shutil.copyfile(ASSETS / "tokenizer.model", folder / "tokenizer.model")
    return folder


def eager_model(folder: Path):
    """The oracle: transformers' own class, eager attention, fp32, never touched by ernie-compile."""
    from transformers import Ernie4_5ForCausalLM

    model = Ernie4_5ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # compare full-length generations
    return model


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
