"""Images + text → the inputs ERNIE-4.5-VL expects, in numpy and Pillow (no torch, no transformers).

Each function reproduces one piece of what transformers' Ernie4_5_VLMoeProcessor and the model build,
so that a compiled artifact sees the same numbers as the checkpoint's own Python pipeline:

    load_image(path)                      → RGB PIL image, as transformers.image_utils.load_image
    preprocess(image, spec)               → pixel_values [N, C*T*p*p], image_grid_thw (t, h, w)
    vision_positions(grid, merge)         → the vision tower's (row, col) per patch
    build_prompt_ids(encode, render, …)   → input_ids of one user turn, placeholders expanded
    mm_token_types / moe_token_types      → mm_token_type_ids / moe_mm_token_type_ids
    rope_positions(ids, grids, spec)      → the model's 3-D RoPE position ids and rope delta

tests/runtime/test_vision_inputs.py checks each against transformers on a tiny checkpoint.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..errors import UserError

# Defaults of transformers' Ernie4_5_VLMoeImageProcessor(Pil) and Ernie4_5_VLMoeConfig: what the
# checkpoint's processor uses for a setting its files leave out.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_DEFAULTS = dict(patch_size=14, merge_size=2, temporal_patch_size=1, min_pixels=56 * 56,
                          max_pixels=28 * 28 * 6177, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                          rescale_factor=1 / 255, resample=3, do_resize=True, do_rescale=True,
                          do_normalize=True, do_convert_rgb=True)
TOKEN_ID_DEFAULTS = dict(image_token_id=100295, image_start_token_id=101304, image_end_token_id=101305,
                         video_token_id=103367, video_start_token_id=101306, video_end_token_id=101307)
IMAGE_TOKEN = "<|IMAGE_PLACEHOLDER|>"  # the tokenizer's image_token in ERNIE VL checkpoints
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # Pillow decoders we let read user files
MAX_ASPECT = 200  # smart_resize refuses a longer side over 200× the shorter


@dataclass(frozen=True)
class VisionSpec:
    """The image processor's settings and the model's vision token ids: everything a runtime needs
    to turn an image and a prompt into model inputs. The compiler writes `to_json()` into the
    artifact manifest; the runtime reads it back with `from_json`."""

    patch_size: int
    merge_size: int  # image processor merge_size; from_checkpoint checks it equals the vision tower's
    temporal_patch_size: int  # still images are repeated this many times along time
    min_pixels: int  # size["shortest_edge"] (a pixel count, not an edge, in this processor)
    max_pixels: int  # size["longest_edge"]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    resample: int  # PIL resampling filter (3 = bicubic)
    do_resize: bool
    do_rescale: bool
    do_normalize: bool
    do_convert_rgb: bool
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    video_token_id: int
    video_start_token_id: int
    video_end_token_id: int
    image_token: str = IMAGE_TOKEN

    def to_json(self) -> dict:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_json(cls, data: dict, where: str = "manifest vision") -> VisionSpec:
        """A spec from a manifest, which may have been edited: each field is type-checked."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: not an object")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name == "image_token":
                    continue
                raise UserError(f"{where}: missing {f.name!r}")
            v = data[f.name]
            kind = {"int": int, "bool": bool, "float": (int, float), "str": str}.get(str(f.type), list)
            ok = (isinstance(v, kind) and not (kind is int and isinstance(v, bool))) if kind is not list else (
                isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v))
            if not ok or (kind is int and v < (0 if f.name.endswith("_id") else 1)):
                raise UserError(f"{where}: {f.name!r} is {v!r}, not a valid {f.type}")
            values[f.name] = tuple(float(x) for x in v) if kind is list else v
        return cls(**values)

    @classmethod
    def from_checkpoint(cls, folder: Path | None, config: dict) -> VisionSpec:
        """The spec the folder's processor would use. Its settings come, as in transformers, from
        processor_config.json's "image_processor" if present, else preprocessor_config.json, else the
        processor's defaults; token ids from config.json; the placeholder text from
        tokenizer_config.json. Top-level min_pixels/max_pixels keys are ignored because this
        processor ignores them (only size{shortest_edge, longest_edge} bounds the resize)."""
        folder = Path(folder) if folder is not None else None  # None: a preset, the processor's defaults
        read = (lambda name: _read_json(folder / name)) if folder is not None else (lambda name: {})
        settings = read("processor_config.json").get("image_processor")
        if not isinstance(settings, dict):
            settings = read("preprocessor_config.json")
        spec = dict(PROCESSOR_DEFAULTS)
        spec.update({k: settings[k] for k in PROCESSOR_DEFAULTS if k in settings})
        size = settings.get("size", {"shortest_edge": spec["min_pixels"], "longest_edge": spec["max_pixels"]})
        if not (isinstance(size, dict) and size.get("shortest_edge") and size.get("longest_edge")):
            raise UserError(f"{folder}: image processor size must hold shortest_edge and longest_edge, got {size!r}")
        spec["min_pixels"], spec["max_pixels"] = size["shortest_edge"], size["longest_edge"]
        for key in ("image_mean", "image_std"):  # a single number applies to every channel
            v = spec[key]
            spec[key] = list(v) if isinstance(v, (list, tuple)) else [v] * 3 if isinstance(v, (int, float)) else v
        vision = config.get("vision_config")
        vision = vision if isinstance(vision, dict) else {}
        for ours, theirs, default in (("merge_size", "spatial_merge_size", 2), ("patch_size", "patch_size", 14)):
            if vision.get(theirs, default) != spec[ours]:
                raise UserError(f"{folder}: image processor {ours} {spec[ours]} but the vision tower's {theirs} "
                                f"is {vision.get(theirs, default)}")
        spec.update({k: config.get(k, v) for k, v in TOKEN_ID_DEFAULTS.items()})
        token = read("tokenizer_config.json").get("image_token", IMAGE_TOKEN)
        spec["image_token"] = token.get("content") if isinstance(token, dict) else token  # AddedToken form
        return cls.from_json(spec, where=f"{folder}: vision settings")  # one place checks the types


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def load_image(path, name: str | None = None) -> "PIL.Image.Image":
    """The file (a path, or a binary file object called `name` in errors) as an upright RGB image, as
    transformers' load_image makes it from a path (EXIF orientation applied, then convert("RGB")).
    Any failure is a one-line UserError naming the file; a large image is not refused here,
    preprocess resizes it like the processor does."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    what = path if name is None else name
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            image.load()  # decode now: a truncated file fails here, not later in preprocess
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{what}: no such image file") from None
    except IsADirectoryError:
        raise UserError(f"{what}: a folder, not an image file") from None
    except UnidentifiedImageError:
        raise UserError(f"{what}: not a {'/'.join(IMAGE_FORMATS)} image") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{what}: too many pixels to decode ({e})".splitlines()[0]) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow raises for a damaged file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{what}: cannot decode image ({reason})") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processor's target size: each side a multiple of factor (patch × merge), the aspect ratio
    kept as closely as rounding allows, the pixel count brought inside [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise UserError(f"image of {width}x{height}: aspect ratio over {MAX_ASPECT} (the processor refuses it)")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _to_rgb(image):
    """The PIL backend's convert_to_rgb: transparency composited onto white, then RGB."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image, spec: VisionSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """pixel_values and image_grid_thw for one PIL image, as the processor's PIL backend computes
    them (the backend AutoImageProcessor picks without torchvision): Pillow resize of the uint8
    image, rescale in float64 then float32, normalize in float32. Patches are ordered merge block
    by merge block (the m×m patches the model merges into one token are consecutive rows)."""
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    image = _to_rgb(image) if spec.do_convert_rgb else image
    h, w = smart_resize(image.height, image.width, p * m, spec.min_pixels, spec.max_pixels)
    if spec.do_resize:
        image = image.resize((w, h), resample=spec.resample)
    elif (image.height, image.width) != (h, w):
        raise UserError(f"image of {image.width}x{image.height}: not a multiple of {p * m} and do_resize is off")
    x = np.asarray(image)  # [H, W, C] uint8
    x = x.reshape(h, w, -1).transpose(2, 0, 1)  # [C, H, W]
    if spec.do_rescale:
        x = (x.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    if spec.do_normalize:
        mean = np.asarray(spec.image_mean, np.float32)[:, None, None]  # [C, 1, 1]
        std = np.asarray(spec.image_std, np.float32)[:, None, None]
        x = (x.astype(np.float32) - mean) / std
    x = np.asarray(x, np.float32)
    c, gh, gw = x.shape[0], h // p, w // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p)  # [C, bh, mh, p, bw, mw, p]
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [bh, bw, mh, mw, C, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t, p, p))  # [bh, bw, mh, mw, C, T, p, p]
    patches = np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p))  # [N, C*T*p*p]
    return patches, (1, gh, gw)  # one temporal step for a still image


def vision_positions(grid, merge: int) -> np.ndarray:
    """(row, col) of each patch, in preprocess's merge-block order: the vision tower's 2-D RoPE
    input (transformers.vision_utils.get_vision_position_ids for one image). int64 [t*h*w, 2]."""
    t, h, w = (int(v) for v in grid)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # [h, w] each

    def block_order(a):  # [h, w] → [h*w], merge block by merge block
        return a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)

    pos = np.stack([block_order(rows), block_order(cols)], axis=-1)  # [h*w, 2]
    return np.tile(pos, (t, 1)).astype(np.int64)  # [t*h*w, 2]


def image_token_count(grid, merge: int) -> int:
    """Tokens the language model sees for one image: each merge×merge block of patches is one."""
    t, h, w = (int(v) for v in grid)
    return t * h * w // (merge * merge)


def mm_token_types(ids, spec: VisionSpec) -> np.ndarray:
    """The processor's mm_token_type_ids: 1 on image placeholders, 2 on video ones, 0 elsewhere.
    get_rope_index groups tokens by these. int64 [T]."""
    ids = np.asarray(ids)
    return np.select([ids == spec.image_token_id, ids == spec.video_token_id], [1, 2], 0).astype(np.int64)


def moe_token_types(ids, spec: VisionSpec) -> np.ndarray:
    """The processor's moe_mm_token_type_ids: like mm_token_types, but the start/end tokens around an
    image (video) count as vision too, so they are routed to the vision experts. int64 [T]."""
    ids = np.asarray(ids)
    image = np.isin(ids, [spec.image_token_id, spec.image_start_token_id, spec.image_end_token_id])
    video = np.isin(ids, [spec.video_token_id, spec.video_start_token_id, spec.video_end_token_id])
    return np.select([image, video], [1, 2], 0).astype(np.int64)


def rope_positions(ids, grids, spec: VisionSpec, merge: int | None = None) -> tuple[np.ndarray, int]:
    """The model's get_rope_index for one sequence of text and images: text tokens count up on all
    three axes; an image's tokens take (start, start + row, start + col) and move the next start by
    max(rows, cols). Returns positions int64 [3, T] and the rope delta: a token at cache index i
    after the prompt has position i + delta on every axis (what generation adds at decode)."""
    merge = spec.merge_size if merge is None else merge
    types = mm_token_types(ids, spec)  # [T]
    if not len(types):
        raise UserError("empty prompt")
    grids = [tuple(int(v) for v in g) for g in grids]
    parts, start, n_used = [], 0, 0
    # runs of equal type, as get_rope_index groups them (start/end tokens keep two images apart)
    for kind, run in itertools.groupby(types.tolist()):
        n = len(list(run))
        if kind == 0:
            parts.append(np.broadcast_to(np.arange(start, start + n), (3, n)))  # [3, n]
            start += n
            continue
        if kind != 1:
            raise UserError("video input is not supported")
        if n_used == len(grids):
            raise UserError(f"the prompt has more image placeholder runs than the {len(grids)} images given")
        t, h, w = grids[n_used][0], grids[n_used][1] // merge, grids[n_used][2] // merge
        if t * h * w != n:
            raise UserError(f"image {n_used + 1}: {n} placeholder tokens in the prompt, {t * h * w} for its grid")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")  # [t, h, w] each
        parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + start)  # [3, t*h*w]
        start += max(h, w)
        n_used += 1
    if n_used != len(grids):
        raise UserError(f"{n_used} image placeholder runs in the prompt for {len(grids)} images")
    positions = np.concatenate(parts, axis=1).astype(np.int64)  # [3, T]
    return positions, int(positions.max()) + 1 - len(types)


def build_prompt_ids(encode, render, grids, text: str, spec: VisionSpec) -> list[int]:
    """input_ids for one user message holding the images then the text, as the processor builds
    them: `render(messages)` (the folder's chat template with a generation prompt) places one
    placeholder per image, each becomes image_token_count copies, then `encode` tokenizes the
    whole text once (the tokenizer knows the placeholder as a special token)."""
    content = [{"type": "image"} for _ in grids] + [{"type": "text", "text": text}]
    return expand_placeholders(encode, render([{"role": "user", "content": content}]), grids, spec)


def expand_placeholders(encode, rendered: str, grids, spec: VisionSpec) -> list[int]:
    """input_ids of a rendered chat holding one image placeholder per image (in order): each becomes
    image_token_count copies, then the whole text is tokenized once."""
    pieces = rendered.split(spec.image_token)
    if len(pieces) - 1 != len(grids):
        raise UserError(f"{len(pieces) - 1} image placeholders in the rendered prompt (the template's and any in "
                        f"the text) for {len(grids)} images")
    counts = [image_token_count(g, spec.merge_size) for g in grids]
    ids = list(encode(pieces[0] + "".join(spec.image_token * n + s for n, s in zip(counts, pieces[1:]))))
    if ids.count(spec.image_token_id) != sum(counts):
        raise UserError(f"the tokenizer does not encode {spec.image_token} as id {spec.image_token_id}")
    return ids


def prefill_images(engine, spec: VisionSpec, ids: list[int], images: list, seq_id: int = 0) -> tuple[np.ndarray, int]:
    """A prompt holding images into the engine's empty sequence `seq_id`: `images` are (patches, grid)
    of preprocess, in prompt order; ids hold each one's placeholder tokens. Returns the logits after
    the last token and the rope delta (decoding continues at cache index + delta)."""
    grids = [tuple(int(g) for g in grid) for _, grid in images]
    # first, as it refuses placeholder runs that do not fit the images: before any image is encoded
    positions, delta = rope_positions(ids, grids, spec)
    features = np.concatenate([engine.encode_image(patches, vision_positions(grid, spec.merge_size), spec.merge_size ** 2)
                               for (patches, _), grid in zip(images, grids)])  # [F, H]
    return engine.step_images(list(ids), positions, moe_token_types(ids, spec), features, seq_id), int(delta)
