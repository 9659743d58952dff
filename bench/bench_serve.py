"""Serving benchmark: aggregate decode tok/s of ernie-serve at 1, 2, 4, 8, 16 concurrent streams,
with time to first token (TTFT) and inter-token latency (ITL) percentiles.

Starts `ernie-serve ARTIFACT --max-batch <largest concurrency>` on 127.0.0.1, then per concurrency
level sends that many streaming completions at once (distinct random prompts, so no prefix is shared;
greedy; ignore_eos so every stream generates --max-tokens). Aggregate decode tok/s = tokens after
each stream's first / (last token − first stream's first token); TTFT from send to the first token;
ITL between consecutive tokens of a stream; steady tok/s counts only
the span in which every stream is decoding (no prefill in the steps). --reps R goes R times through
all the levels (not R times through one level, then the next: this machine's speed swings by
minutes, and a level's ratio to one stream should compare runs made in the same minutes); each
level's median row is kept. Prints a markdown table and each level's ratio to one stream; --json
FILE writes the rows.

    ernie-compile --model ernie-4.5-0.3b --bits 4 -o /tmp/03b
    python bench/bench_serve.py /tmp/03b --streams 1 2 4 8 16 --max-tokens 64 --prompt-len 32

With --llama-server BIN --gguf FILE, llama.cpp's server runs beside ours (`-np` = the largest
concurrency, 2 threads, continuous batching) and each level alternates between the two servers, rep
by rep, with the same prompts. For the same weights, save the HF folder ours was compiled from and
convert it with ../shared/tools/llamacpp_peer.sh (its Q4_0 GGUF); llama-server itself builds from the
llama.cpp source that script fetches (cmake --target llama-server).
"""
from __future__ import annotations

import argparse
import http.client
import json
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def start_server(artifact: str, max_batch: int, prefill_chunk: int, flags=()) -> tuple[subprocess.Popen, int]:
    """ernie-serve on a free port; `flags` come last (a repeated flag's last value counts)."""
    proc = subprocess.Popen([sys.executable, "-m", "ernie_compile.serve.cli", artifact, "--port", "0",
                             "--max-batch", str(max_batch), "--max-queue", str(4 * max_batch),
                             "--prefill-chunk", str(prefill_chunk), *flags],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 300
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line.startswith("listening on http://"):
            return proc, int(line.rsplit(":", 1)[1])


def start_llama_server(binary: str, gguf: str, slots: int, ctx_per_slot: int) -> tuple[subprocess.Popen, int]:
    """llama.cpp's server on a free port, `slots` parallel sequences of ctx_per_slot tokens each."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
                             "-c", str(slots * ctx_per_slot), "-t", "2", "-tb", "2", "--cont-batching"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not become healthy in 300 s")


def stream(port: int, prompt: list[int], max_tokens: int, start: threading.Barrier, out: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    start.wait()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    times, tokens = [], 0
    while True:
        line = resp.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        data = json.loads(line[6:])
        if data.get("usage"):
            tokens = data["usage"]["completion_tokens"]
        if data.get("choices") and data["choices"][0].get("finish_reason") is None:
            # a delta: one token (llama-server; ours may merge a few whose text it held back)
            times.append(time.perf_counter())
    conn.close()
    out.update(t0=t0, times=times, tokens=tokens or len(times))


def level(port: int, n: int, vocab: int, prompt_len: int, max_tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, prompt_len).tolist() for _ in range(n)]
    barrier = threading.Barrier(n)
    results = [{} for _ in range(n)]
    threads = [threading.Thread(target=stream, args=(port, p, max_tokens, barrier, r))
               for p, r in zip(prompts, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = min(r["times"][0] for r in results)
    last = max(r["times"][-1] for r in results)
    decode_tokens = sum(r["tokens"] - 1 for r in results)
    # steady state: while every stream decodes (after the last first token, before the first last one)
    lo, hi = max(r["times"][0] for r in results), min(r["times"][-1] for r in results)
    steady = sum(lo < t <= hi for r in results for t in r["times"])
    ttft = [r["times"][0] - r["t0"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    pct = lambda xs, q: round(1000 * float(np.percentile(xs, q)), 1)  # noqa: E731
    return {"streams": n, "decode_tok_s": round(decode_tokens / (last - first), 1),
            "per_stream_tok_s": round(decode_tokens / (last - first) / n, 1),
            "steady_tok_s": round(steady / (hi - lo), 1) if hi > lo else None,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p90": pct(ttft, 90), "ttft_ms_max": pct(ttft, 100),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p90": pct(itl, 90), "itl_ms_p99": pct(itl, 99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--reps", type=int, default=1, help="runs per level; the median decode tok/s row is kept")
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary: measured beside ours")
    p.add_argument("--gguf", help="the GGUF llama-server loads (same weights as the artifact)")
    p.add_argument("--json")
    args = p.parse_args()
    if bool(args.llama_server) != bool(args.gguf):
        p.error("--llama-server and --gguf go together")
    manifest = json.loads((Path(args.artifact) / "manifest.json").read_text())
    vocab = min(manifest["vocab_size"], 30000)
    servers = {"ernie-serve": start_server(args.artifact, max(args.streams), args.prefill_chunk)}
    rows = []
    try:
        if args.llama_server:
            servers["llama-server"] = start_llama_server(args.llama_server, args.gguf, max(args.streams),
                                                         args.prompt_len + args.max_tokens + 64)
        for _, port in servers.values():
            level(port, 1, vocab, args.prompt_len, 8, seed=99)  # warm-up
        # rep by rep through every level, alternating the servers within a level: the machine's speed
        # swings from minute to minute, and each ratio (server to server, level to one stream) should
        # set runs made in the same minutes against each other
        runs = {(name, n): [] for n in args.streams for name in servers}
        for r in range(args.reps):
            for n in args.streams:
                for name, (_, port) in servers.items():
                    runs[name, n].append(level(port, n, vocab, args.prompt_len, args.max_tokens, seed=n * 100 + r))
                    print(json.dumps({"server": name, "rep": r, **runs[name, n][-1]}), flush=True)
        for n in args.streams:
            for name in servers:
                rs = runs[name, n]
                rows.append({"server": name, **sorted(rs, key=lambda r: r["decode_tok_s"])[len(rs) // 2]})
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    by = {(r["server"], r["streams"]): r for r in rows}
    one = min(args.streams)
    for key in ("decode_tok_s", "steady_tok_s"):
        print(f"\nernie-serve {key} against {one} stream(s): " + ", ".join(
            f"{n} streams {by['ernie-serve', n][key] / by['ernie-serve', one][key]:.2f}×" for n in args.streams))
    if len(servers) > 1:
        print("\nernie-serve / llama-server, aggregate decode tok/s: " + ", ".join(
            f"{n} streams {by['ernie-serve', n]['decode_tok_s'] / by['llama-server', n]['decode_tok_s']:.2f}×"
            for n in args.streams))
    if args.json:
        Path(args.json).write_text(json.dumps({"artifact": args.artifact, "options": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
