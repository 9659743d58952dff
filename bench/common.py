"""Shared by the bench scripts."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from membw import ProbeProcess  # noqa: E402

# Thread settings a bench process may carry (bench_e2e sets OMP_WAIT_POLICY=PASSIVE for torch) are
# not passed on to the measured runtimes: each runs with its own defaults. With PASSIVE inherited,
# llama.cpp's OpenMP threads slept at every sync and its decode halved (90 -> 41-47 tok/s here).
THREAD_SETTINGS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "TVM_NUM_THREADS", "GOMP_SPINCOUNT")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in THREAD_SETTINGS}


RUN = """
import json, statistics, sys
sys.path[:0] = [{root!r}, {bench!r}]
from ernie_compile.runtime import Session
from ernie_compile.runtime.artifact import load_manifest
from ernie_compile.runtime.tvm_engine import import_runtime_only_tvm
from membw import ProbeProcess
manifest = load_manifest({folder!r})
import_runtime_only_tvm(manifest)  # as ernie-run does
s = Session(manifest)
probe = ProbeProcess()
prompt = {prompt!r}
pre, dec, bw, bound = [], [], [], []
for rep in range({reps} + 1):
    before = probe.probe()
    r = s.generate(prompt, {decode} + 1, stop_at_eos=False)
    after = probe.probe()
    if rep:  # the first is a warm-up
        pre.append(r.prefill_tok_s); dec.append(r.decode_tok_s); bw += [before, after]
        bound.append((before + after) / 2 * 1e9 / {weight_bytes} if {weight_bytes} else None)
probe.close()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked (large) parent
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
out = {{"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
       "peak_rss_MiB": int(hwm) / 1024, "read_GBps": statistics.median(bw)}}
if {weight_bytes}:  # each decode against the bandwidth read right before and after it
    out["bound_tok_s"] = statistics.median(bound)
    out["of_bound"] = statistics.median(d / b for d, b in zip(dec, bound))
print(json.dumps(out))
"""


def run_artifact(folder: Path, prompt: list[int], decode: int, reps: int, weight_bytes: int | None = None) -> dict:
    """Speeds (medians of `reps` after a warm-up) and peak RSS of a fresh runtime process, which is
    what a user's process would hold. With `weight_bytes` (read per decode step): the decode's
    bandwidth bound and the share of it reached, each decode set against the read bandwidth measured
    right before and after it (bench/membw.py), medians over the reps."""
    code = RUN.format(root=str(ROOT), bench=str(ROOT / "bench"), folder=str(folder), prompt=prompt, reps=reps,
                      decode=decode, weight_bytes=weight_bytes or 0)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env())
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llamacpp_peer(model, folder: Path, prompt: int, decode: int) -> dict | None:
    """llama.cpp Q4_0 on `model`'s weights (../shared/tools/llamacpp_peer.sh, 2 threads): its JSON
    line (size_bytes, prefill/decode tok/s medians) and the read bandwidth around its timed runs
    (read_GBps), or None after printing why it failed."""
    from ernie_compile.compiler.load import ASSETS

    model.save_pretrained(folder)
    shutil.copyfile(ASSETS / "tokenizer.model", folder / "tokenizer.model")
    script = ROOT.parent / "shared" / "tools" / "llamacpp_peer.sh"
    subprocess.run(["bash", str(script), str(folder), "Q4_0", "1", "1", "1"], capture_output=True,
                   env=clean_env())  # build, convert
    probe = ProbeProcess()
    before = probe.probe()
    peer = subprocess.run(["bash", str(script), str(folder), "Q4_0", "2", str(prompt), str(decode)],
                          capture_output=True, text=True, env=clean_env())
    after = probe.probe()
    probe.close()
    # the script keys its GGUF files by the folder's path, a temporary one here: ~1 GB each, not reused
    key = hashlib.sha1(f"{folder.resolve()}\n".encode()).hexdigest()[:12]
    peer_dir = Path(os.environ.get("LLAMA_PEER", Path(tempfile.gettempdir()) / "llamacpp-peer"))
    for gguf in peer_dir.glob(f"{key}-*.gguf"):
        gguf.unlink()
    if peer.returncode:
        print(f"llama.cpp peer failed: {peer.stderr[-500:]}", file=sys.stderr)
        return None
    out = json.loads(peer.stdout.strip().splitlines()[-1])
    out["read_GBps"] = (before + after) / 2  # its 5 timed runs lie between the two probes
    return out


def decode_weight_bytes(folder: Path) -> int:
    """Bytes of weights a decode step reads: every stored tensor (the embedding rows it skips are
    offset by the tied lm_head reading that table in full), the routed experts' stacked tensors at
    top_k / num_experts of their size (only the chosen experts are read), and not the offsets of
    symmetric vnni16 weights, which the int8 kernels derive from the scale (targets/cpu_vnni.py)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    config = manifest["model"]["config"]
    active = config["moe_k"] / config["moe_num_experts"] if config.get("moe_num_experts") else 1.0
    quantized = manifest["weights"].get("quantized") or {}
    unread = {f"{name}.qmin" for name, q in quantized.items() if q["layout"] == "vnni16" and q["symmetric"]}
    with open(folder / manifest["weights"]["file"], "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    total = 0.0
    for name, meta in header.items():
        if name == "__metadata__" or name in unread:
            continue
        begin, end = meta["data_offsets"]
        total += (end - begin) * (active if ".experts." in name and "shared_experts" not in name else 1.0)
    return int(total)


def kv_bytes_per_token(config: dict, elem_bytes: int) -> int:
    """KV-cache bytes a decode step reads per token of context: layers × (k, v) × KV heads × head_dim
    × element size (ours: the artifact's dtype; llama.cpp: f16, its default)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * elem_bytes


def decode_bytes(folder: Path, context: float) -> int:
    """Bytes a decode step of the artifact in `folder` reads at `context` tokens of context: its
    weights (decode_weight_bytes) and its KV cache."""
    manifest = json.loads((folder / "manifest.json").read_text())
    elem = np.dtype(manifest["dtype"]).itemsize
    return decode_weight_bytes(folder) + int(kv_bytes_per_token(manifest["model"]["config"], elem) * context)


def print_table(rows: list[dict]) -> None:
    """Rows of dicts as one markdown table: every key a column, floats to 3 significant digits."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")
