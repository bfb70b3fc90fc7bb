"""Command line: ``python -m runtime.serve ARTIFACT [--host 127.0.0.1] [--port 8000] [...]``.

Loads the artifact (`runtime.load`, files checked against the manifest), builds `runtime.engine.Engine(model,
max_batch=..., max_queue=...)`, and serves it with uvicorn on 127.0.0.1 unless ``--host`` says otherwise.  The API
key comes from ``--api-key`` or the environment variable ``GEMMA4_API_KEY`` (preferred: a command line is visible to
other users).  On SIGTERM/SIGINT the server stops accepting connections, marks itself draining (``/health`` 503),
gives running requests ``--drain-timeout`` seconds to finish (uvicorn's graceful shutdown, then the engine's
``shutdown(drain_timeout=...)``) and cancels the rest.  Expected failures print one ``error: ...`` line and exit 2.

``--ray --replicas N``: the same server as N Ray Serve replicas on a local Ray started on the loopback only, each
with its own load of the artifact (`runtime.serve.ray_app`, which holds everything Ray; nothing here imports ray).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from runtime.images import SUPPORTED_SOFT_TOKEN_BUDGETS

__all__ = ["main"]

API_KEY_ENV = "GEMMA4_API_KEY"


def _fail(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    from runtime.serve.app import DEFAULT_MAX_BODY_BYTES

    p = argparse.ArgumentParser(prog="python -m runtime.serve", description="OpenAI-compatible server for an artifact.")
    p.add_argument("artifact", help="artifact directory (with manifest.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="sequences generated together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-soft-tokens", type=int, default=280, choices=SUPPORTED_SOFT_TOKEN_BUDGETS,
                   help="soft tokens per image when a request says detail=auto (default 280)")
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})")
    p.add_argument("--allow-media-dir", default=None, metavar="DIR",
                   help="also accept file:// image URLs of files inside DIR (default: data: URLs only)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish on shutdown (default 30)")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice, one per physical core with "
                        "each worker pinned to its core; a number leaves placement to the OS: docs/speed.md)")
    ray = p.add_argument_group("scale-out on Ray Serve (pip install '.[ray]'; see docs/serving-ray.md)")
    ray.add_argument("--ray", action="store_true", help="serve N replicas behind Ray Serve's proxy on --host/--port")
    ray.add_argument("--replicas", type=int, default=None, help="replicas, each one engine (default 1)")
    ray.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs the local Ray schedules (default: all)")
    ray.add_argument("--autoscaling-config", default=None, metavar="JSON",
                     help='Ray Serve autoscaling instead of --replicas, e.g. {"min_replicas": 1, "max_replicas": 4}')
    ray.add_argument("--ray-actor-options", default=None, metavar="JSON",
                     help='resources per replica, e.g. {"num_gpus": 1} for TensorRT replicas')
    return p


def _json_object(flag: str, text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        _fail(f"{flag}: not JSON ({e})")
    if not isinstance(value, dict):
        _fail(f"{flag}: expected a JSON object, got {text!r}")
    return value


def _serve_on_ray(a: argparse.Namespace, api_key: str | None) -> int:
    from runtime.serve.ray_app import ReplicaConfig, serve_forever

    config = ReplicaConfig(artifact=a.artifact, backend=a.backend, max_batch=a.max_batch, max_queue=a.max_queue,
                           served_model_name=a.served_model_name, api_key=api_key, max_soft_tokens=a.max_soft_tokens,
                           allow_media_dir=a.allow_media_dir, max_body_bytes=a.max_body_bytes,
                           drain_timeout=a.drain_timeout, threads=a.threads)
    try:
        return serve_forever(config, host=a.host, port=a.port, replicas=a.replicas, num_cpus=a.ray_num_cpus,
                             autoscaling_config=_json_object("--autoscaling-config", a.autoscaling_config),
                             ray_actor_options=_json_object("--ray-actor-options", a.ray_actor_options))
    except ImportError as e:
        _fail(f"--ray needs Ray Serve: pip install 'gemma4-deploy[ray]' ({e})")
    except (ValueError, RuntimeError) as e:  # a bad option, an artifact the replicas cannot load
        _fail(str(e))


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    for flag, value, low in (("--port", a.port, 0), ("--max-batch", a.max_batch, 1), ("--max-queue", a.max_queue, 0),
                             ("--max-body-bytes", a.max_body_bytes, 1), ("--drain-timeout", a.drain_timeout, 0),
                             *((("--threads", a.threads, 1),) if a.threads is not None else ())):
        if value < low:
            _fail(f"{flag} {value}: expected at least {low}")
    api_key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if a.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {a.host} without an API key; anyone who can reach it can use it", file=sys.stderr)
    ray_only = [f for f, v in (("--replicas", a.replicas), ("--ray-num-cpus", a.ray_num_cpus),
                               ("--autoscaling-config", a.autoscaling_config),
                               ("--ray-actor-options", a.ray_actor_options)) if v is not None]
    if a.ray:
        return _serve_on_ray(a, api_key)
    if ray_only:
        _fail(f"{', '.join(ray_only)}: only with --ray")
    import uvicorn

    from runtime import load
    from runtime.engine import Engine
    from runtime.serve.app import create_app

    try:
        model = load(a.artifact, a.backend, threads=a.threads)
        engine = Engine(model, max_batch=a.max_batch, max_queue=a.max_queue)
        app = create_app(engine, model_name=a.served_model_name or Path(a.artifact).resolve().name, api_key=api_key,
                         max_soft_tokens=a.max_soft_tokens, allow_media_dir=a.allow_media_dir,
                         max_body_bytes=a.max_body_bytes, drain_timeout=a.drain_timeout)
    except (ValueError, RuntimeError, OSError) as e:  # ArtifactError, InputError, a backend that cannot start
        _fail(str(e))
    state = app.state.serve

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.draining = True  # /health answers 503 from the first signal on
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=a.host, port=a.port, lifespan="on", timeout_graceful_shutdown=a.drain_timeout,
                            log_level="info")
    Server(config).run()
    return 0
