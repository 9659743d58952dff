"""Transformers model → torch.export programs sharing one set of weights.

prefill(input_ids [1, T], position_ids [1, T]) → logits of the last token [1, V], T symbolic in
[1, max_seq_len]; decode(input_ids [1, 1], position_ids [1, 1]) → [1, V]; with `batch`, also
batch(input_ids [1, T], position_ids [1, T], logit_rows [R]) → logits of the tokens at those rows
[R, V]: the tokens of several sequences concatenated (a ragged batch; the KV cache keeps their
attention apart), the logits of each sequence's last token (the server's continuous batching,
ernie_compile/serve/). The KV cache is not a
tensor input: attention goes through `ernie.kv_attention` (passes/route_attention_to_kv_cache.py),
which lowering binds to TVM's paged KV cache. Positions are inputs, so nothing in the graph derives
them from shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InternalError


class _Step(torch.nn.Module):
    """One forward step returning only the last position's logits (what generation needs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids):
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1]  # [1, V]


class _BatchStep(torch.nn.Module):
    """One forward step over a ragged batch returning the logits of the tokens at `logit_rows`;
    transformers' `logits_to_keep` takes the rows as a tensor and applies lm_head to them alone."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, logit_rows):
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=logit_rows)
        return out.logits[0]  # [R, V]


@dataclass
class Captured:
    prefill: torch.export.ExportedProgram
    decode: torch.export.ExportedProgram
    batch: torch.export.ExportedProgram | None  # None: not captured (the target does not batch)
    # graph input name → transformers state-dict name, for every lifted parameter
    param_names: dict[str, str]


def parameter_names(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Graph input name → transformers state-dict name, for every lifted parameter."""
    prefix = "model."
    return {s.arg.name: s.target.removeprefix(prefix) for s in ep.graph_signature.input_specs
            if s.kind.name == "PARAMETER"}


def capture(model, max_seq_len: int, passes: list, ids_dtype: str = "int64", batch: bool = False) -> Captured:
    """`passes` (passes.select_passes) first route the model's modules through our ops. Token ids and
    positions are `ids_dtype` (int32 for targets without 64-bit integers: WGSL has none). `batch`:
    capture the batch step too."""
    for p in passes:
        p.install(model).check()
    step = _Step(model).eval()
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    # the example length must lie inside the range, and be 2 or more (export specializes a dimension
    # traced at 1): --max-seq-len 2 and 3 trace at their own length
    example = min(4, max_seq_len)
    ids = torch.zeros(1, example, dtype=getattr(torch, ids_dtype))
    pos = torch.arange(example, dtype=getattr(torch, ids_dtype)).unsqueeze(0)
    with torch.no_grad():
        prefill = torch.export.export(step, (ids, pos), dynamic_shapes={"input_ids": {1: seq},
                                                                        "position_ids": {1: seq}})
        decode = torch.export.export(step, (ids[:, :1], pos[:, :1]))
        batched = None
        if batch and example == 4:  # (a context under 4 tokens is served one sequence per call)
            rows = torch.tensor([1, 3], dtype=getattr(torch, ids_dtype))  # 2 of 4: R and T stay distinct
            batched = torch.export.export(
                _BatchStep(model).eval(), (ids, pos, rows),
                dynamic_shapes={"input_ids": {1: seq}, "position_ids": {1: seq},
                                "logit_rows": {0: torch.export.Dim("rows", min=1, max=max_seq_len)}})
    names = [parameter_names(ep) for ep in (prefill, decode, batched) if ep is not None]
    if any(n != names[0] for n in names):
        raise InternalError("the steps captured different parameter lists")
    return Captured(prefill, decode, batched, names[0])
