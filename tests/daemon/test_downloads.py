"""The weight downloader against a local HTTP server that misbehaves on purpose."""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.downloads import DownloadError, download, part_path, redact_url

PAYLOAD = os.urandom(300_000)


@dataclass
class Behaviour:
    """How the fake server answers; ``requests`` records each request's Range header (or None)."""

    honour_range: bool = True
    drops: int = 0  # the first N responses stop halfway
    always_drop: bool = False
    status: int = 200
    requests: list[str | None] = field(default_factory=list)
    password: str | None = None  # answer 401 unless the request carries Basic me:<password>
    redirect_to: str | None = None  # answer 302 to this address
    authorizations: list[str | None] = field(default_factory=list)  # each request's Authorization header


def _handler(payload: bytes, behaviour: Behaviour) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            range_header = self.headers.get("Range")
            behaviour.requests.append(range_header)
            behaviour.authorizations.append(self.headers.get("Authorization"))
            if behaviour.password is not None:
                expected = "Basic " + base64.b64encode(f"me:{behaviour.password}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_error(401)
                    return
            target = urllib.parse.urlsplit(behaviour.redirect_to or "")
            if behaviour.redirect_to and (target.path, target.port) != (self.path, self.server.server_address[1]):
                self.send_response(302)
                self.send_header("Location", behaviour.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if behaviour.status != 200:
                self.send_error(behaviour.status)
                return
            start = 0
            if range_header and behaviour.honour_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            else:
                self.send_response(200)
            body = payload[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if behaviour.always_drop or behaviour.drops > 0:
                behaviour.drops -= 1
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def serve() -> Iterator:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(behaviour: Behaviour, payload: bytes = PAYLOAD) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(payload, behaviour))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/GPEN-BFR-512.pth"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _get(url: str, dest: Path, **kwargs: object) -> Path:
    return download(url, dest, progress=False, timeout=5, backoff=0, **kwargs)  # type: ignore[arg-type]


class TestDownload:
    def test_normal_download(self, serve, tmp_path: Path) -> None:
        """A plain download puts exactly the server's bytes under the final name and leaves no .part."""
        dest = tmp_path / "models" / "GPEN-BFR-512.pth"
        assert dest == _get(serve(Behaviour()), dest)
        assert dest.read_bytes() == PAYLOAD
        assert not part_path(dest).exists()

    def test_resumes_after_drop(self, serve, tmp_path: Path) -> None:
        """A server that honours Range and drops halfway is resumed from where the bytes stopped."""
        behaviour = Behaviour(drops=1)
        dest = tmp_path / "GPEN-BFR-512.pth"
        _get(serve(behaviour), dest, expected_sha256=hashlib.sha256(PAYLOAD).hexdigest())
        assert dest.read_bytes() == PAYLOAD
        assert [None, f"bytes={len(PAYLOAD) // 2}-"] == behaviour.requests

    def test_resumes_partial_from_earlier_run(self, serve, tmp_path: Path) -> None:
        """A .part left by an interrupted earlier run is continued, not thrown away."""
        behaviour = Behaviour()
        dest = tmp_path / "GPEN-BFR-512.pth"
        part_path(dest).write_bytes(PAYLOAD[:1000])
        _get(serve(behaviour), dest)
        assert dest.read_bytes() == PAYLOAD
        assert behaviour.requests == ["bytes=1000-"]

    def test_restarts_when_range_ignored(self, serve, tmp_path: Path) -> None:
        """A server that ignores Range (200) after a drop gives a clean restart, not a doubled file."""
        behaviour = Behaviour(honour_range=False, drops=1)
        dest = tmp_path / "GPEN-BFR-512.pth"
        _get(serve(behaviour), dest)
        assert dest.read_bytes() == PAYLOAD
        assert len(behaviour.requests) == 2

    def test_bad_partial_from_another_file_restarts(self, serve, tmp_path: Path) -> None:
        """A stale .part of different content fails the checksum once, then a full download succeeds."""
        behaviour = Behaviour()
        dest = tmp_path / "GPEN-BFR-512.pth"
        part_path(dest).write_bytes(b"x" * 5000)
        _get(serve(behaviour), dest, expected_sha256=hashlib.sha256(PAYLOAD).hexdigest())
        assert dest.read_bytes() == PAYLOAD
        assert behaviour.requests == ["bytes=5000-", None]

    def test_always_dropping_server_fails_clearly(self, serve, tmp_path: Path) -> None:
        """A server that never completes: an error naming file, source and destination, and no final file."""
        url = serve(Behaviour(honour_range=False, always_drop=True))
        dest = tmp_path / "GPEN-BFR-512.pth"
        with pytest.raises(DownloadError) as info:
            _get(url, dest, retries=2)
        message = str(info.value)
        assert "GPEN-BFR-512.pth" in message
        assert url in message
        assert str(dest) in message
        assert not dest.exists()

    def test_checksum_mismatch_leaves_no_file(self, serve, tmp_path: Path) -> None:
        """Bytes that do not match the expected sha256 never appear under the final name (nor as .part)."""
        dest = tmp_path / "GPEN-BFR-512.pth"
        with pytest.raises(DownloadError, match="checksum mismatch"):
            _get(serve(Behaviour()), dest, expected_sha256="0" * 64)
        assert not dest.exists()
        assert not part_path(dest).exists()

    def test_verify_failure_leaves_no_file(self, serve, tmp_path: Path) -> None:
        """When the strict-load check rejects the file, the error carries its reason and no file is kept."""

        def reject(path: Path) -> None:
            assert path.read_bytes() == PAYLOAD  # the check sees the complete file
            raise ValueError("unexpected key 'foo'")

        dest = tmp_path / "GPEN-BFR-512.pth"
        with pytest.raises(DownloadError, match="unexpected key 'foo'"):
            _get(serve(Behaviour()), dest, verify=reject)
        assert not dest.exists()
        assert not part_path(dest).exists()

    def test_not_found_is_not_retried(self, serve, tmp_path: Path) -> None:
        """A 404 fails at once with the HTTP status in the message."""
        behaviour = Behaviour(status=404)
        dest = tmp_path / "GPEN-BFR-512.pth"
        with pytest.raises(DownloadError, match="HTTP 404"):
            _get(serve(behaviour), dest)
        assert len(behaviour.requests) == 1
        assert not dest.exists()

    def test_messages_hide_credentials_and_tokens_in_the_address(self, serve, tmp_path: Path) -> None:
        """A token in the query or a user and password in the address never reach an error message (the journal);
        the host and path still say where the file comes from."""
        url = serve(Behaviour(status=404))
        base = url.removeprefix("http://")
        for secret_url in (url + "?token=s3cret&x=1", f"http://me:s3cret@{base}"):
            with pytest.raises(DownloadError) as info:
                _get(secret_url, tmp_path / "GPEN-BFR-512.pth")
            message = str(info.value)
            assert "s3cret" not in message and "token" not in message
            assert base in message

    def test_user_and_password_in_the_address_log_in(self, serve, tmp_path: Path) -> None:
        """A private mirror addressed as http://user:password@host/... gets them as HTTP Basic credentials
        (percent-escapes decoded), and the file downloads."""
        behaviour = Behaviour(password="p@ss:w/rd")
        base = serve(behaviour).removeprefix("http://")
        dest = tmp_path / "GPEN-BFR-512.pth"
        _get(f"http://me:p%40ss%3Aw%2Frd@{base}", dest)
        assert dest.read_bytes() == PAYLOAD

    def test_wrong_or_missing_password_fails_at_once_and_says_so(self, serve, tmp_path: Path) -> None:
        """A 401 is not retried; the message says whether credentials were missing or refused."""
        behaviour = Behaviour(password="right")
        url = serve(behaviour)
        base = url.removeprefix("http://")
        dest = tmp_path / "GPEN-BFR-512.pth"
        with pytest.raises(DownloadError, match="wants a user and password"):
            _get(url, dest)
        with pytest.raises(DownloadError, match="refused") as info:
            _get(f"http://me:n0tright@{base}", dest)
        assert "n0tright" not in str(info.value)
        assert 2 == len(behaviour.requests)
        assert not dest.exists()

    def test_password_is_not_sent_on_to_where_a_redirect_points(self, serve, tmp_path: Path) -> None:
        """A mirror that redirects (to a CDN, a signed storage address) hands the download on, but the password
        given for the mirror never reaches the other server."""
        storage = Behaviour()
        mirror = Behaviour(redirect_to=serve(storage))
        base = serve(mirror).removeprefix("http://")
        dest = tmp_path / "GPEN-BFR-512.pth"
        _get(f"http://me:s3cret@{base}", dest)
        assert dest.read_bytes() == PAYLOAD
        assert mirror.authorizations[0] is not None
        assert [None] == storage.authorizations

    def test_a_redirect_on_the_same_host_keeps_the_login(self, serve, tmp_path: Path) -> None:
        """A mirror that moves a file (or forces https) on its own host still gets the login after the redirect."""
        behaviour = Behaviour(password="s3cret")
        url = serve(behaviour)
        behaviour.redirect_to = url.replace("GPEN-BFR-512.pth", "moved/GPEN-BFR-512.pth")
        dest = tmp_path / "GPEN-BFR-512.pth"
        _get(f"http://me:s3cret@{url.removeprefix('http://')}", dest)
        assert dest.read_bytes() == PAYLOAD
        assert 2 == len(behaviour.authorizations) and None not in behaviour.authorizations

    @pytest.mark.parametrize("password", ["pa/ss0rd", "pa?ss0rd", "pa#ss0rd"])
    def test_an_unescaped_slash_or_hash_in_the_password_is_refused_and_never_shown(
            self, serve, tmp_path: Path, password: str) -> None:
        """urlsplit would take "me:pa/ss0rd@host" for host "me": the error says to percent-escape, and no part of
        the password reaches the message (or the log line that names the address)."""
        base = serve(Behaviour()).removeprefix("http://")
        url = f"http://me:{password}@{base}"
        with pytest.raises(DownloadError, match="percent-escaped") as info:
            _get(url, tmp_path / "GPEN-BFR-512.pth")
        assert "ss0rd" not in str(info.value) and "ss0rd" not in redact_url(url)
        assert base.partition("/")[0] in redact_url(url)

    def test_offline_message(self, tmp_path: Path) -> None:
        """With nothing listening, the error says which file, where it must go and where it comes from."""
        import socket

        with socket.socket() as s:  # a port that was free a moment ago: connection refused
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}/parsing_parsenet.pth"
        dest = tmp_path / "parsing_parsenet.pth"
        with pytest.raises(DownloadError) as info:
            _get(url, dest, retries=0)
        message = str(info.value)
        assert "parsing_parsenet.pth" in message and url in message and str(dest) in message
        assert not dest.exists()
