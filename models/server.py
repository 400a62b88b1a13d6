"""An OpenAI-compatible HTTP server over the engine: /v1/completions and /v1/chat/completions.

    python -m models serve [--model CKPT_DIR|FILE.gguf|HF_DIR] [--mode auto|fp16|fp8|atom] [--port 8000]

FastAPI + uvicorn (`pip install "atom-kernels[serve]"`). Handlers only tokenize, enqueue into
the EngineLoop (which runs the engine in its own thread) and await the tokens; streaming uses
server-sent events ("data: {json}" lines, then "data: [DONE]"). Errors are OpenAI-shaped
`{"error": {"message", "type", "code"}}`: 400 for malformed JSON, bad fields or a prompt longer
than the context, 413 for a body over max_request_bytes (refused before it is parsed or
tokenized), 429 when the bounded queue is full, 500 if the engine fails a request. A
client that disconnects (mid-stream, or while a non-streaming request runs) has its request
aborted and its KV pages freed.

Supported fields: model (ignored: one model per server), prompt (string or token ids),
messages, max_tokens (chat: also max_completion_tokens), temperature, top_p, seed, stop, stream,
n (1 only). Chat prompts use the ChatML template documented in models/engine/text.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .engine import EngineLoop, QueueFull, RequestError, SamplingParams
from .engine.text import CHAT_END, TextStream, chat_stop_token_ids, render_chat


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are accepted and ignored

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1


class CompletionBody(_Body):
    prompt: str | list[int]
    max_tokens: int = 16


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class EngineFailed(RuntimeError):
    pass


# A prompt that fits the context is a few bytes per token even with long tokens and \uXXXX JSON
# escapes; 256 leaves room for that, and the 1 MiB floor for chat framing on small contexts.
BYTES_PER_CONTEXT_TOKEN = 256
MIN_DEFAULT_REQUEST_BYTES = 1 << 20


def default_max_request_bytes(max_context: int) -> int:
    """The body-size cap when none is given: generous for any prompt the context can hold."""
    return max(MIN_DEFAULT_REQUEST_BYTES, BYTES_PER_CONTEXT_TOKEN * max_context)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class RequestSizeLimit:
    """ASGI middleware: a request body over max_bytes gets 413 before any JSON parsing or
    tokenization. A declared Content-Length is checked before the body is read at all; a chunked
    body (no Content-Length) is counted as it arrives and refused as soon as it passes the cap.
    Uvicorn discards the unread rest, so the connection stays usable."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:  # uvicorn's h11 refuses these itself; other ASGI servers may pass them on
                return await _error(400, f"malformed Content-Length {declared[:40]!r}")(scope, receive, send)
            if length > self.max_bytes:
                return await self._too_large(scope, receive, send, f"{length} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client hung up mid-upload: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send, f"over {self.max_bytes} bytes")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay_body():
            nonlocal replayed
            if replayed:  # later calls wait for http.disconnect, which the handlers poll for
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay_body, send)

    async def _too_large(self, scope, receive, send, size: str):
        message = f"request body is {size}; the limit is {self.max_bytes} bytes (max_request_bytes)"
        await _error(413, message)(scope, receive, send)


def create_app(loop: EngineLoop, tokenizer, model_name: str, max_request_bytes: int | None = None) -> FastAPI:
    """The FastAPI app; max_request_bytes caps request bodies (default: default_max_request_bytes
    of the engine's context)."""
    engine = loop.engine
    if max_request_bytes is None:
        max_request_bytes = default_max_request_bytes(engine.max_context)
    if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be a positive integer, got {max_request_bytes!r}")
    app = FastAPI(title="atom-kernels Llama server")
    app.add_middleware(RequestSizeLimit, max_bytes=max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return _error(400, f"invalid request: {problems}")

    @app.exception_handler(RequestError)
    async def _bad(_req, exc: RequestError):
        return _error(400, str(exc))

    @app.exception_handler(QueueFull)
    async def _busy(_req, exc: QueueFull):
        return _error(429, str(exc), "rate_limit_error")

    @app.exception_handler(EngineFailed)
    async def _failed(_req, exc: EngineFailed):
        return _error(500, str(exc), "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting,
                "in_flight": loop.num_pending, "free_kv_pages": engine.allocator.num_free,
                "kv_format": engine.kv_format}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "atom-kernels"}]}

    def sampling(body: _Body, max_tokens: int, stop_ids=()) -> SamplingParams:
        if body.n != 1:
            raise RequestError("only n = 1 is supported")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              seed=body.seed, stop_token_ids=tuple(stop_ids))

    def stop_strings(body: _Body) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    async def pieces(stream, text: TextStream) -> AsyncIterator[tuple[str, str | None, int]]:
        """(text piece, finish_reason or None, completion tokens so far) as tokens arrive; aborts
        the request when the consumer stops early (client gone) or a stop string appears."""
        try:
            async for out in stream:
                if out.finish_reason == "error":
                    raise EngineFailed(f"generation failed: {out.error}")
                piece = text.add(out.new_token_ids)
                if text.stopped:
                    yield piece, "stop", out.completion_tokens
                    return
                if out.finished:
                    yield piece + text.flush(), out.finish_reason, out.completion_tokens
                    return
                yield piece, None, out.completion_tokens
        finally:
            if not stream.finished:
                loop.abort(stream.request_id)

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def abort_on_disconnect(request: Request, stream) -> None:
        """Non-streaming requests: nothing is written until the end, so poll for the client
        hanging up and abort the request (freeing its pages) when it does."""
        while not stream.finished:
            if await request.is_disconnected():
                loop.abort(stream.request_id)
                return
            await asyncio.sleep(0.05)

    async def respond(request: Request, kind: str, body: _Body, prompt_ids: list[int], params: SamplingParams,
                      extra_stop: tuple[str, ...] = ()):
        stream = loop.submit(prompt_ids, params)  # RequestError -> 400, QueueFull -> 429
        text = TextStream(tokenizer, stop_strings(body) + list(extra_stop))
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(piece: str, reason: str | None, delta: bool) -> dict:
            if kind == "chat":
                key, val = ("delta", {"content": piece} if piece else {}) if delta else \
                    ("message", {"role": "assistant", "content": piece})
                return {"index": 0, key: val, "finish_reason": reason}
            return {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}

        if not body.stream:
            parts, reason, n = [], None, 0
            watcher = asyncio.create_task(abort_on_disconnect(request, stream))
            try:
                async for piece, reason, n in pieces(stream, text):
                    parts.append(piece)
            finally:
                watcher.cancel()
            return {"id": rid, "object": obj, "created": created, "model": model_name,
                    "choices": [choice("".join(parts), reason, False)], "usage": usage(len(prompt_ids), n)}

        async def sse():
            head = {"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                    "model": model_name}
            if kind == "chat":
                yield _sse(head | {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            try:
                async for piece, reason, n in pieces(stream, text):
                    if piece or reason:
                        chunk = head | {"choices": [choice(piece, reason, True)]}
                        if reason:
                            chunk["usage"] = usage(len(prompt_ids), n)
                        yield _sse(chunk)
            except EngineFailed as e:
                yield _sse({"error": {"message": str(e), "type": "server_error", "code": 500}})
            finally:  # the client went away mid-stream: free the sequence now, not at GC time
                if not stream.finished:
                    loop.abort(stream.request_id)
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompt_ids = body.prompt if isinstance(body.prompt, list) else tokenizer.encode(body.prompt)
        return await respond(request, "completion", body, prompt_ids, sampling(body, body.max_tokens))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        try:
            prompt = render_chat([m.model_dump() for m in body.messages])
        except ValueError as e:
            raise RequestError(str(e)) from None
        prompt_ids = tokenizer.encode(prompt)
        # default: as long as the context allows (the engine caps max_tokens at the context)
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.max_context
        stop_ids = chat_stop_token_ids(tokenizer)
        return await respond(request, "chat", body, prompt_ids, sampling(body, max_tokens, stop_ids),
                             extra_stop=() if stop_ids else (CHAT_END,))

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def serve(loop: EngineLoop, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          max_request_bytes: int | None = None) -> None:
    """Run uvicorn until interrupted; the engine loop is stopped on the way out."""
    import uvicorn

    try:
        uvicorn.run(create_app(loop, tokenizer, model_name, max_request_bytes), host=host, port=port,
                    log_level="info")
    finally:
        loop.stop()
