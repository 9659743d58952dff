"""CUDA artifacts, inspected here (no GPU attached): every kernel scheduled, SASS for each requested
architecture in the fatbin, built from the very source the library embeds, and a runtime that refuses
cleanly without a GPU. Running them is bench/device_check.sh's job, on a machine with one."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import run_cli
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.targets.cuda import fatbin_entries

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
ARCHS = "sm_80,sm_90"


@pytest.fixture(scope="module")
def dense_fp16(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "tiny-fp16"
    compile_model(CompileOptions(output=out, target=f"cuda:{ARCHS}"), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def moe_q4(tmp_path_factory, moe_checkpoints):
    out = tmp_path_factory.mktemp("cuda-moe") / "out"
    compile_model(CompileOptions(output=out, model=str(moe_checkpoints["e8-k2-s1-i2-st1"]), target="cuda:sm_90",
                                 bits="4"), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def vl_q4(tmp_path_factory):
    """The embedded VL model (vision tower, both expert kinds, M-RoPE), 4-bit text, float16."""
    out = tmp_path_factory.mktemp("cuda-vl") / "out"
    compile_model(CompileOptions(output=out, model="ernie-vl-tiny", target="cuda:sm_90", bits="4", max_seq_len=256),
                  log=lambda *_: None)
    return out


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("artifact", ["dense_fp16", "moe_q4", "vl_q4"])
def test_every_kernel_is_scheduled_and_compiled_for_each_arch(artifact, request):
    folder = request.getfixturevalue(artifact)
    m = _manifest(folder)
    kernels = m["kernels"]
    assert kernels["unscheduled"] == 0 and kernels["count"] == len(kernels["names"]) > 20
    archs = [int(a[3:]) for a in kernels["archs"]]
    entries = fatbin_entries((folder / kernels["fatbin"]).read_bytes())
    assert sorted(sm for kind, sm in entries if kind == "sass") == archs
    assert [sm for kind, sm in entries if kind == "ptx"] == [archs[-1]]  # newer GPUs JIT it
    source = (folder / kernels["source"]).read_text()
    # each scheduled kernel is a __global__ function of the source the fatbin was built from …
    globals_ = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source))
    assert {re.sub(r"_kernel(_\d+)?$", "", g) for g in globals_} == set(kernels["names"])  # sorts have several
    # … and that source is what the library embeds (the runtime serves the fatbin for it)
    assert source.encode() in (folder / m["library"]).read_bytes()


def test_dense_defaults_to_float16(dense_fp16):
    from safetensors import safe_open

    m = _manifest(dense_fp16)
    assert m["dtype"] == "float16" and m["options"]["dtype"] == "float16"
    with safe_open(str(dense_fp16 / m["weights"]["file"]), "np") as f:
        assert {f.get_tensor(k).dtype.name for k in f.keys()} == {"float16"}


@pytest.mark.parametrize("artifact", ["dense_fp16", "moe_q4"])
def test_text_artifacts_carry_the_servers_batch_step(artifact, request):
    """ernie-serve batches a CUDA artifact's sequences through its compiled `batch` step (the VL
    model is served one sequence per call on every target)."""
    assert _manifest(request.getfixturevalue(artifact))["functions"]["batch"] == "batch"


def test_moe_q4_uses_our_gpu_kernels(moe_q4):
    names = _manifest(moe_q4)["kernels"]["names"]
    assert any(n.startswith("moe_group_gemm_q4") for n in names)
    assert any(n.startswith("linear_q4") and n.endswith("_m1") for n in names)  # decode GEMVs
    assert any(n.startswith("take_q4") for n in names)


def test_runtime_serves_the_prebuilt_fatbin_and_refuses_other_source(dense_fp16):
    """Only while the library loads: afterwards the process's own hook answers again (on an H200,
    the second artifact compiled in one process was refused as 'source does not match')."""
    import tvm_ffi

    from ernie_compile.runtime.tvm_engine import _serve_prebuilt_cuda

    name = "tvm_callback_cuda_compile"
    m = _manifest(dense_fp16)
    source = (dense_fp16 / m["kernels"]["source"]).read_text()
    before = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, lambda code, *_: bytearray(b"theirs"), override=True)
    try:
        with _serve_prebuilt_cuda(dense_fp16 / m["kernels"]["fatbin"], m["kernels"]["source_sha256"]):
            hook = tvm_ffi.get_global_func(name)
            assert bytes(hook(source)) == (dense_fp16 / m["kernels"]["fatbin"]).read_bytes()
            with pytest.raises(Exception, match="does not match"):
                hook(source + "\n// edited")
        assert bytes(tvm_ffi.get_global_func(name)(source + "\n// edited")) == b"theirs"
    finally:
        if before is not None:
            tvm_ffi.register_global_func(name, before, override=True)
        else:
            tvm_ffi.registry.remove_global_func(name)


def test_run_without_a_gpu_is_a_clear_error(dense_fp16):
    proc = run_cli("ernie_compile.runtime.cli", str(dense_fp16), "--prompt-ids", "1,2,3", check=False)
    assert proc.returncode == 2 and "no cuda device" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--target", "cuda:sm_8"], "architectures look like"),
    (["--target", "cpu", "--cuda-arch", "sm_80"], "--cuda-arch applies to --target cuda"),
    (["--target", "cpu", "--dtype", "float16"], "computes in float32"),
    (["--target", "opencl"], "targets: cpu, cuda, metal, webgpu, vulkan"),
    (["--target", "webgpu:f16"], "takes no detail"),
    (["--target", "webgpu", "--no-fuse-attention"], "attends through its own KV-cache kernels"),
])
def test_bad_target_options_are_one_line_errors(args, message, tmp_path):
    proc = run_cli("ernie_compile.cli", *args, "-o", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
