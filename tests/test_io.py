"""Tests for flows.storage.io: listing, retrying reads, range reads, caching, fork safety, redaction.

S3 tests run against real servers in subprocesses (see tests/s3server.py): moto everywhere, and
``rclone serve s3`` too for the read, list and fault tests (``s3_target``), optionally through a
FaultProxy that injects 5xx answers, SlowDown, connection resets and truncated bodies. Every S3
test runs with both clients of flows.storage.io: obstore (the default) and s3fs (``s3_client``).
"""

from __future__ import annotations

import errno
import http.client
import logging
import multiprocessing
import os
import random
import uuid
from typing import Any

import fsspec
import fsspec.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.errors import EmptySourceError, FlowsError, RemoteError
from flows.storage import io as fio
from tests.s3server import FAULT_KINDS, upload_dir

# --------------------------------------------------------------------------- helpers


def _put(url: str, data: bytes, options: dict[str, Any]) -> None:
    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.pipe_file(path, data)
    fs.invalidate_cache()


@pytest.fixture
def s3_prefix(s3_bucket: str, s3_client: str) -> str:
    """A unique prefix in the session bucket of moto (the test runs with both clients)."""
    return f"{s3_bucket}/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def audio_tree(tmp_path):
    """A small tree of files with mixed-case extensions; returns (root, {relative path: bytes})."""
    files = {
        "a.wav": b"a" * 11,
        "B.WAV": b"b" * 12,
        "notes.txt": b"n",
        "sub/c.wav": b"c" * 13,
        "sub/e.flac": b"e" * 14,
        "sub/deep/d.Wav": b"d" * 15,
    }
    root = tmp_path / "tree"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, files


@pytest.fixture
def memory_root():
    root = f"memory://flows-io-{uuid.uuid4().hex[:10]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --------------------------------------------------------------------------- listing


def test_list_local_dir_sorted_recursive_and_filtered(audio_tree):
    root, files = audio_tree
    wavs = fio.list_files(str(root), ["wav"])
    assert wavs == sorted(str(root / r) for r in files if r.lower().endswith(".wav"))
    assert all(os.path.isabs(p) and "://" not in p for p in wavs)
    assert fio.list_files(str(root), [".WAV"], recursive=False) == [
        str(root / "B.WAV"),
        str(root / "a.wav"),
    ]
    assert fio.list_files(str(root), ("wav", "FLAC")) == sorted(
        str(root / r) for r in files if not r.endswith(".txt")
    )
    assert fio.list_files(str(root)) == sorted(str(root / r) for r in files)  # files only
    assert fio.list_files(f"file://{root}", "wav") == wavs  # plain paths back
    assert fio.list_files(str(root / "a.wav")) == [str(root / "a.wav")]  # a single file


def test_list_local_relative_path_and_glob(audio_tree, monkeypatch):
    root, _ = audio_tree
    monkeypatch.chdir(root)
    assert fio.list_files("sub", "wav") == [str(root / "sub/c.wav"), str(root / "sub/deep/d.Wav")]
    # "**" matches zero or more directories; glob patterns are case-sensitive, the filter is not
    assert fio.list_files(str(root / "**" / "*.wav")) == [str(root / "a.wav"), str(root / "sub/c.wav")]
    assert fio.list_files(str(root / "sub" / "*"), ["wav", "flac"]) == [
        str(root / "sub/c.wav"),
        str(root / "sub/e.flac"),
    ]


def test_list_memory(memory_root):
    fs = fsspec.filesystem("memory")
    for name in ["b.wav", "a.WAV", "x.txt", "s/c.wav"]:
        fs.pipe(f"{memory_root}/{name}", name.encode())
    expected = [f"{memory_root}/a.WAV", f"{memory_root}/b.wav", f"{memory_root}/s/c.wav"]
    assert fio.list_files(memory_root, "wav") == expected
    assert fio.list_files(f"{memory_root}/*.wav") == [f"{memory_root}/b.wav"]
    assert [fio.read_bytes(u) for u in expected] == [b"a.WAV", b"b.wav", b"s/c.wav"]


def test_list_empty_raises_empty_source_error(audio_tree, memory_root):
    root, _ = audio_tree
    with pytest.raises(EmptySourceError, match=r"\.opus.*" + str(root).replace("/", ".")):
        fio.list_files(str(root), ["opus"])
    with pytest.raises(EmptySourceError, match="nothing-matches"):
        fio.list_files(str(root / "*nothing-matches*"))
    fsspec.filesystem("memory").pipe(f"{memory_root}/only.txt", b"x")
    with pytest.raises(EmptySourceError, match=memory_root):
        fio.list_files(memory_root, [".wav"])


def test_list_missing_directory_names_the_url(tmp_path, memory_root):
    for url in [str(tmp_path / "missing"), f"{memory_root}/missing"]:
        with pytest.raises(fio.ObjectNotFoundError) as info:
            fio.list_files(url, ["wav"])
        assert url in str(info.value)
        assert isinstance(info.value, RemoteError) and isinstance(info.value, FileNotFoundError)


def test_list_s3(s3_target, audio_tree):
    s3_prefix, s3_options = s3_target.prefix, s3_target.options
    root, files = audio_tree
    upload_dir(root, s3_prefix, s3_options)
    wavs = fio.list_files(s3_prefix, "wav", storage_options=s3_options)
    assert wavs == sorted(f"{s3_prefix}/{r}" for r in files if r.lower().endswith(".wav"))
    assert fio.list_files(s3_prefix + "/", ["wav"], recursive=False, storage_options=s3_options) == [
        f"{s3_prefix}/B.WAV",
        f"{s3_prefix}/a.wav",
    ]
    assert fio.list_files(f"{s3_prefix}/**/*.wav", storage_options=s3_options) == [
        f"{s3_prefix}/a.wav",
        f"{s3_prefix}/sub/c.wav",
    ]
    assert fio.list_files(s3_prefix, storage_options=s3_options) == sorted(f"{s3_prefix}/{r}" for r in files)
    # the listing is fresh even though this filesystem instance listed the prefix before
    _put(f"{s3_prefix}/z.wav", b"z", s3_options)
    assert fio.list_files(s3_prefix, "wav", storage_options=s3_options)[-1] == f"{s3_prefix}/z.wav"
    with pytest.raises(EmptySourceError, match=s3_prefix):
        fio.list_files(s3_prefix, ["mp3"], storage_options=s3_options)
    with pytest.raises(EmptySourceError):
        fio.list_files(f"{s3_prefix}/**/*.mp3", storage_options=s3_options)
    for missing in [f"{s3_prefix}/nope", "s3://flows-no-such-bucket/x"]:
        with pytest.raises(fio.ObjectNotFoundError, match=missing):
            fio.list_files(missing, storage_options=s3_options)


# --------------------------------------------------------------------------- reading


def test_read_bytes_local_and_memory(tmp_path, memory_root):
    data = os.urandom(3000)
    (tmp_path / "x.bin").write_bytes(data)
    fsspec.filesystem("memory").pipe(f"{memory_root}/x.bin", data)
    assert fio.read_bytes(str(tmp_path / "x.bin")) == data
    assert fio.read_bytes(f"{memory_root}/x.bin") == data
    with fio.open_file(str(tmp_path / "x.bin")) as f:
        f.seek(1000)
        assert f.read(10) == data[1000:1010]


def test_read_bytes_s3(s3_target):
    data, options = os.urandom(3000), s3_target.options
    _put(f"{s3_target.prefix}/x.bin", data, options)
    _put(f"{s3_target.prefix}/empty.bin", b"", options)
    proxy = s3_target.proxy()
    assert fio.read_bytes(f"{s3_target.prefix}/x.bin", proxy.storage_options()) == data
    assert [r["method"] for r in proxy.requests] == ["HEAD", "GET"]  # size unknown: asked first
    proxy.reset_counts()
    assert fio.read_bytes(f"{s3_target.prefix}/x.bin", proxy.storage_options(), size=3000) == data
    assert [(r["method"], r["range"]) for r in proxy.requests] == [("GET", "")]  # one plain GET
    assert fio.read_bytes(f"{s3_target.prefix}/empty.bin", options) == b""
    with fio.open_file(f"{s3_target.prefix}/x.bin", options, cache_type="none") as f:
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
        assert f.read() == data[1010:]


def test_s3_client_chosen_by_option_and_fallback(fault_proxy, s3_prefix, s3_options, monkeypatch):
    """obstore by default; s3fs when asked (option or environment) or when an option has no obstore
    equivalent. They differ on the wire: s3fs reads a whole object with a ranged GET."""
    monkeypatch.delenv("FLOWS_S3_CLIENT")
    url, data = f"{s3_prefix}/which.bin", os.urandom(1000)
    _put(url, data, s3_options)
    proxy = fault_proxy(rate=0.0)
    cases = {
        "default": ({}, False),
        "asked": ({"s3_client": "s3fs"}, True),
        "no obstore equivalent": ({"version_aware": False}, True),
        "obstore asked": ({"s3_client": "obstore"}, False),
    }
    for name, (extra, ranged) in cases.items():
        proxy.reset_counts()
        assert fio.read_bytes(url, {**proxy.storage_options(), **extra}) == data, name
        gets = [r for r in proxy.requests if r["method"] == "GET"]
        assert len(gets) == 1 and bool(gets[0]["range"]) == ranged, (name, gets)
    monkeypatch.setenv("FLOWS_S3_CLIENT", "s3fs")
    proxy.reset_counts()
    assert fio.read_bytes(url, proxy.storage_options()) == data
    assert [bool(r["range"]) for r in proxy.requests if r["method"] == "GET"] == [True]
    with pytest.raises(ValueError, match="unknown S3 client 'boto'"):
        fio.read_bytes(url, {**proxy.storage_options(), "s3_client": "boto"})


@pytest.mark.parametrize("variable", ["FLOWS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"])
def test_s3_endpoint_from_environment(variable, s3_server, s3_prefix, monkeypatch):
    _put(f"{s3_prefix}/env.bin", b"from env", s3_server.storage_options())
    monkeypatch.setenv(variable, s3_server.endpoint_url)
    fs, path = fio.filesystem(f"{s3_prefix}/env.bin")  # credentials from the AWS_* variables
    assert fs.endpoint_url == s3_server.endpoint_url  # the s3fs side (metadata, writes)
    assert path == f"{s3_prefix}/env.bin".removeprefix("s3://")
    assert fio.read_bytes(f"{s3_prefix}/env.bin") == b"from env"
    # explicit options win over the environment
    explicit = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    assert fio.filesystem(f"{s3_prefix}/env.bin", explicit)[0].endpoint_url is None


def test_reads_survive_injected_faults(s3_target, caplog):
    s3_prefix, s3_options = s3_target.prefix, s3_target.options
    caplog.set_level(logging.INFO, logger="flows")
    rng = random.Random(7)
    originals = {f"{s3_prefix}/obj-{i:02d}.bin": rng.randbytes(rng.randint(1_000, 40_000)) for i in range(40)}
    # Uploaded without a stored checksum, so that botocore cannot validate the answers and a
    # "short" body (consistent but cut Content-Length) is caught by flows.storage.io's size check alone.
    no_checksum = {**s3_options, "config_kwargs": {"request_checksum_calculation": "when_required"}}
    for url, data in originals.items():
        _put(url, data, no_checksum)
    proxy = s3_target.proxy(rate=0.3, kinds=FAULT_KINDS, seed=1)
    options = proxy.storage_options()  # botocore's own retries off: flows.storage.io must cope
    listed = fio.list_files(s3_prefix, "bin", storage_options=options)
    assert listed == sorted(originals)
    for url, data in originals.items():
        assert fio.read_bytes(url, options, retries=8, backoff=0.005, max_backoff=0.05) == data
    assert all(proxy.counts[kind] > 0 for kind in FAULT_KINDS), proxy.counts
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert any("TruncatedReadError" in m for m in retried), retried  # the size check fired
    for url in originals:  # read until one whole, unfaulted answer came: then never again
        path = "/" + url.removeprefix("s3://")
        whole = [r for r in proxy.requests if r["path"] == path and r["method"] == "GET" and not r["fault"]]
        assert len(whole) == 1, (url, whole)


@pytest.mark.parametrize("kind", ["short", "truncate"])
def test_truncated_body_is_retried_never_returned(kind, s3_target, s3_client, caplog):
    """A body cut short (with a consistent or an inconsistent Content-Length) is re-read. s3fs
    re-reads a body cut off mid-stream by itself; everything else is retried by flows.storage.io."""
    by_flows = kind == "short" or s3_client == "obstore"
    caplog.set_level(logging.INFO, logger="flows")
    url, data = f"{s3_target.prefix}/obj.bin", bytes(range(256)) * 10
    _put(url, data, s3_target.options)
    proxy = s3_target.proxy(rate=1.0, kinds=[kind], max_consecutive=2)
    assert fio.read_bytes(url, proxy.storage_options(), retries=3, backoff=0.001) == data
    assert [r["fault"] for r in proxy.requests if r["method"] == "GET"] == [kind, kind, None]
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) == (2 if by_flows else 0), retried
    if kind == "short":  # only the size check can see it
        assert all("TruncatedReadError" in m for m in retried), retried

    proxy = s3_target.proxy(rate=1.0, kinds=[kind], max_consecutive=None)
    with pytest.raises(RemoteError, match=rf"{url}.*3 attempts") as info:
        fio.read_bytes(url, proxy.storage_options(), retries=2, backoff=0.001)
    if kind == "short":
        assert "read 1280 bytes of an object of 2560 bytes" in str(info.value)
    assert proxy.count("GET", url) == 3 if by_flows else proxy.count("GET", url) >= 3


def test_backoff_is_exponential_with_jitter_and_capped(s3_target, s3_client, monkeypatch):
    url = f"{s3_target.prefix}/k.bin"
    _put(url, b"k" * 100, s3_target.options)
    delays: list[float] = []
    monkeypatch.setattr(fio.time, "sleep", delays.append)
    proxy = s3_target.proxy(rate=1.0, kinds=["reset"], max_consecutive=None)
    with pytest.raises(RemoteError, match=rf"{url}: still failing after 6 attempts"):
        fio.read_bytes(url, proxy.storage_options(), retries=5, backoff=0.1, max_backoff=0.3)
    if s3_client == "obstore":
        assert proxy.counts["reset"] == 6  # no hidden retries inside the client
    else:  # aiohttp resends once on a connection dropped before an answer
        assert proxy.counts["reset"] >= 6
    assert len(delays) == 5
    for attempt, delay in enumerate(delays, start=1):
        step = min(0.3, 0.1 * 2 ** (attempt - 1))
        assert step / 2 <= delay <= step


@pytest.mark.parametrize("case", ["missing-key", "missing-bucket", "forbidden"])
def test_missing_and_forbidden_fail_fast(case, s3_target, monkeypatch):
    s3_prefix = s3_target.prefix
    proxy = s3_target.proxy(rate=0.0)
    options = proxy.storage_options()
    url = {
        "missing-key": f"{s3_prefix}/does-not-exist.wav",
        "missing-bucket": "s3://flows-no-such-bucket/a.wav",
        "forbidden": f"{s3_prefix}/secret.wav",
    }[case]
    if case == "forbidden":
        _put(url, b"classified", options)  # PUT through the proxy
        proxy.forbid(url)
        proxy.reset_counts()
    expected = fio.AccessDeniedError if case == "forbidden" else fio.ObjectNotFoundError
    delays: list[float] = []
    monkeypatch.setattr(fio.time, "sleep", delays.append)
    with pytest.raises(expected) as info:
        fio.read_bytes(url, options, retries=5, backoff=0.5)
    assert url in str(info.value)
    assert isinstance(info.value, RemoteError)
    assert proxy.count(path=url) == 1 and delays == []  # one HEAD, never retried, never waited
    with pytest.raises(expected):
        fio.open_file(url, options)
    assert proxy.count(path=url) == 2 and delays == []


def test_retries_exhausted_names_url_attempts_and_cause(s3_target):
    url = f"{s3_target.prefix}/always-500.bin"
    _put(url, b"x" * 100, s3_target.options)
    proxy = s3_target.proxy(rate=1.0, kinds=["500"], max_consecutive=None)
    with pytest.raises(RemoteError) as info:
        fio.read_bytes(url, proxy.storage_options(), retries=3, backoff=0.001)
    message = str(info.value)
    assert url in message and "4 attempts" in message and "Internal" in message, message
    assert proxy.count("HEAD", url) == 4 and proxy.counts["500"] == 4


# --------------------------------------------------------------------------- credentials

LEAK_KEY = "AKIAFLOWSLEAKTEST042"
LEAK_SECRET = "flowsLeakSecret+9f8e7d6c5b4a/3210zyxw"
ENV_KEY = "AKIAFLOWSENVLEAK0077"
ENV_SECRET = "flowsEnvSecret+0a1b2c3d4e5f/6789"
ENV_TOKEN = "flowsEnvSessionToken//FQoGZXIvYXdzEXAMPLE=="
LEAKS = [LEAK_KEY, LEAK_SECRET, ENV_KEY, ENV_SECRET, ENV_TOKEN]


def _assert_no_secret(text: str) -> None:
    for secret in LEAKS:
        assert secret not in text, f"credential leaked: {text!r}"


def test_credentials_never_in_errors_or_logs(fault_proxy, s3_prefix, s3_options, monkeypatch, caplog):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", ENV_TOKEN)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="flows")
    _put(f"{s3_prefix}/ok.bin", b"ok", s3_options)
    _put(f"{s3_prefix}/forbidden.bin", b"no", s3_options)
    clean = fault_proxy(rate=0.0)
    clean.forbid(f"{s3_prefix}/forbidden.bin")
    options = clean.storage_options(key=LEAK_KEY, secret=LEAK_SECRET)
    faulty = fault_proxy(rate=1.0, kinds=["500"], max_consecutive=1)
    faulty_options = faulty.storage_options(key=LEAK_KEY, secret=LEAK_SECRET)
    failing = {
        "missing": lambda: fio.read_bytes(f"{s3_prefix}/missing.bin", options),
        "forbidden": lambda: fio.read_bytes(f"{s3_prefix}/forbidden.bin", options),
        "exhausted": lambda: fio.read_bytes(f"{s3_prefix}/ok.bin", faulty_options, retries=0),
        "list-missing": lambda: fio.list_files(f"{s3_prefix}/nope/", storage_options=options),
        "list-empty": lambda: fio.list_files(s3_prefix, ["mp3"], storage_options=options),
    }
    for name, call in failing.items():
        with pytest.raises(FlowsError) as info:
            call()
        for exc in (info.value, info.value.__cause__):
            if exc is not None:
                _assert_no_secret(str(exc))
                _assert_no_secret(repr(exc))
        assert s3_prefix in str(info.value), name
    # a read that is retried (and logged) before it succeeds
    assert fio.read_bytes(f"{s3_prefix}/ok.bin", faulty_options, retries=3, backoff=0.001) == b"ok"
    assert any("retrying" in r.getMessage() for r in caplog.records)
    _assert_no_secret(caplog.text)


def test_secrets_in_underlying_errors_are_redacted(monkeypatch):
    options = {"key": LEAK_KEY, "secret": LEAK_SECRET, "client_kwargs": {"token": ENV_TOKEN}}

    class LeakyFS:
        def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
            raise PermissionError(f"denied for key={LEAK_KEY} secret={LEAK_SECRET} {ENV_TOKEN}")

    monkeypatch.setenv("FLOWS_S3_CLIENT", "s3fs")  # through this filesystem
    monkeypatch.setattr(fio, "filesystem", lambda url, o=None: (LeakyFS(), "k"))
    with pytest.raises(fio.AccessDeniedError) as info:
        fio.read_bytes("s3://b/k", options)
    _assert_no_secret(str(info.value))
    assert info.value.__cause__ is None and info.value.__suppress_context__  # not chained
    assert "s3://b/k" in str(info.value)


def test_redact():
    options = {"key": LEAK_KEY, "secret": LEAK_SECRET, "s3": {"token": ENV_TOKEN}, "anon": False}
    text = (
        f"{LEAK_KEY} / {LEAK_SECRET} / {ENV_TOKEN} / key='k-value-1' secret=\"s-value-2\" "
        "{'token': 't-value-3', 'aws_secret_access_key': 's-value-4'} "
        "https://user:p-value-5@host/x?X-Amz-Credential=AKIDXXXX%2F2024&X-Amz-Signature=abc0123 "
        "AKIAIOSFODNN7EXAMPLE"
    )
    out = fio.redact(text, options)
    for secret in [
        *LEAKS[:2],
        ENV_TOKEN,
        "k-value-1",
        "s-value-2",
        "t-value-3",
        "s-value-4",
        "p-value-5",
        "AKIDXXXX",
        "abc0123",
        "AKIAIOSFODNN7EXAMPLE",
    ]:
        assert secret not in out, out
    assert "https://" in out and "@host/x" in out
    plain = "s3://bucket/some/key.wav: not found (FileNotFoundError: bucket/some/key.wav)"
    assert fio.redact(plain, {"key": "k", "secret": "s"}) == plain  # short values are left alone


# --------------------------------------------------------------------------- retry classification


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


def _chained(outer: Exception, inner: Exception) -> Exception:
    outer.__context__ = inner
    return outer


def _classification_cases() -> list[tuple[str, Exception, str]]:
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    eremoteio = getattr(errno, "EREMOTEIO", errno.EIO)
    return [
        ("slowdown", _client_error("SlowDown", 503), "transient"),
        ("internal", _client_error("InternalError", 500), "transient"),
        ("503", _client_error("503", 503), "transient"),
        ("throttling", _client_error("ThrottlingException", 400), "transient"),
        ("no-such-key", _client_error("NoSuchKey", 404), "missing"),
        ("access-denied", _client_error("AccessDenied", 403), "forbidden"),
        ("invalid-range", _client_error("InvalidRange", 416), "fatal"),
        ("s3fs-500", OSError(eremoteio, "Internal Server Error"), "transient"),
        ("s3fs-503", OSError(errno.EBUSY, "Service Unavailable"), "transient"),
        ("s3fs-chain", _chained(OSError(errno.EINVAL, "x"), _client_error("500", 500)), "transient"),
        ("not-found", FileNotFoundError("k"), "missing"),
        ("permission", PermissionError("k"), "forbidden"),
        ("reset", ConnectionResetError(errno.ECONNRESET, "reset"), "transient"),
        ("timeout", TimeoutError(), "transient"),
        ("incomplete", http.client.IncompleteRead(b"ab", 10), "transient"),
        ("closed", ConnectionClosedError(endpoint_url="http://x"), "transient"),
        ("read-timeout", ReadTimeoutError(endpoint_url="http://x"), "transient"),
        ("payload", aiohttp.ClientPayloadError("Response payload is not completed"), "transient"),
        ("disconnected", aiohttp.ServerDisconnectedError(), "transient"),
        ("http-503", aiohttp.ClientResponseError(None, (), status=503), "transient"),  # type: ignore[arg-type]
        ("http-404", aiohttp.ClientResponseError(None, (), status=404), "missing"),  # type: ignore[arg-type]
        ("http-400", aiohttp.ClientResponseError(None, (), status=400), "fatal"),  # type: ignore[arg-type]
        ("truncated", fio.TruncatedReadError("short"), "transient"),
        ("bug", ValueError("bug"), "fatal"),
        *_obstore_cases(),
    ]


def _obstore_cases() -> list[tuple[str, Exception, str]]:
    """obstore's errors as 0.12 words them (none where obstore is not installed)."""
    try:
        import obstore.exceptions as oe
    except ImportError:
        return []

    def obstore_http(status: str, body: str = "") -> Exception:  # as obstore 0.12 words them
        return oe.GenericError(
            f"Generic S3 error: Error performing GET http://127.0.0.1:1/b/k in 1.2ms - Server returned "
            f"non-2xx status code: {status}: {body}\n\nDebug source:\nGeneric {{ ... }}"
        )

    slowdown = '<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>Reduce</Message></Error>'

    return [
        ("obstore-500", obstore_http("500 Internal Server Error"), "transient"),
        ("obstore-slowdown", obstore_http("503 Service Unavailable", slowdown), "transient"),
        ("obstore-400", obstore_http("400 Bad Request"), "fatal"),
        ("obstore-404-bucket", obstore_http("404 Not Found", "<Code>NoSuchBucket</Code>"), "missing"),
        ("obstore-403", oe.PermissionDeniedError("lacked the necessary privileges"), "forbidden"),
        ("obstore-401", oe.UnauthenticatedError("no valid authentication"), "forbidden"),
        ("obstore-reset", oe.GenericError("Generic S3 error: HTTP error: error sending request"),
         "transient"),
        ("obstore-cut", oe.GenericError("Generic S3 error: HTTP error: request or response body error"),
         "transient"),
        ("obstore-not-partial", oe.GenericError("Received non-partial response when range requested"),
         "fatal"),
    ]


@pytest.mark.parametrize(
    ("exc", "expected"), [c[1:] for c in _classification_cases()], ids=[c[0] for c in _classification_cases()]
)
def test_error_classification(exc, expected):
    assert fio._classify(exc) == expected


# --------------------------------------------------------------------------- range reads, cache


def test_parquet_row_group_range_reads(fault_proxy, s3_prefix, s3_options):
    rows, per_group = 6_000, 125  # 48 row groups of ~125 KB
    rng = random.Random(3)
    table = pa.table(
        {"id": pa.array(range(rows)), "blob": pa.array([rng.randbytes(1000) for _ in range(rows)])}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=per_group, compression="none")
    payload = sink.getvalue().to_pybytes()
    url = f"{s3_prefix}/table.parquet"
    _put(url, payload, s3_options)
    proxy = fault_proxy(rate=0.0)
    with fio.open_file(url, proxy.storage_options()) as f:
        parquet = pq.ParquetFile(f)
        assert parquet.metadata.num_row_groups == rows // per_group
        group = parquet.read_row_group(30)
    assert group.equals(table.slice(30 * per_group, per_group))
    assert proxy.count("GET", url) >= 2
    assert all(r["range"] for r in proxy.requests if r["method"] == "GET")
    assert proxy.bytes_sent < len(payload) / 5, (proxy.bytes_sent, len(payload))


def test_cached_url_downloads_once(fault_proxy, s3_prefix, s3_options, tmp_path, monkeypatch):
    monkeypatch.setitem(fsspec.config.conf, "simplecache", {})  # undone after the test
    url, data = f"{s3_prefix}/cached.bin", os.urandom(5000)
    _put(url, data, s3_options)
    cache = tmp_path / "cache"
    proxy = fault_proxy(rate=0.0)
    options = proxy.storage_options()
    cached = fio.cached_url(url, cache)
    assert cached == f"simplecache::{url}"
    assert fio.read_bytes(cached, options) == data
    assert proxy.count("GET", url) == 1
    seen = len(proxy.requests)
    assert fio.read_bytes(cached, options) == data  # second epoch: no request at all
    assert len(proxy.requests) == seen
    assert [p.stat().st_size for p in cache.iterdir()] == [len(data)]  # one file, no temp left
    proxy.stop()  # the remote is gone: the cached copy still serves
    assert fio.read_bytes(cached, options) == data
    with fio.open_file(cached, options) as f:
        assert f.read() == data
    with fsspec.open(cached, "rb", s3=options) as f:  # plain fsspec finds the same copy
        assert f.read() == data


def test_cached_url_identity_cases(tmp_path):
    assert fio.cached_url("s3://b/k", None) == "s3://b/k"
    assert fio.cached_url(str(tmp_path / "x.wav"), tmp_path) == str(tmp_path / "x.wav")
    assert fio.cached_url("memory://x/y.wav", tmp_path) == "memory://x/y.wav"
    assert fio.cached_url("simplecache::s3://b/k", tmp_path) == "simplecache::s3://b/k"


# --------------------------------------------------------------------------- fork safety


def _read_in_child(url: str, options: dict[str, Any], queue: Any) -> None:
    from flows.storage import objstore

    try:
        assert objstore.forked_after_use() or os.environ["FLOWS_S3_CLIENT"] == "s3fs"
        queue.put(("ok", url, fio.read_bytes(url, options)))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(("error", url, repr(exc)))


def test_reads_after_fork(s3_prefix, s3_options):
    """A child forked after the parent read through obstore (whose runtime does not survive a
    fork) reads through s3fs; the parent goes on with obstore."""
    objects = {f"{s3_prefix}/fork-{i}.bin": os.urandom(2000 + i) for i in range(3)}
    for url, data in objects.items():
        _put(url, data, s3_options)
    first = next(iter(objects))
    assert fio.read_bytes(first, s3_options) == objects[first]  # the parent's s3fs is now live
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_read_in_child, args=(u, s3_options, queue)) for u in objects]
    for child in children:
        child.start()
    results = {}
    for _ in children:
        status, url, value = queue.get(timeout=30)
        assert status == "ok", value
        results[url] = value
    for child in children:
        child.join(10)
        assert child.exitcode == 0
    assert results == objects
    assert fio.read_bytes(first, s3_options) == objects[first]  # and the parent still works
