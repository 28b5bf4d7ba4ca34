"""Registry authentication: challenges, Basic, and the Bearer token flow.

The registry says how to authenticate in the ``WWW-Authenticate`` header of a 401
(distribution "token authentication" spec): ``Basic realm=...`` or
``Bearer realm=URL,service=NAME,scope=...``. For Bearer we ask ``realm`` for a token
covering the scopes we need (one request may carry several ``scope=`` parameters),
sending Basic credentials when we have them (anonymous otherwise, as gcr.io allows
for public images), or an OAuth2 refresh-token POST for a docker ``identitytoken``.

Tokens are cached per set of scopes until shortly before they expire. The
:class:`Authenticator` is thread-safe; concurrent requests needing the same token wait
for one token request instead of each sending their own.

No secret (password, token) appears in a repr, a log line or an error message.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from pipeline.errors import ProtocolError, RegistryError, Unauthorized
from pipeline.registry.credentials import Credential
from pipeline.registry.transport import Transport, read_limited, redact_url

log = logging.getLogger("bmsync.registry")

MAX_TOKEN_BODY = 1024 * 1024
# Spec: "if expires_in is not given, a token should be assumed valid for 60 seconds".
DEFAULT_TOKEN_LIFETIME = 60
# Refresh a little early so a token does not expire between check and use.
EXPIRY_MARGIN = 10


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into challenges (RFC 7235 syntax).

    Accepts several challenges in one header and quoted values holding commas and
    escaped quotes. Unparseable text yields an empty list rather than an exception,
    since the caller then reports the 401 itself.
    """
    out: list[Challenge] = []
    i, n = 0, len(header)
    current: Challenge | None = None
    while i < n:
        while i < n and header[i] in " ,\t":
            i += 1
        start = i
        while i < n and header[i] not in " =,\t":
            i += 1
        token = header[start:i]
        if not token:
            break
        j = i
        while j < n and header[j] in " \t":
            j += 1
        if j < n and header[j] == "=" and current is not None:
            # key=value (value a token or a quoted string)
            i = j + 1
            while i < n and header[i] in " \t":
                i += 1
            if i < n and header[i] == '"':
                i += 1
                buf: list[str] = []
                while i < n and header[i] != '"':
                    if header[i] == "\\" and i + 1 < n:
                        i += 1
                    buf.append(header[i])
                    i += 1
                i += 1
                value = "".join(buf)
            else:
                vstart = i
                while i < n and header[i] not in ",":
                    i += 1
                value = header[vstart:i].strip()
            current.params[token.lower()] = value
        else:
            current = Challenge(token.lower(), {})
            out.append(current)
            i = j
    return out


class Authenticator:
    """Authorization headers for one registry host.

    Call order: :meth:`header` before each request (None until the registry has
    challenged once, or when anonymous access is all we have); on a 401 call
    :meth:`answer` with the response's ``WWW-Authenticate`` value, which returns the
    header to retry with or raises :class:`Unauthorized`.
    """

    def __init__(self, host: str, credential: Credential | None, transport: Transport) -> None:
        self.host = host
        self.credential = credential
        self._transport = transport
        self._lock = threading.Lock()
        self._scheme: str | None = None
        self._bearer_params: dict[str, str] = {}
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._inflight: dict[tuple[str, ...], threading.Lock] = {}

    def __repr__(self) -> str:
        who = self.credential.username if self.credential else "anonymous"
        return f"Authenticator({self.host}, {who}, scheme={self._scheme})"

    def header(self, scopes: Iterable[str]) -> str | None:
        """The ``Authorization`` value to send for ``scopes``, if any is known yet."""
        if self._scheme == "basic":
            return self._basic()
        if self._scheme == "bearer":
            return f"Bearer {self._token(tuple(sorted(set(scopes))))}"
        return None

    def answer(
        self, www_authenticate: str | None, scopes: Iterable[str], sent: str | None = None
    ) -> str:
        """Handle a 401: learn the scheme, fetch a token, return the header to retry with.

        ``sent`` is the ``Authorization`` value of the refused request, if any.
        """
        challenges = parse_challenges(www_authenticate or "")
        by_scheme = {c.scheme: c for c in challenges}
        wanted = set(scopes)
        if "bearer" in by_scheme:
            params = by_scheme["bearer"].params
            if not params.get("realm"):
                raise ProtocolError(f"{self.host} sent a Bearer challenge without a realm")
            if params.get("scope"):
                wanted.update(params["scope"].split(" "))
            with self._lock:
                self._scheme = "bearer"
                self._bearer_params = {
                    "realm": params["realm"],
                    "service": params.get("service", ""),
                }
            rejected = sent[7:] if sent and sent.startswith("Bearer ") else None
            return f"Bearer {self._token(tuple(sorted(wanted)), rejected)}"
        if "basic" in by_scheme:
            if self.credential is None:
                raise self._needs_credentials()
            with self._lock:
                self._scheme = "basic"
            return self._basic()
        raise Unauthorized(
            f"{self.host} refused the request (401) without a usable challenge",
            status=401,
        )

    def rejected(self) -> Unauthorized:
        """The error for a 401 that persists after authenticating."""
        if self.credential is None:
            return self._needs_credentials()
        return Unauthorized(
            f"{self.host} rejected the credentials of user {self.credential.username!r}"
            f" from {self.credential.source or 'the given credentials'} (401)",
            status=401,
            hint="check the username and password",
        )

    def _needs_credentials(self) -> Unauthorized:
        return Unauthorized(
            f"{self.host} requires credentials and none were given (401)",
            status=401,
            hint="give credentials for this registry (docker config.json, or the config's"
            " registries: usernameEnv/passwordEnv, dockerConfig or gcrKeyPath)",
        )

    def _basic(self) -> str:
        assert self.credential is not None
        raw = f"{self.credential.username}:{self.credential.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _token(self, scopes: tuple[str, ...], rejected: str | None = None) -> str:
        """A valid token for ``scopes``: cached, or fetched by exactly one thread.

        ``rejected`` is the token the registry just refused; a cached token equal to it
        is not reused (another thread may already have replaced it, and that one is).
        """
        with self._lock:
            cached = self._tokens.get(scopes)
            if cached and cached[1] > time.monotonic() and cached[0] != rejected:
                return cached[0]
            gate = self._inflight.setdefault(scopes, threading.Lock())
        with gate:
            with self._lock:
                cached = self._tokens.get(scopes)
                if cached and cached[1] > time.monotonic() and cached[0] != rejected:
                    return cached[0]
            token, lifetime = self._fetch_token(scopes)
            with self._lock:
                expiry = time.monotonic() + max(lifetime - EXPIRY_MARGIN, 1)
                self._tokens[scopes] = (token, expiry)
            return token

    def _fetch_token(self, scopes: tuple[str, ...]) -> tuple[str, int]:
        realm = self._bearer_params["realm"]
        service = self._bearer_params.get("service", "")
        cred = self.credential
        headers = {"Accept": "application/json"}
        if cred is not None and cred.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": cred.identity_token,
                "service": service,
                "scope": " ".join(scopes),
                "client_id": "bmsync",
            }
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            resp = self._transport.request(
                "POST", realm, headers=headers, data=urlencode(form).encode(), stream=True
            )
        else:
            query: list[tuple[str, str]] = []
            if service:
                query.append(("service", service))
            query.extend(("scope", s) for s in scopes)
            if cred is not None:
                query.append(("account", cred.username))
                headers["Authorization"] = self._basic()
            sep = "&" if urlsplit(realm).query else "?"
            url = realm + (sep + urlencode(query) if query else "")
            resp = self._transport.request("GET", url, headers=headers, stream=True)
        log.debug("token for %s scopes=%s -> %d", self.host, " ".join(scopes), resp.status_code)
        if resp.status_code in (401, 403):
            resp.close()
            if cred is None:
                raise self._needs_credentials()
            raise Unauthorized(
                f"token server {redact_url(realm)} rejected the credentials of user"
                f" {cred.username!r} from {cred.source or 'the given credentials'}"
                f" ({resp.status_code})",
                status=resp.status_code,
                hint="check the username and password",
            )
        if resp.status_code != 200:
            resp.close()
            raise RegistryError(
                f"token server {redact_url(realm)} answered {resp.status_code}",
                status=resp.status_code,
                method=resp.request.method if resp.request else None,
                url=redact_url(realm),
            )
        body = read_limited(resp, MAX_TOKEN_BODY, f"token answer from {redact_url(realm)}")
        try:
            data = json.loads(body)
        except ValueError:
            raise ProtocolError(f"token server {redact_url(realm)} sent invalid JSON") from None
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise ProtocolError(f"token server {redact_url(realm)} sent no token")
        lifetime = data.get("expires_in", DEFAULT_TOKEN_LIFETIME)
        if not isinstance(lifetime, int) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        return token, lifetime
