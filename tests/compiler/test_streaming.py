"""The streaming compile: a checkpoint as Baidu ships one (bf16, sharded with an index, MTP tensors
transformers ignores) compiles without the model ever holding weights, matches transformers eager on
the same folder, and reads stacked experts one expert at a time; bad checkpoints and a full disk end
in one line, exit 2, nothing at -o."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from conftest import ASSETS, MOE_CONFIGS, PROMPT_IDS, eager_greedy, eager_model, rel_error
from ernie_compile import cli
from ernie_compile.compiler import weights
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.runtime import Session

REL_TOL = 1e-4  # fp32 compute over bf16-stored weights (both sides widen them exactly); relative to max|logit|


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A MoE checkpoint laid out as Baidu's: bf16, several shards + model.safetensors.index.json, and
    MTP head tensors in a shard of their own that transformers does not load."""
    import transformers
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("shipped")
    config = transformers.Ernie4_5_MoeConfig(max_position_embeddings=512, initializer_range=0.1,
                                             **MOE_CONFIGS["e16-k6-s2-i1-st1"])
    torch.manual_seed(3)
    model = transformers.Ernie4_5_MoeForCausalLM(config).eval()
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="200KB")
    hidden = config.hidden_size
    extra = {"model.mtp_linear_proj.0.weight": torch.randn(hidden, 2 * hidden, dtype=torch.bfloat16),
             "model.mtp_block.0.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    save_file(extra, str(folder / "model-mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, "model-mtp.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copyfile(ASSETS / "tokenizer.model", folder / "tokenizer.model")
    assert len(set(index["weight_map"].values())) >= 3
    return folder


def test_sharded_bf16_checkpoint_with_mtp_matches_eager(shipped, tmp_path, monkeypatch):
    """No --bits: nothing may materialize the model (no accuracy report needs it)."""
    def refuse(self, model):
        raise AssertionError("the TVM route materialized the model")

    monkeypatch.setattr(weights.WeightSource, "materialize", refuse)
    lines = []
    compile_model(CompileOptions(output=tmp_path / "out", model=str(shipped), max_seq_len=64), log=lines.append)
    monkeypatch.undo()
    assert any("skipped 2 checkpoint tensors" in str(line) and "mtp" in str(line) for line in lines)
    ref = eager_model(shipped)  # from_pretrained(dtype=float32) of the same folder
    session = Session(tmp_path / "out")
    with torch.no_grad():
        assert rel_error(session.forward(PROMPT_IDS), ref(torch.tensor([PROMPT_IDS])).logits[0, -1]) < REL_TOL
    assert session.generate(PROMPT_IDS, 12, stop_at_eos=False).tokens == eager_greedy(ref, PROMPT_IDS, 12)


def test_stacked_experts_are_read_one_expert_at_a_time(shipped, tmp_path, monkeypatch):
    """While packaging, the source is asked for each expert of a stacked tensor, never the whole stack."""
    from ernie_compile.compiler import package

    calls, packaging = [], [False]
    get, chunks = weights.CheckpointSource.get, package._chunks

    def spy_get(self, name, index=None):
        if packaging[0]:
            calls.append((name, index))
        return get(self, name, index)

    def spy_chunks(record, source):
        packaging[0] = True
        yield from chunks(record, source)
        packaging[0] = False

    monkeypatch.setattr(weights.CheckpointSource, "get", spy_get)
    monkeypatch.setattr(package, "_chunks", spy_chunks)
    compile_model(CompileOptions(output=tmp_path / "out", model=str(shipped), max_seq_len=64, bits="4"),
                  log=lambda *_: None)
    experts = MOE_CONFIGS["e16-k6-s2-i1-st1"]["moe_num_experts"]
    stacked = {n for n, _ in calls if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert len(stacked) == 2 * 2  # gate_up and down of both MoE layers
    for name in stacked:
        assert [i for n, i in calls if n == name] == list(range(experts))


def _no_staging_left(parent, name):
    return not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


def test_missing_shard_is_one_line(shipped, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(shipped, broken)
    next(p for p in sorted(broken.glob("model-0000*.safetensors"))).unlink()
    out = tmp_path / "out"
    assert cli.main(["--model", str(broken), "-o", str(out), "--max-seq-len", "64", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ernie-compile: error:") and "\n" not in err and "Traceback" not in err
    assert not out.exists() and _no_staging_left(tmp_path, "out")


def test_disk_full_while_writing_weights_is_one_line(shipped, tmp_path, monkeypatch, capsys):
    real = os.pwrite

    def full(fd, data, offset):
        if len(data) > 4096:  # weight chunks, not the header
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "out"
    assert cli.main(["--model", str(shipped), "-o", str(out), "--max-seq-len", "64", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ernie-compile: error:") and "No space left" in err and "\n" not in err
    assert not out.exists() and _no_staging_left(tmp_path, "out")
