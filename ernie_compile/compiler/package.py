"""The artifact directory, written whole or not at all.

Layout: manifest.json (config, options, versions, target, entry points, weight order, sha256 of
every file), the compiled library, weights.safetensors (transformers names, the layout the library
takes), tokenizer files. Everything is written into a temporary sibling folder first and moved into
place at the end, so a failed compile never leaves a half-written artifact at -o.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
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


# Inside every staging folder while it is one: the creating process's PID, start time and host, so that a later
# compile removes the folders of compiles killed by SIGKILL (or a power cut), and never a user's folder.
STAGING_MARKER = ".ernie-compile-staging"


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), which tells a live
    process from a later one that reuses its PID; None where /proc does not say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def marker(pid: int) -> str:
    """The marker's text: PID, its start time, the host (a folder shared between machines or containers
    is judged only by the one that made it)."""
    return f"{pid} {_process_start(pid) or ''} {socket.gethostname()}\n"


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return start is None or _process_start(pid) in (None, start)


def remove_stale_staging(parent: Path, log=None) -> list[Path]:
    """Remove the staging folders in `parent` whose compile died without cleaning up: hidden folders
    holding our marker whose process is gone. A folder without the marker is not ours and is left."""
    removed = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(".") and p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for folder in candidates:
        try:
            pid_text, start, host = ((folder / STAGING_MARKER).read_text().split("\n")[0].split(" ") + ["", ""])[:3]
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if host == socket.gethostname() and not _alive(pid, start or None):  # another machine's PIDs: not ours to judge
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            if log:
                log(f"  removed {folder}: the staging folder of a compile that died (process {pid})")
    return removed


@contextmanager
def staging(output: Path, log=None):
    """Yield a temporary folder beside `output`; on success it replaces `output`. Staging folders left
    beside it by killed compiles are removed first."""
    output = Path(output).resolve()
    check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output.parent, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tmp.chmod(0o755)
        pid = os.getpid()
        (tmp / STAGING_MARKER).write_text(marker(pid))
        yield tmp
        (tmp / STAGING_MARKER).unlink()
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


CHUNK_BYTES = 64 << 20  # float32 bytes of one weight chunk read, quantized and written at a time
PROGRESS_BYTES = 256 << 20  # artifacts of more weight bytes than this show a progress bar
WORKERS = min(2, os.cpu_count() or 1)  # records packaged at once (write_safetensors): peak = WORKERS chunks


def _chunks(record, source):
    """(first row along axis 0, float value of rows [first, first + len)) of `record`'s weight, in
    chunks of about CHUNK_BYTES read from the source only as they are needed: a stacked expert
    tensor [E, N, K] one expert at a time, a 2-D weight in blocks of rows (a multiple of 16, so
    vnni16 tiles stay whole); a chunk of a concatenation takes its rows from the parts it spans."""
    import numpy as np

    if len(record.shape) == 3:
        if len(record.sources) != 1 or record.rows is not None:
            raise InternalError(f"weight {record.name}: a stacked weight is read from one source, whole")
        for e in range(record.shape[0]):
            yield e, _finite(source.get(record.sources[0], index=e), f"{record.sources[0]} (expert {e})")[None]
        return
    parts, start = [], 0  # (name, first row of the part within the concatenation, its rows)
    for name in record.sources:
        n = source.shape(name)[0]
        parts.append((name, start, n))
        start += n
    lo, hi = record.rows if record.rows is not None else (0, start)
    if hi - lo != record.shape[0]:
        raise InternalError(f"weight {record.name}: the checkpoint gives {hi - lo} rows, the compiled code takes "
                            f"{record.shape[0]}")
    step = max(16, CHUNK_BYTES // max(4 * math.prod(record.shape[1:]), 1) // 16 * 16)
    for a in range(lo, hi, step):
        b = min(a + step, hi)
        pieces = [_finite(source.get_rows(name, max(a, p0) - p0, min(b, p0 + n) - p0), name, max(a, p0) - p0)
                  for name, p0, n in parts if p0 < b and a < p0 + n]
        value = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if tuple(value.shape[1:]) != tuple(record.shape[1:]):
            raise InternalError(f"weight {record.name}: the checkpoint gives rows of {value.shape[1:]}, "
                                f"the compiled code takes {record.shape[1:]}")
        yield a - lo, value


def _finite(value, name: str, first_row: int = 0):
    """`value` (a chunk as read), refused in one line if it holds a NaN or an infinity: such a weight
    compiles, then every run computes NaN logits. Checked here, on the chunk packaging reads anyway."""
    import numpy as np

    if not np.isfinite(value).all():
        bad = np.argwhere(~np.isfinite(value))[0]
        where = ", ".join(str(int(i)) for i in (bad[0] + first_row, *bad[1:]))
        raise UserError(f"weight {name}: {value[tuple(bad)]} at [{where}] (a checkpoint weight must be finite)")
    return value


def produce(record, source, errors: dict):
    """Yield (StoredTensor, first row, array) for each chunk of each tensor `record` stores, its value
    read from `source` (the transformers weights: `get(name, index=None) → ndarray`) chunk by chunk;
    a quantized record's relative reconstruction error ‖W − dequant(quant(W))‖ / ‖W‖ goes into
    `errors` under its stored name."""
    import numpy as np

    from ..quant import dequantize, quantize

    stored = record.stored
    diff2 = norm2 = 0.0
    for first, value in _chunks(record, source):
        if record.quant is None:
            yield stored[0], first, np.ascontiguousarray(value, dtype=record.dtype)
            continue
        value = value.astype(np.float32)
        packed = quantize(value, record.quant)
        diff2 += float(np.square(dequantize(packed, record.quant, value.shape[-1]) - value).sum())
        norm2 += float(np.square(value).sum())
        for t, key in zip(stored, ("qweight", "qscale", "qmin")):
            yield t, first, np.ascontiguousarray(packed[key])
    if record.quant is not None:
        errors[record.name] = math.sqrt(diff2) / max(math.sqrt(norm2), 1e-30)


class RegionWriter:
    """Writes chunks of stored tensors at the file offsets laid out for them beforehand, so the
    chunks of several tensors (a quantized weight's codes, scales and offsets) may interleave."""

    def __init__(self, total_bytes: int):
        self.files: dict[Path, int] = {}
        self.bar = _progress(total_bytes)

    def open(self, path: Path, prefix: bytes = b"") -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.files[path] = fd
        if prefix:
            os.pwrite(fd, prefix, 0)

    def write(self, path: Path, offset: int, t, first: int, array) -> None:
        """Rows [first, first + len(array)) of tensor `t`, which begins at `offset` of `path`."""
        row_bytes = math.prod(t.shape[1:]) * _itemsize(t.dtype) if t.shape else 0
        if array.dtype.name != t.dtype or tuple(array.shape[1:]) != tuple(t.shape[1:]) or \
                first + array.shape[0] > t.shape[0]:
            raise InternalError(f"weight {t.name}: produced {array.dtype.name} {array.shape} at row {first}, "
                                f"declared {t.dtype} {t.shape}")
        data = memoryview(np_bytes(array))
        fd, at = self.files[path], offset + first * row_bytes
        while data:
            n = os.pwrite(fd, data, at)
            data, at = data[n:], at + n
        if self.bar is not None:
            self.bar.update(array.nbytes)

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        if self.bar is not None:
            self.bar.close()


def np_bytes(array):
    """The bytes of a C-contiguous array, without a copy."""
    return array.reshape(-1).view("uint8")


def _progress(total: int):
    """A bar over the bytes written (tqdm), where the artifact is large enough to wait for."""
    if total < PROGRESS_BYTES:
        return None
    from tqdm import tqdm

    # disable=None: only on a terminal (no bar in logs, pipes and CI)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="weights", leave=False,
                mininterval=1.0, disable=None)


def write_safetensors(out_dir: Path, records: list, source, log, file: str = "weights.safetensors") -> tuple[dict, dict]:
    """The stored tensors of `records` in one safetensors file, written as they are produced: the
    header (every name, dtype, shape and offset is known from the records) first, then each chunk at
    its tensor's offset, so no more than one chunk's values are held at a time. → (the manifest's
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
    base = 8 + len(text)
    path = out_dir / file
    errors = {}
    writer = RegionWriter(offset)

    def write(record) -> None:
        for t, first, value in produce(record, source, errors):
            writer.write(path, base + header[t.name]["data_offsets"][0], t, first, value)

    try:
        writer.open(path, struct.pack("<Q", len(text)) + text)
        os.truncate(path, base + offset)
        _each(write, records)
    finally:
        writer.close()
    return {"file": file, "order": [t.name for t in tensors]}, errors


def _each(fn, records: list) -> None:
    """fn(record) for every record, on WORKERS threads: reading (bf16 → float32), quantizing and
    pwrite-ing a chunk are numpy and system calls that release the GIL, and every record writes its
    own regions of the file. Each worker holds one chunk at a time; the first error stops the rest."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    if WORKERS == 1 or len(records) < 2:
        for record in records:
            fn(record)
        return
    with ThreadPoolExecutor(WORKERS) as pool:
        pending = [pool.submit(fn, r) for r in records]
        done, _ = wait(pending, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in done:
            if f.exception() is not None:
                raise f.exception()


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def write_manifest(folder: Path, manifest: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, STAGING_MARKER))
    manifest = dict(manifest, format_version=FORMAT_VERSION,
                    files={str(p.relative_to(folder)): sha256(p) for p in files})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def copy_tokenizer(files: dict[str, Path], folder: Path) -> list[str]:
    for name, src in files.items():
        shutil.copyfile(src, folder / name)
    return sorted(files)
