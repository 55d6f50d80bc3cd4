"""The fast S3 client of :mod:`flows.storage.io`: obstore (Rust ``object_store`` under PyO3).

Reads, range reads and listings of ``s3://`` URLs go through obstore's own sync API, which releases
the GIL and costs a fraction of botocore's CPU per request. This module only talks to the store;
retries, error classification, size checks and redaction stay in :mod:`flows.storage.io`, so obstore's own
retries are switched off (one retry policy, whose attempts can be counted).

The client is chosen per URL by :func:`s3_store`: obstore unless ``FLOWS_S3_CLIENT=s3fs`` or
``storage_options={"s3_client": "s3fs", ...}`` asks for s3fs, obstore is not installed, an option
has no obstore equivalent, or no credentials are given (options or ``AWS_ACCESS_KEY_ID``; s3fs then
walks botocore's whole chain: profiles, SSO, instance metadata) and ``anon`` is not set.

obstore's tokio runtime does not survive ``fork``: a process forked after its parent used obstore
(process workers with the ``fork`` start method, forked ranks) would hang in its first request, so
such a process reads through s3fs. Workers started with ``forkserver`` or ``spawn`` use obstore.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from fsspec.utils import glob_translate

CLIENT_OPTION = "s3_client"
CLIENT_ENV_VAR = "FLOWS_S3_CLIENT"
CLIENTS = ("obstore", "s3fs")
ENDPOINT_ENV_VARS = ("FLOWS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

# s3fs options with an obstore equivalent (mapped in _store_config) or no bearing on reads.
_MAPPED = {"key", "secret", "token", "anon", "endpoint_url", "client_kwargs", "config_kwargs"}
_IGNORED = {
    "default_block_size",
    "default_fill_cache",
    "default_cache_type",
    "use_listings_cache",
    "listings_expiry_time",
    "max_paths",
    "skip_instance_cache",
    "max_concurrency",
    "asynchronous",
    "loop",
}
_CLIENT_KWARGS = {"endpoint_url", "region_name"}
_CONFIG_KWARGS = {
    "connect_timeout",
    "read_timeout",
    "retries",
    "request_checksum_calculation",
    "response_checksum_validation",
}

_STORES: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()
_RUNTIME_PID: int | None = None  # the process whose obstore runtime is live (inherited by forks)


def client_for(storage_options: Mapping[str, Any] | None) -> str:
    """``"obstore"`` or ``"s3fs"``: the client asked for (option, then environment variable)."""
    wanted = (storage_options or {}).get(CLIENT_OPTION) or os.environ.get(CLIENT_ENV_VAR) or "obstore"
    if wanted not in CLIENTS:
        raise ValueError(f"unknown S3 client {wanted!r} ({CLIENT_OPTION}, {CLIENT_ENV_VAR}); use {CLIENTS}")
    return str(wanted)


def s3_store(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str] | None:
    """``(store, key)`` for an ``s3://bucket/key`` URL read through obstore, or None when s3fs
    must serve it (see the module docstring). Stores are cached per options (credentials too)."""
    if "::" in url or not url.startswith(("s3://", "s3a://")) or client_for(storage_options) != "obstore":
        return None
    config = _store_config(storage_options or {})
    if config is None:
        return None
    global _RUNTIME_PID
    if forked_after_use():
        return None  # forked from a process that used obstore: its runtime is gone here
    try:
        from obstore.store import S3Store
    except ImportError:
        return None
    bucket, _, key = url.split("://", 1)[1].partition("/")
    cache_key = (bucket, json.dumps(config, sort_keys=True))
    with _LOCK:
        store = _STORES.get(cache_key)
        if store is None:
            store = _STORES[cache_key] = S3Store(bucket, **config)
        _RUNTIME_PID = os.getpid()
    return store, key


def env_endpoint() -> str | None:
    """The S3 endpoint named by the environment (the first of :data:`ENDPOINT_ENV_VARS` set), or None."""
    return next((os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)


def forked_after_use() -> bool:
    """True in a process forked from one that used obstore (which then reads through s3fs)."""
    return _RUNTIME_PID not in (None, os.getpid())


def _store_config(options: Mapping[str, Any]) -> dict[str, Any] | None:
    """obstore ``S3Store`` arguments for s3fs-style ``storage_options``; None if one has no
    equivalent or obstore would have no credentials."""
    options = {k: v for k, v in options.items() if k != CLIENT_OPTION}
    client_kwargs = dict(options.get("client_kwargs") or {})
    config_kwargs = dict(options.get("config_kwargs") or {})
    if (
        set(options) - _MAPPED - _IGNORED
        or set(client_kwargs) - _CLIENT_KWARGS
        or set(config_kwargs) - _CONFIG_KWARGS
    ):
        return None
    config: dict[str, Any] = {}
    if options.get("anon"):
        config["skip_signature"] = True
    elif options.get("key"):
        if not options.get("token") and os.environ.get("AWS_SESSION_TOKEN"):
            return None  # obstore would add the environment's token to these keys; botocore does not
        config.update(access_key_id=options["key"], secret_access_key=options.get("secret"))
        config.update({"session_token": options["token"]} if options.get("token") else {})
    elif os.environ.get("AWS_ACCESS_KEY_ID"):  # explicit, so that the cache key sees them
        names = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
                 "session_token": "AWS_SESSION_TOKEN"}
        config.update({name: os.environ[v] for name, v in names.items() if os.environ.get(v)})
    else:
        return None  # profiles, SSO, instance roles: botocore's credential chain
    endpoint = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    endpoint = endpoint or env_endpoint()
    region = client_kwargs.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION"
    )
    client: dict[str, Any] = {}
    if endpoint:
        config["endpoint"] = endpoint
        client["allow_http"] = endpoint.startswith("http://")
    config["region"] = region or "us-east-1"
    for ours, theirs in (("connect_timeout", "connect_timeout"), ("read_timeout", "timeout")):
        if config_kwargs.get(ours) is not None:
            client[theirs] = f"{float(config_kwargs[ours]) * 1000:.0f}ms"
    config["client_options"] = client
    config["retry_config"] = {"max_retries": 0}  # flows.storage.io retries (and counts, and logs)
    return config


# --------------------------------------------------------------------------- operations


def head_size(store: Any, key: str) -> int:
    """The object's size in bytes (one HEAD)."""
    import obstore

    return int(obstore.head(store, key)["size"])


def get(store: Any, key: str) -> bytes:
    """The whole object (one GET, no Range: a body longer than expected shows)."""
    import obstore

    return bytes(obstore.get(store, key).bytes())


def get_range(store: Any, key: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the object (one ranged GET)."""
    import obstore

    return bytes(obstore.get_range(store, key, start=start, end=end))


def list_under(store: Any, path: str, recursive: bool) -> list[tuple[str, int]]:
    """``(key, size)`` under ``path`` (a key, a prefix or a glob) in one bucket: one listing
    request per 1,000 objects (plus a HEAD when a bare path lists nothing: a single object)."""
    head = re.split(r"[*?\[]", path, maxsplit=1)[0]
    if head != path:  # a glob: list from its literal head, keep the matches
        pattern = re.compile(glob_translate(path))
        return [(k, n) for k, n in list_sizes(store, head, True) if pattern.match(k)]
    prefix = path.rstrip("/")
    found = [
        (k, n) for k, n in list_sizes(store, prefix + "/" if prefix else "", recursive)
        if not k.endswith("/")
    ]
    if found or not prefix:
        return found
    if path.endswith("/"):
        raise FileNotFoundError(f"no objects under {path}")
    return [(prefix, head_size(store, prefix))]  # one object, or FileNotFoundError


def list_sizes(store: Any, prefix: str, recursive: bool) -> Iterator[tuple[str, int]]:
    """``(key, size)`` of the objects under ``prefix`` (directly under it unless ``recursive``),
    in key order. Recursive listings come as Arrow batches of up to 1,000 objects."""
    import obstore

    if not recursive:
        listed = obstore.list_with_delimiter(store, prefix or None)
        yield from ((meta["path"], int(meta["size"])) for meta in listed["objects"])
        return
    import pyarrow as pa

    for chunk in obstore.list(store, prefix or None, chunk_size=1000, return_arrow=True):
        batch = pa.record_batch(chunk)
        yield from zip(batch.column("path").to_pylist(), batch.column("size").to_pylist(), strict=True)


class RangeFile(io.RawIOBase):
    """A seekable, read-only file over one object: each read is one ranged GET through
    ``fetch(start, end)`` (which retries and checks lengths)."""

    def __init__(self, size: int, fetch: Any, name: str):
        super().__init__()
        self.size, self.name, self._fetch, self._pos = size, name, fetch, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readall(self) -> bytes:
        data = self._fetch(self._pos, self.size) if self._pos < self.size else b""
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self.size, self._pos + len(view))
        if end <= self._pos:
            return 0
        data = self._fetch(self._pos, end)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


# --------------------------------------------------------------------------- errors

# obstore raises FileNotFoundError for 404 and typed errors for 401/403; the rest are
# GenericErrors whose message carries the status, the S3 error code, or what broke on the wire.
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")
_TRANSIENT = re.compile(
    r"error sending request|body error|timed out|[Tt]imeout|[Cc]onnection (?:reset|refused|closed)"
    r"|invalid list response|[Ii]ncomplete"
)


@functools.cache
def _error_types(kind: str) -> tuple[type[BaseException], ...]:
    """obstore's exception types: the ``"forbidden"`` ones or ``"any"`` (none without obstore)."""
    try:
        import obstore.exceptions as oe
    except ImportError:
        return ()
    if kind == "forbidden":
        return (oe.PermissionDeniedError, oe.UnauthenticatedError)
    return (oe.BaseError,)


def is_error(exc: BaseException) -> bool:
    return isinstance(exc, _error_types("any"))


def is_forbidden(exc: BaseException) -> bool:
    return isinstance(exc, _error_types("forbidden"))


def is_transient(exc: BaseException) -> bool:
    """A connection, timeout or cut-body error of obstore (statuses are classified by flows.storage.io)."""
    return is_error(exc) and bool(_TRANSIENT.search(str(exc)))


_XML_ERROR = re.compile(r"<\?xml.*?</Error>", re.S)
_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_ELAPSED = re.compile(r" in [0-9.]+[µnm]?s\b")


def clean_message(text: str) -> str:
    """An obstore message on one line: no debug dump, no timing, an S3 XML body as code: message."""

    def brief(xml: re.Match[str]) -> str:
        found = (_CODE.search(xml.group()), _MESSAGE.search(xml.group()))
        return ": ".join(m.group(1) for m in found if m)

    text = _XML_ERROR.sub(brief, text.split("\n\nDebug source:")[0])
    return " ".join(_ELAPSED.sub("", text).split())


def is_not_partial(exc: BaseException | None) -> bool:
    """obstore refused a ``200`` answer to a ranged GET (the server ignored or misreported Range)."""
    return exc is not None and is_error(exc) and "non-partial response" in str(exc)


def status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    """The HTTP status and S3 error code an obstore error's message names (None if none)."""
    text = str(exc)
    status, code = _STATUS.search(text), _CODE.search(text)
    return (int(status.group(1)) if status else None), (code.group(1) if code else None)
