"""Tests for flows.training.download: a real HTTP server on 127.0.0.1 serves archives built here."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.errors import FlowsError
from flows.training.download import download_and_extract


@dataclass
class Server:
    url: str
    root: Path
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A threaded static file server rooted at ``tmp_path/served`` that counts GET requests."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format, *args) -> None:  # keep test output quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", root, requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _write_tar(path: Path, members: list, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _files_outside(tmp_path: Path, dest: Path, served: Path) -> set[Path]:
    """Every path under tmp_path that is neither in dest nor in the served folder."""
    return {
        p
        for p in tmp_path.rglob("*")
        if not p.is_relative_to(dest) and not p.is_relative_to(served) and p != dest
    }


GOOD = [
    _file("waves/README", b"readme\n"),
    _file("waves/a.wav", b"RIFF-a"),
    _file("waves/sub/b.wav", b"RIFF-b"),
    _link("waves/latest.wav", "a.wav"),  # a symlink that stays inside dest is fine
]


def test_good_tar_gz_is_verified_extracted_and_not_downloaded_twice(
    server: Server, tmp_path: Path
) -> None:
    archive = _write_tar(server.root / "waves.tar.gz", GOOD)
    url = f"{server.url}/waves.tar.gz"
    dest = tmp_path / "dest"

    assert download_and_extract(url, dest, _sha(archive)) == dest
    assert (dest / "waves/a.wav").read_bytes() == b"RIFF-a"
    assert (dest / "waves/sub/b.wav").read_bytes() == b"RIFF-b"
    assert (dest / "waves/latest.wav").resolve() == (dest / "waves/a.wav").resolve()
    assert not list(dest.glob("*.part")), "the temporary download must be removed"
    assert server.requests == ["/waves.tar.gz"]

    # Already extracted with that digest: no second download (with or without the digest).
    assert download_and_extract(url, dest, _sha(archive).upper()) == dest
    assert download_and_extract(str(url), str(dest)) == dest
    assert server.requests == ["/waves.tar.gz"]


@pytest.mark.parametrize("name", ["data.tar", "data.tgz", "data.zip"])
def test_plain_tar_tgz_and_zip_are_extracted(server: Server, tmp_path: Path, name: str) -> None:
    if name.endswith(".zip"):
        archive = _write_zip(server.root / name, {"d/x.txt": b"x", "d/y/z.txt": b"z"})
    else:
        members = [_file("d/x.txt", b"x"), _file("d/y/z.txt", b"z")]
        archive = _write_tar(server.root / name, members, "w" if name.endswith(".tar") else "w:gz")
    dest = download_and_extract(f"{server.url}/{name}", tmp_path / "dest", _sha(archive))
    assert (dest / "d/x.txt").read_bytes() == b"x"
    assert (dest / "d/y/z.txt").read_bytes() == b"z"


def test_wrong_sha256_raises_and_extracts_nothing(server: Server, tmp_path: Path) -> None:
    archive = _write_tar(server.root / "waves.tar.gz", GOOD)
    url = f"{server.url}/waves.tar.gz"
    dest = tmp_path / "dest"
    wrong = "0" * 64
    with pytest.raises(FlowsError) as err:
        download_and_extract(url, dest, wrong)
    message = str(err.value)
    assert url in message and wrong in message and _sha(archive) in message
    assert list(dest.iterdir()) == [], "nothing extracted, no temp file, no marker"

    # A later call with the right digest downloads again and succeeds.
    download_and_extract(url, dest, _sha(archive))
    assert (dest / "waves/a.wav").exists()
    assert len(server.requests) == 2


def test_cached_extraction_is_redone_when_a_different_digest_is_asked(
    server: Server, tmp_path: Path
) -> None:
    _write_tar(server.root / "waves.tar.gz", GOOD)
    url = f"{server.url}/waves.tar.gz"
    dest = tmp_path / "dest"
    download_and_extract(url, dest)
    with pytest.raises(FlowsError, match="SHA-256 mismatch"):
        download_and_extract(url, dest, "f" * 64)
    assert len(server.requests) == 2


def _evil_archives(tmp_path: Path) -> dict[str, tuple[list, str]]:
    outside = tmp_path / "outside.txt"
    good = _file("ok/first.txt", b"harmless")
    return {
        "dotdot": ([good, _file("../evil.txt", b"pwned")], "../evil.txt"),
        "nested-dotdot": ([good, _file("ok/../../evil.txt", b"pwned")], "ok/../../evil.txt"),
        "absolute": ([good, _file(str(outside), b"pwned")], str(outside)),
        "symlink-out": ([good, _link("ok/link", "../../outside.txt")], "ok/link"),
        "symlink-abs": ([good, _link("ok/link", str(outside))], "ok/link"),
        "hardlink-out": ([good, _link("ok/hard", "../outside.txt", tarfile.LNKTYPE)], "ok/hard"),
        "device": ([good, _link("ok/tty", "", tarfile.CHRTYPE)], "ok/tty"),
    }


@pytest.mark.parametrize(
    "case",
    ["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-out", "device"],
)
def test_unsafe_tar_members_are_refused_before_anything_is_written(
    server: Server, tmp_path: Path, case: str
) -> None:
    members, bad = _evil_archives(tmp_path)[case]
    archive = _write_tar(server.root / "evil.tar.gz", members)
    dest = tmp_path / "dest"
    before = _files_outside(tmp_path, dest, server.root)
    with pytest.raises(FlowsError) as err:
        download_and_extract(f"{server.url}/evil.tar.gz", dest, _sha(archive))
    message = str(err.value)
    assert "evil.tar.gz" in message and repr(bad) in message
    assert _files_outside(tmp_path, dest, server.root) == before
    assert list(dest.iterdir()) == [], "members are all checked before the first is written"


def test_unsafe_zip_member_is_refused(server: Server, tmp_path: Path) -> None:
    archive = _write_zip(server.root / "evil.zip", {"ok.txt": b"fine", "../evil.txt": b"pwned"})
    dest = tmp_path / "dest"
    with pytest.raises(FlowsError, match=re.escape("archive evil.zip")) as err:
        download_and_extract(f"{server.url}/evil.zip", dest, _sha(archive))
    assert "'../evil.txt'" in str(err.value)
    assert not (tmp_path / "evil.txt").exists()
    assert list(dest.iterdir()) == []


def test_http_404_names_the_url_and_status(server: Server, tmp_path: Path) -> None:
    url = f"{server.url}/missing.tar.gz"
    with pytest.raises(FlowsError) as err:
        download_and_extract(url, tmp_path / "dest", timeout=10)
    assert url in str(err.value) and "404" in str(err.value)
    assert list((tmp_path / "dest").iterdir()) == []


def test_unreachable_host_is_a_flows_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/waves.tar.gz"
    with pytest.raises(FlowsError, match=re.escape(url)):
        download_and_extract(url, tmp_path / "dest", timeout=5)


def test_unsupported_archive_format(server: Server, tmp_path: Path) -> None:
    (server.root / "notes.txt").write_bytes(b"just text")
    with pytest.raises(FlowsError, match="unsupported format"):
        download_and_extract(f"{server.url}/notes.txt", tmp_path / "dest")
