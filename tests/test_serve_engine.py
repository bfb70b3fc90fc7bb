"""The server over the real engine and the demo artifact (trained, with its tokenizer), through the official
`openai` client on 127.0.0.1: chat with text, an image and audio, streaming and completions give exactly what
`runtime.generate` gives the same prompt alone; concurrent clients too; a client that disconnects mid-stream frees
its slot; a full queue answers 429; ``python -m runtime.serve`` drains running requests on SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
import wave

import numpy as np
import pytest

import runtime
from runtime.engine import Engine
from tests.serve_fakes import free_port, running_server, serve_process, wait_until

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

MODEL = "demo"


@pytest.fixture(scope="module")
def model(demo_engine_artifact):
    return runtime.load(demo_engine_artifact)


@pytest.fixture(scope="module")
def served(model):
    from runtime.serve import create_app

    engine = Engine(model, max_batch=4, max_queue=8)
    app = create_app(engine, model_name=MODEL)
    with running_server(app) as port:
        yield engine, port


@pytest.fixture(scope="module")
def client(served):
    _, port = served
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def _examples():
    from demo.tasks import examples

    out = {}
    for ex in examples("heldout", 60):
        out.setdefault(ex.kind, ex)
    return out


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _wav(wave_f32: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(wave_f32, -1, 1) * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


def _parts(ex) -> tuple[list, dict]:
    """The example's user content as OpenAI parts, and the generate() keyword arguments of the same media."""
    text = ex.question.replace("<|image|>", "").replace("<|audio|>", "")
    if ex.images:
        png = _png(ex.images[0])
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        return [{"type": "image_url", "image_url": {"url": url, "detail": "low"}}, {"type": "text", "text": text}], \
            {"images": [png], "max_soft_tokens": 70}
    if ex.audio:
        wav = _wav(ex.audio[0])
        return [{"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
                {"type": "text", "text": text}], {"audio": [wav]}
    return [{"type": "text", "text": text}], {}


@pytest.mark.parametrize("kind", ["sum", "colour", "pitch"])
def test_chat_equals_generate_alone(client, model, kind):
    ex = _examples()[kind]
    content, media = _parts(ex)
    want = runtime.generate(model, ex.question.join(["<|turn>user\n", "<turn|>\n<|turn>model\n"]), max_new_tokens=8,
                            **media)
    got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8,
                                         temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == {"stop": "stop", "length": "length"}[want.finish_reason]
    assert got.usage.prompt_tokens == want.prompt_tokens and got.usage.completion_tokens == len(want.tokens)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.tokens)


def test_completions_with_token_ids_equal_generate(client, model):
    ids = model.tokenizer.encode(_examples()["sum"].question.join(["<|turn>user\n", "<turn|>\n<|turn>model\n"]))
    want = runtime.generate(model, ids, max_new_tokens=6)
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == len(ids)


def test_concurrent_clients_each_get_their_answer_alone(client, model):
    exs = [ex for ex in __import__("demo.tasks", fromlist=["examples"]).examples("heldout", 12)]
    wants, gots = [], [None] * len(exs)
    for ex in exs:
        _, media = _parts(ex)
        wants.append(runtime.generate(model, ex.question.join(["<|turn>user\n", "<turn|>\n<|turn>model\n"]),
                                      max_new_tokens=6, **media).text)

    def ask(i, ex):
        content, _ = _parts(ex)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                           max_tokens=6, temperature=0)
        gots[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i, ex)) for i, ex in enumerate(exs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert gots == wants


def test_disconnect_mid_stream_frees_the_slot(model):
    import httpx

    from runtime.serve import create_app

    engine = Engine(model, max_batch=2)
    # on the demo model this prompt runs 200 tokens without an eos, 199 of them text pieces: a stream that lasts
    body = {"model": MODEL, "prompt": [2, 26, 35, 40, 58, 71, 8], "max_tokens": 200, "stream": True}
    with running_server(create_app(engine, model_name=MODEL)) as port, httpx.Client(timeout=60) as http:
        decode = engine._runner.decode
        engine._runner.decode = lambda feed, idle: time.sleep(0.01) or decode(feed, idle)  # 2 s of tokens
        with http.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            next(line for line in r.iter_lines() if line.startswith("data: {"))  # one token arrived: leave
            steps = engine.stats()["steps"]
            assert steps < 100, f"the first piece came only after {steps} steps: the stream was not streamed"
            r.stream.close()  # drop the connection here (closing the response could read the rest first)
        # the server notices the disconnect at its next write (a step: 10 ms here); 5 s only bounds a loaded machine
        assert wait_until(lambda: engine.stats()["busy_slots"] == 0, timeout=5.0), engine.stats()
        assert engine.stats()["steps"] < 150, "the request ran to its end instead of being cancelled"


def test_a_full_queue_answers_429(model):
    """One slot, no queue: while a request holds the slot (its prefill held back by the test), the next gets 429."""
    import httpx

    from runtime.serve import create_app

    engine = Engine(model, max_batch=1, max_queue=0)
    release, prefill = threading.Event(), engine._runner.prefill
    engine._runner.prefill = lambda *a: release.wait(30) and prefill(*a)
    with running_server(create_app(engine, model_name=MODEL)) as port, httpx.Client(timeout=60) as http:
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": MODEL, "prompt": "<|turn>user\nWhat is 3 plus 4 ?<turn|>\n<|turn>model\n", "max_tokens": 4}
        first = threading.Thread(target=lambda: http.post(url, json=body))
        first.start()
        assert wait_until(lambda: engine.stats()["busy_slots"] == 1, timeout=30.0)
        refused = http.post(url, json=body)
        release.set()
        first.join(60)
        assert refused.status_code == 429, refused.text
        assert float(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["type"]
        assert http.post(url, json=body).status_code == 200  # the slot is free again


def test_sigterm_drains_running_requests(demo_engine_artifact):
    """SIGTERM while a stream runs (its first piece arrived, 200 tokens asked): it still ends with its last token and
    ``[DONE]``, then the process exits."""
    import httpx

    port = free_port()
    with serve_process([str(demo_engine_artifact), "--drain-timeout", "60", "--max-batch", "2"], port=port) as proc:
        with httpx.Client(timeout=120) as http:
            with http.stream("POST", f"http://127.0.0.1:{port}/v1/completions",
                             json={"prompt": [2, 26, 35, 40, 58, 71, 8], "max_tokens": 200, "stream": True}) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: {"))
                proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
        events = [json.loads(x[6:]) for x in [first, *rest] if x != "data: [DONE]"]
        assert events[0]["choices"][0]["finish_reason"] is None, "the first event was already the last"
        assert rest[-1] == "data: [DONE]", rest[-3:]
        assert events[-1]["choices"][0]["finish_reason"] == "length", events[-1]
        assert len(events) > 150, f"{len(events)} events: the stream was cut short"
        # uvicorn re-raises the signal once its graceful shutdown is done: the exit status says SIGTERM, as it should
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Traceback" not in proc.output and "Application shutdown complete" in proc.output, proc.output[-3000:]
