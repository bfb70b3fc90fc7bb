"""Scale-out on Ray Serve: N replicas of the OpenAI-compatible server behind Ray Serve's HTTP proxy.

Each replica is one `Replica` actor: its own `runtime.load(artifact)`, its own `runtime.engine.Engine`, and the
same `create_app(...)` application the plain server runs (streaming SSE included), with one addition: every
response carries an ``x-replica`` header naming the replica that answered (Ray Serve's replica id).  Ray Serve's
proxy spreads the requests over the replicas, restarts a replica that dies or fails its health check (the engine
thread gone), and with an ``autoscaling_config`` adds and removes replicas by load.  There is no balancer of ours.

Two ways to start it:

- ``python -m runtime.serve ARTIFACT --ray --replicas 2`` (`serve_forever`): a local Ray on this machine only.
- ``serve run config.yaml`` with ``import_path: runtime.serve.ray_app:build`` and `build`'s ``args`` (an artifact
  path as the replicas see it; `ReplicaConfig`'s fields; ``replicas``, ``autoscaling_config``,
  ``ray_actor_options``, ``max_ongoing_requests``, ``max_queued_requests``), on a cluster you started.

GPU replicas: ``ray_actor_options={"num_gpus": 1}`` gives each replica a GPU of its own (Ray sets its
``CUDA_VISIBLE_DEVICES``); with ``backend="tensorrt"`` each then loads the TensorRT engines on it.  Each replica
takes ``max_batch + max_queue`` requests at a time by default (``max_ongoing_requests``); the proxy holds the rest
(up to ``max_queued_requests``, then 503).

Loopback only (`start_local`): a new Ray instance (``address="local"``) with ``_node_ip_address="127.0.0.1"``, no
dashboard, usage stats off (``RAY_USAGE_STATS_ENABLED=0``) and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single node:
without it Ray 2.60 swaps 127.0.0.1 for the machine's address), and each replica's inter-deployment gRPC server moved
from every interface to 127.0.0.1 (`_replica_grpc_on_loopback`); the Serve proxy listens on the host given
(127.0.0.1 unless told otherwise).  ``tests/test_serve_ray.py`` checks every socket Ray listens on.
Ray is imported only here, and only when a function of this module runs.  This module does not manage clusters
of several machines, nor anything Ray's own tooling does (``ray start``, ``serve deploy``, KubeRay).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from runtime.serve.app import DEFAULT_MAX_BODY_BYTES

__all__ = ["APP_NAME", "REPLICA_HEADER", "Replica", "ReplicaConfig", "build", "serve_forever", "start_local",
           "stop_local"]

APP_NAME = "gemma4"
REPLICA_HEADER = "x-replica"
API_KEY_ENV = "GEMMA4_API_KEY"
_DEPLOYMENT_KEYS = ("replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests",
                    "max_queued_requests")


def _no_usage_stats() -> None:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # before ray is imported: Ray reports nothing anywhere


def _loopback_env() -> None:
    """Read by Ray when it is imported: no usage stats, and a single-node Ray whose node address is 127.0.0.1 (its
    servers then listen on the loopback only; without it Ray 2.60 replaces ``_node_ip_address="127.0.0.1"`` by the
    machine's address and listens on every interface)."""
    _no_usage_stats()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _replica_grpc_on_loopback() -> None:
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to ``[::]:0`` (every interface) whatever the
    node's address; on a node whose address is the loopback, bind it to 127.0.0.1 instead.  Runs in the replica,
    before Serve starts that server; a Ray without this hook is left alone (``tests/test_serve_ray.py`` checks every
    listening socket)."""
    import ray
    from ray.serve._private import replica as serve_replica

    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if original is None or ray.util.get_node_ip_address() != "127.0.0.1" or getattr(original, "loopback", False):
        return

    def add_port(server, address: str):
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    add_port.loopback = True
    serve_replica.add_port_to_grpc_server = add_port


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica loads and serves (the plain CLI's options of the same names)."""

    artifact: str
    backend: str = "auto"
    threads: int | None = None  # ONNX Runtime threads per replica (default: the backend's own choice)
    max_batch: int = 8
    max_queue: int = 64
    served_model_name: str | None = None
    api_key: str | None = None
    max_soft_tokens: int = 280
    allow_media_dir: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout: float = 30.0


class Replica:
    """One Ray Serve replica: an engine over its own load of the artifact, and the server's app over it.  Ray Serve
    builds the app with `__serve_build_asgi_app__` once the constructor ran, and runs its lifespan (engine start,
    drain on shutdown)."""

    def __init__(self, config: ReplicaConfig) -> None:
        from runtime import load
        from runtime.engine import Engine

        _replica_grpc_on_loopback()
        self.config = config
        self.engine = Engine(load(config.artifact, config.backend, threads=config.threads),
                             max_batch=config.max_batch, max_queue=config.max_queue)
        self._started = False

    def __serve_build_asgi_app__(self):
        from ray import serve

        from runtime.serve.app import create_app

        c = self.config
        app = create_app(self.engine, model_name=c.served_model_name or Path(c.artifact).name, api_key=c.api_key,
                         max_soft_tokens=c.max_soft_tokens, allow_media_dir=c.allow_media_dir,
                         max_body_bytes=c.max_body_bytes, drain_timeout=c.drain_timeout)
        app.add_middleware(_ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    def check_health(self) -> None:
        """Ray Serve calls this every ``health_check_period_s`` (10 s by default); raising replaces the replica."""
        if self.engine.ready:
            self._started = True
        elif self._started:
            raise RuntimeError("the engine thread is not running; this replica cannot generate")


class _ReplicaHeader:
    """Adds ``x-replica: <id>`` to every response (plain ASGI: streaming and disconnects pass through)."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def build(args: dict) -> Any:
    """The Serve application (``serve run``'s ``import_path: runtime.serve.ray_app:build``).  ``args``: ``artifact``
    and `ReplicaConfig`'s other fields, ``replicas`` (default 1) or ``autoscaling_config`` (Ray Serve's dict, which
    then decides the number of replicas), ``ray_actor_options`` (e.g. ``{"num_gpus": 1}``),
    ``max_ongoing_requests`` (default ``max_batch + max_queue``), ``max_queued_requests`` (default: unbounded)."""
    _no_usage_stats()
    from ray import serve

    args = dict(args)
    known = {f.name for f in fields(ReplicaConfig)} | set(_DEPLOYMENT_KEYS)
    if unknown := sorted(set(args) - known):
        raise ValueError(f"unknown argument(s) {unknown} for runtime.serve.ray_app:build; expected some of "
                         f"{sorted(known)}")
    if "artifact" not in args:
        raise ValueError("runtime.serve.ray_app:build needs `artifact`: the artifact directory as replicas see it")
    deployment = {k: args.pop(k) for k in _DEPLOYMENT_KEYS if k in args}
    if args.get("api_key") is None:
        args["api_key"] = os.environ.get(API_KEY_ENV) or None
    args["artifact"] = str(Path(args["artifact"]).expanduser().resolve())
    config = ReplicaConfig(**args)
    options = {"name": "Gemma4", "ray_actor_options": deployment.get("ray_actor_options") or {},
               "max_ongoing_requests": deployment.get("max_ongoing_requests") or config.max_batch + config.max_queue,
               "max_queued_requests": deployment.get("max_queued_requests", -1),
               "graceful_shutdown_timeout_s": config.drain_timeout + 5}
    if deployment.get("autoscaling_config") is not None:
        if deployment.get("replicas") is not None:
            raise ValueError("give `replicas` or `autoscaling_config`, not both (autoscaling sets the number)")
        options["autoscaling_config"] = deployment["autoscaling_config"]
    else:
        replicas = 1 if deployment.get("replicas") is None else deployment["replicas"]
        if replicas < 1:
            raise ValueError(f"replicas={replicas}: expected at least 1")
        options["num_replicas"] = replicas
    return serve.deployment(serve.ingress()(Replica)).options(**options).bind(config)


def start_local(*, num_cpus: int | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start a Ray instance on this machine's loopback only (no dashboard, no usage stats) and Serve's HTTP proxy
    on ``host:port``."""
    _loopback_env()
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    if (node := ray.util.get_node_ip_address()) != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"Ray started on {node}, not on the loopback: ray was imported before "
                           "runtime.serve.ray_app could set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; set it in the "
                           "environment, or import ray after calling start_local")
    serve.start(http_options={"host": host, "port": port})


def stop_local() -> None:
    """Shut Serve down (replicas drain for ``drain_timeout``), then Ray."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(config: ReplicaConfig, *, host: str, port: int, replicas: int | None,
                  autoscaling_config: dict | None, ray_actor_options: dict | None, num_cpus: int | None) -> int:
    """`python -m runtime.serve ARTIFACT --ray`: a local Ray, the application deployed, until SIGTERM/SIGINT."""
    _loopback_env()  # before `build` imports ray
    if not (Path(config.artifact) / "manifest.json").is_file():  # `build` cannot tell: replicas may be elsewhere
        raise ValueError(f"{config.artifact}: not an artifact directory (no manifest.json)")
    args = {k: v for k, v in asdict(config).items() if v is not None}
    app = build({**args, "replicas": replicas, "autoscaling_config": autoscaling_config,
                 "ray_actor_options": ray_actor_options})
    stop = threading.Event()
    start_local(num_cpus=num_cpus, host=host, port=port)
    try:
        from ray import serve

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        where = f"http://{host}:{port}"
        print(f"serving {Path(config.artifact).resolve()} on {where} (Ray Serve, application {APP_NAME!r})", flush=True)
        while not stop.wait(0.5):
            pass
        print("shutting down: replicas drain, then Ray stops", flush=True)
    finally:
        stop_local()
    return 0
