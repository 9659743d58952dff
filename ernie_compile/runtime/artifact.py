"""Read an artifact's manifest and check every file against its sha256 before anything is loaded,
and that this CPU has the instructions its int8 kernels use."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# manifest quantization "int8_dot" (targets/cpu_vnni.DOTS) → the Linux CPU flag of its instructions
INT8_DOT_FLAGS = {"vnni": "avx512_vnni", "avx2": "avx2"}
CPUINFO = Path("/proc/cpuinfo")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path, verify: bool = True) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: not an ernie-compile artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported artifact format (want format_version {FORMAT_VERSION})")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            f = folder / name
            if not f.is_file():
                raise UserError(f"{folder}: artifact file {name} is missing")
            if sha256(f) != digest:
                raise UserError(f"{folder}: artifact file {name} does not match its sha256 in the manifest "
                                "(modified or corrupt); refusing to load it")
    return manifest


def check_cpu(folder: Path, manifest: dict) -> None:
    """Refuse an artifact whose int8-activation kernels use instructions this CPU lacks: it would die
    of SIGILL at its first step. The flags are Linux's (/proc/cpuinfo); where that cannot be read
    (other systems) the artifact is let through, as before this check."""
    dot = (manifest.get("quantization") or {}).get("int8_dot")
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
