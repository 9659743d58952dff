"""Schedule tuning: measured search over a kernel's schedule parameters, kept in a database.

A target's kernel module declares which kernels take schedule parameters (`TUNABLE`: name →
parameter space, default, and how to build + feed the kernel for a measurement). With `--tune`, each
such kernel the compile needs is searched on this machine the first time its key is seen; the
measured candidates go into the database as they finish (an interrupted search resumes where it
stopped), and later compiles with the same database reuse the best without searching.

Database (`--tuning-db FILE`): JSON lines. Line 1: {"format": "ernie-compile-tuning", "version": 1}.
Every other line is one measured candidate:
    {"key": {"target": …, "kernel": "linear", "shape": [n, k], "dtype": …, "quant": … | null},
     "params": {…}, "seconds": s}
`seconds` is the objective: per token, for a 64-token prompt then 64 decoded tokens,
(t(M = 64) + 64 · t(M = 1)) / 128 — decode and prefill share one kernel on the CPU — each t a
median of cold-cache runs (weights read from memory, as in the model). A candidate whose measurement
failed (its build or run raised, killed its process or ran past MEASURE_TIMEOUT) is kept with
"seconds": null and its "error", so that it is neither retried nor chosen.

Measurements run in a child process (TVM's PopenWorker, as MetaSchedule's builders and runners do):
a candidate that aborts LLVM or faults takes that process down, not the compile.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

FORMAT = {"format": "ernie-compile-tuning", "version": 1}
PROMPT, DECODE = 64, 64
FLUSH_BYTES = 256 << 20  # more than any CPU's last-level cache
MEASURE_TIMEOUT = 600.0  # seconds for one candidate's build and runs (the 0.3b's largest: ~10 s here)
FAILED = float("inf")  # a failed candidate's objective: never the best


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass
class TuningDB:
    path: Path
    trials: dict[str, dict[str, float]] = field(default_factory=dict)  # key → {params json: seconds}

    @classmethod
    def open(cls, path: str | Path) -> "TuningDB":
        """Read `path` (created if missing). A file that is not a tuning database is a user error."""
        db = cls(Path(path))
        if not db.path.exists():
            db.path.parent.mkdir(parents=True, exist_ok=True)
            db.path.write_text(_canon(FORMAT) + "\n")
            return db
        text = db.path.read_text()
        if text and not text.endswith("\n"):  # cut short mid-line by an interruption: end that line
            with db.path.open("a") as f:
                f.write("\n")
        lines = text.splitlines()
        try:
            if not lines or json.loads(lines[0]) != FORMAT:
                raise ValueError("no tuning-database header")
            for line in lines[1:]:
                if line.strip():  # a line cut short by an interruption is dropped, not fatal
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    seconds = FAILED if rec["seconds"] is None else float(rec["seconds"])
                    db.trials.setdefault(_canon(rec["key"]), {})[_canon(rec["params"])] = seconds
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--tuning-db {path}: not an ernie-compile tuning database ({e})") from None
        return db

    def add(self, key: dict, params: dict, seconds: float | None, error: str | None = None) -> None:
        """One trial; `seconds` None: it failed with `error`."""
        self.trials.setdefault(_canon(key), {})[_canon(params)] = FAILED if seconds is None else seconds
        rec = {"key": key, "params": params, "seconds": seconds} | ({"error": error} if error else {})
        with self.path.open("a") as f:  # one line per trial, flushed: resumable after an interruption
            f.write(_canon(rec) + "\n")

    def measured(self, key: dict) -> dict[str, float]:
        return self.trials.get(_canon(key), {})

    def best(self, key: dict) -> dict | None:
        """The fastest candidate measured for `key`; None if none was (or every one failed)."""
        done = {p: t for p, t in self.measured(key).items() if t != FAILED}
        return json.loads(min(done, key=done.get)) if done else None

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass
class Tuner:
    """What a compile asks for schedule parameters. Without a database: the kernels' defaults. With
    one: its best. With `search`: measure what the database lacks, within the budget."""

    db: TuningDB | None = None
    search: bool = False
    max_trials: int | None = None  # measurements in this compile; None: no limit
    max_seconds: float | None = None
    log: object = print
    stats: dict = field(default_factory=lambda: {"searched": 0, "failed": 0, "reused": 0, "default": 0})
    _start: float = field(default_factory=time.perf_counter)

    def _budget_left(self) -> bool:
        if self.max_trials is not None and self.stats["searched"] >= self.max_trials:
            return False
        return self.max_seconds is None or time.perf_counter() - self._start < self.max_seconds

    def params(self, tunable: dict, key: dict) -> dict:
        if self.db is None:
            self.stats["default"] += 1
            return dict(tunable["default"])
        candidates = [c for c in _space(tunable["space"]) if tunable["valid"](key, c)]
        done = self.db.measured(key)
        todo = [c for c in candidates if _canon(c) not in done]
        if self.search and todo:
            self.log(f"  tuning {key['kernel']} {key['shape']}: {len(todo)} of {len(candidates)} candidates to measure")
            for c in todo:
                if not self._budget_left():
                    break
                try:
                    self.db.add(key, c, measure(tunable, key, c))
                except MeasureFailed as e:
                    self.log(f"  tuning {key['kernel']} {key['shape']} {_canon(c)}: failed ({e}); skipped")
                    self.db.add(key, c, None, str(e))
                    self.stats["failed"] += 1
                self.stats["searched"] += 1
        else:
            self.stats["reused" if done else "default"] += 1
        return self.db.best(key) or dict(tunable["default"])

    def report(self) -> dict:
        out = dict(self.stats)
        if self.db is not None:
            out.update(db=str(self.db.path), db_sha256=self.db.sha256())
        return out


def _space(space: dict) -> list[dict]:
    names = sorted(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[n] for n in names))]


class MeasureFailed(Exception):
    """A candidate's measurement did not finish: the reason, in one line."""


_worker = None  # the child process measurements run in, started at the first one


def measure(tunable: dict, key: dict, params: dict) -> float:
    """The objective (module docstring) of one candidate on this machine, measured in the child
    process; MeasureFailed if the build or the runs raised, the child died (it restarts for the next
    candidate) or it ran past MEASURE_TIMEOUT."""
    global _worker
    from tvm.support.popen_pool import PopenWorker

    if _worker is None:
        _worker = PopenWorker()
    _worker.send(_measure_here, (tunable, key, params), timeout=MEASURE_TIMEOUT)
    try:
        return _worker.recv()
    except ChildProcessError:
        _worker.kill()
        raise MeasureFailed("the measuring process died (a crash in the build or the kernel)") from None
    except TimeoutError:
        raise MeasureFailed(f"not done in {MEASURE_TIMEOUT:.0f} s") from None
    except Exception as e:  # raised in the child, carried back
        raise MeasureFailed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _measure_here(tunable: dict, key: dict, params: dict) -> float:
    """measure's work, in the process that runs it, median of repeats."""
    import numpy as np
    import tvm

    from ..runtime.tvm_engine import pin_thread_count

    pin_thread_count(tvm)  # measure with the threads the runtime will use
    func = tunable["build"](key, params).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(key["target"]))
    dev = tvm.cpu()
    # every run starts with the caches flushed: in the model a kernel's weights come from DRAM (the
    # other layers' evict them), and a warm-cache measurement of a 20 MB MoE decode had picked
    # schedules that lost 12% end to end
    timer = lib.mod.time_evaluator("main", dev, number=1, repeat=9, cache_flush_bytes=FLUSH_BYTES)
    seconds = {}
    for m in (1, PROMPT):
        args = [tvm.runtime.tensor(a, dev) for a in tunable["inputs"](key, m, np.random.default_rng(0))]
        seconds[m] = float(np.median(timer(*args).results))
    return (seconds[PROMPT] + DECODE * seconds[1]) / (PROMPT + DECODE)
