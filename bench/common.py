"""Shared by the bench scripts."""
from __future__ import annotations


def print_table(rows: list[dict]) -> None:
    """Rows of dicts as one markdown table: every key a column, floats to 3 significant digits."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")
