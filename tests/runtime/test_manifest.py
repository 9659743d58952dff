"""The manifest schema: what each backend's manifest must hold, refused in one line naming the key."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ernie_compile.errors import UserError
from ernie_compile.runtime.artifact import FORMAT_VERSION, MANIFEST, load_manifest
from ernie_compile.runtime.schema import KV_PAGE_SIZE


def _edit(src: Path, dst: Path, change) -> Path:
    folder = shutil.copytree(src, dst)
    m = json.loads((folder / MANIFEST).read_text())
    change(m)
    (folder / MANIFEST).write_text(json.dumps(m))
    return folder


def _refused(folder: Path, *words: str) -> str:
    with pytest.raises(UserError) as e:
        load_manifest(folder)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_the_compiler_writes_this_format(tiny_artifact):
    m = load_manifest(tiny_artifact)
    assert m.data["format_version"] == FORMAT_VERSION and m.data["target"]["cross"] is False


def test_page_size_agrees_with_the_compiler():
    from ernie_compile.compiler.lower import PAGE_SIZE

    assert PAGE_SIZE == KV_PAGE_SIZE


@pytest.mark.parametrize("path", [("library",), ("files",), ("kv_cache", "max_seq_len"), ("target", "cross"),
                                  ("tokenizer", "eos_token_ids"), ("weights", "order"), ("functions", "decode")])
def test_a_missing_key_is_named(tiny_artifact, tmp_path, path):
    def drop(m):
        for k in path[:-1]:
            m = m[k]
        del m[path[-1]]

    _refused(_edit(tiny_artifact, tmp_path / "a", drop), ".".join(path))


@pytest.mark.parametrize("path,value", [(("vocab_size",), "1024"), (("target", "cross"), "no"),
                                        (("kv_cache", "max_seq_len"), 2**40), (("kv_cache", "page_size"), 32),
                                        (("weights", "order"), "w"), (("target", "device"), "tpu")])
def test_a_wrong_type_or_value_is_named(tiny_artifact, tmp_path, path, value):
    def put(m):
        for k in path[:-1]:
            m = m[k]
        m[path[-1]] = value

    _refused(_edit(tiny_artifact, tmp_path / "a", put), ".".join(path), "expected")


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "a/../../lib.so"])
def test_paths_stay_in_the_folder(tiny_artifact, tmp_path, name):
    _refused(_edit(tiny_artifact, tmp_path / "a", lambda m: m.update(library=name)), "library", "outside")


def test_a_symlink_out_of_the_folder_is_refused_even_with_its_hash(tiny_artifact, tmp_path):
    outside = tmp_path / "outside.so"
    outside.write_bytes(b"not ours")
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    folder = _edit(tiny_artifact, tmp_path / "a", lambda m: (m.update(library="evil.so"), m["files"].update({"evil.so": digest})))
    (folder / "evil.so").symlink_to(outside)
    _refused(folder, "evil.so", "symlink")


def test_files_are_mandatory_and_cover_every_named_file(tiny_artifact, tmp_path):
    _refused(_edit(tiny_artifact, tmp_path / "a", lambda m: m.pop("files")), "files")
    _refused(_edit(tiny_artifact, tmp_path / "b", lambda m: m["files"].pop("tokenizer.model")),
             "tokenizer.files[0]", "not listed")


def test_format_1_is_refused(tiny_artifact, tmp_path):
    _refused(_edit(tiny_artifact, tmp_path / "a", lambda m: m.update(format_version=1)), "format", str(FORMAT_VERSION))


def test_a_cross_cpu_artifact_is_refused(tiny_artifact, tmp_path):
    from ernie_compile.runtime import Session

    folder = _edit(tiny_artifact, tmp_path / "a", lambda m: m["target"].update(cross=True))
    with pytest.raises(UserError, match="cross build"):
        Session(folder)


def _synthetic(folder: Path, backend: str, fields: dict) -> Path:
    """An artifact of another backend (inductor, webgpu) with the fields the compiler writes for it
    (compiler/pipeline.py, targets/webgpu.py) and placeholder files: only its manifest is loaded."""
    folder.mkdir()
    files = {}
    for name, data in fields.pop("_files").items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    m = {"format_version": FORMAT_VERSION, "backend": backend, "vocab_size": 8, "files": files,
         "tokenizer": {"files": ["tokenizer.model"], "bos_token_id": 1, "eos_token_ids": [2]},
         "options": {"max_seq_len": 16}, **fields}
    (folder / MANIFEST).write_text(json.dumps(m))
    return folder


def _inductor(folder: Path, **changes) -> Path:
    fields = {"_files": {"prefill.pt2": b"p", "decode.pt2": b"d", "weights.safetensors": b"w", "tokenizer.model": b"t"},
              "target": {"spec": "cpu", "device": "cpu", "cross": False},
              "programs": {"prefill": "prefill.pt2", "decode": "decode.pt2"}, "python_ops": {},
              "weights": {"file": "weights.safetensors", "constants": {"a.b": "a_b"}},
              "kv_cache": {"max_seq_len": 16, "shapes": [[1, 2, 16, 4]]}}
    fields.update(changes)
    return _synthetic(folder, "inductor", fields)


def _webgpu(folder: Path, plan_changes=None, **changes) -> Path:
    plan = {"kernels": {"k0": {"wgsl": "kernels/k0.wgsl"}}, "shards": [{"file": "weights-00000.bin", "bytes": 4}],
            "buffers": [], "functions": {"prefill": {}, "decode": {}}, "vars": {"T": [1, 16]}, "limits": {}}
    plan.update(plan_changes or {})
    fields = {"_files": {"plan.json": json.dumps(plan).encode(), "kernels/k0.wgsl": b"fn", "weights-00000.bin": b"1234",
                         "tokenizer.model": b"t", "vocab.json": b"[]"},
              "target": {"spec": "webgpu", "device": "webgpu", "tvm": "webgpu", "cross": False},
              "library": "plan.json", "weights": {"shards": ["weights-00000.bin"], "tensors": 1},
              "kv_cache": {"max_seq_len": 16, "page_size": 16}}
    fields.update(changes)
    folder = _synthetic(folder, "webgpu", fields)
    m = json.loads((folder / MANIFEST).read_text())
    m["tokenizer"].update(vocab="vocab.json", strip_leading_space=True)
    (folder / MANIFEST).write_text(json.dumps(m))
    return folder


def test_inductor_and_webgpu_manifests(tmp_path):
    assert load_manifest(_inductor(tmp_path / "i")).backend == "inductor"
    _refused(_inductor(tmp_path / "i2", programs={"prefill": "prefill.pt2"}), "programs.decode", "missing")
    _refused(_inductor(tmp_path / "i3", programs={"prefill": "../prefill.pt2", "decode": "decode.pt2"}), "outside")
    assert load_manifest(_webgpu(tmp_path / "w")).backend == "webgpu"
    _refused(_webgpu(tmp_path / "w2", {"kernels": {"k0": {"wgsl": "../k0.wgsl"}}}), "plan.json.kernels.k0.wgsl", "outside")
    _refused(_webgpu(tmp_path / "w3", {"shards": [{"file": "weights-00001.bin"}]}), "not listed")
    _refused(_webgpu(tmp_path / "w4", weights={"shards": []}), "weights.shards")
