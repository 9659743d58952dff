"""runtime/vision.py against transformers on the tiny VL folder (tests/vl_folder.py): the image
processor's pixel_values and grids, the vision tower's position ids, the processor's prompt ids and
token types, and the model's own get_rope_index.

Tolerance: pixel values are compared exactly (atol 0). Both sides run Pillow's resize on the same
uint8 image and the same float64→float32 rescale and float32 normalize, so any difference is a bug.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ernie_compile.errors import UserError
from ernie_compile.runtime import vision
from ernie_compile.runtime.tokenizer import Tokenizer
from ernie_compile.runtime.vision import VisionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vl_folder import MAX_PIXELS, image_processor_oracle, make_vl_folder  # noqa: E402

PIXEL_ATOL = 0.0
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_vl_folder(tmp_path_factory.mktemp("vl") / "tiny")


@pytest.fixture(scope="module")
def processor(folder):
    return image_processor_oracle(folder)


@pytest.fixture(scope="module")
def spec(folder) -> VisionSpec:
    return VisionSpec.from_checkpoint(folder, json.loads((folder / "config.json").read_text()))


def noise(height: int, width: int, mode: str = "RGB", seed: int = 0):
    from PIL import Image

    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def test_spec_reads_the_processor_settings_and_token_ids(folder, processor, spec):
    ip, tok = processor.image_processor, processor.tokenizer
    assert (spec.min_pixels, spec.max_pixels) == (ip.size.shortest_edge, ip.size.longest_edge) == (3136, MAX_PIXELS)
    assert (spec.patch_size, spec.merge_size, spec.temporal_patch_size) == (ip.patch_size, ip.merge_size,
                                                                          ip.temporal_patch_size)
    assert spec.image_mean == tuple(ip.image_mean) and spec.image_std == tuple(ip.image_std)
    assert (spec.resample, spec.rescale_factor) == (int(ip.resample), ip.rescale_factor)
    ids = [spec.image_token_id, spec.image_start_token_id, spec.image_end_token_id,
           spec.video_token_id, spec.video_start_token_id, spec.video_end_token_id]
    assert ids == [tok.image_token_id, tok.image_start_token_id, tok.image_end_token_id,
                   tok.video_token_id, tok.video_start_token_id, tok.video_end_token_id] == list(range(1024, 1030))
    assert spec.image_token == tok.image_token
    assert VisionSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_spec_defaults_and_flat_preprocessor_config(tmp_path):
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil as Pil,
    )

    default = Pil()
    spec = VisionSpec.from_checkpoint(tmp_path, {})  # no processor file: transformers' defaults
    assert (spec.min_pixels, spec.max_pixels) == (default.size.shortest_edge, default.size.longest_edge)
    assert spec.image_mean == tuple(default.image_mean) and spec.resample == int(default.resample)
    assert (spec.image_token_id, spec.video_end_token_id) == (100295, 101307)
    Pil(size={"shortest_edge": 100, "longest_edge": 5000}, image_mean=[0.5] * 3).save_pretrained(tmp_path)
    flat = VisionSpec.from_checkpoint(tmp_path, {"image_token_id": 7})
    assert (flat.min_pixels, flat.max_pixels, flat.image_mean, flat.image_token_id) == (100, 5000, (0.5,) * 3, 7)
    with pytest.raises(UserError, match="spatial_merge_size"):
        VisionSpec.from_checkpoint(tmp_path, {"vision_config": {"spatial_merge_size": 4}})
    with pytest.raises(UserError, match="patch_size"):
        VisionSpec.from_json(dict(spec.to_json(), patch_size="14"))


@pytest.mark.parametrize("height,width,mode", [
    (100, 130, "RGB"),   # not multiples of 28: rounded
    (300, 500, "RGB"),   # 150000 px over max_pixels 50176: resized down
    (30, 41, "RGBA"),    # under min_pixels: scaled up; transparency composited onto white
    (70, 45, "L"),       # grayscale → RGB
])
def test_preprocess_matches_the_image_processor(processor, spec, height, width, mode):
    image = noise(height, width, mode, seed=height)
    ref = processor.image_processor(images=[image])
    patches, grid = vision.preprocess(image, spec)
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    assert patches.dtype == np.float32 and patches.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=PIXEL_ATOL)
    assert spec.min_pixels <= grid[1] * grid[2] * spec.patch_size ** 2 <= spec.max_pixels


def test_load_image_then_preprocess_matches_the_processor_given_the_path(tmp_path, processor, spec):
    """A JPEG with an EXIF rotation and a large PNG, loaded from disk by both sides."""
    from PIL import Image

    jpeg, png = tmp_path / "rotated.jpg", tmp_path / "big.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to display
    noise(90, 160, seed=1).save(jpeg, exif=exif, quality=90)
    noise(1200, 900, seed=2).save(png)
    for path in (jpeg, png):
        ref = processor.image_processor(images=[str(path)])
        image = vision.load_image(path)
        patches, grid = vision.preprocess(image, spec)
        assert grid == tuple(ref["image_grid_thw"][0].tolist())
        np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=PIXEL_ATOL)
    assert vision.load_image(jpeg).size == (90, 160)  # upright: the EXIF rotation applied


def test_vision_positions_match_transformers():
    from transformers.vision_utils import get_vision_position_ids

    for grid in [(1, 4, 6), (1, 8, 2), (2, 6, 4)]:
        ref = get_vision_position_ids(torch.tensor([grid]), 2).numpy()
        ours = vision.vision_positions(grid, 2)
        assert ours.dtype == np.int64 and np.array_equal(ours, ref)
        assert vision.image_token_count(grid, 2) == len(ours) // 4


def _two_images_and_text():
    images = [noise(100, 130, seed=3), noise(300, 200, seed=4)]
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": "Compare the values"}]
    return images, [{"role": "user", "content": content}]


@pytest.mark.parametrize("n_images", [1, 2])
def test_prompt_ids_and_token_types_match_the_processor(folder, processor, spec, n_images):
    from ernie_compile.serve.protocol import ChatFormat

    images, conversation = _two_images_and_text()
    conversation[0]["content"] = conversation[0]["content"][2 - n_images:]
    ref = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    grids = [vision.preprocess(im, spec)[1] for im in images[2 - n_images:]]
    tokenizer = Tokenizer(folder, {"files": TOKENIZER_FILES})
    render = ChatFormat(folder, {"files": TOKENIZER_FILES}).render
    ids = vision.build_prompt_ids(tokenizer.encode, render, grids, "Compare the values", spec)
    assert ids == ref["input_ids"][0]
    assert vision.mm_token_types(ids, spec).tolist() == ref["mm_token_type_ids"][0]
    assert vision.moe_token_types(ids, spec).tolist() == list(ref["moe_mm_token_type_ids"][0])
    assert vision.moe_token_types(ids, spec).sum() == sum(map(vision.image_token_count, grids, [2] * n_images)) \
        + 2 * n_images  # start and end tokens count as vision for the MoE


def test_rope_positions_match_get_rope_index(folder, processor, spec):
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    model = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(folder).eval()
    _, conversation = _two_images_and_text()
    ref = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")
    ref_pos, ref_delta = model.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"],
                                                    image_grid_thw=ref["image_grid_thw"])
    ids = ref["input_ids"][0].tolist()
    positions, delta = vision.rope_positions(ids, ref["image_grid_thw"].tolist(), spec)
    assert positions.shape == (3, len(ids)) and positions.dtype == np.int64
    assert np.array_equal(positions, ref_pos[:, 0].numpy())
    assert delta == int(ref_delta[0, 0]) < 0  # images advance positions by less than their token count

    class Cache:  # what compute_3d_position_ids asks of a KV cache at a decode step
        def get_seq_length(self):
            return len(ids)

    model.model.rope_deltas = ref_delta
    step = model.model.compute_3d_position_ids(input_ids=torch.tensor([[5]]), inputs_embeds=torch.zeros(1, 1, 8),
                                               cache=Cache())
    assert step[:, 0, 0].tolist() == [len(ids) + delta] * 3  # the next token: cache index + delta, every axis
    with pytest.raises(UserError, match="placeholder"):
        vision.rope_positions(ids, ref["image_grid_thw"].tolist()[:1], spec)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name,make", [
    ("notes.png", lambda p: _write(p, b"this is a text file, not an image\n")),
    ("cut.png", lambda p: (noise(64, 64).save(p), _write(p, p.read_bytes()[: p.stat().st_size // 2]))[1]),
    ("missing.jpg", lambda p: p),
    ("a-folder.png", lambda p: (p.mkdir(), p)[1]),
])
def test_bad_image_files_are_one_line_user_errors(tmp_path, name, make):
    path = make(tmp_path / name)
    with pytest.raises(UserError) as e:
        vision.load_image(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_extreme_aspect_ratio_is_refused_as_the_processor_refuses_it(processor, spec):
    image = noise(2, 450)
    with pytest.raises(ValueError, match="aspect ratio"):
        processor.image_processor(images=[image])
    with pytest.raises(UserError, match="aspect ratio"):
        vision.preprocess(image, spec)


def test_prompt_refuses_a_tokenizer_without_the_image_token_and_placeholder_text(folder, spec):
    """The shipped sentencepiece model alone splits <|IMAGE_PLACEHOLDER|> into pieces: refused, not
    silently fed to the model with no image tokens. So is a placeholder typed into the text."""
    from ernie_compile.serve.protocol import ChatFormat

    render = ChatFormat(folder, {"files": TOKENIZER_FILES}).render
    assets = Path(vision.__file__).resolve().parents[1] / "assets"
    pieces_only = Tokenizer(assets, {"files": ["tokenizer.model"]})
    with pytest.raises(UserError, match="does not encode"):
        vision.build_prompt_ids(pieces_only.encode, render, [(1, 4, 6)], "hi", spec)
    full = Tokenizer(folder, {"files": TOKENIZER_FILES})
    with pytest.raises(UserError, match="2 image placeholders"):
        vision.build_prompt_ids(full.encode, render, [(1, 4, 6)], f"hi {spec.image_token}", spec)
