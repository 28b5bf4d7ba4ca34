"""HTTP transport shared by every registry request: sessions, TLS, proxies, retries.

One ``requests.Session`` per worker thread (sessions are not documented as thread-safe),
created lazily, with cookies refused (some registries set CSRF cookies meant for
browsers) and redirects never followed automatically: the caller follows them itself so
that ``Authorization`` is never sent to another host (blob storage redirects).

Proxies come from the environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``), as
``requests`` reads them. TLS is verified against the system bundle plus ``cacert``
when given; plain http is used only for an explicit ``http://`` endpoint.

Retries follow :class:`RetryPolicy`: idempotent requests retry on connection errors,
429 (honouring ``Retry-After`` in seconds or as an HTTP date) and 5xx with bounded
exponential backoff; 400, 401, 403 and 404 are answered after a single attempt.
"""

from __future__ import annotations

import atexit
import email.utils
import http.cookiejar
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.adapters

from pipeline.errors import ProtocolError, TLSError, TransportError

log = logging.getLogger("bmsync.registry")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry; ``max_delay`` also caps ``Retry-After``."""

    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 30.0
    connect_timeout: float = 10.0
    read_timeout: float = 120.0

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based): exponential with jitter."""
        delay: float = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return delay * (0.5 + random.random() / 2)


def retry_after(value: str | None, policy: RetryPolicy) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    Returns None when the header is absent or unreadable; caps at ``policy.max_delay``.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), policy.max_delay)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when.timestamp() - time.time(), policy.max_delay))


def redact_url(url: str) -> str:
    """The URL without userinfo and query string (upload state, tokens in presigned URLs)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if ":" in (parts.hostname or ""):
        netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _RefuseCookies(http.cookiejar.DefaultCookiePolicy):
    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:  # noqa: ARG002
        return False


_bundle_lock = threading.Lock()
_bundles: dict[str, str] = {}


def _ca_bundle_with(cacert: str) -> str:
    """Path of a CA bundle holding the system CAs plus ``cacert`` (made once per process).

    ``--cacert`` adds a CA; it does not replace the public ones, which a proxy or a
    registry with a public certificate still needs.
    """
    with _bundle_lock:
        if cacert in _bundles:
            return _bundles[cacert]
        try:
            with open(cacert, "rb") as f:
                extra = f.read()
        except OSError as e:
            raise TLSError(
                f"cannot read CA file {cacert}: {e.strerror}", hint="check the --cacert path"
            ) from None
        if b"-----BEGIN CERTIFICATE-----" not in extra:
            raise TLSError(f"CA file {cacert} holds no PEM certificate")
        # The bundle requests would use without --cacert: the environment's, else certifi's.
        system = (
            os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("CURL_CA_BUNDLE")
            or requests.utils.DEFAULT_CA_BUNDLE_PATH
        )
        base = b""
        if system and os.path.exists(system):
            with open(system, "rb") as f:
                base = f.read()
        fd, path = tempfile.mkstemp(prefix="bmsync-ca-", suffix=".pem")
        with os.fdopen(fd, "wb") as f:
            f.write(base + b"\n" + extra + b"\n")
        atexit.register(_remove_quietly, path)
        _bundles[cacert] = path
        return path


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Transport:
    """Sends requests with retries; thread-safe (one session per thread).

    ``cacert`` is a PEM file added to the trusted CAs. ``pool_size`` should be at least
    the number of threads that share this transport.
    """

    def __init__(
        self,
        *,
        cacert: str | None = None,
        policy: RetryPolicy | None = None,
        pool_size: int = 16,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._verify: str | bool = _ca_bundle_with(cacert) if cacert else True
        self._pool_size = pool_size
        self._local = threading.local()
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"Transport(verify={'custom CA' if self._verify is not True else 'system'})"

    def session(self) -> requests.Session:
        s: requests.Session | None = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.cookies.set_policy(_RefuseCookies())
            s.verify = self._verify
            adapter = requests.adapters.HTTPAdapter(
                pool_connections=4, pool_maxsize=self._pool_size, max_retries=0
            )
            s.mount("https://", adapter)
            s.mount("http://", adapter)
            self._local.session = s
        return s

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        data: bytes | Iterable[bytes] | None = None,
        idempotent: bool = True,
    ) -> requests.Response:
        """Send one request, retrying per policy; never follows redirects.

        Returns the response for any status that is not retried (the caller maps
        statuses to errors), or the last retryable response when the budget is spent.
        Connection and TLS failures raise TransportError / TLSError naming the host
        (callers add which image or blob they were after).
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self.session().request(
                    method,
                    url,
                    headers=dict(headers or {}),
                    data=data,
                    stream=stream,
                    allow_redirects=False,
                    # Explicit, so REQUESTS_CA_BUNDLE in the environment cannot replace it.
                    verify=self._verify,
                    timeout=(self.policy.connect_timeout, self.policy.read_timeout),
                )
            except requests.exceptions.SSLError as e:
                if "wrong version number" in str(e):
                    raise TLSError(
                        f"{_host(url)} does not speak TLS",
                        hint="if the registry serves plain http, write the endpoint as http://",
                    ) from None
                raise TLSError(
                    f"TLS certificate of {_host(url)} not trusted: {_ssl_reason(e)}",
                    hint="trust the CA that signed it: cacert: in the config's registries, or"
                    " --cacert where a command has it",
                ) from None
            except requests.exceptions.ProxyError as e:
                proxy = _proxy_for(url)
                if "407" in str(e):
                    raise _proxy_auth_error(proxy, url) from None
                if idempotent and attempt < self.policy.attempts:
                    self._sleep(self.policy.backoff(attempt))
                    continue
                raise TransportError(
                    f"cannot reach proxy {proxy} on the way to {_host(url)}",
                    hint="check HTTPS_PROXY / HTTP_PROXY, or list the registry in NO_PROXY",
                ) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
                if idempotent and attempt < self.policy.attempts:
                    delay = self.policy.backoff(attempt)
                    log.debug(
                        "%s %s: %s; retry %d in %.2fs",
                        method, redact_url(url), type(e).__name__, attempt, delay,
                    )
                    self._sleep(delay)
                    continue
                raise TransportError(
                    f"cannot reach {_host(url)}: {_conn_reason(e)}",
                    hint="check that the registry is up and the address, port and proxy settings",
                ) from None
            if resp.status_code in RETRY_STATUSES and idempotent and attempt < self.policy.attempts:
                wait = None
                if resp.status_code in (429, 503):
                    wait = retry_after(resp.headers.get("Retry-After"), self.policy)
                if wait is None:
                    wait = self.policy.backoff(attempt)
                log.debug(
                    "%s %s: %d; retry %d in %.2fs",
                    method, redact_url(url), resp.status_code, attempt, wait,
                )
                resp.close()
                self._sleep(wait)
                continue
            log.debug("%s %s -> %d", method, redact_url(url), resp.status_code)
            if resp.status_code == 407:
                resp.close()
                raise _proxy_auth_error(_proxy_for(url), url)
            return resp


def _proxy_for(url: str) -> str:
    """The proxy requests uses for ``url`` (from the environment), without credentials."""
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    return redact_url(proxy) if proxy else "(none)"


def _proxy_auth_error(proxy: str, url: str) -> TransportError:
    return TransportError(
        f"proxy {proxy} refused to forward to {_host(url)}: proxy authentication required (407)",
        hint="put the proxy's user and password in HTTPS_PROXY / HTTP_PROXY"
        " as http://USER:PASSWORD@HOST:PORT",
    )


def _host(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2]


def _ssl_reason(e: Exception) -> str:
    text = str(e)
    markers = ("certificate verify failed", "hostname mismatch", "self-signed", "wrong version")
    for marker in markers:
        if marker in text:
            start = text.find(marker)
            end = text.find("(_ssl.c", start)
            return text[start:end if end > 0 else None].strip(" ()")
    return "TLS handshake failed"


def _conn_reason(e: Exception) -> str:
    text = str(e)
    if "Connection refused" in text:
        return "connection refused"
    if "Read timed out" in text or isinstance(e, requests.exceptions.ReadTimeout):
        return "timed out waiting for a response"
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return "timed out connecting"
    if "ProxyError" in type(e).__name__ or "Unable to connect to proxy" in text:
        return "proxy refused the connection"
    if "Name or service not known" in text or "getaddrinfo" in text:
        return "host name not found"
    if "reset" in text.lower():
        return "connection reset"
    if "RemoteDisconnected" in text or "closed connection" in text:
        return "connection closed by the server"
    return type(e).__name__


def read_limited(resp: requests.Response, limit: int, what: str) -> bytes:
    """The body of a streamed response, refusing more than ``limit`` bytes.

    Manifests, token answers and error bodies are small by contract; a larger body is a
    broken or hostile server, and reading it whole would let it exhaust memory.
    """
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        resp.close()
        raise ProtocolError(f"{what} is {int(declared)} bytes, over the {limit}-byte limit")
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in resp.iter_content(64 * 1024):
            total += len(chunk)
            if total > limit:
                raise ProtocolError(f"{what} is over the {limit}-byte limit")
            chunks.append(chunk)
    except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
        raise TransportError(f"connection lost while reading {what}: {_conn_reason(e)}") from None
    finally:
        resp.close()
    return b"".join(chunks)
