"""Stage 1: a checkpoint folder or a preset name → transformers' own model, in eval mode, fp32,
and a WeightSource that produces its weights one tensor at a time (compiler/weights.py).

The model is built on the meta device; `materialize=True` (the default, what tests and the inductor
backend want) fills it from the source, `materialize=False` leaves it weightless for a streaming
compile, which reads each weight from `LoadedModel.weights` as it writes the artifact.

Everything a user can get wrong about the input is checked here, before any expensive work, and
reported as a one-line UserError.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .presets import PRESETS, PresetSource
from .weights import CheckpointSource, WeightSource, meta_model

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Files a runtime needs to turn text into ids and back; copied into the artifact when present.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")

# model_type → transformers class name. Known types that we cannot compile yet say so precisely.
SUPPORTED = {"ernie4_5": "Ernie4_5ForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM"}
NOT_YET = {"ernie4_5_vl_moe": "the vision-language model is not supported yet"}


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
    if model_type in NOT_YET:
        raise UserError(f"model_type '{model_type}': {NOT_YET[model_type]}")
    raise UserError(f"unknown model_type {model_type!r} in config.json; supported: {', '.join(sorted(SUPPORTED))}")


def load_preset(name: str, seed: int = 0, overrides: dict | None = None, materialize: bool = True) -> LoadedModel:
    """A preset with deterministic random weights (no download). `overrides` change config fields,
    e.g. fewer layers of the real shapes for a benchmark that must fit in memory."""
    import transformers

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    for key, value in (overrides or {}).items():
        if key not in spec and key not in ("moe_num_experts", "moe_k", "moe_num_shared_experts"):
            raise UserError(f"--preset-override {key}: not a field of preset {name}")
        spec[key] = value
    _model_class(spec["model_type"])
    config = transformers.AutoConfig.for_model(**spec)
    model = meta_model(config)
    weights = PresetSource(config, seed, model)
    if materialize:
        weights.materialize(model)
    return LoadedModel(model, name, {"tokenizer.model": ASSETS / "tokenizer.model"}, weights)


def load_checkpoint(path: Path, materialize: bool = True) -> LoadedModel:
    """A Hugging Face folder (config.json + *.safetensors) as its transformers class; its headers,
    tensor names and shapes are checked here, the tensors are read when asked for."""
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
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        model = meta_model(config)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: transformers could not load it ({str(e).splitlines()[0]})") from None
    weights = CheckpointSource(path, model)  # checks shards, dtypes, names and shapes; reads no tensor
    if materialize:
        weights.materialize(model)
    tok = {name: path / name for name in TOKENIZER_FILES if (path / name).is_file()}
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
