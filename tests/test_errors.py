"""Bad input: a one-line error, exit code 2, no traceback, nothing written at -o."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time

import pytest

from conftest import DENSE_CONFIGS, make_checkpoint, run_cli
from ernie_compile import cli, tune_cli
from ernie_compile.errors import USER_ERROR_EXIT, InternalError, UserError
from ernie_compile.errors import run_cli as run_cli_guard
from ernie_compile.runtime import cli as run_cli_main


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", DENSE_CONFIGS["gqa-tied-hd48"])


def _compile_fails(capsys, tmp_path, model, *extra, match: str):
    out = tmp_path / "out"
    code = cli.main(["--model", str(model), "-o", str(out), "-q", *extra])
    err = capsys.readouterr().err.strip()
    assert code == USER_ERROR_EXIT
    assert len(err.splitlines()) == 1 and err.startswith("ernie-compile: error:"), err
    assert match in err, err
    assert not out.exists(), "a failed compile must not leave anything at -o"
    assert [p.name for p in tmp_path.iterdir() if p.name != "ckpt"] == [], "no temporary leftovers"
    return err


def _copy(good, tmp_path):
    return shutil.copytree(good, tmp_path / "ckpt")


def test_unknown_model_type(capsys, tmp_path, good):
    ckpt = _copy(good, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    _compile_fails(capsys, tmp_path, ckpt, match="unknown model_type 'llama'")


def test_missing_model_type(capsys, tmp_path, good):
    ckpt = _copy(good, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["model_type"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _compile_fails(capsys, tmp_path, ckpt, match="unknown model_type None")


def test_text_checkpoint_labelled_vl(capsys, tmp_path, good):
    """A dense checkpoint whose config says ernie4_5_vl_moe: transformers' VL defaults then want a
    vision tower and experts the folder does not have."""
    ckpt = _copy(good, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, model_type="ernie4_5_vl_moe")))
    _compile_fails(capsys, tmp_path, ckpt, match="weights missing or of the wrong shape")


def test_weights_that_do_not_fit_the_config(capsys, tmp_path, good):
    """A dense checkpoint labelled MoE: the expert weights are missing."""
    ckpt = _copy(good, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2)))
    _compile_fails(capsys, tmp_path, ckpt, match="weights missing or of the wrong shape")


def test_folder_without_weights(capsys, tmp_path, good):
    ckpt = _copy(good, tmp_path)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    _compile_fails(capsys, tmp_path, ckpt, match="no *.safetensors")


def test_truncated_safetensors(capsys, tmp_path, good):
    ckpt = _copy(good, tmp_path)
    f = next(ckpt.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _compile_fails(capsys, tmp_path, ckpt, match="not a readable safetensors file")


def test_missing_folder(capsys, tmp_path):
    _compile_fails(capsys, tmp_path, tmp_path / "nope", match="no such folder")


def test_folder_without_config(capsys, tmp_path, good):
    ckpt = _copy(good, tmp_path)
    (ckpt / "config.json").unlink()
    _compile_fails(capsys, tmp_path, ckpt, match="no config.json")


def test_unknown_target(capsys, tmp_path, good):
    err = _compile_fails(capsys, tmp_path, _copy(good, tmp_path), "--target", "tpu", match="unknown target 'tpu'")
    assert "cpu" in err  # the valid ones are listed


def test_refuses_to_overwrite_a_foreign_folder(capsys, tmp_path, good):
    ckpt = _copy(good, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    assert cli.main(["--model", str(ckpt), "-o", str(out), "-q"]) == USER_ERROR_EXIT
    assert "not an ernie-compile artifact" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


@pytest.fixture(scope="module")
def artifact(good, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "out"
    assert cli.main(["--model", str(good), "-o", str(out), "-q", "--max-seq-len", "64"]) == 0
    return out


@pytest.mark.parametrize("victim", ["weights.safetensors", "lib.so", "tokenizer.model"])
def test_modified_artifact_is_refused(capsys, tmp_path, artifact, victim):
    art = shutil.copytree(artifact, tmp_path / "art")
    with open(art / victim, "r+b") as f:  # flip one byte in the middle
        f.seek(f.seek(0, 2) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    code = run_cli_main.main([str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert code == USER_ERROR_EXIT and len(err.splitlines()) == 1
    assert f"artifact file {victim} does not match its sha256" in err


def test_not_an_artifact(capsys, tmp_path):
    assert run_cli_main.main([str(tmp_path), "--prompt-ids", "1"]) == USER_ERROR_EXIT
    assert "not an ernie-compile artifact" in capsys.readouterr().err


def test_bad_token_ids(capsys, artifact):
    assert run_cli_main.main([str(artifact), "--prompt-ids", "1,99999"]) == USER_ERROR_EXIT
    assert "outside the vocabulary" in capsys.readouterr().err


def test_real_processes_exit_2_without_traceback(tmp_path, artifact):
    """The console entry points themselves, in fresh processes."""
    proc = run_cli("ernie_compile.cli", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    art = shutil.copytree(artifact, tmp_path / "art")
    (art / "manifest.json").write_text("{not json")
    proc = run_cli("ernie_compile.runtime.cli", str(art), "--prompt-ids", "1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "corrupt manifest" in proc.stderr


def test_preset_override_must_name_a_config_field(capsys, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["--model", "ernie-tiny", "--preset-override", "no_such_field=3", "-o", str(out), "-q"]) == 2
    assert "not a field of preset ernie-tiny" in capsys.readouterr().err and not out.exists()
    assert cli.main(["--model", "ernie-tiny", "--preset-override", "num_hidden_layers", "-o", str(out), "-q"]) == 2
    assert "expected KEY=NUMBER" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flags,match", [(["--bits", "5"], "is not one of 2, 3, 4, 8"),
                                         (["--bits", "moe=4"], "unknown category 'moe'"),
                                         (["--bits", "4", "--group-size", "48"], "must be a power of two")])
def test_bad_quantization_flags(capsys, tmp_path, flags, match):
    out = tmp_path / "out"
    assert cli.main(["-o", str(out), "-q", *flags]) == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and not out.exists()


# --- errors.run_cli: the one place the three CLIs end expected failures ---------------------------

def _ended(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == USER_ERROR_EXIT and len(err.splitlines()) == 1 and err.startswith("prog: error: "), err
    assert all(w in err for w in words), err
    return err


@pytest.mark.parametrize("exc,words", [(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/w.bin"), ["out/w.bin"]),
                                       (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x"), ["/x"]),
                                       (BrokenPipeError(errno.EPIPE, "Broken pipe"), ["broken pipe"]),
                                       (KeyboardInterrupt(), ["interrupted"]),
                                       (UserError("first line\nsecond"), ["first line"])])
def test_expected_failures_end_in_one_line(capsys, exc, words):
    def fail():
        raise exc

    _ended(capsys, run_cli_guard("prog", fail), *words)


@pytest.mark.parametrize("exc", [InternalError("broken invariant"), ValueError("a bug"),
                                 OSError(errno.EBADF, "Bad file descriptor")])
def test_internal_errors_keep_their_traceback(exc):
    def fail():
        raise exc

    with pytest.raises(type(exc)):
        run_cli_guard("prog", fail)


def test_sigterm_runs_cleanups_like_ctrl_c(capsys, tmp_path):
    """A real SIGTERM inside compiler/package.py's staging(): its temporary folder is removed and
    nothing appears at -o, as for Ctrl-C; the handler the process had is restored afterwards."""
    from ernie_compile.compiler.package import staging

    before = signal.getsignal(signal.SIGTERM)

    def compile_and_get_killed():
        with staging(tmp_path / "out") as tmp:
            (tmp / "weights.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        return 0

    _ended(capsys, run_cli_guard("prog", compile_and_get_killed), "terminated")
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_argument_errors_are_one_line(capsys, tmp_path):
    for main, required in ((cli.main, ["-o", str(tmp_path / "o")]), (tune_cli.main, []),
                           (run_cli_main.main, [str(tmp_path), "--prompt-ids", "1"])):
        code = main([*required, "--no-such-flag"])
        err = capsys.readouterr().err.strip()
        assert code == USER_ERROR_EXIT and len(err.splitlines()) == 1 and "--no-such-flag" in err, err


def test_help_lists_every_target_and_every_default():
    from ernie_compile.targets import TARGETS

    parsers = [cli._parser(), tune_cli._parser(), run_cli_main._parser()]
    for parser in parsers[:2]:
        text = parser.format_help()
        for name in TARGETS:
            assert name in text, (parser.prog, name)
        assert "cpu:" in text and "metal:ios" in text
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and not action.required and action.dest != "help":
                assert "default" in formatter._get_help_string(action), (parser.prog, action.option_strings)
