"""Schedule tuning: the database format, reuse without search, resume after an interruption, and
that every schedule in the space computes the same linear."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DENSE_CONFIGS, MOE_CONFIGS, PROMPT_IDS, eager_model, make_checkpoint, rel_error, run_cli
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.compiler.tuning import FORMAT, TuningDB, _space
from ernie_compile.runtime import Session
from ernie_compile.targets import cpu_kernels
from ernie_compile.targets.cpu import CpuTarget


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tune") / "ckpt", DENSE_CONFIGS["mha-bias-hd16"], seed=5)


def _compile(ckpt, out, db, **kw):
    return compile_model(CompileOptions(output=out, model=str(ckpt), tuning_db=db, max_seq_len=64, **kw),
                         log=lambda *_: None)


def _lines(db):
    return [json.loads(line) for line in db.read_text().splitlines()]


def test_tune_then_reuse_without_search(ckpt, tmp_path):
    db = tmp_path / "db.jsonl"
    first = _compile(ckpt, tmp_path / "a", db, tune=True)["tuning"]
    lines = _lines(db)
    assert lines[0] == FORMAT and len(lines) - 1 == first["searched"] > 0
    keys = {json.dumps(r["key"], sort_keys=True) for r in lines[1:]}
    assert all(set(r) == {"key", "params", "seconds"} and r["seconds"] > 0 for r in lines[1:])
    second = _compile(ckpt, tmp_path / "b", db, tune=True)["tuning"]
    assert second["searched"] == 0 and second["reused"] == len(keys)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["tuning"]["db_sha256"] == TuningDB.open(db).sha256()
    # the tuned artifact computes what transformers computes
    with torch.no_grad():
        ref = eager_model(ckpt)(torch.tensor([PROMPT_IDS])).logits[0, -1]
    assert rel_error(Session(tmp_path / "b").forward(PROMPT_IDS), ref) < 1e-4


def test_interrupted_search_resumes(ckpt, tmp_path, monkeypatch):
    from ernie_compile.compiler import tuning

    # the database logic under test does not need real timings: a deterministic stand-in objective
    monkeypatch.setattr(tuning, "measure", lambda tunable, key, p: 1.0 + p["ib"] / 10 + p["jb"] / 100)
    db = tmp_path / "db.jsonl"
    assert _compile(ckpt, tmp_path / "a", db, tune=True, tune_trials=3)["tuning"]["searched"] == 3
    with db.open("a") as f:
        f.write('{"key": {"kernel": "lin')  # a trial cut short by the interruption
    rest = _compile(ckpt, tmp_path / "b", db, tune=True)["tuning"]["searched"]
    lines = db.read_text().splitlines()
    assert lines[4].startswith('{"key": {"kernel": "lin') and len(lines) == 1 + 3 + 1 + rest
    records = [json.loads(line) for line in lines[1:4] + lines[5:]]
    keys = {json.dumps(r["key"], sort_keys=True): r["key"] for r in records}
    tunable = cpu_kernels.TUNABLE["linear"]
    expected = sum(sum(tunable["valid"](k, p) for p in _space(tunable["space"])) for k in keys.values())
    assert len({json.dumps([r["key"], r["params"]], sort_keys=True) for r in records}) == 3 + rest == expected
    assert TuningDB.open(db).best(next(iter(keys.values()))) == {"ib": 2, "jb": 1}  # the stand-in's minimum


def test_every_schedule_in_the_space_computes_the_linear():
    import tvm

    tunable = cpu_kernels.TUNABLE["linear"]
    key = {"shape": [24, 64], "dtype": "float32"}
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((7, 64)).astype(np.float32), rng.standard_normal((24, 64)).astype(np.float32)
    for params in (p for p in _space(tunable["space"]) if tunable["valid"](key, p)):
        lib = tvm.compile(tvm.IRModule({"main": tunable["build"](key, params).with_attr("global_symbol", "main")}),
                          target="llvm")
        y = tvm.runtime.tensor(np.zeros((7, 24), np.float32))
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
        np.testing.assert_allclose(y.numpy(), x @ w.T, rtol=1e-5, atol=1e-5, err_msg=str(params))


def test_bad_database_and_cross_target_tuning_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("hello\n")
    proc = run_cli("ernie_compile.cli", "--tuning-db", str(bad), "-o", str(tmp_path / "o1"), check=False)
    assert proc.returncode == 2 and "not an ernie-compile tuning database" in proc.stderr
    proc = run_cli("ernie_compile.cli", "--tune", "--tuning-db", str(tmp_path / "db.jsonl"), "--target",
                   "cpu:aarch64-linux-android", "-o", str(tmp_path / "o2"), check=False)
    assert proc.returncode == 2 and "--tune measures kernels on this machine" in proc.stderr
    proc = run_cli("ernie_compile.cli", "--tune", "--target", "webgpu", "-o", str(tmp_path / "o3"), check=False)
    assert proc.returncode == 2 and "no kernels with schedule parameters" in proc.stderr
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


@pytest.mark.skipif(CpuTarget.from_spec(None).int8_dot is None, reason="this CPU has no int8 dot")
def test_moe_kernel_knobs_come_from_the_database(tmp_path, monkeypatch):
    """The experts' int8 grouped GEMM (targets/cpu_moe.py) is tuned like the linears: its keys carry
    [E, N, K, top_k] and the quant spec, the best candidate's tokens / prefetch / chunk reach the
    kernel, and the tuned artifact computes what the default one does."""
    from ernie_compile.compiler import tuning
    from ernie_compile.targets import cpu_moe

    folder = make_checkpoint(tmp_path / "ckpt", dict(MOE_CONFIGS["e8-k2-s1-i2-st1"], moe_intermediate_size=64),
                             moe=True)
    default = _compile(folder, tmp_path / "default", None, bits="4")
    assert "tuning" not in default or default["tuning"] is None
    # a deterministic stand-in objective: the smallest parameters win (not the defaults)
    monkeypatch.setattr(tuning, "measure", lambda tunable, key, p: 1.0 + sum(p.values()) / 1e4)
    built = []
    real = cpu_kernels.group_gemm_q_vnni
    monkeypatch.setattr(cpu_kernels, "group_gemm_q_vnni", lambda *a, **kw: built.append(kw) or real(*a, **kw))
    db = tmp_path / "db.jsonl"
    _compile(folder, tmp_path / "tuned", db, bits="4", tune=True)
    moe = [r["key"] for r in _lines(db)[1:] if r["key"]["kernel"] == "moe_group_gemm_q_vnni"]
    assert moe and {k["shape"][-1] for k in moe} == {2} and {k["quant"]["layout"] for k in moe} == {"vnni16"}
    assert {k["shape"][0] for k in moe} == {8}  # experts
    assert built and all((kw["tokens"], kw["prefetch"], kw["chunk"]) == (2, 0, 4) for kw in built)
    assert cpu_moe.TUNABLE["moe_group_gemm_q_vnni"]["default"] != {"tokens": 2, "prefetch": 0, "chunk": 4}
    a, b = Session(tmp_path / "default"), Session(tmp_path / "tuned")
    assert rel_error(b.forward(PROMPT_IDS), torch.from_numpy(a.forward(PROMPT_IDS))) < 1e-5


def _crash_on_ib6(build):
    """A build that kills its process for ib = 6, as an LLVM abort does."""
    import os

    return lambda key, p: os.abort() if p["ib"] == 6 else build(key, p)


def test_a_candidate_that_kills_its_process_costs_only_itself(tmp_path):
    """Measurements run in a child process: a candidate whose build aborts is recorded as failed
    (seconds null, its error) and never chosen; the others are measured by the restarted child and
    the best comes from them; a second search retries none."""
    from ernie_compile.compiler.tuning import Tuner

    tunable = dict(cpu_kernels.TUNABLE["linear"], space={"ib": [4, 6], "jb": [1]})
    tunable["build"] = _crash_on_ib6(tunable["build"])
    key = {"target": str(CpuTarget.from_spec(None).tvm), "kernel": "linear", "shape": [32, 64],
           "dtype": "float32", "quant": None}
    db, logs = tmp_path / "db.jsonl", []
    tuner = Tuner(TuningDB.open(db), search=True, log=logs.append)
    assert tuner.params(tunable, key) == {"ib": 4, "jb": 1}
    records = {r["params"]["ib"]: r for r in _lines(db)[1:]}
    assert records[6]["seconds"] is None and "died" in records[6]["error"]
    assert records[4]["seconds"] > 0 and "error" not in records[4]
    assert tuner.stats["searched"] == 2 and tuner.stats["failed"] == 1
    assert any("failed" in line and '"ib":6' in line for line in logs)
    again = Tuner(TuningDB.open(db), search=True, log=logs.append)
    assert again.params(tunable, key) == {"ib": 4, "jb": 1} and again.stats["searched"] == 0
