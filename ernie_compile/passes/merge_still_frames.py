"""The VL resampler's temporal merge for a still image, as one op.

transformers' `Ernie4_5_VLMoeVariableResolutionResamplerModel._temporal_slicing` builds its gather
indices in Python loops over `grid_thw` values (a video's even and odd frames side by side), which
torch.export cannot trace. An image has one frame, which the loop pairs with itself; the compiled
vision step takes one image, so the resampler's slicing is swapped for an op doing exactly that:

    before:  _temporal_slicing(x, grid_thw)   (index_select of even / odd frames, per image, in loops)
    after:   ernie.merge_still_frames(x)      = concat([x, x], -1)

The op's eager reference calls transformers' own `_temporal_slicing` with a one-frame grid.
"""
from __future__ import annotations

import torch

from . import PassReport

NAME = "merge_still_frames"
OP_NAME = "merge_still_frames.default"
FUNCTIONS = ("encode_image",)
_RESAMPLERS: dict[int, torch.nn.Module] = {}  # the eager reference's module, by the id the op carries


@torch.library.custom_op("ernie::merge_still_frames", mutates_args=())
def merge_still_frames(x: torch.Tensor, resampler: int) -> torch.Tensor:
    """Eager reference. x [M, C]: one image's merged patches → [M, 2C]."""
    grid = torch.tensor([[1, 2, 2 * x.shape[0]]])  # one frame of 4·M patches (only h·w matters)
    module = _RESAMPLERS[resampler]
    return type(module)._temporal_slicing(module, x, grid)  # the class's own, not our swap


@merge_still_frames.register_fake
def _(x, resampler):
    return x.new_empty(x.shape[0], 2 * x.shape[1])


def expected_sites(config) -> int:
    return 1 if config.model_type == "ernie4_5_vl_moe" else 0


def install(model) -> PassReport:
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeVariableResolutionResamplerModel)

    report = PassReport(NAME, expected=expected_sites(model.config))
    for module in model.modules():
        if isinstance(module, Ernie4_5_VLMoeVariableResolutionResamplerModel):
            _RESAMPLERS[id(module)] = module
            key = id(module)
            module._temporal_slicing = lambda x, grid_thw, key=key: torch.ops.ernie.merge_still_frames(x, key)
            report.matched += 1
    return report


def converter(report: PassReport, ctx):
    from tvm import relax

    def convert(node, importer):
        x = importer.env[node.args[0]]
        report.matched += 1
        return importer.block_builder.emit(relax.op.concat([x, x], axis=-1))

    return convert
