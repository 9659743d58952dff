"""`--backend inductor`: transformers' model with a static KV cache through torch.export and
AOTInductor, checked against transformers eager like the TVM route, on one dense and one MoE config.

Each artifact is compiled once per module (AOTInductor's C++ compile is the cost): the dense one
through the Python API, the MoE one through `ernie-compile` and run through `ernie-run --json`.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import (DENSE_CONFIGS, MOE_CONFIGS, PROMPT_IDS, eager_greedy, eager_model, make_checkpoint,
                      rel_error, run_cli)
from ernie_compile import cli
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.errors import USER_ERROR_EXIT, UserError
from ernie_compile.runtime import Session

REL_TOL = 1e-4  # fp32 end to end; relative to max|logit| of the reference
DENSE, MOE = "gqa-tied-hd48", "e16-k6-s2-i1-st1"


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("inductor-dense")
    ckpt = make_checkpoint(root / "ckpt", DENSE_CONFIGS[DENSE])
    out = root / "art"
    compile_model(CompileOptions(output=out, model=str(ckpt), backend="inductor", max_seq_len=64),
                  log=lambda *_: None)
    return ckpt, out


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("inductor-moe")
    ckpt = make_checkpoint(root / "ckpt", MOE_CONFIGS[MOE], seed=12, moe=True)
    out = root / "art"
    run_cli("ernie_compile.cli", "--model", str(ckpt), "-o", str(out), "--backend", "inductor",
            "--max-seq-len", "64", "-q")
    return ckpt, out


@pytest.fixture(params=["dense", "moe"])
def artifact(request):
    return request.getfixturevalue(request.param)


def test_manifest_records_the_backend(artifact):
    _, out = artifact
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "inductor" and m["options"]["backend"] == "inductor"
    assert set(m["programs"].values()) == {"prefill.pt2", "decode.pt2"} <= set(m["files"])
    # the weights live once, outside both programs: the stored parameters are the model's, tied ones once
    from safetensors import safe_open

    with safe_open(str(out / "weights.safetensors"), "np") as f:
        assert set(f.keys()) == set(m["weights"]["constants"].values())
        stored = sum(f.get_tensor(k).size
                     for k in f.keys() if not k.endswith("rotary_emb.inv_freq"))
    assert stored == m["model"]["num_parameters"]


def test_prefill_and_decode_logits_match_eager(artifact):
    ckpt, out = artifact
    ref = eager_model(ckpt)
    session = Session(out)
    seq = list(PROMPT_IDS)
    logits = session.forward(seq)
    with torch.no_grad():
        assert rel_error(logits, ref(torch.tensor([seq])).logits[0, -1]) <= REL_TOL
    for token in (3, 700, 12, 512):
        seq.append(token)
        logits = session.forward([token])
        with torch.no_grad():
            assert rel_error(logits, ref(torch.tensor([seq])).logits[0, -1]) <= REL_TOL, f"decode at {len(seq)}"
    session.reset()
    session.prefill_chunk = 3  # the prompt in steps of 3: each prefill continues the cache at its offset
    with torch.no_grad():
        assert rel_error(session.forward(seq), ref(torch.tensor([seq])).logits[0, -1]) <= REL_TOL


def test_greedy_32_tokens_python_api(artifact):
    ckpt, out = artifact
    expected = eager_greedy(eager_model(ckpt), PROMPT_IDS, 32)
    session = Session(out)
    assert session.generate(PROMPT_IDS, 32, stop_at_eos=False).tokens == expected
    # a second generation on the same session starts from an empty cache
    assert session.generate(PROMPT_IDS, 32, stop_at_eos=False).tokens == expected


def test_greedy_32_tokens_cli(moe):
    ckpt, out = moe
    proc = run_cli("ernie_compile.runtime.cli", str(out), "--prompt-ids", ",".join(map(str, PROMPT_IDS)),
                   "--max-new-tokens", "32", "--ignore-eos", "--json")
    tokens = json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]
    assert tokens == eager_greedy(eager_model(ckpt), PROMPT_IDS, 32)


def test_modified_program_is_refused(dense, tmp_path):
    import shutil

    _, out = dense
    copy = shutil.copytree(out, tmp_path / "art")
    with open(copy / "decode.pt2", "r+b") as f:
        f.seek(100)
        f.write(b"\0")
    with pytest.raises(UserError, match="decode.pt2 does not match its sha256"):
        Session(copy)


def test_without_torch_the_runtime_says_what_it_needs(dense):
    _, out = dense
    no_torch = "import sys; sys.modules['torch'] = None; from ernie_compile.runtime.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", no_torch, str(out), "--prompt-ids", "1,2"], capture_output=True,
                          text=True)
    assert proc.returncode == USER_ERROR_EXIT and "needs torch installed" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("flags, match", [
    (["--bits", "4"], "weight quantization (--bits, --embed-bits) needs --backend tvm"),
    (["--target", "cpu:aarch64-linux-android"], "builds for this machine's CPU only (--target cpu)"),
    (["--no-fuse-attention"], "--no-fuse-attention applies to --backend tvm only"),
    (["--dtype", "float16"], "the inductor backend compiles float32 only"),
])
def test_unsupported_combinations(capsys, tmp_path, flags, match):
    out = tmp_path / "out"
    code = cli.main(["-o", str(out), "-q", "--backend", "inductor", *flags])
    err = capsys.readouterr().err.strip()
    assert code == USER_ERROR_EXIT
    assert len(err.splitlines()) == 1 and err.startswith("ernie-compile: error:") and match in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []
