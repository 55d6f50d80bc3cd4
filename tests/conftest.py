"""Shared pytest fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from flows.storage.objstore import CLIENT_ENV_VAR
from tests.s3server import (
    AWS_ENV_TO_UNSET,
    DUMMY_AWS_ENV,
    DUMMY_KEY,
    DUMMY_SECRET,
    FaultProxy,
    MotoServer,
    RcloneServer,
    create_bucket,
    rclone_binary,
)

# Fake credentials the credential tests use; rclone checks keys, so it accepts these pairs too.
LEAK_CREDENTIALS = [
    ("AKIAFLOWSLEAKTEST042", "flowsLeakSecret+9f8e7d6c5b4a/3210zyxw"),
    ("AKIAFLOWSS3LEAKTEST9", "flowsS3LeakSecret+abcdef0123/456789"),
]

# --------------------------------------------------------------------------- S3 servers


@pytest.fixture(scope="session")
def dummy_aws_env() -> Iterator[None]:
    """Dummy AWS credentials in the environment (profiles, session tokens and custom endpoints
    unset) for the whole session, so nothing can reach real AWS."""
    with pytest.MonkeyPatch.context() as mp:
        for name in AWS_ENV_TO_UNSET:
            mp.delenv(name, raising=False)
        for name, value in DUMMY_AWS_ENV.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def s3_server(dummy_aws_env: None) -> Iterator[MotoServer]:
    """A moto S3 server in a subprocess on 127.0.0.1, for the whole session."""
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def rclone_server(dummy_aws_env: None) -> Iterator[RcloneServer]:
    """``rclone serve s3`` in a subprocess on 127.0.0.1, for the whole session."""
    try:
        rclone_binary()
    except RuntimeError as error:
        pytest.skip(str(error))
    with RcloneServer(auth_keys=[(DUMMY_KEY, DUMMY_SECRET), *LEAK_CREDENTIALS]) as server:
        yield server


@pytest.fixture(scope="session")
def s3_options(s3_server: MotoServer) -> dict[str, Any]:
    """S3 storage options (dummy key/secret, endpoint) talking straight to ``s3_server``."""
    return s3_server.storage_options()


@pytest.fixture(scope="session")
def s3_bucket(s3_server: MotoServer, s3_options: dict[str, Any]) -> str:
    """A fresh bucket on ``s3_server``, as ``s3://name`` (shared by the session: use prefixes)."""
    return create_bucket(f"flows-test-{uuid.uuid4().hex[:12]}", s3_options)


@pytest.fixture(scope="session")
def rclone_bucket(rclone_server: RcloneServer) -> str:
    """A fresh bucket on ``rclone_server``, as ``s3://name``."""
    return create_bucket(f"flows-test-{uuid.uuid4().hex[:12]}", rclone_server.storage_options())


@pytest.fixture(params=["obstore", "s3fs"])
def s3_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The S3 client flows.storage.io uses in this test (``FLOWS_S3_CLIENT``; worker processes inherit it)."""
    if request.param == "obstore":
        pytest.importorskip("obstore", reason="obstore is in the dev extra")
    monkeypatch.setenv(CLIENT_ENV_VAR, request.param)
    return str(request.param)


@dataclass
class S3Target:
    """One S3 server for a test: its options, a session bucket, a unique prefix, and fault proxies
    in front of it (stopped at teardown)."""

    name: str
    server: MotoServer | RcloneServer
    bucket: str
    prefix: str
    proxies: list[FaultProxy] = field(default_factory=list)

    @property
    def options(self) -> dict[str, Any]:
        return self.server.storage_options()

    def proxy(self, rate: float = 0.0, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(self.server.endpoint_url, rate=rate, **kwargs).start()
        self.proxies.append(proxy)
        return proxy


@pytest.fixture(params=["moto", "rclone"])
def s3_target(request: pytest.FixtureRequest, s3_client: str) -> Iterator[S3Target]:
    """The test runs against moto and against ``rclone serve s3`` (each with both clients)."""
    server = request.getfixturevalue("s3_server" if request.param == "moto" else "rclone_server")
    bucket = request.getfixturevalue("s3_bucket" if request.param == "moto" else "rclone_bucket")
    target = S3Target(request.param, server, bucket, f"{bucket}/{uuid.uuid4().hex[:10]}")
    yield target
    for proxy in target.proxies:
        proxy.stop()


@pytest.fixture
def fault_proxy(s3_server: MotoServer, s3_client: str) -> Iterator[Callable[..., FaultProxy]]:
    """Factory: ``fault_proxy(rate=0.3, kinds=..., seed=0, ...)`` starts a FaultProxy in front
    of ``s3_server``; use ``proxy.storage_options()`` to read through it. Stopped at teardown.
    Tests using it run with both S3 clients."""
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
