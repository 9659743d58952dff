"""What a manifest must hold, per backend, checked before any file it names is read.

A manifest is not covered by its own hashes: whatever wrote or edited it, the runtime reads only
what this schema allows. Each backend's fields are those compiler/pipeline.py (tvm, inductor) and
targets/webgpu.py (webgpu) write; a key the runtime does not read (options, versions, passes, …) is
not checked, so adding one never breaks older runtimes. The spec language:

    int, str, bool        that type (an int is never a bool); list, dict: any list, any object
    Int(lo, hi)           an int in [lo, hi]
    File(".so", ...)      a path inside the artifact folder, listed in "files", with one of the suffixes
    [spec]                a list of spec;  MapOf(spec): a dict of str → spec
    Nullable(spec)        spec or null;  OneOf((a, b)): one of these values
    {"key": spec, "opt?": spec}   a dict with these keys ("?": may be absent); other keys are allowed
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import UserError

# TVM-route libraries are built for KV-cache pages of this many tokens (compiler/lower.py PAGE_SIZE):
# a cache created with another size fails inside the library's first kernel, so the manifest's
# value must be this one.
KV_PAGE_SIZE = 16
MAX_SEQ_LEN = 1 << 20  # a context longer than this is a corrupt number, not a model
MAX_VOCAB = 1 << 24
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Int:
    lo: int
    hi: int


class File:
    def __init__(self, *suffixes: str):
        self.suffixes = suffixes


@dataclass(frozen=True)
class OneOf:
    values: tuple


@dataclass(frozen=True)
class MapOf:
    value: object


@dataclass(frozen=True)
class Nullable:
    value: object


COMMON = {
    "backend": str,
    "vocab_size": Int(1, MAX_VOCAB),
    "target": {"spec": str, "device": str, "cross": bool},  # device: per backend below
    "kv_cache": {"max_seq_len": Int(2, MAX_SEQ_LEN)},
    "tokenizer": {"files": [File()], "eos_token_ids": [Nullable(Int(0, MAX_VOCAB))],
                  "bos_token_id?": Nullable(int), "vocab?": File(".json"), "strip_leading_space?": bool},
    # read only to check kv_cache and vocab_size against what the compile recorded
    "options?": {"max_seq_len?": Int(2, MAX_SEQ_LEN)},
    "model?": {"config?": {"vocab_size?": Int(1, MAX_VOCAB), "max_position_embeddings?": int}},
}
BACKENDS = {
    "tvm": {
        "library": File(".so", ".tar", ".dylib"),
        "target": {"device": OneOf(("cpu", "cuda", "metal"))},
        "functions": {"prefill": str, "decode": str, "create_kv": str, "batch?": str, "prefill_mm?": str,
                      "encode_image?": str},
        # the VL model's image settings (runtime/vision.py checks the rest)
        "vision?": Nullable({"image_token_id": Int(0, MAX_VOCAB), "merge_size": Int(1, 8)}),
        "kernels": {"fatbin?": File(".fatbin"), "source?": File(), "source_sha256?": str, "msl?": File()},
        "weights": {"file": File(".safetensors"), "order": [str]},
        "kv_cache": {"page_size": Int(KV_PAGE_SIZE, KV_PAGE_SIZE)},
        # read by artifact.check_cpu before the library loads
        "quantization?": Nullable({"int8_dot?": Nullable(str)}),
    },
    "inductor": {
        "target": {"device": OneOf(("cpu",))},
        "programs": {"prefill": File(".pt2"), "decode": File(".pt2")},
        "python_ops": MapOf(str),
        "weights": {"file": File(".safetensors"), "constants": MapOf(str)},
        "kv_cache": {"shapes": [[Int(1, MAX_SEQ_LEN)]]},
    },
    "webgpu": {
        "target": {"device": OneOf(("webgpu",))},
        "library": File(".json"),  # the launch plan; the kernels and shards it names: check_webgpu_plan
        "weights": {"shards": [File(".bin")]},
    },
}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


SCHEMAS = {name: _merge(COMMON, spec) for name, spec in BACKENDS.items()}


def confined(folder: Path, name, where: str) -> Path:
    """folder/name, refused unless `name` is a relative path that stays inside `folder`: no absolute
    path, no `..`, no symlink (of the file or a folder on the way) that resolves outside."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise UserError(f"{where}: {name!r} is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or re.match(r"[A-Za-z]:", name):
        raise UserError(f"{where}: {name!r} points outside the artifact folder; refusing it")
    root = Path(folder).resolve()
    path = (root / pure).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"{where}: {name!r} resolves outside the artifact folder (a symlink); refusing it")
    return path


def _describe(spec) -> str:
    if spec is int:
        return "an integer"
    if spec is str:
        return "a string"
    if spec is bool:
        return "true or false"
    if isinstance(spec, Int):
        return f"an integer in [{spec.lo}, {spec.hi}]"
    if isinstance(spec, File):
        return "a file name"
    if isinstance(spec, OneOf):
        return "one of " + ", ".join(map(repr, spec.values))
    if isinstance(spec, Nullable):
        return f"{_describe(spec.value)} or null"
    if isinstance(spec, list) or spec is list:
        return "a list"
    return "an object"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check(spec, value, where: str, folder: Path, files: dict) -> None:
    """Raise a one-line UserError at the first place `value` does not fit `spec`."""
    def wrong():
        raise UserError(f"{where}: expected {_describe(spec)}, got {_short(value)}")

    if isinstance(spec, Nullable):
        if value is not None:
            check(spec.value, value, where, folder, files)
    elif spec in (int, str, bool, list, dict):
        if not isinstance(value, spec) or (spec is int and isinstance(value, bool)):
            wrong()
    elif isinstance(spec, OneOf):
        if not isinstance(value, str) or value not in spec.values:
            wrong()
    elif isinstance(spec, Int):
        if not isinstance(value, int) or isinstance(value, bool) or not spec.lo <= value <= spec.hi:
            wrong()
    elif isinstance(spec, File):
        if not isinstance(value, str):
            wrong()
        confined(folder, value, where)
        if spec.suffixes and not value.endswith(spec.suffixes):
            raise UserError(f"{where}: {value!r} is not a {' / '.join(spec.suffixes)} file")
        if value not in files:
            raise UserError(f"{where}: {value!r} is not listed in the manifest's files (no sha256 to check it "
                            "against); refusing it")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            wrong()
        for i, item in enumerate(value):
            check(spec[0], item, f"{where}[{i}]", folder, files)
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            wrong()
        for k, item in value.items():
            check(spec.value, item, f"{where}.{k}", folder, files)
    else:  # a record
        if not isinstance(value, dict):
            wrong()
        for key, sub in spec.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                raise UserError(f"{where + '.' if where else ''}{name}: missing")
            check(sub, value[name], f"{where + '.' if where else ''}{name}", folder, files)


def check_files(folder: Path, files) -> None:
    """The "files" table itself: names confined to the folder, each with a sha256."""
    if not isinstance(files, dict) or not files:
        raise UserError("files: missing or empty (every artifact lists the sha256 of each of its files); "
                        "refusing an artifact whose files cannot be checked")
    for name, digest in files.items():
        confined(folder, name, f"files.{name}")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise UserError(f"files.{name}: expected a sha256 (64 hex digits), got {_short(digest)}")
