"""Object storage for the air gap: one interface, two backends (DESIGN.md §6).

``s3://bucket/prefix`` goes through one shared boto3 client (any S3 endpoint: the
``endpoint_url`` argument or ``AWS_ENDPOINT_URL``, standard AWS environment and
profiles; path-style addressing for on-premises servers; standard retries; checksums
only when required, so non-AWS servers work). ``file:///path`` is the embedded default:
a directory, no server.

Both offer: small objects read and written whole (with conditional writes: create only
if absent, replace only if unchanged), large files uploaded and downloaded with
progress, resumable in both directions, heads, listings and deletes. Keys are relative
to the URL's prefix. Every error names the URL and key; credentials never appear.

S3 uploads are multipart with a tuned part size and concurrency; each part carries its
``Content-MD5`` and the final ETag is compared with the one computed locally (md5 of
the parts' md5s, then ``-N``). An interrupted upload is resumed: parts already on the
server whose ETag matches the local part are kept. Downloads resume with ranged GETs
pinned to the object's ETag (``If-Match``), so a replaced object is never stitched.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from pipeline.errors import (
    BmsyncError,
    Conflict,
    CredentialError,
    IntegrityError,
    NotFound,
    TransportError,
    UsageError,
)

log = logging.getLogger("bmsync.objstore")

CHUNK = 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
PART_CONCURRENCY = 8
RANGE_SIZE = 8 * 1024 * 1024  # a download's ranged GETs, RANGE_STREAMS at once
RANGE_STREAMS = 4
MAX_SMALL_OBJECT = 64 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None  # without quotes


class ObjectStore(Protocol):
    url: str

    def get_bytes(self, key: str, *, limit: int = MAX_SMALL_OBJECT) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when absent."""

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        """Write an object whole; returns its ETag. Conflict when the condition fails."""

    def head(self, key: str) -> ObjectInfo | None: ...

    def upload_file(self, key: str, path: Path, *,
                    on_bytes: Callable[[int], None] | None = None) -> ObjectInfo: ...

    def download(self, key: str, dest: Path, *, info: ObjectInfo,
                 on_bytes: Callable[[int], None] | None = None,
                 on_data: Callable[[bytes], None] | None = None) -> None:
        """Append the object to ``dest`` from its current size on (resume), pinned to
        ``info.etag``; raises Conflict when the object changed meanwhile. ``on_data``
        sees every new chunk (to hash while downloading)."""

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def pending_uploads(self, prefix: str = "") -> list[str]:
        """Keys with an unfinished multipart upload (always empty for file://)."""


def open_store(url: str, *, endpoint_url: str | None = None) -> ObjectStore:
    """An object store for ``s3://bucket[/prefix]`` or ``file:///path``."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"{url}: a file:// URL has no host (write file:///path)")
        return FileStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise UsageError(f"{url}: no bucket (write s3://BUCKET/PREFIX)")
        return S3Store(parts.netloc, parts.path.strip("/"), endpoint_url=endpoint_url)
    raise UsageError(f"{url}: object storage URLs are s3://BUCKET/PREFIX or file:///PATH")


def _append(src: Any, dest: Path, on_bytes: Callable[[int], None] | None,
            on_data: Callable[[bytes], None] | None = None) -> None:
    """Append everything ``src`` reads to ``dest``, then fsync (a resumable partial)."""
    with open(dest, "ab") as out:
        while chunk := src.read(CHUNK * 8):
            out.write(chunk)
            if on_data:
                on_data(chunk)
            if on_bytes:
                on_bytes(len(chunk))
        out.flush()
        os.fsync(out.fileno())


# -- file:// --------------------------------------------------------------------------------


class FileStore:
    """A directory standing in for a bucket. ETags are the md5 of the content."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"file://{root}"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise UsageError(f"{self.url}: invalid key {key!r}")
        return self.root / key

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".bmsync-lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def get_bytes(self, key: str, *, limit: int = MAX_SMALL_OBJECT) -> tuple[bytes, str] | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TransportError(f"{self.url}/{key}: cannot read: {e.strerror}") from None
        if len(data) > limit:
            raise IntegrityError(f"{self.url}/{key} is over the {limit}-byte limit")
        return data, hashlib.md5(data).hexdigest()

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        from pipeline.store import atomic_write

        path = self._path(key)
        with self._locked():
            if if_none_match or if_match is not None:
                current = self.get_bytes(key)
                if if_none_match and current is not None:
                    raise Conflict(f"{self.url}/{key} already exists")
                if if_match is not None and (current is None or current[1] != if_match):
                    raise Conflict(f"{self.url}/{key} changed since it was read")
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        return hashlib.md5(data).hexdigest()

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, f"{int(st.st_mtime_ns)}-{st.st_size}")

    def upload_file(self, key: str, path: Path, *,
                    on_bytes: Callable[[int], None] | None = None) -> ObjectInfo:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A fixed name: a publish killed mid-copy leaves a partial the next one replaces.
        tmp = target.parent / f".{target.name}.partial"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK * 8):
                    out.write(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        info = self.head(key)
        assert info is not None
        return info

    def download(self, key: str, dest: Path, *, info: ObjectInfo,
                 on_bytes: Callable[[int], None] | None = None,
                 on_data: Callable[[bytes], None] | None = None) -> None:
        now = self.head(key)
        if now is None:
            raise NotFound(f"{self.url}/{key} is gone")
        if now.etag != info.etag:
            raise Conflict(f"{self.url}/{key} changed during the download")
        offset = dest.stat().st_size if dest.exists() else 0
        with open(self._path(key), "rb") as src:
            src.seek(offset)
            _append(src, dest, on_bytes, on_data)

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                key = str(p.relative_to(self.root))
                st = p.stat()
                out.append(ObjectInfo(key, st.st_size, f"{int(st.st_mtime_ns)}-{st.st_size}"))
        return out

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # Folders are not objects: one emptied by the delete goes too (not the root).
        with contextlib.suppress(OSError):
            if path.parent != self.root:
                path.parent.rmdir()

    def pending_uploads(self, prefix: str = "") -> list[str]:
        return []


# -- s3:// ----------------------------------------------------------------------------------


_clients: dict[str | None, Any] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint_url: str | None = None) -> Any:
    """The one shared boto3 client (boto3 clients are thread-safe) per endpoint."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    with _clients_lock:
        client = _clients.get(endpoint)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 5},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=PART_CONCURRENCY * 2,
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint, config=config,
                                    region_name=session.region_name or "us-east-1")
            _clients[endpoint] = client
        return client


class S3Store:
    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._endpoint = endpoint_url
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(self._endpoint)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, e: Exception, key: str, what: str) -> BmsyncError:
        """One line naming the URL and key and what to do; never a credential."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"{self.url}/{key}" if key else self.url
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",):
                return NotFound(f"{where}: bucket {self.bucket} does not exist",
                                hint="create it, or check the URL")
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFound(f"{where}: no such object")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                        "ExpiredToken", "InvalidToken") or status in (401, 403):
                return CredentialError(
                    f"{where}: {what} refused: {code or status}",
                    hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile",
                )
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return Conflict(f"{where} changed since it was read")
            return TransportError(f"{where}: {what} failed: {code or status}")
        if isinstance(e, NoCredentialsError):
            return CredentialError(f"{where}: no AWS credentials",
                                   hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if isinstance(e, BotoCoreError):
            return TransportError(f"{where}: {what} failed: {type(e).__name__}",
                                  hint="check --endpoint-url and that the server is up")
        return TransportError(f"{where}: {what} failed: {type(e).__name__}")

    def _call(self, key: str, what: str, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key, what) from None

    def get_bytes(self, key: str, *, limit: int = MAX_SMALL_OBJECT) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            err = self._error(e, key, "read")
            if isinstance(err, NotFound) and "bucket" not in err.message:
                return None
            raise err from None
        except Exception as e:  # noqa: BLE001 - botocore's own tree, mapped here
            raise self._error(e, key, "read") from None
        if resp.get("ContentLength", 0) > limit:
            resp["Body"].close()
            raise IntegrityError(f"{self.url}/{key} is over the {limit}-byte limit")
        data = resp["Body"].read(limit + 1)
        return data, str(resp.get("ETag", "")).strip('"')

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        args: dict[str, Any] = {
            "Bucket": self.bucket, "Key": self._key(key), "Body": data,
            "ContentMD5": base64.b64encode(hashlib.md5(data).digest()).decode(),
        }
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = f'"{if_match}"'
        resp = self._call(key, "write", lambda: self.client.put_object(**args))
        return str(resp.get("ETag", "")).strip('"')

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            err = self._error(e, key, "read")
            if isinstance(err, NotFound) and "bucket" not in err.message:
                return None
            raise err from None
        except Exception as e:  # noqa: BLE001
            raise self._error(e, key, "read") from None
        return ObjectInfo(key, int(resp["ContentLength"]), str(resp.get("ETag", "")).strip('"'))

    def upload_file(self, key: str, path: Path, *,
                    on_bytes: Callable[[int], None] | None = None) -> ObjectInfo:
        size = path.stat().st_size
        if size <= PART_SIZE:
            data = path.read_bytes()
            etag = self.put_bytes(key, data)
            if on_bytes:
                on_bytes(size)
            if etag and etag != hashlib.md5(data).hexdigest():
                raise IntegrityError(f"{self.url}/{key}: the server stored other bytes (ETag"
                                     f" {etag})")
            return ObjectInfo(key, size, etag)
        return self._multipart(key, path, size, on_bytes)

    def _multipart(self, key: str, path: Path, size: int,
                   on_bytes: Callable[[int], None] | None) -> ObjectInfo:
        full = self._key(key)
        upload_id, done = self._resumable(key, path, size)
        if upload_id is None:
            resp = self._call(key, "start upload", lambda: self.client.create_multipart_upload(
                Bucket=self.bucket, Key=full))
            upload_id = resp["UploadId"]
        offsets = list(range(0, size, PART_SIZE))
        results: dict[int, tuple[str, bytes]] = {}
        lock = threading.Lock()
        fd = os.open(path, os.O_RDONLY)

        def send(number: int, offset: int) -> None:
            length = min(PART_SIZE, size - offset)
            data = os.pread(fd, length, offset)
            md5 = hashlib.md5(data).digest()
            if number in done and done[number] == md5.hex():
                with lock:
                    results[number] = (md5.hex(), md5)
                if on_bytes:
                    on_bytes(length)
                return
            resp = self._call(key, f"upload part {number}", lambda: self.client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data,
                ContentMD5=base64.b64encode(md5).decode()))
            etag = str(resp.get("ETag", "")).strip('"')
            if etag and etag != md5.hex():
                raise IntegrityError(f"{self.url}/{key}: part {number} stored as {etag},"
                                     f" not {md5.hex()}")
            with lock:
                results[number] = (md5.hex(), md5)
            if on_bytes:
                on_bytes(length)

        try:
            with ThreadPoolExecutor(PART_CONCURRENCY, thread_name_prefix="s3-part") as pool:
                for f in [pool.submit(send, n, off) for n, off in enumerate(offsets, 1)]:
                    f.result()
        finally:
            os.close(fd)
        parts = [{"PartNumber": n, "ETag": f'"{results[n][0]}"'} for n in sorted(results)]
        resp = self._call(key, "complete upload", lambda: self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}))
        expected = (hashlib.md5(b"".join(results[n][1] for n in sorted(results))).hexdigest()
                    + f"-{len(results)}")
        etag = str(resp.get("ETag", "")).strip('"')
        if etag and etag != expected:
            raise IntegrityError(f"{self.url}/{key}: the server's ETag {etag} is not the"
                                 f" {expected} computed locally")
        return ObjectInfo(key, size, etag or expected)

    def _resumable(self, key: str, path: Path, size: int) -> tuple[str | None, dict[int, str]]:
        """An unfinished upload of ``key`` to resume (its parts' md5 by number); others
        for the same key are aborted."""
        full = self._key(key)
        resp = self._call(key, "list uploads", lambda: self.client.list_multipart_uploads(
            Bucket=self.bucket, Prefix=full))
        uploads = [u for u in resp.get("Uploads", []) if u.get("Key") == full]
        uploads.sort(key=lambda u: u.get("Initiated") or 0)
        keep = uploads[-1]["UploadId"] if uploads else None
        for u in uploads[:-1]:
            self._abort(key, u["UploadId"])
        if keep is None:
            return None, {}
        done: dict[int, str] = {}
        try:
            listed = self.client.list_parts(Bucket=self.bucket, Key=full, UploadId=keep)
        except Exception:  # noqa: BLE001 - an upload we cannot list is started afresh
            self._abort(key, keep)
            return None, {}
        for p in listed.get("Parts", []):
            expected = min(PART_SIZE, size - (p["PartNumber"] - 1) * PART_SIZE)
            if p.get("Size") == expected:
                done[int(p["PartNumber"])] = str(p.get("ETag", "")).strip('"')
        log.info("%s/%s: resuming an upload with %d parts already sent", self.url, key,
                 len(done))
        return keep, done

    def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(Exception):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key),
                                               UploadId=upload_id)

    def download(self, key: str, dest: Path, *, info: ObjectInfo,
                 on_bytes: Callable[[int], None] | None = None,
                 on_data: Callable[[bytes], None] | None = None) -> None:
        offset = dest.stat().st_size if dest.exists() else 0
        if offset >= info.size:
            return
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        try:
            if info.size - offset > 2 * RANGE_SIZE:
                self._ranged(key, dest, offset, info, on_bytes, on_data)
                return
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
            if info.etag:
                args["IfMatch"] = f'"{info.etag}"'
            if offset:
                args["Range"] = f"bytes={offset}-"
            resp = self._call(key, "read", lambda: self.client.get_object(**args))
            _append(resp["Body"], dest, on_bytes, on_data)
        except (BotoCoreError, HTTPError, OSError) as e:
            kept = dest.stat().st_size if dest.exists() else 0
            raise TransportError(
                f"{self.url}/{key}: connection lost during the download"
                f" ({type(e).__name__}); {kept} bytes kept",
                hint="run the same command again: it resumes",
            ) from None

    def _ranged(self, key: str, dest: Path, offset: int, info: ObjectInfo,
                on_bytes: Callable[[int], None] | None,
                on_data: Callable[[bytes], None] | None) -> None:
        """Several ranged GETs at once (each pinned to the ETag), written in order.

        The partial file stays a contiguous prefix of the object, so an interruption
        resumes from its size as with one stream; memory holds at most the ranges in
        flight.
        """
        ranges = iter(range(offset, info.size, RANGE_SIZE))

        def get(start: int) -> bytes:
            end = min(start + RANGE_SIZE, info.size) - 1
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key),
                                    "Range": f"bytes={start}-{end}"}
            if info.etag:
                args["IfMatch"] = f'"{info.etag}"'
            resp = self._call(key, "read", lambda: self.client.get_object(**args))
            data: bytes = resp["Body"].read()
            if len(data) != end - start + 1:
                raise TransportError(f"{self.url}/{key}: short range {start}-{end}"
                                     f" ({len(data)} bytes)", hint="run it again: it resumes")
            return data

        with ThreadPoolExecutor(RANGE_STREAMS, thread_name_prefix="s3-range") as pool:
            pending: deque[Future[bytes]] = deque(
                pool.submit(get, start) for start in itertools.islice(ranges, RANGE_STREAMS + 1)
            )
            with open(dest, "ab") as out:
                try:
                    while pending:
                        data = pending.popleft().result()
                        out.write(data)
                        if on_data:
                            on_data(data)
                        if on_bytes:
                            on_bytes(len(data))
                        nxt = next(ranges, None)
                        if nxt is not None:
                            pending.append(pool.submit(get, nxt))
                finally:
                    for f in pending:
                        f.cancel()
                    out.flush()
                    os.fsync(out.fileno())

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        out: list[ObjectInfo] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                args["ContinuationToken"] = token
            resp = self._list_page(prefix, args)
            strip = len(self.prefix) + 1 if self.prefix else 0
            for o in resp.get("Contents", []):
                out.append(ObjectInfo(o["Key"][strip:], int(o["Size"]),
                                      str(o.get("ETag", "")).strip('"')))
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return out

    def _list_page(self, prefix: str, args: dict[str, Any]) -> Any:
        return self._call(prefix, "list", lambda: self.client.list_objects_v2(**args))

    def delete(self, key: str) -> None:
        self._call(key, "delete", lambda: self.client.delete_object(
            Bucket=self.bucket, Key=self._key(key)))

    def pending_uploads(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else self.prefix
        resp = self._call(prefix, "list uploads", lambda: self.client.list_multipart_uploads(
            Bucket=self.bucket, Prefix=full))
        return [u["Key"] for u in resp.get("Uploads", [])]
