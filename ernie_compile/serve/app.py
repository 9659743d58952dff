"""The HTTP side: OpenAI's /v1/completions and /v1/chat/completions (streamed as server-sent events
or not), /v1/models and /health, as a Starlette app over a Scheduler running in its own thread.

Each request gets an asyncio queue; the scheduler thread pushes text deltas and the end into it
(loop.call_soon_threadsafe). A client that disconnects cancels its sequence. Every failure of a
request is answered with OpenAI's error object; none reaches the server's loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .protocol import ApiError, ChatFormat, Params, TextStream, completion_prompt, parse_json
from .scheduler import Draining, QueueFull, Request, Scheduler

log = logging.getLogger("ernie-serve")
FINISH = {"stop": "stop", "length": "length", "context": "length"}  # ours → OpenAI's finish_reason
DISCONNECT_POLL_S = 0.5


class Generation:
    """One request's scheduler Request, and the queue its events arrive in on the event loop."""

    def __init__(self, server: "Server", prompt: list[int], params: Params, max_tokens: int, images: list | None = None):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

        def push(item):
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, item)
            except RuntimeError:  # the loop closed (shutdown): nobody is listening
                pass

        self.text = TextStream(server.tokenizer, params.stop, lambda delta: push(("text", delta)))

        def done(reason, error):
            if reason != "cancelled":
                self.text.flush()
            push(("done", reason, error))

        self.req = Request(prompt, max_tokens, params.sampler.make(), self.text.on_token, done,
                           stop_at_eos=not params.ignore_eos, images=images or None)
        self.prompt_tokens = len(prompt)

    def usage(self) -> dict:
        n = len(self.req.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": self.req.cached_prompt_tokens}}


class Server:
    def __init__(self, session, scheduler: Scheduler, model_name: str):
        self.session, self.scheduler, self.model_name = session, scheduler, model_name
        self.tokenizer = session.tokenizer
        self.chat = ChatFormat(session.folder, session.manifest.data["tokenizer"])
        self.vision = scheduler.vision  # a VL artifact's VisionSpec: chat messages may hold images
        self.created = int(time.time())
        self.thread = threading.Thread(target=scheduler.run, name="ernie-scheduler", daemon=True)

    # ---- routes ----

    async def health(self, request: HttpRequest):
        s = self.scheduler
        return JSONResponse({"status": "draining" if s.draining else "ok", "mode": s.mode,
                             "max_batch": s.max_batch, "max_queue": s.max_queue, "busy": s.busy(),
                             "queued": s.queued(), "stats": dict(s.stats)})

    async def models(self, request: HttpRequest):
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "ernie-compile",
            "max_model_len": self.session.max_seq_len, "chat_template": self.chat.description,
            "serving": self.scheduler.mode}]})

    async def completions(self, request: HttpRequest):
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: HttpRequest):
        return await self._handle(request, chat=True)

    # ---- one request ----

    async def _handle(self, request: HttpRequest, chat: bool):
        try:
            body = parse_json(await request.body())
            if chat:
                params = Params.parse(body, ("max_completion_tokens", "max_tokens"))
                # (in a thread: decoding and resizing images takes a while; the loop serves the streams)
                prompt, images = await asyncio.to_thread(self.chat.prompt, body, self.tokenizer, self.vision)
            else:
                params = Params.parse(body)
                prompt, images = completion_prompt(body, self.tokenizer, self.session.vocab_size), []
            limit = self.session.max_seq_len
            if len(prompt) >= limit:
                raise ApiError(400, f"the prompt has {len(prompt)} tokens; this model's context is {limit} tokens, "
                                    "prompt and completion together", param="messages" if chat else "prompt",
                               code="context_length_exceeded")
            # chat: up to the context by default; completions: OpenAI's default of 16
            max_tokens = params.max_tokens or (limit - len(prompt) if chat else 16)
            gen = Generation(self, prompt, params, max_tokens, images)
            try:
                self.scheduler.submit(gen.req)
            except QueueFull:
                raise ApiError(429, f"the server's queue is full ({self.scheduler.max_queue} waiting); retry later",
                               code="queue_full", kind="rate_limit_error") from None
            except Draining:
                raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error") from None
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except Exception as e:  # a bug of ours: answered, logged, and the server lives on
            log.exception("request failed")
            return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").body(),
                                status_code=500)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if params.stream:
            return StreamingResponse(self._stream(gen, rid, chat, params.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._complete(request, gen, rid, chat)

    async def _next(self, gen: Generation, request: HttpRequest | None):
        """The next event; with `request`, a client that went away cancels the generation (None)."""
        while True:
            try:
                return await asyncio.wait_for(gen.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.scheduler.cancel(gen.req)
                    return None

    async def _complete(self, request: HttpRequest, gen: Generation, rid: str, chat: bool):
        parts = []
        while True:
            event = await self._next(gen, request)
            if event is None:  # nobody to answer
                return Response(status_code=499)
            if event[0] != "text":
                break
            parts.append(event[1])
        _, reason, error = event
        if reason == "error":
            return JSONResponse(ApiError(500, f"generation failed: {type(error).__name__}", kind="server_error").body(),
                                status_code=500)
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
                  if chat else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = FINISH.get(reason, "stop")
        choice["token_ids"] = list(gen.req.tokens)  # an extension (as vLLM's): the generated ids
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": [choice],
                             "usage": gen.usage()})

    async def _stream(self, gen: Generation, rid: str, chat: bool, include_usage: bool):
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, first: bool = False) -> str:
            if chat:
                d = {} if delta is None else {"content": delta}
                if first:
                    d["role"] = "assistant"
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            if finish is not None:
                choice["token_ids"] = list(gen.req.tokens)  # the extension, as in a non-streamed choice
            body = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk("", first=True)
            while True:
                event = await self._next(gen, None)  # a disconnect ends this generator (finally below)
                if event[0] == "text":
                    yield chunk(event[1])
                    continue
                _, reason, error = event
                finished = True
                if reason == "error":
                    err = ApiError(500, f"generation failed: {type(error).__name__}", kind="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                yield chunk(None, FINISH.get(reason, "stop"))
                if include_usage:
                    usage = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [],
                             "usage": gen.usage()}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            if not finished:  # the client went away (or the server is stopping): free the sequence now
                self.scheduler.cancel(gen.req)


async def _not_found(request, exc):
    return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").body(),
                        status_code=404)


async def _method_not_allowed(request, exc):
    return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                        status_code=405)


def make_app(server: Server) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.thread.start()
        yield
        server.scheduler.stop()
        server.thread.join(timeout=30)

    return Starlette(
        routes=[Route("/health", server.health), Route("/v1/models", server.models),
                Route("/v1/completions", server.completions, methods=["POST"]),
                Route("/v1/chat/completions", server.chat_completions, methods=["POST"])],
        exception_handlers={404: _not_found, 405: _method_not_allowed}, lifespan=lifespan)
