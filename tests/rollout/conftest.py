"""Fixtures of the rollout tests: a CPU engine on the tiny checkpoint, and an HTTP server over a module's `engine`
(a module that needs another checkpoint defines its own `engine`; the server follows it)."""
from __future__ import annotations

import pytest

from mxroll import Engine


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    pytest.importorskip("fastapi")  # a dependency; absent only where the GPU test files run without the server's
    from mxroll.rollout.server import BackgroundServer, create_app  # fastapi: only the server tests need it
    with BackgroundServer(create_app(engine)) as server:
        yield server.url
