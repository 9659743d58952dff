"""The OpenAI request fields we take, checked, and the text side of a generation: prompts and chat
messages → token ids, new tokens → text deltas with stop strings cut off.

Every refused field raises ApiError, which the app answers with OpenAI's error object
({"error": {"message", "type", "param", "code"}}) and a 4xx status.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from ..runtime import Sampler

FALLBACK_TEMPLATE = ('ERNIE-style fallback: "User: …\\nAssistant: " '
                     "(the artifact's tokenizer files carry no chat template)")
MAX_STOPS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"{key}: {v!r} must be a number in {'(' if lo_open else '['}{lo}, {hi}]", param=key)
    return float(v)


def _int(body: dict, key: str, lo: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ApiError(400, f"{key}: {v!r} must be an integer >= {lo}", param=key)
    return v


@dataclass
class Params:
    """The generation fields common to both endpoints."""

    max_tokens: int | None
    sampler: Sampler
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool  # an extension (as vLLM's): generate past end-of-sequence tokens (benchmarks)

    @classmethod
    def parse(cls, body: dict, max_tokens_keys=("max_tokens",)) -> "Params":
        n = _int(body, "n", 1)
        if n not in (None, 1):
            raise ApiError(400, f"n: {n}: this server generates one choice per request (n=1)", param="n")
        max_tokens = None
        for key in max_tokens_keys:
            max_tokens = _int(body, key, 1) if max_tokens is None else max_tokens
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        seed = _int(body, "seed", 0)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"stop: a non-empty string or a list of up to {MAX_STOPS} of them", param="stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream: must be a boolean", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options: must be an object", param="stream_options")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "ignore_eos: must be a boolean", param="ignore_eos")
        sampler = Sampler(temperature, top_p, random.randrange(1 << 31) if seed is None else seed)
        return cls(max_tokens, sampler, stop, stream, bool(options.get("include_usage")), ignore_eos)


def check_ids(ids, vocab_size: int, param: str) -> list[int]:
    if not isinstance(ids, list) or not ids:
        raise ApiError(400, f"{param}: an empty prompt", param=param)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ApiError(400, f"{param}: token ids must be integers, got {i!r}", param=param)
        if not 0 <= i < vocab_size:
            raise ApiError(400, f"{param}: token id {i} is outside the vocabulary [0, {vocab_size})", param=param,
                           code="invalid_token_id")
    return ids


def completion_prompt(body: dict, tokenizer, vocab_size: int) -> list[int]:
    """`prompt`: text, token ids, or a list of exactly one of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: this server takes one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt: an empty prompt", param="prompt")
        if not tokenizer.available:
            raise ApiError(400, "prompt: this artifact has no tokenizer; send token ids", param="prompt")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list):
        return check_ids(prompt, vocab_size, "prompt")
    raise ApiError(400, "prompt: a string or a list of token ids", param="prompt")


def _image_url(part: dict, where: str) -> bytes:
    """The bytes of an image_url part: a data: URL (base64). The server fetches nothing."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise ApiError(400, f"{where}: image_url needs a url", param="messages")
    head, sep, data = url.partition(",")
    if not (head.startswith("data:") and head.endswith(";base64") and sep):
        raise ApiError(400, f"{where}: only data: URLs (base64) are taken; this server fetches nothing",
                       param="messages", code="invalid_image_url")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data: URL is not valid base64", param="messages",
                       code="invalid_image_url") from None


def _message(m, i: int, images: list | None) -> tuple[str, str | list]:
    """(role, content): content a string, or (where it holds images) a list of {"type": "text"} and
    {"type": "image"} parts, the images' bytes appended to `images` (None: the artifact takes none)."""
    if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
        raise ApiError(400, f"messages[{i}]: an object with a role system, developer, user, assistant or tool",
                       param="messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text, and images for a VL artifact
        parts = []
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            elif kind == "image_url":
                if images is None:
                    raise ApiError(400, f"messages[{i}].content[{j}]: this artifact takes no images (a text-only "
                                        "model)", param="messages")
                images.append(_image_url(p, f"messages[{i}].content[{j}]"))
                parts.append({"type": "image"})
            else:
                raise ApiError(400, f"messages[{i}].content[{j}]: only text" + (" and image_url" if images is not None
                                                                                 else "") + " parts are supported",
                               param="messages")
        content = parts if any(q["type"] == "image" for q in parts) else "".join(q["text"] for q in parts)
    if content is None and m["role"] == "assistant":
        content = ""
    if not isinstance(content, (str, list)):
        raise ApiError(400, f"messages[{i}].content: a string or a list of parts", param="messages")
    return m["role"], content


class ChatFormat:
    """The artifact's chat template (tokenizer_config.json "chat_template", or chat_template.jinja
    where transformers 5 saves it; rendered by jinja2 in a sandbox as transformers does) if its
    tokenizer files carry one, else FALLBACK_TEMPLATE."""

    def __init__(self, folder: Path, tokenizer_info: dict):
        self.template = None
        self.bos_token_id = tokenizer_info.get("bos_token_id")
        self.special = {}
        files = tokenizer_info.get("files", ())
        config, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
        data = {}
        if "tokenizer_config.json" in files and config.is_file():
            try:
                data = json.loads(config.read_text())
            except ValueError:
                data = {}
            data = data if isinstance(data, dict) else {}
        template, self.source = data.get("chat_template"), config.name
        if not isinstance(template, str) and "chat_template.jinja" in files and jinja.is_file():
            template, self.source = jinja.read_text(errors="replace"), jinja.name
        if isinstance(template, str):
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                self.template = env.from_string(template)
            except Exception:  # no jinja2, or a template it cannot read: the fallback, said in /v1/models
                self.template = None
            for key in ("bos_token", "eos_token"):
                tok = data.get(key)
                self.special[key] = tok.get("content", "") if isinstance(tok, dict) else tok or ""

    @property
    def description(self) -> str:
        return f"the artifact's chat template ({self.source})" if self.template else FALLBACK_TEMPLATE

    def render(self, messages: list[dict]) -> str:
        """The template's text for `messages` (content a string or a list of parts, as transformers
        passes them) with the generation prompt: what runtime/vision.build_prompt_ids expands."""
        if self.template is None:
            raise ApiError(400, "messages: this artifact carries no chat template", param="messages")
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special)

    def prompt(self, body: dict, tokenizer, vision=None) -> tuple[list[int], list]:
        """(ids, images) of `messages`: images are (patches, grid) of runtime/vision.preprocess, in
        prompt order, for a VL artifact (`vision`: its VisionSpec; None refuses image parts)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: a non-empty list", param="messages")
        raw: list[bytes] | None = [] if vision is not None else None
        turns = [_message(m, i, raw) for i, m in enumerate(messages)]
        if not tokenizer.available:
            raise ApiError(400, "messages: this artifact has no tokenizer", param="messages")
        if raw:
            return self._image_prompt(turns, raw, tokenizer, vision)
        if self.template is not None:
            return tokenizer.encode(self.render([{"role": r, "content": c} for r, c in turns])), []
        text = ""
        for role, content in turns:
            text += {"system": "{}\n", "developer": "{}\n", "user": "User: {}\n", "assistant": "Assistant: {}\n",
                     "tool": "Tool: {}\n"}[role].format(content)
        ids = tokenizer.encode(text + "Assistant: ")
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids, []

    def _image_prompt(self, turns, raw: list[bytes], tokenizer, vision) -> tuple[list[int], list]:
        """Images decoded and resized as the checkpoint's processor does, the template rendered with an
        image placeholder per image, each expanded to its token count (runtime/vision.py)."""
        from ..errors import UserError
        from ..runtime.vision import expand_placeholders, load_image, preprocess

        if self.template is None:
            raise ApiError(400, "messages: images need the artifact's chat template, and it carries none",
                           param="messages")
        images = []
        for n, data in enumerate(raw):
            try:
                images.append(preprocess(load_image(io.BytesIO(data), name=f"image {n + 1}"), vision))
            except UserError as e:
                raise ApiError(400, f"messages: {e}", param="messages", code="invalid_image") from None
        rendered = self.render([{"role": r, "content": c} for r, c in turns])
        try:
            ids = expand_placeholders(tokenizer.encode, rendered, [grid for _, grid in images], vision)
        except UserError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        return ids, images


class TextStream:
    """New tokens → text deltas. Runs on the scheduler thread. Text that could still become a stop
    string, or an incomplete character, is held back until it cannot; a stop string ends the text
    before it and finishes the generation."""

    def __init__(self, tokenizer, stops: list[str], push):
        self.tokenizer, self.stops, self.push = tokenizer, stops, push
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def on_token(self, token: int) -> bool:
        self.ids.append(token)
        self.text = text = self.tokenizer.decode(self.ids)
        if self.stops:
            start = max(0, self.sent - max(map(len, self.stops)))
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = text[:min(hits)]
                self._send(len(self.text))
                return True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        end = len(text) - hold
        while end > self.sent and text[end - 1] == "\ufffd":  # a character whose bytes are still coming
            end -= 1
        self._send(end)
        return False

    def flush(self) -> None:
        self._send(len(self.text))

    def _send(self, end: int) -> None:
        if end > self.sent:
            self.push(self.text[self.sent:end])
            self.sent = end
