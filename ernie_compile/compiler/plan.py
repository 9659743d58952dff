"""`--plan`: what an artifact will cost, known before a byte of it is written.

After lowering (and quantization) every stored tensor's name, shape and dtype is known from the
weight records (passes/weight_records.py), so the artifact's size is exact. The memory to run it is
the weights plus the KV cache at --max-seq-len plus the runtime itself. The compile's peak is an
estimate: what this process holds now (its high-water mark after capture and lowering, which the
real compile also holds) plus the largest working set of packaging, which produces one chunk of one
record at a time (compiler/package.py).
"""
from __future__ import annotations

import math

import numpy as np

from ..passes.weight_records import WeightRecord, stored_tensors
from . import package

RUNTIME_BYTES = 128 << 20  # ernie-run besides weights and cache (a 0.3b 4-bit process: 343 MiB for 216 of weights)
QUANT_TEMPS = 8  # float32-chunk multiples quantize + the error check hold at once (codes, packed words, dequantized copy, …)


def _vm_bytes(field: str) -> int:
    """A VmHWM / VmRSS figure of this process (Linux), in bytes; 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def working_set(record: WeightRecord) -> int:
    """Bytes packaging holds at once for `record`: one chunk of its float value as read (one expert
    of a stacked tensor, else up to CHUNK_BYTES of rows, compiler/package.py) and, quantized, the
    chunk's codes, packing and error check."""
    if len(record.shape) == 3:
        chunk = 4 * math.prod(record.shape[1:])
    else:
        chunk = min(4 * math.prod(record.shape), package.CHUNK_BYTES)
    return chunk * (1 + (QUANT_TEMPS if record.quant else 1))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan(records: list[WeightRecord], config, target, opts) -> dict:
    tensors = stored_tensors(records)
    sizes = [math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in tensors]
    weights = sum(sizes)
    config = config.get_text_config()  # the VL model's KV cache is its text model's
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * opts.max_seq_len * \
        np.dtype(opts.dtype).itemsize
    heaviest = max(records, key=working_set)
    held = _vm_bytes("VmHWM")
    compile_peak = held + working_set(heaviest)
    run = weights + kv + RUNTIME_BYTES
    largest = max(range(len(tensors)), key=sizes.__getitem__)
    lines = [
        f"plan for {target.spec}, {opts.dtype}, max_seq_len {opts.max_seq_len}:",
        f"  weights        {_gib(weights)} in {len(tensors)} tensors "
        f"(largest {tensors[largest].name}: {_gib(sizes[largest])})",
        f"  KV cache       {_gib(kv)} at {opts.max_seq_len} tokens",
        f"  to run         {_gib(run)} (weights + KV cache + ~{_gib(RUNTIME_BYTES)} runtime)",
        f"  to compile     ~{_gib(compile_peak)} peak (this process now {_gib(held)}, the library build not "
        f"counted; + packaging's largest chunk: {heaviest.name}, {_gib(working_set(heaviest))})",
    ]
    return {"weight_bytes": weights, "tensors": len(tensors), "kv_cache_bytes": kv, "run_bytes": run,
            "compile_peak_bytes": compile_peak, "held_bytes": held, "largest_tensor": tensors[largest].name,
            "lines": lines}
