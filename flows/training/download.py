"""Download an archive over HTTP(S), verify its SHA-256, and extract it safely.

:func:`download_and_extract` streams the archive to a temporary file inside ``dest``, checks
the digest *before* anything is unpacked, refuses archives with members that would land
outside ``dest`` (absolute paths, ``..`` components, links pointing outside, device files),
and records what it extracted in a marker file so a second call is free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from flows.errors import FlowsError, RemoteError

__all__ = ["download_and_extract"]

_CHUNK = 1 << 20
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_ZIP_SUFFIXES = (".zip",)
_USER_AGENT = "flows-download/0.1 (+urllib)"


def download_and_extract(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    *,
    timeout: float = 60,
) -> Path:
    """Download the archive at ``url`` and extract it into ``dest``; return ``dest``.

    The archive (``.tar.gz``/``.tgz``/``.tar``/``.zip``, plus ``.tar.bz2``/``.tar.xz``) is
    streamed to a temporary file inside ``dest`` while its SHA-256 is computed.  When
    ``sha256`` is given and differs, a :class:`~flows.errors.FlowsError` names the URL and both
    digests and nothing is extracted.  Every member is checked before anything is written:
    absolute paths, ``..`` components, symlinks or hardlinks resolving outside ``dest`` and
    device/FIFO files are rejected with a ``FlowsError`` naming the archive and the member
    (tar extraction additionally uses ``filter="data"`` where available).  The temporary file
    is always removed.

    Idempotent: a marker file in ``dest`` records the URL and digest of the last successful
    extraction; when it matches (same URL, and the same digest if ``sha256`` is given) nothing
    is downloaded again.

    HTTP errors (404, 403, ...) and network failures raise :class:`~flows.errors.RemoteError`
    (a ``FlowsError``) naming the URL and the status or reason.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    expected = sha256.strip().lower() if sha256 else None
    name = _archive_name(url)
    marker = dest / f".flows-download-{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
    if _already_extracted(marker, url, expected):
        return dest

    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=".flows-download-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(url, out, timeout)
        if expected is not None and digest != expected:
            raise FlowsError(
                f"SHA-256 mismatch for {url}: expected {expected}, got {digest}; "
                "the download was discarded and nothing was extracted"
            )
        _extract(tmp, name, dest)
        marker.write_text(
            json.dumps({"url": url, "sha256": digest, "archive": name}, indent=2) + "\n",
            encoding="utf-8",
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def _archive_name(url: str) -> str:
    """The archive's file name, taken from the URL path (``archive`` when there is none)."""
    path = urllib.parse.urlsplit(url).path
    return posixpath.basename(urllib.parse.unquote(path)) or "archive"


def _already_extracted(marker: Path, url: str, expected: str | None) -> bool:
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, OSError):
        return False
    if not isinstance(record, dict) or record.get("url") != url:
        return False
    return expected is None or record.get("sha256") == expected


def _fetch(url: str, out: BinaryIO, timeout: float) -> str:
    """Stream ``url`` into the binary file ``out``; return the SHA-256 hex digest."""
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as exc:
        raise RemoteError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise RemoteError(f"download of {url} failed: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:
        raise RemoteError(f"download of {url} failed: {type(exc).__name__}: {exc}") from exc
    if length is not None and length.isdigit() and int(length) != received:
        raise RemoteError(f"download of {url} was truncated: got {received} of {length} bytes")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------


def _archive_kind(path: Path, name: str) -> str:
    lower = name.lower()
    if lower.endswith(_TAR_SUFFIXES):
        return "tar"
    if lower.endswith(_ZIP_SUFFIXES):
        return "zip"
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise FlowsError(f"archive {name}: unsupported format (expected .tar.gz, .tgz, .tar or .zip)")


def _extract(path: Path, name: str, dest: Path) -> None:
    """Check every member of the archive at ``path``, then extract it into ``dest``."""
    kind = _archive_kind(path, name)
    try:
        if kind == "tar":
            with tarfile.open(path, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_tar_member(member, name, dest)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(dest, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tar.extractall(dest, members=members)
        else:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
                for info in infos:
                    _check_zip_member(archive, info, name, dest)
                archive.extractall(dest, members=infos)
    except FlowsError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise FlowsError(f"archive {name} is corrupt: {type(exc).__name__}: {exc}") from exc


def _unsafe(name: str, member: str, why: str) -> FlowsError:
    return FlowsError(f"archive {name}: refusing to extract member {member!r}: {why}")


def _check_path(member: str, archive: str, dest: Path) -> Path:
    """Reject absolute / drive / ``..`` names; return the member's (unresolved) target path."""
    if not member:
        raise _unsafe(archive, member, "empty member name")
    posix, windows = PurePosixPath(member), PureWindowsPath(member)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or member.startswith("\\"):
        raise _unsafe(archive, member, "absolute path")
    if ".." in posix.parts or ".." in windows.parts:
        raise _unsafe(archive, member, "path traversal ('..')")
    root = dest.resolve()
    target = root / member
    if not target.resolve().is_relative_to(root):
        raise _unsafe(archive, member, f"resolves outside {dest}")
    return target


def _check_link(member: str, link: str, base: Path, archive: str, dest: Path) -> None:
    """Reject a link whose target (relative to ``base``) is absolute or escapes ``dest``."""
    if PurePosixPath(link).is_absolute() or PureWindowsPath(link).is_absolute():
        raise _unsafe(archive, member, f"link to absolute path {link!r}")
    root = dest.resolve()
    target = Path(os.path.normpath(base / link))
    if not target.resolve().is_relative_to(root):
        raise _unsafe(archive, member, f"link target {link!r} points outside {dest}")


def _check_tar_member(member: tarfile.TarInfo, archive: str, dest: Path) -> None:
    target = _check_path(member.name, archive, dest)
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise _unsafe(archive, member.name, "device or FIFO file")
    if member.issym():
        _check_link(member.name, member.linkname, target.parent, archive, dest)
    elif member.islnk():  # hardlink targets are relative to the archive root
        _check_link(member.name, member.linkname, dest.resolve(), archive, dest)
    elif not (member.isfile() or member.isdir()):
        raise _unsafe(archive, member.name, "unsupported member type")


def _check_zip_member(
    archive_file: zipfile.ZipFile, info: zipfile.ZipInfo, archive: str, dest: Path
) -> None:
    target = _check_path(info.filename, archive, dest)
    mode = info.external_attr >> 16
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise _unsafe(archive, info.filename, "device or FIFO file")
    if stat.S_ISLNK(mode):  # zipfile writes links as plain files, but check where they point
        link = archive_file.read(info).decode("utf-8", "replace")
        _check_link(info.filename, link, target.parent, archive, dest)
