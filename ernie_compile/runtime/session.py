"""Load an artifact and generate tokens: prefill once, then one decode call per token.

The KV cache is TVM's paged KV cache, created by the artifact's own `create_kv` function; this file
only drives its sequence bookkeeping (add sequence, begin/end forward) around each call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .artifact import read_manifest
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampler:
    """Greedy when temperature is 0; otherwise softmax(logits / T) restricted to the top-p mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]")

    def make(self):
        rng = np.random.default_rng(self.seed)

        def pick(logits: np.ndarray) -> int:
            if self.temperature == 0:
                return int(np.argmax(logits))
            z = logits.astype(np.float64) / self.temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            order = np.argsort(-p)
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
            return int(rng.choice(keep, p=p[keep] / p[keep].sum()))

        return pick


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)  # new tokens only
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prompt_tokens: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = len(self.tokens) - 1  # the first new token comes from prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def _serve_prebuilt_cuda(fatbin: Path, source_sha256: str) -> None:
    """TVM's CUDA runtime compiles a library's kernel source when it loads it, through the hook
    `tvm_callback_cuda_compile`. Answer it with the fatbin built at compile time (targets/cuda.py)
    instead, so no CUDA compiler is needed here; a source that is not the one the fatbin was built
    from is refused rather than compiled."""
    import hashlib

    import tvm_ffi

    binary = fatbin.read_bytes()

    def hook(code, *_):
        if hashlib.sha256(code.encode()).hexdigest() != source_sha256:
            raise UserError(f"{fatbin.parent}: the library's CUDA source does not match {fatbin.name}")
        return bytearray(binary)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", hook, override=True)


class Session:
    def __init__(self, folder: str | Path, verify: bool = True):
        import tvm
        from safetensors import safe_open
        from tvm.runtime.vm import VirtualMachine

        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder, verify=verify)
        device = m["target"]["device"]
        if device == "cpu" and not m["target"].get("runnable_here", True):
            raise UserError(f"{self.folder}: built for {m['target']['spec']}; it does not run on this machine")
        self.device = tvm.runtime.device(device, 0)
        if device != "cpu" and not self.device.exist:
            raise UserError(f"{self.folder}: built for {m['target']['spec']}; this machine has no {device} device")
        if m.get("kernels", {}).get("fatbin"):
            _serve_prebuilt_cuda(self.folder / m["kernels"]["fatbin"], m["kernels"]["source_sha256"])
        self._vm = VirtualMachine(tvm.runtime.load_module(str(self.folder / m["library"])), self.device)
        # one tensor at a time: the host copy of each is dropped once the device copy exists
        with safe_open(str(self.folder / m["weights"]["file"]), "np") as f:
            self._weights = [tvm.runtime.tensor(f.get_tensor(name), self.device) for name in m["weights"]["order"]]
        self._prefill = self._vm[m["functions"]["prefill"]]
        self._decode = self._vm[m["functions"]["decode"]]
        self._create_kv = self._vm[m["functions"]["create_kv"]]
        self._kv_add = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self._kv_begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._kv_end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self._shape = tvm.runtime.ShapeTuple
        self._tensor = lambda a: tvm.runtime.tensor(a, self.device)
        self.max_seq_len = m["kv_cache"]["max_seq_len"]
        self.eos_token_ids = set(m["tokenizer"]["eos_token_ids"])
        self.vocab_size = m["vocab_size"]
        self.tokenizer = Tokenizer(self.folder, m["tokenizer"])
        self.reset()

    def reset(self) -> None:
        """Start a new sequence with an empty KV cache."""
        s = self._shape
        kv = self.manifest["kv_cache"]
        self._kv = self._create_kv(s([1]), s([kv["max_seq_len"]]), s([kv["max_seq_len"]]), s([kv["page_size"]]), s([0]))
        self._kv_add(self._kv, 0)
        self.length = 0

    def forward(self, ids: list[int]) -> np.ndarray:
        """Append `ids` to the sequence; return the logits after its last token, [V] float32."""
        n = len(ids)
        if n == 0:
            raise UserError("empty prompt")
        if self.length + n > self.max_seq_len:
            raise UserError(f"sequence of {self.length + n} tokens exceeds this artifact's max_seq_len "
                            f"{self.max_seq_len} (compile with a larger --max-seq-len)")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        fn = self._decode if n == 1 else self._prefill
        tokens = self._tensor(np.asarray([ids], dtype=np.int64))  # [1, n]
        positions = self._tensor(np.arange(self.length, self.length + n, dtype=np.int64)[None])  # [1, n]
        self._kv_begin(self._kv, self._shape([0]), self._shape([n]))
        logits = fn(tokens, positions, self._kv, *self._weights)
        self._kv_end(self._kv)
        self.length += n
        return logits.numpy()[0].astype(np.float32)

    def generate(self, prompt: list[int], max_new_tokens: int, sampler: Sampler = Sampler(),
                 stop_at_eos: bool = True, on_token=None) -> GenerationResult:
        self.reset()
        pick = sampler.make()
        result = GenerationResult(prompt_tokens=len(prompt))
        t = time.perf_counter()
        logits = self.forward(list(prompt))
        result.prefill_seconds = time.perf_counter() - t
        t = time.perf_counter()
        while len(result.tokens) < max_new_tokens:
            token = pick(logits)
            result.tokens.append(token)
            if on_token:
                on_token(token)
            if (stop_at_eos and token in self.eos_token_ids) or len(result.tokens) == max_new_tokens:
                break
            logits = self.forward([token])
        result.decode_seconds = time.perf_counter() - t
        return result
