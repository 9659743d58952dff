"""The artifact directory, written whole or not at all.

Layout: manifest.json (config, options, versions, target, entry points, weight order, sha256 of
every file), the compiled library, weights.safetensors (transformers names, the layout the library
takes), tokenizer files. Everything is written into a temporary sibling folder first and moved into
place at the end, so a failed compile never leaves a half-written artifact at -o.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import InternalError, UserError
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


# numpy dtype name → safetensors' name for the dtypes artifacts store
_SAFETENSORS = {"float32": "F32", "float16": "F16", "uint32": "U32", "int32": "I32", "int64": "I64", "uint8": "U8"}


class StateDictSource:
    """A weight source over a model held in memory (its state dict in the dtypes it was cast to)."""

    def __init__(self, model):
        self.state = model.state_dict()

    def get(self, name: str, index: int | None = None):
        value = self.state[name] if index is None else self.state[name][index]
        return value.detach().float().numpy() if str(value.dtype) == "torch.bfloat16" else value.detach().numpy()


def produce(record, source, errors: dict):
    """Yield (StoredTensor, array) for each tensor `record` stores, its value read from `source` (the
    transformers weights: `get(name) → ndarray`) now; a quantized record's relative reconstruction
    error ‖W − dequant(quant(W))‖ / ‖W‖ goes into `errors` under its stored name."""
    import numpy as np

    from ..quant import dequantize, quantize

    parts = [source.get(n) for n in record.sources]
    value = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if record.rows is not None:  # a row block of a weight split to fit a binding limit
        value = value[record.rows[0]:record.rows[1]]
    if tuple(value.shape) != tuple(record.shape):
        raise InternalError(f"weight {record.name}: the checkpoint gives shape {tuple(value.shape)}, "
                            f"the compiled code takes {record.shape}")
    stored = record.stored
    if record.quant is None:
        yield stored[0], np.ascontiguousarray(value, dtype=record.dtype)
        return
    value = value.astype(np.float32)
    packed = quantize(value, record.quant)
    diff = dequantize(packed, record.quant, value.shape[-1]) - value
    errors[record.name] = float(np.linalg.norm(diff) / max(np.linalg.norm(value), 1e-30))
    for t, key in zip(stored, ("qweight", "qscale", "qmin")):
        yield t, np.ascontiguousarray(packed[key])


def write_safetensors(out_dir: Path, records: list, source, log, file: str = "weights.safetensors") -> tuple[dict, dict]:
    """The stored tensors of `records` in one safetensors file, written as they are produced: the
    header (every name, dtype, shape and offset is known from the records) first, then each tensor's
    bytes in order, so no more than one record's values are held at a time. → (the manifest's
    "weights" entry, the reconstruction errors)."""
    from ..passes.weight_records import stored_tensors

    tensors = stored_tensors(records)
    header, offset = {}, 0
    for t in tensors:
        nbytes = math.prod(t.shape) * _itemsize(t.dtype)
        header[t.name] = {"dtype": _SAFETENSORS[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data begins 8-byte aligned, as safetensors writes it
    errors = {}
    with open(out_dir / file, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for record in records:
            for t, value in produce(record, source, errors):
                meta = header[t.name]
                if value.dtype.name != t.dtype or list(value.shape) != meta["shape"]:
                    raise InternalError(f"weight {t.name}: produced {value.dtype.name} {value.shape}, "
                                        f"declared {t.dtype} {meta['shape']}")
                f.write(memoryview(value).cast("B"))
    return {"file": file, "order": [t.name for t in tensors]}, errors


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def write_manifest(folder: Path, manifest: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = dict(manifest, format_version=FORMAT_VERSION,
                    files={str(p.relative_to(folder)): sha256(p) for p in files})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def copy_tokenizer(files: dict[str, Path], folder: Path) -> list[str]:
    for name, src in files.items():
        shutil.copyfile(src, folder / name)
    return sorted(files)
