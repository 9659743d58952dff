"""The checks a compile runs before it loads anything: the options, the output paths, and the model
config, each refused in one line (UserError) instead of failing deep inside torch.export or TVM.

Transformers' own config class validates first (its strict dataclass fields reject a string where a
number goes, its RoPE validator an odd head_dim or a RoPE type without its keys); `config` then
checks what the model class, and our compile of it, needs beyond that: transformers builds a model
with 0 layers or 3 KV heads for 4 query heads, and only torch.export or the KV cache would fail.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from ..errors import UserError
from ..runtime.schema import MAX_SEQ_LEN

MIN_SEQ_LEN = 2  # a prompt token and one new token (the runtime's schema requires as much)
# RoPE types (transformers' rope_parameters["rope_type"]) whose frequencies are position × a constant,
# which TVM's paged KV cache (and our CPU kernel in its slot) computes exactly: theta and a position
# scale. "dynamic" and "longrope" change the frequencies with the sequence length at run time; "yarn"
# and "llama3" scale each frequency differently: refused.
ROPE_TYPES = ("default", "linear")


def rope(config) -> tuple[float, float]:
    """(theta, position scale) of the config's RoPE: the cache rotates by position × scale / theta^(2i/d)."""
    params = dict(config.rope_parameters or {})
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise UserError(f"config rope_parameters: rope_type {kind!r} is not supported (ernie-compile applies "
                        f"{' and '.join(ROPE_TYPES)} RoPE exactly; {kind} would give wrong logits)")
    theta = params.get("rope_theta")
    _finite(theta, "rope_parameters.rope_theta", lo=0, open_lo=True)
    if kind == "default":
        return float(theta), 1.0
    factor = params.get("factor")
    _finite(factor, "rope_parameters.factor", lo=0, open_lo=True)
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise UserError(f"config rope_parameters: partial_rotary_factor {partial} is not supported (the KV cache "
                        "rotates the whole head)")
    return float(theta), 1.0 / float(factor)


def _finite(value, name: str, lo: float | None = None, open_lo: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            (lo is not None and (value <= lo if open_lo else value < lo)):
        bound = "" if lo is None else f" {'>' if open_lo else '≥'} {lo:g}"
        raise UserError(f"config {name}: expected a finite number{bound}, got {value!r}")


def _at_least(config, name: str, lo: int, value=None) -> int:
    value = getattr(config, name, None) if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise UserError(f"config {name}: expected an integer ≥ {lo}, got {value!r}")
    return value


def config(cfg) -> None:
    """What transformers' config class accepts but the model class (or its compile) cannot run."""
    from transformers.activations import ACT2FN

    if cfg.model_type == "ernie4_5_vl_moe":
        _vl(cfg)
        cfg = cfg.get_text_config()

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads"):
        _at_least(cfg, name, 1)
    _at_least(cfg, "max_position_embeddings", MIN_SEQ_LEN)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % kv:
        raise UserError(f"config num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if _at_least(cfg, "head_dim", 2, head_dim) % 2:
        raise UserError(f"config head_dim {head_dim}: RoPE rotates pairs, it must be even")
    _finite(cfg.rms_norm_eps, "rms_norm_eps", lo=0)
    if cfg.hidden_act not in ACT2FN:
        raise UserError(f"config hidden_act {cfg.hidden_act!r}: not an activation transformers knows")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        ids = getattr(cfg, name, None)
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.vocab_size):
                raise UserError(f"config {name} {ids!r}: outside the vocabulary [0, {cfg.vocab_size})")
    rope(cfg)
    if cfg.model_type == "ernie4_5_vl_moe_text":
        if any(kind not in ("dense", "sparse") for kind in cfg.mlp_layer_types) or \
                len(cfg.mlp_layer_types) < cfg.num_hidden_layers:
            raise UserError(f"config mlp_layer_types {cfg.mlp_layer_types!r}: one of dense/sparse per layer")
        if "sparse" in cfg.mlp_layer_types:
            sizes = cfg.moe_intermediate_size
            if not isinstance(sizes, list) or len(sizes) != 2 or any(not isinstance(i, int) or i < 1 for i in sizes):
                raise UserError(f"config moe_intermediate_size {sizes!r}: expected [text, vision] positive widths")
            experts = _at_least(cfg, "moe_num_experts", 1)
            if _at_least(cfg, "moe_k", 1) > experts:
                raise UserError(f"config moe_k {cfg.moe_k}: more experts per token than moe_num_experts ({experts})")
            _at_least(cfg, "moe_num_shared_experts", 0)
            _finite(cfg.moe_norm_min, "moe_norm_min", lo=0)
    if cfg.model_type == "ernie4_5_moe":
        experts = _at_least(cfg, "moe_num_experts", 1)
        k = _at_least(cfg, "moe_k", 1)
        if k > experts:
            raise UserError(f"config moe_k {k}: more experts per token than moe_num_experts ({experts})")
        _at_least(cfg, "moe_num_shared_experts", 0)
        _at_least(cfg, "moe_intermediate_size", 1)
        _at_least(cfg, "moe_layer_interval", 1)
        _at_least(cfg, "moe_layer_start_index", 0)
        _finite(cfg.moe_norm_min, "moe_norm_min", lo=0)


def _vl(cfg) -> None:
    """The VL model's own fields: its special tokens inside the vocabulary, the M-RoPE sections covering
    the head, a vision tower the compiled encoder can run (one image per call, still images)."""
    text, vision = cfg.get_text_config(), cfg.vision_config
    for name in ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id",
                 "video_start_token_id", "video_end_token_id"):
        i = getattr(cfg, name, None)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < (text.vocab_size or 0):
            raise UserError(f"config {name} {i!r}: outside the vocabulary [0, {text.vocab_size})")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    sections = list((text.rope_parameters or {}).get("mrope_section", [22, 22, 20]))
    if len(sections) != 3 or sum(sections) * 2 != head_dim or sections[0] != sections[1]:
        raise UserError(f"config rope_parameters.mrope_section {sections}: three sections (h = w) covering "
                        f"head_dim {head_dim} / 2")
    for name in ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size"):
        _at_least(vision, name, 1)
    if vision.hidden_size % vision.num_heads or (vision.hidden_size // vision.num_heads) % 4:
        raise UserError(f"config vision_config: hidden_size {vision.hidden_size} / num_heads {vision.num_heads} "
                        "must be a multiple of 4 (2-D rotary)")
    if vision.spatial_merge_size != 2 or vision.temporal_merge_size != 2:
        raise UserError("config vision_config: spatial_merge_size and temporal_merge_size other than 2 are not "
                        "supported (transformers' resampler hard-codes 2)")


def max_seq_len(value: int, cfg) -> None:
    if not MIN_SEQ_LEN <= value <= MAX_SEQ_LEN:
        raise UserError(f"--max-seq-len {value}: must be in [{MIN_SEQ_LEN}, {MAX_SEQ_LEN}] "
                        "(a prompt token and a new one at least)")
    cfg = cfg.get_text_config()
    if value > cfg.max_position_embeddings:
        raise UserError(f"--max-seq-len {value} exceeds the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings})")


# ---------------------------------------------------------------------------------------------
# Output paths: checked before any work, so that a typo costs nothing


def _writable_folder(path: Path, flag: str) -> None:
    """The nearest existing folder at or above `path` must be a folder we can create files in: a probe
    file is created and removed there (as root, os.access says yes even under /proc)."""
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise UserError(f"{flag} {path}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".ernie-compile-probe.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {probe} ({e.strerror or e})") from None


def outputs(opts) -> None:
    """-o (unless --plan), --dump-ir and --report: each a place we can write, of the right kind."""
    if not opts.plan:
        out = Path(opts.output).absolute()
        if out.exists() and not out.is_dir():
            raise UserError(f"-o {out}: exists and is not a folder")
        _writable_folder(out.parent, "-o")
    if opts.dump_ir:
        dump = Path(opts.dump_ir).absolute()
        if dump.exists() and not dump.is_dir():
            raise UserError(f"--dump-ir {dump}: exists and is not a folder")
        _writable_folder(dump, "--dump-ir")
    if opts.report:
        report = Path(opts.report).absolute()
        if report.is_dir():
            raise UserError(f"--report {report}: is a folder (expected a file name)")
        if report.exists() and not os.access(report, os.W_OK):
            raise UserError(f"--report {report}: not writable")
        _writable_folder(report.parent, "--report")


def options(opts) -> None:
    """Flags that need no model: numbers in range, output paths."""
    if opts.seed < 0:
        raise UserError(f"--seed {opts.seed}: must be ≥ 0")
    if opts.max_seq_len is not None and not MIN_SEQ_LEN <= opts.max_seq_len <= MAX_SEQ_LEN:
        raise UserError(f"--max-seq-len {opts.max_seq_len}: must be in [{MIN_SEQ_LEN}, {MAX_SEQ_LEN}] "
                        "(a prompt token and a new one at least)")
    if opts.tune_trials is not None and opts.tune_trials < 1:
        raise UserError(f"--tune-trials {opts.tune_trials}: must be ≥ 1")
    if opts.tune_minutes is not None and not (math.isfinite(opts.tune_minutes) and opts.tune_minutes > 0):
        raise UserError(f"--tune-minutes {opts.tune_minutes}: must be a positive number")
    outputs(opts)
