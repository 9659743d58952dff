"""Memory read bandwidth probe for the bench scripts (bench/membw.c, built with the system's cc).

The read bandwidth of this machine swings between ~30 and ~65 GB/s from one second to the next (a
shared host), so a bound measured once per bench run says little about a decode measured a minute
later. The bench measures it right before and right after each timed decode instead, and sets each
decode against the mean of the two (see common.RUN)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import statistics
import subprocess
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("membw.c")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ernie-compile-bench"


def _library() -> ctypes.CDLL:
    """membw.c as a shared library, built once per source version."""
    code = SOURCE.read_bytes()
    lib = CACHE / f"membw-{hashlib.sha256(code).hexdigest()[:12]}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["cc", "-O2", "-mavx2", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(tmp)],
                       check=True)
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    dll.read_seconds.restype = ctypes.c_double
    dll.read_seconds.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    return dll


class ReadBandwidth:
    """probe() → GB/s: the median of `passes` reads of a `mib`-MiB buffer with `threads` threads."""

    def __init__(self, threads: int = 2, mib: int = 256, passes: int = 3):
        self._dll = _library()
        self.threads, self.passes = threads, passes
        n = mib * 2**20 // 4
        raw = np.ones(n + 16, np.float32)  # 32-byte alignment by offset
        skip = (-raw.ctypes.data % 32) // 4
        self._buf = raw[skip:skip + n - n % (32 * threads)]
        self.probe()  # first touch and page faults out of the way

    def probe(self) -> float:
        total = ctypes.c_float()
        secs = [self._dll.read_seconds(self._buf.ctypes.data, self._buf.size, self.threads, ctypes.byref(total))
                for _ in range(self.passes)]
        return self._buf.nbytes / statistics.median(secs) / 1e9


class ProbeProcess:
    """A ReadBandwidth in a process of its own, so that its buffer stays out of the measured
    process's peak RSS; it waits on a pipe while the measured process runs."""

    def __init__(self):
        import sys
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True)

    def probe(self) -> float:
        self._proc.stdin.write("probe\n")
        self._proc.stdin.flush()
        return float(self._proc.stdout.readline())

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait()


if __name__ == "__main__":  # the ProbeProcess side: one probe per line read
    import sys
    bw = ReadBandwidth()
    for _ in sys.stdin:
        print(bw.probe(), flush=True)
