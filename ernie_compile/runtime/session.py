"""Load an artifact and generate tokens: prefill once, then one decode call per token.

The artifact's backend (manifest "backend") picks the engine that owns the compiled programs and the
KV cache: runtime/tvm_engine.py (TVM's VM and paged KV cache), runtime/inductor_engine.py (the
AOTInductor programs and a static cache; the only engine that imports torch) or
runtime/webgpu_engine.py (a launch plan of WGSL kernels, run through wgpu). This file checks
input, counts positions and samples; the engines only run steps.
"""
from __future__ import annotations

import gc
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .artifact import check_cpu, read_manifest
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


# manifest "backend" → (module, class) of its engine, imported only when an artifact needs it
ENGINES = {"tvm": ("tvm_engine", "TvmEngine"), "inductor": ("inductor_engine", "InductorEngine"),
           "webgpu": ("webgpu_engine", "WebGpuEngine")}


class Session:
    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder, verify=verify)  # hashes checked before any load
        if m["target"]["device"] == "cpu" and m["target"].get("cross", False):
            raise UserError(f"{self.folder}: built for {m['target']['spec']}; it does not run on this machine")
        check_cpu(self.folder, m)
        backend = m.get("backend", "tvm")
        if backend not in ENGINES:
            raise UserError(f"{self.folder}: unknown backend {backend!r}; this runtime runs {', '.join(ENGINES)}")
        module, cls = ENGINES[backend]
        self._engine = getattr(importlib.import_module(f".{module}", __package__), cls)(self.folder, m)
        self.max_seq_len = m["kv_cache"]["max_seq_len"]
        self.eos_token_ids = set(m["tokenizer"]["eos_token_ids"])
        self.vocab_size = m["vocab_size"]
        self.tokenizer = Tokenizer(self.folder, m["tokenizer"])
        self.reset()
        # Everything loaded so far lives as long as the session: out of the collector's sight, a full
        # collection during generation takes ~0.2 ms instead of ~120 ms (230,000 objects after TVM's
        # import), the time of 20 decode steps of the 0.3b model.
        gc.freeze()

    def reset(self) -> None:
        """Start a new sequence with an empty KV cache."""
        self._engine.reset()
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
        logits = self._engine.step(ids, self.length)
        self.length += n
        return logits

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
