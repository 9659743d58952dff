"""The model exactly as the GPU targets lower it — the GPU kernels' compute definitions, float16,
dlight-free — built for the CPU and checked against transformers eager.

No GPU is attached here, so this is what proves the GPU path's numerics: the schedules dlight and
our GEMV schedule apply afterwards are TVM's semantics-preserving loop transformations, checked on a
real GPU by bench/device_check.sh."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from conftest import PROMPT_IDS, batch_vs_single, eager_greedy, eager_model, rel_error
from test_quantize import fake_quant
from ernie_compile import targets
from ernie_compile.compiler.options import CompileOptions
from ernie_compile.compiler.pipeline import compile_model
from ernie_compile.quant import QuantPolicy
from ernie_compile.runtime import Session
from ernie_compile.targets import cpu_kernels, gpu_kernels
from ernie_compile.targets.cpu import CpuTarget

# GPU kernels as compute definitions (group GEMMs unscheduled), TVM's CPU KV cache with our CPU
# attention kernels (the GPU build uses TVM's GPU ones)
_KERNELS = types.SimpleNamespace(
    linear_q=gpu_kernels.linear_q, take_q=gpu_kernels.take_q,
    group_gemm=lambda *a, **k: gpu_kernels.group_gemm(*a, **k, schedule=False),
    group_gemm_q=lambda *a, **k: gpu_kernels.group_gemm_q(*a, **k, schedule=False),
    kv_cache_overrides=cpu_kernels.kv_cache_overrides)


@dataclasses.dataclass(frozen=True)
class GpuGraphOnCpu(CpuTarget):
    def passes(self, mod, tuner):
        return mod, []  # linears stay Relax matmuls, as on the GPU targets


def _gpu_graph_on_cpu(detail):
    """The host CPU target with the GPU targets' declared facts and kernels (targets/cuda.py)."""
    cpu, cuda = CpuTarget.from_spec(None), targets.get_target("cuda")
    fields = {f.name: getattr(cpu, f.name) for f in dataclasses.fields(cpu)}
    fields.update(spec="gpu-graph-on-cpu", dtypes=cuda.dtypes, scale_dtypes=cuda.scale_dtypes, kernels=_KERNELS,
                  quant_layouts=cuda.quant_layouts, static_m=cuda.static_m, int8_dot=None, int8_weight_bits=(),
                  native_ops=cuda.native_ops, tunable=())
    return GpuGraphOnCpu(**fields)


@pytest.fixture(autouse=True)
def _register(monkeypatch):
    monkeypatch.setitem(targets.TARGETS, "gpu-graph-on-cpu", _gpu_graph_on_cpu)


CASES = {  # name: (checkpoint fixture, config, dtype, bits, logits tolerance)
    "dense-fp32": ("checkpoints", "gqa-tied-hd48", "float32", None, 1e-4),
    "dense-fp16": ("checkpoints", "gqa-tied-hd48", "float16", None, 2e-2),
    "moe-fp32-q4": ("moe_checkpoints", "e8-k2-s1-i2-st1", "float32", "4", 1e-4),
    "moe-fp16-q4": ("moe_checkpoints", "e8-k3-bias", "float16", "4", 2e-2),
}


@pytest.mark.parametrize("case", CASES)
def test_gpu_graph_matches_eager(case, tmp_path, request):
    fixture, config, dtype, bits, tol = CASES[case]
    folder = request.getfixturevalue(fixture)[config]
    moe = fixture == "moe_checkpoints"
    out = tmp_path / "out"
    report = compile_model(CompileOptions(output=out, model=str(folder), target="gpu-graph-on-cpu", dtype=dtype,
                                          bits=bits, max_seq_len=64), log=lambda *_: None)
    if moe:
        assert report["passes"]["fuse_moe_routing"]["matched"] > 0
    if dtype == "float32":
        model = eager_model(folder)
    else:  # transformers' own float16 load (it keeps the MoE router in float32)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                     attn_implementation="eager").eval()
        model.generation_config.eos_token_id = None
    if bits:  # the fake-quant reference: transformers eager on the dequantized weights, quantized from
        # the checkpoint's own (float32) values, as the compiler reads them, then held in the model's dtype
        quantized = fake_quant(eager_model(folder), QuantPolicy.parse(bits)).state_dict()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(quantized[name].to(p.dtype))
    session = Session(out)
    with torch.no_grad():
        err = rel_error(session.forward(PROMPT_IDS), model(torch.tensor([PROMPT_IDS])).logits[0, -1])
    assert err < tol, f"{case}: prefill logits off by {err:.2e} (tolerance {tol})"
    assert session.generate(PROMPT_IDS, 12, stop_at_eos=False).tokens == eager_greedy(model, PROMPT_IDS, 12)
    # the batch step (continuous batching; the CUDA target compiles it) against single sequences:
    # ragged prompts of 3 lengths prefilled together, then decode steps together
    err = batch_vs_single(out)
    assert err < tol, f"{case}: batch step off single sequences by {err:.2e} (tolerance {tol})"
