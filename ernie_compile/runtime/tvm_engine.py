"""The TVM backend's engine: the artifact's library in TVM's VM, and TVM's paged KV cache created by
the library's own `create_kv` function; this file drives the cache's sequence bookkeeping (add
sequence, begin/end forward) around each call.

Two ways to use it: `reset` + `step` run one sequence (Session); `open_batch` + `add_sequence` /
`fork_sequence` / `remove_sequence` + `step_many` run many sequences in one cache (the server,
ernie_compile/serve/). `step_many` is one call of the compiled `batch` step (a ragged batch) where
the artifact has one, else one prefill/decode call per sequence."""
from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

from ..errors import InternalError, UserError
from .artifact import Manifest

# safetensors dtype names → numpy (the dtypes our artifacts store)
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
                      "I16": np.int16, "U16": np.uint16, "I32": np.int32, "U32": np.uint32, "I64": np.int64}


def import_runtime_only_tvm(manifest: Manifest) -> None:
    """Import TVM as a process that only runs the artifact of `manifest` needs it, where that is a
    CPU artifact of this backend: TVM's runtime library alone (TVM_USE_RUNTIME_LIB; the compiler
    library is 250 MB), and without torch, which tvm_ffi imports whenever torch is installed, for
    tensor exchange we do not use. Resident memory after the import: 385 -> 80 MiB. ernie-run calls
    this first, with the manifest load_manifest checked. Does nothing for other artifacts (GPU
    runtimes are untried without the compiler library) or where TVM is already imported: a process
    that also compiles needs the whole of it."""
    if manifest.backend != "tvm" or manifest.device != "cpu" or "tvm" in sys.modules:
        return
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError, as where it is not installed
    try:
        import tvm
        from tvm_ffi.libinfo import load_lib_ctypes
    finally:
        if hide_torch and sys.modules.get("torch", False) is None:
            del sys.modules["torch"]
    # the runtime's second library (top-k and sort, which MoE routing calls), which TVM loads only
    # alongside its compiler
    load_lib_ctypes(package="tvm", target_name="tvm_runtime_extra", mode="RTLD_LOCAL",
                    extra_lib_paths=[Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent])


def read_tensors(path: Path, names: list[str]):
    """The named tensors of a safetensors file as numpy arrays, one at a time, read with plain file
    reads. safetensors' own reader maps the file, and every page it has touched stays resident
    until the map closes: loading a 216 MiB artifact peaked at 2 x its weights."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        for name in names:
            meta = header[name]
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise InternalError(f"{path}: tensor {name} has dtype {meta['dtype']}, which the runtime does not read")
            dtype = np.dtype(SAFETENSORS_DTYPES[meta["dtype"]])
            begin, end = meta["data_offsets"]
            f.seek(8 + size + begin)
            yield np.fromfile(f, dtype, (end - begin) // dtype.itemsize).reshape(meta["shape"])


@contextlib.contextmanager
def _serve_prebuilt_cuda(fatbin: Path, source_sha256: str):
    """TVM's CUDA runtime compiles a library's kernel source when it loads it, through the hook
    `tvm_callback_cuda_compile`. While the library loads, answer it with the fatbin built at compile
    time (targets/cuda.py) instead, so no CUDA compiler is needed here; a source that is not the one
    the fatbin was built from is refused rather than compiled. The hook the process had before is
    restored afterwards: TVM's own builds in the same process call it too."""
    import hashlib

    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    binary = fatbin.read_bytes()

    def hook(code, *_):
        if hashlib.sha256(code.encode()).hexdigest() != source_sha256:
            raise UserError(f"{fatbin.parent}: the library's CUDA source does not match {fatbin.name}")
        return bytearray(binary)

    before = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, hook, override=True)
    try:
        yield
    finally:
        if before is not None:
            tvm_ffi.register_global_func(name, before, override=True)
        else:
            tvm_ffi.registry.remove_global_func(name)


def physical_cores() -> int | None:
    """Distinct (package, core) pairs among the CPUs this process may run on (Linux sysfs), or None
    where that cannot be read."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return None
    return len(cores) or None


def pin_thread_count(tvm) -> None:
    """Fix TVM's CPU thread count for the process: one thread per physical core.

    Without TVM_NUM_THREADS (or OMP_NUM_THREADS) in the environment, TVM takes
    std::thread::hardware_concurrency() / 2 on x86 (assuming two hyper-threads per core) and asks
    for it again at every parallel kernel launch, which glibc answers by opening and reading
    /sys/devices/system/cpu/online: three system calls per launch, ~110 launches per 0.3b decode
    step. On a machine of 2 cores with one thread each that gave 1 thread (2 threads: 0.3b 4-bit
    decode 122 -> 155 tok/s here). With the variable set TVM reads only the variable. A user's own
    setting of either variable is kept; where the topology is unreadable, TVM's own count is pinned."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        threads = physical_cores() or tvm.get_global_func("runtime.NumThreads")()
        os.environ["TVM_NUM_THREADS"] = str(threads)


class TvmEngine:
    def __init__(self, folder: Path, manifest: dict):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        m = self.manifest = manifest
        device = m["target"]["device"]
        self.device = tvm.runtime.device(device, 0)
        if device != "cpu" and not self.device.exist:
            raise UserError(f"{folder}: built for {m['target']['spec']}; this machine has no {device} device")
        pin_thread_count(tvm)
        kernels = m.get("kernels", {})
        with (_serve_prebuilt_cuda(folder / kernels["fatbin"], kernels["source_sha256"]) if kernels.get("fatbin")
              else contextlib.nullcontext()):
            self._vm = VirtualMachine(tvm.runtime.load_module(str(folder / m["library"])), self.device)
        # one tensor at a time: the host copy of each is dropped once the device copy exists
        self._weights = [tvm.runtime.tensor(a, self.device)
                         for a in read_tensors(folder / m["weights"]["file"], m["weights"]["order"])]
        self._prefill, self._decode, self._create_kv = (self._function(folder, m, k) for k in ("prefill", "decode", "create_kv"))
        self._kv_add = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self._kv_begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._kv_end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self._kv_remove = tvm.get_global_func("vm.builtin.kv_state_remove_sequence")
        self._kv_fork = tvm.get_global_func("vm.builtin.kv_state_fork_sequence")
        self._batch = self._function(folder, m, "batch") if "batch" in m["functions"] else None
        # the VL model's image encoder and mixed prefill (compiler/capture.py)
        self._encode, self._prefill_mm = (self._function(folder, m, k) if k in m["functions"] else None
                                          for k in ("encode_image", "prefill_mm"))
        self._shape = tvm.runtime.ShapeTuple
        self._tensor = lambda a: tvm.runtime.tensor(a, self.device)
        # On the CPU a decode step's inputs are written into tensors made once, and its logits are
        # read in place: a fresh tensor per input and a copy of the logits (fresh pages, faulted in)
        # cost ~0.4 ms per 0.3b step here, 6% of it.
        self._host = device == "cpu"
        if self._host:
            self._decode_ids = tvm.runtime.empty((1, 1), "int64", self.device)
            self._decode_pos = tvm.runtime.empty((1, 1), "int64", self.device)
            self._decode_ids_np, self._decode_pos_np = np.from_dlpack(self._decode_ids), np.from_dlpack(self._decode_pos)

    def _function(self, folder: Path, m: dict, key: str):
        """The library's function the manifest names for `key` (a manifest naming another is refused)."""
        name = m["functions"][key]
        try:
            return self._vm[name]
        except AttributeError:
            raise UserError(f"{folder}: functions.{key}: the library has no function {name!r}") from None

    def reset(self) -> None:
        """A new, empty KV cache holding one sequence."""
        s = self._shape
        kv = self.manifest["kv_cache"]
        self._kv = self._create_kv(s([1]), s([kv["max_seq_len"]]), s([kv["max_seq_len"]]), s([kv["page_size"]]), s([0]))
        self._kv_add(self._kv, 0)

    def step(self, ids: list[int], start: int, offset: int = 0) -> np.ndarray:
        """Run `ids` at cache slots start, start+1, …, RoPE positions `offset` further on (the VL model's
        rope delta after an image); the logits after the last one, [V] float32."""
        n = len(ids)
        fn = self._decode if n == 1 else self._prefill
        if n == 1 and self._host:
            self._decode_ids_np[0, 0], self._decode_pos_np[0, 0] = ids[0], start + offset
            tokens, positions = self._decode_ids, self._decode_pos
        else:
            tokens = self._tensor(np.asarray([ids], dtype=np.int64))  # [1, n]
            positions = self._tensor(np.arange(start + offset, start + offset + n, dtype=np.int64)[None])  # [1, n]
        self._kv_begin(self._kv, self._shape([0]), self._shape([n]))
        logits = fn(tokens, positions, self._kv, *self._weights)
        self._kv_end(self._kv)
        return self._last_logits(logits)

    def _last_logits(self, logits) -> np.ndarray:
        """Row 0 of a step's logits [1, V] as float32. On the CPU in place: the array keeps the step's
        output tensor alive, and the VM allocates a new one per call."""
        out = np.from_dlpack(logits)[0] if self._host else logits.numpy()[0]
        return out if out.dtype == np.float32 else out.astype(np.float32)

    # ---- images (the VL model) ----

    def encode_image(self, patches: np.ndarray, positions: np.ndarray, merge2: int) -> np.ndarray:
        """One image's patches [N, C·p²] and their (h, w) positions [N, 2] → its features [N / merge², H]."""
        dtype = self.manifest["dtype"]
        m = patches.shape[0] // merge2
        out = self._encode(self._tensor(np.ascontiguousarray(patches.reshape(m, merge2, -1), dtype=dtype)),
                           self._tensor(np.ascontiguousarray(positions.reshape(m, merge2, 2), dtype=np.int64)),
                           *self._weights)
        return out.numpy()

    def step_images(self, ids: list[int], positions: np.ndarray, types: np.ndarray, features: np.ndarray,
                    seq_id: int = 0) -> np.ndarray:
        """A prompt holding images, into the empty sequence `seq_id`: ids [T], 3-D positions [3, T],
        modalities [T], the features of its placeholder tokens in order [F, H] → logits after the last
        token."""
        n = len(ids)
        self._kv_begin(self._kv, self._shape([seq_id]), self._shape([n]))
        logits = self._prefill_mm(self._tensor(np.asarray([ids], dtype=np.int64)),
                                  self._tensor(np.ascontiguousarray(positions.reshape(3, 1, n), dtype=np.int64)),
                                  self._tensor(np.asarray(types, dtype=np.int64)[None]),
                                  self._tensor(features), self._kv, *self._weights)
        self._kv_end(self._kv)
        return self._last_logits(logits)

    # ---- many sequences in one cache (the server) ----

    @property
    def batches(self) -> bool:
        """Whether step_many advances every sequence in one call (the artifact has a `batch` step)."""
        return self._batch is not None

    def open_batch(self, max_sequences: int) -> None:
        """A new, empty KV cache for up to `max_sequences` sequences of up to max_seq_len tokens each,
        and at most max_seq_len tokens per step_many call (the scheduler's token budget)."""
        s = self._shape
        kv = self.manifest["kv_cache"]
        n, page = kv["max_seq_len"], kv["page_size"]
        self._kv = self._create_kv(s([max_sequences]), s([max_sequences * (n + page)]), s([n]), s([page]), s([0]))

    def add_sequence(self, seq_id: int) -> None:
        self._kv_add(self._kv, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        """Drop the sequence; its pages (those no fork still shares) are free at once."""
        self._kv_remove(self._kv, seq_id)

    def fork_sequence(self, parent: int, child: int, length: int) -> None:
        """A new sequence `child` holding the first `length` cached tokens of `parent`: their pages
        are shared (copied on write by the cache), not recomputed."""
        self._kv_fork(self._kv, parent, child, length)

    def step_many(self, seq_ids: list[int], chunks: list[list[int]], starts: list[int],
                  offsets: list[int] | None = None) -> np.ndarray:
        """Append chunks[i] to sequence seq_ids[i] at cache slots starts[i], …, RoPE positions
        offsets[i] further on (a VL sequence's rope delta after its images; default 0); the logits
        after the last token of each chunk, [len(seq_ids), V] float32."""
        offsets = offsets or [0] * len(seq_ids)
        if self._batch is None:
            out = []
            for sid, ids, start, off in zip(seq_ids, chunks, starts, offsets):
                fn = self._decode if len(ids) == 1 else self._prefill
                tokens = self._tensor(np.asarray([ids], dtype=np.int64))  # [1, n]
                positions = self._tensor(np.arange(start + off, start + off + len(ids), dtype=np.int64)[None])
                self._kv_begin(self._kv, self._shape([sid]), self._shape([len(ids)]))
                logits = fn(tokens, positions, self._kv, *self._weights)
                self._kv_end(self._kv)
                out.append(self._last_logits(logits))  # in place on the CPU: one copy, the stack's
            return np.stack(out)
        lengths = [len(c) for c in chunks]
        tokens = np.concatenate([np.asarray(c, dtype=np.int64) for c in chunks])[None]  # [1, T]
        positions = np.concatenate([np.arange(s + o, s + o + n, dtype=np.int64)
                                    for s, o, n in zip(starts, offsets, lengths)])[None]
        rows = np.cumsum(lengths, dtype=np.int64) - 1  # [R]: each sequence's last token
        self._kv_begin(self._kv, self._shape(seq_ids), self._shape(lengths))
        logits = self._batch(self._tensor(tokens), self._tensor(positions), self._tensor(rows), self._kv,
                             *self._weights)
        self._kv_end(self._kv)
        # [R, V]; on the CPU read in place, as _last_logits (a copy of 8 rows of the 0.3b's 103k
        # logits took ~0.5 ms a step)
        out = np.from_dlpack(logits) if self._host else logits.numpy()
        return out if out.dtype == np.float32 else out.astype(np.float32)
