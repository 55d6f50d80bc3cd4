"""Shared pytest fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.s3server import (
    AWS_ENV_TO_UNSET,
    DUMMY_AWS_ENV,
    FaultProxy,
    MotoServer,
    create_bucket,
)

# --------------------------------------------------------------------------- S3 (moto server)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """A moto S3 server in a subprocess on 127.0.0.1, for the whole session.

    Dummy AWS credentials are set in the environment (and profiles, session tokens and custom
    endpoints unset) while it runs, so nothing can reach real AWS.
    """
    with pytest.MonkeyPatch.context() as mp:
        for name in AWS_ENV_TO_UNSET:
            mp.delenv(name, raising=False)
        for name, value in DUMMY_AWS_ENV.items():
            mp.setenv(name, value)
        with MotoServer() as server:
            yield server


@pytest.fixture(scope="session")
def s3_options(s3_server: MotoServer) -> dict[str, Any]:
    """s3fs storage options (dummy key/secret, endpoint) talking straight to ``s3_server``."""
    return s3_server.storage_options()


@pytest.fixture(scope="session")
def s3_bucket(s3_server: MotoServer, s3_options: dict[str, Any]) -> str:
    """A fresh bucket on ``s3_server``, as ``s3://name`` (shared by the session: use prefixes)."""
    return create_bucket(f"flows-test-{uuid.uuid4().hex[:12]}", s3_options)


@pytest.fixture
def fault_proxy(s3_server: MotoServer) -> Iterator[Callable[..., FaultProxy]]:
    """Factory: ``fault_proxy(rate=0.3, kinds=..., seed=0, ...)`` starts a FaultProxy in front
    of ``s3_server``; use ``proxy.storage_options()`` to read through it. Stopped at teardown."""
    proxies: list[FaultProxy] = []

    def make(rate: float = 0.0, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(s3_server.endpoint_url, rate=rate, **kwargs).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


# --------------------------------------------------------------------------- file manifests


@pytest.fixture(autouse=True)
def _manifest_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """File listings' manifests go to the test session's temporary folder, not ~/.cache."""
    monkeypatch.setenv("FLOWS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "flows-cache"))
