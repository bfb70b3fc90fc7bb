"""`python -m runtime.serve`'s command line without a real artifact or a listening socket: what it loads, how it builds
the engine and the app, what uvicorn is told, and that a SIGTERM marks the server as draining."""

from __future__ import annotations

import signal

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import runtime
from tests import serve_fakes
from tests.serve_fakes import FakeEngine, FakeModel


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """Runs the CLI with `runtime.load`, the engine class and uvicorn's run replaced; returns what they saw."""
    seen = {}
    module = serve_fakes.engine_types()
    artifact = tmp_path / "my-gemma"
    artifact.mkdir()

    def fake_load(path, backend="auto", *, threads=None):
        seen["load"] = (path, backend)
        seen["threads"] = threads
        return FakeModel(tmp_path)

    class Engine(FakeEngine):
        def __init__(self, model, **kwargs):
            seen["engine_kwargs"] = kwargs
            super().__init__(model, **kwargs)

    def run(server, sockets=None):
        seen["server"] = server

    monkeypatch.setattr(runtime, "load", fake_load)
    monkeypatch.setattr(module, "Engine", Engine, raising=False)
    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.delenv("GEMMA4_API_KEY", raising=False)

    def main(*args):
        from runtime.serve.cli import main as cli_main

        assert cli_main([str(artifact), *args]) == 0
        return seen

    return main


def test_defaults_bind_the_loopback(launched):
    seen = launched()
    server = seen["server"]
    assert server.config.host == "127.0.0.1" and server.config.port == 8000
    assert seen["engine_kwargs"] == {"max_batch": 8, "max_queue": 64}
    assert seen["load"][1] == "auto" and seen["threads"] is None  # ONNX Runtime's own choice
    state = server.config.app.state.serve
    assert state.ctx.model_name == "my-gemma" and state.ctx.max_soft_tokens == 280


def test_flags_reach_the_engine_app_and_uvicorn(launched, monkeypatch, tmp_path):
    monkeypatch.setenv("GEMMA4_API_KEY", "from-env")
    seen = launched("--port", "9123", "--max-batch", "4", "--max-queue", "10", "--max-soft-tokens", "70",
                    "--served-model-name", "g4", "--drain-timeout", "3", "--backend", "onnxruntime",
                    "--allow-media-dir", str(tmp_path), "--max-body-bytes", "1000", "--threads", "3")
    server = seen["server"]
    assert seen["engine_kwargs"] == {"max_batch": 4, "max_queue": 10}
    assert seen["load"][1] == "onnxruntime" and seen["threads"] == 3
    assert server.config.port == 9123 and server.config.timeout_graceful_shutdown == 3
    state = server.config.app.state.serve
    assert (state.ctx.model_name, state.ctx.max_soft_tokens, state.drain_timeout) == ("g4", 70, 3.0)
    assert state.ctx.allow_media_dir == tmp_path.resolve()
    from starlette.testclient import TestClient

    with TestClient(server.config.app) as c:
        assert c.get("/v1/models").status_code == 401  # the key from GEMMA4_API_KEY
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_sigterm_marks_draining(launched):
    server = launched()["server"]
    state = server.config.app.state.serve
    assert not state.draining
    server.handle_exit(signal.SIGTERM, None)
    assert state.draining and server.should_exit


@pytest.mark.parametrize("flag", ["--max-batch", "--threads"])
def test_bad_flags_exit_2(launched, capsys, flag):
    with pytest.raises(SystemExit) as e:
        launched(flag, "0")
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_ray_flags_reach_serve_forever(launched, monkeypatch, capsys):
    """``--ray``: the plain options become each replica's `ReplicaConfig`; Ray itself is not started here."""
    from runtime.serve import ray_app

    calls = []
    monkeypatch.setattr(ray_app, "serve_forever", lambda config, **kw: calls.append((config, kw)) or 0)
    launched("--ray", "--replicas", "3", "--ray-num-cpus", "6", "--host", "0.0.0.0", "--max-batch", "4",
             "--ray-actor-options", '{"num_gpus": 1}', "--backend", "tensorrt", "--threads", "2")
    config, kw = calls[0]
    assert (config.max_batch, config.backend, config.artifact.endswith("my-gemma")) == (4, "tensorrt", True)
    assert config.threads == 2
    assert kw == {"host": "0.0.0.0", "port": 8000, "replicas": 3, "num_cpus": 6, "autoscaling_config": None,
                  "ray_actor_options": {"num_gpus": 1}}
    assert "without an API key" in capsys.readouterr().err  # the plain server's warning, with --ray too


@pytest.mark.parametrize("args, words", [
    (["--replicas", "2"], "--replicas: only with --ray"),
    (["--ray", "--autoscaling-config", "{min_replicas: 1}"], "--autoscaling-config: not JSON"),
    (["--ray", "--ray-actor-options", "[1]"], "expected a JSON object"),
])
def test_bad_ray_flags_exit_2(launched, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        launched(*args)
    assert e.value.code == 2 and words in capsys.readouterr().err
