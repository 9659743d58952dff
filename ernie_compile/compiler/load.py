"""Stage 1: a checkpoint folder or a preset name → transformers' own model, in eval mode, fp32,
and a WeightSource that produces its weights one tensor at a time (compiler/weights.py).

The model is built on the meta device; `materialize=True` (the default, what tests and the inductor
backend want) fills it from the source, `materialize=False` leaves it weightless for a streaming
compile, which reads each weight from `LoadedModel.weights` as it writes the artifact.

Everything a user can get wrong about the input is checked here, before any expensive work, and
reported as a one-line UserError.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import validate
from .presets import PRESETS, PresetSource
from .weights import CheckpointSource, WeightSource, meta_model

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Files a runtime needs to turn text into ids and back; copied into the artifact when present.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")

# model_type → transformers class name.
SUPPORTED = {"ernie4_5": "Ernie4_5ForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
             "ernie4_5_vl_moe": "Ernie4_5_VLMoeForConditionalGeneration"}


@dataclass
class LoadedModel:
    """A transformers model ready for capture, plus where it and its weights came from."""

    model: object  # transformers PreTrainedModel, eval mode, float32 (on the meta device if not materialized)
    source: str  # folder path or preset name
    tokenizer_files: dict[str, Path] = field(default_factory=dict)
    weights: WeightSource | None = None  # the same weights, in transformers' names, read one at a time


def _model_class(model_type: str | None):
    import transformers

    if model_type in SUPPORTED:
        return getattr(transformers, SUPPORTED[model_type])
    raise UserError(f"unknown model_type {model_type!r} in config.json; supported: {', '.join(sorted(SUPPORTED))}")


@contextlib.contextmanager
def _held_warnings():
    """Hold what transformers logs while it builds a config (a token id outside a vocabulary of 0, …):
    a config we refuse ends in our one line alone; one we accept gets its warnings afterwards."""
    import transformers

    logger = transformers.utils.logging.get_logger("transformers")
    held = []

    class Hold(logging.Handler):
        def emit(self, record):
            held.append(record)

    hold, propagate = Hold(), logger.propagate
    saved = logger.handlers[:]
    logger.handlers, logger.propagate = [hold], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved, propagate
    for record in held:  # only reached when the config was accepted
        logger.handle(record)


def make_config(where: str, build):
    """build() → a transformers config, refused in one line where transformers' own validation or
    ours (compiler/validate.py) rejects it: before any model is built."""
    from huggingface_hub.errors import StrictDataclassError

    with _held_warnings():
        try:
            config = build()
        except (StrictDataclassError, OSError, ValueError, KeyError, TypeError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise UserError(f"{where}: transformers refuses the config ({' '.join(lines[:2])})") from None
        try:
            validate.config(config)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return config


def preset_config(name: str, overrides: dict | None = None):
    """The preset's transformers config with `overrides` applied, validated (compiler/validate.py)."""
    import transformers

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    for key, value in (overrides or {}).items():
        fields = spec
        if "text_config" in spec and key not in spec:  # the VL model: its text model's fields
            fields = spec["text_config"] = dict(spec["text_config"])
            if key == "num_hidden_layers" and "mlp_layer_types" in fields:
                fields["mlp_layer_types"] = (fields["mlp_layer_types"] * int(value))[:int(value)]
        if key not in fields and key not in ("moe_num_experts", "moe_k", "moe_num_shared_experts"):
            raise UserError(f"--preset-override {key}: not a field of preset {name}")
        fields[key] = float(value) if isinstance(fields.get(key), float) else value  # 1 for a float field: 1.0
    _model_class(spec["model_type"])
    return make_config(f"preset {name}" + (" with --preset-override" if overrides else ""),
                       lambda: transformers.AutoConfig.for_model(**spec))


def checkpoint_config(path: Path):
    """The folder's config.json as its transformers config, validated; no weight file is opened."""
    import transformers

    if not path.is_dir():
        raise UserError(f"--model {path}: no such folder, and not a preset ({', '.join(PRESETS)})")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
    _model_class(model_type)
    return make_config(str(cfg_file), lambda: transformers.AutoConfig.from_pretrained(path))


def read_config(model: str | None, overrides: dict | None = None):
    """The validated config of what `load` would load, without building the model: the compile checks
    its options against it before any work."""
    if model is None or model in PRESETS:
        return preset_config(model or "ernie-tiny", overrides)
    if overrides:
        raise UserError("--preset-override applies to presets only, not to checkpoint folders")
    return checkpoint_config(Path(model))


def check_tokenizer(files: dict[str, Path]) -> None:
    """Each tokenizer file loads in the library a runtime reads it with (a corrupt one copied into the
    artifact would fail every later run instead of this compile)."""
    if "tokenizer.model" in files:
        import sentencepiece

        try:
            sentencepiece.SentencePieceProcessor(model_file=str(files["tokenizer.model"]))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{files['tokenizer.model']}: not a sentencepiece model "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if "tokenizer.json" in files:
        try:
            from tokenizers import Tokenizer
        except ImportError:  # the runtime reads tokenizer.json with `tokenizers` only; without it, JSON at least
            Tokenizer = None
        try:
            if Tokenizer is None:
                json.loads(files["tokenizer.json"].read_text())
            else:
                Tokenizer.from_file(str(files["tokenizer.json"]))
        except Exception as e:  # tokenizers raises its own Exception subclass for every parse error
            raise UserError(f"{files['tokenizer.json']}: not a tokenizers file "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if name in files:
            try:
                json.loads(files[name].read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{files[name]}: not valid JSON ({e})") from None


def load_preset(name: str, seed: int = 0, overrides: dict | None = None, materialize: bool = True) -> LoadedModel:
    """A preset with deterministic random weights (no download). `overrides` change config fields,
    e.g. fewer layers of the real shapes for a benchmark that must fit in memory."""
    config = preset_config(name, overrides)
    model = meta_model(config)
    weights = PresetSource(config, seed, model)
    if materialize:
        weights.materialize(model)
    return LoadedModel(model, name, {"tokenizer.model": ASSETS / "tokenizer.model"}, weights)


def load_checkpoint(path: Path, materialize: bool = True) -> LoadedModel:
    """A Hugging Face folder (config.json + *.safetensors) as its transformers class; its headers,
    tensor names and shapes are checked here, the tensors are read when asked for."""
    config = checkpoint_config(path)
    tok = {name: path / name for name in TOKENIZER_FILES if (path / name).is_file()}
    check_tokenizer(tok)
    try:
        model = meta_model(config)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: transformers could not load it ({str(e).splitlines()[0]})") from None
    weights = CheckpointSource(path, model)  # checks shards, dtypes, names and shapes; reads no tensor
    if materialize:
        weights.materialize(model)
    return LoadedModel(model, str(path), tok, weights)


def load(model: str | None, seed: int = 0, overrides: dict | None = None, materialize: bool = True) -> LoadedModel:
    """A preset name, a folder, or None for the embedded default. `materialize=False`: the model
    stays on the meta device and only `weights` holds (reads) the values."""
    if model is None or model in PRESETS:
        return load_preset(model or "ernie-tiny", seed, overrides, materialize)
    if overrides:
        raise UserError("--preset-override applies to presets only, not to checkpoint folders")
    return load_checkpoint(Path(model), materialize)


def cast(model, dtype: str) -> None:
    """Cast the model to `dtype` in place, keeping in float32 what transformers keeps there (the
    MoE router and its correction bias: `_keep_in_fp32_modules_strict`), as from_pretrained does."""
    import torch

    if dtype == "float32":
        return
    model.to(getattr(torch, dtype))
    keep = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name, p in model.named_parameters():
        if keep and any(name.endswith(k) or f".{k}." in name for k in keep):
            p.data = p.data.float()
