"""Shared by the bench scripts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


RUN = """
import json, statistics, sys
sys.path.insert(0, {root!r})
from ernie_compile.runtime import Session
s = Session({folder!r})
prompt = {prompt!r}
pre, dec = [], []
for _ in range({reps} + 1):
    r = s.generate(prompt, {decode} + 1, stop_at_eos=False)
    pre.append(r.prefill_tok_s); dec.append(r.decode_tok_s)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked (large) parent
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"prefill_tok_s": statistics.median(pre[1:]), "decode_tok_s": statistics.median(dec[1:]),
                  "peak_rss_MiB": int(hwm) / 1024}}))
"""


def run_artifact(folder: Path, prompt: list[int], decode: int, reps: int) -> dict:
    """Speeds (medians of `reps` after a warm-up) and peak RSS of a fresh runtime process, which is
    what a user's process would hold."""
    proc = subprocess.run([sys.executable, "-c", RUN.format(root=str(ROOT), folder=str(folder), prompt=prompt,
                                                            reps=reps, decode=decode)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llamacpp_peer(model, folder: Path, prompt: int, decode: int) -> dict | None:
    """llama.cpp Q4_0 on `model`'s weights (../shared/tools/llamacpp_peer.sh, 2 threads): its JSON
    line (size_bytes, prefill/decode tok/s medians), or None after printing why it failed."""
    from ernie_compile.compiler.load import ASSETS

    model.save_pretrained(folder)
    shutil.copyfile(ASSETS / "tokenizer.model", folder / "tokenizer.model")
    peer = subprocess.run(["bash", str(ROOT.parent / "shared" / "tools" / "llamacpp_peer.sh"), str(folder), "Q4_0",
                           "2", str(prompt), str(decode)], capture_output=True, text=True)
    if peer.returncode:
        print(f"llama.cpp peer failed: {peer.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(peer.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    """Rows of dicts as one markdown table: every key a column, floats to 3 significant digits."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")
