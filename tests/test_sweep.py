"""ernie-tune --sweep: every combination compiled and measured, the report written (CSV, markdown,
one PNG per swept option), bad axes refused in one line."""
from __future__ import annotations

import csv

from conftest import DENSE_CONFIGS, make_checkpoint, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def test_sweep_writes_the_report(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", DENSE_CONFIGS["mha-bias-hd16"], seed=4)
    out = tmp_path / "report"
    proc = run_cli("ernie_compile.tune_cli", "--model", str(ckpt), "--max-seq-len", "64", "--sweep", "bits=none,4",
                   "--sweep", "fuse_attention=true,false", "--prompt-tokens", "6", "--decode-tokens", "3",
                   "--reps", "1", "-o", str(out))
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["bits"], r["fuse_attention"]) for r in rows] == [("none", "True"), ("none", "False"),
                                                                ("4", "True"), ("4", "False")]
    assert all(float(r["prefill tok/s"]) > 0 and float(r["decode tok/s"]) > 0 for r in rows)
    assert float(rows[2]["MiB"]) < float(rows[0]["MiB"])  # 4-bit weights (the library is most of a tiny artifact)
    assert rows[0]["KL mean"] == "" and float(rows[2]["KL mean"]) >= 0 and 0 <= float(rows[2]["top-1"]) <= 1
    assert len((out / "sweep.md").read_text().splitlines()) == 2 + len(rows)
    for name in ("bits", "fuse_attention"):
        assert (out / f"sweep_{name}.png").read_bytes()[:8] == PNG
    assert "4 combinations" in proc.stdout


def test_bad_sweep_axis_is_a_one_line_error(tmp_path):
    proc = run_cli("ernie_compile.tune_cli", "--sweep", "colour=red", "-o", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "expected OPTION=V1,V2" in proc.stderr and "Traceback" not in proc.stderr
