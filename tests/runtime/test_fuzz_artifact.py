"""Fuzz the artifact loader: hundreds of seeded mutations of one compiled artifact's manifest and
files, each loaded through what ernie-run uses (load_manifest, then Session).

The only allowed outcomes: a UserError of one line (ernie-run: exit 2, one line on stderr, no
traceback), or — for a mutation that changes nothing the runtime reads — a run that generates the
same tokens as the untouched artifact, with every file the manifest lists matching its sha256
(checked here with hashlib, not with the runtime's own code). Mutations that must be refused
(a path leaving the folder, a changed hash, changed file bytes) may not run at all.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_compile.errors import USER_ERROR_EXIT, UserError
from ernie_compile.runtime.artifact import MANIFEST, load_manifest
from ernie_compile.runtime.session import Session

PROMPT = [17, 300, 5, 981, 42]
NEW_TOKENS = 2
SEED = 1234
WRONG_VALUES = ["x", "", 1.5, -1, 0, None, [], {}, True, "1", [1], {"a": 1}]
HUGE = [2**31, 2**63, 10**30, -(2**63), -1, 0, 1]
TRAVERSALS = ["../../../etc/passwd", "/etc/passwd", "sub/../../outside.bin", "./../x", "..", "a/../../b",
              "C:/x", "\\\\server\\share", "lib.so\0.txt"]


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _paths(obj, prefix=()):
    """Every path to a value inside the manifest (dict keys and list indices)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _walk(rng: random.Random, m: dict) -> tuple:
    """A random path, biased to the manifest's upper levels (where the runtime's fields are)."""
    path, node = (), m
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return path or ("files",)
        k = rng.choice(keys)
        path, node = path + (k,), node[k]
        if not isinstance(node, (dict, list)) or rng.random() < 0.45:
            return path


def _parent(m, path):
    for k in path[:-1]:
        m = m[k]
    return m


class Case:
    """One mutation: `apply(folder, manifest)` edits a private copy; `must_refuse` when no run may succeed."""

    def __init__(self, name: str, apply, must_refuse: bool):
        self.name, self.apply, self.must_refuse = name, apply, must_refuse


def _manifest_cases(rng: random.Random, base: dict, outside: Path) -> list[Case]:
    cases = []
    paths = list(_paths(base))
    for _ in range(80):  # delete a key or a list item
        path = _walk(rng, base)
        cases.append(Case(f"delete {path}", lambda f, m, p=path: _parent(m, p).pop(p[-1]), False))
    for _ in range(80):  # a value of the wrong type
        path, value = _walk(rng, base), rng.choice(WRONG_VALUES)
        cases.append(Case(f"set {path} = {value!r}", lambda f, m, p=path, v=value: _parent(m, p).__setitem__(p[-1], v),
                          False))
    ints = [p for p in paths if isinstance(_get(base, p), int) and not isinstance(_get(base, p), bool)]
    for _ in range(40):  # huge and edge numbers in every integer field
        path, value = rng.choice(ints), rng.choice(HUGE)
        cases.append(Case(f"set {path} = {value}", lambda f, m, p=path, v=value: _parent(m, p).__setitem__(p[-1], v),
                          False))
    file_fields = [("library",), ("weights", "file"), ("tokenizer", "files", 0)]
    for field in file_fields:  # paths leaving the folder, even with a correct hash for what they name
        for bad in TRAVERSALS:
            cases.append(Case(f"{field} -> {bad!r}", lambda f, m, p=field, b=bad: _point(m, p, b, None), True))
        cases.append(Case(f"{field} -> outside file with its hash",
                          lambda f, m, p=field: _point(m, p, str(outside), _hash(outside)), True))
        cases.append(Case(f"{field} -> ../outside with its hash",
                          lambda f, m, p=field: _point(m, p, os.path.relpath(outside, f), _hash(outside)), True))
        cases.append(Case(f"{field} -> symlink to outside",
                          lambda f, m, p=field: _symlink(f, m, p, "evil" + Path(_get(m, p)).suffix, outside), True))
        cases.append(Case(f"{field} -> file in a symlinked folder",
                          lambda f, m, p=field: _symlink(f, m, p, "sub/" + outside.name, outside.parent), True))
        cases.append(Case(f"{field} -> file not in files", lambda f, m, p=field: _unlisted(f, m, p), True))
    for name in base["files"]:  # hashes: changed, malformed, dropped; files missing
        cases += [
            Case(f"files.{name}: one hex digit changed", lambda f, m, n=name: _flip_digest(m, n), True),
            Case(f"files.{name}: upper case", lambda f, m, n=name: m["files"].__setitem__(n, m["files"][n].upper()), True),
            Case(f"files.{name}: truncated", lambda f, m, n=name: m["files"].__setitem__(n, m["files"][n][:40]), True),
            Case(f"files.{name}: dropped", lambda f, m, n=name: m["files"].pop(n), True),
            Case(f"{name}: deleted", lambda f, m, n=name: (f / n).unlink(), True),
        ]
    cases.append(Case("files: dropped", lambda f, m: m.pop("files"), True))
    cases.append(Case("files: empty", lambda f, m: m["files"].clear(), True))
    cases.append(Case("files: lists a missing file", lambda f, m: m["files"].__setitem__("ghost.bin", "0" * 64), True))
    for other in base["files"]:  # a field naming another (hashed) file of the artifact
        for field in file_fields[:2]:
            if other != _get(base, field):
                cases.append(Case(f"{field} -> {other}", lambda f, m, p=field, o=other: _point(m, p, o, None), False))
    return cases


def _byte_cases(rng: random.Random, base: dict) -> list[Case]:
    cases = []
    for name in base["files"]:
        for _ in range(12):
            kind = rng.choice(["flip", "truncate", "append", "empty", "invert-page"])
            cases.append(Case(f"{name}: {kind}", lambda f, m, n=name, k=kind, s=rng.random(): _damage(f / n, k, s), True))
    return cases


def _get(m, path):
    for k in path:
        m = m[k]
    return m


def _point(m: dict, path: tuple, name: str, digest: str | None) -> None:
    _parent(m, path)[path[-1]] = name
    if digest:
        m["files"][name] = digest


def _symlink(folder: Path, m: dict, path: tuple, name: str, target: Path) -> None:
    link = folder / name.split("/")[0]
    link.symlink_to(target)
    _point(m, path, name, _hash(folder / name))


def _unlisted(folder: Path, m: dict, path: tuple) -> None:
    src = folder / _get(m, path)
    shutil.copyfile(src, folder / ("copy-" + src.name))
    _point(m, path, "copy-" + src.name, None)


def _flip_digest(m: dict, name: str) -> None:
    d = m["files"][name]
    m["files"][name] = d[:10] + ("0" if d[10] != "0" else "1") + d[11:]


def _damage(path: Path, kind: str, where: float) -> None:
    """Change the bytes of `path` (always: every kind leaves it different from before)."""
    data = bytearray(path.read_bytes())
    path.unlink()  # a hardlink to the shared copy: write a new file instead of changing that one
    at = int(where * (len(data) - 1))
    if kind == "flip":
        data[at] ^= 1 << int(where * 1000) % 8
    elif kind == "truncate":
        del data[at:]
    elif kind == "append":
        data += b"\0" * (1 + at % 64)
    elif kind == "empty":
        data = bytearray()
    else:  # invert a page
        data[at:at + 4096] = bytes(b ^ 0xFF for b in data[at:at + 4096])
    path.write_bytes(bytes(data))


def _copy(src: Path, dst: Path) -> Path:
    """The artifact with every file hardlinked (mutations replace files, never write into them)."""
    dst.mkdir()
    for p in src.iterdir():
        os.link(p, dst / p.name)
    return dst


def _outcome(folder: Path):
    """("refused", message) or ("ran", tokens): what ernie-run's loading path does with `folder`."""
    try:
        session = Session(load_manifest(folder))
        return "ran", session.generate(PROMPT, NEW_TOKENS, stop_at_eos=False).tokens
    except UserError as e:
        return "refused", str(e)


@pytest.fixture(scope="module")
def base(tiny_artifact, tmp_path_factory):
    """The untouched artifact's manifest and tokens, and a file outside every copy (a traversal's target)."""
    outside = tmp_path_factory.mktemp("outside") / "outside.bin"
    outside.write_bytes((tiny_artifact / "lib.so").read_bytes())
    kind, tokens = _outcome(tiny_artifact)
    assert kind == "ran", tokens
    return json.loads((tiny_artifact / MANIFEST).read_text()), tokens, outside


def _cases(base_manifest, outside):
    rng = random.Random(SEED)
    return _manifest_cases(rng, base_manifest, outside) + _byte_cases(rng, base_manifest)


def _prepare(case: Case, src: Path, dst: Path, base_manifest: dict) -> Path:
    folder = _copy(src, dst)
    m = copy.deepcopy(base_manifest)
    case.apply(folder, m)
    (folder / MANIFEST).unlink()
    (folder / MANIFEST).write_text(json.dumps(m))
    return folder


def test_mutated_artifacts_are_refused_in_one_line_or_run_unchanged(tiny_artifact, base, tmp_path):
    manifest, expected, outside = base
    cases = _cases(manifest, outside)
    assert len(cases) >= 250
    ran = refused = 0
    problems = []  # every failing mutation, not only the first
    for i, case in enumerate(cases):
        folder = _prepare(case, tiny_artifact, tmp_path / f"m{i}", manifest)
        try:
            kind, detail = _outcome(folder)
        except Exception as e:  # anything but a UserError is a traceback for the user
            problems.append(f"{case.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if kind == "refused":
            refused += 1
            if not detail or "\n" in detail:
                problems.append(f"{case.name}: not one line: {detail!r}")
        else:
            ran += 1
            if case.must_refuse:
                problems.append(f"{case.name}: ran; it must be refused")
            if detail != expected:
                problems.append(f"{case.name}: ran with other tokens {detail} != {expected}")
            listed = json.loads((folder / MANIFEST).read_text())["files"]
            for name, digest in listed.items():  # nothing ran with a file that does not match its hash
                if _hash(folder / name) != digest:
                    problems.append(f"{case.name}: ran with {name} not matching its sha256")
        shutil.rmtree(folder)
        if i % 25 == 0:  # Session freezes the collector's view (gc.freeze); let the dropped sessions go
            gc.unfreeze()
            gc.collect()
    assert not problems, f"{len(problems)} of {len(cases)} mutations:\n" + "\n".join(problems)
    assert refused > 0 and ran > 0, (refused, ran)


def test_mutations_through_the_ernie_run_process(tiny_artifact, base, tmp_path):
    """A handful of the same mutations through `ernie-run` itself: exit 2 and one line, or exit 0."""
    manifest, expected, outside = base
    cases = _cases(manifest, outside)
    picked = [next(c for c in cases if c.name.startswith(prefix))
              for prefix in ("('library',) -> '../../../etc/passwd'", "('library',) -> symlink", "files.lib.so: one hex",
                             "weights.safetensors: ", "delete ", "set ")]
    picked.append(Case("untouched", lambda f, m: None, False))
    procs = []
    for i, case in enumerate(picked):
        folder = _prepare(case, tiny_artifact, tmp_path / f"p{i}", manifest)
        procs.append((case, subprocess.Popen(
            [sys.executable, "-m", "ernie_compile.runtime.cli", str(folder), "--json", "--ignore-eos",
             "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for case, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, f"{case.name}: {err}"
        if proc.returncode == 0:
            assert not case.must_refuse and json.loads(out)["tokens"] == expected, case.name
        else:
            assert proc.returncode == USER_ERROR_EXIT, f"{case.name}: exit {proc.returncode}: {err}"
            assert len(err.strip().splitlines()) == 1 and err.startswith("ernie-run: error: "), f"{case.name}: {err}"
