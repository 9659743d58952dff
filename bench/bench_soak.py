"""Soak: many requests from many concurrent clients against one ernie-serve process, with client
disconnects and bad requests mixed in. Passes when every completed response equals a single-sequence
greedy run of the same artifact (Session, no server; near-ties below), every bad request got its 400,
every refused one a 429 (retried, as clients do), nothing else went wrong, the server exited 0 on
SIGTERM, and its RSS stayed flat (< 5% growth from the first tenth of the requests to the end).

The prompts come from a pool (some share a 48-token system prefix, so the prefix cache is used; some
span several prefill chunks); each pool entry has its own max_tokens, so its reference is computed once.
Requests are streamed or not at random; each is checked by its token ids (the `token_ids`
extension, in a stream's final chunk) and a streamed one by its text too.

Greedy results may differ from the reference where the reference's top-1 / top-2 logit gap is within
what the server's batching can move a logit: it prefills in chunks whose boundaries depend on what
else runs (and a forked prefix was computed in another sequence's chunks). That deviation is
measured here, on the pool's prompts, as the largest |logit difference| between a whole prefill and
prefills in chunks of 7, 16 and --prefill-chunk tokens (δ). With float activations δ is float-order
noise (~1e-6); int8 activations round each block of x to 127 levels, and a last-bit difference that
crosses a rounding boundary moves the logits far more (~1e-2 on the 0.3b). A mismatch whose divergence
has a reference gap ≤ 2δ counts as a near-tie; any other is a failure.

    ernie-compile --model ernie-4.5-0.3b --bits 4 -o /tmp/03b
    python bench/bench_soak.py /tmp/03b --requests 500 --clients 32
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_serve import start_server  # noqa: E402


def reference(session, prompt: list[int], max_tokens: int) -> dict:
    """Greedy tokens as Session.generate picks them, with the top-1/top-2 gap at each step."""
    session.reset()
    logits = session.forward(list(prompt))
    tokens, gaps = [], []
    while True:
        top2 = np.partition(logits, -2)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        token = int(np.argmax(logits))
        tokens.append(token)
        if token in session.eos_token_ids or len(tokens) == max_tokens or session.length + 1 >= session.max_seq_len:
            break
        logits = session.forward([token])
    return {"tokens": tokens, "gaps": gaps, "text": session.tokenizer.decode(tokens)}


def chunking_deviation(session, prompt: list[int], chunks: tuple[int, ...]) -> float:
    """Largest |logit difference| between the whole prefill of `prompt` and prefills in chunks."""
    session.reset()
    whole = session.forward(list(prompt))
    worst = 0.0
    for c in chunks:
        if c >= len(prompt):
            continue
        session.reset()
        for i in range(0, len(prompt), c):
            logits = session.forward(prompt[i:i + c])
        worst = max(worst, float(np.abs(logits - whole).max()))
    return worst


def bad_requests(vocab: int, max_seq_len: int) -> list[tuple[str, bytes]]:
    """(path, body) pairs that must each get a 400."""
    j = lambda o: json.dumps(o).encode()  # noqa: E731
    return [("/v1/completions", b'{"prompt": [1, 2,'),
            ("/v1/completions", j({"prompt": [5, vocab + 7], "max_tokens": 4})),
            ("/v1/completions", j({"prompt": [5] * max_seq_len, "max_tokens": 4})),
            ("/v1/completions", j({"prompt": [5, 6], "max_tokens": -3})),
            ("/v1/completions", j({"prompt": [5, 6], "temperature": "hot"})),
            ("/v1/completions", j({"prompt": []})),
            ("/v1/chat/completions", j({"messages": "hi"})),
            ("/v1/completions", b'[1, 2, 3]')]


class Soak:
    def __init__(self, port: int, pool: list[dict], bad: list, deviation: float, args):
        self.port, self.pool, self.bad, self.deviation, self.args = port, pool, bad, deviation, args
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.mismatches: list[dict] = []
        self.done = 0
        self.next = 0

    def _take(self) -> int | None:
        with self.lock:
            if self.next >= self.args.requests:
                return None
            self.next += 1
            return self.next

    def _count(self, what: str, detail: dict | None = None) -> None:
        with self.lock:
            self.counts[what] += 1
            self.done += what != "429_retried"
            if detail is not None:
                self.mismatches.append(detail)

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while (n := self._take()) is not None:
            roll = rng.random()
            if roll < self.args.bad_fraction:
                self._bad(rng.choice(self.bad))
            else:
                entry = rng.choice(self.pool)
                disconnect = roll < self.args.bad_fraction + self.args.disconnect_fraction
                self._valid(entry, stream=disconnect or rng.random() < 0.5, disconnect=disconnect)

    def _post(self, path: str, body: bytes) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        return conn.getresponse()

    def _bad(self, req) -> None:
        resp = self._post(*req)
        data = json.loads(resp.read())
        ok = resp.status == 400 and "message" in data.get("error", {})
        self._count("bad_400" if ok else "error", None if ok else {"bad": req[1][:60].decode(), "status": resp.status})

    def _valid(self, entry: dict, stream: bool, disconnect: bool) -> None:
        body = json.dumps({"prompt": entry["prompt"], "max_tokens": entry["max_tokens"], "temperature": 0,
                           "stream": stream, "stream_options": {"include_usage": True}}).encode()
        while True:
            resp = self._post("/v1/completions", body)
            if resp.status != 429:
                break
            resp.read()
            self._count("429_retried")
            time.sleep(random.uniform(0.5, 2.0))  # as clients back off
        if resp.status != 200:
            self._count("error", {"status": resp.status, "body": resp.read()[:200].decode()})
            return
        ref = entry["ref"]
        if not stream:
            choice = json.loads(resp.read())["choices"][0]
            self._check(entry, choice["token_ids"], choice["text"])
            return
        text, ids, events = [], None, 0
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            events += 1
            if disconnect and events == 2:
                resp.close()  # the client goes away mid-stream: its sequence must be cancelled
                self._count("disconnected")
                return
            data = json.loads(line[6:])
            if data["choices"]:
                text.append(data["choices"][0]["text"])
                ids = data["choices"][0].get("token_ids", ids)  # the final chunk's
        self._check(entry, ids, "".join(text))

    def _check(self, entry: dict, ids: list[int] | None, text: str) -> None:
        ref = entry["ref"]
        if ids == ref["tokens"] and text == ref["text"]:
            self._count("exact")
            return
        at = next((i for i, (a, b) in enumerate(zip(ids or [], ref["tokens"])) if a != b), None)
        gap = ref["gaps"][at] if at is not None else None
        tie = gap is not None and gap <= 2 * self.deviation
        self._count("near_tie" if tie else "mismatch",
                    {"pool": entry["id"], "near_tie": tie, "diverges_at": at, "ref_gap": gap,
                     "text_equal": text == ref["text"]})


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--pool", type=int, default=24, help="distinct (prompt, max_tokens) entries")
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--disconnect-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()

    from ernie_compile.runtime import Session

    session = Session(args.artifact)
    vocab, max_seq_len = session.vocab_size, session.max_seq_len
    rng = random.Random(args.seed)
    system = [rng.randrange(3, min(vocab, 30000)) for _ in range(48)]
    pool = []
    t = time.perf_counter()
    for i in range(args.pool):
        tail = [rng.randrange(3, min(vocab, 30000)) for _ in range(rng.randint(1, 40 if i % 3 == 0 else 160))]
        prompt = system + tail if i % 3 == 0 else tail
        entry = {"id": i, "prompt": prompt, "max_tokens": rng.randint(1, args.max_new)}
        entry["ref"] = reference(session, prompt, entry["max_tokens"])
        pool.append(entry)
    deviation = max(chunking_deviation(session, e["prompt"], (7, 16, args.prefill_chunk)) for e in pool)
    print(f"references: {len(pool)} in {time.perf_counter() - t:.0f} s; chunking deviation δ = {deviation:.3g}",
          flush=True)
    del session

    proc, port = start_server(args.artifact, args.max_batch, args.prefill_chunk,
                              ["--max-queue", str(args.max_queue)])
    soak = Soak(port, pool, bad_requests(vocab, max_seq_len), deviation, args)
    samples = []  # (completed requests, RSS KiB)
    stop = threading.Event()

    def sample():
        while not stop.wait(0.25):
            samples.append((soak.done, rss_kib(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    clients = [threading.Thread(target=soak.client, args=(args.seed * 1000 + c,)) for c in range(args.clients)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.perf_counter() - t
    stop.set()
    sampler.join()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    proc.terminate()
    code = proc.wait(120)

    def rss_at(fraction: float) -> float:  # MiB when that fraction of the requests had completed
        n = fraction * args.requests
        return round(next((r for d, r in samples if d >= n), samples[-1][1]) / 1024, 1)

    out = {"requests": args.requests, "clients": args.clients, "wall_s": round(wall, 1), "deviation": deviation,
           **soak.counts,
           "rss_MiB_at_10%": rss_at(0.1), "rss_MiB_at_50%": rss_at(0.5), "rss_MiB_at_100%": rss_at(1.0),
           "rss_MiB_max": round(max(r for _, r in samples) / 1024, 1),
           "server_stats": health.get("stats"), "server_alive_after": health.get("status"), "exit_code": code,
           "mismatches": soak.mismatches[:20]}
    growth = out["rss_MiB_at_100%"] - out["rss_MiB_at_10%"]
    out["rss_growth_MiB"] = round(growth, 1)  # flat: under 5% of the RSS after the first tenth
    ok = not soak.counts["error"] and not soak.counts["mismatch"] and code == 0 and growth < 0.05 * out["rss_MiB_at_10%"]
    print(json.dumps(out, indent=1))
    print("soak:", "PASS" if ok else "FAIL", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"options": vars(args), **out}, indent=1))


if __name__ == "__main__":
    main()
