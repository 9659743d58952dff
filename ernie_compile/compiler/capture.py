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


class _MixedStep(torch.nn.Module):
    """The VL model's prefill of a prompt holding images: the model's own embedding of the ids, the
    image features (from `encode_image`) in place of the placeholder tokens, then transformers' forward
    with the prompt's 3-D positions and the tokens' modalities (which pick text or vision experts)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, token_types, features):
        embeds = self.model.get_input_embeddings()(input_ids)  # [1, T, H]
        embeds = torch.ops.ernie.place_image_features(embeds, input_ids, features, self.model.config.image_token_id)
        out = self.model(inputs_embeds=embeds, position_ids=position_ids, moe_mm_token_type_ids=token_types,
                         use_cache=False, logits_to_keep=1)
        return out.logits[:, -1]  # [1, V]


class _VisionStep(torch.nn.Module):
    """The VL model's image encoder for one image: transformers' vision tower and resampler (what its
    get_image_features runs), the patch positions given (transformers' vision_utils take them
    precomputed), one attention segment (passes/route_vision_attention.py)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, patches, vision_positions):
        # [M, merge², C·p²], [M, merge², 2]: grouped by merged token, so that the patch count is a
        # multiple of merge² by shape (a symbolic 4·M is not something TVM can bind from an input)
        inner = self.model.model
        patches = patches.flatten(0, 1)  # [N, C·p²], N = M·merge²
        vision_positions = vision_positions.flatten(0, 1)  # [N, 2]
        segments = torch.zeros(2, dtype=torch.int32)  # cu_seqlens: unread, the attention op takes one image
        hidden = inner.vision_tower(patches, None, position_ids=vision_positions, cu_seqlens=segments)
        return inner.resampler_model(hidden.last_hidden_state, None)  # [N / merge², H]


@dataclass
class Captured:
    prefill: torch.export.ExportedProgram
    decode: torch.export.ExportedProgram
    batch: torch.export.ExportedProgram | None  # None: not captured (the target does not batch)
    # graph input name → transformers state-dict name, for every lifted parameter (of all steps)
    param_names: dict[str, str]
    prefill_mm: torch.export.ExportedProgram | None = None  # the VL model only
    encode_image: torch.export.ExportedProgram | None = None

    def programs(self) -> dict[str, torch.export.ExportedProgram]:
        """Step function name → its program, for the steps captured."""
        return {name: getattr(self, name) for name in ("encode_image", "prefill_mm", "prefill", "batch", "decode")
                if getattr(self, name) is not None}


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
    batch = batch and model.config.model_type != "ernie4_5_vl_moe"  # VL: served one sequence per call
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
        if model.config.model_type == "ernie4_5_vl_moe":
            return _capture_vl(model, max_seq_len, seq, prefill, decode, ids, pos)
    names = [parameter_names(ep) for ep in (prefill, decode, batched) if ep is not None]
    if any(n != names[0] for n in names):
        raise InternalError("the steps captured different parameter lists")
    return Captured(prefill, decode, batched, names[0])


def _capture_vl(model, max_seq_len: int, seq, prefill, decode, ids, pos) -> Captured:
    """The VL model's two more steps: the mixed prefill (3-D positions [3, 1, T], modalities [1, T], image
    features [F, H] for the F placeholder tokens) and the image encoder (one image's patches
    [M, merge², C·p²] and their positions [M, merge², 2], M its tokens). Text prompts and decode take the text steps."""
    config = model.config
    feats = torch.export.Dim("feats", min=1, max=max_seq_len)
    merged = torch.export.Dim("merged", min=1, max=max_seq_len)  # an image's tokens: N / merge²
    merge2 = config.vision_config.spatial_merge_size ** 2
    hidden = config.get_text_config().hidden_size
    t = ids.shape[1]
    mm_ids = ids.clone()
    mm_ids[0, 1:3] = config.image_token_id  # 2 placeholders of 4 tokens: F and T stay distinct
    types = (mm_ids == config.image_token_id).to(ids.dtype)
    pos3 = pos.unsqueeze(0).expand(3, 1, t).contiguous()
    dtype = model.get_input_embeddings().weight.dtype  # the compute dtype: features and patches come in it
    features = torch.zeros(2, hidden, dtype=dtype)
    vt = config.vision_config
    patches = torch.zeros(2, merge2, vt.in_channels * vt.patch_size ** 2, dtype=dtype)
    vision_pos = torch.zeros(2, merge2, 2, dtype=torch.int64)
    prefill_mm = torch.export.export(
        _MixedStep(model).eval(), (mm_ids, pos3, types, features),
        dynamic_shapes={"input_ids": {1: seq}, "position_ids": {2: seq}, "token_types": {1: seq},
                        "features": {0: feats}})
    encode_image = torch.export.export(
        _VisionStep(model).eval(), (patches, vision_pos),
        dynamic_shapes={"patches": {0: merged}, "vision_positions": {0: merged}})
    names = {}
    for ep in (encode_image, prefill_mm, prefill, decode):
        names.update(parameter_names(ep))
    return Captured(prefill, decode, None, names, prefill_mm, encode_image)
