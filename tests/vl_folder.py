"""A tiny ERNIE-4.5-VL Hugging Face folder, written offline in a few seconds, for the VL tests.

    make_vl_folder(path, preset="ernie-vl-tiny", seed=0) -> path

writes what a converted VL checkpoint holds (transformers' convert_ernie4_5_vl_moe_to_hf.py layout):
config.json + model.safetensors (+ generation_config.json) from save_pretrained of random weights;
tokenizer.json + tokenizer_config.json + chat_template.jinja, a LlamaTokenizer (the class the
conversion uses) over the shipped 1024-piece sentencepiece vocabulary with the six vision tokens
added as ids 1024..1029; processor_config.json with the image processor's settings nested under
"image_processor" (how ProcessorMixin.save_pretrained writes them), with small pixel bounds so test
images give few patches.

Loading it back: AutoImageProcessor and AutoTokenizer work; AutoProcessor does not without
torchvision (the processor also loads Ernie4_5_VLMoeVideoProcessor, which needs it), so
`image_processor_oracle` builds Ernie4_5_VLMoeProcessor from those two with no video processor.
"""
from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "ernie_compile" / "assets"

# The tokenizer attributes Ernie4_5_VLMoeProcessor reads (tokenizer.image_token, …) and the text of
# each token in the real ERNIE VL tokenizer, in the order of their ids in the ernie-vl-tiny preset.
VISION_TOKENS = {"image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
                 "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
                 "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>"}
# 56*56 .. 28*28*64 pixels: at most 256 patches of 14×14, 64 image tokens.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64

# ERNIE VL's prompt layout (begin marker, "User: ", "Picture N:" + start/placeholder/end per image,
# "\nAssistant: ", an empty think block when thinking is off), written for these tests.
CHAT_TEMPLATE = (
    "{%- set pictures = namespace(n=0) -%}"
    "<|begin_of_sentence|>"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{ 'User: ' }}{%- endif -%}"
    "{%- if m.role == 'assistant' -%}{{ '\\nAssistant: ' }}{%- endif -%}"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- else -%}{%- for part in m.content -%}"
    "{%- if part.type == 'text' -%}{{ part.text }}"
    "{%- elif part.type in ['image', 'image_url'] -%}{%- set pictures.n = pictures.n + 1 -%}"
    "{{ 'Picture ' ~ pictures.n ~ ':<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if m.role == 'system' -%}{{ '\\n' }}{%- endif -%}"
    "{%- if m.role == 'assistant' -%}{{ '<|end_of_sentence|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\nAssistant: ' }}"
    "{%- if not enable_thinking -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}{%- endif -%}"
)


def _bpe_from_sentencepiece(model_file: Path) -> tuple[dict, list]:
    """vocab and merges of a sentencepiece BPE model, for the `tokenizers` BPE (reading the model
    proto directly would need protobuf). A piece is a merge of any two pieces that spell it; merges
    rank by the merged piece's id, which orders sentencepiece BPE pieces by score."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    ranked = []
    for piece, i in vocab.items():
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i):
            continue
        ranked += [(i, vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                   for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    return vocab, [(a, b) for *_, a, b in sorted(ranked)]


def _write_tokenizer(path: Path, config) -> None:
    from transformers import LlamaTokenizer

    vocab, merges = _bpe_from_sentencepiece(ASSETS / "tokenizer.model")
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=False, add_eos_token=False,
                         extra_special_tokens=dict(VISION_TOKENS), chat_template=CHAT_TEMPLATE)
    for name, text in VISION_TOKENS.items():  # the preset's ids must be the tokenizer's
        if tok.convert_tokens_to_ids(text) != getattr(config, f"{name}_id"):
            raise RuntimeError(f"{text} got id {tok.convert_tokens_to_ids(text)}, config says "
                               f"{getattr(config, f'{name}_id')}")
    tok.save_pretrained(path)


def _write_processor_config(path: Path) -> None:
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    image = Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    settings = json.loads(image.to_json_string())
    (path / "processor_config.json").write_text(json.dumps(
        {"image_processor": settings, "processor_class": "Ernie4_5_VLMoeProcessor"}, indent=2))


def make_vl_folder(path, preset: str = "ernie-vl-tiny", seed: int = 0, correction_bias: float = 0.0) -> Path:
    """Write the folder described in the module docstring at `path` and return it. `correction_bias`:
    every router's e_score_correction_bias drawn uniform in [0, that) instead of zeros, so that it
    changes which experts win (it only selects; the weights stay the unbiased softmax)."""
    import torch
    import transformers

    from ernie_compile.compiler.presets import PRESETS

    path = Path(path)
    config = transformers.AutoConfig.for_model(**PRESETS[preset])
    torch.manual_seed(seed)
    model = transformers.Ernie4_5_VLMoeForConditionalGeneration(config).eval()
    if correction_bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    p.copy_(torch.rand_like(p) * correction_bias)
    model.save_pretrained(path)
    _write_tokenizer(path, config)
    _write_processor_config(path)
    return path


def image_processor_oracle(path):
    """transformers' own Ernie4_5_VLMoeProcessor for the folder, built from AutoImageProcessor (the
    PIL backend here) and AutoTokenizer because AutoProcessor needs torchvision for the video
    processor; its image and text paths are the same code AutoProcessor's would run."""
    from transformers import AutoImageProcessor, AutoTokenizer, Ernie4_5_VLMoeProcessor

    class ImageOnlyProcessor(Ernie4_5_VLMoeProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:  # its class check needs torchvision
                return None
            return super().check_argument_for_proper_class(name, arg)

    tokenizer = AutoTokenizer.from_pretrained(path)
    return ImageOnlyProcessor(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
                              video_processor=None, chat_template=tokenizer.chat_template)
