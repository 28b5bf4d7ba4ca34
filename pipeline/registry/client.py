"""A client of the OCI distribution API for one registry.

Reads manifests (the four media types of :mod:`pipeline.manifest`), streams blobs into
a :class:`pipeline.store.BlobSink` (resuming with ``Range`` where the sink already holds
a prefix), lists tags (following ``Link`` pagination), and authenticates through
:class:`pipeline.registry.auth.Authenticator`.

Status handling follows STYLE.md rule 5: only 404 means "absent" (:class:`NotFound`);
401, 403, 429 and 5xx raise. Redirects are followed here, never by ``requests``, and
``Authorization`` is sent only to the registry's own origin.

Thread-safe: one client serves every worker thread of a pull.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

from pipeline.errors import (
    BmsyncError,
    ConnectionLost,
    Forbidden,
    IntegrityError,
    NotFound,
    ProtocolError,
    RegistryError,
    ServerError,
    TooManyRequests,
    TransportError,
    Unauthorized,
)
from pipeline.manifest import (
    ACCEPT,
    IMAGE_TYPES,
    INDEX_TYPES,
    MAX_MANIFEST_SIZE,
    Manifest,
    parse_manifest,
)
from pipeline.registry.auth import Authenticator
from pipeline.registry.credentials import Credential
from pipeline.registry.transport import Transport, read_limited, redact_url, retry_after
from pipeline.store import BlobSink

log = logging.getLogger("bmsync.registry")

CHUNK = 1024 * 1024
MAX_ERROR_BODY = 64 * 1024
MAX_TAGS_PAGE = 8 * 1024 * 1024
MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


class ResendNeeded(TransportError):
    """A streamed body was refused before it was read (token refresh): start it again."""


@dataclass(frozen=True)
class ManifestHead:
    """What a HEAD on a manifest tells: enough to decide whether to fetch it."""

    digest: str | None
    media_type: str | None
    size: int | None


class RegistryClient:
    """Distribution API client for one registry host.

    ``host`` is the registry's name in references (``gcr.io``, ``docker.io``);
    ``endpoint`` overrides where it is reached (``http://127.0.0.1:5101``), otherwise
    ``https://<api host>``.
    """

    def __init__(
        self,
        host: str,
        *,
        endpoint: str | None = None,
        credential: Credential | None = None,
        transport: Transport | None = None,
        api_host: str | None = None,
    ) -> None:
        self.host = host
        self.base_url = (endpoint or f"https://{api_host or host}").rstrip("/")
        self.transport = transport or Transport()
        self.auth = Authenticator(host, credential, self.transport)

    def __repr__(self) -> str:
        return f"RegistryClient({self.host} at {self.base_url})"

    # -- reads ---------------------------------------------------------------------------

    def get_manifest(self, repository: str, identifier: str, *, what: str = "") -> Manifest:
        """Fetch a manifest by tag or digest; verify it against the digest we asked for.

        The digest of the result is computed from the bytes received; when the
        registry sends ``Docker-Content-Digest`` it must agree.
        """
        path = f"/v2/{repository}/manifests/{identifier}"
        resp = self._send(
            "GET", path, repository, headers={"Accept": ACCEPT}, stream=True
        )
        if resp.status_code != 200:
            self._raise_for(resp, what or f"{self.host}/{repository}", f"manifest {identifier}")
        raw = read_limited(resp, MAX_MANIFEST_SIZE, f"manifest {identifier} of {repository}")
        expected = identifier if ":" in identifier else None
        manifest = parse_manifest(raw, resp.headers.get("Content-Type"), expected_digest=expected)
        header_digest = resp.headers.get("Docker-Content-Digest")
        if header_digest and header_digest != manifest.digest and header_digest.startswith(
            manifest.digest.split(":", 1)[0] + ":"
        ):
            raise IntegrityError(
                f"{what or repository}: registry says manifest {identifier} is {header_digest}"
                f" but its bytes hash to {manifest.digest}",
                expected=header_digest,
                actual=manifest.digest,
            )
        return manifest

    def head_manifest(self, repository: str, identifier: str, *, what: str = "") -> ManifestHead:
        """HEAD a manifest: its digest without its body (one request when cached)."""
        path = f"/v2/{repository}/manifests/{identifier}"
        resp = self._send("HEAD", path, repository, headers={"Accept": ACCEPT})
        if resp.status_code != 200:
            self._raise_for(resp, what or f"{self.host}/{repository}", f"manifest {identifier}")
        length = resp.headers.get("Content-Length")
        ctype = resp.headers.get("Content-Type")
        resp.close()
        return ManifestHead(
            digest=resp.headers.get("Docker-Content-Digest"),
            media_type=ctype.split(";")[0].strip() if ctype else None,
            size=int(length) if length and length.isdigit() else None,
        )

    def manifest_digest(self, repository: str, identifier: str, *, what: str = "") -> str:
        """The digest ``identifier`` resolves to: one HEAD, and a GET (hashing the bytes
        received) when the registry sends no ``Docker-Content-Digest``.

        NotFound when it is absent.
        """
        digest = self.head_manifest(repository, identifier, what=what).digest
        if digest is None:
            digest = self.get_manifest(repository, identifier, what=what).digest
        return digest

    def fetch_blob(
        self, repository: str, digest: str, sink: BlobSink, *, size: int | None, what: str = ""
    ) -> None:
        """Stream a blob into ``sink`` from ``sink.offset`` on.

        Asks for ``Range: bytes=OFFSET-`` when the sink holds a prefix. A 206 must carry
        a ``Content-Range`` starting at that offset (and ending at ``size``); a 200 means
        the server ignored the range, so the sink restarts. A connection lost mid-body
        raises TransportError with the sink keeping what arrived, so a retry resumes.
        The sink checks size and digest; this method checks nothing it cannot know.
        """
        path = f"/v2/{repository}/blobs/{digest}"
        label = f"{what}: " if what else ""
        for _ in range(2):
            headers = {"Accept-Encoding": "identity"}
            offset = sink.offset
            if offset:
                headers["Range"] = f"bytes={offset}-"
            resp = self._send("GET", path, repository, headers=headers, stream=True)
            if resp.status_code == 416 and offset:
                # The partial is as long as (or longer than) the blob: start over.
                resp.close()
                sink.restart()
                continue
            if resp.status_code not in (200, 206):
                self._raise_for(resp, what or f"{self.host}/{repository}", f"blob {digest}")
            if resp.status_code == 206:
                content_range = resp.headers.get("Content-Range")
                if not offset or not self._range_ok(content_range, offset, size):
                    log.debug("blob %s: unusable Content-Range, starting over", digest)
                    resp.close()
                    sink.restart()
                    continue
            elif offset:
                sink.restart()
            self._stream(resp, sink, label, digest)
            return
        raise ProtocolError(f"{label}blob {digest}: the registry answers ranged requests wrongly")

    def list_tags(self, repository: str, *, what: str = "", page_size: int = 1000) -> list[str]:
        """Every tag of ``repository``, following ``Link: <...>; rel="next"`` pages.

        ``page_size`` is the ``n`` asked for; registries may send fewer per page.
        """
        return self._list_pages(
            f"/v2/{repository}/tags/list?n={page_size}", "tags", repository,
            [f"repository:{repository}:pull"], what or f"{self.host}/{repository}", "tag list",
        )

    def list_repositories(self, *, page_size: int = 1000) -> list[str]:
        """Every repository of the registry (``/v2/_catalog``, paginated)."""
        return self._list_pages(
            f"/v2/_catalog?n={page_size}", "repositories", "", ["registry:catalog:*"],
            self.host, "repository catalog",
        )

    def _list_pages(self, path: str | None, key: str, repository: str, scopes: list[str],
                    what: str, noun: str) -> list[str]:
        items: list[str] = []
        seen: set[str] = set()
        while path:
            if path in seen:
                raise ProtocolError(f"{what}: {noun} pagination loops")
            seen.add(path)
            resp = self._send("GET", path, repository, stream=True, scopes=scopes)
            if resp.status_code != 200:
                self._raise_for(resp, what, noun)
            link = resp.headers.get("Link", "")
            body = read_limited(resp, MAX_TAGS_PAGE, f"{noun} of {what}")
            try:
                page = json.loads(body)
            except ValueError:
                raise ProtocolError(f"{what}: {noun} is not JSON") from None
            values = page.get(key) if isinstance(page, dict) else None
            items.extend(t for t in values or [] if isinstance(t, str))
            match = _LINK_NEXT.search(link)
            path = None
            if match:
                nxt = urljoin(self.base_url + "/", match.group(1))
                if _origin(nxt) != _origin(self.base_url):
                    raise ProtocolError(f"{self.host}: {noun} links to another host")
                parts = urlsplit(nxt)
                path = parts.path + (f"?{parts.query}" if parts.query else "")
        return items

    # -- writes --------------------------------------------------------------------------

    @staticmethod
    def push_scopes(repository: str, mount_from: str | None = None) -> list[str]:
        scopes = [f"repository:{repository}:pull,push"]
        if mount_from and mount_from != repository:
            scopes.append(f"repository:{mount_from}:pull")
        return scopes

    def blob_exists(self, repository: str, digest: str, *, push: bool = True) -> bool:
        """HEAD a blob: True on 200, False on 404; anything else raises."""
        scopes = self.push_scopes(repository) if push else None
        resp = self._send("HEAD", f"/v2/{repository}/blobs/{digest}", repository, scopes=scopes)
        resp.close()
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        self._raise_for(resp, f"{self.host}/{repository}", f"blob {digest}")
        return False  # not reached

    def holds(self, repository: str, digest: str, media_type: str, *,
              push: bool = False) -> bool:
        """Whether ``repository`` holds ``digest``: manifests are asked for as manifests
        (distribution links them apart from layers: a blob HEAD on one answers 404),
        everything else as a blob. ``push`` asks with the push scope (one token for a
        push's checks and writes)."""
        if media_type in INDEX_TYPES or media_type in IMAGE_TYPES:
            try:
                self.head_manifest(repository, digest)
                return True
            except NotFound:
                return False
        return self.blob_exists(repository, digest, push=push)

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Ask the registry to mount ``digest`` from another repository of its own.

        True when mounted (201). A registry that declines answers 202 with an upload
        session instead, which is cancelled here: the caller uploads. False then.
        """
        path = f"/v2/{repository}/blobs/uploads/?mount={digest}&from={from_repository}"
        resp = self._send("POST", path, repository, idempotent=False,
                          scopes=self.push_scopes(repository, from_repository))
        resp.close()
        if resp.status_code == 201:
            return True
        if resp.status_code == 202:
            location = resp.headers.get("Location")
            if location:
                self._cancel(repository, urljoin(self.base_url + "/", location))
            return False
        self._raise_for(resp, f"{self.host}/{repository}", f"mount of blob {digest}")
        return False  # not reached

    def upload_blob(self, repository: str, digest: str, size: int,
                    chunks: Iterable[bytes] | bytes, *, verify: Callable[[], None]) -> None:
        """Upload one blob: its bytes streamed by ``chunks`` in one PATCH, committed last.

        ``chunks`` given as ``bytes`` (a small blob read whole) goes in the commit itself
        (``PUT ?digest=`` with the body): one request fewer.

        ``verify`` is called after the last chunk went out and before the commit
        (``PUT ?digest=``): it raises when the bytes read locally do not match the
        digest, and the upload session is then cancelled, so the registry never holds
        a blob that failed the local check. Any failure cancels the session; the caller
        may start again with a fresh ``chunks``.
        """
        where = f"{self.host}/{repository}"
        scopes = self.push_scopes(repository)
        resp = self._send("POST", f"/v2/{repository}/blobs/uploads/", repository,
                          scopes=scopes, idempotent=False)
        resp.close()
        if resp.status_code != 202 or "Location" not in resp.headers:
            self._raise_for(resp, where, f"upload of blob {digest}")
        location = urljoin(self.base_url + "/", resp.headers["Location"])
        committed = False
        try:
            if isinstance(chunks, bytes):
                # Small blob, already read and checked: one monolithic PUT carries it.
                verify()
                sep = "&" if urlsplit(location).query else "?"
                resp = self._send(
                    "PUT", "", repository, url=f"{location}{sep}digest={digest}", scopes=scopes,
                    headers={"Content-Type": "application/octet-stream"}, data=chunks,
                    idempotent=False,
                )
                resp.close()
                if resp.status_code not in (201, 204):
                    self._raise_for(resp, where, f"upload of blob {digest}")
                committed = True
                return
            if size:
                resp = self._send(
                    "PATCH", "", repository, url=location, scopes=scopes, idempotent=False,
                    headers={"Content-Type": "application/octet-stream"}, data=chunks,
                )
                resp.close()
                if resp.status_code != 202:
                    self._raise_for(resp, where, f"upload of blob {digest}")
                location = urljoin(location, resp.headers.get("Location", location))
            else:
                for _ in chunks:
                    pass
            verify()
            sep = "&" if urlsplit(location).query else "?"
            resp = self._send(
                "PUT", "", repository, url=f"{location}{sep}digest={digest}", scopes=scopes,
                headers={"Content-Type": "application/octet-stream", "Content-Length": "0"},
                idempotent=False,
            )
            resp.close()
            if resp.status_code not in (201, 204):
                self._raise_for(resp, where, f"commit of blob {digest}")
            committed = True
        finally:
            if not committed:
                self._cancel(repository, location)

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str,
                     *, expected_digest: str) -> None:
        """PUT a manifest by tag or digest; the registry must agree on its digest."""
        where = f"{self.host}/{repository}"
        resp = self._send(
            "PUT", f"/v2/{repository}/manifests/{reference}", repository,
            scopes=self.push_scopes(repository), data=raw,
            headers={"Content-Type": media_type},
        )
        resp.close()
        if resp.status_code not in (200, 201, 204):
            self._raise_for(resp, where, f"manifest {reference}")
        got = resp.headers.get("Docker-Content-Digest")
        if got and got != expected_digest:
            raise IntegrityError(
                f"{where}: registry stored manifest {reference} as {got}, not {expected_digest}",
                expected=expected_digest,
                actual=got,
            )

    def _cancel(self, repository: str, location: str) -> None:
        """Best effort: drop an upload session (a failed cancel is only logged)."""
        try:
            resp = self._send("DELETE", "", repository, url=location,
                              scopes=self.push_scopes(repository), idempotent=False)
            resp.close()
        except BmsyncError as e:
            log.debug("could not cancel upload session: %s", e)

    # -- plumbing ------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        repository: str,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        data: bytes | Iterable[bytes] | None = None,
        scopes: Iterable[str] | None = None,
        url: str | None = None,
        idempotent: bool = True,
    ) -> requests.Response:
        """One authenticated request, answering one 401 challenge and following redirects.

        ``url`` (absolute, e.g. an upload session's Location) replaces ``path``. A body
        given as an iterator cannot be sent twice: a 401 then raises :class:`ResendNeeded`
        after refreshing the token, so the caller restarts what it was doing.
        Redirects keep ``Authorization`` only while they stay on the registry's origin.
        """
        scope_list = list(scopes) if scopes is not None else [f"repository:{repository}:pull"]
        url = url or self.base_url + path
        hdrs = dict(headers or {})
        auth = self.auth.header(scope_list)
        if auth:
            hdrs["Authorization"] = auth
        resp = self.transport.request(method, url, headers=hdrs, stream=stream, data=data,
                                      idempotent=idempotent)
        if resp.status_code == 401:
            challenge = resp.headers.get("WWW-Authenticate")
            resp.close()
            hdrs["Authorization"] = self.auth.answer(challenge, scope_list, sent=auth)
            if data is not None and not isinstance(data, bytes):
                raise ResendNeeded(f"{self.host}: token expired during an upload")
            resp = self.transport.request(method, url, headers=hdrs, stream=stream, data=data,
                                          idempotent=idempotent)
            if resp.status_code == 401:
                resp.close()
                raise self.auth.rejected()
        hops = 0
        while resp.status_code in (301, 302, 303, 307, 308) and "Location" in resp.headers:
            hops += 1
            if hops > MAX_REDIRECTS:
                resp.close()
                raise ProtocolError(f"{self.host}: too many redirects for {redact_url(url)}")
            target = urljoin(url, resp.headers["Location"])
            resp.close()
            if _origin(target) != _origin(url):
                # Blob storage (S3, GCS) authenticates with the signed URL itself; the
                # registry's credentials must not travel there.
                hdrs.pop("Authorization", None)
            if resp.status_code == 303:
                method, data = "GET", None
            url = target
            resp = self.transport.request(method, url, headers=hdrs, stream=stream, data=data,
                                          idempotent=idempotent)
        return resp

    @staticmethod
    def _range_ok(header: str | None, offset: int, size: int | None) -> bool:
        match = _CONTENT_RANGE.match(header or "")
        if not match:
            return False
        start, end, total = int(match.group(1)), int(match.group(2)), match.group(3)
        if start != offset or end < start:
            return False
        if size is not None:
            if end != size - 1:
                return False
            if total != "*" and int(total) != size:
                return False
        return True

    @staticmethod
    def _stream(resp: requests.Response, sink: BlobSink, label: str, digest: str) -> None:
        raw = resp.raw
        try:
            while True:
                chunk = raw.read(CHUNK, decode_content=False)
                if not chunk:
                    break
                sink.write(chunk)
        except (
            urllib3.exceptions.HTTPError,
            requests.exceptions.ConnectionError,
            OSError,
        ) as e:
            raise ConnectionLost(
                f"{label}connection lost while reading blob {digest}"
                f" ({type(e).__name__}); {sink.offset} bytes kept for resuming"
            ) from None
        finally:
            resp.close()

    def _raise_for(self, resp: requests.Response, what: str, noun: str) -> None:
        """Raise the error that ``resp`` (a non-success answer) stands for."""
        status = resp.status_code
        method = resp.request.method if resp.request else None
        url = redact_url(resp.url or self.base_url)
        codes: list[str] = []
        detail = ""
        if method != "HEAD":
            try:
                body = read_limited(resp, MAX_ERROR_BODY, "error body")
            except (ProtocolError, TransportError):
                body = b""
            try:
                payload = json.loads(body) if body else {}
                for err in payload.get("errors") or []:
                    if isinstance(err, dict) and isinstance(err.get("code"), str):
                        codes.append(err["code"])
                        if not detail and isinstance(err.get("message"), str):
                            detail = err["message"][:200]
            except (ValueError, AttributeError):
                pass
        resp.close()
        code_txt = f" {' '.join(codes)}" if codes else ""
        cls: type[RegistryError] = RegistryError
        hint: str | None = None
        if status == 404:
            cls, text = NotFound, f"{noun} not found ({status}{code_txt})"
            hint = "check the image name and tag"
        elif status == 401:
            cls, text = Unauthorized, f"{noun}: unauthorized ({status}{code_txt})"
        elif status == 403:
            cls, text = Forbidden, f"{noun}: access denied ({status}{code_txt})"
            hint = "the credentials lack permission for this repository"
        elif status == 429:
            cls, text = TooManyRequests, f"{noun}: rate-limited by the registry (429) after retries"
            hint = "try again later or lower --concurrency"
        elif status >= 500:
            cls, text = ServerError, f"{noun}: registry error {status}{code_txt} after retries"
        else:
            text = f"{noun}: registry answered {status}{code_txt}"
            if detail:
                text += f": {detail}"
        error = cls(
            f"{what}: {text} ({method} {url})" if status >= 500 else f"{what}: {text}",
            status=status, codes=codes, method=method, url=url, hint=hint,
        )
        # What the registry asked to wait, for callers that retry whole operations.
        error.retry_after = retry_after(resp.headers.get("Retry-After"), self.transport.policy)
        raise error


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (parts.scheme, (parts.hostname or "").lower(), port)
