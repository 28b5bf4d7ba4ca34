"""Read ``bmpackages`` archives without extracting them (DESIGN.md §5).

:func:`open_bundle` accepts a ``.tar.zst``, ``.tar.xz`` or ``.tar`` file, a split
archive (the archive's name or any of its ``.part-NNNN`` files), or an open stream
(a pipe). It reads ``bundle.json`` (the first member) and stops there; what comes next
depends on the caller:

- :meth:`BundleReader.blobs` streams every member in order, checking each name, size,
  offset and digest against ``bundle.json`` (a pipe or an ``.tar.xz`` can only be read
  this way);
- :meth:`BundleReader.open_blob` reads any blob directly, through the zstd seek table
  and the offsets in ``bundle.json``; several threads may read different blobs at once.

Nothing in the archive is trusted: member names are checked (no links, devices, absolute
names, ``..``), each blob is hashed against its name and sized against ``bundle.json``,
decompression output is bounded by what ``bundle.json`` declares, and the zstd window
is bounded. A blob's bytes are handed out only through readers that raise
:class:`IntegrityError` at the end if the content does not match its digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import lzma
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from pipeline.bundle.format import (
    BUNDLE_JSON,
    INDEX_JSON,
    MAX_BUNDLE_JSON,
    OCI_LAYOUT,
    REF_NAME,
    BlobEntry,
    BundleManifest,
    allowed_member,
    blob_member,
    parse_manifest,
)
from pipeline.bundle.seekable import SeekableReader, read_seek_table, stream_decompressor
from pipeline.bundle.split import PartsFile, find_parts
from pipeline.bundle.tarstream import BLOCK, TarReader, first_member_name, member_span
from pipeline.errors import BmsyncError, IntegrityError, UsageError
from pipeline.manifest import IMAGE_TYPES, INDEX_TYPES

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
MAX_METADATA = 16 * 1024 * 1024  # oci-layout and index.json together
CHUNK = 1024 * 1024
MANIFEST_TYPES = IMAGE_TYPES | INDEX_TYPES


class NotABundle(BmsyncError):
    """The file is an archive (or not), but not a bmsync bundle."""

    exit_code = 2


@dataclass(frozen=True)
class Source:
    """Where an archive's bytes come from, for messages and sidecars."""

    name: str  # what the user named (the archive, or the joined name of its parts)
    path: Path | None  # None for a stream
    parts: tuple[Path, ...] = ()

    @property
    def sidecar(self) -> Path | None:
        if self.path is None:
            return None
        return self.path.parent / f"{self.path.name}.sha256"


class _ReadStream(io.RawIOBase):
    """A raw stream whose subclasses define ``read(n)``; ``readinto`` fills the caller's
    buffer from it (what ``io.BufferedReader`` and ``hashlib.file_digest`` call)."""

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Bounded(_ReadStream):
    """A reader that refuses to deliver more than ``limit`` bytes (decompression bombs).

    The limit can be raised once ``bundle.json`` has said how big the stream is.
    """

    def __init__(self, src: IO[bytes], limit: int, what: str) -> None:
        self._src = src
        self.limit = limit
        self.count = 0
        self._what = what

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n if n is not None and n >= 0 else CHUNK)
        self.count += len(data)
        if self.count > self.limit:
            raise IntegrityError(
                f"{self._what}: decompresses to more than the {self.limit} bytes its"
                " bundle.json declares"
            )
        return data


class _XZReader(_ReadStream):
    """Streaming ``.xz`` decompression with bounded output per call."""

    def __init__(self, src: IO[bytes], what: str) -> None:
        self._src = src
        self._d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=256 * 1024 * 1024)
        self._what = what

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = n if n is not None and n > 0 else CHUNK
        try:
            while True:
                if self._d.eof:
                    return b""
                if self._d.needs_input:
                    chunk = self._src.read(CHUNK)
                    if not chunk:
                        raise IntegrityError(f"{self._what}: truncated xz stream")
                    out = self._d.decompress(chunk, max_length=n)
                else:
                    out = self._d.decompress(b"", max_length=n)
                if out:
                    return out
        except lzma.LZMAError as e:
            raise IntegrityError(f"{self._what}: damaged xz stream ({e})") from None


class _Hashing(_ReadStream):
    """Hashes every byte read from the raw archive (and per part, for split archives)."""

    def __init__(self, src: IO[bytes], part_sizes: list[int] | None = None) -> None:
        self._src = src
        self.hasher = hashlib.sha256()
        self._part_sizes = list(part_sizes or [])
        self._part_left = self._part_sizes[0] if self._part_sizes else -1
        self._part_hasher = hashlib.sha256()
        self.part_digests: list[str] = []

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n if n is not None and n >= 0 else CHUNK)
        self.hasher.update(data)
        if self._part_sizes:
            view = memoryview(data)
            while view:
                take = view[: self._part_left]
                self._part_hasher.update(take)
                self._part_left -= len(take)
                view = view[len(take):]
                if self._part_left == 0:
                    self._next_part()
        return data

    def _next_part(self) -> None:
        self.part_digests.append(self._part_hasher.hexdigest())
        self._part_hasher = hashlib.sha256()
        self._part_sizes.pop(0)
        self._part_left = self._part_sizes[0] if self._part_sizes else -1

    def drain(self) -> int:
        """Read (and hash) the rest; returns how many bytes that was."""
        total = 0
        while chunk := self.read(CHUNK):
            total += len(chunk)
        return total


class VerifyingReader(_ReadStream):
    """A blob's bytes; at its end, the size and sha256 must match or IntegrityError."""

    def __init__(self, src: IO[bytes], digest: str, size: int, where: str,
                 *, keep: bool = False) -> None:
        self._src = src
        self._digest = digest
        # Small members (manifests) can be kept for checks made after the stream passed.
        self.kept: list[bytes] | None = [] if keep else None
        self._left = size
        self._size = size
        self._hasher = hashlib.sha256()
        self._where = where
        self._checked = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._left == 0:
            self._check()
            return b""
        want = self._left if n is None or n < 0 else min(n, self._left)
        data = self._src.read(want)
        if not data:
            raise IntegrityError(
                f"{self._where}: blob {self._digest} ends after"
                f" {self._size - self._left} of {self._size} bytes"
            )
        self._hasher.update(data)
        if self.kept is not None:
            self.kept.append(data)
        self._left -= len(data)
        if self._left == 0:
            self._check()
        return data

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        actual = "sha256:" + self._hasher.hexdigest()
        if actual != self._digest:
            raise IntegrityError(
                f"{self._where}: blob {self._digest} holds content hashing to {actual}",
                expected=self._digest,
                actual=actual,
            )

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


@dataclass(frozen=True)
class Blob:
    """One blob met while streaming: its digest, entry and a verifying reader."""

    digest: str
    entry: BlobEntry
    reader: VerifyingReader


class BundleReader:
    """An opened bundle; see the module docstring. Close it (or use ``with``)."""

    def __init__(self, source: Source, raw: IO[bytes], *, hash_raw: bool = False) -> None:
        self.source = source
        self._raw = raw
        self._closers: list[Any] = [raw]
        part_sizes = None
        if isinstance(raw, PartsFile):
            part_sizes = [p.stat().st_size for p in raw.parts]
        self._hashing = _Hashing(raw, part_sizes) if hash_raw else None
        forward: IO[bytes] = cast(IO[bytes], self._hashing) if self._hashing else raw
        head = _peek(forward, 6)
        self.compression = _kind(head)
        self._stream = _Bounded(
            _decompressor(self.compression, cast(IO[bytes], _Prefixed(head, forward)), source.name),
            MAX_BUNDLE_JSON + 3 * BLOCK,
            source.name,
        )
        self._tar = TarReader(cast(BinaryIO, self._stream), allowed=allowed_member)
        self.manifest_raw, self.manifest = self._read_manifest()
        self._metadata_done = False
        self.blobs_start: int | None = None
        self._seekable: SeekableReader | None = None
        self._not_seekable = False
        self._random_lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------

    def _read_manifest(self) -> tuple[bytes, BundleManifest]:
        try:
            member = self._tar.next(max_size=MAX_BUNDLE_JSON)
        except IntegrityError as e:
            if self.source.path is None or self.source.parts:
                raise self._not_a_bundle(str(e)) from None
            first, decode_error = first_member(self.source.path)
            if decode_error is not None:
                raise IntegrityError(f"{self.source.name}: {decode_error}") from None
            if first == BUNDLE_JSON:
                # A bundle whose first header is bad: say what is wrong with it.
                raise IntegrityError(f"{self.source.name}: {e}") from None
            raise self._not_a_bundle(
                f"its first member is {first!r}" if first else
                "it is not a tar archive (nor a .tar.zst or .tar.xz)"
            ) from None
        if member is None or member.name != BUNDLE_JSON:
            raise self._not_a_bundle(
                f"its first member is {member.name!r}" if member else "it is an empty archive"
            )
        raw = self._tar.read(member.size)
        if len(raw) != member.size:
            raise IntegrityError(f"{self.source.name}: truncated archive inside bundle.json")
        manifest = parse_manifest(raw, source=self.source.name)
        # Now the whole stream's size is known: bound decompression by it.
        self._stream.limit = _tar_size_bound(manifest, len(raw))
        return raw, manifest

    def _not_a_bundle(self, found: str) -> NotABundle:
        return NotABundle(
            f"{self.source.name} is not a bmsync bundle: {found}",
            hint="bmsync bundles start with bundle.json; extract other archives with tar",
        )

    # -- streaming -----------------------------------------------------------------------

    def _read_metadata(self) -> None:
        """Read and check ``oci-layout`` and ``index.json`` (members 2 and 3)."""
        if self._metadata_done:
            return
        self._metadata_done = True
        layout = self._expect_member(OCI_LAYOUT, 4096)
        try:
            version = json.loads(layout).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if version != "1.0.0":
            raise IntegrityError(f"{self.source.name}: oci-layout is not an OCI layout 1.0.0")
        index = self._expect_member(INDEX_JSON, MAX_METADATA)
        self.index_json = index
        _check_index(index, self.manifest, self.source.name)
        self.blobs_start = self._tar.position

    def _expect_member(self, name: str, limit: int) -> bytes:
        member = self._tar.next(max_size=limit)
        if member is None or member.name != name:
            found = repr(member.name) if member else "the end of the archive"
            raise IntegrityError(f"{self.source.name}: expected {name} here, found {found}")
        data = self._tar.read(member.size)
        if len(data) != member.size:
            raise IntegrityError(f"{self.source.name}: truncated archive inside {name}")
        return data

    def blobs(self) -> Iterator[Blob]:
        """Every blob the archive carries, in order, each checked against bundle.json.

        The caller may read each blob's reader or not; whatever is left is read and
        verified before the next one. After the last blob, the end of the archive is
        checked (nothing added, nothing missing).
        """
        self._read_metadata()
        assert self.blobs_start is not None
        manifests: dict[str, bytes] = {}
        for digest, entry in self.manifest.archive_blobs():
            member = self._tar.next(max_size=entry.size)
            expected = blob_member(digest)
            if member is None:
                raise IntegrityError(
                    f"{self.source.name}: truncated archive: blob {digest} is missing"
                )
            if member.name != expected:
                raise IntegrityError(
                    f"{self.source.name}: member {member.name!r} where bundle.json has"
                    f" blob {digest}"
                )
            if member.size != entry.size or member.offset - self.blobs_start != entry.offset:
                raise IntegrityError(
                    f"{self.source.name}: blob {digest} is not where bundle.json says"
                    f" (size {member.size} at {member.offset - self.blobs_start}, declared"
                    f" {entry.size} at {entry.offset})"
                )
            is_manifest = entry.media_type in MANIFEST_TYPES
            reader = VerifyingReader(
                cast(IO[bytes], _TarMemberIO(self._tar)), digest, entry.size, self.source.name,
                keep=is_manifest,
            )
            yield Blob(digest, entry, reader)
            reader.drain()
            if reader.kept is not None:
                manifests[digest] = b"".join(reader.kept)
        extra = self._tar.next()
        if extra is not None:
            raise IntegrityError(
                f"{self.source.name}: member {extra.name!r} is not declared in bundle.json"
            )
        check_images(self.manifest, manifests, self.source.name)

    def finish(self) -> None:
        """After :meth:`blobs`: read what follows the tar (padding, seek table) to the end."""
        while self._stream.read(CHUNK):
            pass
        if self._hashing is not None:
            self._hashing.drain()

    def drain_raw(self) -> None:
        """Hash the rest of the archive's bytes without decompressing (after an error)."""
        if self._hashing is not None:
            self._hashing.drain()

    @property
    def raw_sha256(self) -> str | None:
        """sha256 of the archive bytes (opened with ``hash_raw`` and read to the end)."""
        return self._hashing.hasher.hexdigest() if self._hashing else None

    @property
    def part_sha256(self) -> list[str]:
        return list(self._hashing.part_digests) if self._hashing else []

    # -- random access -------------------------------------------------------------------

    @property
    def seekable(self) -> bool:
        """Whether :meth:`open_blob` works (a seekable ``.tar.zst`` with a seek table)."""
        return self._random() is not None

    def _random(self) -> SeekableReader | None:
        # Threads call this at once: set up the seek table and the metadata exactly once.
        with self._random_lock:
            if self._seekable is not None or self._not_seekable:
                return self._seekable
            self._not_seekable = True
            if self.compression != "zstd" or self.source.path is None or self.source.parts:
                return None
            with open(self.source.path, "rb") as f:
                frames = read_seek_table(f)
            if frames is None:
                return None
            self._read_metadata()
            self._seekable = SeekableReader(self.source.path, frames)
            self._closers.append(self._seekable)
            self._not_seekable = False
            return self._seekable

    def open_blob(self, digest: str) -> VerifyingReader:
        """A verifying reader of one blob, read directly through the seek table.

        Thread-safe. Raises UsageError when the archive is not seekable, and
        IntegrityError when the blob is not carried or its header is not where
        bundle.json says.
        """
        random = self._random()
        if random is None:
            raise UsageError(f"{self.source.name} cannot be read out of order; stream it")
        entry = self.manifest.blobs.get(digest)
        if entry is None or not entry.in_archive or entry.offset is None:
            raise IntegrityError(f"{self.source.name}: blob {digest} is not in the archive")
        start = self.blobs_start
        assert start is not None  # read by _random()
        header = random.read_at(start + entry.offset, BLOCK)
        name = header[:100].rstrip(b"\0").decode("ascii", "replace")
        if name != blob_member(digest):
            raise IntegrityError(
                f"{self.source.name}: bundle.json puts blob {digest} at offset"
                f" {entry.offset}, where the archive holds {name!r}"
            )
        data = random.open_range(start + entry.offset + BLOCK, entry.size)
        return VerifyingReader(cast(IO[bytes], data), digest, entry.size, self.source.name)

    def close(self) -> None:
        for c in reversed(self._closers):
            with contextlib.suppress(Exception):
                c.close()
        self._closers = []

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TarMemberIO(io.RawIOBase):
    def __init__(self, tar: TarReader) -> None:
        self._tar = tar

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._tar.read(n)


class _Prefixed(_ReadStream):
    """Puts back bytes already peeked from a forward-only stream."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0 or n >= len(self._head):
                out, self._head = self._head, b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._rest.read(n if n is not None and n >= 0 else CHUNK)


def _peek(src: IO[bytes], n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = src.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _kind(head: bytes) -> str:
    if head.startswith(ZSTD_MAGIC) or head[:4] in (b"\x5e\x2a\x4d\x18",):
        return "zstd"
    if head.startswith(XZ_MAGIC):
        return "xz"
    return "none"


def _decompressor(kind: str, src: IO[bytes], name: str) -> IO[bytes]:
    if kind == "zstd":
        return cast(IO[bytes], stream_decompressor(src, max_output=None))
    if kind == "xz":
        return cast(IO[bytes], _XZReader(src, name))
    return src


def _tar_size_bound(manifest: BundleManifest, manifest_size: int) -> int:
    """The most bytes the decompressed stream may hold once bundle.json is known."""
    blobs = sum(member_span(b.size) for _, b in manifest.archive_blobs())
    # bundle.json + oci-layout + index.json + blobs + end blocks + tar record padding.
    return member_span(manifest_size) + 2 * member_span(MAX_METADATA) + blobs + 20 * BLOCK


def _check_index(raw: bytes, manifest: BundleManifest, name: str) -> None:
    """index.json must list exactly the images of bundle.json, with their digests."""
    try:
        doc = json.loads(raw)
        entries = {m["annotations"][REF_NAME]: m["digest"] for m in doc["manifests"]}
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{name}: index.json is not a valid OCI index") from None
    expected = {i.source: i.digest for i in manifest.images}
    if entries != expected:
        extra = sorted(set(entries) - set(expected))
        missing = sorted(set(expected) - set(entries))
        what = (f"lists {extra[0]} which bundle.json does not" if extra else
                f"lacks {missing[0]}" if missing else "has other digests than bundle.json")
        raise IntegrityError(f"{name}: index.json {what}")


def check_images(manifest: BundleManifest, manifests: dict[str, bytes], name: str) -> None:
    """Every image's blob list in bundle.json is exactly what its manifests reference.

    ``manifests`` holds the manifest bytes read from the archive (already verified
    against their digests). A delta's manifests left to its base cannot be read here:
    below them, only "nothing extra is listed" can be checked.
    """
    from pipeline.manifest import parse_manifest

    for image in manifest.images:
        referenced: set[str] = set()
        complete = True
        todo = [(image.digest, manifest.blobs[image.digest].media_type)]
        while todo:
            digest, media_type = todo.pop()
            if digest in referenced:
                continue
            referenced.add(digest)
            raw = manifests.get(digest)
            if raw is None:
                complete = False  # left to the base
                continue
            try:
                m = parse_manifest(raw, media_type, expected_digest=digest)
            except BmsyncError as e:
                raise IntegrityError(f"{name}: image {image.source}: {e.message}") from None
            children = m.children() if m.is_index else m.blobs()
            todo.extend((c.digest, c.media_type) for c in children)
        listed = set(image.blobs)
        unlisted = sorted(referenced - listed)
        if unlisted:
            raise IntegrityError(
                f"{name}: image {image.source} needs blob {unlisted[0]}, which its entry in"
                " bundle.json does not list"
            )
        undeclared = sorted(d for d in referenced if d not in manifest.blobs)
        if undeclared:
            raise IntegrityError(
                f"{name}: image {image.source} needs blob {undeclared[0]}, which bundle.json"
                " does not declare"
            )
        extra = sorted(listed - referenced)
        if complete and extra:
            raise IntegrityError(
                f"{name}: image {image.source} lists blob {extra[0]}, which none of its"
                " manifests reference"
            )


def layout_manifest(layout: Path) -> BundleManifest:
    """The plan of a layout made by ``bmsync bundle extract`` (its ``bundle.json``)."""
    manifest_file = layout / BUNDLE_JSON
    if not manifest_file.is_file():
        raise UsageError(f"{layout} holds no bundle.json: give the archive, or a layout"
                         " made by `bmsync bundle extract`")
    return parse_manifest(manifest_file.read_bytes(), source=str(manifest_file))


def open_bundle(path: str | os.PathLike[str], *, hash_raw: bool = False) -> BundleReader:
    """Open an archive file, or a split archive by its name or any part's name.

    ``hash_raw`` hashes every archive byte read (for checking the ``.sha256`` sidecar;
    it then has to be read to the end with :meth:`BundleReader.finish`).
    """
    p = Path(path)
    parts = find_parts(p)
    if parts:
        stem = parts[0].name.rsplit(".part-", 1)[0]
        source = Source(str(p.parent / stem), p.parent / stem, tuple(parts))
        raw: IO[bytes] = cast(IO[bytes], PartsFile(parts))
    else:
        if not p.exists():
            raise UsageError(f"{p}: no such archive")
        if p.is_dir():
            raise UsageError(f"{p} is a directory, not an archive")
        source = Source(str(p), p)
        raw = open(p, "rb")  # noqa: SIM115 - owned by the reader
    try:
        return BundleReader(source, raw, hash_raw=hash_raw)
    except BaseException:
        raw.close()
        raise


def open_stream(stream: IO[bytes], name: str = "<stdin>") -> BundleReader:
    """Read a bundle from a forward-only stream (a pipe): streaming access only."""
    return BundleReader(Source(name, None), stream)


def first_member(path: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """What a (possibly foreign) archive holds first, for "not a bmsync bundle" messages:
    the first member's name, and the decompressor's complaint when it could not even
    decompress that far (a damaged or hostile compressed stream)."""
    with open(path, "rb") as f:
        head = _peek(f, 6)
        kind = _kind(head)
        src = _decompressor(kind, cast(IO[bytes], _Prefixed(head, f)), str(path))
        try:
            return first_member_name(cast(BinaryIO, src)), None
        except IntegrityError as e:
            return None, e.message
        except (BmsyncError, OSError):
            return None, None
