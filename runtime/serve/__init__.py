"""An OpenAI-compatible HTTP server over the in-flight batching engine (`runtime.engine.Engine`).

``python -m runtime.serve ARTIFACT`` serves ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/health`` and ``/metrics`` on 127.0.0.1; `create_app(engine, model_name=...)` builds the same application over any
object with the engine's interface (tests use a fake).  One job per module: `schemas` (pydantic models), `translate`
(request -> submit arguments), `chat` (chat template), `media` (data: URLs), `errors` (OpenAI error shape and
statuses), `metrics` (Prometheus), `routes`, `app` (factory, middleware), `cli`.

It deliberately holds no numpy and no backend: the engine tokenizes, decodes media, schedules and generates.
"""

from runtime.serve.app import create_app

__all__ = ["create_app"]
