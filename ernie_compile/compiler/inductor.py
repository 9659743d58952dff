"""The inductor backend (`--backend inductor`): the in-house baseline for the TVM route.

transformers' own model, unchanged (its sdpa attention, its grouped_mm experts), with transformers'
own `StaticCache`, exported by torch.export and compiled by AOTInductor:

    capture  CachedStep(input_ids [1, T], position_ids [1, T], kv) → logits of the last token [1, V]
             kv = [k_0, v_0, k_1, v_1, …], each [1, H_kv, max_seq_len, D], written in place by the
             cache's layers at the given positions; prefill with T symbolic, decode with T = 1
    build    torch._inductor.aoti_compile_and_package → prefill.pt2, decode.pt2, both without weights
    package  weights.safetensors, each tensor once; the runtime hands the same tensors to both programs

Why the cache is an input rather than a buffer: two AOTInductor programs each keep their own copy of
a mutated buffer, so prefill's writes would never reach decode. As inputs, the runtime owns the cache
(runtime/inductor_engine.py) and both programs write into the same tensors. transformers'
`TorchExportableModuleWithStaticCache` holds it as buffers and returns every position's logits, so
this wrapper is its few lines again with those two differences.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InternalError, UserError

PROGRAMS = {"prefill": "prefill.pt2", "decode": "decode.pt2"}
# Custom-op namespace → the module whose import registers its ops. AOTInductor calls such an op back
# in Python, so the runtime imports the module first. transformers' grouped_mm experts (the MoE
# default) export as `transformers::grouped_mm_fallback` for float32: a loop of one matmul per expert
# over the tokens sorted by expert, so decode reads only the chosen experts.
PYTHON_OPS = {"transformers": "transformers.integrations.moe"}


def check_options(opts) -> None:
    """What the inductor backend does not do, refused before anything is loaded."""
    if opts.target != "cpu":
        raise UserError(f"--backend inductor --target {opts.target}: the inductor backend builds for this "
                        "machine's CPU only (--target cpu); other targets need --backend tvm")
    if opts.bits is not None or opts.embed_bits is not None:
        raise UserError("--backend inductor: weight quantization (--bits, --embed-bits) needs --backend tvm; "
                        "the inductor backend compiles float32 weights only")
    if opts.dtype not in (None, "float32"):
        raise UserError(f"--backend inductor --dtype {opts.dtype}: the inductor backend compiles float32 only")
    if opts.tune or opts.tuning_db is not None:
        raise UserError("--tune / --tuning-db tune the TVM kernels: they apply to --backend tvm only")
    if not opts.fuse_attention:
        raise UserError("--no-fuse-attention applies to --backend tvm only (the inductor backend runs "
                        "transformers' own attention)")


class CachedStep(torch.nn.Module):
    """One forward step of transformers' model over a StaticCache whose tensors are the `kv` input."""

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        from transformers import StaticCache

        config = model.config
        self.model = model
        self.cache = StaticCache(config=config, max_cache_len=max_seq_len)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(1, config.num_key_value_heads, head_dim, torch.float32, "cpu")

    def example_kv(self) -> list[torch.Tensor]:
        return [t for layer in self.cache.layers for t in (layer.keys, layer.values)]

    def forward(self, input_ids, position_ids, kv: list[torch.Tensor]):
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = kv[2 * i], kv[2 * i + 1]
            # the layer writes at cumulative_length + [0, T) and advances it: start at the first position
            layer.cumulative_length = position_ids[0, 0].clone()
        out = self.model(input_ids=input_ids, position_ids=position_ids, cache=self.cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]  # [1, V]


@dataclass
class Captured:
    prefill: torch.export.ExportedProgram
    decode: torch.export.ExportedProgram
    kv_shapes: list[list[int]]  # one per kv tensor, in input order
    python_ops: dict[str, str]  # custom op → the module the runtime imports to register it


def _python_ops(*programs: torch.export.ExportedProgram) -> dict[str, str]:
    ops = {}
    for ep in programs:
        for node in ep.graph.nodes:
            op = node.target
            if isinstance(op, torch._ops.OpOverload) and op.namespace not in ("aten", "prims"):
                if op.namespace not in PYTHON_OPS:
                    raise InternalError(f"{op.name()} in the exported program: no module known to register it "
                                        "(add its namespace to inductor.PYTHON_OPS)")
                ops[op.name()] = PYTHON_OPS[op.namespace]
    return dict(sorted(ops.items()))


def capture(model, max_seq_len: int) -> Captured:
    step = CachedStep(model, max_seq_len).eval()
    kv = step.example_kv()
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    example = min(4, max_seq_len)  # inside the range, and not 1 (see capture.capture)
    ids = torch.zeros(1, example, dtype=torch.int64)
    pos = torch.arange(example).unsqueeze(0)
    with torch.no_grad():
        prefill = torch.export.export(step, (ids, pos, kv), dynamic_shapes={
            "input_ids": {1: seq}, "position_ids": {1: seq}, "kv": [None] * len(kv)})
        decode = torch.export.export(step, (ids[:, :1], pos[:, :1], kv))
    return Captured(prefill, decode, [list(t.shape) for t in kv], _python_ops(prefill, decode))


def build(captured: Captured, folder: Path) -> list[str]:
    """AOTInductor-compile both programs into `folder`, weights left out; returns the names of the
    constants (weights, buffers) the runtime must hand them."""
    import torch._inductor

    configs = {"aot_inductor.package_constants_in_so": False}
    values, fqns = {}, set()
    for name, file in PROGRAMS.items():
        ep = getattr(captured, name)
        with warnings.catch_warnings():  # torch's own pytree deprecation, raised inside the packager
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            path = torch._inductor.aoti_compile_and_package(ep, package_path=str(folder / file),
                                                            inductor_configs=configs)
        values.update(ep.state_dict)
        values.update(ep.constants)
        fqns.update(torch._inductor.aoti_load_package(path).get_constant_fqns())
    missing = sorted(fqns - values.keys())
    if missing:
        raise InternalError(f"AOTInductor constants with no value in the exported program: {missing[:5]}")
    return sorted(fqns)


def write_weights(captured: Captured, constants: list[str], path: Path) -> dict[str, str]:
    """Save every constant the programs take, each storage once, under transformers' names; returns
    constant name → stored name."""
    from safetensors.torch import save_file

    values = {**captured.prefill.state_dict, **captured.prefill.constants,
              **captured.decode.state_dict, **captured.decode.constants}
    stored, by_storage, mapping = {}, {}, {}
    for fqn in constants:
        t = values[fqn]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in by_storage:
            name = fqn.removeprefix("model.")
            by_storage[key] = name
            stored[name] = t.detach().contiguous().clone()
        mapping[fqn] = by_storage[key]
    save_file(stored, str(path))
    return mapping
