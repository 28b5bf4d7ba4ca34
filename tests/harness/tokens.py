"""A docker token issuer for the distribution registry's ``auth: token`` mode.

Implements the flow of the distribution token spec: the registry answers 401 with
``WWW-Authenticate: Bearer realm=...,service=...,scope=...``; the client asks
``GET /token?service=S&scope=repository:NAME:pull,push&scope=...`` (Basic auth or
anonymous) and presents the returned JWT as ``Authorization: Bearer``. The OAuth2 form
(``POST /token`` with ``grant_type=password``), which containerd tries first, is served
too.

Tokens are signed (ES256 or RS256) with a key whose certificate the test CA signed; the
certificate travels in the JWT's ``x5c`` header, because distribution 2.8 matches a
``kid`` only against libtrust key ids while it verifies an ``x5c`` chain against its
``rootcertbundle`` (the CA certificate, ``TokenIssuer.root_bundle``).

Every request is recorded (``requests``) so tests can assert how a client used the
issuer: how many token requests, which scopes in one request, credentials or not.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization

from tests.harness.httpserver import LoopbackHTTPServer, QuietHandler
from tests.harness.net import LOOPBACK
from tests.harness.pki import TestPKI

Algorithm = Literal["ES256", "RS256"]

ALL_ACTIONS = frozenset({"pull", "push", "delete", "*"})
_issuer_serial = itertools.count()


@dataclass(frozen=True)
class Access:
    """One entry of a token's ``access`` claim (or of a requested scope)."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class TokenRequest:
    """What the issuer saw and answered for one request.

    ``query`` keeps every parameter in order (several ``scope`` entries stay separate);
    ``scopes`` lists each requested scope (a ``scope`` value holding several
    space-separated scopes counts as several); ``authorization`` is the auth scheme the
    client sent (``"basic"``, ``"bearer"``...) or None; ``user`` is the authenticated
    user, ``None`` for anonymous or refused requests.
    """

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    scopes: tuple[str, ...]
    service: str | None
    authorization: str | None
    user: str | None
    status: int
    granted: tuple[Access, ...]

    @property
    def authorized(self) -> bool:
        """Whether the request carried an Authorization header."""
        return self.authorization is not None

    def params(self, name: str) -> list[str]:
        """All values of query (or form) parameter ``name``, in order."""
        return [value for key, value in self.query if key == name]


class TokenIssuer:
    """A token server on ``http://127.0.0.1:PORT/token`` run in a thread.

    ``users`` maps user names to passwords; ``rights`` optionally restricts a user's
    actions (default: every action). ``anonymous`` is the set of actions granted
    without credentials (e.g. ``{"pull"}``); None refuses anonymous requests with 401.
    A request for more than a user may do is answered with a token granting only the
    allowed part (that is what docker's reference server does); the registry then
    refuses the operation. Wrong credentials get 401.

    The port is bound at construction, so ``realm`` is valid before ``start()``.
    Thread-safe: requests are served concurrently and recorded under a lock.
    """

    def __init__(
        self,
        pki: TestPKI,
        *,
        users: Mapping[str, str] | None = None,
        rights: Mapping[str, Iterable[str]] | None = None,
        anonymous: Iterable[str] | None = None,
        service: str = "bmsync-test-registry",
        issuer: str = "bmsync-test-issuer",
        algorithm: Algorithm = "ES256",
        expires_in: int = 300,
    ) -> None:
        self.users = dict(users or {})
        self.rights = {user: frozenset(actions) for user, actions in (rights or {}).items()}
        self.anonymous = None if anonymous is None else frozenset(anonymous)
        self.service = service
        self.issuer = issuer
        self.algorithm = algorithm
        self.expires_in = expires_in
        self.root_bundle: Path = pki.ca_cert
        signing = pki.issue(
            f"token-issuer-{next(_issuer_serial)}-{uuid.uuid4().hex[:8]}",
            key_type="rsa" if algorithm == "RS256" else "ec",
        )
        self.signing_cert: Path = signing.cert
        self._key = signing.load_key()
        self._public_key = self._key.public_key()
        cert_der = signing.load_cert().public_bytes(serialization.Encoding.DER)
        # x5c holds standard (not URL-safe) base64 DER, leaf first (RFC 7515 4.1.6).
        self._x5c = [base64.b64encode(cert_der).decode("ascii")]
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server = LoopbackHTTPServer(_TokenHandler, self)
        self._running = False

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def realm(self) -> str:
        """The token endpoint, for the registry's ``auth.token.realm``."""
        return f"{self.url}/token"

    def start(self) -> TokenIssuer:
        """Start serving; returns self. Idempotent."""
        if not self._running:
            self._server.start(f"token-issuer:{self.port}")
            self._running = True
        return self

    def stop(self) -> None:
        """Stop serving and close every connection. Idempotent."""
        self._server.stop()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def __enter__(self) -> TokenIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def registry_config(self) -> dict[str, Any]:
        """The ``auth`` section of a distribution config that trusts this issuer."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.root_bundle),
            }
        }

    @property
    def requests(self) -> list[TokenRequest]:
        """A copy of every request recorded so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def mark(self) -> int:
        """A position in the record; ``since(mark)`` returns what came after it."""
        with self._lock:
            return len(self._requests)

    def since(self, mark: int) -> list[TokenRequest]:
        with self._lock:
            return self._requests[mark:]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def issue(self, subject: str, access: Iterable[Access], *, service: str | None = None) -> str:
        """Sign a token for ``subject`` granting ``access`` (also used by the handler)."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": service or self.service,
            "exp": now + self.expires_in,
            # Allow for a registry clock slightly behind ours.
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [entry.claim() for entry in access],
        }
        return jwt.encode(
            claims, self._key, algorithm=self.algorithm, headers={"x5c": self._x5c}
        )

    def decode(self, token: str) -> dict[str, Any]:
        """Verify a token this issuer signed and return its claims."""
        claims: dict[str, Any] = jwt.decode(
            token, self._public_key, algorithms=[self.algorithm], audience=self.service
        )
        return claims

    def _allowed(self, user: str | None) -> frozenset[str]:
        if user is None:
            return self.anonymous or frozenset()
        return self.rights.get(user, ALL_ACTIONS)

    def _authenticate(self, header: str | None) -> tuple[str | None, bool]:
        """(user, accepted) for an Authorization header value.

        No header means anonymous: user None, accepted when anonymous access is on.
        """
        if header is None:
            return None, self.anonymous is not None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None, False
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, False
        if user in self.users and self.users[user] == password:
            return user, True
        return None, False

    def _grant(self, user: str | None, scopes: Iterable[str]) -> tuple[Access, ...]:
        allowed = self._allowed(user)
        granted: list[Access] = []
        for scope in scopes:
            requested = parse_scope(scope)
            if requested is None:
                continue
            if "*" in allowed:
                actions = requested.actions
            else:
                actions = tuple(a for a in requested.actions if a in allowed)
            if actions:
                granted.append(Access(requested.type, requested.name, actions))
        return tuple(granted)

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self._requests.append(entry)


def parse_scope(scope: str) -> Access | None:
    """``repository:name:pull,push`` -> Access; None when it does not parse.

    The name sits between the first and the last colon, so a name holding a registry
    port (``repository:host:5000/name:pull``) still parses.
    """
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not (sep and sep2 and kind and name):
        return None
    return Access(kind, name, tuple(a for a in actions.split(",") if a))


class _TokenHandler(QuietHandler):
    server: LoopbackHTTPServer

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        query = tuple(parse_qsl(split.query, keep_blank_values=True))
        self._answer(split.path, query, oauth=False)

    def do_POST(self) -> None:
        split = urlsplit(self.path)
        body = self.read_body().decode("utf-8", "replace")
        form = tuple(parse_qsl(body, keep_blank_values=True))
        self._answer(split.path, form, oauth=True)

    def _answer(self, path: str, query: tuple[tuple[str, str], ...], *, oauth: bool) -> None:
        issuer: TokenIssuer = self.server.owner
        params: dict[str, list[str]] = {}
        for key, value in query:
            params.setdefault(key, []).append(value)
        # A scope parameter may itself hold several space-separated scopes (the OAuth2
        # form always does; some clients do it on GET too).
        scopes = tuple(s for value in params.get("scope", []) for s in value.split() if s)
        services = params.get("service")
        service = services[0] if services else None
        header = self.headers.get("Authorization")
        scheme = header.partition(" ")[0].lower() if header else None
        if oauth:
            grant = (params.get("grant_type") or [""])[0]
            if grant != "password":
                self._refuse(issuer, path, query, scopes, service, scheme, 400,
                             {"error": "unsupported_grant_type"})
                return
            username = (params.get("username") or [""])[0]
            password = (params.get("password") or [""])[0]
            creds = base64.b64encode(f"{username}:{password}".encode()).decode()
            user, ok = issuer._authenticate(f"Basic {creds}")
        else:
            user, ok = issuer._authenticate(header)
        if path != "/token":
            self._refuse(issuer, path, query, scopes, service, scheme, 404, {"error": "not found"})
            return
        if service is not None and service != issuer.service:
            self._refuse(issuer, path, query, scopes, service, scheme, 400,
                         {"error": "invalid_request", "error_description": "unknown service"})
            return
        if not ok:
            unauthorized = {"code": "UNAUTHORIZED", "message": "authentication required"}
            self._refuse(issuer, path, query, scopes, service, scheme, 401,
                         {"errors": [unauthorized]})
            return
        granted = issuer._grant(user, scopes)
        token = issuer.issue(user or "", granted, service=service)
        issued_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        answer = {
            "token": token,
            "access_token": token,
            "expires_in": issuer.expires_in,
            "issued_at": issued_at,
        }
        if oauth:
            answer["scope"] = " ".join(scopes)
        issuer._record(
            TokenRequest(
                method=self.command, path=path, query=query, scopes=scopes, service=service,
                authorization=scheme, user=user, status=200, granted=granted,
            )
        )
        self.send_bytes(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

    def _refuse(
        self,
        issuer: TokenIssuer,
        path: str,
        query: tuple[tuple[str, str], ...],
        scopes: tuple[str, ...],
        service: str | None,
        scheme: str | None,
        status: int,
        body: dict[str, Any],
    ) -> None:
        issuer._record(
            TokenRequest(
                method=self.command, path=path, query=query, scopes=scopes, service=service,
                authorization=scheme, user=None, status=status, granted=(),
            )
        )
        headers = {"Content-Type": "application/json"}
        if status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="bmsync-test-issuer"'
        self.send_bytes(status, json.dumps(body).encode(), headers)
