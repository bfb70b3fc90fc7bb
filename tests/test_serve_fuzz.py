"""Schemathesis fuzzes every operation of the server's OpenAPI schema (in process, over `FakeEngine`): no request,
however malformed, may get a 5xx, and every response must match the documented status codes, content types and
schemas.  Bounded: at most 30 examples per operation, no deadline; derandomized, so a run is reproducible."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from runtime.serve import create_app
from tests.serve_fakes import FakeEngine, FakeModel

ENGINE = FakeEngine(FakeModel(Path(tempfile.gettempdir()), max_len=512)).start()
APP = create_app(ENGINE, model_name="gemma-fuzz")
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(case):
    case.call_and_validate(checks=CHECKS)
