"""Byte access for flows: every read of a local or remote object goes through this module.

URLs are anything fsspec understands (plain local paths, ``memory://``, ``s3://``, ``https://``,
chained ``simplecache::s3://...``). ``s3://`` reads and listings go through obstore
(:mod:`flows.storage.objstore`) unless s3fs is asked for (``storage_options={"s3_client": "s3fs"}`` or
``FLOWS_S3_CLIENT=s3fs``); everything else through fsspec. Reads retry transient failures (5xx,
throttling, resets, timeouts, truncated bodies) with exponential backoff and jitter, fail fast on
missing or forbidden objects, and never put credentials into an error message or a log line.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any, TypeVar

import fsspec
import fsspec.config
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.cached import SimpleCacheFileSystem

from flows.errors import EmptySourceError, RemoteError
from flows.storage import objstore

__all__ = [
    "AccessDeniedError",
    "ObjectNotFoundError",
    "cached_url",
    "filesystem",
    "list_files",
    "list_files_with_sizes",
    "listing_remembers_sizes",
    "local_path",
    "open_file",
    "read_bytes",
    "redact",
    "remember_sizes",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_S3_PROTOCOLS = ("s3", "s3a")
_LOCAL_PROTOCOLS = ("file", "local", "memory")  # no point caching these


class ObjectNotFoundError(RemoteError, FileNotFoundError):
    """The object, directory or prefix does not exist (never retried)."""


class AccessDeniedError(RemoteError, PermissionError):
    """The object exists but we may not read it (never retried)."""


class TruncatedReadError(OSError):
    """A read returned fewer (or more) bytes than the object's size; always retried."""


# --------------------------------------------------------------------------- filesystems


def filesystem(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for ``url``; fsspec caches the instances (per process).

    Flat ``storage_options`` apply to the innermost filesystem of a chained URL
    (``simplecache::s3://b/k``); options keyed by protocol (``{"s3": {...}}``) are passed as is.
    For S3 a custom endpoint comes from ``storage_options`` (``endpoint_url`` or
    ``client_kwargs.endpoint_url``), else from ``FLOWS_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL``;
    credentials and region come from the options or the standard AWS environment variables.
    This is the s3fs side of S3; ``s3_client`` (flows' own option) is dropped.
    """
    options: dict[str, Any] = _without_client(storage_options or {})
    *outer, inner = url.split("::")
    protocol = _protocol(inner)
    if outer:
        chain = {bit.split("://")[0] for bit in outer} | {protocol}  # "simplecache", ...
        if options and not chain & options.keys():
            options = {protocol: options}
        if protocol in _S3_PROTOCOLS:
            options[protocol] = _with_s3_endpoint(options.get(protocol, {}))
    elif protocol in _S3_PROTOCOLS:
        options = _with_s3_endpoint(options)
    fs, path = url_to_fs(url, **options)
    return fs, path


def _without_client(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: _without_client(v) if isinstance(v, Mapping) and k in _S3_PROTOCOLS else v
        for k, v in options.items()
        if k != objstore.CLIENT_OPTION
    }


def _inner_options(url: str, storage_options: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The options of the innermost filesystem of a (possibly chained) URL."""
    protocol = _protocol(url.split("::")[-1])
    if "::" in url and storage_options and isinstance(storage_options.get(protocol), Mapping):
        return storage_options[protocol]  # type: ignore[no-any-return]
    return storage_options


def _protocol(url: str) -> str:
    return split_protocol(url)[0] or "file"


def _with_s3_endpoint(options: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(options)
    client_kwargs = options.get("client_kwargs") or {}
    if not options.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
        endpoint = objstore.env_endpoint()
        if endpoint:
            options["endpoint_url"] = endpoint
    return options


def _is_local(url: str) -> bool:
    return "::" not in url and _protocol(url) in _LOCAL_PROTOCOLS


def local_path(url: str) -> str | None:
    """The path on this machine that ``url`` names (a plain path or a ``file://`` URL), else None
    (``memory://`` included)."""
    if "://" not in url:
        return url
    return url.removeprefix("file://") if url.startswith("file://") else None


# --------------------------------------------------------------------------- listing


def list_files(
    url: str,
    extensions: Sequence[str] | None = None,
    recursive: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Sorted URLs of the files under a directory/prefix, or matching a glob (``**`` recurses).

    URLs keep the input's protocol (local paths come back as plain absolute paths). ``extensions``
    (``"wav"`` or ``".wav"``) filter case-insensitively. Raises :class:`EmptySourceError` when
    nothing matches and :class:`ObjectNotFoundError` when the directory or prefix does not exist.
    """
    return list(list_files_with_sizes(url, extensions, recursive, storage_options))


def list_files_with_sizes(
    url: str,
    extensions: Sequence[str] | None = None,
    recursive: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, int | None]:
    """:func:`list_files` as ``{url: size in bytes}`` (None where the filesystem gives none), in
    the same sorted order. The sizes of remote files are remembered (:func:`remember_sizes`), so
    :func:`read_bytes` reads each of them with one GET."""
    if isinstance(extensions, str):
        extensions = [extensions]
    suffixes = tuple("." + e.lower().lstrip(".") for e in extensions or ())
    store = objstore.s3_store(url, storage_options)
    entries: list[tuple[str, Any]]
    if store is not None:
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        listed = _with_retries(lambda: objstore.list_under(*store, recursive), url, storage_options)
        entries = [(f"{_protocol(url)}://{bucket}/{key}", size) for key, size in listed]
    else:
        entries = _list_fsspec(url, recursive, storage_options)
    found = ((name, size) for name, size in entries if not suffixes or name.lower().endswith(suffixes))
    files = {
        name: size if isinstance(size, int) else None
        for name, size in sorted(found, key=lambda pair: pair[0])
    }
    if not files:
        wanted = f" with extension {', '.join(suffixes)}" if suffixes else ""
        raise EmptySourceError(redact(f"no files{wanted} found at {url}", storage_options))
    if listing_remembers_sizes(url):
        remember_sizes(files)
    return files


def listing_remembers_sizes(url: str) -> bool:
    """Whether :func:`list_files_with_sizes` remembers the sizes it lists (:func:`remember_sizes`):
    for remote URLs."""
    return not _is_local(url)


# Object sizes seen by listings in this process (and in worker processes forked from it): with
# the size known, read_bytes needs one GET instead of a HEAD and a GET. A size is only a hint:
# a body of another length is retried with a fresh HEAD, so a stale size never returns wrong data.
_KNOWN_SIZES: dict[str, int] = {}
MAX_KNOWN_SIZES = 2_000_000  # about 200 MB at most


def remember_sizes(sizes: Mapping[str, int | None]) -> None:
    """Let :func:`read_bytes` trust these object sizes (``{url: bytes}``, e.g. a listing made on
    another rank); ``None`` sizes are skipped. Bounded: beyond 2 million URLs nothing is added."""
    for url, size in sizes.items():
        if size is not None and (url in _KNOWN_SIZES or len(_KNOWN_SIZES) < MAX_KNOWN_SIZES):
            _KNOWN_SIZES[url] = size


def _list_fsspec(
    url: str, recursive: bool, storage_options: Mapping[str, Any] | None
) -> list[tuple[str, Any]]:
    fs, path = filesystem(url, storage_options)
    glob = any(c in path for c in "*?[")

    def listing() -> dict[str, dict[str, Any]]:
        fs.invalidate_cache(_glob_root(path) if glob else path)  # a listing must be fresh
        if glob:
            return fs.glob(path, detail=True)
        info = fs.info(path)
        if info.get("type") != "directory":
            return {info["name"]: info}
        return fs.find(path, maxdepth=None if recursive else 1, detail=True)

    protocol = _protocol(url.split("::")[-1])
    return [
        (_to_url(name, protocol), info.get("size"))
        for name, info in _with_retries(listing, url, storage_options).items()
        if info.get("type") == "file"
    ]


def _glob_root(path: str) -> str:
    parts = re.split(r"[*?\[]", path, maxsplit=1)[0]
    return parts.rsplit("/", 1)[0] if "/" in parts else parts


def _to_url(path: str, protocol: str) -> str:
    if protocol in ("file", "local") or "://" in path:
        return path
    return f"{protocol}://{path.lstrip('/')}"


# --------------------------------------------------------------------------- reading


def read_bytes(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    size: int | None = None,
    retries: int = 5,
    backoff: float = 0.1,
    max_backoff: float = 2.0,
) -> bytes:
    """Read a whole object, retrying transient errors up to ``retries`` times after the first
    attempt, sleeping ``backoff * 2**n`` seconds (capped at ``max_backoff``, with jitter).

    The length read is checked against the object's size, so a truncated body is retried, never
    returned. The size is ``size``, else the one a listing saw (:func:`remember_sizes`): then a
    single GET suffices; else it is asked for first (for S3 a HEAD). A body whose length differs
    from a given size is retried with the size asked for afresh (the listing may be stale).
    Missing or forbidden objects raise at once (:class:`ObjectNotFoundError`,
    :class:`AccessDeniedError`); anything still failing after the retries raises
    :class:`RemoteError` naming the URL, the attempts and the last cause.
    For a ``simplecache::`` URL (see :func:`cached_url`) a cached copy is read locally; a fresh
    download is verified first and then written to the cache atomically.
    """
    source = url.split("::")[-1]
    store = objstore.s3_store(source, _inner_options(url, storage_options))
    cache: SimpleCacheFileSystem | None = None
    if store is None or "::" in url:
        fs, path = filesystem(url, storage_options)
        cache = fs if isinstance(fs, SimpleCacheFileSystem) else None
    if cache is not None:
        cached = cache._check_file(path)
        if cached:
            with open(cached, "rb") as f:
                return f.read()
        fs = cache.fs
    expected = size if size is not None else _KNOWN_SIZES.get(source)

    def attempt() -> bytes:
        nonlocal expected
        try:
            if store is not None:
                return _read_obstore(*store, expected)
            if expected is None:
                return _read_checked(fs, path)
            return _read_sized(fs, path, expected)
        except TruncatedReadError:
            expected = None  # short, or a stale size: the next attempts ask for the size
            raise

    data = _with_retries(
        attempt, url, storage_options, retries=retries, backoff=backoff, max_backoff=max_backoff
    )
    if source in _KNOWN_SIZES:
        _KNOWN_SIZES[source] = len(data)  # verified: corrects a stale listing
    if cache is not None:
        _write_atomic(os.path.join(cache.storage[-1], cache._mapper(path)), data)
    return data


def _read_obstore(store: Any, key: str, size: int | None) -> bytes:
    """One GET checked against ``size``; when ``size`` is None a HEAD asks for it first."""
    expected = size if size is not None else objstore.head_size(store, key)
    data = objstore.get(store, key)
    if len(data) != expected:
        raise TruncatedReadError(f"read {len(data)} bytes of an object of {expected} bytes")
    return data


def _read_checked(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """One whole read checked against the object's size (for S3: a HEAD, then one GET)."""
    with fs.open(path, "rb", cache_type="none") as f:
        size = getattr(f, "size", None)  # from fs.info / Content-Length; None when unknown
        data = f.read()
    if size is not None and len(data) != size:
        fs.invalidate_cache(path)  # the size may come from a stale listing: ask again next time
        raise TruncatedReadError(f"read {len(data)} bytes of an object of {size} bytes")
    return bytes(data)


def _read_sized(fs: fsspec.AbstractFileSystem, path: str, size: int) -> bytes:
    """One GET of the whole object, checked against ``size`` (known from a listing)."""
    options: dict[str, Any] = {}
    if getattr(fs, "max_concurrency", 1) > 1 and size <= getattr(fs, "default_block_size", 0):
        options["max_concurrency"] = 1  # s3fs: else a HEAD first, to split large objects
    data = fs.cat_file(path, **options)  # no Range: a body longer than a stale size shows
    if len(data) != size:
        fs.invalidate_cache(path)
        raise TruncatedReadError(f"read {len(data)} bytes of an object listed with {size} bytes")
    return bytes(data)


def _write_atomic(target: str, data: bytes) -> None:
    tmp = f"{target}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)  # readers see the whole file or nothing
    except OSError as exc:
        logger.warning("could not cache %s: %s", target, exc)
        if os.path.exists(tmp):
            os.remove(tmp)


def open_file(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    block_size: int = 512 * 1024,
    cache_type: str = "readahead",
) -> IO[bytes]:
    """Open ``url`` for reading as a seekable binary file; remote reads are HTTP range requests.

    Each read fetches what is asked plus ``block_size`` bytes of read-ahead, so that reading one
    row group of a remote Parquet file (``pyarrow.parquet.ParquetFile(open_file(url))``)
    transfers little more than that row group. Opening retries like :func:`read_bytes`; so does
    each range read of an ``s3://`` object read through obstore (its length is checked too).
    """
    store = objstore.s3_store(url, storage_options)
    if store is not None:
        return _open_obstore(url, *store, storage_options, block_size, cache_type)
    fs, path = filesystem(url, storage_options)
    opened: IO[bytes] = _with_retries(
        lambda: fs.open(path, "rb", block_size=block_size, cache_type=cache_type),
        url,
        storage_options,
    )
    return opened


# obstore stores (by id: they live as long as the process) whose server answers a ranged GET with
# 200 instead of 206, which obstore refuses: their range reads go through s3fs.
_RANGES_VIA_S3FS: set[int] = set()


def _open_obstore(
    url: str,
    store: Any,
    key: str,
    storage_options: Mapping[str, Any] | None,
    block_size: int,
    cache_type: str,
) -> IO[bytes]:
    size = _with_retries(lambda: objstore.head_size(store, key), url, storage_options)  # fresh

    def fetch(start: int, end: int) -> bytes:
        def attempt() -> bytes:
            if id(store) in _RANGES_VIA_S3FS:
                fs, path = filesystem(url, storage_options)
                data = fs.cat_file(path, start=start, end=end)
            else:
                data = objstore.get_range(store, key, start, end)
            if len(data) != end - start:
                raise TruncatedReadError(f"read {len(data)} bytes of range {start}-{end - 1}")
            return data

        try:
            return _with_retries(attempt, url, storage_options)
        except RemoteError as error:
            if id(store) in _RANGES_VIA_S3FS or not objstore.is_not_partial(error.__cause__):
                raise
            logger.warning("%s answers range requests with 200, not 206 (rclone serve s3 1.75 does): "
                           "range reads from it go through s3fs", redact(url, storage_options))
            _RANGES_VIA_S3FS.add(id(store))
            return _with_retries(attempt, url, storage_options)

    raw = objstore.RangeFile(size, fetch, url)
    if cache_type == "none":
        return raw  # type: ignore[return-value]
    return io.BufferedReader(raw, buffer_size=block_size)  # type: ignore[return-value]


def cached_url(url: str, cache_dir: str | os.PathLike[str] | None) -> str:
    """Chain ``url`` behind fsspec's ``simplecache`` so a remote file is downloaded once.

    Returns ``url`` unchanged when ``cache_dir`` is None, for local and ``memory://`` URLs and for
    URLs that are already chained. ``cache_dir`` becomes fsspec's default ``cache_storage`` of the
    ``simplecache`` protocol in this process (and in processes forked from it), so the returned URL
    also works with plain ``fsspec.open``. Cached files are named by a hash of the remote path and
    are written atomically, so concurrent workers may share one directory.
    """
    if cache_dir is None or _is_local(url) or "::" in url:
        return url
    storage = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    fsspec.config.conf.setdefault("simplecache", {})["cache_storage"] = storage
    return f"simplecache::{url}"


# --------------------------------------------------------------------------- retries


def _with_retries(
    op: Callable[[], T],
    url: str,
    storage_options: Mapping[str, Any] | None,
    *,
    retries: int = 5,
    backoff: float = 0.1,
    max_backoff: float = 2.0,
) -> T:
    """Run ``op``; retry transient errors with exponential backoff and jitter."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    attempt = 0
    while True:
        attempt += 1
        try:
            return op()
        except Exception as exc:
            kind = _classify(exc)
            if kind != "transient" or attempt > retries:
                raise _remote_error(kind, url, exc, attempt, storage_options) from (
                    exc if _is_clean(exc, storage_options) else None
                )
            delay = min(max_backoff, backoff * 2 ** (attempt - 1))
            delay = delay / 2 + random.uniform(0, delay / 2)
            logger.info(
                redact(
                    f"retrying {url} in {delay:.2f}s (attempt {attempt} of {retries + 1} "
                    f"failed: {_describe(exc)})",
                    storage_options,
                )
            )
            time.sleep(delay)


def _remote_error(
    kind: str, url: str, exc: BaseException, attempts: int, storage_options: Mapping[str, Any] | None
) -> RemoteError:
    cause = _describe(exc)
    if kind == "missing":
        return ObjectNotFoundError(redact(f"{url}: not found ({cause})", storage_options))
    if kind == "forbidden":
        return AccessDeniedError(redact(f"{url}: access denied ({cause})", storage_options))
    if kind == "transient":
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        message = f"{url}: still failing after {tries}; last error: {cause}"
        return RemoteError(redact(message, storage_options))
    return RemoteError(redact(f"{url}: {cause}", storage_options))


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line (obstore's long messages cleaned), at most 400 characters."""
    text = objstore.clean_message(str(exc))
    return f"{type(exc).__name__}: {text[:400] + '...' if len(text) > 400 else text}"


_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_FORBIDDEN_CODES = {
    "AccessDenied",
    "Forbidden",
    "403",
    "401",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}
_TRANSIENT_ERRNOS = {
    errno.EBUSY,  # s3fs: 503 / SlowDown
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: 500 InternalError
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.EAGAIN,
}


def _classify(exc: BaseException) -> str:
    """``missing``, ``forbidden``, ``transient`` or ``fatal``: the first decisive link wins."""
    for link in _chain(exc):
        kind = _classify_one(link)
        if kind:
            return kind
    return "fatal"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < 16:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _classify_one(exc: BaseException) -> str | None:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, PermissionError) or objstore.is_forbidden(exc):
        return "forbidden"
    status, code = _status_and_code(exc)
    if code in _MISSING_CODES or status == 404:
        return "missing"
    if code in _FORBIDDEN_CODES or status in (401, 403):
        return "forbidden"
    if code in _TRANSIENT_CODES or status in (408, 429) or (status or 0) >= 500:
        return "transient"
    if status is not None and 400 <= status < 500:
        return "fatal"
    if isinstance(exc, _transient_types()):
        return "transient"
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return "transient"
    if objstore.is_transient(exc):
        return "transient"
    return None


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and error code of a botocore ``ClientError``, an aiohttp/HTTP error or an
    obstore error (read from its message)."""
    if objstore.is_error(exc):
        return objstore.status_and_code(exc)
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore.exceptions.ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        return (status if isinstance(status, int) else None), (str(code) if code else None)
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    return (status if isinstance(status, int) else None), None


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "try again", imported lazily (botocore/aiohttp are optional)."""
    import http.client

    types: list[type[BaseException]] = [
        TruncatedReadError,
        TimeoutError,  # also socket.timeout, asyncio.TimeoutError, fsspec's FSTimeoutError
        ConnectionError,  # resets, aborts, refused, broken pipes, RemoteDisconnected
        http.client.IncompleteRead,
    ]
    try:
        import botocore.exceptions as bce
        from botocore.parsers import ResponseParserError

        types += [
            bce.HTTPClientError,  # connection closed, read timeouts, response streaming errors
            bce.ConnectionError,  # endpoint connection errors, connect timeouts
            bce.IncompleteReadError,
            bce.ChecksumError,
            bce.FlexibleChecksumError,
            ResponseParserError,  # throttling answers with broken XML (s3fs issue 484)
        ]
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
    except ImportError:
        pass
    return tuple(types)


# --------------------------------------------------------------------------- redaction

_SECRET_OPTION_NAMES = {
    "key",
    "secret",
    "token",
    "username",
    "password",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "access_key",
    "secret_key",
    "session_token",
    "account_key",
    "sas_token",
    "client_secret",
}
_SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_PATTERNS = [
    # key=..., 'secret': '...', "aws_session_token": "...", password=...
    re.compile(
        r"""(?P<pre>\b(?:key|(?i:secret|token|password|aws_access_key_id|aws_secret_access_key|"""
        r"""aws_session_token|x-amz-security-token|x-amz-credential|x-amz-signature|signature|"""
        r"""credential))['"]?\s*[=:]\s*['"]?)[^'"\s,&;}/]+"""
    ),
    re.compile(r"(?P<pre>\w+://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in a URL
    re.compile(r"(?P<pre>)\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
]
_MASK = "***"


def redact(text: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Mask credentials in ``text``: secret values of ``storage_options`` (also nested, e.g.
    ``client_kwargs``), the AWS credential environment variables, ``key=``/``secret=``-style
    assignments, passwords in URLs and AWS access key ids."""
    secrets = set(_secret_values(storage_options or {}))
    secrets.update(os.environ[v] for v in _SECRET_ENV_VARS if os.environ.get(v))
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, _MASK)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group("pre") + _MASK, text)
    return text


def _secret_values(options: Mapping[str, Any]) -> Iterator[str]:
    for name, value in options.items():
        if isinstance(value, Mapping):
            yield from _secret_values(value)
        elif isinstance(value, str) and str(name).lower() in _SECRET_OPTION_NAMES:
            yield value


def _is_clean(exc: BaseException, storage_options: Mapping[str, Any] | None) -> bool:
    """True when no message in the exception chain holds a credential (safe to chain)."""
    return all(redact(str(link), storage_options) == str(link) for link in _chain(exc))
