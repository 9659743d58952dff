"""Read an artifact's manifest once, and refuse it before anything is loaded unless it fits the
schema (runtime/schema.py), every file it names is confined to the folder and listed in "files",
and every listed file matches its sha256.

`load_manifest` is the one entry: ernie-run calls it, then hands the Manifest to
`import_runtime_only_tvm` and `Session`, so what decides the imports is what was verified.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import schema

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: "files" mandatory, paths confined, target.cross instead of runnable_here
# manifest quantization "int8_dot" (targets/cpu_vnni.DOTS) → the Linux CPU flag of its instructions
INT8_DOT_FLAGS = {"vnni": "avx512_vnni", "avx2": "avx2"}
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Manifest:
    """A checked manifest.json and the folder it describes."""

    folder: Path
    data: dict

    @property
    def backend(self) -> str:
        return self.data["backend"]

    @property
    def device(self) -> str:
        return self.data["target"]["device"]

    @property
    def max_seq_len(self) -> int:
        return self.data["kv_cache"]["max_seq_len"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safetensors_names(path: Path) -> dict:
    """The header of a safetensors file: tensor name → {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        head = f.read(8)
        (size,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        try:
            if not 0 < size <= 100 << 20:
                raise ValueError
            header = json.loads(f.read(size))
            if not isinstance(header, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path}: not a readable safetensors file") from None
    header.pop("__metadata__", None)
    return header


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """The manifest of the artifact at `folder`, checked; UserError (one line) on anything wrong.
    verify=False skips only the sha256 of each file (a compile checking the artifact it just wrote);
    the schema and the confinement of paths are always checked."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: not an ernie-compile artifact (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path}: corrupt manifest ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        found = data.get("format_version") if isinstance(data, dict) else None
        raise UserError(f"{path}: unsupported artifact format {found!r} (this runtime reads format_version "
                        f"{FORMAT_VERSION}; recompile with this ernie-compile)")
    try:
        backend = data.get("backend")
        if not isinstance(backend, str) or backend not in schema.SCHEMAS:  # (a list is not even hashable)
            raise UserError(f"backend: {backend!r} is not one this runtime runs ({', '.join(schema.SCHEMAS)})")
        files = data.get("files")
        schema.check_files(folder, files)
        schema.check(schema.SCHEMAS[backend], data, "", folder, files)
        if verify:
            for name, digest in files.items():
                f = folder / name
                if not f.is_file():
                    raise UserError(f"artifact file {name} is missing")
                if sha256(f) != digest:
                    raise UserError(f"artifact file {name} does not match its sha256 in the manifest "
                                    "(modified or corrupt); refusing to load it")
        _check_consistency(folder, data, files)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return Manifest(folder, data)


def _check_consistency(folder: Path, m: dict, files: dict) -> None:
    """What the schema cannot see alone: fields that must agree with each other or with the
    (already verified) files they describe."""
    config = m.get("model", {}).get("config", {})
    if "vocab_size" in config and config["vocab_size"] != m["vocab_size"]:
        raise UserError(f"vocab_size: {m['vocab_size']} differs from the model's {config['vocab_size']}")
    max_seq_len = m["kv_cache"]["max_seq_len"]
    compiled = m.get("options", {}).get("max_seq_len", max_seq_len)
    if compiled != max_seq_len:
        raise UserError(f"kv_cache.max_seq_len: {max_seq_len} differs from the compiled --max-seq-len {compiled}")
    if max_seq_len > config.get("max_position_embeddings", max_seq_len):
        raise UserError(f"kv_cache.max_seq_len: {max_seq_len} exceeds the model's max_position_embeddings "
                        f"{config['max_position_embeddings']}")
    if m["backend"] == "tvm":
        kernels = m["kernels"]
        if "fatbin" in kernels and "source_sha256" not in kernels:
            raise UserError("kernels.source_sha256: missing (required with kernels.fatbin)")
        order = m["weights"]["order"]
        stored = safetensors_names(folder / m["weights"]["file"])
        if len(set(order)) != len(order) or set(order) != set(stored):
            raise UserError(f"weights.order: does not name each tensor of {m['weights']['file']} exactly once")
    elif m["backend"] == "webgpu":
        _check_webgpu_plan(folder, m, files)


PLAN_SCHEMA = {"kernels": schema.MapOf({"wgsl": schema.File(".wgsl")}), "shards": [{"file": schema.File(".bin")}],
               "buffers": list, "functions": {"prefill": dict, "decode": dict}, "vars": {"T": [int]},
               "limits": dict}


def _check_webgpu_plan(folder: Path, m: dict, files: dict) -> None:
    """The launch plan names the kernel and weight files the engine reads: the same rules apply."""
    name = m["library"]
    try:
        plan = json.loads((folder / name).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"library: {name} is not a readable launch plan ({type(e).__name__})") from None
    schema.check(PLAN_SCHEMA, plan, name, folder, files)
    if [s["file"] for s in plan["shards"]] != m["weights"]["shards"]:
        raise UserError(f"weights.shards: differ from the shards {name} places weights in")


def check_cpu(folder: Path, manifest: dict) -> None:
    """Refuse an artifact whose int8-activation kernels use instructions this CPU lacks: it would die
    of SIGILL at its first step. The flags are Linux's (/proc/cpuinfo); where that cannot be read
    (other systems) the artifact is let through, as before this check."""
    quantization = manifest.get("quantization")
    if quantization is not None and not isinstance(quantization, dict):
        raise UserError(f"{folder}: manifest quantization: expected an object or null")
    dot = (quantization or {}).get("int8_dot")
    if dot is not None and dot not in INT8_DOT_FLAGS:
        raise UserError(f"{folder}: manifest quantization.int8_dot: {dot!r} is not one of {', '.join(INT8_DOT_FLAGS)}")
    if dot is None or manifest["target"]["device"] != "cpu":
        return
    try:
        flags = {f for line in CPUINFO.read_text().splitlines() if line.startswith("flags")
                 for f in line.partition(":")[2].split()}
    except OSError:
        return
    if INT8_DOT_FLAGS.get(dot) not in flags:
        raise UserError(f"{folder}: its kernels use the {dot!r} int8 dot product, which needs the CPU flag "
                        f"{INT8_DOT_FLAGS.get(dot, dot)}; this CPU lacks it (recompile here, or with --act-bits none)")
