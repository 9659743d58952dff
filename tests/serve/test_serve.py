"""ernie-serve (ernie_compile/serve/) as a client sees it: the official `openai` client against a real
server process on 127.0.0.1 over the embedded default artifact; and the scheduler's continuous
batching and prefix reuse against single-sequence Session.generate."""
from __future__ import annotations

import http.client
import json
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from ernie_compile.runtime import Sampler, Session  # noqa: E402
from ernie_compile.serve.scheduler import Request, Scheduler  # noqa: E402

# token-id prompts of different lengths; the longest spans several 16-token prefill chunks
PROMPTS = [[17, 300, 5, 981, 42, 42, 7, 640, 2, 11, 99], [5, 9, 1000, 3], list(range(3, 40)), [640]]


class ServerProcess:
    def __init__(self, artifact, *flags: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "ernie_compile.serve.cli", str(artifact), "--port", "0",
                                      *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()  # read by a thread: select() cannot see lines Python has buffered
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 60
        self.port = None
        while self.port is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"the server did not start: {self.proc.stderr.read()}") from None
            if line.startswith("listening on http://"):
                self.port = int(line.rsplit(":", 1)[1])
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        status, data = resp.status, json.loads(resp.read())
        conn.close()
        return status, data

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def session(tiny_artifact):
    return Session(tiny_artifact)


@pytest.fixture(scope="module")
def server(tiny_artifact):
    s = ServerProcess(tiny_artifact, "--max-batch", "4", "--max-queue", "8", "--prefill-chunk", "16")
    yield s
    s.stop()


def test_models_and_health(server):
    models = server.client.models.list().data
    assert len(models) == 1 and models[0].max_model_len == 64
    assert "fallback" in models[0].chat_template  # the embedded default's tokenizer has no chat template
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["mode"].startswith("continuous batching")


def test_concurrent_greedy_equals_single_sequence(server, session):
    """Four requests at once (prompts of 1 to 37 tokens, batched and prefilled in 16-token chunks):
    each gets exactly what Session.generate gives it alone."""
    expected = [session.generate(p, 12) for p in PROMPTS]
    results = [None] * len(PROMPTS)

    def ask(i):
        results[i] = server.client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=12, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r, e, p in zip(results, expected, PROMPTS):
        choice = r.choices[0]
        assert choice.token_ids == e.tokens
        assert choice.text == session.tokenizer.decode(e.tokens)
        assert choice.finish_reason == {"stop": "stop", "length": "length", "context": "length"}[e.finish_reason]
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(p), len(e.tokens))


def test_streaming_matches_non_streaming_and_context_ends_in_length(server):
    kwargs = dict(model="tiny", prompt="Return the value", temperature=0)
    whole = server.client.completions.create(max_tokens=10, **kwargs).choices[0]
    stream = server.client.completions.create(max_tokens=10, stream=True, stream_options={"include_usage": True},
                                              **kwargs)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    last = [c.choices[0] for c in chunks if c.choices][-1]
    assert last.finish_reason == "length" and last.token_ids == whole.token_ids  # the ids in the final chunk
    assert chunks[-1].usage.completion_tokens == 10
    # far more than the context holds: stops there, with "length"
    long = server.client.completions.create(model="tiny", prompt=list(range(3, 60)), max_tokens=500, temperature=0)
    assert long.usage.total_tokens <= 64 and long.choices[0].finish_reason in ("length", "stop")


def test_chat_streams_and_seeded_sampling_repeats(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Return the value"}]
    a = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.8,
                                              top_p=0.9, seed=3)
    b = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.8,
                                              top_p=0.9, seed=3)
    assert a.choices[0].message.content == b.choices[0].message.content and a.choices[0].message.role == "assistant"
    streamed = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                     stream=True)
    deltas = [c.choices[0].delta.content or "" for c in streamed]
    greedy = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert "".join(deltas) == greedy.choices[0].message.content


def test_stop_string_cuts_the_text(server):
    full = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("the greedy text has no usable stop string")
    cut = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b'{"prompt": [1, 2, 99999]}', 400, "prompt"),  # outside the vocabulary
    (json.dumps({"prompt": list(range(64))}).encode(), 400, "prompt"),  # fills the context
    (b'{"prompt": "x", "n": 2}', 400, "n"),
    (b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
    (b'{"prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
    (b'{"prompt": {}}', 400, "prompt"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    code, data = server.request("POST", "/v1/completions", body)
    assert code == status and data["error"]["type"] == "invalid_request_error" and data["error"]["param"] == param
    code, data = server.request("GET", "/health")  # and the server lives on
    assert code == 200


def test_bad_chat_request_through_the_client(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.status_code == 400
    # an image for a text-only artifact (the VL artifact's images: tests/test_e2e_vl.py)
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}])
    assert e.value.status_code == 400 and "takes no images" in json.loads(e.value.response.text)["error"]["message"]


def test_disconnect_mid_stream_cancels_the_sequence(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [5], "max_tokens": 62, "temperature": 0,
                                                        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.close()  # mid-stream: the server frees the sequence
    conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, health = server.request("GET", "/health")
        if health["busy"] == 0:
            break
        time.sleep(0.05)
    assert health["busy"] == 0 and health["stats"].get("finished_cancelled", 0) >= 1, health


def test_full_queue_is_429_and_sigterm_drains(tiny_artifact):
    s = ServerProcess(tiny_artifact, "--max-batch", "1", "--max-queue", "1")
    try:
        statuses = []
        barrier = threading.Barrier(6)

        def ask():
            barrier.wait(10)
            statuses.append(s.request("POST", "/v1/completions",
                                      json.dumps({"prompt": [5], "max_tokens": 60, "temperature": 0}).encode()))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        codes = sorted(code for code, _ in statuses)
        assert codes[0] == 200 and codes[-1] == 429, codes
        assert all(d["error"]["type"] == "rate_limit_error" for code, d in statuses if code == 429)

        # SIGTERM while a stream runs: it finishes; the process then exits 0 and accepts nothing new
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": [5], "max_tokens": 40, "temperature": 0,
                                                            "stream": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.readline()
        s.proc.send_signal(signal.SIGTERM)
        rest = resp.read()
        assert first.startswith(b"data: ") and rest.rstrip().endswith(b"data: [DONE]")
        assert s.proc.wait(20) == 0
        with pytest.raises(OSError):
            s.request("GET", "/health")
    finally:
        s.stop()


def _request(prompt, max_tokens, done, on_token=lambda t: False):
    return Request(prompt, max_tokens, Sampler().make(), on_token, lambda reason, error: done.release())


def test_prefix_is_forked_not_recomputed_and_results_match(session):
    """A prompt sharing 37 tokens with a running sequence forks its pages; the parent finishing first
    (its pages now held by the child alone) changes nothing. Both equal Session.generate."""
    shared = list(range(3, 40))
    a_prompt, b_prompt = shared, shared + [7, 8, 9]
    expected = [session.generate(p, n).tokens for p, n in ((a_prompt, 3), (b_prompt, 12))]
    sched = Scheduler(session.engine, session.max_seq_len, session.eos_token_ids, max_batch=4, prefill_chunk=16)
    thread = threading.Thread(target=sched.run)
    thread.start()
    done = threading.Semaphore(0)
    b = _request(b_prompt, 12, done)
    submitted = []

    def on_a_token(token):  # while a runs (its prompt cached), b arrives
        if not submitted:
            submitted.append(sched.submit(b))
        return False

    a = _request(a_prompt, 3, done, on_a_token)
    try:
        sched.submit(a)
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
    finally:
        sched.stop()
        thread.join(30)
        session.reset()  # the engine's single-sequence cache again, for other tests
    assert b.cached_prompt_tokens == len(shared) and sched.stats["prefix_tokens_reused"] == len(shared)
    assert [a.tokens, b.tokens] == expected


def _run_in_order(sched, requests):
    """Each request submitted after the one before it has finished."""
    thread = threading.Thread(target=sched.run)
    thread.start()
    done = threading.Semaphore(0)
    reqs = [_request(p, n, done) for p, n in requests]
    try:
        for r in reqs:
            sched.submit(r)
            assert done.acquire(timeout=30)
    finally:
        sched.stop()
        thread.join(30)
    return reqs


def test_finished_sequences_prefix_cache_and_eviction(session):
    """A finished sequence keeps its pages while its slot is free: the next prompt with the same
    37-token prefix forks it after it has ended. With every slot taken by kept sequences, a new request
    evicts the least recently used one, never the parent it forks; max_batch 1 can never fork (the
    parent's slot is the one needed). Every result equals Session.generate."""
    shared = list(range(3, 40))
    requests = [(shared + [5], 6), (shared + [7, 8, 9], 6), ([900, 901] * 20, 4), ([640] * 30, 4),
                (shared + [11], 5)]
    expected = [session.generate(p, n).tokens for p, n in requests]
    try:
        sched = Scheduler(session.engine, session.max_seq_len, session.eos_token_ids, max_batch=3, prefill_chunk=16)
        reqs = _run_in_order(sched, requests)
        assert [r.tokens for r in reqs] == expected
        # 2nd forks the 1st (finished); 3rd takes the last free slot; 4th evicts the 1st (least
        # recently used); 5th forks the 2nd, now least recently used, and evicts the 3rd instead
        assert [r.cached_prompt_tokens for r in reqs] == [0, len(shared), 0, 0, len(shared)]
        assert sched.stats["prefix_cache_evicted"] == 2

        one = Scheduler(session.engine, session.max_seq_len, session.eos_token_ids, max_batch=1, prefill_chunk=16)
        reqs = _run_in_order(one, requests[:2])
        assert [r.tokens for r in reqs] == expected[:2]
        assert [r.cached_prompt_tokens for r in reqs] == [0, 0] and one.stats["prefix_cache_evicted"] == 1
    finally:
        session.reset()


class _SingleSequenceEngine:
    """An engine with one sequence's cache (as the inductor and WebGPU engines): no step_many."""

    def __init__(self, engine):
        self.reset, self.step = engine.reset, engine.step


@pytest.mark.parametrize("mode", ["batch", "round-robin", "one-sequence"])
def test_scheduler_modes_match_session(session, mode, monkeypatch):
    """The batch step; an artifact without one (one call per sequence per step); an engine of one
    sequence (requests one after another): all give what Session.generate gives."""
    expected = [session.generate(p, 10).tokens for p in PROMPTS]
    engine = session.engine
    if mode == "round-robin":
        monkeypatch.setattr(engine, "_batch", None)
    elif mode == "one-sequence":
        engine = _SingleSequenceEngine(engine)
    sched = Scheduler(engine, session.max_seq_len, session.eos_token_ids, max_batch=4, prefill_chunk=16)
    assert sched.batched == (mode == "batch") and sched.max_batch == (1 if mode == "one-sequence" else 4)
    thread = threading.Thread(target=sched.run)
    thread.start()
    done = threading.Semaphore(0)
    reqs = [_request(p, 10, done) for p in PROMPTS]
    try:
        for r in reqs:
            sched.submit(r)
        assert all(done.acquire(timeout=30) for _ in reqs)
    finally:
        sched.stop()
        thread.join(30)
        session.reset()
    assert [r.tokens for r in reqs] == expected


def test_chat_uses_the_artifacts_template_where_it_has_one(tmp_path):
    from ernie_compile.serve.protocol import ChatFormat

    class Chars:
        available = True

        def encode(self, text):
            return [ord(c) for c in text]

    template = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "^"}))
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    chat = ChatFormat(tmp_path, {"files": ["tokenizer_config.json"], "bos_token_id": 1})
    assert "chat template" in chat.description and "fallback" not in chat.description
    assert "".join(map(chr, chat.prompt(body, Chars())[0])) == "^<user>hi<assistant>"
    fallback = ChatFormat(tmp_path, {"files": [], "bos_token_id": 1})
    assert fallback.prompt(body, Chars())[0] == [1] + [ord(c) for c in "User: hi\nAssistant: "]
