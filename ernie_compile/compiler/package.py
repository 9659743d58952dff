"""Stage 6: the artifact directory, written whole or not at all.

Layout: manifest.json (config, options, versions, target, entry points, weight order, sha256 of
every file), the compiled library, weights.safetensors (transformers names, the layout the library
takes), tokenizer files. Everything is written into a temporary sibling folder first and moved into
place at the end, so a failed compile never leaves a half-written artifact at -o.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..runtime.artifact import FORMAT_VERSION, MANIFEST, sha256


def check_output(output: Path) -> None:
    """-o may be new, empty, or an earlier artifact (replaced whole); never someone else's folder."""
    output = Path(output).resolve()
    if output.exists() and not output.is_dir():
        raise UserError(f"-o {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).is_file():
        raise UserError(f"-o {output}: folder is not empty and is not an ernie-compile artifact; refusing to overwrite")


@contextmanager
def staging(output: Path):
    """Yield a temporary folder beside `output`; on success it replaces `output`."""
    output = Path(output).resolve()
    check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    tmp.rename(output)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_weights(state: dict, weights: list[dict], path: Path) -> tuple[list[str], dict[str, float]]:
    """Save the weights the library takes, in its layout, as safetensors; return the tensor names in
    the order the step functions take them, and each quantized weight's relative reconstruction
    error ‖W − dequant(quant(W))‖ / ‖W‖. A fused weight ({"concat": [names]}) is the row-wise
    concatenation of its transformers parts; a quantized one ({"quant": spec, "parts": [...]}) is
    stored as its packed codes, scales and offsets (compiler/quantize.py)."""
    import numpy as np
    from safetensors.numpy import save_file

    from .quantize import QuantSpec, dequantize, quantize

    def array(name):  # in the dtype the model was cast to (float32 router kept so)
        return state[name].detach().numpy()

    arrays, order, errors = {}, [], {}
    for w in weights:
        value = np.concatenate([array(n) for n in w["concat"]]) if "concat" in w else array(w["name"])
        if "rows" in w:  # a row block of a weight split to fit a binding limit (passes/split_large_weights.py)
            value = value[w["rows"][0]:w["rows"][1]]
        stored = w.get("store", w["name"])
        if "quant" in w:
            spec = QuantSpec(**w["quant"])
            value = value.astype(np.float32)
            packed = quantize(value, spec)
            diff = dequantize(packed, spec, value.shape[-1]) - value
            errors[stored] = float(np.linalg.norm(diff) / max(np.linalg.norm(value), 1e-30))
            for part_name, key in zip(w["parts"], ("qweight", "qscale", "qmin")):
                arrays[part_name] = np.ascontiguousarray(packed[key])
                order.append(part_name)
        else:
            arrays[stored] = np.ascontiguousarray(value)
            order.append(stored)
    save_file(arrays, str(path))
    return order, errors


def write_manifest(folder: Path, manifest: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = dict(manifest, format_version=FORMAT_VERSION,
                    files={str(p.relative_to(folder)): sha256(p) for p in files})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def copy_tokenizer(files: dict[str, Path], folder: Path) -> list[str]:
    for name, src in files.items():
        shutil.copyfile(src, folder / name)
    return sorted(files)
