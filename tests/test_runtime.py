"""The runtime stands alone: no torch, no transformers, no compiler code; cross builds do not run here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from conftest import PROMPT_IDS, rel_error
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.errors import UserError

# torch, transformers and our compiler made unimportable: `import torch` raises ImportError, as on a
# machine where they are not installed (tvm_ffi imports torch opportunistically when it can).
NO_TORCH = """
import sys, json
for name in ("torch", "transformers", "ernie_compile.compiler"):
    sys.modules[name] = None
from ernie_compile.runtime.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m] is not None)
print(json.dumps({"loaded": loaded}))
sys.exit(code)
"""


PROMPT_IDS_ARG = ",".join(map(str, PROMPT_IDS))


@pytest.fixture(scope="module")
def tiny(tiny_artifact):
    return tiny_artifact  # the embedded default, compiled once per session (conftest.py)


def test_runtime_runs_without_torch(tiny):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(tiny), "--prompt", "Return the value",
                           "--max-new-tokens", "5", "--json", "--ignore-eos"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"loaded": []}
    result = json.loads(lines[-2])
    assert len(result["tokens"]) == 5 and isinstance(result["text"], str)


def test_cli_process_holds_no_torch_and_no_compiler_library(tiny):
    """ernie-run in a process where torch and TVM's compiler are installed (this one) loads neither:
    what stays resident is the runtime's."""
    code = ("import sys, json; from ernie_compile.runtime.cli import main; code = main(sys.argv[1:]); "
            "maps = open('/proc/self/maps').read(); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'compiler': 'libtvm_compiler' in maps})); "
            "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny), "--prompt-ids", PROMPT_IDS_ARG,
                           "--max-new-tokens", "3", "--ignore-eos"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"torch": False, "compiler": False}


def test_embedded_default_matches_eager(tiny):
    """The default the README runs is itself checked against transformers."""
    import torch

    from ernie_compile.compiler.load import load_preset
    from ernie_compile.runtime import Session

    ref = load_preset("ernie-tiny").model
    ref.set_attn_implementation("eager")
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = ref.generate(torch.tensor([PROMPT_IDS]), do_sample=False, max_new_tokens=16,
                                min_new_tokens=16)[0, len(PROMPT_IDS):].tolist()
    assert Session(tiny).generate(PROMPT_IDS, 16, stop_at_eos=False).tokens == expected


def test_long_prompts_run_in_bounded_steps(tiny, monkeypatch):
    """A prompt longer than prefill_chunk runs as several prefill steps of at most that many tokens,
    each continuing the cache at its offset; the logits and greedy tokens match transformers'."""
    import torch

    from ernie_compile.compiler.load import load_preset
    from ernie_compile.runtime import Session

    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 1000, 40)]
    ref = load_preset("ernie-tiny").model
    ref.set_attn_implementation("eager")
    session = Session(tiny)
    steps = []
    step = session.engine.step
    monkeypatch.setattr(session.engine, "step", lambda ids, start: steps.append((len(ids), start)) or step(ids, start))
    session.prefill_chunk = 16
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0, -1]
    assert rel_error(session.forward(prompt), want) <= 1e-4
    assert steps == [(16, 0), (16, 16), (8, 32)]


def test_sampling_is_seeded_and_valid(tiny):
    from ernie_compile.runtime import Sampler, Session

    s = Session(tiny)
    a = s.generate(PROMPT_IDS, 12, Sampler(temperature=0.8, top_p=0.9, seed=7), stop_at_eos=False).tokens
    b = s.generate(PROMPT_IDS, 12, Sampler(temperature=0.8, top_p=0.9, seed=7), stop_at_eos=False).tokens
    assert a == b and all(0 <= t < s.vocab_size for t in a)
    with pytest.raises(UserError):
        Sampler(top_p=0)


def test_tvm_thread_count_is_pinned(tiny):
    """Unpinned, TVM halves the CPU count (assuming hyper-threads) and asks glibc for it (three system
    calls) at every parallel kernel launch; loading an artifact pins one thread per physical core
    (TVM's own count where the topology is unreadable), and keeps a user's own setting."""
    code = ("import os, sys, tvm; from ernie_compile.runtime import Session; "
            "from ernie_compile.runtime.tvm_engine import physical_cores; Session(sys.argv[1]); "
            "print(os.environ['TVM_NUM_THREADS'], physical_cores() or tvm.get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    for given in (None, "3"):
        run_env = env if given is None else dict(env, TVM_NUM_THREADS=given)
        proc = subprocess.run([sys.executable, "-c", code, str(tiny)], capture_output=True, text=True, env=run_env)
        assert proc.returncode == 0, proc.stderr
        pinned, default = proc.stdout.split()
        assert pinned == (given or default)


def test_cross_build_aarch64_android(tmp_path):
    """`--target cpu:TRIPLE` builds an aarch64 object archive; the runtime refuses to run it here."""
    from ernie_compile.runtime import Session

    out = tmp_path / "android"
    compile_model(CompileOptions(output=out, target="cpu:aarch64-linux-android", max_seq_len=64),
                  log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["library"] == "lib.tar" and manifest["target"]["spec"] == "cpu:aarch64-linux-android"
    with tarfile.open(out / "lib.tar") as tar:
        objects = [m for m in tar.getmembers() if m.name.endswith(".o")]
        assert objects
        for m in objects:
            head = tar.extractfile(m).read(20)
            assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(UserError, match="does not run on this machine"):
        Session(out)


@pytest.mark.parametrize("int8_dot,flag", [("vnni", "avx512_vnni"), ("avx2", "avx2")])
def test_int8_kernels_are_refused_on_a_cpu_without_their_instructions(int8_dot, flag, tiny, tmp_path, monkeypatch):
    """An artifact whose kernels use an int8 dot (manifest quantization "int8_dot") on a CPU whose
    flags lack its instruction: a one-line user error, not SIGILL mid-run. The CPU is a made-up
    /proc/cpuinfo; the artifact the float one with that entry written in (the manifest is not hashed)."""
    from ernie_compile.runtime import Session, artifact

    art = shutil.copytree(tiny, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps(dict(manifest, quantization={"int8_dot": int8_dot})))
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(artifact, "CPUINFO", cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx fma\n")
    with pytest.raises(UserError, match=f"'{int8_dot}' int8 dot product, which needs the CPU flag {flag}") as e:
        Session(art)
    assert "\n" not in str(e.value)
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx fma {flag}\n")
    assert Session(art).forward([1, 2]).shape == (manifest["vocab_size"],)
    monkeypatch.setattr(artifact, "CPUINFO", tmp_path / "absent")  # not Linux: not checked
    Session(art)


def test_ids_beyond_the_tokenizer_decode_to_a_mark(tiny):
    """Model vocabularies are padded past the tokenizer's (ERNIE: 103424 vs its tokenizer); presets
    with random weights generate such ids. Text shows a mark instead of failing."""
    from ernie_compile.runtime.tokenizer import UNKNOWN, Tokenizer

    tok = Tokenizer(tiny, {"files": ["tokenizer.model"]})
    assert tok.decode([tok.size + 5]) == UNKNOWN
    assert tok.decode(tok.encode("Return") + [tok.size]) == "Return" + UNKNOWN

