"""The HTTP layer alone: a real uvicorn server on 127.0.0.1 over `FakeEngine`, driven by the official openai client.

Covers chat (text, image, audio), streaming (chunks add up to the whole answer, usage chunk), completions (text and
token ids), models, health, metrics, the OpenAI error shape for a corpus of bad requests, 429/500/401/413, media URLs
refused without any network access, and cancellation of requests whose client went away.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.request
import wave
from types import SimpleNamespace

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from runtime import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, chat_prompt
from runtime.serve import create_app
from tests.serve_fakes import REPLY, FakeEngine, FakeModel, running_server

MODEL, KEY = "gemma-test", "sk-test-key"
ANSWER = "".join(REPLY)


def png_data_url(size=(8, 6)) -> tuple[str, bytes]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format="PNG")
    data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode(), data


def wav_bytes(n: int = 1600) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x01" * n)
    return buf.getvalue()


@pytest.fixture
def engine(tmp_path):
    return FakeEngine(FakeModel(tmp_path))


def _server(engine, **kwargs):
    app = create_app(engine, model_name=MODEL, api_key=KEY, **kwargs)
    return app, running_server(app)


@pytest.fixture
def server(engine):
    app, ctx = _server(engine)
    with ctx as port:
        yield SimpleNamespace(port=port, base=f"http://127.0.0.1:{port}", engine=engine, app=app)
    assert engine.shutdowns, "the lifespan shutdown did not call engine.shutdown"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def test_chat_text_uses_the_gemma_turns(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hi there"}])
    assert r.choices[0].message.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    sub = engine.submissions[-1]
    assert sub["prompt"] == chat_prompt("Hi there", system="Be brief.")
    assert r.usage.prompt_tokens == engine.handles[-1].prompt_tokens
    assert r.usage.completion_tokens == len(REPLY) + 1  # the eos token counts, as in runtime.generate
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert sub["params"].stop_ids == (1, 106)  # eos and end of turn by default


def test_chat_sampling_fields_reach_the_engine(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       temperature=0.7, top_p=0.9, seed=5, stop=["\n\n", "END"], user="u-1",
                                       frequency_penalty=0, presence_penalty=0, logprobs=False)
    p = engine.submissions[-1]["params"]
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop_strings) == (3, 0.7, 0.9, 5, ("\n\n", "END"))
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == "".join(REPLY[:3])
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=2,
                                   stop="STOP")
    p = engine.submissions[-1]["params"]
    assert (p.max_tokens, p.stop_strings) == (2, ("STOP",))


def test_chat_image_and_audio_parts(client, engine):
    url, png = png_data_url()
    wav = wav_bytes()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is "},
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
        {"type": "text", "text": " and "},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "text", "text": "?"},
    ]}])
    assert r.choices[0].message.content == ANSWER
    sub = engine.submissions[-1]
    assert sub["prompt"] == chat_prompt(f"What is {IMAGE_PLACEHOLDER} and {AUDIO_PLACEHOLDER}?")
    assert sub["images"] == [png] and sub["audio"] == [wav]
    assert sub["max_soft_tokens"] == 70  # detail=low
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}}]}])
    assert engine.submissions[-1]["max_soft_tokens"] == 1120
    assert engine.submissions[-1]["prompt"].count(IMAGE_PLACEHOLDER) == 2
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}])
    assert engine.submissions[-1]["max_soft_tokens"] == 280  # auto: the server's --max-soft-tokens


def test_chat_stream_adds_up_to_the_whole_answer(client, engine):
    messages = [{"role": "user", "content": "Tell me"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "stop"


def test_sse_wire_format(http):
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                            "messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        assert json.loads(e[6:])["object"] == "chat.completion.chunk"


def test_completions_text_and_token_ids(client, engine):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert r.choices[0].text == "".join(REPLY[:4]) and r.choices[0].finish_reason == "length"
    assert engine.submissions[-1]["prompt"] == "Once upon a time"  # no chat template
    r = client.completions.create(model=MODEL, prompt=[2, 10, 11, 12], max_tokens=50)
    assert engine.submissions[-1]["prompt"] == [2, 10, 11, 12]
    assert r.choices[0].text == ANSWER and r.usage.prompt_tokens == 4
    client.completions.create(model=MODEL, prompt=["just one"])
    assert engine.submissions[-1]["prompt"] == "just one"
    assert engine.submissions[-1]["params"].max_tokens == 16  # OpenAI's default for completions
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=50, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ANSWER
    assert chunks[-1].usage.completion_tokens == len(REPLY) + 1


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "model"


def test_health(server, engine):
    assert httpx.get(f"{server.base}/health").status_code == 200  # open without the key
    server.app.state.serve.draining = True
    r = httpx.get(f"{server.base}/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    server.app.state.serve.draining = False


def test_health_before_start_and_lifespan_shutdown(engine):
    from starlette.testclient import TestClient

    app = create_app(engine, model_name=MODEL, drain_timeout=7.5)
    r = TestClient(app).get("/health")  # no lifespan: the engine was never started
    assert r.status_code == 503 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        assert engine.shutdowns == []
    assert engine.shutdowns == [7.5]
    assert app.state.serve.draining


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == name or head == f"{name}{{{want}}}" or (labels and head.startswith(f"{name}{{") and
                                                           all(f'{k}="{v}"' in head for k, v in labels.items())):
            return float(value)
    return 0.0


def test_metrics_named_and_increasing(client, http, engine):
    before = http.get("/metrics").text
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a b c"}])
    list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], stream=True))
    after = http.get("/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    text = after.text
    for name in ("gemma4_requests_total", "gemma4_prompt_tokens_total", "gemma4_generated_tokens_total",
                 "gemma4_queue_depth", "gemma4_busy_slots", "gemma4_time_to_first_token_seconds_count",
                 "gemma4_inter_token_latency_seconds_count"):
        assert name in text, name
    route = {"route": "/v1/chat/completions", "status": "200"}
    assert _metric(text, "gemma4_requests_total", **route) == _metric(before, "gemma4_requests_total", **route) + 2
    assert _metric(text, "gemma4_generated_tokens_total") == _metric(before, "gemma4_generated_tokens_total") + 20
    assert _metric(text, "gemma4_prompt_tokens_total") > _metric(before, "gemma4_prompt_tokens_total")
    assert _metric(text, "gemma4_time_to_first_token_seconds_count") == 2
    assert _metric(text, "gemma4_inter_token_latency_seconds_count") == 2 * len(REPLY)
    assert _metric(text, "gemma4_max_batch") == engine.max_batch
    http.post("/v1/chat/completions", json={"messages": []})
    assert _metric(http.get("/metrics").text, "gemma4_requests_total", route="/v1/chat/completions",
                   status="400") == 1


def _msg(content):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]}


BAD_REQUESTS = [
    # (route, body, status, field that the error must name)
    ("/v1/chat/completions", b"{not json", 400, "JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "body"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", _msg(5), 400, "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", _msg([{"type": "video", "video": {}}]), 400, "messages[0].content[0].type"),
    ("/v1/chat/completions", _msg([{"type": "image_url"}]), 400, "messages[0].content[0]"),
    ("/v1/chat/completions", _msg([{"type": "image_url", "image_url": {"url": 5}}]), 400,
     "messages[0].content[0].image_url.url"),
    ("/v1/chat/completions", _msg([{"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lG"}}]), 400,
     "messages[0].content[0].image_url.url"),
    ("/v1/chat/completions", _msg([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]), 400,
     "messages[0].content[0].image_url.url"),
    ("/v1/chat/completions", _msg([{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\ngarbage").decode()}}]), 400, "messages"),
    ("/v1/chat/completions", _msg([{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]), 400,
     "messages[0].content[0].image_url.detail"),
    ("/v1/chat/completions", _msg([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}]), 400,
     "messages[0].content[0].input_audio.format"),
    ("/v1/chat/completions", _msg([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]), 400,
     "messages[0].content[0].input_audio.data"),
    ("/v1/chat/completions", _msg("<|image|> hi"), 400, "messages"),
    ("/v1/chat/completions", {**_msg("x"), "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**_msg("x"), "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {**_msg("x"), "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**_msg("x"), "seed": -1}, 400, "seed"),
    ("/v1/chat/completions", {**_msg("x"), "stop": ""}, 400, "stop"),
    ("/v1/chat/completions", {**_msg("x"), "stop": [1]}, 400, "stop"),
    ("/v1/chat/completions", {**_msg("x"), "n": 2}, 400, "n"),
    ("/v1/chat/completions", {**_msg("x"), "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {**_msg("x"), "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {**_msg("x"), "presence_penalty": -1}, 400, "presence_penalty"),
    ("/v1/chat/completions", {**_msg("x"), "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {**_msg("x"), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {**_msg("x"), "tool_choice": "auto"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**_msg("x"), "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {**_msg("x"), "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {**_msg("x"), "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "assistant", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     400, "messages[0].content[0]"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 5000]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 5000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "end"}, 400, "suffix"),
    ("/v1/nothing", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("route,body,status,field", BAD_REQUESTS,
                         ids=[f"{i}-{r[3]}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_the_error_shape(http, engine, route, body, status, field):
    n = len(engine.submissions)
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert field in err["message"] or field == err["param"], err
    assert err["type"] == "invalid_request_error"
    assert len(engine.submissions) == n  # nothing was generated for a bad request


def test_overloaded_is_429_with_retry_after(client, http, engine):
    engine.overloaded = True
    r = http.post("/v1/chat/completions", json=_msg("x"))
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    assert r.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="x")
    engine.overloaded = False
    assert client.completions.create(model=MODEL, prompt="x").choices[0].text


def test_a_failed_request_is_500_and_the_next_succeeds(client, http, engine):
    engine.fail_next = True
    r = http.post("/v1/chat/completions", json=_msg("x"))
    assert r.status_code == 500 and "failed on purpose" in r.json()["error"]["message"]
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}]).choices
    engine.crash_next = True  # an unexpected exception at submit
    r = http.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert client.completions.create(model=MODEL, prompt="x").choices[0].text
    engine.fail_next = True  # mid-stream: an error event, then the stream ends
    with pytest.raises(openai.APIError, match="failed on purpose"):
        list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True))
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y"}]).choices


def test_api_key(server, engine):
    url = f"{server.base}/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.base}/metrics").status_code == 401
    assert httpx.post(f"{server.base}/v1/chat/completions", json=_msg("x")).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{server.base}/health").status_code == 200
    bad = openai.OpenAI(base_url=f"{server.base}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert engine.submissions == []


@pytest.fixture
def no_network(monkeypatch):
    """Fails any name lookup or connection to an address other than the loopback; returns what was attempted."""
    attempts = []
    loopback = {"127.0.0.1", "localhost", "::1"}
    real_gai, real_cc, real_connect = socket.getaddrinfo, socket.create_connection, socket.socket.connect

    def getaddrinfo(host, *a, **k):
        if str(host) not in loopback:
            attempts.append(("getaddrinfo", host))
            raise OSError(f"test: no network access allowed ({host})")
        return real_gai(host, *a, **k)

    def create_connection(address, *a, **k):
        if str(address[0]) not in loopback:
            attempts.append(("create_connection", address))
            raise OSError(f"test: no network access allowed ({address})")
        return real_cc(address, *a, **k)

    def connect(self, address):
        if isinstance(address, tuple) and str(address[0]) not in loopback:
            attempts.append(("connect", address))
            raise OSError(f"test: no network access allowed ({address})")
        return real_connect(self, address)

    def urlopen(url, *a, **k):
        attempts.append(("urlopen", url))
        raise OSError("test: no network access allowed")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return attempts


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://203.0.113.7/cat.png", "file:///etc/passwd",
                                 "ftp://example.com/x.png", "/etc/passwd", "//example.com/x.png"])
def test_non_data_urls_are_refused_without_network(no_network, http, engine, url):
    r = http.post("/v1/chat/completions", json=_msg([{"type": "image_url", "image_url": {"url": url}}]))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[0].image_url.url" and err["code"] == "invalid_url"
    assert "data: URLs" in err["message"]
    assert no_network == [] and engine.submissions == []


def test_allow_media_dir(tmp_path, engine):
    from PIL import Image

    media, outside = tmp_path / "media", tmp_path / "outside"
    media.mkdir(), outside.mkdir()
    Image.new("RGB", (4, 4)).save(media / "ok.png")
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    (media / "link.png").symlink_to(outside / "secret.png")
    app = create_app(engine, model_name=MODEL, allow_media_dir=media)
    with running_server(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        def post(url):
            return http.post("/v1/chat/completions", json=_msg([{"type": "image_url", "image_url": {"url": url}}]))

        assert post((media / "ok.png").as_uri()).status_code == 200
        assert engine.submissions[-1]["images"] == [(media / "ok.png").read_bytes()]
        for url in ((media / "link.png").as_uri(), (outside / "secret.png").as_uri(),
                    f"file://{media}/../outside/secret.png", "file:///etc/passwd", (media / "none.png").as_uri(),
                    "http://example.com/x.png"):
            r = post(url)
            assert r.status_code == 400, url
            assert r.json()["error"]["param"] == "messages[0].content[0].image_url.url"
    assert len(engine.submissions) == 1


def test_body_limit_is_413(engine):
    app = create_app(engine, model_name=MODEL, max_body_bytes=2000)
    with running_server(app) as port:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=_msg("x" * 5000))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        chunked = httpx.post(f"http://127.0.0.1:{port}/v1/completions",  # no Content-Length: counted as read
                             content=iter([b'{"prompt": "', b"x" * 3000, b'"}']))
        assert chunked.status_code == 413
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"}).status_code == 200
    assert engine.submissions[-1]["prompt"] == "x" and len(engine.submissions) == 1


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_disconnect_mid_stream_cancels_the_request(server, engine):
    engine.delay = 0.2  # 10 pieces: 2 s if nobody cancels
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}) as http, \
            http.stream("POST", "/v1/chat/completions", json={**_msg("x"), "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert next(lines) == ""
    # leaving the block closed the connection mid-stream
    assert _wait_for(lambda: engine.cancelled == [engine.handles[0].id]), engine.cancelled
    assert engine.handles[0].finish_reason == "cancelled"


def test_disconnect_while_waiting_cancels_the_request(server, engine):
    engine.delay = 0.2
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/chat/completions", json=_msg("x"),
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    assert _wait_for(lambda: engine.cancelled == [engine.handles[0].id]), engine.cancelled
