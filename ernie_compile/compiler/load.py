"""Stage 1: a checkpoint folder or a preset name → transformers' own model, in eval mode, fp32.

Everything a user can get wrong about the input is checked here, before any expensive work, and
reported as a one-line UserError.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .presets import PRESETS

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Files a runtime needs to turn text into ids and back; copied into the artifact when present.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")

# model_type → transformers class name. Known types that we cannot compile yet say so precisely.
SUPPORTED = {"ernie4_5": "Ernie4_5ForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM"}
NOT_YET = {"ernie4_5_vl_moe": "the vision-language model is not supported yet"}


@dataclass
class LoadedModel:
    """A transformers model ready for capture, plus where it came from."""

    model: object  # transformers PreTrainedModel, eval mode, float32
    source: str  # folder path or preset name
    tokenizer_files: dict[str, Path] = field(default_factory=dict)


def _model_class(model_type: str | None):
    import transformers

    if model_type in SUPPORTED:
        return getattr(transformers, SUPPORTED[model_type])
    if model_type in NOT_YET:
        raise UserError(f"model_type '{model_type}': {NOT_YET[model_type]}")
    raise UserError(f"unknown model_type {model_type!r} in config.json; supported: {', '.join(sorted(SUPPORTED))}")


def load_preset(name: str, seed: int = 0, overrides: dict | None = None) -> LoadedModel:
    """Build a preset with deterministic random weights (no download). `overrides` change config
    fields, e.g. fewer layers of the real shapes for a benchmark that must fit in memory."""
    import torch
    import transformers

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    for key, value in (overrides or {}).items():
        if key not in spec and key not in ("moe_num_experts", "moe_k", "moe_num_shared_experts"):
            raise UserError(f"--preset-override {key}: not a field of preset {name}")
        spec[key] = value
    cls = _model_class(spec["model_type"])
    config = transformers.AutoConfig.for_model(**spec)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    return LoadedModel(model, name, {"tokenizer.model": ASSETS / "tokenizer.model"})


def _check_safetensors(files: list[Path]) -> None:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(f, "np") as h:
                h.keys()
        except Exception as e:  # safetensors raises its own error type for every malformed file
            raise UserError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def load_checkpoint(path: Path) -> LoadedModel:
    """Load a Hugging Face folder (config.json + *.safetensors) into its transformers class."""
    import torch

    if not path.is_dir():
        raise UserError(f"--model {path}: no such folder, and not a preset ({', '.join(PRESETS)})")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
    cls = _model_class(model_type)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise UserError(f"{path}: no *.safetensors weight files")
    _check_safetensors(weights)
    try:
        model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: transformers could not load it ({str(e).splitlines()[0]})") from None
    missing = [k for k in info.get("missing_keys", ()) if k not in getattr(model, "_tied_weights_keys", {})]
    problems = missing + [str(m) for m in info.get("mismatched_keys", ())]
    if problems:
        raise UserError(f"{path}: weights missing or of the wrong shape: {', '.join(map(str, problems[:5]))}"
                        + (" …" if len(problems) > 5 else ""))
    tok = {name: path / name for name in TOKENIZER_FILES if (path / name).is_file()}
    return LoadedModel(model.eval(), str(path), tok)


def load(model: str | None, seed: int = 0, overrides: dict | None = None) -> LoadedModel:
    """A preset name, a folder, or None for the embedded default."""
    if model is None or model in PRESETS:
        return load_preset(model or "ernie-tiny", seed, overrides)
    if overrides:
        raise UserError("--preset-override applies to presets only, not to checkpoint folders")
    return load_checkpoint(Path(model))


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
