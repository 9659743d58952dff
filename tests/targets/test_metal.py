"""Metal artifacts, cross-built here for macOS and iOS and inspected: every kernel scheduled and
present in the MSL, the MSL parses (against a shim: gross errors only), the host objects are arm64
Mach-O. Compiling the MSL with Apple's compiler and running it needs a Mac (bench/device_check.sh)."""
from __future__ import annotations

import json
import re
import shutil
import struct
import tarfile

import pytest

from conftest import run_cli
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.targets.metal import msl_syntax_check

MACHO_64, CPU_ARM64 = 0xFEEDFACF, 0x0100000C


@pytest.fixture(scope="module")
def dense_macos(tmp_path_factory):
    out = tmp_path_factory.mktemp("metal") / "tiny"
    compile_model(CompileOptions(output=out, target="metal"), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def moe_ios_q4(tmp_path_factory, moe_checkpoints):
    out = tmp_path_factory.mktemp("metal-moe") / "out"
    compile_model(CompileOptions(output=out, model=str(moe_checkpoints["e8-k2-s1-i2-st1"]), target="metal:ios",
                                 bits="4"), log=lambda *_: None)
    return out


@pytest.mark.parametrize("artifact, triple", [("dense_macos", "arm64-apple-macos"), ("moe_ios_q4", "arm64-apple-ios")])
def test_kernels_scheduled_in_msl_and_host_objects_arm64(artifact, triple, request):
    folder = request.getfixturevalue(artifact)
    m = json.loads((folder / "manifest.json").read_text())
    kernels = m["kernels"]
    assert kernels["unscheduled"] == 0 and kernels["host_triple"] == triple
    msl = (folder / kernels["msl"]).read_text()
    entry_points = set(re.findall(r"^kernel void (\w+)\(", msl, re.M))
    assert {re.sub(r"_kernel(_\d+)?$", "", k) for k in entry_points} == set(kernels["names"])
    if shutil.which("g++"):
        assert kernels["msl_syntax_check"] == "passed"
    with tarfile.open(folder / m["library"]) as tar:
        objects = [tar.extractfile(member).read() for member in tar.getmembers() if member.name.endswith(".o")]
    assert objects and all(struct.unpack_from("<II", o) == (MACHO_64, CPU_ARM64) for o in objects)
    # the library carries, kernel by kernel, the MSL that the Metal framework compiles at load time
    blob = b"".join(objects)
    assert all(unit.strip().encode() in blob for unit in re.split(r"(?m)^// Function: \w+\n", msl) if unit.strip())


def test_moe_q4_uses_our_gpu_kernels(moe_ios_q4):
    names = json.loads((moe_ios_q4 / "manifest.json").read_text())["kernels"]["names"]
    assert any(n.startswith("moe_group_gemm_q4") for n in names)
    assert any(n.startswith("linear_q4") and n.endswith("_m1") for n in names)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_msl_syntax_check_can_fail():
    good = "// Function: f\n#include <metal_stdlib>\nusing namespace metal;\nkernel void f(device float* x [[ buffer(0) ]]) { x[0] = exp(x[1]); }\n"
    assert msl_syntax_check(good) == "passed"
    assert msl_syntax_check(good.replace("exp(x[1])", "undeclared_fn(x[1])")).startswith("failed: ")


def test_run_on_linux_is_a_clear_error(dense_macos):
    proc = run_cli("ernie_compile.runtime.cli", str(dense_macos), "--prompt-ids", "1,2", check=False)
    assert proc.returncode == 2 and "metal" in proc.stderr and "Traceback" not in proc.stderr
