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


def write_weights(state: dict, weights: list[dict], path: Path) -> None:
    """Save the weights the library takes, in its layout, as float32 safetensors. A fused weight
    ({"name", "concat": [parts]}) is the row-wise concatenation of its transformers parts."""
    import numpy as np
    from safetensors.numpy import save_file

    def array(name):
        return state[name].detach().float().numpy()

    arrays = {w["name"]: np.ascontiguousarray(np.concatenate([array(n) for n in w["concat"]]) if "concat" in w
                                              else array(w["name"])) for w in weights}
    save_file(arrays, str(path))


def write_manifest(folder: Path, manifest: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = dict(manifest, format_version=FORMAT_VERSION,
                    files={str(p.relative_to(folder)): sha256(p) for p in files})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def copy_tokenizer(files: dict[str, Path], folder: Path) -> list[str]:
    for name, src in files.items():
        shutil.copyfile(src, folder / name)
    return sorted(files)
