"""The OpenAI-compatible server on loopback (real uvicorn, tiny random model, byte tokenizer):
completions, chat, streaming, malformed / oversized requests, the body-size cap, a full queue,
client disconnect."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from models.config import LlamaConfig  # noqa: E402
from models.engine import Engine, EngineConfig, EngineLoop, SamplingParams  # noqa: E402
from models.server import create_app, default_max_request_bytes  # noqa: E402
from test_engine import random_model  # noqa: E402
from test_pipeline import byte_tokenizer  # noqa: E402

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
ENGINE = EngineConfig(max_batch=4, page_size=8, max_context=128)


def start_server(app):
    """uvicorn on a free loopback port in a thread -> (base url, stop function)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module", params=["sync", "overlap"])
def served(model, tok, request):
    """The server on the synchronous engine, and on overlapped greedy decoding (outputs one step late)."""
    config = dataclasses.replace(ENGINE, overlap_decode=request.param == "overlap")
    engine = Engine(model, config)  # no EOS: random weights would stop at random places
    loop = EngineLoop(engine, max_queue=8).start()
    url, stop = start_server(create_app(loop, tok, "tiny"))
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client, engine
    stop()
    loop.stop()


def greedy_text(model, tok, prompt: str, max_tokens: int) -> str:
    """What the engine alone returns for the prompt, decoded."""
    done = Engine(model, ENGINE).generate([tok.encode(prompt)], SamplingParams(max_tokens=max_tokens))[0]
    return tok.decode(done.token_ids)


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_idle(engine, within: float = 5.0):
    """The engine has nothing running or waiting and every KV page is free again."""
    deadline = time.time() + within
    while time.time() < deadline:
        if not engine.has_work() and engine.allocator.num_free == engine.allocator.capacity:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: running {engine.num_running}, waiting {engine.num_waiting}, "
                         f"free pages {engine.allocator.num_free}/{engine.allocator.capacity}")


def test_completion(served, model, tok):
    client, engine = served
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["text"] == greedy_text(model, tok, "Hello", 7) and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    ids = client.post("/v1/completions", json={"prompt": tok.encode("Hello"), "max_tokens": 7, "temperature": 0})
    assert ids.json()["choices"][0]["text"] == choice["text"]
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert_idle(engine)
    assert (engine.stats["overlapped_steps"] > 0) == engine.overlap


def test_chat(served, model, tok):
    client, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant"
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert msg["content"] == greedy_text(model, tok, prompt, 6)
    assert body["usage"]["prompt_tokens"] == len(tok.encode(prompt))


def test_streaming_completion_and_chat_match_non_streaming(served):
    client, engine = served
    req = {"prompt": "Stream me", "max_tokens": 9, "temperature": 0}
    full = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json=req | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 9

    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}
    full = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json=chat | {"stream": True}) as r:
        events = sse_events(r)
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1]) == full
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert_idle(engine)


def test_sampled_request_with_seed_is_reproducible(served):
    client, _ = served
    req = {"prompt": "Seeded", "max_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    texts = [client.post("/v1/completions", json=req).json()["choices"][0]["text"] for _ in range(2)]
    assert texts[0] == texts[1]


def test_malformed_and_oversized_requests_get_errors_and_the_server_keeps_serving(served):
    client, engine = served
    bad = [
        client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
        client.post("/v1/completions", json={"max_tokens": 3}),                         # no prompt
        client.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}),
        client.post("/v1/completions", json={"prompt": "x", "temperature": -1}),
        client.post("/v1/completions", json={"prompt": "x", "n": 2}),
        client.post("/v1/completions", json={"prompt": [9999]}),
        client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}),
        client.post("/v1/chat/completions", json={"messages": []}),
    ]
    for r in bad:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"]
    long = client.post("/v1/completions", json={"prompt": "x" * 200, "max_tokens": 4})
    assert long.status_code == 400 and "context is 128 tokens" in long.json()["error"]["message"]
    ok = client.post("/v1/completions", json={"prompt": "still here", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert_idle(engine)


def test_oversized_body_gets_413_before_tokenizing_and_the_server_keeps_serving(served, tok, monkeypatch):
    client, engine = served
    limit = default_max_request_bytes(engine.max_context)
    encoded = []  # what the app tokenized (the same tokenizer object the app was built with)
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a, **k: encoded.append(len(text)) or encode(text, *a, **k))
    r = client.post("/v1/completions", json={"prompt": "x" * 12_000_000})  # took ~7 s to refuse when tokenized
    assert r.status_code == 413, r.text
    assert encoded == []  # refused before parsing or tokenizing
    error = r.json()["error"]
    assert error["code"] == 413 and error["type"] == "invalid_request_error"
    assert f"the limit is {limit} bytes" in error["message"]
    ok = client.post("/v1/completions", json={"prompt": "still here", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert_idle(engine)


def raw_http(url: str, request: bytes, timeout: float = 5.0) -> tuple[int, dict]:
    """Writes the raw bytes (they may stop mid-body) and reads one response -> (status, JSON body);
    a server that waits for the rest of the body times out here instead."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)

        def more() -> bytes:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection before a full response")
            return data

        data = b""
        while b"\r\n\r\n" not in data:
            data += more()
        head, body = data.split(b"\r\n\r\n", 1)
        headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
        while len(body) < int(headers[b"content-length"]):
            body += more()
    return int(head.split()[1]), json.loads(body)


def test_request_size_limit_is_enforced_before_reading_and_while_reading_chunked_bodies(model, tok):
    limit = 4096
    loop = EngineLoop(Engine(model, ENGINE), max_queue=8).start()
    url, stop = start_server(create_app(loop, tok, "tiny", max_request_bytes=limit))
    post = b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
    try:
        # a declared length over the cap is refused with the body still unsent
        status, body = raw_http(url, post + b"content-length: 10000000\r\n\r\n" + b'{"prompt": "')
        assert status == 413 and body["error"]["message"].startswith("request body is 10000000 bytes")
        # chunked, no length: refused once the bytes received pass the cap, the upload unfinished
        chunk = b"%x\r\n%s\r\n" % (1024, b"x" * 1024)
        status, body = raw_http(url, post + b"transfer-encoding: chunked\r\n\r\n" + chunk * 5)
        assert status == 413 and f"over {limit} bytes" in body["error"]["message"]

        with httpx.Client(base_url=url, timeout=30) as client:
            def padded(size: int) -> bytes:  # a valid request of exactly `size` bytes (unknown fields are ignored)
                base = b'{"prompt": "hi", "max_tokens": 2, "pad": ""}'
                return base[:-2] + b"x" * (size - len(base)) + base[-2:]

            json_type = {"content-type": "application/json"}
            assert client.post("/v1/completions", content=padded(limit), headers=json_type).status_code == 200
            assert client.post("/v1/completions", content=padded(limit + 1), headers=json_type).status_code == 413
            # a chunked body under the cap reaches the handler intact
            chunked = client.post("/v1/completions", content=iter([padded(limit)[:100], padded(limit)[100:]]),
                                  headers=json_type)
            assert chunked.status_code == 200 and chunked.json()["usage"]["completion_tokens"] == 2
        assert_idle(loop.engine)
    finally:
        stop()
        loop.stop()


def test_create_app_rejects_a_nonpositive_request_size_limit(model, tok):
    loop = EngineLoop(Engine(model, ENGINE))  # never started: only the app's arguments are checked
    with pytest.raises(ValueError, match="max_request_bytes must be a positive integer"):
        create_app(loop, tok, "tiny", max_request_bytes=0)


def test_stop_string_ends_the_completion(served, model, tok):
    client, engine = served
    free = greedy_text(model, tok, "Hello", 12)
    stop = free[3:5]
    cut = free.index(stop)
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 12, "temperature": 0, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["text"] == free[:cut] and choice["finish_reason"] == "stop"
    assert_idle(engine)


def _hang_up_streaming(client):
    req = {"prompt": "abc", "max_tokens": 60, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=req) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up


def _hang_up_streaming_chat(client):
    req = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 60, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=req) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:  # past the role-only first chunk
                assert json.loads(line[len("data: "):])["choices"][0]["finish_reason"] is None  # mid-stream
                break  # first generated text, then hang up


def _hang_up_waiting(client):
    req = {"prompt": "abc", "max_tokens": 60, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        client.post("/v1/completions", json=req, timeout=0.5)  # gives up and hangs up


@pytest.mark.parametrize("hang_up", [_hang_up_streaming, _hang_up_streaming_chat, _hang_up_waiting],
                         ids=["streaming", "streaming-chat", "non-streaming"])
def test_client_disconnect_frees_the_sequence(served, monkeypatch, hang_up):
    client, engine = served
    step = engine.step

    def slow_step():  # ~3 s for the whole request, so only an abort can free it quickly
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    hang_up(client)
    t0 = time.time()
    assert_idle(engine, within=2.0)
    assert time.time() - t0 < 2.0
    monkeypatch.setattr(engine, "step", step)
    ok = client.post("/v1/completions", json={"prompt": "after", "max_tokens": 2})
    assert ok.status_code == 200


def test_full_queue_answers_429(model, tok):
    """An engine loop that is not running keeps its first request in flight: the second is refused."""
    loop = EngineLoop(Engine(model, ENGINE), max_queue=1)  # never started: nothing completes
    url, stop = start_server(create_app(loop, tok, "tiny"))
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            with client.stream("POST", "/v1/completions", json={"prompt": "a", "stream": True}) as first:
                assert first.status_code == 200
                second = client.post("/v1/completions", json={"prompt": "b"})
                assert second.status_code == 429 and "busy" in second.json()["error"]["message"]
    finally:
        stop()
