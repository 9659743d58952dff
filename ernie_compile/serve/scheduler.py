"""Continuous batching over one loaded artifact: every step advances all active sequences in one
call of the engine (`step_many`: the compiled `batch` step where the artifact has one).

One thread owns the engine and runs `Scheduler.run`. Between steps it admits queued requests (up to
max_batch sequences at once), drops cancelled and finished ones (their KV pages are freed at once),
and builds the next ragged batch: one token for each decoding sequence, then prompt chunks for
prefilling ones within a token budget (`prefill_chunk`), so a long prompt is prefilled over several
steps while running streams keep getting a token per step. A new prompt that shares at least a page
of tokens with a sequence already cached forks it: those tokens' pages are shared, not recomputed.

Prefix cache: a sequence that completes keeps its pages while its slot is not needed (a later request
with the same system prompt forks it, even after the first one has finished); a new request that
finds no free slot evicts the least recently used of these. Slots bound the pages: the cache holds
max_batch full-length sequences' pages, so kept sequences can never starve running ones.

A prompt holding images (the VL model) is encoded and prefilled whole in a step of its own, then
decodes with the others at its rope delta (_Seq.offset); it shares no prefix pages.

Artifacts without a `batch` step run one call per sequence per step (round-robin); engines without a
multi-sequence cache (inductor, WebGPU) serve one sequence at a time.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger("ernie-serve")


class QueueFull(Exception):
    """More requests waiting than max_queue."""


class Draining(Exception):
    """The server is shutting down: no new requests."""


@dataclass(eq=False)
class Request:
    """One generation. `on_token(token) -> bool` runs on the scheduler thread for each new token and
    returns True to finish it there (a stop string); `on_done(finish_reason, error)` runs once at the
    end: "stop" (end-of-sequence token or stop string), "length" (max_tokens), "context" (the
    artifact's max_seq_len), "cancelled", or "error" with the exception."""

    prompt: list[int]
    max_tokens: int
    pick: Callable[[np.ndarray], int]
    on_token: Callable[[int], bool]
    on_done: Callable[[str, Exception | None], None]
    stop_at_eos: bool = True
    cancelled: bool = False
    # the VL model's images, (patches, grid) of runtime/vision.preprocess in prompt order; the prompt
    # holds their placeholder tokens. Such a prompt is prefilled in one step of its own.
    images: list | None = None
    # filled in by the scheduler
    tokens: list[int] = field(default_factory=list)  # new tokens
    cached_prompt_tokens: int = 0  # prompt tokens taken from another sequence's pages (prefix reuse)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Seq:
    req: Request
    sid: int
    fed: int = 0  # tokens of req.prompt + req.tokens in the cache
    offset: int = 0  # RoPE positions run this far from cache slots (the VL model's delta after images)

    @property
    def history(self) -> list[int]:
        return self.req.prompt + self.req.tokens

    @property
    def pending(self) -> list[int]:
        """Tokens still to feed: the rest of the prompt, or the last new token."""
        return self.history[self.fed:]


class OneSequence:
    """The multi-sequence interface over an engine that holds one sequence (inductor, WebGPU): the
    scheduler then runs with max_batch 1."""

    batches = False
    forks = False

    def __init__(self, engine):
        self._engine = engine

    def open_batch(self, max_sequences: int) -> None:
        pass

    def add_sequence(self, seq_id: int) -> None:
        self._engine.reset()

    def remove_sequence(self, seq_id: int) -> None:
        pass

    def step_many(self, seq_ids, chunks, starts, offsets=None) -> np.ndarray:
        return self._engine.step(chunks[0], starts[0])[None]  # (these engines run no VL model: no offsets)


class Scheduler:
    def __init__(self, engine, max_seq_len: int, eos_token_ids: set[int], max_batch: int = 8,
                 max_queue: int = 64, prefill_chunk: int = 64, page_size: int = 16, vision=None):
        multi = hasattr(engine, "step_many")
        self.engine = engine if multi else OneSequence(engine)
        self.batched = multi and engine.batches
        self.forks = multi
        self.max_batch = max_batch if multi else 1
        self.max_queue = max_queue
        self.max_seq_len = max_seq_len
        self.prefill_chunk = max(1, min(prefill_chunk, max_seq_len))
        self.page_size = page_size
        self.eos = eos_token_ids
        self.vision = vision  # the VL artifact's VisionSpec (runtime/vision.py): requests may hold images
        self.engine.open_batch(self.max_batch)
        self._queue: collections.deque[Request] = collections.deque()
        self._active: list[_Seq] = []
        self._kept: collections.OrderedDict[int, _Seq] = collections.OrderedDict()  # finished, pages kept; LRU first
        self._free_ids = list(range(self.max_batch))
        self._cond = threading.Condition()
        self._stop = False
        self.draining = False
        self.stats = collections.Counter()

    @property
    def mode(self) -> str:
        if self.batched:
            return "continuous batching (one batch call per step)"
        if self.max_batch > 1:
            return "batching not supported by this artifact; serving one sequence per call, round-robin"
        return "batching not supported by this artifact; serving one sequence at a time"

    # ---- called from other threads ----

    def submit(self, req: Request) -> None:
        with self._cond:
            if self.draining or self._stop:
                raise Draining()
            if len(self._queue) >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull()
            self._queue.append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        """The sequence is dropped before the next step (its pages freed); on_done("cancelled") follows
        unless it already finished."""
        with self._cond:
            req.cancelled = True
            self._cond.notify()

    def busy(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._active)

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    # ---- the scheduler thread ----

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._queue and not self._active:
                    self._cond.wait()
                if self._stop:
                    break
                self._drop_cancelled()
                self._admit()
            if self._active:
                self._step()
        for s in list(self._active):
            self._finish(s, "cancelled")
        while self._queue:
            self._queue.popleft().on_done("cancelled", None)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._queue if r.cancelled]:
            self._queue.remove(req)
            req.on_done("cancelled", None)
        for s in [s for s in self._active if s.req.cancelled]:
            self._finish(s, "cancelled")

    def _admit(self) -> None:
        while self._queue and (self._free_ids or self._kept):
            req = self._queue.popleft()
            # (placeholder tokens are the same for every image: a prompt with images shares no pages)
            parent, common = self._longest_cached_prefix(req.prompt) if not req.images else (None, 0)
            sid = self._slot(keep=parent)
            if parent is not None and parent.sid == sid:
                parent, common = None, 0  # the only kept sequence was the parent: its slot is needed
            seq = _Seq(req, sid)
            try:
                if parent is not None:
                    try:
                        self.engine.fork_sequence(parent.sid, sid, common)
                        seq.fed = req.cached_prompt_tokens = common
                        self.stats["prefix_tokens_reused"] += common
                        if parent.sid in self._kept:
                            self._kept.move_to_end(parent.sid)  # recently useful: evicted last
                    except Exception:  # the cache refused the fork: compute the prompt instead
                        log.exception("fork_sequence failed; prefilling the whole prompt")
                        parent = None
                if parent is None:
                    self.engine.add_sequence(sid)
            except Exception as e:  # the request fails, the scheduler goes on
                log.exception("admitting a request failed")
                self._free_ids.append(sid)
                req.on_done("error", e)
                continue
            self._active.append(seq)

    def _slot(self, keep: _Seq | None) -> int:
        """A free sequence id; with none free, the least recently used kept sequence's (not `keep`'s,
        unless it is the only one)."""
        if self._free_ids:
            return self._free_ids.pop()
        victim = next((sid for sid in self._kept if keep is None or sid != keep.sid), next(iter(self._kept)))
        self._release(self._kept.pop(victim).sid)
        self.stats["prefix_cache_evicted"] += 1
        return self._free_ids.pop()

    def _release(self, sid: int) -> None:
        try:
            self.engine.remove_sequence(sid)
        except Exception:  # the id is still returned: a failed removal must not leak a slot
            log.exception("remove_sequence failed")
        self._free_ids.append(sid)

    def _longest_cached_prefix(self, prompt: list[int]) -> tuple[_Seq | None, int]:
        """The running or kept sequence sharing the longest cached prefix with `prompt` (at least a
        page; the prompt's last token is always computed anew, for its logits)."""
        if not self.forks:
            return None, 0
        best, best_n = None, 0
        limit = len(prompt) - 1
        for s in [*self._active, *self._kept.values()]:
            if s.req.images:
                continue
            cached = s.history[:min(s.fed, limit)]
            n = 0
            for a, b in zip(cached, prompt):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = s, n
        return (best, best_n) if best_n >= self.page_size else (None, 0)

    def _step(self) -> None:
        fresh = next((s for s in self._active if s.req.images and s.fed == 0), None)
        if fresh is not None:
            self._step_images(fresh)
            return
        decoding = [s for s in self._active if s.fed >= len(s.req.prompt)]
        prefilling = [s for s in self._active if s.fed < len(s.req.prompt)]
        batch, chunks = [], []
        for s in decoding:
            batch.append(s)
            chunks.append(s.pending)  # one token
        # a step's tokens stay within max_seq_len: the size the cache's per-call buffers were made for
        budget = min(self.prefill_chunk, self.max_seq_len - len(batch))
        for s in prefilling:  # oldest first
            if budget <= 0:
                break
            n = min(len(s.pending), budget)
            batch.append(s)
            chunks.append(s.pending[:n])
            budget -= n
            if not self.batched:
                break  # one call per sequence: one prefill chunk per step keeps streams flowing
        try:
            logits = self.engine.step_many([s.sid for s in batch], chunks, [s.fed for s in batch],
                                           [s.offset for s in batch])
        except Exception as e:  # a broken step fails its requests, not the server
            log.exception("step failed")
            for s in batch:
                self._finish(s, "error", e)
            return
        self.stats["steps"] += 1
        self.stats["step_tokens"] += sum(len(c) for c in chunks)
        for s, chunk, row in zip(batch, chunks, logits):
            self._advance(s, len(chunk), row)

    def _step_images(self, s: _Seq) -> None:
        """A prompt holding images: encoded and prefilled whole, in a step of its own."""
        from ..runtime.vision import prefill_images

        try:
            logits, s.offset = prefill_images(self.engine, self.vision, s.req.prompt, s.req.images, s.sid)
        except Exception as e:
            log.exception("an image prefill failed")
            self._finish(s, "error", e)
            return
        self.stats["steps"] += 1
        self.stats["step_tokens"] += len(s.req.prompt)
        self._advance(s, len(s.req.prompt), logits)

    def _advance(self, s: _Seq, n: int, logits: np.ndarray) -> None:
        """`n` more of s's tokens are in the cache; `logits` after the last of them."""
        s.fed += n
        if s.fed < len(s.req.prompt):
            return  # a prompt chunk: its logits are not needed
        if s.req.cancelled:
            self._finish(s, "cancelled")
        else:
            self._accept(s, logits)

    def _accept(self, s: _Seq, logits: np.ndarray) -> None:
        req = s.req
        token = req.pick(logits)
        req.tokens.append(token)
        try:
            stopped = req.on_token(token)
        except Exception as e:
            self._finish(s, "error", e)
            return
        if stopped or (req.stop_at_eos and token in self.eos):
            self._finish(s, "stop")
        elif len(req.tokens) >= req.max_tokens:
            self._finish(s, "length")
        elif s.fed + 1 >= self.max_seq_len:  # the token just picked fills the context
            self._finish(s, "context")

    def _finish(self, s: _Seq, reason: str, error: Exception | None = None) -> None:
        self._active.remove(s)
        if self.forks and reason in ("stop", "length", "context") and s.fed >= self.page_size and not s.req.images:
            self._kept[s.sid] = s  # its pages stay for a later prompt with the same prefix
        else:
            self._release(s.sid)
        self.stats[f"finished_{reason}"] += 1
        try:
            s.req.on_done(reason, error)
        except Exception:
            log.exception("on_done failed")
