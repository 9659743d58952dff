"""The browser runtime (ernie_compile/web) executes a WebGPU artifact exactly as docs/webgpu-artifact.md says.

No compiler here: the test writes a tiny artifact by hand — four WGSL kernels in TVM's calling
convention (storage buffers, then a PODArgs uniform of scalars + packGridDimX), one weight shard,
plan.json, manifest.json with sha256s — runs index.html in headless Chromium (SwiftShader WebGPU) and
compares its logits and greedy tokens with numpy. The toy model:

    x = embed[ids]                          # [T, D]   kernel embed      (1-D grid from an expression)
    kv[positions] = x                       # [S, D]   kernel kv_write   (grid in y: one row per token)
    h = Σ_{p<L} (p % 5 − 2) · kv[p]         # [D]      kernel context    (L = last position + 1)
    logits = lm_head @ h + T · (v % 7)      # [V]      kernel logits     (V = 70001 workgroups: folded into z)

All values are small integers, so float32 (and float16) arithmetic is exact and ties break alike.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from browser import chromium_available, run_page
from ernie_compile.runtime.artifact import FORMAT_VERSION

pytestmark = pytest.mark.skipif(chromium_available() is not None, reason=str(chromium_available()))

WEB = Path(__file__).resolve().parents[1] / "ernie_compile" / "web"
V, D, MAX_SEQ = 70001, 8, 32  # V ≥ 65536 workgroups in x for the logits kernel
PROMPT, NEW = [5, 69999, 123, 4096, 5], 8

HEADER = """\
@compute @workgroup_size({wg})
fn {name}(
  @builtin(workgroup_id) blockIdx : vec3<u32>,
  @builtin(num_workgroups) gridDim : vec3<u32>,
  @builtin(local_invocation_id) threadIdx : vec3<u32>
) {{
  if (blockIdx.z * gridDim.x + blockIdx.x > podArgs.packGridDimX) {{ return; }}
  let bx : i32 = i32(blockIdx.z * gridDim.x + blockIdx.x);
"""

KERNELS = {
    "embed": ("64, 1, 1", """
@group(0) @binding(0) var<storage, read> input_ids_ptr : array<i32>;
@group(0) @binding(1) var<storage, read> embed_ptr : array<f32>;
@group(0) @binding(2) var<storage, read_write> x_ptr : array<f32>;
struct PODArgs { T: i32, packGridDimX: u32 }
@group(0) @binding(3) var<uniform> podArgs : PODArgs;
""", """
  let i : i32 = bx * 64i + i32(threadIdx.x);
  if (i < podArgs.T * 8i) { x_ptr[i] = embed_ptr[input_ids_ptr[i / 8i] * 8i + i % 8i]; }
}
"""),
    "kv_write": ("8, 1, 1", """
@group(0) @binding(0) var<storage, read> position_ids_ptr : array<i32>;
@group(0) @binding(1) var<storage, read> x_ptr : array<f32>;
@group(0) @binding(2) var<storage, read_write> kv_ptr : array<f32>;
struct PODArgs { T: i32, packGridDimX: u32 }
@group(0) @binding(3) var<uniform> podArgs : PODArgs;
""", """
  let t : i32 = i32(blockIdx.y);
  let d : i32 = i32(threadIdx.x);
  if (t < podArgs.T) { kv_ptr[position_ids_ptr[t] * 8i + d] = x_ptr[t * 8i + d]; }
}
"""),
    "context": ("8, 1, 1", """
@group(0) @binding(0) var<storage, read> position_ids_ptr : array<i32>;
@group(0) @binding(1) var<storage, read> kv_ptr : array<f32>;
@group(0) @binding(2) var<storage, read_write> h_ptr : array<f32>;
struct PODArgs { T: i32, packGridDimX: u32 }
@group(0) @binding(3) var<uniform> podArgs : PODArgs;
""", """
  let d : i32 = i32(threadIdx.x);
  let L : i32 = position_ids_ptr[podArgs.T - 1i] + 1i;
  var acc : f32 = 0.0f;
  for (var p : i32 = 0i; p < L; p++) { acc += f32(p % 5i - 2i) * kv_ptr[p * 8i + d]; }
  h_ptr[d] = acc;
}
"""),
    "logits": ("1, 1, 1", """
@group(0) @binding(0) var<storage, read> lm_head_ptr : array<f32>;
@group(0) @binding(1) var<storage, read> h_ptr : array<f32>;
@group(0) @binding(2) var<storage, read_write> logits_ptr : array<f32>;
struct PODArgs { V: u32, S: f32, packGridDimX: u32 }
@group(0) @binding(3) var<uniform> podArgs : PODArgs;
""", """
  if (u32(bx) < podArgs.V) {
    var acc : f32 = podArgs.S * f32(bx % 7i);
    for (var d : i32 = 0i; d < 8i; d++) { acc += lm_head_ptr[bx * 8i + d] * h_ptr[d]; }
    logits_ptr[bx] = acc;
  }
}
"""),
    # float16 logits without the shader-f16 feature (SwiftShader lacks it): two halves per u32.
    "logits_f16": ("1, 1, 1", """
@group(0) @binding(0) var<storage, read> lm_head_ptr : array<f32>;
@group(0) @binding(1) var<storage, read> h_ptr : array<f32>;
@group(0) @binding(2) var<storage, read_write> logits_ptr : array<u32>;
struct PODArgs { V: u32, S: f32, packGridDimX: u32 }
@group(0) @binding(3) var<uniform> podArgs : PODArgs;
""", """
  var pair : vec2<f32> = vec2<f32>(0.0f, 0.0f);
  for (var k : i32 = 0i; k < 2i; k++) {
    let v : i32 = bx * 2i + k;
    if (u32(v) < podArgs.V) {
      var acc : f32 = podArgs.S * f32(v % 7i);
      for (var d : i32 = 0i; d < 8i; d++) { acc += lm_head_ptr[v * 8i + d] * h_ptr[d]; }
      pair[k] = acc;
    }
  }
  logits_ptr[bx] = pack2x16float(pair);
}
"""),
}
ACCESS = ["read", "read", "read_write"]


def wgsl(name: str) -> str:
    wg, decls, body = KERNELS[name]
    return decls.lstrip() + "\n" + HEADER.format(wg=wg, name=name) + body.lstrip("\n")


def launches(T, logits_kernel: str) -> list[dict]:
    """One call's launch list; T is "T" (prefill, an expression variable) or 1 (decode)."""
    wide = logits_kernel == "logits"
    return [
        {"kernel": "embed", "buffers": [6, 0, 3], "scalars": [T],
         "grid": [["floordiv", ["add", ["mul", T, D], 63], 64], 1]},
        {"kernel": "kv_write", "buffers": [7, 3, 2], "scalars": [T], "grid": [1, T]},
        {"kernel": "context", "buffers": [7, 2, 4], "scalars": [T], "grid": [1, 1]},
        {"kernel": logits_kernel, "buffers": [1, 4, 5], "scalars": [V, T],
         "grid": [V if wide else ["floordiv", ["add", V, 1], 2], 1]},
    ]


def make_artifact(folder: Path, weights: dict, eos: list[int], dtype: str = "float32", limits: dict | None = None):
    """Write the toy artifact (plan, kernels, shard, web files, manifest) into `folder`."""
    folder.mkdir(parents=True)
    (folder / "kernels").mkdir()
    embed, lm_head = weights["embed"].tobytes(), weights["lm_head"].tobytes()
    lm_offset = -(-len(embed) // 256) * 256
    (folder / "weights-00000.bin").write_bytes(embed + bytes(lm_offset - len(embed)) + lm_head)
    logits_kernel = "logits" if dtype == "float32" else "logits_f16"
    for name in ("embed", "kv_write", "context", logits_kernel):
        (folder / "kernels" / f"{name}.wgsl").write_text(wgsl(name))
    scalar_types = {"embed": ["i32"], "kv_write": ["i32"], "context": ["i32"], logits_kernel: ["u32", "f32"]}
    plan = {
        "format": "ernie-webgpu-plan", "version": 1, "dtype": "float32", "features": [],
        "limits": limits or {"maxStorageBuffersPerShaderStage": 3}, "max_seq_len": MAX_SEQ, "vars": {"T": [1, MAX_SEQ]},
        "buffers": [
            {"kind": "weight", "bytes": len(embed), "shard": 0, "offset": 0, "name": "embed"},
            {"kind": "weight", "bytes": len(lm_head), "shard": 0, "offset": lm_offset, "name": "lm_head"},
            {"kind": "kv", "bytes": MAX_SEQ * D * 4},
            {"kind": "scratch", "bytes": MAX_SEQ * D * 4},
            {"kind": "scratch", "bytes": D * 4},
            {"kind": "scratch", "bytes": V * (4 if dtype == "float32" else 2)},  # float16: not a multiple of 4
            {"kind": "input", "bytes": MAX_SEQ * 4, "name": "input_ids", "dtype": "int32"},
            {"kind": "input", "bytes": MAX_SEQ * 4, "name": "position_ids", "dtype": "int32"},
        ],
        "shards": [{"file": "weights-00000.bin", "bytes": lm_offset + len(lm_head)}],
        "kernels": {name: {"wgsl": f"kernels/{name}.wgsl", "buffers": ACCESS, "scalars": scalar_types[name],
                           "workgroup_size": [int(n) for n in KERNELS[name][0].split(", ")]}
                    for name in scalar_types},
        "functions": {
            name: {"inputs": {"input_ids": 6, "position_ids": 7},
                   "output": {"buffer": 5, "dtype": dtype, "count": V},
                   "launches": launches(T, logits_kernel)}
            for name, T in (("prefill", "T"), ("decode", 1))
        },
    }
    (folder / "plan.json").write_text(json.dumps(plan, indent=1))
    for name in ("index.html", "ernie-webgpu.js"):
        shutil.copyfile(WEB / name, folder / name)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {"format_version": FORMAT_VERSION, "backend": "webgpu", "vocab_size": V,
                "tokenizer": {"files": [], "bos_token_id": None, "eos_token_ids": eos},
                "files": {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def reference(weights: dict, prompt: list[int], n: int, eos: list[int]) -> tuple[np.ndarray, list[int]]:
    """numpy's logits after the prompt and its greedy tokens, mirroring the four kernels."""
    embed, lm_head = weights["embed"].astype(np.float64), weights["lm_head"].astype(np.float64)
    kv = np.zeros((MAX_SEQ, D))

    def step(ids, start):
        kv[start:start + len(ids)] = embed[ids]                      # [T, D]
        L = start + len(ids)
        h = ((np.arange(L) % 5 - 2)[:, None] * kv[:L]).sum(0)        # [D]
        return lm_head @ h + len(ids) * (np.arange(V) % 7)           # [V]

    logits = first = step(prompt, 0)
    tokens = []
    while len(tokens) < n:
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] in eos or len(tokens) == n:
            break
        logits = step([tokens[-1]], len(prompt) + len(tokens) - 1)
    return first, tokens


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return {name: rng.integers(-2, 3, size=(V, D)).astype(np.float32) for name in ("embed", "lm_head")}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_page_matches_numpy(tmp_path, weights, dtype):
    logits, tokens = reference(weights, PROMPT, NEW, eos=[])
    assert len(set(tokens)) > 2, "the toy model should not collapse to one token"
    # An end-of-sequence id that first appears mid-way: generation must stop right after it.
    stop = next(i for i, t in enumerate(tokens) if i >= 3 and t not in tokens[:i])
    eos = [tokens[stop], None]  # a null entry (a config without eos) is ignored
    folder = make_artifact(tmp_path / "art", weights, eos=eos, dtype=dtype)

    result = run_page(folder, {"ids": ",".join(map(str, PROMPT)), "n": NEW, "logits": 1}, timeout=90)
    assert "error" not in result, result["error"]
    assert result["adapter"]
    np.testing.assert_array_equal(np.array(result["logits"]), logits)
    assert result["tokens"] == tokens[:stop + 1]
    assert result["prefill_ms"] > 0 and result["decode_tok_s"] > 0


def test_tampered_file_is_refused(tmp_path, weights):
    folder = make_artifact(tmp_path / "art", weights, eos=[])
    kernel = folder / "kernels" / "context.wgsl"
    kernel.write_text(kernel.read_text().replace("% 5i", "% 3i"))
    result = run_page(folder, {"ids": "1,2", "n": 2}, timeout=60)
    assert "kernels/context.wgsl does not match its sha256" in result.get("error", ""), result


def test_adapter_without_the_plans_limits_is_refused(tmp_path, weights):
    folder = make_artifact(tmp_path / "art", weights, eos=[], limits={"maxStorageBuffersPerShaderStage": 1 << 20})
    result = run_page(folder, {"ids": "1,2", "n": 2}, timeout=60)
    assert "maxStorageBuffersPerShaderStage" in result.get("error", ""), result
    assert "cannot run the artifact" in result["error"]
