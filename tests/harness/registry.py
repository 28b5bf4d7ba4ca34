"""The real distribution registry (Debian ``docker-registry`` 2.8.2) on loopback.

``RegistryServer`` writes a config, runs ``docker-registry serve CONFIG`` with stdout
and stderr appended to ``registry.log`` in its directory, and waits until ``GET /v2/``
answers. Modes: plain http, htpasswd Basic auth, token auth (``TokenIssuer``), TLS from
a ``TestPKI``; auth and TLS combine.

The access log (one Apache "combined" line per request, written by the registry on
stdout) is parsed by ``access_log()``; a line looks like::

    127.0.0.1 - - [24/Nov/2026:23:22:12 +0000] "GET /v2/x/tags/list?n=5 HTTP/1.1" 404 111 "" "curl"

The registry writes that line when its handler returns, which for a large body can be
just after the client has read the last byte; ``access_log()`` therefore first sends a
probe request and waits for the probe's own line, so every request a client completed
before the call is counted.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs

import bcrypt
import requests

from tests.harness.errors import ServerStartError
from tests.harness.net import LOOPBACK, free_port
from tests.harness.pki import TestPKI, create_pki
from tests.harness.process import log_tail, terminate
from tests.harness.tokens import TokenIssuer

REGISTRY_BINARY = "docker-registry"
PROBE_USER_AGENT = "bmsync-harness-probe/1"

_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"$'
)

# Servers still running at interpreter exit are stopped, so an aborted test session
# does not leave registries behind.
_running: set[RegistryServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        server.close()


@dataclass(frozen=True)
class AccessEntry:
    """One request as the registry's access log recorded it.

    ``query`` is the raw query string without ``?`` (``""`` when none); ``size`` is the
    number of body bytes the registry wrote.
    """

    method: str
    path: str
    query: str
    status: int
    size: int
    user_agent: str
    time: str

    @property
    def params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def __str__(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"{self.method} {self.path}{query} {self.status}"


def parse_access_line(line: str) -> AccessEntry | None:
    """Parse one access-log line; None for any other log line."""
    match = _ACCESS_LINE.match(line.strip())
    if match is None:
        return None
    path, _, query = match["uri"].partition("?")
    size = match["size"]
    return AccessEntry(
        method=match["method"],
        path=path,
        query=query,
        status=int(match["status"]),
        size=0 if size == "-" else int(size),
        user_agent=match["agent"],
        time=match["time"],
    )


def htpasswd_line(user: str, password: str) -> str:
    """An htpasswd entry with a bcrypt hash (the only kind distribution accepts)."""
    # Cost 4 (the minimum) keeps registry-side verification fast: it runs per request.
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}"


class RegistryServer:
    """A ``docker-registry`` process serving ``directory/storage`` on 127.0.0.1.

    Call order: construct, ``start()`` (or use as a context manager), any number of
    ``stop()``/``start()``/``restart()``/``kill()``, then ``close()``. The port and the
    storage survive restarts. ``start()`` raises ``ServerStartError`` with the tail of
    the log when the process exits or does not answer ``GET /v2/`` within
    ``start_timeout`` seconds (401 counts as answering in auth modes).

    ``users`` turns on htpasswd Basic auth; ``token_issuer`` turns on token auth (it is
    started with the registry when not running yet, and stopped by ``close()`` in that
    case); ``pki`` turns on TLS with its server certificate. ``config`` is merged over
    the generated config (nested dicts merge), for options a test needs.
    Not thread-safe: drive one server from one thread.
    """

    def __init__(
        self,
        directory: Path,
        *,
        users: Mapping[str, str] | None = None,
        token_issuer: TokenIssuer | None = None,
        pki: TestPKI | None = None,
        port: int | None = None,
        config: Mapping[str, Any] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        if users is not None and token_issuer is not None:
            raise ValueError("choose htpasswd users or a token issuer, not both")
        self.directory = directory
        self.users = dict(users) if users is not None else None
        self.token_issuer = token_issuer
        self.pki = pki
        self.port = port if port is not None else free_port()
        self._port_movable = port is None
        self.start_timeout = start_timeout
        self.root = directory / "storage"
        self.log_path = directory / "registry.log"
        self.config_path = directory / "config.json"
        self._extra_config = dict(config or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._owns_issuer = False
        self._probe = requests.Session()
        self._probe.headers["User-Agent"] = PROBE_USER_AGENT
        self._probe.trust_env = False

    # -- addresses ------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.pki is not None else "http"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as image references and skopeo use it."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def ca_cert(self) -> Path | None:
        """The CA that signed the TLS certificate, or None for plain http."""
        return self.pki.ca_cert if self.pki is not None else None

    @property
    def verify(self) -> bool | str:
        """The ``verify=`` value for requests talking to this server."""
        return str(self.pki.ca_cert) if self.pki is not None else True

    @property
    def auth(self) -> tuple[str, str] | None:
        """The first configured (user, password), for clients that need one."""
        users = self.users
        if users is None and self.token_issuer is not None:
            users = self.token_issuer.users
        if not users:
            return None
        user = next(iter(users))
        return user, users[user]

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> RegistryServer:
        """Write the config, start the process and wait until it answers; returns self.

        On the very first start with a port the harness chose, a port taken meanwhile
        by another process (the race ``free_port`` leaves open) moves the server to a
        new port, up to twice; later starts keep their port, as ``restart()`` promises.
        """
        if self.running:
            return self
        if self.token_issuer is not None and not self.token_issuer.running:
            self.token_issuer.start()
            self._owns_issuer = True
        self.directory.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        attempts = 3 if self._port_movable else 1
        for attempt in range(attempts):
            offset = self.mark()
            try:
                self._launch()
                self._wait_ready()
            except ServerStartError:
                self.stop()
                taken = "address already in use" in self._log_text(offset)
                if not (taken and attempt + 1 < attempts):
                    raise
                self.port = free_port()
                continue
            except BaseException:
                self.stop()
                raise
            break
        self._port_movable = False
        return self

    def _launch(self) -> None:
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        # O_APPEND: restarts keep one log, and offsets from mark() stay valid.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C meant for pytest must not kill the registry before
            # the fixture teardown records its state.
            start_new_session=True,
        )
        _running.add(self)

    def _log_text(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process, SIGKILL it after ``timeout`` seconds; always reaped."""
        terminate(self._process, timeout)
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _running.discard(self)

    def kill(self) -> None:
        """SIGKILL the process (a crash: no graceful shutdown) and reap it."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
        self.stop()

    def restart(self) -> RegistryServer:
        """Stop and start again on the same port and storage."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the registry and the token issuer it started; idempotent."""
        self.stop()
        if self._owns_issuer and self.token_issuer is not None:
            self.token_issuer.stop()
            self._owns_issuer = False
        self._probe.close()

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RegistryServer({self.url}, pid={self.pid}, root={self.root})"

    # -- logs -----------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the registry's log ("" when none yet)."""
        return log_tail(self.log_path, lines)

    def mark(self) -> int:
        """A position in the access log; ``since(mark)`` returns what came after it."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def access_log(
        self, since: int = 0, *, include_probes: bool = False, sync: bool = True
    ) -> list[AccessEntry]:
        """Requests recorded by the registry, oldest first, from offset ``since``.

        With ``sync`` (and the server running) a probe request goes first and its line
        is awaited, so requests completed before this call are all in the result. The
        harness's own probes are left out unless ``include_probes``. Requests of every
        run of this server (across restarts) are included.
        """
        if sync:
            self._sync_log()
        try:
            with open(self.log_path, "rb") as log:
                log.seek(since)
                data = log.read()
        except FileNotFoundError:
            return []
        # A line still being written has no newline yet: leave it for the next read.
        complete = data[: data.rfind(b"\n") + 1]
        entries = []
        for raw in complete.decode("utf-8", "replace").splitlines():
            entry = parse_access_line(raw)
            if entry is None:
                continue
            if not include_probes and entry.user_agent == PROBE_USER_AGENT:
                continue
            entries.append(entry)
        return entries

    def _sync_log(self, timeout: float = 2.0) -> None:
        if not self.running:
            return
        token = uuid.uuid4().hex
        try:
            self._probe.get(f"{self.url}/v2/?sync={token}", timeout=timeout, verify=self.verify)
        except requests.RequestException:
            return  # nothing more will be logged by a server that does not answer
        needle = f"sync={token}".encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                # The probe's line is among the last ones written.
                log.seek(max(0, size - 65536))
                if needle in log.read():
                    return
            time.sleep(0.005)

    def since(self, mark: int) -> list[AccessEntry]:
        """Requests recorded after ``mark()`` returned ``mark``."""
        return self.access_log(mark)

    def clear_access_log(self) -> None:
        """Empty the log file (the registry appends, so it keeps writing at offset 0)."""
        with open(self.log_path, "r+b") as log:
            log.truncate(0)

    # -- storage --------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps blob ``sha256:HEX``."""
        algorithm, _, hexdigest = digest.partition(":")
        return (
            self.root / "docker" / "registry" / "v2" / "blobs" / algorithm
            / hexdigest[:2] / hexdigest / "data"
        )

    def has_blob(self, digest: str) -> bool:
        """Whether the blob's bytes are in storage (in any repository)."""
        return self.blob_path(digest).is_file()

    # -- internals ------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        http: dict[str, Any] = {
            "addr": self.host,
            # Shared by restarts, so upload state signed before a restart stays valid.
            "secret": f"bmsync-harness-{self.port}",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.pki is not None:
            http["tls"] = {
                "certificate": str(self.pki.server_cert),
                "key": str(self.pki.server_key),
            }
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root)},
                "delete": {"enabled": True},
                # Purging runs 50 min after start by default: keep it out of tests.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self.users is not None:
            htpasswd = self.directory / "htpasswd"
            htpasswd.write_text(
                "".join(htpasswd_line(u, p) + "\n" for u, p in self.users.items())
            )
            config["auth"] = {"htpasswd": {"realm": "bmsync-test", "path": str(htpasswd)}}
        elif self.token_issuer is not None:
            config["auth"] = self.token_issuer.registry_config()
        return _merge(config, self._extra_config)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        url = f"{self.url}/v2/"
        last_error = "no answer"
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise ServerStartError(
                    f"docker-registry on {self.host} exited with status {code} during start;"
                    f" log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                response = self._probe.get(url, timeout=0.5, verify=self.verify)
            except requests.RequestException as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code in (200, 401):
                    return
                last_error = f"GET /v2/ answered {response.status_code}"
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"docker-registry on {self.host} not ready after {self.start_timeout:.0f}s"
                    f" ({last_error}); log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.02)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def start_registry(
    directory: Path,
    *,
    auth: str = "none",
    users: Mapping[str, str] | None = None,
    anonymous: frozenset[str] | None = None,
    tls: TestPKI | None = None,
    token_algorithm: str = "ES256",
    token_pki: TestPKI | None = None,
    config: Mapping[str, Any] | None = None,
) -> RegistryServer:
    """Start a registry in one call (for fixtures, bench and demo).

    ``auth`` is ``"none"``, ``"basic"`` (htpasswd from ``users``) or ``"token"`` (a new
    ``TokenIssuer`` with ``users`` and ``anonymous`` rights, signing with a certificate
    from ``token_pki`` or ``tls``, started and owned by the server). Raises
    ``ServerStartError`` when it does not come up; ``close()`` the result when done.
    """
    if auth not in ("none", "basic", "token"):
        raise ValueError(f"auth must be none, basic or token, not {auth!r}")
    issuer: TokenIssuer | None = None
    if auth == "token":
        signer = token_pki or tls
        if signer is None:
            signer = create_pki(directory / f"pki-{uuid.uuid4().hex[:8]}")
        if token_algorithm not in ("ES256", "RS256"):
            raise ValueError(f"token_algorithm must be ES256 or RS256, not {token_algorithm!r}")
        issuer = TokenIssuer(
            signer,
            users=users or {},
            anonymous=anonymous,
            algorithm="RS256" if token_algorithm == "RS256" else "ES256",
        )
    server = RegistryServer(
        directory,
        users=(users or {}) if auth == "basic" else None,
        token_issuer=issuer,
        pki=tls,
        config=config,
    )
    try:
        server.start()
    except BaseException:
        server.close()
        if issuer is not None:
            issuer.stop()
        raise
    return server


__all__ = [
    "AccessEntry",
    "RegistryServer",
    "htpasswd_line",
    "parse_access_line",
    "start_registry",
]
