"""Issue 16, the compile side: every bad input ends in one line on stderr, exit 2, no traceback, and
nothing at -o nor hidden beside it; most before any model is loaded."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import DENSE_CONFIGS, PROMPT_IDS, eager_model, make_checkpoint, rel_error
from ernie_compile import cli
from ernie_compile.compiler import package
from ernie_compile.errors import USER_ERROR_EXIT

SMALL = DENSE_CONFIGS["gqa-tied-hd48"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", SMALL)


def _fails(capsys, tmp_path, args, match, out=None):
    out = out or tmp_path / "out"
    code = cli.main(["-o", str(out), "-q", *args])
    err = capsys.readouterr().err.strip()
    assert code == USER_ERROR_EXIT, err
    assert len(err.splitlines()) == 1 and err.startswith("ernie-compile: error:"), err
    assert match in err, err
    assert not out.exists(), "nothing at -o"
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "no hidden staging folder"
    return err


def _with_config(good, tmp_path, **changes):
    ckpt = shutil.copytree(good, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


# --- 1. the config, before anything is loaded -----------------------------------------------------

@pytest.mark.parametrize("changes,match", [
    (dict(num_hidden_layers=0), "num_hidden_layers: expected an integer ≥ 1, got 0"),
    (dict(vocab_size=0), "vocab_size: expected an integer ≥ 1, got 0"),
    (dict(hidden_size="96"), "transformers refuses the config"),
    (dict(num_key_value_heads=3), "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    (dict(head_dim=47), "even"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(pad_token_id=5000), "pad_token_id 5000: outside the vocabulary"),
    (dict(hidden_act="nope"), "hidden_act 'nope'"),
    (dict(max_position_embeddings=1), "max_position_embeddings"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), "rope_type 'yarn'"),
    (dict(model_type="ernie4_5_moe", moe_num_experts=4, moe_k=6), "moe_k 6: more experts per token"),
    (dict(model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_layer_interval=0), "moe_layer_interval"),
])
def test_config_refused_before_load(capsys, tmp_path, good, monkeypatch, changes, match):
    from ernie_compile.compiler import weights

    def no_model(config):
        raise AssertionError("a model was built for a refused config")

    monkeypatch.setattr(weights, "meta_model", no_model)
    _fails(capsys, tmp_path, ["--model", str(_with_config(good, tmp_path, **changes))], match)


@pytest.mark.parametrize("override,match", [("num_hidden_layers=0", "num_hidden_layers"),
                                            ("num_hidden_layers=2.5", "transformers refuses the config"),
                                            ("num_key_value_heads=3", "not a multiple"),
                                            ("head_dim=63", "even")])
def test_preset_override_values(capsys, tmp_path, override, match):
    _fails(capsys, tmp_path, ["--preset-override", override], match)


@pytest.mark.parametrize("flags,match", [(["--max-seq-len", "1"], "must be in [2, 1048576]"),
                                         (["--max-seq-len", "0"], "must be in [2"),
                                         (["--max-seq-len", "5000"], "exceeds the model's max_position_embeddings"),
                                         (["--seed", "-1"], "--seed -1"),
                                         (["--tune-trials", "0"], "--tune-trials 0")])
def test_bad_numbers(capsys, tmp_path, flags, match):
    _fails(capsys, tmp_path, flags, match)


@pytest.mark.parametrize("n", [2, 3])
def test_shortest_contexts_compile_and_run(tmp_path, n):
    """2 (one prompt token, one new) is the lower bound the runtime's schema states; export traces
    at a length inside [1, n] (it used to trace at 4 and fail for 2 and 3)."""
    from ernie_compile.runtime import Session

    assert cli.main(["-o", str(tmp_path / "out"), "-q", "--max-seq-len", str(n)]) == 0
    result = Session(tmp_path / "out").generate([1], n, stop_at_eos=False)
    assert len(result.tokens) == n - 1


# --- 2. RoPE ----------------------------------------------------------------------------------------

def test_linear_rope_matches_eager(tmp_path):
    """A linear-scaled config used to compile with the unscaled RoPE (wrong logits, exit 0)."""
    from ernie_compile.runtime import Session

    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    ckpt = make_checkpoint(tmp_path / "ckpt", dict(SMALL, rope_parameters=rope))
    plain = make_checkpoint(tmp_path / "plain", dict(SMALL, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0}))
    assert cli.main(["--model", str(ckpt), "-o", str(tmp_path / "out"), "-q", "--max-seq-len", "64"]) == 0
    ours = Session(tmp_path / "out").forward(PROMPT_IDS)
    with torch.no_grad():
        ref = eager_model(ckpt)(torch.tensor([PROMPT_IDS])).logits[0, -1]
        unscaled = eager_model(plain)(torch.tensor([PROMPT_IDS])).logits[0, -1]
    assert rel_error(ours, ref) < 1e-4
    assert rel_error(ours, unscaled) > 1e-3  # the same weights (seed 0) without the scaling differ


# --- 3. NaN / Inf weights ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(capsys, tmp_path, good, bad):
    from safetensors.torch import load_file, save_file

    ckpt = shutil.copytree(good, tmp_path / "ckpt")
    f = next(ckpt.glob("*.safetensors"))
    tensors = load_file(str(f))
    name = next(n for n in tensors if "layers.1.mlp.down_proj" in n)
    tensors[name][3, 5] = bad
    save_file(tensors, str(f), metadata={"format": "pt"})
    err = _fails(capsys, tmp_path, ["--model", str(ckpt), "--max-seq-len", "16"], "must be finite")
    assert "layers.1.mlp.down_proj" in err and "[3, 5]" in err


# --- 4. tokenizer files -----------------------------------------------------------------------------

@pytest.mark.parametrize("victim,match", [("tokenizer.model", "not a sentencepiece model"),
                                          ("tokenizer.json", "not a tokenizers file")])
def test_corrupt_tokenizer(capsys, tmp_path, good, victim, match):
    ckpt = shutil.copytree(good, tmp_path / "ckpt")
    (ckpt / victim).write_bytes(b"\x00garbage" * 100)
    _fails(capsys, tmp_path, ["--model", str(ckpt)], match)


# --- 5. targets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,match", [("cpu:foo", "is not one this LLVM builds for"),
                                          ("cpu:foo-linux-gnu", "architecture 'foo'"),
                                          ("cpu:aarch64--", "an LLVM triple looks like")])
def test_unknown_triple_in_a_fresh_process(tmp_path, target, match):
    """It used to segfault inside LLVM (no Python error at all) and leave a staging folder."""
    proc = subprocess.run([sys.executable, "-m", "ernie_compile.cli", "-o", str(tmp_path / "out"), "--target", target],
                          capture_output=True, text=True)
    assert proc.returncode == USER_ERROR_EXIT and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and match in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cuda_arch_checked_against_nvcc(capsys, tmp_path, monkeypatch):
    from ernie_compile.targets import cuda

    monkeypatch.setattr(cuda, "_NVCC_ARCHS", [("compute_75", "compute_80", "compute_90")])
    _fails(capsys, tmp_path, ["--target", "cuda", "--cuda-arch", "sm_50,sm_80"], "does not build for sm_50")
    assert cuda._parse_archs("sm_80,sm_90a") == ("sm_80", "sm_90a")


# --- 6. output paths, before any work ---------------------------------------------------------------

def test_output_paths(capsys, tmp_path, monkeypatch):
    from ernie_compile.compiler import load

    def no_config(*a, **k):
        raise AssertionError("the config was read for a bad output path")

    monkeypatch.setattr(load, "read_config", no_config)
    afile = tmp_path / "afile"
    afile.write_text("x")
    _fails(capsys, tmp_path, [], "is not a folder", out=afile / "out")
    code = cli.main(["-o", "/proc/ernie-out", "-q"])
    assert code == USER_ERROR_EXIT and "cannot write in /proc" in capsys.readouterr().err
    _fails(capsys, tmp_path, ["--dump-ir", str(afile)], "--dump-ir")
    _fails(capsys, tmp_path, ["--report", str(tmp_path)], "--report")
    _fails(capsys, tmp_path, ["--report", str(afile / "r.json")], "is not a folder")
    if os.geteuid() != 0:  # root writes anywhere: only a non-root user meets a read-only folder
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        _fails(capsys, tmp_path, [], "cannot write", out=ro / "out")


# --- 7. killed compiles -----------------------------------------------------------------------------

def _wait_for_staging(parent, proc, seconds=120):
    end = time.time() + seconds
    while time.time() < end:
        staged = [p for p in parent.iterdir() if p.name.startswith(".out.")]
        if staged and (staged[0] / package.STAGING_MARKER).exists():
            return staged[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no staging folder appeared")


def test_sigterm_mid_compile_removes_staging(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ernie_compile.cli", "-o", str(tmp_path / "out"), "-q",
                             "--max-seq-len", "32"], stderr=subprocess.PIPE, text=True)
    _wait_for_staging(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == USER_ERROR_EXIT and err.strip() == "ernie-compile: error: terminated (SIGTERM)", err
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftovers_are_removed_by_the_next_compile(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ernie_compile.cli", "-o", str(tmp_path / "out"), "-q",
                             "--max-seq-len", "32"], stderr=subprocess.DEVNULL)
    stale = _wait_for_staging(tmp_path, proc)
    proc.kill()
    proc.wait()
    assert stale.exists()
    mine = tmp_path / ".out.users-own"  # the same name pattern, without our marker: never touched
    mine.mkdir()
    live = tmp_path / ".out.live"  # a staging folder of a compile still running (this process)
    live.mkdir()
    (live / package.STAGING_MARKER).write_text(package.marker(os.getpid()))
    elsewhere = tmp_path / ".out.other-host"  # made on another machine sharing the folder: its PID means nothing here
    elsewhere.mkdir()
    (elsewhere / package.STAGING_MARKER).write_text("999999999  some-other-host\n")
    with package.staging(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists() and mine.is_dir() and live.is_dir() and elsewhere.is_dir()
    assert not (tmp_path / "out" / package.STAGING_MARKER).exists()
