"""ernie-run's refusals and endings: every expected failure is one line on stderr and exit code 2
(never a traceback), and --json leaves stdout parseable on its own, with how generation ended."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import PROMPT_IDS
from ernie_compile.errors import USER_ERROR_EXIT
from ernie_compile.runtime import cli
from ernie_compile.runtime.artifact import load_manifest

IDS = ",".join(map(str, PROMPT_IDS))


def _one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == USER_ERROR_EXIT, err
    assert len(err.splitlines()) == 1 and err.startswith("ernie-run: error: "), err
    return err


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ernie_compile.runtime.cli", *args], capture_output=True,
                          text=True, **kwargs)


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-0.5"),
                                        ("--top-p", "nan"), ("--top-p", "0"), ("--top-p", "1.5"), ("--seed", "-1"),
                                        ("--max-new-tokens", "0"), ("--max-new-tokens", "-3"), ("--seed", "abc")])
def test_bad_flags_are_refused_before_the_artifact_is_read(capsys, tmp_path, flag, value):
    """tmp_path is no artifact: the flag's message, not the artifact's, shows it is checked first."""
    err = _one_line_error(capsys, cli.main([str(tmp_path), "--prompt-ids", "1,2", flag, value]))
    assert flag in err and "artifact" not in err


def test_prompt_longer_than_the_context_is_refused_up_front(capsys, tiny_artifact):
    max_seq_len = load_manifest(tiny_artifact).max_seq_len
    ids = ",".join(["5"] * max_seq_len)
    err = _one_line_error(capsys, cli.main([str(tiny_artifact), "--prompt-ids", ids]))
    assert f"prompt of {max_seq_len} tokens" in err
    err = _one_line_error(capsys, cli.main([str(tiny_artifact), "--prompt", "Return the value " * max_seq_len]))
    assert "leaves no room" in err


@pytest.mark.parametrize("max_new,reason", [(3, "length"), (10_000, "context")])
def test_json_alone_on_stdout_with_finish_reason(capsys, tiny_artifact, max_new, reason):
    code = cli.main([str(tiny_artifact), "--prompt-ids", IDS, "--max-new-tokens", str(max_new), "--json", "--ignore-eos"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)  # the whole of stdout: nothing streamed before it
    assert result["finish_reason"] == reason
    max_seq_len = load_manifest(tiny_artifact).max_seq_len
    assert len(result["tokens"]) == (max_new if reason == "length" else max_seq_len - len(PROMPT_IDS))


def test_generation_stops_at_an_end_of_sequence_token(tiny_artifact):
    from ernie_compile.runtime import Session

    session = Session(tiny_artifact)
    first = session.generate(PROMPT_IDS, 4, stop_at_eos=False).tokens
    session.eos_token_ids = {first[1]}  # the second greedy token now ends the sequence
    result = session.generate(PROMPT_IDS, 4)
    assert result.tokens == first[:2] and result.finish_reason == "stop"


# ernie-run whose third model step sends the process a signal, as Ctrl-C or `kill` would mid-generation
SIGNAL_MID_RUN = """
import os, sys
from ernie_compile.runtime import session
forward, calls = session.Session.forward, []
def signalled(self, ids):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), int(sys.argv[1]))
    return forward(self, ids)
session.Session.forward = signalled
from ernie_compile.runtime.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig,word", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_ctrl_c_and_sigterm_end_in_one_line(tiny_artifact, sig, word):
    # as from a terminal: a shell without job control starts background jobs with SIGINT ignored, and
    # Python then never raises KeyboardInterrupt (the suite run with `&` had failed that way)
    proc = subprocess.run([sys.executable, "-c", SIGNAL_MID_RUN, str(int(sig)), str(tiny_artifact), "--prompt-ids",
                           IDS, "--max-new-tokens", "20", "--ignore-eos"], capture_output=True, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == USER_ERROR_EXIT and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"ernie-run: error: {word} ({sig.name if sig == signal.SIGTERM else 'Ctrl-C'})"]


def test_closed_stdout_ends_in_one_line(tiny_artifact):
    """`ernie-run … | head -c 3`: the reader is gone before the text comes (closed here at once,
    so the write certainly fails); no 'Exception ignored' at exit either."""
    proc = subprocess.Popen([sys.executable, "-m", "ernie_compile.runtime.cli", str(tiny_artifact), "--prompt-ids",
                             IDS, "--max-new-tokens", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == USER_ERROR_EXIT, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "broken pipe" in err, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_full_disk_on_output_ends_in_one_line(tiny_artifact, json_flag):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "ernie_compile.runtime.cli", str(tiny_artifact), "--prompt-ids",
                               IDS, "--max-new-tokens", "3", *json_flag], stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == USER_ERROR_EXIT and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and os.strerror(28) in proc.stderr, proc.stderr  # ENOSPC


def test_stream_and_json_agree(tiny_artifact):
    """Without --json the text streams to stdout; with it, the same text is only inside the JSON."""
    plain = _run(str(tiny_artifact), "--prompt-ids", IDS, "--max-new-tokens", "6", "--ignore-eos")
    as_json = _run(str(tiny_artifact), "--prompt-ids", IDS, "--max-new-tokens", "6", "--ignore-eos", "--json")
    assert plain.returncode == 0 and as_json.returncode == 0, plain.stderr + as_json.stderr
    assert plain.stdout == json.loads(as_json.stdout)["text"] + "\n"
