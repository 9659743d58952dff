"""Option sweeps: compile one model under every combination of some options, measure each artifact
on this machine, and write a report a person would rather look at than read.

    ernie-tune --model ernie-4.5-0.3b --sweep bits=none,8,4 --sweep group_size=32,128 -o sweep/

The report folder holds sweep.csv (one row per combination: the options, artifact MiB, compile
seconds, prefill tok/s, decode tok/s, and the accuracy report's KL / top-1 when quantized),
sweep.md (the same as a markdown table) and one PNG per swept option (tok/s against that option,
one line per combination of the others). Speeds are medians of `reps` runs after a warm-up.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import statistics
import tempfile
from pathlib import Path

from ..errors import UserError
from .options import CompileOptions

# option name → how a sweep value is parsed ("none" = the option's unset value)
SWEEPABLE = {"bits": str, "group_size": int, "embed_bits": int, "dtype": str, "target": str,
             "fuse_attention": lambda v: v.lower() in ("1", "true", "yes"), "symmetric": lambda v: v.lower() in ("1", "true", "yes")}


def parse_axes(items: list[str]) -> dict[str, list]:
    """['bits=none,8,4', 'group_size=32,128'] → {'bits': [None, '8', '4'], 'group_size': [32, 128]}."""
    axes = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in SWEEPABLE:
            raise UserError(f"--sweep {item!r}: expected OPTION=V1,V2,… with OPTION one of {', '.join(SWEEPABLE)}")
        try:
            axes[name] = [None if v.strip().lower() == "none" else SWEEPABLE[name](v.strip()) for v in values.split(",")]
        except ValueError:
            raise UserError(f"--sweep {item!r}: a value does not parse for {name}") from None
    if not axes:
        raise UserError("--sweep: give at least one OPTION=V1,V2,…")
    return axes


def run(base: CompileOptions, axes: dict[str, list], out_dir: Path, prompt_tokens: int = 32,
        decode_tokens: int = 16, reps: int = 3, log=print) -> list[dict]:
    """Compile and measure every combination; write the report into out_dir; return the rows."""
    from ..runtime import Session
    from .pipeline import compile_model

    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(axes)
    rows = []
    prompt = [(i * 7919) % 997 + 3 for i in range(prompt_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, values in enumerate(itertools.product(*(axes[n] for n in names))):
            combo = dict(zip(names, values))
            log(f"[sweep {i + 1}] {combo}")
            opts = dataclasses.replace(base, output=Path(tmp) / f"a{i}", report=None, dump_ir=None, **combo)
            report = compile_model(opts, log=lambda *_: None)
            row = {**{n: ("none" if v is None else v) for n, v in combo.items()},
                   "MiB": round(report["artifact_bytes"] / 2**20, 2),
                   "compile s": round(sum(report["stages"].values()), 1)}
            session = Session(opts.output)
            prompt = [t % session.vocab_size for t in prompt]
            runs = [session.generate(prompt, decode_tokens + 1, stop_at_eos=False) for _ in range(reps + 1)][1:]
            row["prefill tok/s"] = round(statistics.median(r.prefill_tok_s for r in runs), 1)
            row["decode tok/s"] = round(statistics.median(r.decode_tok_s for r in runs), 1)
            acc = report.get("accuracy") or {}
            row["KL mean"] = round(acc["kl_mean"], 5) if "kl_mean" in acc else ""
            row["top-1"] = round(acc["top1_agreement"], 3) if "top1_agreement" in acc else ""
            rows.append(row)
            del session
    _write(rows, names, out_dir)
    return rows


def _write(rows: list[dict], names: list[str], out_dir: Path) -> None:
    cols = list(rows[0])
    with (out_dir / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in names:
        others = [n for n in names if n != name]
        xs = list(dict.fromkeys(str(r[name]) for r in rows))
        fig, axs = plt.subplots(1, 2, figsize=(10, 4))
        for metric, ax in zip(("prefill tok/s", "decode tok/s"), axs):
            groups = {}
            for r in rows:
                groups.setdefault(tuple(str(r[o]) for o in others), []).append(r)
            for group, members in groups.items():
                ys = {str(r[name]): r[metric] for r in members}
                ax.plot(xs, [ys.get(x) for x in xs], marker="o",
                        label=", ".join(f"{o}={g}" for o, g in zip(others, group)) or None)
            ax.set_xlabel(name)
            ax.set_ylabel(metric)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if others:
                ax.legend(fontsize=8)
        fig.suptitle(f"tok/s against {name}")
        fig.tight_layout()
        fig.savefig(out_dir / f"sweep_{name}.png", dpi=100)
        plt.close(fig)
