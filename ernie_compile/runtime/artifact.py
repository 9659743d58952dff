"""Read an artifact's manifest and check every file against its sha256 before anything is loaded."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


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
