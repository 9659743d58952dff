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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .artifact import Manifest, check_cpu, load_manifest
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampler:
    """Greedy when temperature is 0; otherwise softmax(logits / T) restricted to the top-p mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        # NaN compares false with everything: `temperature < 0` alone lets it through to the softmax
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature {self.temperature}: must be a finite number >= 0")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise UserError(f"--seed {self.seed}: must be an integer >= 0")

    def make(self):
        rng = np.random.default_rng(self.seed)

        def pick(logits: np.ndarray) -> int:
            if self.temperature == 0:
                return int(np.argmax(logits))
            # shifted before dividing: a tiny temperature sends the others to -inf (p 0), never to NaN
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                z = (logits.astype(np.float64) - logits.max()) / self.temperature
                p = np.exp(z)
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
    # "stop" (an end-of-sequence token), "length" (max_new_tokens), "context" (the artifact's max_seq_len)
    finish_reason: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = len(self.tokens) - 1  # the first new token comes from prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def check_prompt(prompt: list[int], max_seq_len: int) -> None:
    """Refuse, before any step runs, a prompt that leaves no room for a new token in the context
    (prompt + new tokens <= max_seq_len)."""
    if not prompt:
        raise UserError("empty prompt")
    if len(prompt) >= max_seq_len:
        raise UserError(f"prompt of {len(prompt)} tokens leaves no room for a new token in this artifact's "
                        f"context of {max_seq_len} (compile with a larger --max-seq-len)")


# manifest "backend" → (module, class) of its engine, imported only when an artifact needs it
ENGINES = {"tvm": ("tvm_engine", "TvmEngine"), "inductor": ("inductor_engine", "InductorEngine"),
           "webgpu": ("webgpu_engine", "WebGpuEngine")}


class Session:
    """An artifact loaded for generation. `artifact` is its folder, or the Manifest that
    runtime/artifact.py's load_manifest returned for it (ernie-run: read and verified once)."""

    prefill_chunk = 512  # tokens per prefill step (forward)

    def __init__(self, artifact: str | Path | Manifest, verify: bool = True):
        manifest = artifact if isinstance(artifact, Manifest) else load_manifest(artifact, verify=verify)
        self.manifest = manifest
        self.folder = manifest.folder
        m = manifest.data
        if manifest.device == "cpu" and m["target"]["cross"]:
            raise UserError(f"{self.folder}: built for {m['target']['spec']} (a cross build); it does not run "
                            "on this machine — copy it to a machine of that kind")
        check_cpu(self.folder, m)
        module, cls = ENGINES[manifest.backend]  # the schema admits only these backends
        self._engine = getattr(importlib.import_module(f".{module}", __package__), cls)(self.folder, m)
        self.max_seq_len = manifest.max_seq_len
        self.eos_token_ids = {i for i in m["tokenizer"]["eos_token_ids"] if i is not None}
        self.vocab_size = m["vocab_size"]
        self.tokenizer = Tokenizer(self.folder, m["tokenizer"])
        self.vision = m.get("vision")  # the VL model's image settings (runtime/vision.py), else None
        self.reset()
        # Everything loaded so far lives as long as the session: out of the collector's sight, a full
        # collection during generation takes ~0.2 ms instead of ~120 ms (230,000 objects after TVM's
        # import), the time of 20 decode steps of the 0.3b model.
        gc.freeze()

    @property
    def engine(self):
        """The backend's engine (runtime/tvm_engine.py, …): what the server's scheduler drives."""
        return self._engine

    def reset(self) -> None:
        """Start a new sequence with an empty KV cache."""
        self._engine.reset()
        self.length = 0
        self.rope_delta = 0  # the VL model's: positions after an image run this far from the cache slots

    def forward(self, ids: list[int]) -> np.ndarray:
        """Append `ids` to the sequence; return the logits after its last token, [V] float32. A long
        prompt runs in steps of at most `prefill_chunk` tokens: a step's activations (the MoE's
        T·k expert rows, the MLP's [T, I]) and the VM's pooled buffers grow with its tokens, so
        bounded steps keep a long prompt's memory that of a short one, at the price of re-reading the
        weights once per chunk (at 512 tokens, a small share of the prefill's time)."""
        n = len(ids)
        if n == 0:
            raise UserError("empty prompt")
        if self.length + n > self.max_seq_len:
            raise UserError(f"sequence of {self.length + n} tokens exceeds this artifact's max_seq_len "
                            f"{self.max_seq_len} (compile with a larger --max-seq-len)")
        self._check_vocabulary(ids)
        for i in range(0, n, self.prefill_chunk):
            chunk = ids[i:i + self.prefill_chunk]
            # (only the TVM engine runs VL artifacts, the one engine whose step takes a position offset)
            logits = self._engine.step(chunk, self.length, self.rope_delta) if self.rope_delta else \
                self._engine.step(chunk, self.length)
            self.length += len(chunk)
        return logits

    def _check_vocabulary(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")

    def forward_images(self, ids: list[int], images: list) -> np.ndarray:
        """A prompt holding images into an empty sequence: `images` are (patches [N, C·p²], grid (t, h, w))
        of runtime/vision.py's preprocess, in prompt order; ids hold each one's placeholder tokens.
        Returns the logits after the last token; decoding then continues at the prompt's rope delta."""
        from . import vision

        if not self.vision:
            raise UserError(f"{self.folder}: this artifact has no image encoder (compiled from a text-only "
                            "model); drop --image")
        spec = vision.VisionSpec.from_json(self.vision)
        if self.length:
            raise UserError("images go in a sequence's first prompt")
        check_prompt(ids, self.max_seq_len)
        self._check_vocabulary(ids)
        logits, self.rope_delta = vision.prefill_images(self._engine, spec, ids, images)
        self.length = len(ids)
        return logits

    def generate(self, prompt: list[int], max_new_tokens: int, sampler: Sampler = Sampler(),
                 stop_at_eos: bool = True, on_token=None, images: list | None = None) -> GenerationResult:
        """Up to max_new_tokens after `prompt`; stops early at an end-of-sequence token (stop_at_eos)
        or when prompt + new tokens fill the context, and says which in `finish_reason`. `images`:
        see forward_images (the VL model)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        check_prompt(prompt, self.max_seq_len)
        self.reset()
        pick = sampler.make()
        result = GenerationResult(prompt_tokens=len(prompt))
        t = time.perf_counter()
        logits = self.forward_images(list(prompt), images) if images else self.forward(list(prompt))
        result.prefill_seconds = time.perf_counter() - t
        t = time.perf_counter()
        while True:
            token = pick(logits)
            result.tokens.append(token)
            if on_token:
                on_token(token)
            if stop_at_eos and token in self.eos_token_ids:
                result.finish_reason = "stop"
            elif len(result.tokens) == max_new_tokens:
                result.finish_reason = "length"
            elif self.length + 1 >= self.max_seq_len:  # the token just picked fills the context
                result.finish_reason = "context"
            else:
                logits = self.forward([token])
                continue
            break
        result.decode_seconds = time.perf_counter() - t
        return result
