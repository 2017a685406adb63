"""Download one weight file: resumable, verified, and never a half file under its final name.

The bytes go to ``<name>.part`` beside the destination. A dropped connection resumes with an HTTP Range
request when the server honours it (206) and starts over when it does not (200). Only a complete file that
passes the checksum and the caller's ``verify`` (a strict load) is fsynced and renamed into place.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

CHUNK = 1 << 20
USER_AGENT = "gpen-watch/0.1 (model downloader)"
# Client errors another attempt cannot fix (408 Request Timeout and 429 Too Many Requests are worth a retry).
_FATAL_STATUS = frozenset(range(400, 500)) - {408, 416, 429}


class DownloadError(Exception):
    """A file could not be downloaded; the message says which file, where it goes, and where it comes from."""


class _Dropped(Exception):
    """The transfer stopped early; what arrived stays in the .part file for the next attempt."""


def redact_url(url: str) -> str:
    """``url`` for messages and logs: scheme, host and path, without a user, password or query (a token).

    Everything before the last ``@`` after the scheme is hidden, not only what urlsplit calls the user and
    password: a password with an unescaped ``/``, ``?`` or ``#`` would otherwise show (in part) as host or path.
    An ``@`` in a path or query hides more than it needs to, never less.
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        url = f"{scheme}://***@{rest.rpartition('@')[2]}"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(an address that is not a valid URL)"
    hidden = "?***" if parts.query or parts.fragment else ""
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) + hidden


def split_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without its ``user:password@``, and the HTTP Basic ``Authorization`` value they make (or None).

    urllib would take ``user:password@host`` for a host name. Private mirrors are often addressed that way,
    so the credentials become a header instead, which redirects carry only within the same host (see
    ``_LoginStaysHome``): a mirror handing off to a CDN or a signed storage URL never gets the password.
    """
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        if "@" in url.partition("://")[2] and not _port_is_numeric(parts):  # "user:pa/ss@host": host "user"
            raise DownloadError(
                "the user or password in the address holds a / ? or #: write those percent-escaped (%2F, %3F, %23)")
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, "Basic " + base64.b64encode(token).decode("ascii")


def _port_is_numeric(parts: urllib.parse.SplitResult) -> bool:
    try:
        parts.port  # noqa: B018 - reading it is the check
    except ValueError:
        return False
    return True


class _LoginStaysHome(urllib.request.HTTPRedirectHandler):
    """Follows redirects, sending a login on only while they stay on its host and port (or go from http to https
    there): a mirror that forces https or moves a file keeps working, a CDN elsewhere never sees the password."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and not _same_site(req.full_url, new.full_url):
            new.remove_header("Authorization")
        return new


def _same_site(old: str, new: str) -> bool:
    a, b = urllib.parse.urlsplit(old), urllib.parse.urlsplit(new)
    if a.hostname is None or a.hostname != b.hostname:
        return False
    ports = {"http": 80, "https": 443}
    here, there = (a.scheme, a.port or ports.get(a.scheme)), (b.scheme, b.port or ports.get(b.scheme))
    return here == there or (here, there) == (("http", 80), ("https", 443))


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def download(
    url: str,
    dest: Path,
    *,
    progress: bool = True,
    timeout: float = 30,
    retries: int = 3,
    expected_sha256: str | None = None,
    verify: Callable[[Path], None] | None = None,
    backoff: float = 1.0,
    skip_if_present: bool = False,
) -> Path:
    """Fetch ``url`` into ``dest`` and return ``dest``.

    ``retries`` counts attempts that end without the partial file growing past what an earlier attempt
    had, so a slow but steady transfer over a flaky link still finishes. ``verify`` gets the complete
    temporary file and raises to reject it. Raises DownloadError; on failure nothing exists under ``dest``
    (a partial ``.part`` is kept for the next run unless it is known to be bad). With ``skip_if_present``,
    a file another process finished while this one waited for the folder's lock is taken as it is.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(dest.parent, dest.name, progress):
        if skip_if_present and dest.is_file() and dest.stat().st_size > 0:  # an empty file is a failed copy
            return dest
        part = part_path(dest)
        failures = 0
        best = 0
        restarted_after_bad = False
        while True:
            try:
                resumed = _fetch(url, part, timeout=timeout, progress=progress)
            except _Dropped as exc:
                size = part.stat().st_size if part.exists() else 0
                if size > best:
                    best = size
                else:
                    failures += 1
                if failures > retries:
                    reason = f"the connection kept dropping ({exc})"
                    raise DownloadError(_message(dest, url, reason)) from None
                time.sleep(backoff * min(2**failures, 30))
                continue
            except DownloadError as exc:
                raise DownloadError(_message(dest, url, str(exc))) from None
            try:
                _check(part, expected_sha256, verify)
            except DownloadError as exc:
                part.unlink(missing_ok=True)
                # Bytes kept from an earlier run may belong to another version of the file: one clean restart.
                if resumed and not restarted_after_bad:
                    restarted_after_bad = True
                    continue
                raise DownloadError(_message(dest, url, str(exc))) from None
            os.replace(part, dest)
            _fsync_dir(dest.parent)
            return dest


def _fetch(url: str, part: Path, *, timeout: float, progress: bool) -> bool:
    """One attempt: append to or restart ``part`` until the server's bytes end. True if it resumed."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    address, authorization = split_credentials(url)
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(address, headers=headers)
    try:
        response = urllib.request.build_opener(_LoginStaysHome).open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            # The partial is as long as (or longer than) the file: complete, or junk. The checks decide.
            total = _total_from_content_range(exc.headers.get("Content-Range"))
            if total == offset:
                return True
            part.unlink(missing_ok=True)
            raise _Dropped(f"HTTP 416 for a partial of {offset} bytes") from None
        if exc.code == 401:
            given = "the user and password in the address were refused" if authorization else (
                "the server wants a user and password: give them in the address, https://USER:PASSWORD@host/...")
            if authorization and not _same_site(address, exc.geturl()):
                given = (f"asked for by {urllib.parse.urlsplit(exc.geturl()).hostname}, where a redirect led: "
                         "the login in the address is sent to its own host only")
            raise DownloadError(f"HTTP 401 {exc.reason} ({given})") from None
        if exc.code in _FATAL_STATUS:
            raise DownloadError(f"HTTP {exc.code} {exc.reason}") from None
        raise _Dropped(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, socket.gaierror):  # offline or no DNS: retrying at once will not help
            host = urllib.parse.urlsplit(address).hostname
            raise DownloadError(f"cannot resolve {host} (no network or DNS here?): {reason}") from None
        raise _Dropped(str(reason)) from None

    with response:
        resumed = False
        if response.status == 206 and offset:
            start = _start_from_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Dropped(f"server answered a range from byte {start}, asked for {offset}")
            resumed = True
            mode = "ab"
        else:  # 200: the server ignores ranges (or none was asked); start over
            offset = 0
            mode = "wb"
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length and length.isdigit() else None
        bar = tqdm(
            total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"), disable=not progress, file=sys.stderr, leave=False,
        )
        written = offset
        with open(part, mode) as out, bar:
            try:
                for chunk in _chunks(response):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                _flush(out)
                raise _Dropped(str(exc) or type(exc).__name__) from None
            _flush(out)
        if expected is not None and written != expected:
            raise _Dropped(f"got {written} of {expected} bytes")
        return resumed


def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while chunk := response.read(CHUNK):
        yield chunk


def _flush(out: object) -> None:
    out.flush()  # type: ignore[attr-defined]
    os.fsync(out.fileno())  # type: ignore[attr-defined]


def _check(part: Path, expected_sha256: str | None, verify: Callable[[Path], None] | None) -> None:
    if expected_sha256:
        actual = sha256_of(part)
        if actual.lower() != expected_sha256.lower():
            raise DownloadError(f"checksum mismatch: expected sha256 {expected_sha256}, got {actual}")
    if verify is not None:
        try:
            verify(part)
        except Exception as exc:  # whatever the loader raises, the file is not usable
            raise DownloadError(f"the downloaded file failed verification: {exc}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _message(dest: Path, url: str, reason: str) -> str:
    return (
        f"could not download {dest.name}: {reason}\n"
        f"  it comes from: {redact_url(url)}\n"
        f"  it must go to: {dest}\n"
        f"  download it by hand and put it there, or check the network and proxy settings and retry"
    )


_RANGE = re.compile(r"bytes\s+(\d+|\*)-?(\d*)/(\d+|\*)")


def _start_from_content_range(value: str | None) -> int | None:
    match = _RANGE.match(value or "")
    return int(match.group(1)) if match and match.group(1) != "*" else None


def _total_from_content_range(value: str | None) -> int | None:
    match = _RANGE.match(value or "")
    return int(match.group(3)) if match and match.group(3) != "*" else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _dir_lock(directory: Path, name: str, progress: bool) -> Iterator[None]:
    """One download per models folder at a time: daemons for several GPUs often start together."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process downloading into {directory} ({name})", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
